package logx

import (
	"context"
	"log/slog"
	"sync"
	"time"
)

// maxCauses bounds memory when causes come from outside input (device ids).
const maxCauses = 4096

// Limiter rate-limits log lines per cause, so that a device sending
// garbage ten times a second cannot wear out an SD card or flood journald.
// The first line of a cause is logged at once; then at most one line per
// interval, carrying how many were suppressed in between.
type Limiter struct {
	log      *slog.Logger
	interval time.Duration
	now      func() time.Time

	mu     sync.Mutex
	causes map[string]*state
}

type state struct {
	last       time.Time
	suppressed int
}

// New returns a limiter writing to log.
func NewLimiter(log *slog.Logger, interval time.Duration) *Limiter {
	return &Limiter{log: log, interval: interval, now: time.Now, causes: map[string]*state{}}
}

// Log writes msg at level unless a line for cause was written less than the
// interval ago. It reports whether the line was written.
func (l *Limiter) Log(ctx context.Context, level slog.Level, cause, msg string, args ...any) bool {
	now := l.now()
	l.mu.Lock()
	st, ok := l.causes[cause]
	if !ok {
		if len(l.causes) >= maxCauses {
			l.sweep(now)
		}
		st = &state{}
		l.causes[cause] = st
	} else if now.Sub(st.last) < l.interval {
		st.suppressed++
		l.mu.Unlock()
		return false
	}
	suppressed := st.suppressed
	st.last, st.suppressed = now, 0
	l.mu.Unlock()
	if suppressed > 0 {
		args = append(args, "suppressed", suppressed)
	}
	l.log.Log(ctx, level, msg, args...)
	return true
}

// sweep drops causes idle for longer than the interval; when all are busy it
// drops everything, which at worst logs one extra line per cause.
func (l *Limiter) sweep(now time.Time) {
	for k, st := range l.causes {
		if now.Sub(st.last) >= l.interval {
			delete(l.causes, k)
		}
	}
	if len(l.causes) >= maxCauses {
		clear(l.causes)
	}
}
