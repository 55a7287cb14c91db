package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/testkit"
)

// listenNotify opens a real unixgram socket standing in for systemd's
// notify socket and points $NOTIFY_SOCKET at it for this test.
func listenNotify(t *testing.T) *net.UnixConn {
	t.Helper()
	dir := socketDir(t, "sdn")
	path := filepath.Join(dir, "notify")
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	t.Setenv("NOTIFY_SOCKET", path)
	return c
}

// recvNotify reads one datagram, failing the test if none comes within d.
func recvNotify(t *testing.T, c *net.UnixConn, d time.Duration) string {
	t.Helper()
	msg, err := tryRecvNotify(c, d)
	if err != nil {
		t.Fatalf("no notification within %s: %v", d, err)
	}
	return msg
}

func tryRecvNotify(c *net.UnixConn, d time.Duration) (string, error) {
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

func TestNotifyUnsetIsNoop(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", "")
	t.Setenv("WATCHDOG_USEC", "1000000")
	if err := sdNotify("READY=1"); err != nil {
		t.Errorf("sdNotify without NOTIFY_SOCKET = %v, want nil", err)
	}
	if err := sdStatus("x"); err != nil {
		t.Errorf("sdStatus without NOTIFY_SOCKET = %v, want nil", err)
	}
	if d, err := watchdogInterval(); d != 0 || err != nil {
		t.Errorf("watchdogInterval without NOTIFY_SOCKET = %s, %v; want 0, nil", d, err)
	}
}

func TestNotifyMessages(t *testing.T) {
	c := listenNotify(t)
	steps := []struct {
		name string
		send func() error
		want string
	}{
		{"ready", func() error { return sdNotify("READY=1") }, "READY=1"},
		{"status", func() error { return sdStatus("queue: 3 waiting\nREADY=1") }, "STATUS=queue: 3 waiting READY=1"},
		{"stopping", func() error { return sdNotify("STOPPING=1") }, "STOPPING=1"},
	}
	for _, s := range steps {
		if err := s.send(); err != nil {
			t.Fatalf("%s: %v", s.name, err)
		}
		if got := recvNotify(t, c, 5*time.Second); got != s.want {
			t.Errorf("%s sent %q, want %q", s.name, got, s.want)
		}
	}
}

func TestNotifyAbstractSocket(t *testing.T) {
	name := fmt.Sprintf("@edgegate-sdnotify-test-%d-%d", os.Getpid(), time.Now().UnixNano())
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: name, Net: "unixgram"})
	if err != nil {
		t.Fatalf("abstract unix sockets are a Linux feature the gateway relies on: %v", err)
	}
	defer c.Close()
	t.Setenv("NOTIFY_SOCKET", name)
	if err := sdNotify("READY=1"); err != nil {
		t.Fatal(err)
	}
	if got := recvNotify(t, c, 5*time.Second); got != "READY=1" {
		t.Errorf("got %q, want READY=1", got)
	}
}

func TestNotifyErrorNamesTheMessage(t *testing.T) {
	dir := socketDir(t, "sdn")
	t.Setenv("NOTIFY_SOCKET", filepath.Join(dir, "absent"))
	err := sdStatus("secret-looking status")
	if err == nil || !strings.Contains(err.Error(), "sd_notify STATUS") || strings.Contains(err.Error(), "secret-looking") {
		t.Errorf("sdStatus to a missing socket = %v, want an error naming STATUS without its value", err)
	}
}

func TestWatchdogInterval(t *testing.T) {
	me := strconv.Itoa(os.Getpid())
	tests := []struct {
		name    string
		usec    string
		pid     string
		want    time.Duration
		wantErr bool
	}{
		{"unset", "", "", 0, false},
		{"set", "30000000", "", 30 * time.Second, false},
		{"our pid", "500000", me, 500 * time.Millisecond, false},
		{"another pid", "500000", strconv.Itoa(os.Getpid() + 1), 0, false},
		{"bad pid", "500000", "x", 0, true},
		{"zero", "0", "", 0, true},
		{"negative", "-5", "", 0, true},
		{"garbage", "30s", "", 0, true},
		{"overflow", "9223372036854775807", "", 0, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Setenv("NOTIFY_SOCKET", "/run/systemd/notify")
			t.Setenv("WATCHDOG_USEC", tt.usec)
			t.Setenv("WATCHDOG_PID", tt.pid)
			got, err := watchdogInterval()
			if got != tt.want || (err != nil) != tt.wantErr {
				t.Errorf("watchdogInterval() = %s, %v; want %s, error %v", got, err, tt.want, tt.wantErr)
			}
		})
	}
}

