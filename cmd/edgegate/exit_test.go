package main

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/edgegate/edgegate/internal/config"
)

var (
	binaryOnce sync.Once
	binaryPath string
	binaryErr  error
)

// TestMain removes the binary edgegateBinary built.
func TestMain(m *testing.M) {
	code := m.Run()
	if binaryPath != "" {
		os.RemoveAll(filepath.Dir(binaryPath))
	}
	os.Exit(code)
}

// edgegateBinary builds the real edgegate binary once per test run.
func edgegateBinary(t *testing.T) string {
	t.Helper()
	binaryOnce.Do(func() {
		dir, err := os.MkdirTemp("", "edgegate-bin-")
		if err != nil {
			binaryErr = err
			return
		}
		binaryPath = filepath.Join(dir, "edgegate")
		out, err := exec.Command("go", "build", "-o", binaryPath, ".").CombinedOutput()
		if err != nil {
			binaryErr = errors.New("go build: " + err.Error() + "\n" + string(out))
		}
	})
	if binaryErr != nil {
		t.Fatal(binaryErr)
	}
	return binaryPath
}

// runEdgegateProcess runs the real binary and returns its exit status and
// standard error. The environment holds no systemd credentials directory.
func runEdgegateProcess(t *testing.T, args ...string) (int, string) {
	t.Helper()
	cmd := exec.Command(edgegateBinary(t), args...)
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "CREDENTIALS_DIRECTORY=") && !strings.HasPrefix(kv, "NOTIFY_SOCKET=") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return 0, stderr.String()
	case errors.As(err, &ee):
		return ee.ExitCode(), stderr.String()
	}
	t.Fatalf("run edgegate: %v", err)
	return 0, ""
}

// TestExitNotPaired: `edgegate run` on a gateway that is not paired or
// configured exits 78 (EX_CONFIG, which the unit does not restart) and
// says how to pair; a wrong value stays exit 2. (After `unpair`:
// TestPairStockOrdinaryUser.)
func TestExitNotPaired(t *testing.T) {
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o640); err != nil {
			t.Fatal(err)
		}
		return p
	}
	// The packaged configuration, before pairing.
	tpl := strings.Replace(config.Template, "state_dir: /var/lib/edgegate", "state_dir: "+state, 1)
	tpl = strings.Replace(tpl, "socket: /run/edgegate/admin.sock", "socket: "+filepath.Join(dir, "admin.sock"), 1)
	tests := []struct {
		name   string
		config string
		code   int
		want   string
	}{
		{"no config file", filepath.Join(dir, "absent.yaml"), 78, "no configuration at"},
		{"no central section", write("bare.yaml", "state_dir: "+state+"\n"), 78, "central.token_url must be set"},
		{"packaged config, not paired", write("template.yaml", tpl), 78, "central.credentials paired: this gateway is not paired"},
		{"secret file absent", write("secret.yaml", "state_dir: "+state+"\nmetrics:\n  listen: \"\"\ncentral:\n  token_url: https://sso.example.org/token\n  client_id: gw\n  client_secret_file: "+filepath.Join(dir, "client-secret")+"\n"),
			78, "central.client_secret_file: stat"},
		{"bad value", write("bad.yaml", "state_dir: "+state+"\nmqtt:\n  mode: cloud\n"), 2, `mqtt.mode must be embedded or external: "cloud"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, stderr := runEdgegateProcess(t, "run", "--config", tt.config)
			if code != tt.code || !strings.Contains(stderr, tt.want) {
				t.Fatalf("exit %d, stderr:\n%s\nwant exit %d and %q", code, stderr, tt.code, tt.want)
			}
			if tt.code == 78 && !strings.Contains(stderr, "pair it with edgegate pair --central URL") {
				t.Errorf("stderr does not say how to pair:\n%s", stderr)
			}
		})
	}
}
