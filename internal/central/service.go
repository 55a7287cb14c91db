package central

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"sync"
	"time"

	"golang.org/x/oauth2"

	"github.com/edgegate/edgegate/internal/backoff"
	"github.com/edgegate/edgegate/internal/keys"
	"github.com/edgegate/edgegate/policy"
	centralsync "github.com/edgegate/edgegate/sync"
)

// Options configures a Service.
type Options struct {
	Config Config
	Logger *slog.Logger // nil: discard
	// PlatformHTTP makes every call to the platform (API and SSO); nil:
	// one with a 30s timeout trusting the system roots and platform.ca_file.
	PlatformHTTP *http.Client
	// Store replaces the store of the configuration (tests).
	Store Store
	Now   func() time.Time
}

// Service is edgegate-central.
type Service struct {
	cfg      Config
	log      *slog.Logger
	now      func() time.Time
	store    Store
	keys     *KeyRing
	platform *Platform
	tokens   *tokenVerifier
	metrics  *serviceMetrics
	push     publisher // nil without mqtt_listen or before Start
	ext      *extPush  // push.mode external, after StartExternalPush

	stop    context.CancelFunc // ends the JWKS cache's refresher
	roundMu sync.Mutex         // one platform round at a time
	builds  BuildCache         // incremental rounds (build.go); under roundMu
	bindMu  sync.Mutex         // first-use bindings
}

// RoundResult is what one platform round did.
type RoundResult struct {
	Gateways  int               `json:"gateways"`
	Signed    []string          `json:"signed"`            // gateways with a new version
	Pushed    []string          `json:"pushed"`            // gateways whose bundle was published on MQTT
	Refused   map[string]string `json:"refused,omitempty"` // gateway → why its policy was not published
	Unchanged int               `json:"unchanged"`
}

// New opens the store and the signing keys and prepares the platform
// client. It does no platform I/O.
func New(ctx context.Context, o Options) (*Service, error) {
	cfg := o.Config
	if err := cfg.Check(); err != nil {
		return nil, err
	}
	s := &Service{cfg: cfg, log: o.Logger, now: o.Now, store: o.Store}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if s.now == nil {
		s.now = time.Now
	}
	hc := o.PlatformHTTP
	if hc == nil {
		tc := &tls.Config{MinVersion: tls.VersionTLS12}
		if cfg.Platform.CAFile != "" {
			pem, err := os.ReadFile(cfg.Platform.CAFile)
			if err != nil {
				return nil, fmt.Errorf("platform.ca_file: %w", err)
			}
			pool, err := x509.SystemCertPool()
			if err != nil {
				pool = x509.NewCertPool()
			}
			if !pool.AppendCertsFromPEM(pem) {
				return nil, fmt.Errorf("platform.ca_file %s: no PEM certificate", cfg.Platform.CAFile)
			}
			tc.RootCAs = pool
		}
		hc = &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{TLSClientConfig: tc}}
	}
	token, err := accountTokens(cfg.Platform, hc, s.log)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("state_dir: %w", err)
	}
	if s.keys, err = OpenKeyRing(cfg.KeyFile, true); err != nil {
		return nil, err
	}
	cctx, stop := context.WithCancel(ctx)
	s.stop = stop
	s.tokens = newTokenVerifier(cctx, cfg.Platform.Issuer, hc)
	s.platform = NewPlatform(cfg.Platform.URL, cfg.Platform.DataManagerURL, hc, token, cfg.Concurrency, int64(cfg.Platform.MaxAnswer))
	s.platform.users = cfg.GatewayUsers
	if s.store == nil {
		// The store key: systemd credential StoreKeyCredential, else a 0600
		// file in the state directory generated on first use (keys.LoadStoreKey).
		// Replicas on one PostgreSQL database must all be given the same key.
		key, _, err := keys.LoadStoreKey(StoreKeyCredential, filepath.Join(cfg.StateDir, "store.key"), os.Getenv)
		if err != nil {
			stop()
			return nil, err
		}
		switch cfg.Store {
		case StorePostgres:
			dsn, err := ReadSecretFile("postgres_url_file", cfg.PostgresURLFile)
			if err == nil {
				s.store, err = OpenPostgres(ctx, dsn, key, s.log)
			}
			if err != nil {
				stop()
				return nil, err
			}
		default:
			if s.store, err = OpenBadger(filepath.Join(cfg.StateDir, "db"), key); err != nil {
				stop()
				return nil, err
			}
		}
	}
	s.metrics = newServiceMetrics(s)
	return s, nil
}

