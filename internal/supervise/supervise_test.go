package supervise

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/testkit"
)

// journal records what the components did, in order.
type journal struct {
	mu     sync.Mutex
	events []string
}

func (j *journal) add(e string) {
	j.mu.Lock()
	defer j.mu.Unlock()
	j.events = append(j.events, e)
}

func (j *journal) get() []string {
	j.mu.Lock()
	defer j.mu.Unlock()
	return slices.Clone(j.events)
}

// part is a well-behaved component: it records its start, declares itself
// ready, serves until cancelled and records its stop.
func part(j *journal, name string) Component {
	ready := make(chan struct{})
	return Component{Name: name, Ready: ready, Run: func(ctx context.Context) error {
		j.add("start " + name)
		close(ready)
		<-ctx.Done()
		j.add("stop " + name)
		return nil
	}}
}

// noLeak fails t if goroutines started during the test outlive it.
func noLeak(t *testing.T) {
	t.Helper()
	before := runtime.NumGoroutine()
	t.Cleanup(func() {
		if !testkit.Poll(2*time.Second, func() bool { return runtime.NumGoroutine() <= before }) {
			buf := make([]byte, 1<<16)
			t.Errorf("goroutines: %d before, %d after\n%s", before, runtime.NumGoroutine(), buf[:runtime.Stack(buf, true)])
		}
	})
}

func newLog() (*slog.Logger, *testkit.Buffer) {
	var buf testkit.Buffer
	return slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug})), &buf
}

func TestOrderedStartAndReverseStop(t *testing.T) {
	noLeak(t)
	j := &journal{}
	log, _ := newLog()
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	c := part(j, "c")
	go func() { errc <- Supervise(ctx, log, part(j, "a"), part(j, "b"), c) }()
	testkit.Eventually(t, 2*time.Second, "c ready", func() bool {
		select {
		case <-c.Ready:
			return true
		default:
			return false
		}
	})
	cancel()
	if err := <-errc; err != nil {
		t.Fatalf("Supervise after ctx end = %v, want nil", err)
	}
	want := []string{"start a", "start b", "start c", "stop c", "stop b", "stop a"}
	if got := j.get(); !slices.Equal(got, want) {
		t.Fatalf("events = %q, want %q", got, want)
	}
}

// A component starts only once the previous one declared itself ready.
func TestNextWaitsForReady(t *testing.T) {
	noLeak(t)
	j := &journal{}
	log, _ := newLog()
	ctx, cancel := context.WithCancel(context.Background())
	release := make(chan struct{})
	slowReady := make(chan struct{})
	slow := Component{Name: "slow", Ready: slowReady, Run: func(ctx context.Context) error {
		j.add("start slow")
		<-release
		j.add("ready slow")
		close(slowReady)
		<-ctx.Done()
		return nil
	}}
	last := part(j, "last")
	errc := make(chan error, 1)
	go func() { errc <- Supervise(ctx, log, slow, last) }()
	testkit.Eventually(t, 2*time.Second, "slow started", func() bool { return len(j.get()) == 1 })
	time.Sleep(50 * time.Millisecond)
	if got := j.get(); len(got) != 1 {
		t.Fatalf("events before ready = %q, want only the slow start", got)
	}
	close(release)
	<-last.Ready
	cancel()
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	want := []string{"start slow", "ready slow", "start last", "stop last"}
	if got := j.get(); !slices.Equal(got, want) {
		t.Fatalf("events = %q, want %q", got, want)
	}
}

var errBind = errors.New("bind 127.0.0.1:9100: address already in use")

