package main

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/edgegate/edgegate/internal/config"
)

// unpair, verify and device read the store settings the way config.Load
// does: relative paths are the file's folder's whether --config is
// relative or absolute, and absent keys take config.Default's values.
func TestPairedSettingsResolveLikeLoad(t *testing.T) {
	dir := t.TempDir()
	cfg := filepath.Join(dir, "edgegate.yaml")
	body := "state_dir: state\nstore:\n  key_file: keys/store.key\ncentral:\n  ca_file: ca.pem\n"
	if err := os.WriteFile(cfg, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ name, cwd, arg string }{
		{"relative", dir, "edgegate.yaml"},
		{"absolute", t.TempDir(), cfg},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Chdir(tc.cwd)
			sf, ca, err := loadPairedSettings(tc.arg)
			if err != nil {
				t.Fatalf("loadPairedSettings(%q) = %v", tc.arg, err)
			}
			want := storeFlags{stateDir: filepath.Join(dir, "state"), keyFile: filepath.Join(dir, "keys", "store.key"), credential: config.Default().Store.Credential}
			if sf != want {
				t.Errorf("settings = %+v, want %+v", sf, want)
			}
			if ca != filepath.Join(dir, "ca.pem") {
				t.Errorf("central.ca_file = %q, want %q", ca, filepath.Join(dir, "ca.pem"))
			}
		})
	}
	// An empty file: the store is where run looks by default.
	empty := filepath.Join(dir, "empty.yaml")
	if err := os.WriteFile(empty, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	sf, _, err := loadPairedSettings(empty)
	if err != nil {
		t.Fatal(err)
	}
	def := config.Default()
	if sf.stateDir != def.StateDir || sf.credential != def.Store.Credential || sf.keyFile != "" {
		t.Errorf("defaults = %+v, want state_dir %s, credential %s", sf, def.StateDir, def.Store.Credential)
	}
}
