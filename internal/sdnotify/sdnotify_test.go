package sdnotify

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/testkit"
)

// listen opens a real unixgram socket standing in for systemd's notify
// socket. The directory comes from os.MkdirTemp rather than t.TempDir
// because a socket path must fit in 108 bytes and test names are long.
func listen(t *testing.T) (*net.UnixConn, string) {
	t.Helper()
	dir, err := os.MkdirTemp("", "sdn")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	path := filepath.Join(dir, "notify")
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c, path
}

// recv reads one datagram, failing the test if none comes within d.
func recv(t *testing.T, c *net.UnixConn, d time.Duration) string {
	t.Helper()
	msg, err := tryRecv(c, d)
	if err != nil {
		t.Fatalf("no notification within %s: %v", d, err)
	}
	return msg
}

func tryRecv(c *net.UnixConn, d time.Duration) (string, error) {
	if err := c.SetReadDeadline(time.Now().Add(d)); err != nil {
		return "", err
	}
	buf := make([]byte, 4096)
	n, err := c.Read(buf)
	if err != nil {
		return "", err
	}
	return string(buf[:n]), nil
}

func env(kv ...string) func(string) string {
	m := map[string]string{}
	for i := 0; i+1 < len(kv); i += 2 {
		m[kv[i]] = kv[i+1]
	}
	return func(k string) string { return m[k] }
}

func TestFromEnvUnsetIsNoop(t *testing.T) {
	for _, sock := range []string{"", "relative/path", "@", "vsock:2:1234"} {
		n := FromEnv(env("NOTIFY_SOCKET", sock))
		if n != nil {
			t.Fatalf("FromEnv(NOTIFY_SOCKET=%q) = %v, want nil", sock, n)
		}
		if err := n.Ready(); err != nil {
			t.Errorf("nil Ready() = %v, want nil", err)
		}
		if err := n.Stopping(); err != nil {
			t.Errorf("nil Stopping() = %v, want nil", err)
		}
		if err := n.Status("x"); err != nil {
			t.Errorf("nil Status() = %v, want nil", err)
		}
		if d, ok := n.WatchdogInterval(env("WATCHDOG_USEC", "1000000"), 1); ok {
			t.Errorf("nil WatchdogInterval() = %s, true; want false", d)
		}
		if err := n.Watchdog(context.Background(), time.Second, func() error { return nil }, nil); err != nil {
			t.Errorf("nil Watchdog() = %v, want nil", err)
		}
	}
}

func TestNotifyMessages(t *testing.T) {
	c, path := listen(t)
	n := FromEnv(env("NOTIFY_SOCKET", path))
	if n == nil {
		t.Fatal("FromEnv returned nil for a socket path")
	}
	steps := []struct {
		name string
		send func() error
		want string
	}{
		{"ready", n.Ready, "READY=1"},
		{"status", func() error { return n.Status("queue: 3 waiting\nREADY=1") }, "STATUS=queue: 3 waiting READY=1"},
		{"stopping", n.Stopping, "STOPPING=1"},
	}
	for _, s := range steps {
		if err := s.send(); err != nil {
			t.Fatalf("%s: %v", s.name, err)
		}
		if got := recv(t, c, 5*time.Second); got != s.want {
			t.Errorf("%s sent %q, want %q", s.name, got, s.want)
		}
	}
}

func TestAbstractSocket(t *testing.T) {
	name := fmt.Sprintf("@edgegate-sdnotify-test-%d-%d", os.Getpid(), time.Now().UnixNano())
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: name, Net: "unixgram"})
	if err != nil {
		t.Skipf("abstract unix sockets unavailable here: %v", err)
	}
	defer c.Close()
	n := FromEnv(env("NOTIFY_SOCKET", name))
	if err := n.Ready(); err != nil {
		t.Fatal(err)
	}
	if got := recv(t, c, 5*time.Second); got != "READY=1" {
		t.Errorf("got %q, want READY=1", got)
	}
}

func TestSendErrorNamesTheMessage(t *testing.T) {
	dir, err := os.MkdirTemp("", "sdn")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	n := FromEnv(env("NOTIFY_SOCKET", filepath.Join(dir, "absent")))
	err = n.Status("secret-looking status")
	if err == nil || !strings.Contains(err.Error(), "sd_notify STATUS") || strings.Contains(err.Error(), "secret-looking") {
		t.Errorf("Status to a missing socket = %v, want an error naming STATUS without its value", err)
	}
}

