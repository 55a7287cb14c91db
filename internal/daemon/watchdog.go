package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"time"

	sddaemon "github.com/coreos/go-systemd/v22/daemon"
)

// systemd's sd_notify protocol (READY=1, STOPPING=1, STATUS=, WATCHDOG=1) is
// spoken through github.com/coreos/go-systemd/v22/daemon, the ecosystem's
// implementation: one datagram per call to the unixgram socket named by
// $NOTIFY_SOCKET (a leading '@' is an abstract socket), a no-op when the
// variable is unset, i.e. when not running under a Type=notify unit. What is
// ours is below: errors that name the message, and the health-gated watchdog
// loop.
//
// go-systemd sets no write deadline on the datagram. systemd reads its notify
// socket promptly; should it not, a blocked ping means no keep-alive, which is
// the watchdog's intended outcome, and a blocked STOPPING=1 is bounded by the
// supervisor's per-component stop timeout.

// sdNotify sends one state to the service manager. It returns nil when
// NOTIFY_SOCKET is unset. An error names the key but not the value: a
// status line may be long.
func sdNotify(state string) error {
	if _, err := sddaemon.SdNotify(false, state); err != nil {
		k, _, _ := strings.Cut(state, "=")
		return fmt.Errorf("sd_notify %s: %w", k, err)
	}
	return nil
}

// sdStatus sets the free-form status line shown by `systemctl status`.
func sdStatus(s string) error {
	// A newline would start a new KEY=value assignment in the datagram.
	return sdNotify("STATUS=" + strings.ReplaceAll(s, "\n", " "))
}

// watchdogInterval returns the timeout systemd expects keep-alives within
// (WatchdogSec= in the unit, passed as $WATCHDOG_USEC), and whether this
// process must send them: go-systemd checks $WATCHDOG_PID against our pid,
// so a child that inherited the environment does not ping on the main
// process's behalf. Keep-alives are useless without a notify socket, so
// none are sent when $NOTIFY_SOCKET is unset.
func watchdogInterval() (time.Duration, error) {
	if os.Getenv("NOTIFY_SOCKET") == "" {
		return 0, nil
	}
	d, err := sddaemon.SdWatchdogEnabled(false)
	if err != nil {
		return 0, fmt.Errorf("WATCHDOG_USEC/WATCHDOG_PID: %w", err)
	}
	// go-systemd multiplies the microseconds without an overflow check; a
	// wrapped value comes out negative, and "infinity" is never passed.
	if d < 0 {
		return 0, fmt.Errorf("WATCHDOG_USEC: out of range")
	}
	return d, nil
}

// errNoHealth is returned by watchdog when it is given nothing to check.
var errNoHealth = errors.New("sd_notify watchdog: nil health function")

// watchdog sends WATCHDOG=1 every interval/2 for as long as healthy returns
// nil, and returns nil when ctx is done.
//
// It is not a bare timer: a timer in its own goroutine keeps pinging while
// the pipeline is deadlocked, and systemd would never notice. Before every
// ping it asks healthy; the first time healthy returns an error, watchdog
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
// watchdog does not return when the process turns unhealthy, only when ctx
// is done, so a caller that treats a returning goroutine as fatal does not
// stop the daemon itself before systemd collects the evidence.
func watchdog(ctx context.Context, interval time.Duration, healthy func() error, log *slog.Logger) error {
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
			_ = sdStatus(fmt.Sprintf("unhealthy: %v", err))
			<-ctx.Done()
			return nil
		}
		if err := sdNotify(sddaemon.SdNotifyWatchdog); err != nil {
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