func TestWatchdogArguments(t *testing.T) {
	ok := func() error { return nil }
	if err := watchdog(context.Background(), 0, ok, nil); err == nil {
		t.Error("watchdog(interval 0) = nil, want an error")
	}
	if err := watchdog(context.Background(), time.Second, nil, nil); err == nil {
		t.Error("watchdog(nil health) = nil, want an error")
	}
}

// TestWatchdogStopsPingingWhenUnhealthy is the property the unit relies
// on: keep-alives flow while the health check passes, and none at all
// follow the first failure, so systemd's WatchdogSec= fires.
func TestWatchdogStopsPingingWhenUnhealthy(t *testing.T) {
	c := listenNotify(t)

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
	var logs testkit.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))

	ctx, cancel := context.WithCancel(context.Background())
	var werr error
	finished := make(chan struct{}) // closed when watchdog returned
	go func() {
		defer close(finished)
		werr = watchdog(ctx, interval, healthy, log)
	}()
	defer func() {
		cancel()
		select {
		case <-finished:
		case <-time.After(5 * time.Second):
			t.Error("watchdog did not return after cancel")
		}
	}()

	for i := range 3 {
		if got := recvNotify(t, c, 5*time.Second); got != "WATCHDOG=1" {
			t.Fatalf("keep-alive %d = %q, want WATCHDOG=1", i, got)
		}
	}

	stuck := errors.New("queue committer: 12 appends waiting, no commit for 2m0s")
	failure.Store(&stuck)
	// A ping already past its health check may still arrive; then the
	// status line says why, and after it nothing.
	for {
		got := recvNotify(t, c, 5*time.Second)
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
	if got, err := tryRecvNotify(c, 8*interval/2); err == nil {
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
			t.Errorf("watchdog() = %v after cancel, want nil", werr)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("watchdog did not return within 5s of cancel")
	}
}

func TestWatchdogReturnsOnCancelWhileHealthy(t *testing.T) {
	c := listenNotify(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- watchdog(ctx, time.Hour, func() error { return nil }, nil) }()
	if got := recvNotify(t, c, 5*time.Second); got != "WATCHDOG=1" {
		t.Fatalf("first keep-alive = %q, want WATCHDOG=1 at once", got)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("watchdog() = %v, want nil", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("watchdog did not return within 5s of cancel")
	}
}

// socketDir returns a fresh directory under os.TempDir, removed when the
// test ends. Tests that put unix sockets in it use it rather than
// t.TempDir: a socket path must fit in 108 bytes and test names are long.
func socketDir(t *testing.T, prefix string) string {
	t.Helper()
	dir, err := os.MkdirTemp("", prefix)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// TestDaemonNotifiesSystemd runs the real daemon under a stand-in for a
// Type=notify unit with WatchdogSec=: READY=1 once it is up, keep-alives
// while it is healthy, STOPPING=1 when it stops.
func TestDaemonNotifiesSystemd(t *testing.T) {
	dir := socketDir(t, "eg-wd-")
	c := listenNotify(t)
	t.Setenv("WATCHDOG_USEC", "400000") // pings every 200ms
	t.Setenv("WATCHDOG_PID", strconv.Itoa(os.Getpid()))
	t.Setenv("CREDENTIALS_DIRECTORY", "")

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- New(runConfig(t, dir, "127.0.0.1:0"), slog.New(slog.DiscardHandler)).Run(ctx) }()
	stopped := false
	defer func() {
		if !stopped {
			cancel()
			<-done
		}
	}()

	// In order: READY=1, then keep-alives (status lines may come between).
	var got []string
	for len(got) < 3 {
		msg := recvNotify(t, c, 20*time.Second)
		if strings.HasPrefix(msg, "STATUS=") {
			continue
		}
		got = append(got, msg)
	}
	if want := []string{"READY=1", "WATCHDOG=1", "WATCHDOG=1"}; !slices.Equal(got, want) {
		t.Fatalf("notifications %q, want %q", got, want)
	}
	cancel()
	select {
	case err := <-done:
		stopped = true
		if err != nil {
			t.Fatalf("Run = %v", err)
		}
	case <-time.After(40 * time.Second):
		t.Fatal("the daemon did not stop")
	}
	for {
		msg := recvNotify(t, c, 5*time.Second)
		if msg == "STOPPING=1" {
			break
		}
		if msg != "WATCHDOG=1" && !strings.HasPrefix(msg, "STATUS=") {
			t.Fatalf("while stopping got %q, want STOPPING=1", msg)
		}
	}
	// STOPPING=1 came before the watchdog was stopped, so at most a ping
	// already under way follows it, and then nothing.
	for i := 0; ; i++ {
		msg, err := tryRecvNotify(c, 600*time.Millisecond) // three ping intervals
		if err != nil {
			break
		}
		if msg != "WATCHDOG=1" || i > 0 {
			t.Fatalf("after STOPPING=1 got %q (message %d), want at most one keep-alive", msg, i+1)
		}
	}
}
