package main

import (
	"context"
	"encoding/json"
	"errors"
	"github.com/edgegate/edgegate/internal/testkit"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/config"
	"github.com/edgegate/edgegate/internal/keys"
	"github.com/edgegate/edgegate/internal/sim/centralsim"
	"github.com/edgegate/edgegate/policy"
	centralsync "github.com/edgegate/edgegate/sync"
)

// pairFixture is a simulated central service and an empty gateway.
type pairFixture struct {
	sim       *centralsim.Server
	companion bool
	dir       string
	caFile    string
	cfgPath   string
	stateDir  string
	env       pairEnv
}

// pairMode says which central service the fixture simulates.
type pairMode int

const (
	// stockPlatform is a stock Snap4City: Keycloak's realm master, the
	// public client nodered-iotedge, no edgegate companion (pair writes
	// policy.source ownership-api and needs --broker).
	stockPlatform pairMode = iota
	// withCompanion adds the edgegate companion extension
	// (centralsim.Options.Companion): policy-signing keys, signed bundles,
	// private_key_jwt with the gateway's key; pair writes policy.source
	// bundle.
	withCompanion
)

// lockedBuffer collects a command's output while it still writes.
type lockedBuffer = testkit.Buffer

func newPairFixture(t *testing.T, mode pairMode, po centralsim.PairingOptions) *pairFixture {
	t.Helper()
	if po.Interval == 0 {
		po.Interval = time.Second
	}
	// The realm admin enabled the device grant on Snap4City's own IoT Edge
	// client, pair's default (stock realm master, the simulator's default).
	po.ClientID = defaultClientID
	opts := centralsim.Options{Pairing: po}
	if mode == withCompanion {
		opts.Companion = true
		// The companion's gateway account: the pairing client's tokens
		// fetch gw-test-01's bundle, which holds alice's devices (see
		// PairingOptions.ClientID).
		opts.Gateways = map[string]string{defaultClientID: "gw-test-01"}
		opts.Clients = []centralsim.Client{{ID: defaultClientID, Secret: "unused-" + t.Name(), Username: "alice"}}
	}
	sim, err := centralsim.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	if err := sim.Start("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sim.Close() })
	dir := t.TempDir()
	f := &pairFixture{sim: sim, companion: mode == withCompanion, dir: dir, caFile: filepath.Join(dir, "ca.pem"),
		cfgPath: filepath.Join(dir, "etc", "edgegate.yaml"), stateDir: filepath.Join(dir, "state")}
	if err := os.WriteFile(f.caFile, sim.CACertPEM(), 0o644); err != nil {
		t.Fatal(err)
	}
	f.env = pairEnv{getenv: func(string) string { return "" }, hostname: func() (string, error) { return "gw01", nil }, now: time.Now}
	return f
}

// args are pair's flags with the defaults of a stock platform (realm
// master, client nodered-iotedge); with the companion the gateway signs
// its client assertions with its own key (the companion's pairing
// extension), without one stock mode names the broker it writes to.
func (f *pairFixture) args(extra ...string) []string {
	a := []string{"--central", f.sim.URL(), "--ca", f.caFile, "--config", f.cfgPath,
		"--state-dir", f.stateDir, "--gateway-id", "gw-test-01"}
	if f.companion {
		a = append(a, "--private-key-jwt")
	} else {
		a = append(a, "--broker", centralsim.DefaultBrokerName)
	}
	return append(a, extra...)
}

type pairResult struct {
	out, errOut string
	err         error
}

// runPairAsync runs pair; decide, when set, acts on the user code once it
// is shown (as the user at the browser would).
func (f *pairFixture) runPair(t *testing.T, ctx context.Context, decide func(code string), extra ...string) pairResult {
	t.Helper()
	var out, errOut lockedBuffer
	done := make(chan error, 1)
	go func() { done <- pairWith(ctx, f.env, f.args(extra...), &out, &errOut) }()
	if decide != nil {
		code := waitUserCode(t, &out, done)
		if code != "" {
			decide(code)
		}
	}
	select {
	case err := <-done:
		return pairResult{out.String(), errOut.String(), err}
	case <-time.After(60 * time.Second):
		t.Fatalf("pair did not finish; output:\n%s", out.String())
	}
	return pairResult{}
}

var userCodeRE = regexp.MustCompile(`(?m)^    ([B-Z]{4}-[B-Z]{4})$`)

func waitUserCode(t *testing.T, out *lockedBuffer, done chan error) string {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		if m := userCodeRE.FindStringSubmatch(out.String()); m != nil {
			return m[1]
		}
		select {
		case err := <-done:
			done <- err
			return ""
		case <-time.After(20 * time.Millisecond):
		}
	}
	t.Fatalf("no user code shown; output:\n%s", out.String())
	return ""
}

