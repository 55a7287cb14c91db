package e2e

import (
	"bytes"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/sim/centralsim"
)

// TestOperatorAndDataRights drives the admin socket with the real CLI:
// `edgegate status` as a person reads it, `data export` round-trips what
// was queued, the canary value of the readings is in no raw byte of the
// state directory (encryption at rest), `data erase` crypto-shreds it, and
// a user outside the edgegate group is refused by the socket.
func TestOperatorAndDataRights(t *testing.T) {
	a, b := dev("dr-1", "alice"), dev("dr-2", "alice")
	sim := startSim(t, a, b)
	// Broker down: the readings stay queued, where export and erase see them.
	sim.SetFault(centralsim.Fault{Mode: centralsim.FaultDown})
	dir := t.TempDir()
	g := startGateway(t, writeGatewayConfig(t, dir, sim, gatewayConfig{}, a, b))
	sock := filepath.Join(dir, "state", "admin.sock")
	const canary = "CANARYpersonal7f3a"
	pa, pb := newPublisher(t, "tcp://"+g.MQTT, a), newPublisher(t, "tcp://"+g.MQTT, b)
	for i := 1; i <= 5; i++ {
		for _, p := range []*publisher{pa, pb} {
			tok := p.client.Publish("devices/"+p.device+"/telemetry", 1, false,
				`{"n": `+itoa(i)+`, "note": "`+canary+`"}`)
			if !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
				t.Fatal("not acknowledged")
			}
		}
	}

	out := run(t, 0, "status", "--socket", sock)
	for _, want := range []string{"gw-e2e", "Queue  10 readings", "dr-1", "dr-2", "alice"} {
		if !strings.Contains(out, want) {
			t.Errorf("status lacks %q:\n%s", want, out)
		}
	}
	var st struct {
		GatewayID string `json:"gateway_id"`
		Queue     struct {
			Depth int `json:"depth"`
		} `json:"queue"`
		Devices []struct {
			ID       string `json:"id"`
			Ingested int    `json:"ingested"`
		} `json:"devices"`
	}
	if err := json.Unmarshal([]byte(run(t, 0, "status", "--json", "--socket", sock)), &st); err != nil {
		t.Fatal(err)
	}
	if st.GatewayID != "gw-e2e" || st.Queue.Depth != 10 || len(st.Devices) != 2 || st.Devices[0].Ingested != 5 {
		t.Errorf("status --json = %+v", st)
	}

	// Export round-trips: every queued reading of dr-1, with its value.
	export := run(t, 0, "data", "export", "--device", a.ID, "--socket", sock)
	if n := strings.Count(strings.TrimSpace(export), "\n") + 1; n != 5 || strings.Count(export, canary) != 5 {
		t.Fatalf("export of dr-1: %d records, %d canaries; want 5 and 5:\n%s", n, strings.Count(export, canary), export)
	}
	if strings.Contains(export, a.K1) || strings.Contains(export, a.K2) {
		t.Fatal("the export carries the device keys")
	}

	// Encryption at rest: the canary is in no raw byte of the state dir.
	assertAbsent(t, filepath.Join(dir, "state"), canary)

	// Erase dr-1: confirmed with --yes; its data is gone, dr-2's is kept.
	erase := run(t, 0, "data", "erase", "--device", a.ID, "--yes", "--socket", sock)
	if !strings.Contains(erase, "5") || !strings.Contains(strings.ToLower(erase), "key") {
		t.Errorf("erase report:\n%s", erase)
	}
	if again := run(t, 0, "data", "export", "--device", a.ID, "--socket", sock); strings.Contains(again, canary) {
		t.Fatalf("dr-1's data still exported after the erase:\n%s", again)
	}
	if kept := run(t, 0, "data", "export", "--device", b.ID, "--socket", sock); strings.Count(kept, canary) != 5 {
		t.Fatalf("erasing dr-1 touched dr-2's data:\n%s", kept)
	}

	// A user outside the edgegate group (nobody) is refused by the socket.
	if os.Geteuid() == 0 {
		os.Chmod(filepath.Join(dir, "state"), 0o755)
		os.Chmod(dir, 0o755)
		os.Chmod(filepath.Dir(dir), 0o755)
		os.Chmod(sock, 0o666) // only the peer check stands in the way
		cmd := exec.Command(binary, "status", "--socket", sock)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
		o, err := cmd.CombinedOutput()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || !strings.Contains(string(o), "is not root, not the daemon's user and not in group edgegate") {
			t.Fatalf("status as nobody: %v %s; want a refusal", err, o)
		}
	}

	// Metrics tell the same story.
	if v := scrape(t, g.Metrics, `edgegate_readings_ingested_total{source="mqtt"}`); v != "10" {
		t.Errorf("ingested{mqtt} = %q, want 10", v)
	}
	if err := g.term(); err != nil {
		t.Fatalf("SIGTERM exit = %v", err)
	}
	assertAbsent(t, filepath.Join(dir, "state"), canary)
	assertNoSecrets(t, g.log.String(), a, b)
}

