package e2e

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/zitadel/oidc/v3/example/server/storage"
	"github.com/zitadel/oidc/v3/pkg/oidc"
	"github.com/zitadel/oidc/v3/pkg/op"
	"gopkg.in/yaml.v3"

	"github.com/edgegate/edgegate/internal/sim/centralsim"
	"github.com/edgegate/edgegate/internal/testkit"
)

// The stock flow of docs/snap4city.md, end to end, with the real binary:
// a new user with a stock Snap4City account and nothing installed on the
// platform pairs the gateway (device grant at a third-party OpenID
// provider, zitadel's `op`, as the platform's SSO), registers a device
// through device.php, binds a device another user delegated READ_WRITE to
// the account, runs the daemon with its embedded broker and then with a
// real Mosquitto, and every reading arrives at the simulated stock Orion
// behind the stock filter, verifiable from what Orion stores. A foreign
// device never gets a reading out, nothing is dead-lettered, and a device
// registered while the daemon runs starts flowing at once.

// The gateway account: the third-party provider's user id2 ("test-user2"
// in zitadel's example storage); the OP puts preferred_username into its
// JWT access tokens, as Keycloak does, so that the filter, the Ownership
// API and device.php name the same user.
const (
	stockUserID = "id2"
	stockUser   = "test-user2"
)

// stockClient is the example's device client made public, allowed to
// refresh, and issuing JWT access tokens (Keycloak's only kind).
type stockClient struct{ *storage.Client }

func (stockClient) AuthMethod() oidc.AuthMethod         { return oidc.AuthMethodNone }
func (stockClient) ApplicationType() op.ApplicationType { return op.ApplicationTypeNative }
func (stockClient) AccessTokenType() op.AccessTokenType { return op.AccessTokenTypeJWT }
func (stockClient) IsScopeAllowed(scope string) bool    { return scope == oidc.ScopeOfflineAccess }
func (stockClient) RestrictAdditionalAccessTokenScopes() func([]string) []string {
	return func(s []string) []string { return s }
}
func (stockClient) GrantTypes() []oidc.GrantType {
	return []oidc.GrantType{oidc.GrantTypeDeviceCode, oidc.GrantTypeRefreshToken}
}

type stockStorage struct {
	*storage.Storage
	client op.Client
}

func (s *stockStorage) GetClientByClientID(ctx context.Context, id string) (op.Client, error) {
	if id == s.client.GetID() {
		return s.client, nil
	}
	return s.Storage.GetClientByClientID(ctx, id)
}

// CreateAccessAndRefreshTokens fills a gap of the example storage: it
// takes the client of a refresh token only from code-flow and refresh
// requests, so device-grant refresh tokens would belong to no client.
func (s *stockStorage) CreateAccessAndRefreshTokens(ctx context.Context, req op.TokenRequest, cur string) (string, string, time.Time, error) {
	if d, ok := req.(*op.DeviceAuthorizationState); ok {
		req = &storage.AuthRequest{ApplicationID: d.ClientID, UserID: d.Subject, Scopes: d.Scopes}
	}
	return s.Storage.CreateAccessAndRefreshTokens(ctx, req, cur)
}

// GetPrivateClaimsFromScopes puts the user's name into the access token,
// as Keycloak's realm mappers do (preferred_username).
func (s *stockStorage) GetPrivateClaimsFromScopes(ctx context.Context, userID, clientID string, scopes []string) (map[string]any, error) {
	if userID == stockUserID {
		return map[string]any{"preferred_username": stockUser}, nil
	}
	return map[string]any{}, nil
}

type thirdPartyOP struct {
	srv     *httptest.Server
	st      *stockStorage
	certPEM []byte
	client  *http.Client
}

