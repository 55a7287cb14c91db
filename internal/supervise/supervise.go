// Package supervise runs the daemon's long-lived parts as one tree: it
// starts them in a declared order, stops them in the reverse order, and is
// the one place that owns their goroutines (issue #19 item 1).
//
// The shape follows the models named in shared/LAYOUT.md: tailscaled's run()
// (one context, cleanups in reverse) and chirpstack-gateway-bridge's declared
// task list. We keep our own (~150 lines) rather than golang.org/x/sync's
// errgroup or oklog/run: both cancel every member at once, and the gateway
// needs the reverse, one-at-a-time stop (producers first, the queue drained,
// the network closed last) with a bound per member.
package supervise

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime/debug"
	"time"
)

// DefaultStopTimeout bounds how long one component may take to return once
// its context is cancelled. systemd's TimeoutStopSec (90 s by default) must
// cover the sum over all components.
const DefaultStopTimeout = 20 * time.Second

// Component is one long-running part of the daemon.
type Component struct {
	// Name names the component in logs and errors.
	Name string
	// Run runs until ctx is cancelled and then returns nil (returning
	// ctx.Err() is accepted too). A return while the others still run,
	// with or without an error, stops the whole tree. A nil Run marks an
	// absent (disabled) component: it is skipped.
	Run func(ctx context.Context) error
	// Ready, when set, is closed by Run once the component serves; the next
	// component starts only then. Nil means ready as soon as Run starts.
	Ready <-chan struct{}
}

// Supervisor runs components; its zero value is not usable, use New or
// Supervise.
type Supervisor struct {
	log         *slog.Logger
	stopTimeout time.Duration
}

// New returns a supervisor logging to log that gives each component
// stopTimeout to return once cancelled (DefaultStopTimeout if <= 0).
func New(log *slog.Logger, stopTimeout time.Duration) *Supervisor {
	if stopTimeout <= 0 {
		stopTimeout = DefaultStopTimeout
	}
	return &Supervisor{log: log, stopTimeout: stopTimeout}
}

// Supervise runs cs with DefaultStopTimeout; see Supervisor.Run.
func Supervise(ctx context.Context, log *slog.Logger, cs ...Component) error {
	return New(log, DefaultStopTimeout).Run(ctx, cs...)
}

// running is one started component.
type running struct {
	name   string
	cancel context.CancelFunc
	done   chan struct{} // closed once Run returned; err is then set
	err    error
	ready  <-chan struct{}
}

// Run starts cs in order, each once the previous is ready. It returns when
// ctx ends or when a component fails or returns on its own, after stopping
// every started component in reverse order. The result is the first failure
// (nil when ctx ended) joined with the errors of the stop.
func (s *Supervisor) Run(ctx context.Context, cs ...Component) error {
	// exited receives the index of each component whose Run returned; it
	// has room for all so that no runner ever blocks on it.
	exited := make(chan int, len(cs))
	var started []*running
	var first error
	var failed *running

	fail := func(i int) {
		r := started[i]
		failed = r
		if r.err != nil {
			first = fmt.Errorf("%s: %w", r.name, r.err)
		} else {
			first = fmt.Errorf("%s: stopped on its own while the others ran", r.name)
		}
		s.log.Error("component failed, stopping", "component", r.name, "err", first)
	}

start:
	for _, c := range cs {
		if c.Run == nil {
			continue
		}
		if ctx.Err() != nil {
			break
		}
		r := s.start(ctx, c, len(started), exited)
		started = append(started, r)
		if r.ready == nil {
			continue
		}
		for {
			select {
			case <-r.ready:
				continue start
			case i := <-exited:
				fail(i)
				break start
			case <-ctx.Done():
				break start
			}
		}
	}
	if first == nil && ctx.Err() == nil {
		select {
		case i := <-exited:
			fail(i)
		case <-ctx.Done():
		}
	}
	return errors.Join(first, s.stop(started, failed))
}

// start runs c in its own goroutine with its own context: the parent's
// values but not its cancellation, so that stop cancels one at a time.
func (s *Supervisor) start(ctx context.Context, c Component, i int, exited chan<- int) *running {
	cctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	r := &running{name: c.Name, cancel: cancel, done: make(chan struct{}), ready: c.Ready}
	s.log.Debug("starting component", "component", c.Name)
	go func() {
		defer func() {
			if p := recover(); p != nil {
				// A panic in one part must still stop the others in order
				// (the queue commits what it holds) before the process ends.
				s.log.Error("component panicked", "component", c.Name, "panic", p, "stack", string(debug.Stack()))
				r.err = fmt.Errorf("panic: %v", p)
			}
			close(r.done)
			exited <- i
		}()
		r.err = c.Run(cctx)
	}()
	return r
}

// stop cancels the started components in reverse order, each waited for at
// most stopTimeout. A component that overruns is reported and left behind:
// Go cannot stop a goroutine from outside, and waiting forever would hang
// the daemon's exit.
func (s *Supervisor) stop(started []*running, failed *running) error {
	var errs []error
	for i := len(started) - 1; i >= 0; i-- {
		r := started[i]
		select {
		case <-r.done:
			// Exited before its stop: the failure Run reports, or one that
			// ended in the meantime (then its error joins the stop errors).
			r.cancel()
			if r != failed && r.err != nil && !errors.Is(r.err, context.Canceled) {
				errs = append(errs, fmt.Errorf("%s: %w", r.name, r.err))
			}
			continue
		default:
		}
		r.cancel()
		t := time.NewTimer(s.stopTimeout)
		select {
		case <-r.done:
			t.Stop()
			if r.err != nil && !errors.Is(r.err, context.Canceled) {
				s.log.Error("component stopped with an error", "component", r.name, "err", r.err)
				errs = append(errs, fmt.Errorf("%s: stop: %w", r.name, r.err))
			} else {
				s.log.Debug("component stopped", "component", r.name)
			}
		case <-t.C:
			s.log.Error("component did not stop in time", "component", r.name, "timeout", s.stopTimeout)
			errs = append(errs, fmt.Errorf("%s: did not stop within %s", r.name, s.stopTimeout))
		}
	}
	return errors.Join(errs...)
}
