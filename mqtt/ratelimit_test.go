package mqtt

import (
	"context"
	"errors"
	"testing"
	"time"
)

func TestDeviceLimiter(t *testing.T) {
	now := time.Unix(0, 0)
	l := newDeviceLimiter(10, 5, func() time.Time { return now })
	wait := func(device string) time.Duration {
		_, d := l.reserve(device)
		return d
	}
	for i := range 5 {
		if d := wait("flood"); d != 0 {
			t.Fatalf("burst reading %d waits %v", i, d)
		}
	}
	if d := wait("flood"); d != 100*time.Millisecond {
		t.Fatalf("first reading over the burst waits %v, want 100ms (10/s)", d)
	}
	if d := wait("flood"); d != 200*time.Millisecond {
		t.Fatalf("second reading over the burst waits %v, want 200ms", d)
	}
	// Another device is not affected by the flood.
	if d := wait("quiet"); d != 0 {
		t.Fatalf("another device waits %v", d)
	}
	now = now.Add(time.Second) // refills 10 tokens, burst caps at 5
	for i := range 5 {
		if d := wait("flood"); d != 0 {
			t.Fatalf("after a second, reading %d waits %v", i, d)
		}
	}
	if d := wait("flood"); d != 100*time.Millisecond {
		t.Fatalf("the burst refilled beyond 5: the sixth reading waits %v, want 100ms", d)
	}
	var unlimited *deviceLimiter
	if _, d := unlimited.reserve("x"); d != 0 {
		t.Fatal("a nil limiter limits")
	}
	if _, d := newDeviceLimiter(0, 1, time.Now).reserve("x"); d != 0 {
		t.Fatal("rate 0 limits; it means unlimited")
	}
}

// TestDeviceLimiterWaitGivesBackOnCancel: a publish abandoned because its
// client went away does not keep its token, so the device's next reading
// does not pay for it.
func TestDeviceLimiterWaitGivesBackOnCancel(t *testing.T) {
	now := time.Unix(0, 0)
	l := newDeviceLimiter(1, 1, func() time.Time { return now })
	if err := l.wait(context.Background(), "d"); err != nil {
		t.Fatalf("first reading within the burst: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := l.wait(ctx, "d"); !errors.Is(err, context.Canceled) {
		t.Fatalf("wait on a cancelled context = %v, want context.Canceled", err)
	}
	if _, d := l.reserve("d"); d != time.Second {
		t.Fatalf("after the cancelled wait the next reading waits %v, want 1s (the cancelled one's token returned)", d)
	}
}
