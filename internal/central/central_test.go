package central

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwk"

	"github.com/edgegate/edgegate/internal/keys"
	"github.com/edgegate/edgegate/internal/pki"
	"github.com/edgegate/edgegate/internal/queue"
	"github.com/edgegate/edgegate/internal/sim/centralsim"
	"github.com/edgegate/edgegate/internal/testkit"
	"github.com/edgegate/edgegate/policy"
	centralsync "github.com/edgegate/edgegate/sync"
)

// Secrets of the fixture: none may appear in a log line.
const (
	opsSecret = "ops-secret-CANARY-71f2"
	gwASecret = "gwa-secret-CANARY-0c3e"
	gwBSecret = "gwb-secret-CANARY-9d41"
	devK1     = "k1-CANARY-5b7e2f01"
	devK2     = "k2-CANARY-a4c99e13"
	adminTok  = "admin-CANARY-3f0d81"
)

type logBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuf) Write(p []byte) (int, error) { l.mu.Lock(); defer l.mu.Unlock(); return l.b.Write(p) }
func (l *logBuf) String() string              { l.mu.Lock(); defer l.mu.Unlock(); return l.b.String() }

// env is a stock platform (centralsim without Companion), edgegate-central
// on loopback TLS with its push broker, and clients.
type env struct {
	t        *testing.T
	sim      *centralsim.Server
	simHTTP  *http.Client
	svc      *Service
	api      *httptest.Server
	mqttURL  string
	ca       *pki.CA
	gwHTTP   *http.Client // trusts the companion's CA
	logs     *logBuf
	cfg      Config
	stateDir string
	proxy    *httptest.Server
	fault    atomic.Value // string: the proxy's fault
	mqttTLS  *tls.Config  // the gateways' TLS to the push broker; nil: trust ca
}

