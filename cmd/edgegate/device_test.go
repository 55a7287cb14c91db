package main

import (
	"context"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/edgegate/edgegate/internal/admin"
	"github.com/edgegate/edgegate/internal/daemon"
	"github.com/edgegate/edgegate/internal/sim/centralsim"
)

// socketBackend serves DeviceAdmin on an admin socket, as the daemon does;
// the rest of the admin API is not needed here.
type socketBackend struct{ *daemon.DeviceAdmin }

func (socketBackend) Status(context.Context) admin.Status { return admin.Status{} }
func (socketBackend) Export(context.Context, admin.Selector, io.Writer) (admin.ExportReport, error) {
	return admin.ExportReport{}, nil
}
func (socketBackend) Erase(context.Context, admin.Selector) (admin.EraseReport, error) {
	return admin.EraseReport{}, nil
}
func (socketBackend) FactoryReset(context.Context) error { return nil }
func (socketBackend) Reload(context.Context) error       { return nil }

// TestDeviceCommandsWhileDaemonRuns: with the store held by a running
// daemon, device add|list|bind|remove go through its admin socket (found
// next to the state directory), the registry is written and the policy
// sync nudged; the keys go to --keys-out only. The platform is stock:
// device.php (nodered=yes) with the paired nodered-iotedge token.
func TestDeviceCommandsWhileDaemonRuns(t *testing.T) {
	f := newPairFixture(t, stockPlatform, centralsim.PairingOptions{})
	ctx := context.Background()
	if res := f.runPair(t, ctx, func(code string) { _ = f.sim.ApproveDevice(code, "alice") }); res.err != nil {
		t.Fatalf("pair: %v\n%s", res.err, res.out)
	}
	// The "daemon": the store open (and locked), DeviceAdmin on the socket.
	q, err := openStore(f.env, storeFlags{stateDir: f.stateDir, credential: "store-key"})
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	da, err := directDeviceAdmin(q, f.caFile, false)
	if err != nil {
		t.Fatal(err)
	}
	var nudges atomic.Int32
	da.Nudge = func() { nudges.Add(1) }
	srv, err := admin.Listen(admin.ServerOptions{Socket: filepath.Join(f.stateDir, "admin.sock"), Backend: socketBackend{da}})
	if err != nil {
		t.Fatal(err)
	}
	sctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- srv.Run(sctx) }()
	stopped := false
	stop := func() {
		if !stopped {
			stopped = true
			cancel()
			<-done
		}
	}
	defer stop()

	run := func(args ...string) string {
		t.Helper()
		var out, errOut lockedBuffer
		if err := deviceWith(ctx, f.env, append([]string{args[0], "--config", f.cfgPath}, args[1:]...), &out, &errOut); err != nil {
			t.Fatalf("device %v: %v\n%s", args, err, errOut.String())
		}
		return out.String()
	}
	keys := filepath.Join(f.dir, "th-9.keys")
	out := run("add", "--type", "Thermometer", "--mqtt", "--attr", "temperature:float:temperature:°C", "--keys-out", keys, "th-9")
	for _, want := range []string{"Registered device th-9 (type Thermometer) at orion-1 for alice", "the local MQTT link",
		"synced its policy now"} {
		if !strings.Contains(out, want) {
			t.Errorf("add output lacks %q:\n%s", want, out)
		}
	}
	if st, err := os.Stat(keys); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("keys-out: %v", err)
	}
	kb, _ := os.ReadFile(keys)
	k1, _, _ := strings.Cut(strings.SplitN(string(kb), "k1: ", 2)[1], "\n")
	if strings.Contains(out, k1) {
		t.Error("add printed K1")
	}
	if e, ok, _ := da.Registry.Get("th-9"); !ok || e.Type != "Thermometer" || !e.MQTT || nudges.Load() != 1 {
		t.Errorf("registry %v %+v, nudges %d", ok, e, nudges.Load())
	}
	if rows := f.sim.OwnershipRows("alice"); len(rows) != 1 || rows[0].ElementID != f.sim.ElementID("th-9") {
		t.Errorf("ownership rows = %+v", rows)
	}

	// bind a delegated device, with the installer's keys.
	kf := filepath.Join(f.dir, "shared.keys")
	if err := os.WriteFile(kf, []byte("k1: aaaa-canary\nk2: bbbb-canary\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	out = run("bind", "--type", "Meter", "--radio-port", "/dev/ttyUSB0", "--radio-node", "7", "--k1-file", kf, "shared-1")
	if !strings.Contains(out, "Bound device shared-1 (type Meter)") || strings.Contains(out, "canary") {
		t.Errorf("bind output:\n%s", out)
	}
	if reg, ok := da.Registry.Lookup("shared-1"); !ok || reg.K1 != "aaaa-canary" || reg.Radio == nil || reg.Radio.Node != 7 {
		t.Errorf("registry after bind: %v", ok)
	}

	out = run("list")
	if !strings.Contains(out, "th-9") || !strings.Contains(out, "owned") || !strings.Contains(out, "shared-1") || strings.Contains(out, "canary") {
		t.Errorf("list output:\n%s", out)
	}
	run("remove", "th-9")
	if _, ok, _ := da.Registry.Get("th-9"); ok {
		t.Error("remove left the registry entry")
	}
	if out := run("list"); strings.Contains(out, "th-9") {
		t.Errorf("th-9 still listed after remove:\n%s", out)
	}

	// The store held, no socket answering: a clear error, not a hang.
	stop()
	var o, e lockedBuffer
	err = deviceWith(ctx, f.env, []string{"list", "--config", f.cfgPath}, &o, &e)
	if err == nil || !strings.Contains(err.Error(), "admin socket did not answer") || !strings.Contains(err.Error(), "--socket") {
		t.Errorf("list with the store held and no socket: %v", err)
	}
}

func TestDeviceAttrFlag(t *testing.T) {
	for _, tt := range []struct {
		in   string
		want admin.DeviceAttr
		err  string
	}{
		{in: "temperature:float", want: admin.DeviceAttr{Name: "temperature", DataType: "float", ValueType: "temperature", Unit: "-", Healthiness: "refresh_rate", HealthinessValue: "1200"}},
		{in: "t:float:temperature:°C:refresh_rate=60", want: admin.DeviceAttr{Name: "t", DataType: "float", ValueType: "temperature", Unit: "°C", Healthiness: "refresh_rate", HealthinessValue: "60"}},
		{in: "h:integer:humidity:%:different_values", want: admin.DeviceAttr{Name: "h", DataType: "integer", ValueType: "humidity", Unit: "%", Healthiness: "different_values"}},
		{in: "t", err: "want NAME:DATA_TYPE"},
		{in: "t emp:float", err: "byte 1"},
		{in: "t:float:x:y:often", err: "healthiness"},
		{in: "t:float:x:y:refresh_rate=-1", err: "seconds"},
	} {
		var a attrFlag
		err := a.Set(tt.in)
		if tt.err != "" {
			if err == nil || !strings.Contains(err.Error(), tt.err) {
				t.Errorf("Set(%q) = %v, want an error mentioning %q", tt.in, err, tt.err)
			}
			continue
		}
		if err != nil {
			t.Errorf("Set(%q) = %v", tt.in, err)
			continue
		}
		if got := withDefaults(a, 600)[0]; got != tt.want {
			t.Errorf("Set(%q) = %+v, want %+v", tt.in, got, tt.want)
		}
	}
}
