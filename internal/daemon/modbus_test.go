package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/admin"
	"github.com/edgegate/edgegate/internal/config"
	"github.com/edgegate/edgegate/internal/sim/radiosim"
	"github.com/edgegate/edgegate/internal/testkit"
)

// TestModbusReadingsThroughTheDaemon runs the real daemon with a Modbus
// line (radio.modbus) on a simulated slave: the polled registers become
// readings of device d1, taken in by the pipeline (status counts them as
// ingested, none refused).
func TestModbusReadingsThroughTheDaemon(t *testing.T) {
	dir, err := os.MkdirTemp("", "eg-mb-") // short: unix socket paths
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	t.Setenv("NOTIFY_SOCKET", "")
	t.Setenv("CREDENTIALS_DIRECTORY", "")
	sim, err := radiosim.NewModbus(radiosim.ModbusOptions{Link: filepath.Join(dir, "ttyRS485")})
	if err != nil {
		t.Fatal(err)
	}
	simCtx, simCancel := context.WithCancel(context.Background())
	simDone := make(chan struct{})
	go func() { sim.Run(simCtx); close(simDone) }()
	defer func() { simCancel(); <-simDone }()
	sim.Unit(5).SetInput(0, 215)
	sim.Unit(5).SetCoils(0, false)

	if err := os.WriteFile(filepath.Join(dir, "client-secret"), []byte("secret-canary-mb\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	text := fmt.Sprintf(`gateway:
  id: gw-mb
state_dir: state
mqtt:
  mode: embedded
  embedded:
    listen: 127.0.0.1:0
metrics:
  listen: ""
commands:
  enabled: true
radio:
  modbus:
    - path: %s
      devices:
        - device: d1
          unit: 5
          period: 100ms
          registers:
            - {attribute: temperature, function: input, address: 0, type: int16, scale: 0.1, unit: °C}
            - {attribute: heater, function: coil, address: 0, writable: true}
`, sim.Link()) + oneDeviceYAML(filepath.Join(dir, "admin.sock"))
	if err := os.WriteFile(filepath.Join(dir, "edgegate.yaml"), []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load(filepath.Join(dir, "edgegate.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var logs testkit.Buffer
	d := New(cfg, slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug})))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()
	defer func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run = %v", err)
			}
		case <-time.After(40 * time.Second):
			t.Error("the daemon did not stop")
		}
		for _, secret := range []string{"k1-canary", "k2-canary", "secret-canary"} {
			if strings.Contains(logs.String(), secret) {
				t.Errorf("%q reached the log", secret)
			}
		}
	}()
	ac := admin.NewClient(cfg.Admin.Socket)
	defer ac.CloseIdle()
	var st admin.Status
	if !testkit.Poll(20*time.Second, func() bool {
		st, err = ac.Status(context.Background())
		return err == nil && len(st.Devices) == 1 && st.Devices[0].Ingested >= 2
	}) {
		t.Fatalf("no Modbus readings of d1 taken in: %+v %v\n%s", st.Devices, err, logs.String())
	}
	if st.Devices[0].Refused != 0 {
		t.Errorf("d1 readings refused: %+v", st.Devices[0])
	}
	// Status shows the slave (polls, no errors) and the downlink.
	if len(st.Modbus) != 1 || st.Modbus[0].Device != "d1" || st.Modbus[0].Line != sim.Link() || st.Modbus[0].Unit != 5 ||
		st.Modbus[0].Polls < 2 || st.Modbus[0].LastOK.IsZero() || len(st.Modbus[0].Errors) != 0 {
		t.Errorf("status Modbus = %+v", st.Modbus)
	}
	if !st.Commands.Enabled || st.Commands.Pending+st.Commands.Sent != 0 || st.Commands.Error != "" {
		t.Errorf("status Commands = %+v", st.Commands)
	}
	var out strings.Builder
	if err := admin.WriteStatus(&out, st); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"Commands  on: 0 pending, 0 sent", "Modbus (1)", sim.Link() + "/5"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("status lacks %q:\n%s", want, out.String())
		}
	}
}