func newEnv(t *testing.T, mut func(*Config)) *env {
	t.Helper()
	sim, err := centralsim.New(centralsim.Options{
		Users: []centralsim.User{{Username: "ops", Role: centralsim.RoleRootAdmin}, {Username: "alice"}, {Username: "bob"}},
		Clients: []centralsim.Client{{ID: "central-ops", Secret: opsSecret, Username: "ops"},
			{ID: "central-alice", Secret: opsSecret, Username: "alice"},
			{ID: "gw-a-client", Secret: gwASecret}, {ID: "gw-b-client", Secret: gwBSecret}},
		Logger: slog.New(slog.DiscardHandler),
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := sim.Start("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sim.Close() })
	e := &env{t: t, sim: sim, logs: &logBuf{}, stateDir: t.TempDir()}
	e.ca, err = pki.NewCA("edgegate-central test CA", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	cert, err := e.ca.IssueServer(time.Now(), "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	roots := e.ca.Pool()
	roots.AppendCertsFromPEM(sim.CACertPEM())
	e.simHTTP = &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}}}
	e.gwHTTP = &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: e.ca.Pool()}}}
	// The companion reads the platform through a transparent proxy that
	// can break the platform's answers the way a network or a back end does.
	target, _ := url.Parse(sim.URL())
	rp := httputil.NewSingleHostReverseProxy(target)
	rp.Transport = e.simHTTP.Transport
	e.proxy = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch f, _ := e.fault.Load().(string); {
		case f == "datamanager-500" && strings.HasPrefix(r.URL.Path, "/datamanager/"):
			http.Error(w, "Internal Server Error", http.StatusInternalServerError)
		case (f == "ownership-truncated" && strings.HasPrefix(r.URL.Path, "/ownership-api/")) ||
			(f == "directory-truncated" && strings.HasPrefix(r.URL.Path, "/iot-directory/")):
			// The real answer, cut half-way (a connection lost mid-body).
			rec := httptest.NewRecorder()
			rp.ServeHTTP(rec, r)
			w.Header().Set("Content-Type", "application/json")
			w.Write(rec.Body.Bytes()[:rec.Body.Len()/2])
		case f == "ownership-malformed" && strings.HasPrefix(r.URL.Path, "/ownership-api/"):
			w.Header().Set("Content-Type", "application/json")
			io.WriteString(w, `[{"username":"alice","elementId":"Organization:orion-1:th-1","elementType":"IOTID","elementDetails":"{\"k1\":"}]`)
		default:
			rp.ServeHTTP(w, r)
		}
	}))
	e.proxy.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	e.proxy.StartTLS()
	t.Cleanup(e.proxy.Close)
	secret := filepath.Join(e.stateDir, "ops-secret")
	if err := os.WriteFile(secret, []byte(opsSecret+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	e.cfg = Config{
		StateDir: filepath.Join(e.stateDir, "state"),
		Platform: PlatformConfig{URL: e.proxy.URL, Issuer: sim.Issuer(), ClientID: "central-ops", ClientSecretFile: secret,
			Brokers: map[string]string{centralsim.DefaultBrokerName: sim.BrokerURL()}},
		Gateways:     map[string]string{"gw-a": "gw-a-client", "gw-b": "gw-b-client"},
		PollInterval: 150 * time.Millisecond,
		PolicyTTL:    time.Hour,
	}
	if mut != nil {
		mut(&e.cfg)
	}
	e.svc, err = New(context.Background(), Options{Config: e.cfg, PlatformHTTP: e.simHTTP,
		Logger: slog.New(slog.NewJSONHandler(e.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))})
	if err != nil {
		t.Fatal(err)
	}
	if e.cfg.Push.Mode != PushExternal { // pushext_test.go starts the external push
		if e.mqttURL, err = e.svc.StartPush("127.0.0.1:0", cert); err != nil {
			t.Fatal(err)
		}
	}
	e.api = httptest.NewUnstartedServer(e.svc.Handler(adminTok))
	e.api.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	e.api.StartTLS()
	t.Cleanup(func() {
		e.api.Close()
		e.svc.Close()
		for _, s := range []string{opsSecret, gwASecret, gwBSecret, devK1, devK2, adminTok} {
			if strings.Contains(e.logs.String(), s) {
				t.Errorf("a secret (%.8s…) appears in the companion's logs", s)
			}
		}
	})
	return e
}

// insert registers a device the stock way: the IoT Directory's device.php
// insert, bound to gateway gw through its edgegateway_uri.
func (e *env) insert(owner, id, gw string) {
	e.t.Helper()
	tok, err := e.sim.IssueAccessToken(owner, time.Hour)
	if err != nil {
		e.t.Fatal(err)
	}
	dir := centralsync.NewDirectory(e.sim.URL(), e.simHTTP, func(context.Context) (string, error) { return tok, nil })
	spec := centralsync.DeviceSpec{ID: id, Type: "Thermometer", ContextBroker: centralsim.DefaultBrokerName, Kind: "sensor",
		Format: "json", Model: "custom", Producer: "edgegate", Latitude: 43.77, Longitude: 11.25, Frequency: 600,
		K1: devK1, K2: devK2,
		Attributes: []centralsync.DeviceAttr{{Name: "temperature", DataType: "float", Type: "temperature", Editable: "0",
			Unit: "C", HealthinessCriteria: centralsync.HealthRefreshRate, HealthinessValue: "1200"}},
		Gateway: gw, RadioNode: -1, RadioChild: -1}
	if _, err := dir.Insert(context.Background(), spec); err != nil {
		e.t.Fatalf("insert %s: %v", id, err)
	}
}

func (e *env) gatewayToken(client, secret string) string {
	e.t.Helper()
	ts := centralsync.NewTokenSource(centralsync.ClientCredentials{TokenURL: e.sim.TokenURL(), ClientID: client,
		ClientSecret: secret, HTTPClient: e.simHTTP})
	tok, err := ts.Token(context.Background())
	if err != nil {
		e.t.Fatal(err)
	}
	return tok
}

func (e *env) do(method, path, token string, body []byte, hdr map[string]string) (*http.Response, []byte) {
	e.t.Helper()
	req, _ := http.NewRequest(method, e.api.URL+path, bytes.NewReader(body))
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := e.gwHTTP.Do(req)
	if err != nil {
		e.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, b
}

func (e *env) pinnedKeys() jwk.Set {
	e.t.Helper()
	resp, b := e.do("GET", PolicyKeysPath, "", nil, nil)
	if resp.StatusCode != 200 {
		e.t.Fatalf("policy-keys: %d %s", resp.StatusCode, b)
	}
	set, err := jwk.Parse(b)
	if err != nil {
		e.t.Fatal(err)
	}
	return set
}

// gateway is the real gateway side: store, identity, engine, Syncer.
type gateway struct {
	engine *policy.Engine
	syncer *centralsync.Syncer
	id     *keys.Identity
	done   <-chan struct{} // closed when the syncer returned
}

func (e *env) startGateway(ctx context.Context, gw, client, secret string) *gateway {
	e.t.Helper()
	q, err := queue.Open(queue.Options{Dir: e.t.TempDir(), Key: bytes.Repeat([]byte{7}, 32)})
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { q.Close() })
	return e.startGatewayOn(ctx, gw, client, secret, q)
}

// startGatewayOn runs the gateway side on an existing store q (a gateway
// restarting keeps its identity and its version floor).
func (e *env) startGatewayOn(ctx context.Context, gw, client, secret string, q *queue.Queue) *gateway {
	e.t.Helper()
	id, err := keys.LoadIdentity(q)
	if err != nil {
		e.t.Fatal(err)
	}
	p0, err := policy.New(0, "config", nil)
	if err != nil {
		e.t.Fatal(err)
	}
	g := &gateway{engine: policy.NewEngine(p0), id: id}
	ts := centralsync.NewTokenSource(centralsync.ClientCredentials{TokenURL: e.sim.TokenURL(), ClientID: client,
		ClientSecret: secret, HTTPClient: e.simHTTP})
	g.syncer, err = centralsync.New(centralsync.Options{Gateway: gw, Source: centralsync.SourceBundle, Engine: g.engine,
		Store: q, Tokens: ts, Signer: id, CentralURL: e.api.URL, HTTPClient: e.gwHTTP, Keys: e.pinnedKeys(),
		PollInterval: time.Hour, // the push, not the poll, must deliver
		MQTTURL:      e.mqttURL, MQTTUsername: client, MQTTTLS: e.gatewayMQTTTLS()})
	if err != nil {
		e.t.Fatal(err)
	}
	done := make(chan struct{})
	g.done = done
	go func() { defer close(done); _ = g.syncer.Run(ctx) }()
	e.t.Cleanup(func() {
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			e.t.Error("syncer did not stop")
		}
	})
	return g
}

