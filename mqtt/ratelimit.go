package mqtt

import (
	"context"
	"sync"
	"time"
)

// deviceLimiter paces each device to a sustained rate with a burst. A
// device over its rate is not refused: its publish waits (the broker holds
// its PUBACK), so a flooding device slows itself down, loses nothing, and
// cannot starve the others, whose publishes run on their own connections.
type deviceLimiter struct {
	rate  float64 // tokens per second; 0: unlimited
	burst float64
	now   func() time.Time

	mu      sync.Mutex
	buckets map[string]*bucket
}

type bucket struct {
	tokens float64
	last   time.Time
}

// maxBuckets bounds memory; only registered devices can log in, so this is
// far above any real gateway.
const maxBuckets = 100_000

func newDeviceLimiter(rate float64, burst int, now func() time.Time) *deviceLimiter {
	if burst < 1 {
		burst = 1
	}
	return &deviceLimiter{rate: rate, burst: float64(burst), now: now, buckets: map[string]*bucket{}}
}

// reserve takes one token for device and returns how long to wait before
// the reading may proceed (0: at once).
func (l *deviceLimiter) reserve(device string) time.Duration {
	if l == nil || l.rate <= 0 {
		return 0
	}
	now := l.now()
	l.mu.Lock()
	defer l.mu.Unlock()
	b, ok := l.buckets[device]
	if !ok {
		if len(l.buckets) >= maxBuckets {
			clear(l.buckets)
		}
		b = &bucket{tokens: l.burst, last: now}
		l.buckets[device] = b
	}
	b.tokens = min(l.burst, b.tokens+now.Sub(b.last).Seconds()*l.rate)
	b.last = now
	b.tokens--
	if b.tokens >= 0 {
		return 0
	}
	return time.Duration(-b.tokens / l.rate * float64(time.Second))
}

// wait blocks until device may proceed or ctx ends.
func (l *deviceLimiter) wait(ctx context.Context, device string) error {
	d := l.reserve(device)
	if d <= 0 {
		return nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
