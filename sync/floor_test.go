package centralsync

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/edgegate/edgegate/policy"
)

// TestFloorSurvivesQuarantine: the anti-rollback floor is kept outside the
// store too, so a store quarantined or wiped (a new, empty store) still
// refuses the old bundle; the bundle at the floor (the one in force
// before) is accepted again so the gateway is not left without a policy,
// and the floor file only ever goes up.
func TestFloorSurvivesQuarantine(t *testing.T) {
	e := newPolEnv(t)
	now := time.Now()
	floorFile := filepath.Join(t.TempDir(), FloorFileName)
	withFile := func(o *Options) { o.FloorFile = floorFile }
	s := e.syncer(withFile)
	if err := s.LoadCached(); err != nil {
		t.Fatal(err)
	}
	if err := s.Offer(context.Background(), e.ops.sign(t, polDoc(5, now)), "offer"); err != nil {
		t.Fatal(err)
	}
	if got := readFloor(t, floorFile); got != 5 {
		t.Fatalf("floor file = %d, want 5", got)
	}

	// The store is moved aside: a fresh, empty one in another directory.
	if err := e.store.Close(); err != nil {
		t.Fatal(err)
	}
	e.dir = t.TempDir()
	e.openStore()
	e.engine = policy.NewEngine(polConfigPolicy(t))
	s2 := e.syncer(withFile)
	if err := s2.LoadCached(); err != nil {
		t.Fatal(err)
	}
	var re *RefusalError
	if err := e.note(s2.Offer(context.Background(), e.ops.sign(t, polDoc(4, now)), "offer")); !errors.As(err, &re) || re.Reason != ReasonRollback {
		t.Fatalf("old bundle after quarantine = %v, want rollback", err)
	}
	if e.engine.Current().Version != 0 {
		t.Fatalf("version in force = %d after a refused rollback", e.engine.Current().Version)
	}
	if got := s2.Status().Floor; got != 5 {
		t.Fatalf("status floor = %d, want 5", got)
	}
	// The bundle that was in force comes back: accepted, not a rollback.
	if err := s2.Offer(context.Background(), e.ops.sign(t, polDoc(5, now)), "offer"); err != nil {
		t.Fatalf("bundle at the floor with no policy in force = %v", err)
	}
	if e.engine.Current().Version != 5 {
		t.Fatalf("version in force = %d, want 5", e.engine.Current().Version)
	}
	if err := s2.Offer(context.Background(), e.ops.sign(t, polDoc(6, now)), "offer"); err != nil {
		t.Fatal(err)
	}
	if got := readFloor(t, floorFile); got != 6 {
		t.Fatalf("floor file = %d, want 6", got)
	}

	// A store from before the file existed: its floor is copied out.
	if err := os.Remove(floorFile); err != nil {
		t.Fatal(err)
	}
	e.restart()
	s3 := e.syncer(withFile)
	if err := s3.LoadCached(); err != nil {
		t.Fatal(err)
	}
	if got := readFloor(t, floorFile); got != 6 {
		t.Fatalf("floor file after migration = %d, want 6", got)
	}

	// A damaged floor file blocks offers with an error naming it, never
	// a floor of 0.
	if err := os.WriteFile(floorFile, []byte("{\"version\":"), 0o600); err != nil {
		t.Fatal(err)
	}
	e.restart()
	s4 := e.syncer(withFile)
	err := s4.LoadCached()
	if err == nil || !strings.Contains(err.Error(), floorFile) {
		t.Fatalf("LoadCached with a damaged floor file = %v, want an error naming it", err)
	}
	if err := e.note(s4.Offer(context.Background(), e.ops.sign(t, polDoc(3, now)), "offer")); err == nil {
		t.Fatal("offer with a damaged floor file accepted")
	}
}

func readFloor(t *testing.T, path string) uint64 {
	t.Helper()
	v, err := readFloorFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return v
}