func (e *env) gatewayMQTTTLS() *tls.Config {
	if e.mqttTLS != nil {
		return e.mqttTLS.Clone()
	}
	return &tls.Config{RootCAs: e.ca.Pool()}
}

// TestRevocationPushedAndApplied: a delegation and then an ownership row
// removed at the stock platform reach the running gateway's policy in
// force through build, sign, MQTT push and verify, within seconds; the
// gateway's receipts are recorded in the fleet view.
func TestRevocationPushedAndApplied(t *testing.T) {
	e := newEnv(t, nil)
	e.insert("alice", "th-kitchen", "gw-a")
	e.insert("alice", "th-garden", "gw-a")
	e.insert("alice", "th-other", "gw-b")
	e.sim.SetDelegations([]centralsim.Delegation{{Device: "th-kitchen", User: "bob", Kind: centralsim.KindReadAccess}})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if _, err := e.svc.Refresh(ctx, false); err != nil {
		t.Fatal(err)
	}
	go e.svc.Run(ctx)
	g := e.startGateway(ctx, "gw-a", "gw-a-client", gwASecret)

	testkit.Eventually(t, 10*time.Second, "bob may read th-kitchen on gw-a", func() bool {
		return g.engine.Current().CanRead("bob", "th-kitchen")
	})
	cur := g.engine.Current()
	if _, ok := cur.Device("th-other"); ok {
		t.Fatal("gw-a's policy holds gw-b's device th-other")
	}
	if d, ok := cur.Device("th-garden"); !ok || d.Type != "Thermometer" || d.Owner != "alice" || d.Broker != e.sim.BrokerURL() {
		t.Fatalf("th-garden in gw-a's policy: %+v %v", d, ok)
	}

	start := time.Now()
	e.sim.SetDelegations(nil) // bob's delegation revoked at the platform
	testkit.Eventually(t, 5*time.Second, "revoked delegation applied", func() bool {
		return !g.engine.Current().CanRead("bob", "th-kitchen")
	})
	t.Logf("delegation revocation applied in %s", time.Since(start).Round(time.Millisecond))

	start = time.Now()
	e.sim.RemoveDevice("th-garden") // its ownership row ends
	testkit.Eventually(t, 5*time.Second, "removed device gone from the gateway", func() bool {
		_, ok := g.engine.Current().Device("th-garden")
		return !ok
	})
	t.Logf("ownership removal applied in %s", time.Since(start).Round(time.Millisecond))

	want := g.engine.Current().Version
	testkit.Eventually(t, 10*time.Second, "receipt for the applied version", func() bool {
		f, _ := e.svc.Fleet(ctx)
		for _, x := range f {
			if x.Gateway == "gw-a" {
				return x.Applied == want && x.Version == want && !x.Stale
			}
		}
		return false
	})
	resp, body := e.do("GET", AdminFleetPath, adminTok, nil, nil)
	if resp.StatusCode != 200 || !strings.Contains(string(body), `"gateway":"gw-a"`) {
		t.Fatalf("fleet: %d %s", resp.StatusCode, body)
	}
	resp, body = e.do("GET", MetricsPath, "", nil, nil)
	if resp.StatusCode != 200 || !strings.Contains(string(body), `edgegate_central_gateway_applied_version{gateway="gw-a"}`) {
		t.Fatalf("metrics: %d %s", resp.StatusCode, body)
	}
}

