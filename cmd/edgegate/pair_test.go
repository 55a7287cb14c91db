package main

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/edgegate/edgegate/centralsim"
	"github.com/edgegate/edgegate/config"
	"github.com/edgegate/edgegate/identity"
	centralsync "github.com/edgegate/edgegate/sync"
)

// pairFixture is a simulated central service and an empty gateway.
type pairFixture struct {
	sim      *centralsim.Server
	dir      string
	caFile   string
	cfgPath  string
	stateDir string
	env      pairEnv
}

func newPairFixture(t *testing.T, po centralsim.PairingOptions) *pairFixture {
	t.Helper()
	if po.Interval == 0 {
		po.Interval = time.Second
	}
	sim, err := centralsim.New(centralsim.Options{
		Pairing:  po,
		Gateways: map[string]string{centralsim.DefaultPairingClientID: "gw-test-01"},
		// The pairing client's tokens may fetch bundles (see PairingOptions).
		Clients: []centralsim.Client{{ID: centralsim.DefaultPairingClientID, Secret: "unused-" + t.Name(), Username: "alice"}},
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := sim.Start("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sim.Close() })
	dir := t.TempDir()
	f := &pairFixture{sim: sim, dir: dir, caFile: filepath.Join(dir, "ca.pem"),
		cfgPath: filepath.Join(dir, "etc", "edgegate.yaml"), stateDir: filepath.Join(dir, "state")}
	if err := os.WriteFile(f.caFile, sim.CACertPEM(), 0o644); err != nil {
		t.Fatal(err)
	}
	f.env = pairEnv{getenv: func(string) string { return "" }, hostname: func() (string, error) { return "gw01", nil }, now: time.Now}
	return f
}

func (f *pairFixture) args(extra ...string) []string {
	// The simulator's realm is edgegate and its pairing client is
	// registered for private_key_jwt (not the stock defaults).
	return append([]string{"--central", f.sim.URL(), "--realm", "edgegate", "--client-id", centralsim.DefaultPairingClientID,
		"--private-key-jwt", "--ca", f.caFile, "--config", f.cfgPath,
		"--state-dir", f.stateDir, "--gateway-id", "gw-test-01"}, extra...)
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

func TestPairFlow(t *testing.T) {
	f := newPairFixture(t, centralsim.PairingOptions{})
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
	id, err := identity.Load(q)
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
		// Nor a userinfo endpoint: the account is not named.
		"account the approving account",
		"private_key_jwt EdDSA, no shared secret",
		// The simulator has no limits endpoint: no AppID row, said plainly.
		"AppID row     not registered: no Ownership API at " + f.sim.URL() + "; the gateway works without its AppID row",
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
		creds.RefreshToken == "" || creds.User != "" || creds.RevocationURL != f.sim.RevocationURL() {
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
		t.Errorf("AppID rows = %+v; want none without a limits answer", rows)
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

func TestPairFailuresLeaveNothing(t *testing.T) {
	t.Run("denied", func(t *testing.T) {
		f := newPairFixture(t, centralsim.PairingOptions{})
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
	t.Run("expired", func(t *testing.T) {
		f := newPairFixture(t, centralsim.PairingOptions{DeviceCodeTTL: 2 * time.Second})
		res := f.runPair(t, context.Background(), func(string) {})
		if res.err == nil || !strings.Contains(res.err.Error(), "expired") {
			t.Errorf("err = %v", res.err)
		}
		f.assertNothingSaved(t)
	})
	t.Run("cancelled", func(t *testing.T) {
		f := newPairFixture(t, centralsim.PairingOptions{})
		ctx, cancel := context.WithCancel(context.Background())
		res := f.runPair(t, ctx, func(string) { cancel() })
		if res.err == nil || !strings.Contains(res.err.Error(), "cancelled") {
			t.Errorf("err = %v", res.err)
		}
		f.assertNothingSaved(t)
	})
	t.Run("provider down", func(t *testing.T) {
		f := newPairFixture(t, centralsim.PairingOptions{})
		f.sim.Close()
		res := f.runPair(t, context.Background(), nil)
		if res.err == nil || !strings.Contains(res.err.Error(), "cannot use the central sign-on") {
			t.Errorf("err = %v", res.err)
		}
		f.assertNothingSaved(t)
	})
	t.Run("untrusted CA", func(t *testing.T) {
		f := newPairFixture(t, centralsim.PairingOptions{})
		os.WriteFile(f.caFile, []byte("not a cert"), 0o644)
		res := f.runPair(t, context.Background(), nil)
		if res.err == nil || !strings.Contains(res.err.Error(), "--ca") {
			t.Errorf("err = %v", res.err)
		}
	})
	t.Run("store locked", func(t *testing.T) {
		f := newPairFixture(t, centralsim.PairingOptions{})
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
	f := newPairFixture(t, centralsim.PairingOptions{SlowDownPolls: 1, AssertionAlgs: []string{"RS256", "ES256"}})
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
	id, _ := identity.Load(q)
	ts, err := centralsync.NewPairedTokenSource(centralsync.PairedOptions{Store: q, Identity: id, HTTPClient: mustHTTP(t, f.caFile)})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ts.Token(context.Background()); err != nil {
		t.Fatalf("ES256 refresh: %v", err)
	}
}

func TestPairClientCredentialsFileMode(t *testing.T) {
	f := newPairFixture(t, centralsim.PairingOptions{})
	p := filepath.Join(f.dir, "cc.yaml")
	os.WriteFile(p, []byte("client_id: x\nclient_secret: s3cret\n"), 0o644)
	var out, errOut lockedBuffer
	err := pairWith(context.Background(), f.env, []string{"--central", f.sim.URL(), "--realm", "edgegate", "--ca", f.caFile,
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
