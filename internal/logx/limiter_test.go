package logx

import (
	"bytes"
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"
)

func TestLimiter(t *testing.T) {
	var buf bytes.Buffer
	l := NewLimiter(slog.New(slog.NewTextHandler(&buf, nil)), time.Minute)
	now := time.Unix(1000, 0)
	l.now = func() time.Time { return now }
	ctx := context.Background()
	if !l.Log(ctx, slog.LevelWarn, "a", "first") {
		t.Fatal("first line of a cause was suppressed")
	}
	for range 5 {
		if l.Log(ctx, slog.LevelWarn, "a", "again") {
			t.Fatal("line within the interval was written")
		}
	}
	if !l.Log(ctx, slog.LevelWarn, "b", "other cause") {
		t.Fatal("another cause was suppressed")
	}
	now = now.Add(time.Minute)
	if !l.Log(ctx, slog.LevelWarn, "a", "later") {
		t.Fatal("line after the interval was suppressed")
	}
	out := buf.String()
	if got := strings.Count(out, "\n"); got != 3 {
		t.Errorf("wrote %d lines, want 3:\n%s", got, out)
	}
	if !strings.Contains(out, "suppressed=5") {
		t.Errorf("output does not report 5 suppressed lines:\n%s", out)
	}
}

func TestLimiterBoundsCauses(t *testing.T) {
	var buf bytes.Buffer
	l := NewLimiter(slog.New(slog.NewTextHandler(&buf, nil)), time.Hour)
	for i := range maxCauses * 2 {
		l.Log(context.Background(), slog.LevelInfo, string(rune(i)), "x")
	}
	if n := len(l.causes); n > maxCauses {
		t.Fatalf("limiter holds %d causes, at most %d", n, maxCauses)
	}
}