// accountTokens is the platform account's access token source.
func accountTokens(p PlatformConfig, hc *http.Client, log *slog.Logger) (func(context.Context) (string, error), error) {
	tokenURL := p.Issuer + "/protocol/openid-connect/token" // Keycloak's token endpoint
	if p.ClientSecretFile != "" {
		secret, err := ReadSecretFile("platform.client_secret_file", p.ClientSecretFile)
		if err != nil {
			return nil, err
		}
		ts := centralsync.NewTokenSource(centralsync.ClientCredentials{TokenURL: tokenURL, ClientID: p.ClientID,
			ClientSecret: secret, HTTPClient: hc, Logger: log})
		return ts.Token, nil
	}
	rt, err := ReadSecretFile("platform.refresh_token_file", p.RefreshTokenFile)
	if err != nil {
		return nil, err
	}
	conf := &oauth2.Config{ClientID: p.ClientID, Endpoint: oauth2.Endpoint{TokenURL: tokenURL, AuthStyle: oauth2.AuthStyleInParams}}
	// A rotated refresh token is kept in memory only: after a restart the
	// file's token must still be valid (Keycloak offline tokens are).
	ts := conf.TokenSource(context.WithValue(context.Background(), oauth2.HTTPClient, hc), &oauth2.Token{RefreshToken: rt})
	return func(context.Context) (string, error) {
		t, err := ts.Token()
		if err != nil {
			return "", errors.New("refresh_token grant refused or failed")
		}
		return t.AccessToken, nil
	}, nil
}

// Close releases the store and the push broker.
func (s *Service) Close() error {
	s.stop()
	if s.push != nil {
		s.push.close()
	}
	return s.store.Close()
}

// Keys is the signing key ring.
func (s *Service) Keys() *KeyRing { return s.keys }

// Store is the state store.
func (s *Service) Store() Store { return s.store }

