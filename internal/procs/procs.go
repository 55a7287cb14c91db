// Package procs adapts how many OS threads run Go code at once
// (GOMAXPROCS) to the daemon's load: one while it is mostly idle, the
// runtime's default as soon as it is busy.
//
// Why: at a moderate pace (1,500 readings/s from 50 devices, 0.4 of a core)
// each reading wakes several goroutines (the device's connection, the
// committer, the acknowledger), and with more than one P the runtime wakes
// a second thread to run them — futex wake-ups, idle threads spinning,
// work stolen between them: 15–20 % of the daemon's CPU in
// docs/bench/profiles. With one P those hand-offs stay on one thread
// (GOMAXPROCS=1 cut the paced CPU 17 % in `make bench-peers`), but a burst
// then runs at half speed, so one P is only for quiet times. The Go
// runtime itself changes GOMAXPROCS while running (it follows cgroup CPU
// limits); this goes back to that default, with its updates, when busy.
//
// An operator who sets GOMAXPROCS in the environment keeps it: nothing is
// adapted then.
package procs

import (
	"context"
	"log/slog"
	"os"
	"runtime"
	"syscall"
	"time"
)

// Defaults of Options.
const (
	DefaultInterval = 250 * time.Millisecond
	DefaultQuiet    = 2 * time.Second
	// DefaultLow: below this many cores over DefaultQuiet, one P is
	// enough (it leaves room to double before DefaultHigh).
	DefaultLow = 0.5
	// DefaultHigh: this many cores over one interval with one P means the
	// P is nearly full (syscalls run beside it): back to the default.
	DefaultHigh = 0.8
)

// Options tune Run; zero values take the defaults.
type Options struct {
	Interval time.Duration // how often the process's CPU time is read
	Quiet    time.Duration // how long the load stays under Low before one P
	Low      float64       // cores
	High     float64       // cores
	Log      *slog.Logger

	// For tests: the process's CPU time so far, the runtime's current
	// setting, and the two changes. Nil: the real ones.
	cpu        func() time.Duration
	current    func() int
	setOne     func()
	setDefault func()
}

// Run adapts GOMAXPROCS until ctx ends, then leaves the runtime's default
// in force. It returns at once when GOMAXPROCS is set in the environment
// or the default is already one.
func Run(ctx context.Context, opts Options) error {
	opts = opts.withDefaults()
	if v := os.Getenv("GOMAXPROCS"); v != "" && opts.cpu == nil {
		opts.Log.Info("GOMAXPROCS set in the environment: not adapted", "gomaxprocs", v)
		return nil
	}
	full := opts.current()
	if full <= 1 {
		return nil
	}
	defer opts.setDefault()
	t := time.NewTicker(opts.Interval)
	defer t.Stop()
	one := false
	last := opts.cpu()
	var quietSince time.Time // zero: not quiet now
	for {
		select {
		case <-ctx.Done():
			return nil
		case now := <-t.C:
			used := opts.cpu()
			cores := float64(used-last) / float64(opts.Interval)
			last = used
			switch {
			case one && cores >= opts.High:
				opts.setDefault()
				one, quietSince = false, time.Time{}
				opts.Log.Debug("busy: GOMAXPROCS back to the default", "cores", cores, "gomaxprocs", opts.current())
			case !one && cores < opts.Low:
				if quietSince.IsZero() {
					quietSince = now
				} else if now.Sub(quietSince) >= opts.Quiet {
					opts.setOne()
					one = true
					opts.Log.Debug("quiet: GOMAXPROCS 1", "cores", cores)
				}
			case !one:
				quietSince = time.Time{}
			}
		}
	}
}

func (o Options) withDefaults() Options {
	if o.Interval <= 0 {
		o.Interval = DefaultInterval
	}
	if o.Quiet <= 0 {
		o.Quiet = DefaultQuiet
	}
	if o.Low <= 0 {
		o.Low = DefaultLow
	}
	if o.High <= 0 {
		o.High = DefaultHigh
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.cpu == nil {
		o.cpu = processCPU
	}
	if o.current == nil {
		o.current = func() int { return runtime.GOMAXPROCS(0) }
	}
	if o.setOne == nil {
		o.setOne = func() { runtime.GOMAXPROCS(1) }
	}
	if o.setDefault == nil {
		o.setDefault = runtime.SetDefaultGOMAXPROCS
	}
	return o
}

// processCPU is the user and system time of every thread of the process.
func processCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