func itoa(i int) string { return strconv.Itoa(i) }

// run runs the CLI and checks its exit status.
func run(t *testing.T, code int, args ...string) string {
	t.Helper()
	cmd := exec.Command(binary, args...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	got := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		got = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	if got != code {
		t.Fatalf("edgegate %s: exit %d, want %d\n%s%s", strings.Join(args, " "), got, code, out.String(), errOut.String())
	}
	return out.String()
}

// assertAbsent fails if s, or its base64 or hex form, is in any file under
// dir.
func assertAbsent(t *testing.T, dir, s string) {
	t.Helper()
	forms := [][]byte{[]byte(s), []byte(base64.StdEncoding.EncodeToString([]byte(s))),
		[]byte(base64.RawURLEncoding.EncodeToString([]byte(s))), []byte(hex.EncodeToString([]byte(s)))}
	files := 0
	filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() || d.Type()&os.ModeSocket != 0 {
			return nil
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return nil
		}
		files++
		for _, f := range forms {
			if bytes.Contains(b, f) {
				t.Errorf("%q found in the raw bytes of %s", f, p)
			}
		}
		return nil
	})
	if files == 0 {
		t.Fatalf("no files under %s", dir)
	}
}

// TestFactoryReset: `edgegate factory-reset --yes` stops the daemon and
// wipes its state (queue, keys, identity, caches); it starts again as new,
// with another identity.
func TestFactoryReset(t *testing.T) {
	a := dev("fr-1", "alice")
	sim := startSim(t, a)
	dir := t.TempDir()
	cfg := writeGatewayConfig(t, dir, sim, gatewayConfig{}, a)
	g := startGateway(t, cfg)
	resp, err := http.Get("http://" + g.Metrics + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("/healthz = %d, want 200", resp.StatusCode)
	}
	sock := filepath.Join(dir, "state", "admin.sock")
	var before struct {
		ID string `json:"identity_thumbprint"`
	}
	json.Unmarshal([]byte(run(t, 0, "status", "--json", "--socket", sock)), &before)
	p := newPublisher(t, "tcp://"+g.MQTT, a)
	if !p.publish(1) {
		t.Fatal("not acknowledged")
	}
	run(t, 0, "factory-reset", "--yes", "--socket", sock)
	select {
	case <-g.done:
	case <-time.After(30 * time.Second):
		t.Fatal("the daemon did not stop after a factory reset")
	}
	entries, _ := os.ReadDir(filepath.Join(dir, "state"))
	for _, e := range entries {
		if e.Name() != "audit.log" && e.Name() != "admin.sock" && e.Name() != "policy-floor.json" { // the floor is kept: it never goes down
			t.Errorf("left in the state directory after a factory reset: %s", e.Name())
		}
	}
	g2 := startGateway(t, cfg)
	var after struct {
		ID string `json:"identity_thumbprint"`
	}
	json.Unmarshal([]byte(run(t, 0, "status", "--json", "--socket", sock)), &after)
	if before.ID == "" || after.ID == before.ID {
		t.Errorf("identity before %q, after %q: want a new one", before.ID, after.ID)
	}
	g2.term()
}
