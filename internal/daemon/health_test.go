package daemon

import (
	"strings"
	"sync"
	"testing"
	"time"
)

type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *fakeClock) add(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

func TestStallMonitor(t *testing.T) {
	clk := &fakeClock{t: time.Unix(1_800_000_000, 0)}
	m := newStallMonitor(2*time.Minute, clk.now)

	clk.add(time.Hour) // idle for an hour: healthy
	if err := m.healthy(); err != nil {
		t.Fatalf("idle: healthy() = %v, want nil", err)
	}

	m.beat("broker scan")
	m.appendStarted()
	clk.add(90 * time.Second)
	m.beat("broker scan")
	if err := m.healthy(); err != nil {
		t.Fatalf("append waiting 90s: healthy() = %v, want nil", err)
	}
	clk.add(31 * time.Second)
	m.beat("broker scan")
	if err := m.healthy(); err == nil || !strings.Contains(err.Error(), "queue committer: 1 readings waiting") {
		t.Fatalf("append waiting 121s: healthy() = %v, want a committer stall", err)
	}
	m.appendDone()
	if err := m.healthy(); err != nil {
		t.Fatalf("after the commit: healthy() = %v, want nil", err)
	}

	m.beat("dispatcher https://b.example")
	clk.add(3 * time.Minute)
	m.beat("broker scan")
	if err := m.healthy(); err == nil || !strings.Contains(err.Error(), "dispatcher https://b.example") {
		t.Fatalf("dispatcher silent 3m: healthy() = %v, want it named", err)
	}
}

func TestBrokerLabelHidesSecrets(t *testing.T) {
	if got := brokerLabel("https://u:pw@b.example/orion?k1=x"); got != "https://b.example/orion" {
		t.Errorf("brokerLabel() = %q", got)
	}
}
