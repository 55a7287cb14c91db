// Package sdnotify speaks systemd's sd_notify protocol (READY=1, STOPPING=1,
// STATUS=, WATCHDOG=1) over the datagram socket named by $NOTIFY_SOCKET,
// without cgo or libsystemd. It is imported by the daemon only.
//
// The protocol is one newline-separated "KEY=value" datagram per call to a
// unixgram socket; a name starting with '@' is a Linux abstract socket. When
// the process does not run under a Type=notify unit, NOTIFY_SOCKET is unset,
// FromEnv returns nil and every method is a no-op, so callers never branch on
// "are we under systemd".
package sdnotify

import (
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"
)

// sendTimeout bounds one datagram write: systemd reads its notify socket
// promptly, but a wedged receiver must never block a shutdown or the
// watchdog loop.
const sendTimeout = 2 * time.Second

// Notifier sends state changes to the service manager. The zero of *Notifier
// (nil) is valid and does nothing. It is safe for concurrent use: every send
// opens its own socket, so there is no shared connection state to guard.
type Notifier struct {
	addr *net.UnixAddr
}

// FromEnv returns a Notifier for $NOTIFY_SOCKET, or nil when it is unset or
// is not a unix socket path (systemd also knows vsock: addresses, which a
// gateway never gets). getenv is os.Getenv in production.
func FromEnv(getenv func(string) string) *Notifier {
	name := getenv("NOTIFY_SOCKET")
	switch {
	case strings.HasPrefix(name, "/"):
	case strings.HasPrefix(name, "@") && len(name) > 1:
		// Go maps a leading '@' to the abstract namespace itself
		// (net/unixsock_posix.go), so the name is passed through as is.
	default:
		return nil
	}
	return &Notifier{addr: &net.UnixAddr{Name: name, Net: "unixgram"}}
}

// Ready tells systemd that start-up is complete (READY=1). Under
// Type=notify, `systemctl start` and units ordered After= this one wait for
// it, so send it only once every stage is really up.
func (n *Notifier) Ready() error { return n.send("READY=1") }

// Stopping tells systemd that shutdown has begun (STOPPING=1), so
// `systemctl status` shows "deactivating" while the queue drains.
func (n *Notifier) Stopping() error { return n.send("STOPPING=1") }

// Status sets the free-form status line shown by `systemctl status`.
func (n *Notifier) Status(s string) error {
	// A newline would start a new KEY=value assignment in the datagram.
	s = strings.ReplaceAll(s, "\n", " ")
	return n.send("STATUS=" + s)
}

// ping sends one WATCHDOG=1 keep-alive.
func (n *Notifier) ping() error { return n.send("WATCHDOG=1") }

// WatchdogInterval returns the watchdog timeout systemd expects keep-alives
// within (WatchdogSec= in the unit, passed as $WATCHDOG_USEC), and whether
// this process (pid) is the one that must send them: $WATCHDOG_PID, when
// set, names the main process, and a child that inherited the environment
// must not ping on its behalf. It reports false on a nil Notifier, because
// keep-alives could not be delivered anyway.
func (n *Notifier) WatchdogInterval(getenv func(string) string, pid int) (time.Duration, bool) {
	if n == nil {
		return 0, false
	}
	usec, err := strconv.ParseUint(getenv("WATCHDOG_USEC"), 10, 63)
	if err != nil || usec == 0 {
		return 0, false
	}
	if p := getenv("WATCHDOG_PID"); p != "" {
		wp, err := strconv.Atoi(p)
		if err != nil || wp != pid {
			return 0, false
		}
	}
	if usec > uint64(1<<63-1)/uint64(time.Microsecond) {
		return 0, false // absurd; "infinity" is never passed as a number
	}
	return time.Duration(usec) * time.Microsecond, true
}

func (n *Notifier) send(msg string) error {
	if n == nil {
		return nil
	}
	c, err := net.DialUnix("unixgram", nil, n.addr)
	if err != nil {
		return fmt.Errorf("sd_notify %s: %w", key(msg), err)
	}
	defer c.Close()
	if err := c.SetWriteDeadline(time.Now().Add(sendTimeout)); err != nil {
		return fmt.Errorf("sd_notify %s: %w", key(msg), err)
	}
	if _, err := c.Write([]byte(msg)); err != nil {
		return fmt.Errorf("sd_notify %s: %w", key(msg), err)
	}
	return nil
}

// key names a message in errors without its value (a status line may be long).
func key(msg string) string {
	k, _, _ := strings.Cut(msg, "=")
	return k
}

// errNoHealth is returned by Watchdog when it is given nothing to check.
var errNoHealth = errors.New("sd_notify watchdog: nil health function")