// Refresh reads the platform once and publishes every gateway whose
// policy changed (or whose bundle passed half its lifetime). force also
// republishes unchanged bundles on MQTT (ops asking for a push after a
// revocation). only, when not empty, limits the round to those gateways.
func (s *Service) Refresh(ctx context.Context, force bool, only ...string) (RoundResult, error) {
	s.roundMu.Lock()
	defer s.roundMu.Unlock()
	defer func(start time.Time) { s.metrics.roundSeconds.Observe(time.Since(start).Seconds()) }(time.Now())
	if err := s.keys.Reload(); err != nil {
		s.log.Error("signing keys unreadable; signing with the keys loaded before", "err", err)
	}
	ctx, cancel := context.WithTimeout(ctx, s.cfg.RoundTimeout)
	defer cancel()
	res := RoundResult{Signed: []string{}, Pushed: []string{}, Refused: map[string]string{}}
	snap, err := s.platform.Snapshot(ctx)
	var built map[string]*Built
	if err == nil {
		var extra []string
		for gw := range s.cfg.Gateways {
			extra = append(extra, gw)
		}
		var recs []GatewayRecord
		if recs, err = s.store.Gateways(ctx); err == nil {
			for _, r := range recs {
				extra = append(extra, r.ID)
			}
			built, err = s.builds.Build(snap, s.cfg.Platform.Brokers, extra)
			st := s.builds.Stats
			s.log.Debug("policies built", "rows_decoded", st.RowsDecoded, "rows_reused", st.RowsReused,
				"gateways_built", st.GatewaysBuilt, "gateways_reused", st.GatewaysReused)
		}
	}
	if err != nil {
		// Refuse and alert: publishing from a partial answer could drop
		// devices or delegations silently, or resurrect revoked ones.
		s.metrics.rounds.WithLabelValues("refused").Inc()
		s.log.Error("platform answer refused; no bundle published this round", "err", err)
		return res, fmt.Errorf("platform round: %w", err)
	}
	ids := make([]string, 0, len(built))
	for gw := range built {
		if len(only) == 0 || slices.Contains(only, gw) {
			ids = append(ids, gw)
		}
	}
	sort.Strings(ids)
	for _, gw := range only {
		if built[gw] == nil {
			res.Refused[gw] = "unknown gateway: no device names it and it is not configured"
		}
	}
	res.Gateways = len(ids)
	s.pinFromAppRows(ctx, snap.AppPins)
	for _, gw := range ids {
		b := built[gw]
		if len(b.Problems) > 0 {
			why := b.Problems[0]
			if len(b.Problems) > 1 {
				why = fmt.Sprintf("%s (and %d more)", why, len(b.Problems)-1)
			}
			res.Refused[gw] = why
			s.metrics.buildRefused.Inc()
			s.log.Error("policy not published: the platform's answer for this gateway is incomplete",
				"gateway", gw, "problems", b.Problems)
			_, _ = s.store.UpdateGateway(ctx, gw, func(r *GatewayRecord) error {
				r.BuildError, r.BuildErrorAt = why, s.now().UTC()
				return nil
			})
			continue
		}
		rec, signed, err := s.publish(ctx, b)
		if err != nil {
			res.Refused[gw] = err.Error()
			s.log.Error("policy not published", "gateway", gw, "err", err)
			continue
		}
		if signed {
			res.Signed = append(res.Signed, gw)
		} else {
			res.Unchanged++
		}
		if (signed || force) && s.push != nil {
			// Publish the newest stored bundle under the gateway's lock, not
			// the one just signed: a racing replica may have stored a newer
			// one, and its push waits for this one, so a retained message is
			// never replaced by an older version.
			var pushed uint64
			err := s.store.PublishLocked(ctx, gw, func(cur GatewayRecord) error {
				if cur.Bundle == "" || cur.Version < rec.Version {
					return fmt.Errorf("store holds version %d, older than the %d just signed", cur.Version, rec.Version)
				}
				pushed = cur.Version
				return s.push.publish(gw, cur.Bundle)
			})
			if err != nil {
				s.log.Error("push failed", "gateway", gw, "err", err)
			} else {
				res.Pushed = append(res.Pushed, gw)
				s.metrics.pushes.Inc()
				if pushed != rec.Version {
					s.log.Info("pushed a newer version stored by another replica", "gateway", gw, "signed", rec.Version, "pushed", pushed)
				}
			}
		}
	}
	result := "ok"
	if len(res.Refused) > 0 {
		result = "partial"
	}
	s.metrics.rounds.WithLabelValues(result).Inc()
	s.metrics.refusedNow.Set(float64(len(res.Refused)))
	return res, nil
}

// pinFromAppRows pins the identity key of a gateway that has none yet
// from its AppID row, when exactly one live row names one key: two rows
// claiming one gateway id with different keys pin nothing (the first
// valid receipt does, as before).
func (s *Service) pinFromAppRows(ctx context.Context, pins map[string][]string) {
	for gw, tps := range pins {
		if len(tps) != 1 {
			s.log.Warn("AppID rows disagree on the gateway's identity key; not pinned from them", "gateway", gw, "keys", len(tps))
			continue
		}
		_, err := s.store.UpdateGateway(ctx, gw, func(r *GatewayRecord) error {
			if r.Pin != "" {
				return errNoChange
			}
			r.Pin = tps[0]
			return nil
		})
		if err == nil {
			s.log.Info("gateway identity key pinned from its AppID row", "gateway", gw, "thumbprint", tps[0])
		}
	}
}

var (
	errNoChange  = errors.New("no change")
	errUnchanged = errors.New("bundle unchanged")
)

