package central

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/json"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jwk"
	"github.com/lestrrat-go/jwx/v2/jws"

	"github.com/edgegate/edgegate/internal/keys"
	"github.com/edgegate/edgegate/internal/metrics"
	"github.com/edgegate/edgegate/internal/queue"
	"github.com/edgegate/edgegate/internal/testkit"
	"github.com/edgegate/edgegate/policy"
	centralsync "github.com/edgegate/edgegate/sync"
)

// rollGateway is a real gateway Syncer with explicitly pinned keys, its
// own metrics and log, talking to central (the companion or a proxy).
type rollGateway struct {
	engine *policy.Engine
	syncer *centralsync.Syncer
	m      *metrics.Metrics
	logs   *logBuf
	q      *queue.Queue
	cancel context.CancelFunc
	done   chan struct{}
}

func (e *env) startRollGateway(t *testing.T, pinned jwk.Set, central string, q *queue.Queue, push bool) *rollGateway {
	t.Helper()
	if q == nil {
		var err error
		q, err = queue.Open(queue.Options{Dir: t.TempDir(), Key: bytes.Repeat([]byte{7}, 32)})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { q.Close() })
	}
	id, err := keys.LoadIdentity(q)
	if err != nil {
		t.Fatal(err)
	}
	p0, _ := policy.New(0, "config", nil)
	g := &rollGateway{engine: policy.NewEngine(p0), m: metrics.New(), logs: &logBuf{}, q: q, done: make(chan struct{})}
	ts := centralsync.NewTokenSource(centralsync.ClientCredentials{TokenURL: e.sim.TokenURL(), ClientID: "gw-a-client",
		ClientSecret: gwASecret, HTTPClient: e.simHTTP})
	o := centralsync.Options{Gateway: "gw-a", Source: centralsync.SourceBundle, Engine: g.engine,
		Store: q, Tokens: ts, Signer: id, CentralURL: central, HTTPClient: e.gwHTTP, Keys: pinned, Metrics: g.m,
		Logger:       slog.New(slog.NewJSONHandler(g.logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
		PollInterval: time.Hour}
	if push {
		o.MQTTURL, o.MQTTUsername, o.MQTTTLS = e.mqttURL, "gw-a-client", e.gatewayMQTTTLS()
	}
	if g.syncer, err = centralsync.New(o); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	g.cancel = cancel
	go func() { defer close(g.done); _ = g.syncer.Run(ctx) }()
	t.Cleanup(g.stop)
	t.Cleanup(func() {
		for _, s := range []string{gwASecret, devK1, devK2} {
			if strings.Contains(g.logs.String(), s) {
				t.Errorf("a secret (%.8s…) appears in the gateway's logs", s)
			}
		}
	})
	return g
}

func (g *rollGateway) stop() {
	g.cancel()
	select {
	case <-g.done:
	case <-time.After(5 * time.Second):
		panic("syncer did not stop")
	}
}

func (g *rollGateway) refused(t *testing.T, reason string) float64 {
	t.Helper()
	var m dto.Metric
	if err := g.m.PolicyRefused.WithLabelValues(reason).Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}

func (g *rollGateway) dump(t *testing.T) {
	st := g.syncer.Status()
	b, _ := json.Marshal(st)
	t.Logf("status: %s\nlog:\n%s", b, g.logs.String())
}

func hasDevice(g *rollGateway, id string) bool {
	_, ok := g.engine.Current().Device(id)
	return ok
}

// rotate rotates the companion's key file the way `keys rotate` does;
// the running service reloads it at its next round.
func (e *env) rotate(t *testing.T, overlap time.Duration) string {
	t.Helper()
	ring, err := OpenKeyRing(e.svc.cfg.KeyFile, false)
	if err != nil {
		t.Fatal(err)
	}
	kid, err := ring.Rotate(overlap, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	bumpMtime(t, e.svc.cfg.KeyFile)
	testkit.Eventually(t, 5*time.Second, "the service signs with the new key", func() bool {
		return e.svc.Keys().ActiveKID() == kid
	})
	return kid
}

// TestKeyRolloverWithoutRepairing: a gateway paired before `keys rotate`
// keeps taking pushed bundles through the rotation and after the overlap
// (old key retired), without pairing again; it pins only the keys the
// companion publishes, and a restart keeps the rolled-over keys.
func TestKeyRolloverWithoutRepairing(t *testing.T) {
	e := newEnv(t, nil)
	e.insert("alice", "th-1", "gw-a")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if _, err := e.svc.Refresh(ctx, false); err != nil {
		t.Fatal(err)
	}
	go e.svc.Run(ctx)
	paired := e.pinnedKeys() // what `edgegate pair` pinned
	oldKid := e.svc.Keys().ActiveKID()
	g := e.startRollGateway(t, paired, e.api.URL, nil, true)
	testkit.Eventually(t, 10*time.Second, "first bundle applied", func() bool { return hasDevice(g, "th-1") })

	const overlap = 1500 * time.Millisecond
	newKid := e.rotate(t, overlap)
	e.insert("alice", "th-2", "gw-a") // a new version, signed by the new key, pushed
	testkit.Eventually(t, 10*time.Second, "bundle by the rotated key applied", func() bool { return hasDevice(g, "th-2") })
	st := g.syncer.Status()
	if st.Keys == nil || !slices.Contains(st.Keys.Pinned, newKid) || !slices.Contains(st.Keys.Pinned, oldKid) {
		t.Fatalf("pinned during the overlap: %+v, want %s and %s", st.Keys, oldKid, newKid)
	}

	testkit.Eventually(t, 10*time.Second, "overlap over", func() bool { return e.pinnedKeys().Len() == 1 })
	e.insert("alice", "th-3", "gw-a")
	testkit.Eventually(t, 10*time.Second, "bundle after the overlap applied", func() bool { return hasDevice(g, "th-3") })
	g.syncer.Nudge() // a poll round checks the key set
	testkit.Eventually(t, 10*time.Second, "retired key dropped", func() bool {
		k := g.syncer.Status().Keys
		return k != nil && slices.Equal(k.Pinned, []string{newKid})
	})
	if n := g.refused(t, centralsync.ReasonUnknownKey); n != 0 {
		t.Fatalf("%v bundles refused for an unknown key", n)
	}

	// A restart on the same store, with the keys file of the pairing:
	// the rolled-over keys from the store are in force.
	g.stop()
	e.insert("alice", "th-4", "gw-a")
	g2 := e.startRollGateway(t, paired, e.api.URL, g.q, true)
	defer func() {
		if t.Failed() {
			g2.dump(t)
		}
	}()
	testkit.Eventually(t, 10*time.Second, "restarted gateway applies a bundle by the new key", func() bool { return hasDevice(g2, "th-4") })
	if k := g2.syncer.Status().Keys; !slices.Equal(k.Pinned, []string{newKid}) {
		t.Fatalf("after restart pinned %v, want [%s]", k.Pinned, newKid)
	}
}

// TestKeyRolloverOfflinePastOverlap: a gateway that was off during the
// whole overlap pins only retired keys; it refuses the new bundles and
// says, in status, metrics and log, that it must be paired again.
func TestKeyRolloverOfflinePastOverlap(t *testing.T) {
	e := newEnv(t, nil)
	e.insert("alice", "th-1", "gw-a")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if _, err := e.svc.Refresh(ctx, false); err != nil {
		t.Fatal(err)
	}
	go e.svc.Run(ctx)
	paired := e.pinnedKeys()
	e.rotate(t, 300*time.Millisecond)
	testkit.Eventually(t, 10*time.Second, "overlap over", func() bool { return e.pinnedKeys().Len() == 1 })
	before, _, _ := e.svc.Store().Gateway(ctx, "gw-a")
	e.insert("alice", "th-2", "gw-a")
	testkit.Eventually(t, 10*time.Second, "new version signed", func() bool {
		r, _, _ := e.svc.Store().Gateway(ctx, "gw-a")
		return r.Version > before.Version
	})

	g := e.startRollGateway(t, paired, e.api.URL, nil, false)
	testkit.Eventually(t, 10*time.Second, "re-pair reported", func() bool {
		k := g.syncer.Status().Keys
		return k != nil && k.RePair && g.refused(t, centralsync.ReasonKeysRetired) >= 1 && g.refused(t, centralsync.ReasonUnknownKey) >= 1
	})
	if hasDevice(g, "th-1") || hasDevice(g, "th-2") {
		t.Fatal("a bundle by an unpinned key was applied")
	}
	st := g.syncer.Status()
	if st.LastRefusal == nil || st.LastRefusal.Reason != centralsync.ReasonUnknownKey || !strings.Contains(st.LastRefusal.Detail, "pair again") {
		t.Fatalf("status's last refusal: %+v, want unknown_key telling to pair again", st.LastRefusal)
	}
	if !strings.Contains(g.logs.String(), "edgegate pair --force") {
		t.Fatalf("the log does not tell the operator to pair again:\n%s", g.logs.String())
	}
}

// TestForgedKeySetRefused: a key set signed by a key the gateway does not
// pin (served in place of the companion's, over the same trusted TLS) is
// refused and counted; so is one that claims a pinned kid with a
// signature by another key. The pinned keys stay, and the companion's
// bundles keep verifying.
func TestForgedKeySetRefused(t *testing.T) {
	e := newEnv(t, nil)
	e.insert("alice", "th-1", "gw-a")
	ctx := context.Background()
	if _, err := e.svc.Refresh(ctx, false); err != nil {
		t.Fatal(err)
	}
	paired := e.pinnedKeys()
	pinnedKid := e.svc.Keys().ActiveKID()

	forger, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	fk, _ := jwk.FromRaw(forger)
	_ = jwk.AssignKeyID(fk)
	_ = fk.Set(jwk.AlgorithmKey, jwa.ES256)
	forge := func(kid string) []byte {
		pub, _ := jwk.PublicKeyOf(fk)
		set := jwk.NewSet()
		_ = set.AddKey(pub)
		kb, _ := json.Marshal(set)
		now := time.Now().UTC()
		payload, _ := json.Marshal(centralsync.KeySet{Keys: kb, IssuedAt: now, ExpiresAt: now.Add(time.Hour)})
		hdr := jws.NewHeaders()
		_ = hdr.Set(jws.KeyIDKey, kid)
		_ = hdr.Set(jws.TypeKey, centralsync.KeySetType)
		c, err := jws.Sign(payload, jws.WithKey(jwa.ES256, forger, jws.WithProtectedHeaders(hdr)))
		if err != nil {
			t.Fatal(err)
		}
		p := strings.Split(string(c), ".")
		b, _ := json.Marshal(centralsync.GeneralJWS{Payload: p[1], Signatures: []centralsync.GeneralJWSig{{Protected: p[0], Signature: p[2]}}})
		return b
	}
	var forged atomic.Value // []byte
	target, _ := url.Parse(e.api.URL)
	rp := httputil.NewSingleHostReverseProxy(target)
	rp.Transport = e.gwHTTP.Transport
	proxy := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == centralsync.KeySetPath {
			w.Header().Set("Content-Type", "application/jose+json")
			w.Write(forged.Load().([]byte))
			return
		}
		rp.ServeHTTP(w, r)
	}))
	proxy.TLS = e.api.TLS
	proxy.StartTLS()
	defer proxy.Close()

	forged.Store(forge(fk.KeyID())) // signed by its own, unpinned key
	g := e.startRollGateway(t, paired, proxy.URL, nil, false)
	testkit.Eventually(t, 10*time.Second, "forged set refused, bundle applied", func() bool {
		return g.refused(t, centralsync.ReasonKeysRetired) >= 1 && hasDevice(g, "th-1")
	})
	g.stop()

	forged.Store(forge(pinnedKid)) // claims the pinned kid, signed by another key
	g = e.startRollGateway(t, paired, proxy.URL, nil, false)
	defer func() {
		if t.Failed() {
			g.dump(t)
		}
	}()
	testkit.Eventually(t, 10*time.Second, "impostor set refused", func() bool {
		return g.refused(t, centralsync.ReasonKeySetUntrusted) >= 1 && hasDevice(g, "th-1")
	})
	if k := g.syncer.Status().Keys; !slices.Equal(k.Pinned, []string{pinnedKid}) || k.RePair {
		t.Fatalf("pinned after a forged set: %+v", k)
	}
	if strings.Contains(g.logs.String(), `"d":`) {
		t.Fatal("key material in the gateway's log")
	}
}