func (f *pairFixture) loadCreds(t *testing.T) (*centralsync.Credentials, error) {
	t.Helper()
	q, err := openStore(f.env, storeFlags{stateDir: f.stateDir, credential: "store-key"})
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	return centralsync.LoadCredentials(q)
}

func (f *pairFixture) assertNothingSaved(t *testing.T) {
	t.Helper()
	if _, err := os.Stat(f.cfgPath); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("config written after a failed pairing: %v", err)
	}
	if _, err := os.Stat(filepath.Join(filepath.Dir(f.cfgPath), "policy-keys.json")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("keys written after a failed pairing: %v", err)
	}
	if _, err := f.loadCreds(t); !errors.Is(err, centralsync.ErrNotPaired) {
		t.Errorf("pairing record after a failed pairing: %v", err)
	}
}

// TestPairFlow pairs with the companion extension: signed policy bundles
// instead of the Ownership API, on top of the stock sign-on and APIs.
func TestPairFlow(t *testing.T) {
	f := newPairFixture(t, withCompanion, centralsim.PairingOptions{})
	ctx := context.Background()
	res := f.runPair(t, ctx, func(code string) {
		if err := f.sim.ApproveDevice(code, "alice"); err != nil {
			t.Error(err)
		}
	})
	if res.err != nil {
		t.Fatalf("pair: %v\n%s", res.err, res.out)
	}
	out := res.out
	t.Logf("output:\n%s", out)

	// What the person at the terminal sees.
	creds, err := f.loadCreds(t)
	if err != nil {
		t.Fatal(err)
	}
	q, _ := openStore(f.env, storeFlags{stateDir: f.stateDir, credential: "store-key"})
	id, err := keys.LoadIdentity(q)
	q.Close()
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"To approve this gateway, open\n\n    " + f.sim.VerificationURL() + "\n",
		"and enter the code\n\n    ",
		"or scan this with a phone (it opens " + f.sim.VerificationURL() + "?user_code=",
		"identity      " + id.Thumbprint(),
		"Gateway gw-test-01, identity " + id.Thumbprint(),
		// Keycloak's userinfo names the approving account.
		"gateway       gw-test-01, account alice\n",
		"private_key_jwt EdDSA, no shared secret",
		// Stock limits: an ordinary user (Manager) may own no AppID
		// (Ownership-API v1/limits, the docker generator's limits table);
		// said plainly, not an error.
		"AppID row     not registered: the account may not register apps (AppID limit 0, 0 used); the gateway works without its AppID row",
		"companion     " + f.sim.URL() + ": signed policy bundles",
		"Next steps:\n  1. edgegate device add --config " + f.cfgPath,
		"  2. systemctl restart edgegate",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q", want)
		}
	}
	if n := strings.Count(out, "█"); n < 100 {
		t.Errorf("output has %d full blocks; want a QR code", n)
	}
	if strings.Contains(out, creds.RefreshToken) || strings.Contains(res.errOut, creds.RefreshToken) {
		t.Error("the refresh token was printed")
	}

	// What was saved.
	if creds.Grant != centralsync.GrantRefreshToken || creds.AuthMethod != centralsync.AuthPrivateKeyJWT || creds.Alg != "EdDSA" ||
		creds.RefreshToken == "" || creds.User != "alice" || creds.RevocationURL != f.sim.RevocationURL() {
		t.Errorf("credentials = %+v / %s %s %s", creds, creds.Grant, creds.AuthMethod, creds.Alg)
	}
	st, err := os.Stat(f.cfgPath)
	if err != nil || st.Mode().Perm() != 0o640 {
		t.Fatalf("config: %v mode %v", err, st)
	}
	cfg, _ := os.ReadFile(f.cfgPath)
	for _, want := range []string{"source: bundle", "credentials: paired", "token_url: " + f.sim.TokenURL(),
		"keys_file: " + filepath.Join(filepath.Dir(f.cfgPath), "policy-keys.json")} {
		if !strings.Contains(string(cfg), want) {
			t.Errorf("config lacks %q:\n%s", want, cfg)
		}
	}
	if strings.Contains(string(cfg), creds.RefreshToken) {
		t.Error("config holds the refresh token")
	}
	if _, err := config.Load(f.cfgPath); err != nil {
		t.Errorf("the written config does not load: %v", err)
	}
	if rows := f.sim.AppRows("alice"); len(rows) != 0 {
		t.Errorf("AppID rows = %+v; want none with an AppID limit of 0", rows)
	}

	// The daemon's token source: refresh with private_key_jwt, rotation persisted.
	q, _ = openStore(f.env, storeFlags{stateDir: f.stateDir, credential: "store-key"})
	ts, err := centralsync.NewPairedTokenSource(centralsync.PairedOptions{Store: q, Identity: id, HTTPClient: mustHTTP(t, f.caFile)})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ts.Token(ctx); err != nil {
		t.Fatalf("paired token: %v", err)
	}
	after, _ := centralsync.LoadCredentials(q)
	q.Close()
	if after.RefreshToken == creds.RefreshToken {
		t.Error("rotated refresh token not persisted")
	}

	// Again: says so, changes nothing.
	before, _ := os.ReadFile(f.cfgPath)
	res = f.runPair(t, ctx, nil)
	if res.err != nil || !strings.Contains(res.out, "already paired") {
		t.Errorf("second pair: %v\n%s", res.err, res.out)
	}
	if now, _ := os.ReadFile(f.cfgPath); string(now) != string(before) {
		t.Error("second pair changed the config")
	}

	// Devices.
	var out2, errOut lockedBuffer
	err = deviceWith(ctx, f.env, []string{"add", "--config", f.cfgPath, "--type", "Thermometer", "--radio-port", "/dev/ttyUSB0",
		"--radio-node", "12", "--attr", "temperature:float", "--keys-out", filepath.Join(f.dir, "th-1.keys"), "th-1"}, &out2, &errOut)
	if err != nil {
		t.Fatalf("device add: %v\n%s", err, errOut.String())
	}
	if !strings.Contains(out2.String(), "Registered device th-1") || !strings.Contains(out2.String(), "radio port /dev/ttyUSB0, node 12, child any") {
		t.Errorf("device add output:\n%s", out2.String())
	}
	rows := f.sim.OwnershipRows("alice")
	if len(rows) != 1 || rows[0].ElementID != f.sim.ElementID("th-1") {
		t.Fatalf("ownership rows = %+v", rows)
	}
	var det centralsim.ElementDetails
	if err := jsonUnmarshalMaybeString(rows[0].ElementDetails, &det); err != nil {
		t.Fatal(err)
	}
	uuidRE := regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`)
	if !uuidRE.MatchString(det.K1) || !uuidRE.MatchString(det.K2) || det.K1 == det.K2 {
		t.Errorf("k1/k2 = %q %q: want two different random UUIDs", det.K1, det.K2)
	}
	if strings.Contains(out2.String(), det.K1) || strings.Contains(out2.String(), det.K2) {
		t.Error("device add printed a key")
	}
	if st, err := os.Stat(filepath.Join(f.dir, "th-1.keys")); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("keys-out: %v %v", err, st)
	}
	doc, err := f.sim.Bundle("gw-test-01")
	if err != nil {
		t.Fatal(err)
	}
	if len(doc.Devices) != 1 || doc.Devices[0].Radio == nil || doc.Devices[0].Radio.Node != 12 {
		t.Errorf("bundle devices = %+v", doc.Devices)
	}
	// A refusal that comes back as HTTP 200 "ko" is an error.
	err = deviceWith(ctx, f.env, []string{"add", "--config", f.cfgPath, "--type", "Thermometer", "th-1"}, &out2, &errOut)
	var de *centralsync.DirectoryError
	t.Logf("duplicate add: %v", err)
	if !errors.As(err, &de) || !strings.Contains(err.Error(), "already") {
		t.Errorf("duplicate add: %v", err)
	}
	out2 = lockedBuffer{}
	if err := deviceWith(ctx, f.env, []string{"list", "--config", f.cfgPath}, &out2, &errOut); err != nil || !strings.Contains(out2.String(), "th-1") {
		t.Errorf("device list: %v\n%s", err, out2.String())
	}
	if err := deviceWith(ctx, f.env, []string{"remove", "--config", f.cfgPath, "th-1"}, &out2, &errOut); err != nil {
		t.Errorf("device remove: %v", err)
	}

	// Unpair: revoked at the provider, wiped locally.
	if f.sim.PairedGrants() == 0 {
		t.Fatal("no live grant before unpair")
	}
	out2 = lockedBuffer{}
	if err := unpairWith(ctx, f.env, []string{"--config", f.cfgPath}, &out2, &errOut); err != nil {
		t.Fatalf("unpair: %v", err)
	}
	if !strings.Contains(out2.String(), "tokens       revoked") {
		t.Errorf("unpair output:\n%s", out2.String())
	}
	if n := f.sim.PairedGrants(); n != 0 {
		t.Errorf("%d grants live after unpair", n)
	}
	if _, err := f.loadCreds(t); !errors.Is(err, centralsync.ErrNotPaired) {
		t.Errorf("after unpair: %v", err)
	}
}

// TestPairStockPlatform pairs with a stock Snap4City (the simulator
// without the companion): pair writes stock mode, and the daemon's policy
// sync, built from the written configuration, serves a device registered
// through device.php.
func TestPairStockPlatform(t *testing.T) {
	f := newPairFixture(t, stockPlatform, centralsim.PairingOptions{})
	ctx := context.Background()
	const orion2 = "https://broker.example.org/orion-filter/orion-2"
	res := f.runPair(t, ctx, func(code string) {
		if err := f.sim.ApproveDevice(code, "alice"); err != nil {
			t.Error(err)
		}
	}, "--broker", "orion-2="+orion2)
	if res.err != nil {
		t.Fatalf("pair: %v\n%s", res.err, res.out)
	}
	t.Logf("output:\n%s", res.out)
	for _, want := range []string{
		"To approve this gateway, open\n\n    " + f.sim.VerificationURL() + "\n",
		"gateway       gw-test-01, account alice\n",
		// nodered-iotedge is a public client: no secret, no assertion.
		"(client nodered-iotedge, public client, no shared secret)",
		"AppID row     not registered: the account may not register apps (AppID limit 0, 0 used); the gateway works without its AppID row",
		"companion     none at " + f.sim.URL() + ": stock mode",
		"policy        the Ownership API and delegations at " + f.sim.URL() + ", as alice",
		"broker        orion-1 at " + f.sim.BrokerURL() + "\n",
		"broker        orion-2 at " + orion2 + "\n",
		"Next steps:\n  1. edgegate device add --config " + f.cfgPath,
	} {
		if !strings.Contains(res.out, want) {
			t.Errorf("output lacks %q", want)
		}
	}
	creds, err := f.loadCreds(t)
	if err != nil {
		t.Fatal(err)
	}
	if creds.Grant != centralsync.GrantRefreshToken || creds.AuthMethod != centralsync.AuthNone || creds.ClientID != defaultClientID ||
		creds.RefreshToken == "" || creds.User != "alice" || creds.RevocationURL != f.sim.RevocationURL() {
		t.Errorf("credentials = %+v / %s %s", creds, creds.Grant, creds.AuthMethod)
	}
	if strings.Contains(res.out, creds.RefreshToken) || strings.Contains(res.errOut, creds.RefreshToken) {
		t.Error("the refresh token was printed")
	}
	if rows := f.sim.AppRows("alice"); len(rows) != 0 {
		t.Errorf("AppID rows = %+v; want none with an AppID limit of 0", rows)
	}
	if _, err := os.Stat(filepath.Join(filepath.Dir(f.cfgPath), "policy-keys.json")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("keys pinned in stock mode: %v", err)
	}

	// The configuration, as the daemon loads it.
	raw, _ := os.ReadFile(f.cfgPath)
	if strings.Contains(string(raw), creds.RefreshToken) {
		t.Error("config holds the refresh token")
	}
	cfg, err := config.Load(f.cfgPath)
	if err != nil {
		t.Fatalf("the written config does not load: %v\n%s", err, raw)
	}
	ow := cfg.Policy.Ownership
	if cfg.Policy.Source != config.PolicyOwnership || ow.URL != f.sim.URL() || ow.DataManagerURL != f.sim.URL()+"/datamanager/api" ||
		ow.Username != "alice" || len(ow.Brokers) != 2 || ow.Brokers["orion-1"] != f.sim.BrokerURL() || ow.Brokers["orion-2"] != orion2 {
		t.Errorf("policy = %+v\n%s", cfg.Policy, raw)
	}
	if c := cfg.Central; c.Issuer != f.sim.Issuer() || c.TokenURL != f.sim.TokenURL() || c.ClientID != defaultClientID ||
		c.Credentials != config.CredentialsPaired {
		t.Errorf("central = %+v", c)
	}

	// A device registered as stock clients do (device.php, nodered=yes).
	var out, errOut lockedBuffer
	if err := deviceWith(ctx, f.env, []string{"add", "--config", f.cfgPath, "--type", "Thermometer", "--radio-port", "/dev/ttyUSB0",
		"--radio-node", "12", "--attr", "temperature:float", "th-1"}, &out, &errOut); err != nil {
		t.Fatalf("device add: %v\n%s", err, errOut.String())
	}
	if rows := f.sim.OwnershipRows("alice"); len(rows) != 1 || rows[0].ElementID != f.sim.ElementID("th-1") {
		t.Fatalf("ownership rows = %+v", rows)
	}

	// The daemon's policy sync with the written ownership settings and the
	// paired token: the Ownership API and datamanager at the URLs the
	// config names give it th-1, at the broker the config maps orion-1 to.
	q, err := openStore(f.env, storeFlags{stateDir: f.stateDir, credential: "store-key"})
	if err != nil {
		t.Fatal(err)
	}
	id, err := keys.LoadIdentity(q)
	if err != nil {
		t.Fatal(err)
	}
	hc := mustHTTP(t, f.caFile)
	ts, err := centralsync.NewPairedTokenSource(centralsync.PairedOptions{Store: q, Identity: id, HTTPClient: hc})
	if err != nil {
		t.Fatal(err)
	}
	empty, err := policy.Compile(policy.Document{Format: policy.DocumentFormat}, "none", "")
	if err != nil {
		t.Fatal(err)
	}
	engine := policy.NewEngine(empty)
	syncer, err := centralsync.New(centralsync.Options{
		Gateway: cfg.Gateway.ID, Source: centralsync.SourceOwnership, Engine: engine, Store: q, Tokens: ts, HTTPClient: hc,
		Ownership: centralsync.OwnershipOptions{OwnershipURL: ow.URL, DataManagerURL: ow.DataManagerURL, Username: ow.Username,
			Brokers: ow.Brokers, DefaultType: ow.DefaultType, MaxAge: ow.MaxAge, Registry: centralsync.NewRegistry(q)},
	})
	if err != nil {
		t.Fatal(err)
	}
	sctx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- syncer.Run(sctx) }()
	var dev *policy.Device
	for deadline := time.Now().Add(20 * time.Second); dev == nil && time.Now().Before(deadline); {
		if d, ok := engine.Current().Device("th-1"); ok {
			dev = d
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	stop()
	<-done
	q.Close()
	if dev == nil {
		t.Fatalf("th-1 never in force; sync status %+v", syncer.Status())
	}
	if dev.Owner != "alice" || dev.Type != "Thermometer" || dev.Broker != f.sim.BrokerURL() || dev.Radio == nil || dev.Radio.Node != 12 {
		t.Errorf("th-1 in force: %+v radio %+v", dev, dev.Radio)
	}

	// Unpair: revoked at the provider, wiped locally.
	if f.sim.PairedGrants() == 0 {
		t.Fatal("no live grant before unpair")
	}
	out = lockedBuffer{}
	if err := unpairWith(ctx, f.env, []string{"--config", f.cfgPath}, &out, &errOut); err != nil {
		t.Fatalf("unpair: %v", err)
	}
	if !strings.Contains(out.String(), "tokens       revoked") {
		t.Errorf("unpair output:\n%s", out.String())
	}
	if n := f.sim.PairedGrants(); n != 0 {
		t.Errorf("%d grants live after unpair", n)
	}
}

func TestPairFailuresLeaveNothing(t *testing.T) {
	for _, m := range []struct {
		name string
		mode pairMode
	}{{"stock", stockPlatform}, {"companion", withCompanion}} {
		t.Run(m.name+"/denied", func(t *testing.T) {
			f := newPairFixture(t, m.mode, centralsim.PairingOptions{})
			res := f.runPair(t, context.Background(), func(code string) { f.sim.DenyDevice(code) })
			if res.err == nil || !strings.Contains(res.err.Error(), "denied") || !strings.Contains(res.err.Error(), "nothing was saved") {
				t.Errorf("err = %v", res.err)
			}
			f.assertNothingSaved(t)
			// A later run is not tripped up.
			res = f.runPair(t, context.Background(), func(code string) { f.sim.ApproveDevice(code, "alice") })
			if res.err != nil {
				t.Errorf("pair after a denial: %v", res.err)
			}
		})
		t.Run(m.name+"/expired", func(t *testing.T) {
			f := newPairFixture(t, m.mode, centralsim.PairingOptions{DeviceCodeTTL: 2 * time.Second})
			res := f.runPair(t, context.Background(), func(string) {})
			if res.err == nil || !strings.Contains(res.err.Error(), "expired") {
				t.Errorf("err = %v", res.err)
			}
			f.assertNothingSaved(t)
		})
		t.Run(m.name+"/cancelled", func(t *testing.T) {
			f := newPairFixture(t, m.mode, centralsim.PairingOptions{})
			ctx, cancel := context.WithCancel(context.Background())
			res := f.runPair(t, ctx, func(string) { cancel() })
			if res.err == nil || !strings.Contains(res.err.Error(), "cancelled") {
				t.Errorf("err = %v", res.err)
			}
			f.assertNothingSaved(t)
		})
		t.Run(m.name+"/not writable after approval", func(t *testing.T) {
			// The tokens are issued, then the last step fails: the grant is
			// revoked at the provider and no state is left.
			f := newPairFixture(t, m.mode, centralsim.PairingOptions{})
			etc := filepath.Dir(f.cfgPath)
			if err := os.WriteFile(etc, []byte("x"), 0o644); err != nil { // a file where the directory should be
				t.Fatal(err)
			}
			res := f.runPair(t, context.Background(), func(code string) { f.sim.ApproveDevice(code, "alice") })
			if res.err == nil || !strings.Contains(res.err.Error(), "nothing was saved") ||
				!strings.Contains(res.err.Error(), "undone: revoke the refresh token") {
				t.Errorf("err = %v", res.err)
			}
			if n := f.sim.PairedGrants(); n != 0 {
				t.Errorf("%d grants live after a failed pairing", n)
			}
			if _, err := os.Stat(f.stateDir); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("state left after a failed pairing: %v", err)
			}
			if b, err := os.ReadFile(etc); err != nil || string(b) != "x" {
				t.Errorf("%s changed: %v", etc, err)
			}
		})
	}
	t.Run("provider down", func(t *testing.T) {
		f := newPairFixture(t, stockPlatform, centralsim.PairingOptions{})
		f.sim.Close()
		res := f.runPair(t, context.Background(), nil)
		if res.err == nil || !strings.Contains(res.err.Error(), "cannot use the central sign-on") {
			t.Errorf("err = %v", res.err)
		}
		f.assertNothingSaved(t)
	})
	t.Run("untrusted CA", func(t *testing.T) {
		f := newPairFixture(t, stockPlatform, centralsim.PairingOptions{})
		os.WriteFile(f.caFile, []byte("not a cert"), 0o644)
		res := f.runPair(t, context.Background(), nil)
		if res.err == nil || !strings.Contains(res.err.Error(), "--ca") {
			t.Errorf("err = %v", res.err)
		}
	})
	t.Run("store locked", func(t *testing.T) {
		f := newPairFixture(t, stockPlatform, centralsim.PairingOptions{})
		q, err := openStore(f.env, storeFlags{stateDir: f.stateDir, credential: "store-key"})
		if err != nil {
			t.Fatal(err)
		}
		defer q.Close()
		res := f.runPair(t, context.Background(), nil)
		if res.err == nil || !strings.Contains(res.err.Error(), "stop the daemon first: systemctl stop edgegate") {
			t.Errorf("err = %v", res.err)
		}
	})
}

func TestPairSlowDownAndES256(t *testing.T) {
	if testing.Short() {
		t.Skip("slow_down adds 5 s")
	}
	f := newPairFixture(t, withCompanion, centralsim.PairingOptions{SlowDownPolls: 1, AssertionAlgs: []string{"RS256", "ES256"}})
	start := time.Now()
	res := f.runPair(t, context.Background(), func(code string) { f.sim.ApproveDevice(code, "alice") })
	if res.err != nil {
		t.Fatalf("pair: %v\n%s", res.err, res.out)
	}
	// oauth2 adds 5 s to the interval on slow_down (RFC 8628 §3.5).
	if d := time.Since(start); d < 6*time.Second {
		t.Errorf("paired after %v: slow_down was not honoured", d)
	}
	creds, err := f.loadCreds(t)
	if err != nil || creds.Alg != "ES256" || len(creds.ES256Key) == 0 {
		t.Fatalf("creds %v: %v", creds, err)
	}
	q, _ := openStore(f.env, storeFlags{stateDir: f.stateDir, credential: "store-key"})
	defer q.Close()
	id, _ := keys.LoadIdentity(q)
	ts, err := centralsync.NewPairedTokenSource(centralsync.PairedOptions{Store: q, Identity: id, HTTPClient: mustHTTP(t, f.caFile)})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ts.Token(context.Background()); err != nil {
		t.Fatalf("ES256 refresh: %v", err)
	}
}

func TestPairClientCredentialsFileMode(t *testing.T) {
	f := newPairFixture(t, stockPlatform, centralsim.PairingOptions{})
	p := filepath.Join(f.dir, "cc.yaml")
	os.WriteFile(p, []byte("client_id: x\nclient_secret: s3cret\n"), 0o644)
	var out, errOut lockedBuffer
	err := pairWith(context.Background(), f.env, []string{"--central", f.sim.URL(), "--ca", f.caFile,
		"--config", f.cfgPath, "--state-dir", f.stateDir, "--client-credentials", p}, &out, &errOut)
	res := pairResult{out.String(), errOut.String(), err}
	if res.err == nil || !strings.Contains(res.err.Error(), "chmod 600") {
		t.Errorf("err = %v", res.err)
	}
}

func mustHTTP(t *testing.T, ca string) *http.Client {
	t.Helper()
	hc, err := centralHTTP(ca)
	if err != nil {
		t.Fatal(err)
	}
	return hc
}

// jsonUnmarshalMaybeString reads an object that may come JSON-encoded in a
// string (the Ownership API serves both).
func jsonUnmarshalMaybeString(raw json.RawMessage, v any) error {
	var s string
	if json.Unmarshal(raw, &s) == nil {
		raw = json.RawMessage(s)
	}
	return json.Unmarshal(raw, v)
}
