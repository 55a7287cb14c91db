package sdnotify

import (
	"context"
	"fmt"
	"log/slog"
	"time"
)

// Watchdog sends WATCHDOG=1 every interval/2 (interval as returned by
// WatchdogInterval) for as long as healthy returns nil, and returns nil when
// ctx is done.
//
// It is not a bare timer: a timer in its own goroutine keeps pinging while
// the pipeline is deadlocked, and systemd would never notice. Before every
// ping it asks healthy; the first time healthy returns an error, Watchdog
// logs the reason once, puts it in the status line and never pings again.
// systemd then kills the unit after WatchdogSec (with SIGABRT by default,
// so the Go runtime dumps every goroutine's stack to the journal, which is
// the evidence of where it was stuck) and Restart=on-failure starts it
// again. It does not resume after a recovery: a pipeline that was stuck long
// enough for healthy to fail is restarted rather than trusted.
//
// healthy should be cheap. If it blocks, no ping goes out either, which is
// the right outcome: a health check that hangs means the process is stuck.
//
// Watchdog does not return when the process turns unhealthy, only when ctx
// is done, so a caller that treats a returning goroutine as fatal does not
// stop the daemon itself before systemd collects the evidence. On a nil
// Notifier it returns nil at once.
func (n *Notifier) Watchdog(ctx context.Context, interval time.Duration, healthy func() error, log *slog.Logger) error {
	if n == nil {
		return nil
	}
	if interval <= 0 {
		return fmt.Errorf("sd_notify watchdog: interval must be positive: %s", interval)
	}
	if healthy == nil {
		return errNoHealth
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	// Half the timeout, as sd_watchdog_enabled(3) recommends: one late or
	// lost ping must not be fatal.
	tick := time.NewTicker(interval / 2)
	defer tick.Stop()
	sendFailed := false
	for {
		if err := healthy(); err != nil {
			log.Error("watchdog: pipeline unhealthy; no more keep-alives, systemd will restart the service",
				"err", err, "watchdog_timeout", interval)
			// Best effort: the status line tells an operator why before the
			// journal does.
			_ = n.Status(fmt.Sprintf("unhealthy: %v", err))
			<-ctx.Done()
			return nil
		}
		if err := n.ping(); err != nil {
			// Logged once per run of failures: the journal is on an SD card.
			if !sendFailed {
				log.Warn("watchdog: keep-alive not sent", "err", err)
			}
			sendFailed = true
		} else if sendFailed {
			log.Info("watchdog: keep-alives sent again")
			sendFailed = false
		}
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
	}
}