// A start failure at each stage: the later components never start, the
// earlier ones stop in reverse, and the error names the failed component.
func TestStartFailureAtEachStage(t *testing.T) {
	names := []string{"metrics", "queue", "ingest", "admin"}
	for k := range names {
		t.Run(names[k], func(t *testing.T) {
			noLeak(t)
			j := &journal{}
			log, logs := newLog()
			cs := make([]Component, len(names))
			for i, n := range names {
				cs[i] = part(j, n)
			}
			cs[k] = Component{Name: names[k], Ready: make(chan struct{}), Run: func(context.Context) error {
				j.add("start " + names[k])
				return errBind
			}}
			err := Supervise(context.Background(), log, cs...)
			if !errors.Is(err, errBind) || !strings.HasPrefix(err.Error(), names[k]+": ") {
				t.Fatalf("err = %v, want %q wrapped and named", err, errBind)
			}
			var want []string
			for i := 0; i <= k; i++ {
				want = append(want, "start "+names[i])
			}
			for i := k - 1; i >= 0; i-- {
				want = append(want, "stop "+names[i])
			}
			if got := j.get(); !slices.Equal(got, want) {
				t.Fatalf("events = %q, want %q", got, want)
			}
			if !strings.Contains(logs.String(), "component="+names[k]) {
				t.Fatalf("log does not name the failed component:\n%s", logs)
			}
		})
	}
}

// A component that returns nil while the others run is a failure too: a
// gateway whose radio reader silently ended must not keep running deaf.
func TestEarlyExitStopsTheRest(t *testing.T) {
	noLeak(t)
	j := &journal{}
	log, _ := newLog()
	exit := make(chan struct{})
	radioReady := make(chan struct{})
	radio := Component{Name: "radio", Ready: radioReady, Run: func(ctx context.Context) error {
		j.add("start radio")
		close(radioReady)
		<-exit
		j.add("exit radio")
		return nil
	}}
	admin := part(j, "admin")
	errc := make(chan error, 1)
	go func() { errc <- Supervise(context.Background(), log, part(j, "queue"), radio, admin) }()
	<-admin.Ready
	close(exit)
	var err error
	select {
	case err = <-errc:
	case <-time.After(5 * time.Second):
		t.Fatal("Supervise did not return after a component exited")
	}
	if err == nil || err.Error() != "radio: stopped on its own while the others ran" {
		t.Fatalf("err = %v, want the early exit named", err)
	}
	want := []string{"start queue", "start radio", "start admin", "exit radio", "stop admin", "stop queue"}
	if got := j.get(); !slices.Equal(got, want) {
		t.Fatalf("events = %q, want %q", got, want)
	}
}

// A component that ignores cancellation holds the stop for at most the
// bound; it is reported, and the ones before it are still stopped.
func TestStopIsBounded(t *testing.T) {
	noLeak(t)
	j := &journal{}
	log, logs := newLog()
	release := make(chan struct{})
	defer close(release) // lets the stuck goroutine end before noLeak checks
	stuckReady := make(chan struct{})
	stuck := Component{Name: "stuck", Ready: stuckReady, Run: func(ctx context.Context) error {
		close(stuckReady)
		<-release
		return nil
	}}
	ctx, cancel := context.WithCancel(context.Background())
	last := part(j, "last")
	errc := make(chan error, 1)
	go func() { errc <- New(log, 100*time.Millisecond).Run(ctx, part(j, "first"), stuck, last) }()
	<-last.Ready
	t0 := time.Now()
	cancel()
	var err error
	select {
	case err = <-errc:
	case <-time.After(5 * time.Second):
		t.Fatal("stop was not bounded")
	}
	if d := time.Since(t0); d < 100*time.Millisecond || d > 2*time.Second {
		t.Fatalf("stop took %s, want about the 100ms bound", d)
	}
	if err == nil || err.Error() != "stuck: did not stop within 100ms" {
		t.Fatalf("err = %v, want the overrun named", err)
	}
	want := []string{"start first", "start last", "stop last", "stop first"}
	if got := j.get(); !slices.Equal(got, want) {
		t.Fatalf("events = %q, want %q", got, want)
	}
	if !strings.Contains(logs.String(), "did not stop in time") {
		t.Fatalf("overrun not logged:\n%s", logs)
	}
}

