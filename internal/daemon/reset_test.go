package daemon

import (
	"os"
	"path/filepath"
	"testing"

	centralsync "github.com/edgegate/edgegate/sync"
)

// TestWipeStateKeepsPolicyFloor: a factory reset wipes the state directory
// (queue, keys, pairing) but keeps the policy's anti-rollback floor, which
// must never go down.
func TestWipeStateKeepsPolicyFloor(t *testing.T) {
	dir := t.TempDir()
	for _, p := range []string{"queue/000001.vlog", "store.key", "radio-state.json"} {
		p = filepath.Join(dir, p)
		if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	floor := filepath.Join(dir, centralsync.FloorFileName)
	if err := os.WriteFile(floor, []byte(`{"version":42}`+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := wipeState(dir); err != nil {
		t.Fatalf("wipeState = %v", err)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 1 || entries[0].Name() != centralsync.FloorFileName {
		names := []string{}
		for _, e := range entries {
			names = append(names, e.Name())
		}
		t.Fatalf("after wipeState the state dir holds %v, want only %s", names, centralsync.FloorFileName)
	}
	if b, _ := os.ReadFile(floor); string(b) != `{"version":42}`+"\n" {
		t.Fatalf("floor file = %q", b)
	}
}