// TestGatewayIsolation: a gateway's token reads only its own policy and
// posts only its own receipts; a receipt for a version never issued is
// refused; If-None-Match answers 304.
func TestGatewayIsolation(t *testing.T) {
	e := newEnv(t, nil)
	e.insert("alice", "th-1", "gw-a")
	e.insert("alice", "th-2", "gw-b")
	ctx := context.Background()
	if _, err := e.svc.Refresh(ctx, false); err != nil {
		t.Fatal(err)
	}
	tokA := e.gatewayToken("gw-a-client", gwASecret)
	resp, body := e.do("GET", "/edgegate/v1/gateways/gw-b/policy", tokA, nil, nil)
	if resp.StatusCode != http.StatusForbidden {
		t.Fatalf("gw-a's token reading gw-b's policy: %d %s", resp.StatusCode, body)
	}
	if strings.Contains(string(body), devK1) {
		t.Fatal("refusal carries a device key")
	}
	resp, _ = e.do("GET", "/edgegate/v1/gateways/gw-a/policy", "not-a-token", nil, nil)
	if resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("bad token: %d", resp.StatusCode)
	}
	resp, body = e.do("GET", "/edgegate/v1/gateways/gw-a/policy", tokA, nil, nil)
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != ContentTypeJOSE {
		t.Fatalf("own policy: %d %s", resp.StatusCode, body)
	}
	v, err := centralsync.NewVerifier(centralsync.VerifierOptions{Keys: e.pinnedKeys(), Gateway: "gw-a"})
	if err != nil {
		t.Fatal(err)
	}
	got, err := v.Verify(body, 0)
	if err != nil {
		t.Fatalf("the gateway's verifier refuses the bundle: %v", err)
	}
	if len(got.Document.Devices) != 1 || got.Document.Devices[0].ID != "th-1" {
		t.Fatalf("gw-a's bundle: %+v", got.Document.Devices)
	}
	etag := resp.Header.Get("ETag")
	resp, _ = e.do("GET", "/edgegate/v1/gateways/gw-a/policy", tokA, nil, map[string]string{"If-None-Match": etag})
	if resp.StatusCode != http.StatusNotModified {
		t.Fatalf("If-None-Match: %d", resp.StatusCode)
	}

	q, err := queue.Open(queue.Options{Dir: t.TempDir(), Key: bytes.Repeat([]byte{3}, 32)})
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	id, err := keys.LoadIdentity(q)
	if err != nil {
		t.Fatal(err)
	}
	receipt := func(gw string, version uint64, digest string) []byte {
		b, _ := json.Marshal(centralsync.Receipt{Gateway: gw, PolicyVersion: version, BundleDigest: digest,
			Source: centralsync.SourceBundle, AppliedAt: time.Now().UTC().Format(time.RFC3339)})
		jws, err := id.Sign(b, map[string]any{"typ": centralsync.ReceiptType})
		if err != nil {
			t.Fatal(err)
		}
		return []byte(jws)
	}
	jose := map[string]string{"Content-Type": ContentTypeJOSE}
	resp, body = e.do("POST", "/edgegate/v1/gateways/gw-b/receipts", tokA, receipt("gw-b", got.Document.Version, got.Digest), jose)
	if resp.StatusCode != http.StatusForbidden {
		t.Fatalf("gw-a's token posting gw-b's receipt: %d %s", resp.StatusCode, body)
	}
	resp, body = e.do("POST", "/edgegate/v1/gateways/gw-a/receipts", tokA, receipt("gw-a", got.Document.Version+7, got.Digest), jose)
	if resp.StatusCode != http.StatusConflict || !strings.Contains(string(body), "unknown_version") {
		t.Fatalf("receipt for an unknown version: %d %s", resp.StatusCode, body)
	}
	resp, body = e.do("POST", "/edgegate/v1/gateways/gw-a/receipts", tokA, receipt("gw-a", got.Document.Version, got.Digest), jose)
	if resp.StatusCode != http.StatusAccepted {
		t.Fatalf("valid receipt: %d %s", resp.StatusCode, body)
	}
	resp, body = e.do("POST", "/edgegate/v1/gateways/gw-a/receipts", tokA, bytes.Repeat([]byte("a"), maxReceiptBytes+1), jose)
	if resp.StatusCode != http.StatusRequestEntityTooLarge {
		t.Fatalf("oversized receipt: %d %s", resp.StatusCode, body)
	}
	// Admin endpoints need the admin token, not a gateway's.
	resp, _ = e.do("POST", AdminPushPath, tokA, []byte(`{"all":true}`), nil)
	if resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("admin push with a gateway token: %d", resp.StatusCode)
	}
	resp, body = e.do("POST", AdminPushPath, adminTok, []byte(`{"gateways":["gw-a"]}`), nil)
	if resp.StatusCode != 200 || !strings.Contains(string(body), `"pushed":["gw-a"]`) {
		t.Fatalf("admin push: %d %s", resp.StatusCode, body)
	}
}

