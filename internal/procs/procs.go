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
// limits); this goes back to that default, with its updates, when busy:
// when the process uses most of a core, or when one in twenty runnable
// goroutines waits 5 ms or more for the P (the runtime's
// /sched/latencies:seconds), which a machine whose other processes take
// the cores shows before the process's own CPU does. 1 ms there brought
// the default back at a steady 1,500 readings/s and saved nothing.
//
// An operator who sets GOMAXPROCS in the environment keeps it: nothing is
// adapted then.
package procs

import (
	"cmp"
	"context"
	"log/slog"
	"os"
	"runtime"
	"runtime/metrics"
	"syscall"
	"time"
)

// Defaults of Options.
const (
	DefaultInterval = 250 * time.Millisecond
	DefaultQuiet    = 2 * time.Second
	// lowCores: below this many cores over Quiet, one P is enough (it
	// leaves room to grow before highCores).
	lowCores = 0.5
	// highCores: this many cores over one interval with one P means the
	// P is nearly full (syscalls run beside it): back to the default.
	highCores = 0.8
	// slowSched: a goroutine that waited this long to run, runnable,
	// waited for the one P. When one in slowShare of those waits is that
	// slow, the P is short even if the process's CPU stays under highCores (a
	// machine whose other processes take the cores).
	slowSched = 5 * time.Millisecond
	slowShare = 20
	// minSched: fewer scheduling events than this in an interval prove
	// nothing either way.
	minSched = 20
)

// Options tune Run; zero values take the defaults.
type Options struct {
	Interval time.Duration // how often the process's CPU time is read
	Quiet    time.Duration // how long the load stays under lowCores before one P
	Log      *slog.Logger

	// For tests: the process's load so far, the runtime's current
	// setting, and the two changes. Nil: the real ones.
	sample     func() load
	current    func() int
	setOne     func()
	setDefault func()
}

// Run adapts GOMAXPROCS until ctx ends, then leaves the runtime's default
// in force. When GOMAXPROCS is set in the environment or the default is
// already one (a single-core board), it changes nothing, and still returns
// only when ctx ends: a supervised component that returns stops the daemon.
func Run(ctx context.Context, opts Options) error {
	opts = opts.withDefaults()
	if v := os.Getenv("GOMAXPROCS"); v != "" {
		opts.Log.Info("GOMAXPROCS set in the environment: not adapted", "gomaxprocs", v)
		<-ctx.Done()
		return nil
	}
	full := opts.current()
	if full <= 1 {
		<-ctx.Done()
		return nil
	}
	defer opts.setDefault()
	t := time.NewTicker(opts.Interval)
	defer t.Stop()
	one := false
	last := opts.sample()
	var quietSince time.Time // zero: not quiet now
	for {
		select {
		case <-ctx.Done():
			return nil
		case now := <-t.C:
			cur := opts.sample()
			cores := float64(cur.cpu-last.cpu) / float64(opts.Interval)
			slow, all := cur.slow-last.slow, cur.all-last.all
			last = cur
			switch {
			case one && (cores >= highCores || (all >= minSched && slow*slowShare >= all)):
				opts.setDefault()
				one, quietSince = false, time.Time{}
				opts.Log.Debug("busy: GOMAXPROCS back to the default", "cores", cores, "slow_waits", slow, "waits", all, "gomaxprocs", opts.current())
			case !one && cores < lowCores:
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
	o.Interval = cmp.Or(o.Interval, DefaultInterval)
	o.Quiet = cmp.Or(o.Quiet, DefaultQuiet)
	o.Log = cmp.Or(o.Log, slog.New(slog.DiscardHandler))
	if o.sample == nil {
		o.sample = newSampler().read
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

// load is what the process used so far: CPU time, and how many times a
// runnable goroutine waited to run (slowly: slowSched or more).
type load struct {
	cpu       time.Duration
	slow, all uint64
}

// sampler reads the load; its buffer is reused across reads.
type sampler struct{ s []metrics.Sample }

func newSampler() *sampler {
	return &sampler{s: []metrics.Sample{{Name: "/sched/latencies:seconds"}}}
}

func (r *sampler) read() load {
	var l load
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err == nil {
		l.cpu = time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	metrics.Read(r.s)
	if r.s[0].Value.Kind() != metrics.KindFloat64Histogram {
		return l // not in this runtime: CPU alone decides
	}
	h := r.s[0].Value.Float64Histogram()
	for i, n := range h.Counts {
		l.all += n
		if h.Buckets[i] >= slowSched.Seconds() {
			l.slow += n
		}
	}
	return l
}
