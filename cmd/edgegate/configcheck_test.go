package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/edgegate/edgegate/admin"
)

// config check of an ownership-api gateway lists, from the running daemon,
// the platform's devices it cannot serve and the command that fixes each;
// status shows them as problems.
func TestConfigCheckListsUnservedPlatformDevices(t *testing.T) {
	be, sock := adminFixture(t)
	fix := "edgegate device bind th-untyped --type TYPE [--mqtt | --radio-port PORT --radio-node N]"
	be.mu.Lock()
	be.st.Policy.Unusable = []admin.UnusableDevice{{ID: "th-untyped", Missing: []string{"entity type"}, Fix: fix}}
	be.mu.Unlock()
	dir := t.TempDir()
	cfg := filepath.Join(dir, "edgegate.yaml")
	body := "state_dir: " + dir + "\ncentral:\n  token_url: https://127.0.0.1:1/token\n  client_id: gw\n  client_secret_file: secret\n" +
		"admin:\n  socket: " + sock + "\n" +
		"policy:\n  source: ownership-api\n  ownership:\n    url: https://own.example\n    username: gw-account\n    brokers:\n      orion-1: https://broker.example/orion-filter/orion-1\n"
	if err := os.WriteFile(cfg, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	var out, errb bytes.Buffer
	if err := runConfig([]string{"check", "--config", cfg}, &out, &errb); err != nil {
		t.Fatalf("config check = %v (%s)", err, errb.String())
	}
	for _, want := range []string{": valid (", "platform devices: 1 device not served:", "!! th-untyped: missing entity type", "fix: " + fix} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("config check output lacks %q:\n%s", want, out.String())
		}
	}
	out.Reset()
	if err := runStatus(cliCtx(t), []string{"--socket", sock}, &out, &errb); err != nil {
		t.Fatalf("status = %v", err)
	}
	for _, want := range []string{"!! device th-untyped not served: missing entity type", "fix: " + fix} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("status output lacks %q:\n%s", want, out.String())
		}
	}
	// Without a daemon the file is still checked, and the output says the
	// devices were not.
	out.Reset()
	if err := runConfig([]string{"check", "--config", cfg, "--socket", filepath.Join(dir, "none.sock")}, &out, &errb); err != nil {
		t.Fatalf("config check without a daemon = %v", err)
	}
	if !strings.Contains(out.String(), "platform devices: not checked, the daemon is not reachable") {
		t.Errorf("config check without a daemon:\n%s", out.String())
	}
}
