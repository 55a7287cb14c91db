package main

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/config"
	"github.com/edgegate/edgegate/internal/sim/centralsim"
	"github.com/edgegate/edgegate/internal/testkit"
)

var (
	buildOnce sync.Once
	builtBin  string
	buildErr  error
	buildDir  string
)

// TestMain removes the edgegate binary the demo tests build.
func TestMain(m *testing.M) {
	code := m.Run()
	if buildDir != "" {
		os.RemoveAll(buildDir)
	}
	os.Exit(code)
}

// edgegateBinary builds the real edgegate command once: the demo drives
// it as a separate process, as `make demo` does.
func edgegateBinary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		buildDir, buildErr = os.MkdirTemp("", "edgegate-sim-test-")
		if buildErr != nil {
			return
		}
		builtBin = filepath.Join(buildDir, "edgegate")
		// go test runs in the package's directory.
		cmd := exec.Command("go", "build", "-o", builtBin, "../edgegate")
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = errors.New("go build ./cmd/edgegate: " + err.Error() + "\n" + string(out))
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return builtBin
}

// startSim runs a simulated platform with the device grant on pair's
// default client; companion adds the edgegate companion (bundle mode).
func startSim(t *testing.T, companion bool) (*centralsim.Server, string) {
	t.Helper()
	opts := centralsim.Options{Pairing: centralsim.PairingOptions{ClientID: pairClientID, Interval: time.Second}}
	if companion {
		opts.Companion = true
		opts.Gateways = map[string]string{pairClientID: "gw-demo-01"}
		opts.Clients = []centralsim.Client{{ID: pairClientID, Secret: "unused-" + t.Name(), Username: demoAccount}}
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
	if err := os.WriteFile(filepath.Join(dir, "ca.pem"), sim.CACertPEM(), 0o644); err != nil {
		t.Fatal(err)
	}
	return sim, dir
}

// TestDemoConfigAfterPair: the demo pairs by running the real `edgegate
// pair` (stock mode) and approving its code, then runs the daemon on that
// configuration plus its own keys; the result must be one the daemon
// loads, still in stock mode (policy.source ownership-api, no devices in
// the file).
func TestDemoConfigAfterPair(t *testing.T) {
	bin := edgegateBinary(t)
	sim, dir := startSim(t, false)
	cfgPath := filepath.Join(dir, "edgegate.yaml")
	var shown testkit.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	if err := demoPair(ctx, bin, sim, cfgPath, filepath.Join(dir, "state"), filepath.Join(dir, "ca.pem"), &lineWriter{w: &shown}); err != nil {
		t.Fatalf("demoPair: %v", err)
	}
	if !strings.Contains(shown.String(), "approves code") {
		t.Errorf("the demo did not show the approval step:\n%s", shown.String())
	}
	link := filepath.Join(dir, "ttyRADIO0")
	if err := demoTuneConfig(cfgPath, link); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load(cfgPath)
	if err != nil {
		t.Fatalf("the daemon would refuse the demo's configuration: %v", err)
	}
	o := cfg.Policy.Ownership
	switch {
	case cfg.Policy.Source != config.PolicyOwnership:
		t.Errorf("policy.source = %q, want %q", cfg.Policy.Source, config.PolicyOwnership)
	case o.Username != demoAccount || o.DefaultType != "TemperatureSensor":
		t.Errorf("policy.ownership = %+v", o)
	case o.Brokers[centralsim.DefaultBrokerName] != sim.BrokerURL():
		t.Errorf("brokers = %v, want %s at %s", o.Brokers, centralsim.DefaultBrokerName, sim.BrokerURL())
	case len(cfg.Radio.Ports) != 1 || cfg.Radio.Ports[0].Path != link || cfg.Radio.Ports[0].Codec != "mysensors":
		t.Errorf("radio.ports = %+v", cfg.Radio.Ports)
	case cfg.MQTT.Embedded.Listen != "127.0.0.1:0" || cfg.Log.Format != "json":
		t.Errorf("mqtt.embedded.listen %q, log.format %q", cfg.MQTT.Embedded.Listen, cfg.Log.Format)
	}
}

// TestDemoTuneConfigRefusesBundleMode: on a configuration that is not
// stock mode (paired with the companion) the demo says so instead of
// running something else.
func TestDemoTuneConfigRefusesBundleMode(t *testing.T) {
	bin := edgegateBinary(t)
	sim, dir := startSim(t, true)
	cfgPath := filepath.Join(dir, "edgegate.yaml")
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	var out, errOut testkit.Buffer
	done := make(chan error, 1)
	go func() {
		done <- runEdgegate(ctx, bin, []string{"pair", "--central", sim.URL(), "--ca", filepath.Join(dir, "ca.pem"),
			"--config", cfgPath, "--state-dir", filepath.Join(dir, "state"), "--gateway-id", "gw-demo-01",
			"--private-key-jwt", "--no-qr"}, &out, &errOut)
	}()
	approved := false
	for finished := false; !finished; {
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("pair: %v\n%s%s", err, out.String(), errOut.String())
			}
			finished = true
		case <-time.After(100 * time.Millisecond):
			if codes := sim.PendingUserCodes(); !approved && len(codes) > 0 {
				approved = true
				if err := sim.ApproveDevice(codes[0], demoAccount); err != nil {
					t.Fatal(err)
				}
			}
		}
	}
	err := demoTuneConfig(cfgPath, filepath.Join(dir, "tty"))
	if err == nil {
		t.Fatal("demoTuneConfig accepted a bundle-mode configuration")
	}
	t.Log(err)
}

