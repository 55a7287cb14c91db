package procs

import (
	"context"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/testkit"
)

// scripted is a process whose load per interval the test sets; it counts
// the changes Run makes.
type scripted struct {
	mu       sync.Mutex
	interval time.Duration
	cores    float64 // CPU per interval, in cores
	slow     uint64  // slow scheduling waits per interval
	all      uint64  // scheduling waits per interval
	now      load
	samples  atomic.Int64 // sample calls: Run's looks
	procs    atomic.Int32
	ones     atomic.Int32 // setOne calls
	defaults atomic.Int32 // setDefault calls (Run's own at its end included)
}

func (s *scripted) set(cores float64, slow, all uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.cores, s.slow, s.all = cores, slow, all
}

func (s *scripted) sample() load {
	defer s.samples.Add(1)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.now.cpu += time.Duration(s.cores * float64(s.interval))
	s.now.slow += s.slow
	s.now.all += s.all
	return s.now
}

// looks waits until Run has looked n more times at the load.
func (s *scripted) looks(t *testing.T, n int64) {
	t.Helper()
	from := s.samples.Load()
	testkit.Eventually(t, 5*time.Second, "Run's looks", func() bool { return s.samples.Load() >= from+n })
}

func (s *scripted) start(t *testing.T) (stop func()) {
	t.Helper()
	t.Setenv("GOMAXPROCS", "")
	s.procs.Store(4)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- Run(ctx, Options{Interval: s.interval, Quiet: 10 * s.interval,
			sample:     s.sample,
			current:    func() int { return int(s.procs.Load()) },
			setOne:     func() { s.ones.Add(1); s.procs.Store(1) },
			setDefault: func() { s.defaults.Add(1); s.procs.Store(4) }})
	}()
	return func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}
}

// TestQuietThenBusy: under half a core for the quiet time, one P; a busy
// interval, the default again; idle at the end, the default stays in
// force once Run returns.
func TestQuietThenBusy(t *testing.T) {
	s := &scripted{interval: time.Millisecond}
	s.set(0.6, 0, 0) // moderate: stays at the default
	stop := s.start(t)
	s.looks(t, 40) // longer than the quiet time (10 looks)
	if n := s.ones.Load(); n != 0 {
		t.Fatalf("at 0.6 cores GOMAXPROCS went to 1 (%d times)", n)
	}
	s.set(0.2, 0, 0)
	testkit.Eventually(t, 5*time.Second, "one P while quiet", func() bool { return s.procs.Load() == 1 })
	s.set(0.9, 0, 0)
	testkit.Eventually(t, 5*time.Second, "the default when busy", func() bool { return s.procs.Load() == 4 })
	s.set(0, 0, 0)
	testkit.Eventually(t, 5*time.Second, "one P again", func() bool { return s.procs.Load() == 1 })
	stop()
	if p := s.procs.Load(); p != 4 {
		t.Fatalf("after Run: GOMAXPROCS %d, want the default", p)
	}
}

// TestStarvedGoesUp: with one P, goroutines that wait a millisecond or
// more to run in one wait out of twenty bring the default back, though
// the process's CPU stays under High (other processes take the cores).
func TestStarvedGoesUp(t *testing.T) {
	s := &scripted{interval: time.Millisecond}
	s.set(0.1, 0, 0)
	stop := s.start(t)
	defer stop()
	testkit.Eventually(t, 5*time.Second, "one P while quiet", func() bool { return s.procs.Load() == 1 })
	s.set(0.5, 1, 100) // 1 % slow: not starved
	s.looks(t, 40)
	if p := s.procs.Load(); p != 1 {
		t.Fatalf("1 slow wait in 100 raised GOMAXPROCS to %d", p)
	}
	s.set(0.5, 10, 100)
	testkit.Eventually(t, 5*time.Second, "the default when starved", func() bool { return s.procs.Load() == 4 })
}

// TestEnvironmentWins: GOMAXPROCS set by the operator is left alone.
func TestEnvironmentWins(t *testing.T) {
	t.Setenv("GOMAXPROCS", "2")
	runsUntilCancelled(t, 2)
}

// TestSingleCoreRunsIdle: on a single-core board there is nothing to
// adapt, and Run still runs until cancelled.
func TestSingleCoreRunsIdle(t *testing.T) {
	t.Setenv("GOMAXPROCS", "")
	runsUntilCancelled(t, 1)
}

// runsUntilCancelled: Run changes nothing, and returns nil only once its
// context ends — a supervised component that returns on its own stops the
// daemon (supervise.Component), which once made the daemon exit at start
// whenever GOMAXPROCS was set.
func runsUntilCancelled(t *testing.T, cores int) {
	t.Helper()
	var set, looks atomic.Int32
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- Run(ctx, Options{Interval: time.Millisecond,
			sample:     func() load { looks.Add(1); return load{} },
			current:    func() int { return cores },
			setOne:     func() { set.Add(1) },
			setDefault: func() { set.Add(1) }})
	}()
	select {
	case err := <-done:
		cancel()
		t.Fatalf("Run returned %v before its context ended", err)
	case <-time.After(100 * time.Millisecond): // a hundred intervals
	}
	cancel()
	select {
	case err := <-done:
		if err != nil || set.Load() != 0 || looks.Load() != 0 {
			t.Fatalf("Run = %v with %d changes and %d looks, want nil with none", err, set.Load(), looks.Load())
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return within 5s of its context ending")
	}
}

// TestRealRuntime: in this very process, idle goes to one P and two
// goroutines spinning bring the default back.
func TestRealRuntime(t *testing.T) {
	t.Setenv("GOMAXPROCS", "")
	runtime.SetDefaultGOMAXPROCS()
	full := runtime.GOMAXPROCS(0)
	if full < 2 {
		t.Fatalf("this test needs 2 CPUs, the runtime's default here is %d", full)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Run(ctx, Options{Interval: 20 * time.Millisecond, Quiet: 200 * time.Millisecond}) }()
	defer func() {
		cancel()
		<-done
		if p := runtime.GOMAXPROCS(0); p != full {
			t.Errorf("after Run: GOMAXPROCS %d, want the default %d", p, full)
		}
	}()
	testkit.Eventually(t, 10*time.Second, "one P while the test idles", func() bool { return runtime.GOMAXPROCS(0) == 1 })
	spin, stop := make(chan struct{}), atomic.Bool{}
	var wg sync.WaitGroup
	for range 2 {
		wg.Go(func() {
			<-spin
			for !stop.Load() {
			}
		})
	}
	close(spin)
	defer func() { stop.Store(true); wg.Wait() }()
	testkit.Eventually(t, 10*time.Second, "the default while busy", func() bool { return runtime.GOMAXPROCS(0) == full })
}
