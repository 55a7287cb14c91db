package daemon

import (
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/edgegate/edgegate/internal/config"
)

// TestOpenFailureNamesStepAndCloses: a start-up that fails says at which
// step, and closes what the steps before it opened: the next start on the
// same state directory opens the store (badger holds a directory lock
// while open).
func TestOpenFailureNamesStepAndCloses(t *testing.T) {
	dir := socketDir(t, "eg-open-")
	t.Setenv("CREDENTIALS_DIRECTORY", "")
	garbage := filepath.Join(dir, "garbage.pem")
	if err := os.WriteFile(garbage, []byte("not a PEM file\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	good := runConfig(t, dir, "")
	open := func(mutate func(*config.Config)) (*state, error) {
		cfg := *good
		mutate(&cfg)
		return New(&cfg, slog.New(slog.DiscardHandler)).open(func() {})
	}

	for _, tt := range []struct {
		name   string
		mutate func(*config.Config)
		want   string
	}{
		{"credentials", func(c *config.Config) { c.Uplink.CAFile = garbage }, "start-up step credentials: load uplink.ca_file"},
		{"ingest", func(c *config.Config) {
			c.MQTT.Embedded.TLSListen = "127.0.0.1:0"
			c.MQTT.Embedded.CertFile, c.MQTT.Embedded.KeyFile = garbage, garbage
		}, "start-up step ingest: "},
	} {
		t.Run(tt.name, func(t *testing.T) {
			st, err := open(tt.mutate)
			if err == nil {
				st.close(slog.New(slog.DiscardHandler), good.StateDir)
				t.Fatalf("open succeeded, want an error containing %q", tt.want)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("open = %v, want an error containing %q", err, tt.want)
			}
			// The store opened by an earlier step was closed.
			st, err = open(func(*config.Config) {})
			if err != nil {
				t.Fatalf("open after the failed one = %v; the store was left open?", err)
			}
			st.close(slog.New(slog.DiscardHandler), good.StateDir)
		})
	}
}