func startThirdPartyOP(t *testing.T) *thirdPartyOP {
	t.Helper()
	var provider http.Handler
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { provider.ServeHTTP(w, r) }))
	srv.StartTLS()
	t.Cleanup(srv.Close)
	clients := map[string]*storage.Client{stockClientID: storage.DeviceClient(stockClientID, "")}
	st := &stockStorage{Storage: storage.NewStorageWithClients(storage.NewUserStore(srv.URL), clients),
		client: stockClient{clients[stockClientID]}}
	var key [32]byte
	if _, err := rand.Read(key[:]); err != nil {
		t.Fatal(err)
	}
	p, err := op.NewProvider(&op.Config{
		CryptoKey: key, GrantTypeRefreshToken: true,
		DeviceAuthorization: op.DeviceAuthorizationConfig{Lifetime: 5 * time.Minute, PollInterval: time.Second,
			UserFormPath: "/device", UserCode: op.UserCodeBase20},
	}, st, op.StaticIssuer(srv.URL))
	if err != nil {
		t.Fatal(err)
	}
	provider = p
	pool := x509.NewCertPool()
	pool.AddCert(srv.Certificate())
	return &thirdPartyOP{srv: srv, st: st,
		certPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw}),
		client: &http.Client{Timeout: 10 * time.Second,
			Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}}}}
}

// runCLI runs the edgegate binary with args; it fails the test on a
// non-zero exit and returns the combined output.
func runCLI(t *testing.T, args ...string) string {
	t.Helper()
	cmd := exec.Command(binary, args...)
	cmd.Env = append(os.Environ(), "CREDENTIALS_DIRECTORY=")
	done := make(chan struct{})
	var out []byte
	var err error
	go func() { out, err = cmd.CombinedOutput(); close(done) }()
	select {
	case <-done:
	case <-time.After(60 * time.Second):
		_ = cmd.Process.Kill()
		<-done
		t.Fatalf("edgegate %s did not finish", args[0])
	}
	if err != nil {
		t.Fatalf("edgegate %s: %v\n%s", strings.Join(args[:2], " "), err, out)
	}
	return string(out)
}

// editConfig rewrites the YAML configuration pair wrote: set(path, value)
// for each dotted key in kv.
func editConfig(t *testing.T, path string, kv map[string]any) {
	t.Helper()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var doc map[string]any
	if err := yaml.Unmarshal(raw, &doc); err != nil {
		t.Fatal(err)
	}
	for k, v := range kv {
		m := doc
		parts := strings.Split(k, ".")
		for _, p := range parts[:len(parts)-1] {
			next, ok := m[p].(map[string]any)
			if !ok {
				next = map[string]any{}
				m[p] = next
			}
			m = next
		}
		m[parts[len(parts)-1]] = v
	}
	out, err := yaml.Marshal(doc)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, out, 0o640); err != nil {
		t.Fatal(err)
	}
}

// readKeys reads a --keys-out file ("k1: ...", "k2: ...").
func readKeys(t *testing.T, path string) (string, string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	k1 := regexp.MustCompile(`(?m)^k1: (\S+)`).FindSubmatch(b)
	k2 := regexp.MustCompile(`(?m)^k2: (\S+)`).FindSubmatch(b)
	if k1 == nil || k2 == nil {
		t.Fatalf("keys file %s holds no k1/k2", path)
	}
	return string(k1[1]), string(k2[1])
}

func deadLettered(t *testing.T, g *gateway) string {
	t.Helper()
	return scrape(t, g.Metrics, "edgegate_readings_dead_lettered_total")
}