// TestKeyRotationOverlap: after `keys rotate`, the JWKS still holds the
// old key, so a bundle signed before the rotation verifies; new bundles
// are signed by the new kid; after the overlap the old key is gone.
func TestKeyRotationOverlap(t *testing.T) {
	e := newEnv(t, nil)
	e.insert("alice", "th-1", "gw-a")
	ctx := context.Background()
	if _, err := e.svc.Refresh(ctx, false); err != nil {
		t.Fatal(err)
	}
	rec, _, _ := e.svc.Store().Gateway(ctx, "gw-a")
	oldBundle, oldKid := rec.Bundle, e.svc.Keys().ActiveKID()

	// The CLI rotates the file; the running service reloads it.
	ring, err := OpenKeyRing(e.svc.cfg.KeyFile, false)
	if err != nil {
		t.Fatal(err)
	}
	newKid, err := ring.Rotate(time.Hour, time.Now())
	if err != nil || newKid == oldKid {
		t.Fatalf("rotate: %v %q", err, newKid)
	}
	bumpMtime(t, e.svc.cfg.KeyFile)
	e.insert("alice", "th-2", "gw-a") // a change: a new version
	if _, err := e.svc.Refresh(ctx, false); err != nil {
		t.Fatal(err)
	}
	rec, _, _ = e.svc.Store().Gateway(ctx, "gw-a")
	keys := e.pinnedKeys()
	if keys.Len() != 2 {
		t.Fatalf("JWKS during overlap has %d keys, want 2", keys.Len())
	}
	v, err := centralsync.NewVerifier(centralsync.VerifierOptions{Keys: keys, Gateway: "gw-a"})
	if err != nil {
		t.Fatal(err)
	}
	oldV, err := v.Verify([]byte(oldBundle), 0)
	if err != nil || oldV.KeyID != oldKid {
		t.Fatalf("old bundle during overlap: %v", err)
	}
	newV, err := v.Verify([]byte(rec.Bundle), oldV.Document.Version)
	if err != nil || newV.KeyID != newKid {
		t.Fatalf("new bundle: %v (kid %v)", err, newV)
	}
	if pub := e.svc.Keys().Public(time.Now().Add(2 * time.Hour)); pub.Len() != 1 {
		t.Fatalf("JWKS after the overlap has %d keys, want 1", pub.Len())
	}
	st, _ := os.Stat(e.svc.cfg.KeyFile)
	if st.Mode().Perm() != 0o600 {
		t.Fatalf("key file mode %o", st.Mode().Perm())
	}
}