// publish signs a new version of b when its content changed or its
// bundle passed half its lifetime. The version is decided inside the
// store's update, so it only ever grows.
func (s *Service) publish(ctx context.Context, b *Built) (GatewayRecord, bool, error) {
	signed := false
	rec, err := s.store.UpdateGateway(ctx, b.Gateway, func(r *GatewayRecord) error {
		now := s.now().UTC().Truncate(time.Second)
		if r.Version != 0 && r.Content == b.Content && r.Bundle != "" && now.Before(r.IssuedAt.Add(s.cfg.PolicyTTL/2)) {
			if r.BuildError == "" {
				// Nothing to write: a steady round rewrites no record (at
				// 10,000 gateways that was the whole store every minute).
				return errUnchanged
			}
			r.BuildError, r.BuildErrorAt = "", time.Time{}
			return nil
		}
		r.BuildError, r.BuildErrorAt = "", time.Time{}
		// Unix seconds as a floor keeps versions increasing across a lost
		// store too (a gateway's floor is the last version it applied).
		v := r.Version + 1
		if u := now.Unix(); u > 0 && uint64(u) > v {
			v = uint64(u)
		}
		doc := b.Doc
		doc.Version, doc.IssuedAt, doc.ExpiresAt = v, now, now.Add(s.cfg.PolicyTTL)
		payload, err := json.Marshal(doc)
		if err != nil {
			return fmt.Errorf("encode policy: %w", err)
		}
		if len(payload) > centralsync.DefaultMaxBundleBytes*3/4 {
			return fmt.Errorf("policy of %d bytes is too large for the gateway (at most %d for the bundle)", len(payload), centralsync.DefaultMaxBundleBytes)
		}
		compact, err := s.keys.Sign(payload)
		if err != nil {
			return err
		}
		if _, err := policy.Compile(doc, centralsync.SourceBundle, ""); err != nil {
			return fmt.Errorf("policy would not compile on the gateway: %w", err)
		}
		r.Version, r.Content, r.IssuedAt, r.ExpiresAt = v, b.Content, now, doc.ExpiresAt
		r.Bundle, r.Digest, r.Devices = compact, centralsync.Digest([]byte(compact)), len(doc.Devices)
		r.remember(v, r.Digest)
		signed = true
		return nil
	})
	if errors.Is(err, errUnchanged) {
		// The stores return the record fn saw when fn fails.
		return rec, false, nil
	}
	if err != nil {
		return rec, false, err
	}
	if signed {
		s.metrics.signed.Inc()
		s.log.Info("policy bundle signed", "gateway", b.Gateway, "version", rec.Version, "devices", rec.Devices,
			"delegations", len(b.Doc.Delegations), "kid", s.keys.ActiveKID())
	}
	return rec, signed, nil
}

// Run polls the platform every poll_interval (±20% jitter) until ctx ends.
func (s *Service) Run(ctx context.Context) error {
	for {
		if _, err := s.Refresh(ctx, false); err != nil && ctx.Err() == nil {
			s.log.Warn("platform round failed", "err", err)
		}
		d := backoff.Spread(s.cfg.PollInterval, rand.Float64())
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(d):
		}
	}
}

// FleetEntry is one gateway in the fleet view.
type FleetEntry struct {
	Gateway       string    `json:"gateway"`
	Account       string    `json:"account,omitempty"`
	Version       uint64    `json:"version"` // newest issued
	IssuedAt      time.Time `json:"issued_at,omitzero"`
	ExpiresAt     time.Time `json:"expires_at,omitzero"`
	Devices       int       `json:"devices"`
	Applied       uint64    `json:"applied_version"` // from its last receipt
	AppliedSince  time.Time `json:"applied_since,omitzero"`
	LastReceiptAt time.Time `json:"last_receipt_at,omitzero"`
	Stale         bool      `json:"stale"`
	BuildError    string    `json:"build_error,omitempty"`
}

// Fleet lists every gateway: which version it runs since when, and
// whether it is stale (its receipt lags behind a bundle issued more than
// stale_after ago, or its applied bundle has expired).
func (s *Service) Fleet(ctx context.Context) ([]FleetEntry, error) {
	recs, err := s.store.Gateways(ctx)
	if err != nil {
		return nil, err
	}
	now := s.now()
	out := make([]FleetEntry, 0, len(recs))
	for _, r := range recs {
		e := FleetEntry{Gateway: r.ID, Account: r.Account, Version: r.Version, IssuedAt: r.IssuedAt, ExpiresAt: r.ExpiresAt,
			Devices: r.Devices, Applied: r.Applied, AppliedSince: r.AppliedSince, LastReceiptAt: r.ReceiptAt, BuildError: r.BuildError}
		e.Stale = r.Version > 0 && r.Applied < r.Version && now.Sub(r.IssuedAt) > s.cfg.StaleAfter
		if r.Version > 0 && r.Applied == 0 && now.Sub(r.IssuedAt) > s.cfg.StaleAfter {
			e.Stale = true
		}
		out = append(out, e)
	}
	return out, nil
}