// Errors returned on stop are joined to the result; ctx.Err() on stop is
// a clean stop.
func TestStopErrorsJoined(t *testing.T) {
	noLeak(t)
	errFlush := errors.New("flush: disk full")
	flusher := Component{Name: "queue", Run: func(ctx context.Context) error {
		<-ctx.Done()
		return errFlush
	}}
	polite := Component{Name: "uplink", Run: func(ctx context.Context) error {
		<-ctx.Done()
		return ctx.Err()
	}}
	log, _ := newLog()
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	err := Supervise(ctx, log, polite, flusher)
	if !errors.Is(err, errFlush) || err.Error() != "queue: stop: flush: disk full" {
		t.Fatalf("err = %v, want only the queue's stop error", err)
	}
}

// A panic stops the others in order and is returned as the failure.
func TestPanicIsAFailure(t *testing.T) {
	noLeak(t)
	j := &journal{}
	log, logs := newLog()
	boom := Component{Name: "boom", Run: func(context.Context) error { panic("nil map") }}
	err := Supervise(context.Background(), log, part(j, "a"), boom)
	if err == nil || err.Error() != "boom: panic: nil map" {
		t.Fatalf("err = %v", err)
	}
	if got, want := j.get(), []string{"start a", "stop a"}; !slices.Equal(got, want) {
		t.Fatalf("events = %q, want %q", got, want)
	}
	if !strings.Contains(logs.String(), "component panicked") {
		t.Fatalf("panic not logged:\n%s", logs)
	}
}

// Absent components (nil Run) are skipped; an ended ctx starts nothing.
func TestAbsentAndCancelledBeforeStart(t *testing.T) {
	noLeak(t)
	j := &journal{}
	log, _ := newLog()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := Supervise(ctx, log, part(j, "a"), Component{Name: "radio"}); err != nil {
		t.Fatal(err)
	}
	if got := j.get(); len(got) != 0 {
		t.Fatalf("events = %q, want none", got)
	}

	ctx, cancel = context.WithTimeout(context.Background(), 30*time.Millisecond)
	defer cancel()
	if err := Supervise(ctx, log, Component{Name: "radio"}, part(j, "b")); err != nil {
		t.Fatal(err)
	}
	if got, want := j.get(), []string{"start b", "stop b"}; !slices.Equal(got, want) {
		t.Fatalf("events = %q, want %q", got, want)
	}
}

// ctx ending while a component is still getting ready stops it and those
// before it; the later ones never start.
func TestCancelledWhileWaitingForReady(t *testing.T) {
	noLeak(t)
	j := &journal{}
	log, _ := newLog()
	ctx, cancel := context.WithCancel(context.Background())
	never := Component{Name: "ingest", Ready: make(chan struct{}), Run: func(ctx context.Context) error {
		j.add("start ingest")
		<-ctx.Done()
		j.add("stop ingest")
		return nil
	}}
	errc := make(chan error, 1)
	go func() { errc <- Supervise(ctx, log, part(j, "queue"), never, part(j, "admin")) }()
	testkit.Eventually(t, 2*time.Second, "ingest started", func() bool { return len(j.get()) == 2 })
	cancel()
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	want := []string{"start queue", "start ingest", "stop ingest", "stop queue"}
	if got := j.get(); !slices.Equal(got, want) {
		t.Fatalf("events = %q, want %q", got, want)
	}
}

// Components see the parent's values (a request id, a trace) but not its
// cancellation, which the supervisor hands out one at a time.
func TestContextValues(t *testing.T) {
	noLeak(t)
	type key struct{}
	log, _ := newLog()
	ctx, cancel := context.WithCancel(context.WithValue(context.Background(), key{}, "gw-1"))
	got := make(chan string, 1)
	c := Component{Name: "v", Run: func(ctx context.Context) error {
		got <- fmt.Sprint(ctx.Value(key{}))
		<-ctx.Done()
		return nil
	}}
	errc := make(chan error, 1)
	go func() { errc <- Supervise(ctx, log, c) }()
	if v := <-got; v != "gw-1" {
		t.Fatalf("value = %q", v)
	}
	cancel()
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
}
