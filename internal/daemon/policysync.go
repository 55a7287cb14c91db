package daemon

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"sync/atomic"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwk"

	"github.com/edgegate/edgegate/internal/config"
	"github.com/edgegate/edgegate/internal/keys"
	"github.com/edgegate/edgegate/internal/metrics"
	"github.com/edgegate/edgegate/internal/queue"
	"github.com/edgegate/edgegate/internal/uplink"
	"github.com/edgegate/edgegate/policy"
	centralsync "github.com/edgegate/edgegate/sync"
)

// newSyncer builds the policy syncer for a bundle or Ownership API source,
// and puts the cached policy in force before any network.
func newSyncer(cfg *config.Config, gw string, id *keys.Identity, engine *policy.Engine, q *queue.Queue, tokens centralsync.Tokens,
	client *http.Client, centralCAs *x509.CertPool, m *metrics.Metrics, log *slog.Logger, now func() time.Time,
	registry *centralsync.Registry, onRefusal func(reason, via, detail string)) (*centralsync.Syncer, error) {
	o := centralsync.Options{
		Gateway: gw, Engine: engine, Store: q, Tokens: tokens, Signer: id, Metrics: m,
		Logger: log.With("component", "policy-sync"), CentralURL: cfg.Policy.CentralURL, HTTPClient: client,
		PollInterval: cfg.Policy.PollInterval, Now: now, OnRefusal: onRefusal,
		MQTTURL: cfg.Policy.PushURL, MQTTUsername: cfg.Central.ClientID,
		MQTTTLS: &tls.Config{RootCAs: centralCAs, MinVersion: tls.VersionTLS12},
		// Outside the store: survives quarantine and factory reset.
		FloorFile: filepath.Join(cfg.StateDir, centralsync.FloorFileName),
	}
	switch cfg.Policy.Source {
	case config.PolicyBundle:
		o.Source = centralsync.SourceBundle
		raw, err := os.ReadFile(cfg.Policy.KeysFile)
		if err != nil {
			return nil, fmt.Errorf("read policy.keys_file: %w", err)
		}
		set, err := jwk.Parse(raw)
		if err != nil {
			return nil, fmt.Errorf("parse policy.keys_file %s: %w", cfg.Policy.KeysFile, err)
		}
		o.Keys = set
	case config.PolicyOwnership:
		o.Source = centralsync.SourceOwnership
		ow := cfg.Policy.Ownership
		o.Ownership = centralsync.OwnershipOptions{
			OwnershipURL: ow.URL, DataManagerURL: ow.DataManagerURL, Username: ow.Username,
			Brokers: ow.Brokers, DefaultType: ow.DefaultType, MaxAge: ow.MaxAge,
			Registry: registry,
		}
	}
	s, err := centralsync.New(o)
	if err != nil {
		return nil, fmt.Errorf("configure policy sync: %w", err)
	}
	if err := s.LoadCached(); err != nil {
		return nil, fmt.Errorf("load the cached policy: %w", err)
	}
	cur := engine.Current()
	if cur.Version == 0 {
		log.Warn("no cached policy yet: every reading is refused until the first policy arrives", "source", cfg.Policy.Source)
	} else {
		log.Info("cached policy in force", "policy", cur.Describe())
	}
	return s, nil
}

// policyEffects acts on policy changes at once: the queued readings of a
// revoked device are purged, and so are those of a device that changed
// owner, so that data collected under the old owner is never delivered
// under the new one.
func policyEffects(q *queue.Queue, m *metrics.Metrics, log *slog.Logger) func(policy.Change) {
	return func(ch policy.Change) {
		if m != nil && ch.New != nil {
			m.PolicyVersion.Set(float64(ch.New.Version))
			if ch.New.ExpiresAt.IsZero() {
				m.PolicyExpiry.Set(0)
			} else {
				m.PolicyExpiry.Set(float64(ch.New.ExpiresAt.Unix()))
			}
		}
		purge := append([]string(nil), ch.Revoked...)
		for _, id := range ch.Rebound {
			o, _ := ch.Old.Device(id)
			n, _ := ch.New.Device(id)
			if o != nil && n != nil && o.Owner != n.Owner {
				purge = append(purge, id)
			}
		}
		for _, id := range purge {
			n, err := q.PurgeDevice(id)
			if err != nil {
				log.Error("purge the readings of a revoked device", "device", id, "err", err)
				continue
			}
			log.Info("purged the queued readings of a revoked or re-owned device", "device", id, "readings", n)
		}
	}
}

// gatedSource is the queue as the uplink sees it, with two policy rules
// applied at delivery time: nothing is forwarded once the policy in force
// is past its expiry plus grace (fail closed: readings stay queued until a
// fresh policy arrives), and a lane of a device no longer registered for
// that broker is never served.
type gatedSource struct {
	uplink.Source
	engine *policy.Engine
	grace  time.Duration
	now    func() time.Time
	log    *slog.Logger
	closed atomic.Bool // last state, to log transitions once
}

func (g *gatedSource) held() bool {
	p := g.engine.Current()
	expired := p.Expired(g.now(), g.grace)
	if was := g.closed.Swap(expired); was != expired {
		if expired {
			g.log.Warn("policy expired beyond its grace: holding every reading until a fresh policy arrives",
				"policy", p.Describe(), "grace", g.grace)
		} else {
			g.log.Info("fresh policy in force: forwarding again", "policy", p.Describe())
		}
	}
	return expired
}

func (g *gatedSource) Brokers() []string {
	if g.held() {
		return nil
	}
	return g.Source.Brokers()
}

func (g *gatedSource) Lanes(broker string) []queue.Lane {
	if g.held() {
		return nil
	}
	p := g.engine.Current()
	lanes := g.Source.Lanes(broker)
	out := lanes[:0:0]
	for _, l := range lanes {
		if d, ok := p.Device(l.Device); ok && d.Broker == l.Broker {
			out = append(out, l)
		}
	}
	return out
}
