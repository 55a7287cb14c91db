package backoff

import (
	"context"
	"errors"
	"testing"
	"time"
)

// fakeClock is the injected clock: Now reads it, After records the wait
// asked for and fires at once (advancing the clock), so no test sleeps.
type fakeClock struct {
	now   time.Time
	waits []time.Duration
	hold  bool // After never fires
}

func (c *fakeClock) Now() time.Time { return c.now }
func (c *fakeClock) After(d time.Duration) <-chan time.Time {
	c.waits = append(c.waits, d)
	ch := make(chan time.Time, 1)
	if !c.hold {
		c.now = c.now.Add(d)
		ch <- c.now
	}
	return ch
}

func newTest(lo, hi time.Duration, r float64) (*Backoff, *fakeClock) {
	c := &fakeClock{now: time.Unix(1000, 0)}
	b := New(lo, hi)
	b.Now, b.After, b.Rand = c.Now, c.After, func() float64 { return r }
	return b, c
}

func TestFailSequence(t *testing.T) {
	ms := time.Millisecond
	tests := []struct {
		name   string
		lo, hi time.Duration
		rand   float64
		want   []time.Duration // delays of consecutive failures
	}{
		{"lowest jitter is half the step", 200 * ms, 30 * time.Second, 0,
			[]time.Duration{100 * ms, 200 * ms, 400 * ms, 800 * ms, 1600 * ms}},
		{"highest jitter is just under the step", 200 * ms, 30 * time.Second, 0.5,
			[]time.Duration{150 * ms, 300 * ms, 600 * ms, 1200 * ms, 2400 * ms}},
		{"capped at max", 1 * time.Second, 5 * time.Second, 0,
			[]time.Duration{500 * ms, time.Second, 2 * time.Second, 2500 * ms, 2500 * ms, 2500 * ms}},
		{"max below min is raised to min", time.Second, 10 * ms, 0,
			[]time.Duration{500 * ms, 500 * ms}},
		{"zero min still waits", 0, 0, 0,
			[]time.Duration{500 * time.Microsecond, 500 * time.Microsecond}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b, c := newTest(tt.lo, tt.hi, tt.rand)
			for i, want := range tt.want {
				if got := b.Fail(); got != want {
					t.Errorf("failure %d: delay %v, want %v", i+1, got, want)
				}
				if got := b.Remaining(); got != want {
					t.Errorf("failure %d: Remaining %v, want %v", i+1, got, want)
				}
				c.now = c.now.Add(want)
				if got := b.Remaining(); got != 0 {
					t.Errorf("failure %d: Remaining after the wait %v, want 0", i+1, got)
				}
			}
			if got := b.Failures(); got != len(tt.want) {
				t.Errorf("Failures = %d, want %d", got, len(tt.want))
			}
		})
	}
}

func TestJitterBounds(t *testing.T) {
	for _, r := range []float64{0, 0.25, 0.5, 0.999} {
		b, _ := newTest(200*time.Millisecond, 30*time.Second, r)
		for i := range 12 {
			d := b.Fail()
			hi := min(200*time.Millisecond<<i, 30*time.Second)
			if d < hi/2 || d >= hi {
				t.Errorf("rand=%v failure %d: delay %v, want in [%v, %v)", r, i+1, d, hi/2, hi)
			}
		}
	}
}

