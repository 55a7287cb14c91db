package mqtt

import (
	"context"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// deviceLimiter paces each device to a sustained rate with a burst, with one
// golang.org/x/time/rate token bucket per device. A device over its rate is
// not refused: its publish waits (the broker holds its PUBACK), so a
// flooding device slows itself down, loses nothing, and cannot starve the
// others, whose publishes run on their own connections.
type deviceLimiter struct {
	limit rate.Limit // tokens per second; 0: unlimited
	burst int
	now   func() time.Time

	mu       sync.Mutex
	limiters map[string]*rate.Limiter
}

// maxBuckets bounds memory; only registered devices can log in, so this is
// far above any real gateway.
const maxBuckets = 100_000

func newDeviceLimiter(perSecond float64, burst int, now func() time.Time) *deviceLimiter {
	if burst < 1 {
		burst = 1
	}
	return &deviceLimiter{limit: rate.Limit(perSecond), burst: burst, now: now, limiters: map[string]*rate.Limiter{}}
}

// reserve takes one token for device and returns the reservation and how
// long to wait before the reading may proceed (0: at once). The reservation
// is nil when there is no limit.
func (l *deviceLimiter) reserve(device string) (*rate.Reservation, time.Duration) {
	if l == nil || l.limit <= 0 {
		return nil, 0
	}
	now := l.now()
	l.mu.Lock()
	lim, ok := l.limiters[device]
	if !ok {
		if len(l.limiters) >= maxBuckets {
			// Forgetting every device at once is crude but bounded; a
			// forgotten device starts again with a full burst.
			clear(l.limiters)
		}
		lim = rate.NewLimiter(l.limit, l.burst)
		l.limiters[device] = lim
	}
	l.mu.Unlock()
	// One token never exceeds the burst (≥ 1), so the reservation is
	// always OK; the Limiter is safe for concurrent use.
	r := lim.ReserveN(now, 1)
	return r, r.DelayFrom(now)
}

// wait blocks until device may proceed or ctx ends. A publish abandoned
// because its client went away gives its token back.
func (l *deviceLimiter) wait(ctx context.Context, device string) error {
	r, d := l.reserve(device)
	if d <= 0 {
		return nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		r.CancelAt(l.now())
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
