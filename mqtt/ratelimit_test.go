package mqtt

import (
	"testing"
	"time"
)

func TestDeviceLimiter(t *testing.T) {
	now := time.Unix(0, 0)
	l := newDeviceLimiter(10, 5, func() time.Time { return now })
	for i := range 5 {
		if d := l.reserve("flood"); d != 0 {
			t.Fatalf("burst reading %d waits %v", i, d)
		}
	}
	if d := l.reserve("flood"); d != 100*time.Millisecond {
		t.Fatalf("first reading over the burst waits %v, want 100ms (10/s)", d)
	}
	if d := l.reserve("flood"); d != 200*time.Millisecond {
		t.Fatalf("second reading over the burst waits %v, want 200ms", d)
	}
	// Another device is not affected by the flood.
	if d := l.reserve("quiet"); d != 0 {
		t.Fatalf("another device waits %v", d)
	}
	now = now.Add(time.Second) // refills 10 tokens, burst caps at 5
	for i := range 3 {
		if d := l.reserve("flood"); d != 0 {
			t.Fatalf("after a second, reading %d waits %v", i, d)
		}
	}
	var unlimited *deviceLimiter
	if d := unlimited.reserve("x"); d != 0 {
		t.Fatal("a nil limiter limits")
	}
}