func TestStockSnap4City(t *testing.T) {
	idp := startThirdPartyOP(t)
	bob := testDevice{ID: "bob-valve", Type: "Valve", Owner: "bob", K1: "k1-canary-bob-valve-0001", K2: "k2-canary-bob-valve-0001"}
	carol := testDevice{ID: "carol-meter", Type: "Meter", Owner: "carol", K1: "k1-canary-carol-meter-01", K2: "k2-canary-carol-meter-01"}
	sim, err := centralsim.New(centralsim.Options{
		// The platform trusts the third-party provider: the filter checks
		// its tokens' signatures, the Ownership API and device.php ask its
		// userinfo endpoint for the user.
		TrustIssuers:       []centralsim.TrustedIssuer{{Issuer: idp.srv.URL, JWKSURL: idp.srv.URL + "/keys", HTTPClient: idp.client}},
		PlatformHTTPClient: idp.client,
		Devices: []centralsim.Device{
			{ID: bob.ID, Type: bob.Type, Owner: bob.Owner, K1: bob.K1, K2: bob.K2, Attrs: []string{"n", "temperature"}},
			{ID: carol.ID, Type: carol.Type, Owner: carol.Owner, K1: carol.K1, K2: carol.K2, Attrs: []string{"n", "temperature"}},
		},
		// bob lets the gateway's account write his valve's data (the stock
		// filter then accepts its PATCHes); carol delegates nothing.
		Delegations: []centralsim.Delegation{{Device: bob.ID, User: stockUser, Kind: centralsim.KindReadWrite}},
		TokenTTL:    time.Minute,
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := sim.Start("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sim.Close() })

	dir := t.TempDir()
	ca := filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(ca, append(sim.CACertPEM(), idp.certPEM...), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := filepath.Join(dir, "etc", "edgegate.yaml")
	state := filepath.Join(dir, "state")

	// 1. pair: device grant at the provider, approved as the user would.
	out := runPairApproved(t, func(code string) error {
		return idp.st.CompleteDeviceAuthorization(context.Background(), code, stockUserID)
	}, "--central", sim.URL(), "--issuer", idp.srv.URL, "--ca", ca,
		"--config", cfg, "--state-dir", state, "--gateway-id", "gw-stock", "--broker", "orion-1")
	for _, want := range []string{stockUser, "AppID limit 0", "stock mode"} {
		if !strings.Contains(out, want) {
			t.Errorf("pair output lacks %q:\n%s", want, out)
		}
	}
	written, _ := os.ReadFile(cfg)
	for _, want := range []string{"source: ownership-api", "username: " + stockUser, sim.BrokerURL()} {
		if !strings.Contains(string(written), want) {
			t.Errorf("paired configuration lacks %q:\n%s", want, written)
		}
	}

	// 2. register a device through device.php; bind bob's delegated valve
	// with the keys bob handed over.
	thKeys := filepath.Join(dir, "th-1.keys")
	addOut := runCLI(t, "device", "add", "--config", cfg, "--type", "TemperatureSensor", "--keys-out", thKeys,
		"--attr", "temperature:float", "--attr", "n:integer", "--mqtt", "th-1")
	if strings.Contains(addOut, "refused its ownership row") {
		t.Fatalf("device add: the ownership row was refused:\n%s", addOut)
	}
	k1, k2 := readKeys(t, thKeys)
	th1 := testDevice{ID: "th-1", Type: "TemperatureSensor", Owner: stockUser, K1: k1, K2: k2}
	bobKeys := filepath.Join(dir, "bob.keys")
	os.WriteFile(bobKeys, []byte("k1: "+bob.K1+"\nk2: "+bob.K2+"\n"), 0o600)
	runCLI(t, "device", "bind", "--config", cfg, "--type", bob.Type, "--mqtt", "--k1-file", bobKeys, bob.ID)

	// 3. run, embedded broker. Ports ephemeral, logs machine-readable, the
	// admin socket beside the state.
	sock := filepath.Join(dir, "admin.sock")
	editConfig(t, cfg, map[string]any{
		"mqtt.embedded.listen": "127.0.0.1:0", "mqtt.embedded.tls_listen": "",
		"metrics.listen": "127.0.0.1:0", "log.format": "json", "log.level": "debug", "admin.socket": sock,
		"uplink.min_backoff": "50ms", "uplink.max_backoff": "500ms",
	})
	g := startGateway(t, cfg)
	waitLogin(t, g, th1)
	waitLogin(t, g, bob)
	for _, d := range []testDevice{th1, bob} {
		p := newPublisher(t, "tcp://"+g.MQTT, d)
		for i := 1; i <= 3; i++ {
			if !p.publish(i) {
				t.Fatalf("%s reading %d not acknowledged", d.ID, i)
			}
		}
	}
	testkit.Eventually(t, 30*time.Second, "owned and delegated readings at Orion", func() bool {
		got := delivered(sim)
		return len(got[th1.ID]) == 3 && len(got[bob.ID]) == 3
	})
	// The foreign device is not in the account's policy: refused at login,
	// nothing of it leaves.
	if c, err := connect("tcp://"+g.MQTT, "probe-carol", carol.ID, devicePassword(t, carol)); err == nil {
		c.Disconnect(10)
		t.Error("carol's device logged in to the gateway")
	}

	// 4. a device registered while the daemon runs (through its admin
	// socket) starts flowing at once: the directory creates its entity
	// and ownership row, the daemon syncs its policy.
	th2Keys := filepath.Join(dir, "th-2.keys")
	runCLI(t, "device", "add", "--config", cfg, "--socket", sock, "--type", "TemperatureSensor",
		"--keys-out", th2Keys, "--attr", "temperature:float", "--attr", "n:integer", "--mqtt", "th-2")
	k1, k2 = readKeys(t, th2Keys)
	th2 := testDevice{ID: "th-2", Type: "TemperatureSensor", Owner: stockUser, K1: k1, K2: k2}
	waitLogin(t, g, th2)
	p2 := newPublisher(t, "tcp://"+g.MQTT, th2)
	if !p2.publish(1) {
		t.Fatal("th-2's reading not acknowledged")
	}
	testkit.Eventually(t, 30*time.Second, "th-2's reading at Orion (well within the filter's cache window)", func() bool {
		return len(delivered(sim)[th2.ID]) == 1
	})
	if dl := deadLettered(t, g); dl != "" {
		t.Errorf("readings were dead-lettered: %s", dl)
	}
	assertNoSecrets(t, g.log.String(), th1, th2, bob, carol)
	if err := g.term(); err != nil {
		t.Fatalf("SIGTERM: %v", err)
	}

	// 5. the same gateway with a real Mosquitto as the local broker.
	mq := startMosquitto(t)
	editConfig(t, cfg, map[string]any{
		"mqtt.mode": "external", "mqtt.external.url": mq.URL, "mqtt.external.ca_file": mq.CAFile,
		"mqtt.external.client_id": "edgegate-stock",
	})
	g = startGateway(t, cfg)
	testkit.Eventually(t, 15*time.Second, "the daemon to subscribe to Mosquitto", func() bool {
		return strings.Contains(g.log.String(), "subscribed to the local broker")
	})
	pm := newPublisher(t, mq.URL, th1, mq.tlsOpt)
	for i := 4; i <= 6; i++ {
		if !pm.publish(i) {
			t.Fatalf("th-1 reading %d not acknowledged by Mosquitto", i)
		}
	}
	// A foreign reading published to Mosquitto is refused by the policy:
	// it never leaves the gateway.
	pc := newPublisher(t, mq.URL, carol, mq.tlsOpt)
	pc.publish(1)
	testkit.Eventually(t, 30*time.Second, "th-1's readings through Mosquitto", func() bool { return len(delivered(sim)[th1.ID]) == 6 })
	if dl := deadLettered(t, g); dl != "" {
		t.Errorf("readings were dead-lettered: %s", dl)
	}
	if err := g.term(); err != nil {
		t.Fatalf("SIGTERM: %v", err)
	}
	for _, u := range sim.Updates() {
		if u.Device == carol.ID {
			t.Errorf("carol's reading reached Orion: %+v", u)
		}
	}
	for _, r := range sim.Refusals() {
		t.Errorf("the broker refused a request: %+v", r)
	}

	// 6. provenance from what Orion stores: read back through the filter
	// with the paired account's token, each attribute verified with only
	// the device's keys.
	devs := filepath.Join(dir, "verify-devices.yaml")
	var b strings.Builder
	b.WriteString("devices:\n")
	for _, d := range []testDevice{th1, bob} {
		fmt.Fprintf(&b, "  - id: %s\n    type: %s\n    owner: %s\n    k1: %s\n    k2: %s\n    broker: %s\n", d.ID, d.Type, d.Owner, d.K1, d.K2, sim.BrokerURL())
	}
	os.WriteFile(devs, []byte(b.String()), 0o600)
	for _, d := range []testDevice{th1, bob} {
		vout := runCLI(t, "verify", "--config", cfg, "--broker", sim.BrokerURL(), "--ca", ca, "--device", d.ID, "--type", d.Type, "--devices", devs)
		if !regexp.MustCompile(`(?m)^temperature +verified `).MatchString(vout) || !strings.Contains(vout, "2 verified,") ||
			!strings.Contains(vout, " 0 tampered, 0 wrong key, 0 malformed") {
			t.Errorf("verify %s from the broker:\n%s", d.ID, vout)
		}
	}
}