func TestWatchdogInterval(t *testing.T) {
	n := &Notifier{}
	tests := []struct {
		name   string
		getenv func(string) string
		want   time.Duration
		wantOK bool
	}{
		{"unset", env(), 0, false},
		{"set", env("WATCHDOG_USEC", "30000000"), 30 * time.Second, true},
		{"our pid", env("WATCHDOG_USEC", "500000", "WATCHDOG_PID", "42"), 500 * time.Millisecond, true},
		{"another pid", env("WATCHDOG_USEC", "500000", "WATCHDOG_PID", "7"), 0, false},
		{"bad pid", env("WATCHDOG_USEC", "500000", "WATCHDOG_PID", "x"), 0, false},
		{"zero", env("WATCHDOG_USEC", "0"), 0, false},
		{"negative", env("WATCHDOG_USEC", "-5"), 0, false},
		{"garbage", env("WATCHDOG_USEC", "30s"), 0, false},
		{"overflow", env("WATCHDOG_USEC", "9223372036854775807"), 0, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := n.WatchdogInterval(tt.getenv, 42)
			if got != tt.want || ok != tt.wantOK {
				t.Errorf("WatchdogInterval() = %s, %v; want %s, %v", got, ok, tt.want, tt.wantOK)
			}
		})
	}
}

func TestWatchdogArguments(t *testing.T) {
	n := &Notifier{}
	ok := func() error { return nil }
	if err := n.Watchdog(context.Background(), 0, ok, nil); err == nil {
		t.Error("Watchdog(interval 0) = nil, want an error")
	}
	if err := n.Watchdog(context.Background(), time.Second, nil, nil); err == nil {
		t.Error("Watchdog(nil health) = nil, want an error")
	}
}

type syncBuffer = testkit.Buffer

// TestWatchdogStopsPingingWhenUnhealthy is the property the unit relies
// on: keep-alives flow while the health check passes, and none at all
// follow the first failure, so systemd's WatchdogSec= fires.
func TestWatchdogStopsPingingWhenUnhealthy(t *testing.T) {
	c, path := listen(t)
	n := FromEnv(env("NOTIFY_SOCKET", path))

	const interval = 100 * time.Millisecond // pings every 50ms
	var failure atomic.Pointer[error]
	var checks atomic.Int64
	healthy := func() error {
		checks.Add(1)
		if e := failure.Load(); e != nil {
			return *e
		}
		return nil
	}
	var logs syncBuffer
	log := slog.New(slog.NewTextHandler(&logs, nil))

	ctx, cancel := context.WithCancel(context.Background())
	var werr error
	finished := make(chan struct{}) // closed when Watchdog returned
	go func() {
		defer close(finished)
		werr = n.Watchdog(ctx, interval, healthy, log)
	}()
	defer func() {
		cancel()
		select {
		case <-finished:
		case <-time.After(5 * time.Second):
			t.Error("Watchdog did not return after cancel")
		}
	}()

	for i := range 3 {
		if got := recv(t, c, 5*time.Second); got != "WATCHDOG=1" {
			t.Fatalf("keep-alive %d = %q, want WATCHDOG=1", i, got)
		}
	}

	stuck := errors.New("queue committer: 12 appends waiting, no commit for 2m0s")
	failure.Store(&stuck)
	// A ping already past its health check may still arrive; then the
	// status line says why, and after it nothing.
	for {
		got := recv(t, c, 5*time.Second)
		if got == "WATCHDOG=1" {
			continue
		}
		if want := "STATUS=unhealthy: " + stuck.Error(); got != want {
			t.Fatalf("after the failure got %q, want %q", got, want)
		}
		break
	}
	checksAtFailure := checks.Load()
	// Eight ping intervals of silence: far beyond the jitter of a ticker.
	if got, err := tryRecv(c, 8*interval/2); err == nil {
		t.Fatalf("got %q after healthy() failed, want no more notifications", got)
	} else if ne, ok := err.(net.Error); !ok || !ne.Timeout() {
		t.Fatalf("reading the notify socket: %v", err)
	}
	if n := checks.Load(); n != checksAtFailure {
		t.Errorf("healthy() called %d more times after failing; the watchdog should have stopped", n-checksAtFailure)
	}
	if got := strings.Count(logs.String(), "pipeline unhealthy"); got != 1 {
		t.Errorf("unhealthy logged %d times, want once; logs:\n%s", got, logs.String())
	}
	if !strings.Contains(logs.String(), "no commit for 2m0s") {
		t.Errorf("log does not say why; logs:\n%s", logs.String())
	}

	cancel()
	select {
	case <-finished:
		if werr != nil {
			t.Errorf("Watchdog() = %v after cancel, want nil", werr)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Watchdog did not return within 5s of cancel")
	}
}

func TestWatchdogReturnsOnCancelWhileHealthy(t *testing.T) {
	c, path := listen(t)
	n := FromEnv(env("NOTIFY_SOCKET", path))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- n.Watchdog(ctx, time.Hour, func() error { return nil }, nil) }()
	if got := recv(t, c, 5*time.Second); got != "WATCHDOG=1" {
		t.Fatalf("first keep-alive = %q, want WATCHDOG=1 at once", got)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Watchdog() = %v, want nil", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Watchdog did not return within 5s of cancel")
	}
}
