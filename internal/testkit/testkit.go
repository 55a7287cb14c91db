// Package testkit holds the one copy of the helpers every package's tests
// used to write for themselves: Eventually (poll a condition with a bound,
// naming what was awaited), Poll (the same, reporting instead of failing)
// and Buffer (a log sink safe for concurrent use).
//
// It deliberately does not import "testing": Buffer is also the output sink
// of the demo command, and a production binary should not link the test
// framework. Eventually takes the two methods it needs from testing.TB.
package testkit

import (
	"time"
)

// PollInterval is how often Eventually re-checks its condition: short
// enough not to slow a test down, long enough not to spin a core that
// other packages' tests share.
const PollInterval = 10 * time.Millisecond

// TB is the part of testing.TB that Eventually needs.
type TB interface {
	Helper()
	Fatalf(format string, args ...any)
}

// Eventually polls cond every PollInterval until it returns true, and fails
// the test with "timed out after <timeout> waiting for <what>" if it has
// not by then. cond is always called at least once, and once more after
// the deadline, so a condition that became true while the poller slept is
// not reported as a timeout. Call it from the test's goroutine (Fatalf).
func Eventually(t TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	if !Poll(timeout, cond) {
		t.Fatalf("timed out after %s waiting for %s", timeout, what)
	}
}

// Poll is Eventually without the failure: it polls cond every PollInterval
// and reports whether it held within timeout, for a caller that decides
// itself what a timeout means (a leak report with a stack, a helper that
// returns an error, a best-effort wait).
func Poll(timeout time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(timeout)
	tick := time.NewTicker(PollInterval)
	defer tick.Stop()
	for {
		if cond() {
			return true
		}
		if !time.Now().Before(deadline) {
			return false
		}
		<-tick.C
	}
}
