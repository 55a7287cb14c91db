package centralsync

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"encoding/json"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jwk"
	"github.com/lestrrat-go/jwx/v2/jws"
	dto "github.com/prometheus/client_model/go"

	"github.com/edgegate/edgegate/internal/keys"
	"github.com/edgegate/edgegate/internal/metrics"
	"github.com/edgegate/edgegate/internal/pki"
	"github.com/edgegate/edgegate/internal/queue"
	"github.com/edgegate/edgegate/policy"
)

// Canaries of the policy-sync tests: none may appear in a log line, an
// error or a status snapshot.
const (
	polGateway    = "gw-test-1"
	polK1         = "K1-CANARY-3b7e"
	polK2         = "K2-CANARY-91d0"
	polToken      = "at-CANARY-policy-5e2a"
	polClientID   = "edgegate-client-gw-test-1"
	polBrokerURL  = "https://broker.example:8443"
	polOtherToken = "at-CANARY-rotated-77c1"
)

var polCanaries = []string{polK1, polK2, polToken, polOtherToken}

// polOps is central ops: signing keys and the pinned JWKS.
type polOps struct {
	ecKey  *ecdsa.PrivateKey
	edKey  ed25519.PrivateKey
	ecKid  string
	edKid  string
	pinned jwk.Set
}

func newPolOps(t *testing.T) *polOps {
	t.Helper()
	ec, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	_, ed, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	o := &polOps{ecKey: ec, edKey: ed, ecKid: "ops-2026-es", edKid: "ops-2026-ed"}
	o.pinned = polSet(t, map[string]any{o.ecKid: &ec.PublicKey, o.edKid: ed.Public()})
	return o
}

// polSet builds a JWKS of public keys, alg from the key type.
func polSet(t testing.TB, keys map[string]any) jwk.Set {
	t.Helper()
	set := jwk.NewSet()
	for kid, raw := range keys {
		k, err := jwk.FromRaw(raw)
		if err != nil {
			t.Fatal(err)
		}
		alg := jwa.ES256
		if _, ok := raw.(ed25519.PublicKey); ok {
			alg = jwa.EdDSA
		}
		_ = k.Set(jwk.KeyIDKey, kid)
		_ = k.Set(jwk.AlgorithmKey, alg)
		if err := set.AddKey(k); err != nil {
			t.Fatal(err)
		}
	}
	return set
}

// signRaw signs payload with key under alg, with kid in the header.
func signRaw(t testing.TB, alg jwa.SignatureAlgorithm, key any, kid string, payload []byte) []byte {
	t.Helper()
	hdr := jws.NewHeaders()
	if kid != "" {
		_ = hdr.Set(jws.KeyIDKey, kid)
	}
	_ = hdr.Set(jws.TypeKey, BundleType)
	out, err := jws.Sign(payload, jws.WithKey(alg, key, jws.WithProtectedHeaders(hdr)))
	if err != nil {
		t.Fatalf("sign: %v", err)
	}
	return out
}

func (o *polOps) sign(t *testing.T, doc policy.Document) []byte {
	t.Helper()
	b, _ := json.Marshal(doc)
	return signRaw(t, jwa.ES256, o.ecKey, o.ecKid, b)
}

// polDoc is a valid document of version v, issued now, valid for a day.
func polDoc(v uint64, now time.Time) policy.Document {
	return policy.Document{
		Format: policy.DocumentFormat, Gateway: polGateway, Version: v,
		IssuedAt: now.Add(-time.Minute).UTC().Truncate(time.Second), ExpiresAt: now.Add(24 * time.Hour).UTC().Truncate(time.Second),
		Devices: []policy.Registration{
			{ID: "th-kitchen", Type: "Thermometer", Owner: "alice", Broker: polBrokerURL, K1: polK1, K2: polK2},
			{ID: "th-garden", Type: "Thermometer", Owner: "alice", Broker: polBrokerURL, K1: polK1 + "g", K2: polK2 + "g"},
		},
		Delegations: []policy.Delegation{{Device: "th-kitchen", User: "bob", Kind: policy.ReadAccess}},
	}
}

// polTokens is a fake token source; Invalidate rotates to the next token.
type polTokens struct {
	mu          sync.Mutex
	tok         string
	invalidated []string
}

func (p *polTokens) Token(ctx context.Context) (string, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.tok, ctx.Err()
}

func (p *polTokens) set(tok string) { p.mu.Lock(); p.tok = tok; p.mu.Unlock() }

func (p *polTokens) Invalidate(bad string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.invalidated = append(p.invalidated, bad)
	if p.tok == bad {
		p.tok = polOtherToken
	}
}

// polCentral is the central service's policy endpoints.
type polCentral struct {
	mu         sync.Mutex
	bundle     []byte
	receipts   [][]byte
	receiptsOK bool
	gets       atomic.Int64
	notMod     atomic.Int64
	posts      atomic.Int64
}

func (c *polCentral) setBundle(b []byte) { c.mu.Lock(); c.bundle = b; c.mu.Unlock() }
func (c *polCentral) setReceiptsOK(ok bool) {
	c.mu.Lock()
	c.receiptsOK = ok
	c.mu.Unlock()
}

func (c *polCentral) receiptBodies() [][]byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([][]byte(nil), c.receipts...)
}

