package testkit

import (
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// recorder is a TB that records the failure instead of ending the test.
type recorder struct {
	failed string
}

func (r *recorder) Helper() {}
func (r *recorder) Fatalf(format string, args ...any) {
	r.failed = fmt.Sprintf(format, args...)
}

func TestEventually(t *testing.T) {
	tests := []struct {
		name     string
		trueFrom int32 // cond returns true from this call on; 0 = never
		timeout  time.Duration
		wantFail string
		minCalls int32
	}{
		{name: "true at once", trueFrom: 1, timeout: time.Second, minCalls: 1},
		{name: "true on the third poll", trueFrom: 3, timeout: 5 * time.Second, minCalls: 3},
		{name: "never true", trueFrom: 0, timeout: 50 * time.Millisecond,
			wantFail: "timed out after 50ms waiting for the queue to drain", minCalls: 2},
		{name: "zero timeout still checks once", trueFrom: 1, timeout: 0, minCalls: 1},
		{name: "zero timeout, false", trueFrom: 0, timeout: 0,
			wantFail: "timed out after 0s waiting for the queue to drain", minCalls: 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var calls atomic.Int32
			r := &recorder{}
			start := time.Now()
			Eventually(r, tt.timeout, "the queue to drain", func() bool {
				n := calls.Add(1)
				return tt.trueFrom > 0 && n >= tt.trueFrom
			})
			if r.failed != tt.wantFail {
				t.Errorf("failure = %q, want %q", r.failed, tt.wantFail)
			}
			if got := calls.Load(); got < tt.minCalls {
				t.Errorf("cond called %d times, want ≥ %d", got, tt.minCalls)
			}
			// Bounded: it gives up soon after the timeout.
			if el := time.Since(start); el > tt.timeout+time.Second {
				t.Errorf("returned after %v, timeout was %v", el, tt.timeout)
			}
		})
	}
}

func TestBufferConcurrent(t *testing.T) {
	var b Buffer
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Go(func() {
			for range 100 {
				fmt.Fprintf(&b, "w%d\n", i)
				_ = b.String()
			}
		})
	}
	wg.Wait()
	tests := []struct {
		name string
		got  int
		want int
	}{
		{"lines", strings.Count(b.String(), "\n"), 800},
		{"bytes", b.Len(), 800 * 3},
	}
	for _, tt := range tests {
		if tt.got != tt.want {
			t.Errorf("%s = %d, want %d", tt.name, tt.got, tt.want)
		}
	}
}

func TestPoll(t *testing.T) {
	tests := []struct {
		name    string
		cond    func(n int) bool
		timeout time.Duration
		want    bool
	}{
		{"holds at once", func(int) bool { return true }, 0, true},
		{"holds on the fifth check", func(n int) bool { return n >= 5 }, 5 * time.Second, true},
		{"never holds", func(int) bool { return false }, 30 * time.Millisecond, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n := 0
			if got := Poll(tt.timeout, func() bool { n++; return tt.cond(n) }); got != tt.want {
				t.Errorf("Poll = %v after %d checks, want %v", got, n, tt.want)
			}
		})
	}
}
