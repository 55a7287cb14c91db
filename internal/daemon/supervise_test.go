package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/config"
	"github.com/edgegate/edgegate/internal/testkit"
)

// runConfig writes an embedded-mode configuration with the given
// metrics.listen and loads it.
func runConfig(t *testing.T, dir, metricsListen string) *config.Config {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, "client-secret"), []byte("secret-canary-sup\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	text := fmt.Sprintf(`gateway:
  id: gw-sup
state_dir: state
mqtt:
  mode: embedded
  embedded:
    listen: 127.0.0.1:0
metrics:
  listen: %s
`, metricsListen) + oneDeviceYAML(filepath.Join(dir, "admin.sock"))
	if err := os.WriteFile(filepath.Join(dir, "edgegate.yaml"), []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load(filepath.Join(dir, "edgegate.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

// TestRunStartFailureAndOrderedStop runs the real daemon twice on one
// state directory. First metrics.listen is taken: Run fails naming the
// key, the components after it never start (no admin socket) and the
// store is closed (the second run can open it). Then it starts, says
// ready, and on ctx end stops its components in reverse start order:
// producers first, the queue's committer, the network last.
func TestRunStartFailureAndOrderedStop(t *testing.T) {
	dir := socketDir(t, "eg-sup-")
	t.Setenv("NOTIFY_SOCKET", "")
	t.Setenv("CREDENTIALS_DIRECTORY", "")

	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	var logs testkit.Buffer
	log := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	err = New(runConfig(t, dir, taken.Addr().String()), log).Run(context.Background())
	if err == nil || !strings.Contains(err.Error(), "metrics.listen "+taken.Addr().String()) {
		t.Fatalf("Run with metrics.listen taken = %v, want an error naming metrics.listen", err)
	}
	if _, serr := os.Stat(filepath.Join(dir, "admin.sock")); serr == nil {
		t.Fatal("the admin socket exists: a component after the failed one started")
	}
	if strings.Contains(logs.String(), "edgegate ready") {
		t.Fatal("said ready after a start failure")
	}

	logs = testkit.Buffer{}
	log = slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- New(runConfig(t, dir, "127.0.0.1:0"), log).Run(ctx) }()
	testkit.Eventually(t, 20*time.Second, "edgegate ready", func() bool { return strings.Contains(logs.String(), "edgegate ready") })
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Run after ctx end = %v", err)
		}
	case <-time.After(40 * time.Second):
		t.Fatal("the daemon did not stop")
	}
	var stopped []string
	for _, m := range regexp.MustCompile(`msg="component stopped" component=(\S+)`).FindAllStringSubmatch(logs.String(), -1) {
		stopped = append(stopped, m[1])
	}
	want := []string{"lifecycle", "admin", "mqtt-broker", "queue", "uplink", "metrics", "procs"}
	if !slices.Equal(stopped, want) {
		t.Fatalf("stop order = %q, want %q\n%s", stopped, want, logs.String())
	}
	for _, secret := range []string{"k1-canary", "k2-canary", "secret-canary"} {
		if strings.Contains(logs.String(), secret) {
			t.Errorf("%q reached the log", secret)
		}
	}
}

// oneDeviceYAML is the configuration's tail the daemon tests share: a
// central sign-on that is never reached, the admin socket and device d1
// (with canary keys, which no log may show).
func oneDeviceYAML(adminSocket string) string {
	return fmt.Sprintf(`central:
  token_url: https://127.0.0.1:1/token
  client_id: gw
  client_secret_file: client-secret
admin:
  socket: %s
devices:
  - id: d1
    type: TemperatureSensor
    owner: alice
    k1: k1-canary-d1
    k2: k2-canary-d1
    broker: https://127.0.0.1:1/filter
`, adminSocket)
}