func (c *polCentral) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	tok := strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")
	if tok != polToken && tok != polOtherToken {
		http.Error(w, "no", http.StatusUnauthorized)
		return
	}
	switch {
	case r.Method == http.MethodGet && r.URL.Path == "/edgegate/v1/gateways/"+polGateway+"/policy":
		c.gets.Add(1)
		c.mu.Lock()
		b := c.bundle
		c.mu.Unlock()
		if b == nil {
			http.NotFound(w, r)
			return
		}
		etag := `"` + Digest(b)[7:23] + `"`
		if r.Header.Get("If-None-Match") == etag {
			c.notMod.Add(1)
			w.WriteHeader(http.StatusNotModified)
			return
		}
		w.Header().Set("Content-Type", "application/jose")
		w.Header().Set("ETag", etag)
		w.Write(b)
	case r.Method == http.MethodPost && r.URL.Path == "/edgegate/v1/gateways/"+polGateway+"/receipts":
		c.posts.Add(1)
		if r.Header.Get("Content-Type") != "application/jose" {
			http.Error(w, "type", http.StatusUnsupportedMediaType)
			return
		}
		var buf bytes.Buffer
		buf.ReadFrom(r.Body)
		c.mu.Lock()
		ok := c.receiptsOK
		if ok {
			c.receipts = append(c.receipts, buf.Bytes())
		}
		c.mu.Unlock()
		if !ok {
			http.Error(w, "down", http.StatusServiceUnavailable)
			return
		}
		w.WriteHeader(http.StatusAccepted)
	default:
		http.NotFound(w, r)
	}
}

// polEnv is one gateway with its store, engine, identity and a central
// service on a TLS loopback server.
type polEnv struct {
	t       *testing.T
	ca      *pki.CA
	ops     *polOps
	central *polCentral
	srv     *httptest.Server
	client  *http.Client
	dir     string
	store   *queue.Queue
	engine  *policy.Engine
	m       *metrics.Metrics
	id      *keys.Identity
	tokens  *polTokens
	logs    *syncBuffer
	log     *slog.Logger
	errs    []error
}

func newPolEnv(t *testing.T) *polEnv {
	t.Helper()
	ca, err := pki.NewCA("edgegate test CA", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	e := &polEnv{t: t, ca: ca, ops: newPolOps(t), central: &polCentral{receiptsOK: true},
		dir: t.TempDir(), tokens: &polTokens{tok: polToken}, logs: &syncBuffer{}}
	e.srv = e.tlsServer(e.central)
	e.client = &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: ca.Pool()}}}
	e.openStore()
	e.engine = policy.NewEngine(polConfigPolicy(t))
	e.m = metrics.New()
	e.log = slog.New(slog.NewJSONHandler(e.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	t.Cleanup(func() {
		e.store.Close()
		e.checkNoSecrets()
	})
	return e
}

func polConfigPolicy(t *testing.T) *policy.Policy {
	p, err := policy.New(0, "config", nil)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func (e *polEnv) tlsServer(h http.Handler) *httptest.Server {
	cert, err := e.ca.IssueServer(time.Now(), "127.0.0.1")
	if err != nil {
		e.t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(h)
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	srv.StartTLS()
	e.t.Cleanup(srv.Close)
	return srv
}

func (e *polEnv) openStore() {
	q, err := queue.Open(queue.Options{Dir: e.dir, Key: bytes.Repeat([]byte{9}, 32)})
	if err != nil {
		e.t.Fatalf("open store: %v", err)
	}
	e.store = q
	if e.id == nil {
		if e.id, err = keys.LoadIdentity(q); err != nil {
			e.t.Fatal(err)
		}
	}
}

// restart closes and reopens the store and gives the gateway a fresh
// engine holding only the configuration policy, as after a reboot.
func (e *polEnv) restart() {
	if err := e.store.Close(); err != nil {
		e.t.Fatal(err)
	}
	e.openStore()
	e.engine = policy.NewEngine(polConfigPolicy(e.t))
}

func (e *polEnv) options() Options {
	return Options{
		Gateway: polGateway, Source: SourceBundle, Engine: e.engine, Store: e.store, Tokens: e.tokens,
		Signer: e.id, Metrics: e.m, Logger: e.log, CentralURL: e.srv.URL, HTTPClient: e.client,
		Keys: e.ops.pinned, PollInterval: time.Hour,
	}
}

func (e *polEnv) syncer(mut func(*Options)) *Syncer {
	e.t.Helper()
	o := e.options()
	if mut != nil {
		mut(&o)
	}
	s, err := New(o)
	if err != nil {
		e.t.Fatalf("New: %v", err)
	}
	s.receiptMin = 20 * time.Millisecond
	return s
}

// run starts s.Run and stops it (bounded) at cleanup or when stop is called.
func (e *polEnv) run(s *Syncer) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					e.t.Errorf("Run = %v, want nil", err)
				}
			case <-time.After(10 * time.Second):
				e.t.Errorf("Run did not return within 10s of cancellation")
			}
		})
	}
	e.t.Cleanup(stop)
	return stop
}

func (e *polEnv) note(err error) error { e.errs = append(e.errs, err); return err }

func (e *polEnv) checkNoSecrets() {
	e.t.Helper()
	for _, txt := range append([]string{e.logs.String()}, errTexts(e.errs)...) {
		for _, c := range polCanaries {
			if strings.Contains(txt, c) {
				e.t.Errorf("secret %q leaked into %q", c, clipTest(txt, c))
			}
		}
	}
}

func clipTest(s, around string) string {
	i := strings.Index(s, around)
	lo, hi := max(0, i-200), min(len(s), i+200)
	return s[lo:hi]
}

func (e *polEnv) refused(reason string) float64 {
	return counterValue(e.t, e.m.PolicyRefused.WithLabelValues(reason))
}

func (e *polEnv) applied(source string) float64 {
	return counterValue(e.t, e.m.PolicyApplied.WithLabelValues(source))
}

func gaugeValue(t *testing.T, g interface{ Write(*dto.Metric) error }) float64 {
	t.Helper()
	var m dto.Metric
	if err := g.Write(&m); err != nil {
		t.Fatalf("read gauge: %v", err)
	}
	return m.GetGauge().GetValue()
}
