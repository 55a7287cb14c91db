// Package backoff is the gateway's one retry backoff. The uplink
// dispatchers, the policy syncer (fetch and receipt) and the radio's port
// reopen each used to carry their own; they now share this one so that
// the jitter, the cap and the Retry-After floor behave the same everywhere
// and are tested once, with an injected clock.
//
// The delay after the n-th consecutive failure is drawn with "equal
// jitter": from [d/2, d) where d = Min·2^(n-1) capped at Max. Half the
// step keeps the wait growing with the outage; the random half keeps a
// fleet of gateways (or a gateway's workers) that failed together from
// retrying in lockstep. A server's Retry-After is a floor
// (FailAtLeast), never shortened by the jitter.
//
// Our own rather than a library (cenkalti/backoff, tailscale's
// util/backoff): the uplink dispatcher needs the retry time as state it
// can poll (Remaining) and push out without counting a failure (Extend),
// which those do not offer.
package backoff

import (
	"context"
	"math/rand/v2"
	"time"
)

// Backoff is a jittered, capped exponential backoff. Not safe for
// concurrent use: each loop owns one. Construct it with New; the hooks
// may then be replaced by tests.
type Backoff struct {
	// Min is the first step and Max the cap on any step.
	Min, Max time.Duration
	// Now is the clock; time.Now by default.
	Now func() time.Time
	// After returns a channel that delivers after d, like time.After; it is
	// what Wait sleeps on. nil means a real timer, stopped on return.
	After func(d time.Duration) <-chan time.Time
	// Rand returns a value in [0, 1); rand.Float64 by default.
	Rand func() float64

	failures int
	until    time.Time
}

// New returns a backoff from lo up to hi (hi is raised to lo if lower; lo
// is raised to 1ms if not positive, so that a failure always waits).
func New(lo, hi time.Duration) *Backoff {
	lo = max(lo, time.Millisecond)
	return &Backoff{Min: lo, Max: max(hi, lo), Now: time.Now, Rand: rand.Float64}
}

// Fail records a failure and returns the jittered delay before the next
// attempt; the retry time (Remaining) is pushed out by it.
func (b *Backoff) Fail() time.Duration { return b.FailAtLeast(0) }

// FailAtLeast is Fail with a floor: the delay is at least atLeast (a
// server's Retry-After), which the jitter never shortens.
func (b *Backoff) FailAtLeast(atLeast time.Duration) time.Duration {
	d := b.Min
	for i := 0; i < b.failures && d < b.Max; i++ {
		d *= 2
	}
	d = min(d, b.Max)
	b.failures++
	d = d/2 + time.Duration(b.Rand()*float64(d/2))
	d = max(d, atLeast)
	b.Extend(d)
	return d
}

// Extend makes sure no retry happens for d from now, without counting a
// failure (the uplink uses it for failures of requests started before the
// last counted one: they report the same outage). It never shortens.
func (b *Backoff) Extend(d time.Duration) {
	if u := b.Now().Add(d); u.After(b.until) {
		b.until = u
	}
}

// Reset clears the failure count, so the next failure waits about Min
// again. A retry time already set stays: Reset after a success does not
// cancel a server's Retry-After.
func (b *Backoff) Reset() { b.failures = 0 }

// Failures is the number of failures since the last Reset.
func (b *Backoff) Failures() int { return b.failures }

// Remaining is how long until the next attempt is allowed; ≤ 0 means now.
func (b *Backoff) Remaining() time.Duration { return b.until.Sub(b.Now()) }

// Wait records a failure and sleeps until the retry time (the jittered
// delay, or longer if Extend pushed it out). It returns ctx's error if ctx
// ends first, and nil once the wait is over.
func (b *Backoff) Wait(ctx context.Context) error {
	b.Fail()
	d := b.Remaining()
	if err := ctx.Err(); err != nil {
		return err
	}
	if d <= 0 {
		return nil
	}
	var c <-chan time.Time
	if b.After != nil {
		c = b.After(d)
	} else {
		t := time.NewTimer(d)
		defer t.Stop()
		c = t.C
	}
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-c:
		return nil
	}
}

// Spread returns d moved by a random ±20%: the jitter for a periodic task
// (a poll interval), which has no failures to count, so that a fleet
// started together does not poll in step. r is a value in [0, 1), e.g.
// rand.Float64().
func Spread(d time.Duration, r float64) time.Duration {
	return time.Duration(float64(d) * (0.8 + 0.4*r))
}
