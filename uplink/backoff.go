package uplink

import (
	"math/rand/v2"
	"time"
)

// backoff is a jittered exponential backoff with an injectable clock, in
// the style of tailscale's util/backoff: each failure doubles the delay
// from min up to max, and the delay actually used is drawn from [d/2, d)
// so that many gateways (or workers) that failed together do not retry in
// lockstep. Not safe for concurrent use; each dispatcher owns one.
type backoff struct {
	min, max time.Duration
	now      func() time.Time
	// rand returns a value in [0, 1); injectable for tests.
	rand func() float64

	failures int
	until    time.Time
}

func newBackoff(min, max time.Duration, now func() time.Time) *backoff {
	return &backoff{min: min, max: max, now: now, rand: rand.Float64}
}

// fail records a failure and pushes the retry time out by the next
// jittered delay, or by atLeast if that is longer (a server's Retry-After).
// It returns the delay chosen.
func (b *backoff) fail(atLeast time.Duration) time.Duration {
	d := b.min
	for i := 0; i < b.failures && d < b.max; i++ {
		d *= 2
	}
	d = min(d, b.max)
	b.failures++
	d = d/2 + time.Duration(b.rand()*float64(d/2))
	d = max(d, atLeast)
	b.extend(d)
	return d
}

// extend makes sure no retry happens for d from now, without counting a
// failure (used for failures of requests started before the last one was
// counted: they report the same outage).
func (b *backoff) extend(d time.Duration) {
	if u := b.now().Add(d); u.After(b.until) {
		b.until = u
	}
}

// success clears the failure count; a retry time already set stays.
func (b *backoff) success() { b.failures = 0 }

// remaining is how long until the next attempt is allowed; ≤ 0 means now.
func (b *backoff) remaining() time.Duration { return b.until.Sub(b.now()) }