// TestFindEdgegate: a flagged binary that is not there is an error naming
// the flag, not a demo that fails later.
func TestFindEdgegate(t *testing.T) {
	_, err := findEdgegate(filepath.Join(t.TempDir(), "nope"))
	if err == nil || !strings.Contains(err.Error(), "--edgegate") {
		t.Fatalf("findEdgegate(missing) = %v, want an error naming --edgegate", err)
	}
	bin := edgegateBinary(t)
	if got, err := findEdgegate(bin); err != nil || got != bin {
		t.Fatalf("findEdgegate(%s) = %q, %v", bin, got, err)
	}
}

var (
	centralBuildOnce sync.Once
	centralBuilt     string
	centralBuildErr  error
)

// centralBinary builds the real edgegate-central command once, next to
// the edgegate binary.
func centralBinary(t *testing.T) string {
	t.Helper()
	edgegateBinary(t) // makes buildDir
	centralBuildOnce.Do(func() {
		centralBuilt = filepath.Join(buildDir, "edgegate-central")
		cmd := exec.Command("go", "build", "-o", centralBuilt, "../edgegate-central")
		if out, err := cmd.CombinedOutput(); err != nil {
			centralBuildErr = errors.New("go build ./cmd/edgegate-central: " + err.Error() + "\n" + string(out))
		}
	})
	if centralBuildErr != nil {
		t.Fatal(centralBuildErr)
	}
	return centralBuilt
}

// TestDemoCompanionPart runs the demo's live-push part as `make demo`
// does: the real edgegate-central and edgegate binaries against the
// stock simulator; the device is delivered, then refused within seconds
// of the push that follows its deletion at the platform.
func TestDemoCompanionPart(t *testing.T) {
	bin, centralBin := edgegateBinary(t), centralBinary(t)
	secret := randomHex(16)
	sim, err := centralsim.New(centralsim.Options{
		Users:   companionUsers(),
		Clients: []centralsim.Client{companionPlatformClient(secret)},
		Pairing: centralsim.PairingOptions{ClientID: pairClientID, Interval: time.Second},
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := sim.Start("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	defer sim.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var shown testkit.Buffer
	work := t.TempDir()
	res, err := runCompanionPart(ctx, bin, centralBin, sim, secret, work, &lineWriter{w: &shown})
	if err != nil {
		t.Fatalf("companion part: %v\n%s", err, shown.String())
	}
	var summary testkit.Buffer
	if problems := companionSummary(&summary, res); len(problems) > 0 {
		t.Fatalf("not the expected outcome: %q\n%s%s", problems, shown.String(), summary.String())
	}
	for _, want := range []string{"edgegate-central push --gateway " + companionGateway, "0 devices", "next login refused"} {
		if !strings.Contains(shown.String(), want) {
			t.Errorf("the demo did not show %q:\n%s", want, shown.String())
		}
	}
	if !strings.Contains(summary.String(), "push → policy applied at the gateway") {
		t.Errorf("summary lacks the timing:\n%s", summary.String())
	}
	// The companion's log never holds its platform secret or admin token.
	log, err := os.ReadFile(filepath.Join(work, "central", "edgegate-central.log"))
	if err != nil {
		t.Fatal(err)
	}
	admin, _ := os.ReadFile(filepath.Join(work, "central", "admin-token"))
	for _, s := range []string{secret, strings.TrimSpace(string(admin))} {
		if strings.Contains(string(log)+shown.String(), s) {
			t.Errorf("a secret (%.6s…) appears in the companion's log or the demo's output", s)
		}
	}
	t.Logf("push → applied %s, push → refused %s", res.pushToApplied, res.pushToRefused)
}

// TestStartCompanionExits: a companion that refuses its configuration is
// reported at once with its log's path, not waited for.
func TestStartCompanionExits(t *testing.T) {
	centralBin := centralBinary(t)
	dir := t.TempDir()
	f := &companionFiles{dir: dir, config: filepath.Join(dir, "config.yaml"), apiURL: "https://127.0.0.1:1"}
	if err := os.WriteFile(f.config, []byte("store: mysql\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	_, _, err := startCompanion(context.Background(), centralBin, f)
	if err == nil || !strings.Contains(err.Error(), "exited at start") || !strings.Contains(err.Error(), "edgegate-central.log") {
		t.Fatalf("startCompanion with a bad configuration = %v, want an error naming its log", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("took %s to notice", d)
	}
}
