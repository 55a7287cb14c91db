package packaging

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"os"
	"path/filepath"
	"testing"
)

// TestReproducibleBuild builds the amd64 binary twice into two directories,
// exactly as `make cross` does, and requires identical bytes.
//
// By default the second build shares the build cache, so it re-links cached
// objects: that checks the link (build id, paths, version stamp) but not a
// non-deterministic compile step. With EDGEGATE_REPRO_COLD=1 (`make
// repro-check`) the second build starts from an empty cache and recompiles
// everything, which takes 30-90 s on two cores: too slow for every run.
func TestReproducibleBuild(t *testing.T) {
	if testing.Short() {
		t.Skip("skipped under -short: builds the daemon twice")
	}
	const version = "v9.9.9-test"
	a := filepath.Join(t.TempDir(), "one", "edgegate")
	b := filepath.Join(t.TempDir(), "two", "edgegate")
	build(t, "amd64", a, "VERSION="+version)
	if os.Getenv("EDGEGATE_REPRO_COLD") == "1" {
		build(t, "amd64", b, "VERSION="+version, "GOCACHE="+t.TempDir())
	} else {
		build(t, "amd64", b, "VERSION="+version)
	}

	ha, hb := sha256File(t, a), sha256File(t, b)
	if ha != hb {
		t.Fatalf("two builds of the same commit differ:\n  %s %s\n  %s %s", ha, a, hb, b)
	}
	// The version really is stamped (else "same bytes" would be cheap).
	data, err := os.ReadFile(a)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(data, []byte(version)) {
		t.Errorf("binary does not contain the stamped version %q", version)
	}
	if bytes.Contains(data, []byte(repoRoot(t))) {
		t.Errorf("binary contains the build directory %s: -trimpath missing", repoRoot(t))
	}
}

func sha256File(t *testing.T, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}