func TestFloorResetExtend(t *testing.T) {
	s := time.Second
	tests := []struct {
		name          string
		steps         func(b *Backoff) time.Duration // returns the last delay
		wantDelay     time.Duration
		wantRemaining time.Duration
	}{
		{"Retry-After longer than the backoff wins", func(b *Backoff) time.Duration {
			return b.FailAtLeast(5 * s)
		}, 5 * s, 5 * s},
		{"Retry-After shorter than the backoff does not shorten it", func(b *Backoff) time.Duration {
			b.Fail()
			b.Fail()
			return b.FailAtLeast(time.Millisecond)
		}, 2 * s, 2 * s},
		{"Reset starts over at min", func(b *Backoff) time.Duration {
			b.Fail()
			b.Fail()
			b.Fail()
			b.Reset()
			return b.Fail()
		}, s / 2, 2 * s}, // the earlier, longer retry time stays
		{"Reset keeps a Retry-After in force", func(b *Backoff) time.Duration {
			d := b.FailAtLeast(10 * s)
			b.Reset()
			return d
		}, 10 * s, 10 * s},
		{"Extend never shortens", func(b *Backoff) time.Duration {
			d := b.FailAtLeast(5 * s)
			b.Extend(s)
			return d
		}, 5 * s, 5 * s},
		{"Extend without a failure", func(b *Backoff) time.Duration {
			b.Extend(3 * s)
			return 0
		}, 0, 3 * s},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b, _ := newTest(s, time.Minute, 0)
			if got := tt.steps(b); got != tt.wantDelay {
				t.Errorf("delay = %v, want %v", got, tt.wantDelay)
			}
			if got := b.Remaining(); got != tt.wantRemaining {
				t.Errorf("Remaining = %v, want %v", got, tt.wantRemaining)
			}
		})
	}
}

func TestWait(t *testing.T) {
	s := time.Second
	canceled, cancel := context.WithCancel(context.Background())
	cancel()
	tests := []struct {
		name      string
		ctx       context.Context
		hold      bool // the timer never fires
		before    func(b *Backoff)
		waits     int
		wantErr   error
		wantWaits []time.Duration
	}{
		{"doubles per wait, capped", context.Background(), false, nil, 5, nil,
			[]time.Duration{s / 2, s, 2 * s, 2500 * time.Millisecond, 2500 * time.Millisecond}},
		{"waits out an Extend longer than the step", context.Background(), false,
			func(b *Backoff) { b.Extend(4 * s) }, 1, nil, []time.Duration{4 * s}},
		{"ended context returns at once", canceled, false, nil, 1, context.Canceled, nil},
		{"context ending mid-wait", nil, true, nil, 1, context.DeadlineExceeded, []time.Duration{s / 2}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b, c := newTest(s, 5*s, 0)
			c.hold = tt.hold
			ctx := tt.ctx
			if ctx == nil {
				// A context that ends while Wait is waiting, without
				// the test sleeping.
				ctx = &lateCtx{Context: context.Background()}
			}
			if tt.before != nil {
				tt.before(b)
			}
			var err error
			for range tt.waits {
				if err = b.Wait(ctx); err != nil {
					break
				}
			}
			if !errors.Is(err, tt.wantErr) {
				t.Errorf("Wait = %v, want %v", err, tt.wantErr)
			}
			if len(c.waits) != len(tt.wantWaits) {
				t.Fatalf("waited %v, want %v", c.waits, tt.wantWaits)
			}
			for i := range c.waits {
				if c.waits[i] != tt.wantWaits[i] {
					t.Errorf("wait %d = %v, want %v", i+1, c.waits[i], tt.wantWaits[i])
				}
			}
		})
	}
}

// lateCtx reports no error when Wait first checks it and is done by the
// time Wait selects: a context ending while the backoff waits.
type lateCtx struct {
	context.Context
	checked bool
}

func (c *lateCtx) Err() error {
	if !c.checked {
		c.checked = true
		return nil
	}
	return context.DeadlineExceeded
}

func (c *lateCtx) Done() <-chan struct{} {
	ch := make(chan struct{})
	close(ch)
	return ch
}

func TestSpread(t *testing.T) {
	tests := []struct {
		r    float64
		want time.Duration
	}{
		{0, 80 * time.Second},
		{0.5, 100 * time.Second},
		{0.999, 119960 * time.Millisecond},
	}
	for _, tt := range tests {
		if got := Spread(100*time.Second, tt.r); got != tt.want {
			t.Errorf("Spread(100s, %v) = %v, want %v", tt.r, got, tt.want)
		}
	}
}
