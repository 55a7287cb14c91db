package e2e

import (
	"bufio"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/sim/centralsim"
	"github.com/edgegate/edgegate/internal/testkit"
)

// TestInstallerFlow is what an installer does on a fresh gateway against a
// stock Snap4City, with the real binary: `edgegate pair` (device
// authorization grant on the platform's public IoT Edge client, approved at
// the central service as user alice; no companion, so stock mode with the
// context broker named by --broker), `edgegate device add` (device.php),
// then `edgegate run` with the configuration pair wrote — no client secret
// on the gateway — and the device's readings arrive signed at the broker.
// The companion flow (signed bundles, push) is
// TestPolicyBundleSyncPushAndRevocation's.
func TestInstallerFlow(t *testing.T) {
	sim, err := centralsim.New(centralsim.Options{
		// The realm admin enabled the device grant on Snap4City's own IoT
		// Edge client, pair's default (realm master is the simulator's).
		Pairing: centralsim.PairingOptions{Interval: time.Second, ClientID: stockClientID},
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := sim.Start("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	defer sim.Close()
	dir := t.TempDir()
	ca := filepath.Join(dir, "central-ca.pem")
	os.WriteFile(ca, sim.CACertPEM(), 0o644)
	cfg := filepath.Join(dir, "etc", "edgegate.yaml")
	state := filepath.Join(dir, "state")

	// 1. pair: the installer reads the code and approves it on a phone.
	// Snap4City's defaults (realm master, public client nodered-iotedge);
	// stock mode names the broker the gateway writes to.
	out := runPairApproved(t, func(code string) error { return sim.ApproveDevice(code, "alice") },
		"--central", sim.URL(), "--broker", centralsim.DefaultBrokerName,
		"--ca", ca, "--config", cfg, "--state-dir", state, "--gateway-id", "gw-install")
	for _, want := range []string{"enter the code", "█", "identity", "next steps", ": stock mode",
		"broker        " + centralsim.DefaultBrokerName + " at " + sim.BrokerURL()} {
		if !strings.Contains(strings.ToLower(out), strings.ToLower(want)) {
			t.Errorf("pair output lacks %q:\n%s", want, out)
		}
	}

	// 2. device add, keys written for provisioning the device.
	keys := filepath.Join(dir, "th-hall.keys")
	add := exec.Command(binary, "device", "add", "--config", cfg, "--type", "TemperatureSensor", "--keys-out", keys,
		"--attr", "temperature:float", "--attr", "n:integer", "th-hall")
	add.Env = append(os.Environ(), "CREDENTIALS_DIRECTORY=")
	if o, err := add.CombinedOutput(); err != nil {
		t.Fatalf("device add: %v\n%s", err, o)
	}
	kb, _ := os.ReadFile(keys)
	k1 := regexp.MustCompile(`k1: (\S+)`).FindSubmatch(kb)
	k2 := regexp.MustCompile(`k2: (\S+)`).FindSubmatch(kb)
	if k1 == nil || k2 == nil {
		t.Fatalf("keys file: %q", kb)
	}
	d := testDevice{ID: "th-hall", Type: "TemperatureSensor", Owner: "alice", K1: string(k1[1]), K2: string(k2[1])}

	// 3. run with the configuration pair wrote (ports made ephemeral and
	// logs machine-readable for the test).
	body, err := os.ReadFile(cfg)
	if err != nil {
		t.Fatal(err)
	}
	text := strings.NewReplacer("listen: 127.0.0.1:1883", "listen: 127.0.0.1:0",
		"listen: 127.0.0.1:9464", "listen: 127.0.0.1:0", "format: text", "format: json").Replace(string(body))
	if !regexp.MustCompile(`(?m)^\s+source: ownership-api$`).MatchString(text) {
		t.Errorf("the paired configuration is not in stock mode (policy.source ownership-api):\n%s", text)
	}
	if strings.Contains(text, "client_secret") {
		t.Errorf("the paired configuration refers to a client secret:\n%s", text)
	}
	os.WriteFile(cfg, []byte(text), 0o640)
	g := startGateway(t, cfg)
	waitLogin(t, g, d)
	p := newPublisher(t, "tcp://"+g.MQTT, d)
	for i := 1; i <= 3; i++ {
		if !p.publish(i) {
			t.Fatal("not acknowledged")
		}
	}
	testkit.Eventually(t, 20*time.Second, "th-hall's readings at the broker", func() bool { return len(delivered(sim)[d.ID]) == 3 })
	assertNoSecrets(t, g.log.String(), d)
}

// stockClientID is the public client Snap4City's IoT Edge signs in with,
// pair's default.
const stockClientID = "nodered-iotedge"

// runPairApproved runs `edgegate pair ARGS`, hands the user code it shows to
// approve (as the installer at a browser would), waits for it to succeed
// and returns what it printed.
func runPairApproved(t *testing.T, approve func(code string) error, args ...string) string {
	t.Helper()
	pair := exec.Command(binary, append([]string{"pair"}, args...)...)
	pair.Env = append(os.Environ(), "CREDENTIALS_DIRECTORY=")
	// Both are read while pair still runs. Its output goes through a pipe
	// rather than StdoutPipe, whose reader Wait would close under the
	// scanner with the last lines unread.
	var shown, errOut syncBuffer
	pr, pw := io.Pipe()
	defer pw.Close()
	pair.Stdout, pair.Stderr = io.MultiWriter(&shown, pw), &errOut
	if err := pair.Start(); err != nil {
		t.Fatal(err)
	}
	defer pair.Process.Kill()
	code := make(chan string, 1)
	go func() {
		re := regexp.MustCompile(`^\s+([B-Z]{4}-[B-Z]{4})\s*$`)
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			if m := re.FindStringSubmatch(sc.Text()); m != nil {
				select {
				case code <- m[1]:
				default:
				}
			}
		}
		_, _ = io.Copy(io.Discard, pr)
	}()
	select {
	case c := <-code:
		if err := approve(c); err != nil {
			t.Fatal(err)
		}
	case <-time.After(20 * time.Second):
		t.Fatalf("pair showed no user code:\n%s\n%s", shown.String(), errOut.String())
	}
	waitExit(t, pair, 30*time.Second, &errOut)
	return shown.String()
}

func waitExit(t *testing.T, cmd *exec.Cmd, d time.Duration, errOut *syncBuffer) {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("%s: %v\n%s", cmd.Args[1], err, errOut.String())
		}
	case <-time.After(d):
		t.Fatalf("%s did not finish", cmd.Args[1])
	}
}
