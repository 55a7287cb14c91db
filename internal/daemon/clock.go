package daemon

import (
	"os"
	"strings"
	"sync"
	"time"
)

// clock is the daemon's wall clock. It is the system clock, except that
// EDGEGATE_CLOCK_OFFSET_FILE (a chaos-testing hook, never set by the
// package or the unit) names a file holding a Go duration that is added to
// it, re-read at most once a second — so a test can make the gateway's
// clock jump forward and back, as a Raspberry Pi's does when time sync
// corrects it, without changing the machine's clock.
type clock struct {
	file string

	mu     sync.Mutex
	offset time.Duration
	read   time.Time
}

func newClock(getenv func(string) string) *clock {
	return &clock{file: getenv("EDGEGATE_CLOCK_OFFSET_FILE")}
}

// Now is time.Now plus the test offset, if any.
func (c *clock) Now() time.Time {
	now := time.Now()
	if c == nil || c.file == "" {
		return now
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if now.Sub(c.read) >= time.Second {
		c.read = now
		c.offset = 0
		if b, err := os.ReadFile(c.file); err == nil {
			if d, err := time.ParseDuration(strings.TrimSpace(string(b))); err == nil {
				c.offset = d
			}
		}
	}
	return now.Add(c.offset)
}