// TestPartialPlatformAnswerRefused: a datamanager failure or a device the
// IoT Directory cannot type refuses the gateway's bundle (no silent drop)
// and alerts; a malformed ownership list refuses the whole round.
func TestPartialPlatformAnswerRefused(t *testing.T) {
	e := newEnv(t, nil)
	e.insert("alice", "th-1", "gw-a")
	ctx := context.Background()
	if _, err := e.svc.Refresh(ctx, false); err != nil {
		t.Fatal(err)
	}
	before, _, _ := e.svc.Store().Gateway(ctx, "gw-a")
	e.fault.Store("datamanager-500")
	e.sim.SetDelegations([]centralsim.Delegation{{Device: "th-1", User: "bob", Kind: centralsim.KindReadAccess}})
	res, err := e.svc.Refresh(ctx, false)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(res.Refused["gw-a"], "delegations of alice unreadable") {
		t.Fatalf("refused: %v", res.Refused)
	}
	after, _, _ := e.svc.Store().Gateway(ctx, "gw-a")
	if after.Version != before.Version || after.BuildError == "" {
		t.Fatalf("a bundle was published from a partial answer: v%d → v%d (%q)", before.Version, after.Version, after.BuildError)
	}
	e.fault.Store("ownership-malformed")
	if _, err := e.svc.Refresh(ctx, false); err == nil {
		t.Fatal("a malformed ownership list did not refuse the round")
	}
	_, body := e.do("GET", MetricsPath, "", nil, nil)
	for _, m := range []string{`edgegate_central_platform_rounds_total{result="refused"} 1`, `edgegate_central_gateways_refused 1`} {
		if !strings.Contains(string(body), m) {
			t.Errorf("metrics lack %s", m)
		}
	}
	e.fault.Store("")
	if _, err := e.svc.Refresh(ctx, false); err != nil {
		t.Fatal(err)
	}
	after, _, _ = e.svc.Store().Gateway(ctx, "gw-a")
	if after.Version <= before.Version || after.BuildError != "" {
		t.Fatalf("no new version once the platform answered: %+v", after.Version)
	}
}

// TestAccountNotRootAdminRefused: an account that is not a RootAdmin sees
// only its own ownership rows; the companion refuses to build from that.
func TestAccountNotRootAdminRefused(t *testing.T) {
	e := newEnv(t, func(c *Config) { c.Platform.ClientID = "central-alice" })
	e.insert("alice", "th-1", "gw-a")
	_, err := e.svc.Refresh(context.Background(), false)
	if err == nil || !strings.Contains(err.Error(), "not a RootAdmin") {
		t.Fatalf("round with a non-RootAdmin account: %v", err)
	}
	if rec, ok, _ := e.svc.Store().Gateway(context.Background(), "gw-a"); ok && rec.Version != 0 {
		t.Fatalf("a bundle was published: v%d", rec.Version)
	}
}

// bumpMtime moves a rewritten file's mtime a second on, so the service's
// reload (keyed on the mtime) sees the change however fast the rewrite
// followed the previous one.
func bumpMtime(t *testing.T, path string) {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	later := st.ModTime().Add(time.Second)
	if err := os.Chtimes(path, later, later); err != nil {
		t.Fatal(err)
	}
}
