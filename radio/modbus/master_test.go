package modbus_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"math"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/metrics"
	"github.com/edgegate/edgegate/internal/pipeline"
	"github.com/edgegate/edgegate/internal/sim/radiosim"
	"github.com/edgegate/edgegate/internal/testkit"
	"github.com/edgegate/edgegate/radio/modbus"
)

// recorder is the pipeline as the master sees it: it takes every message
// and keeps it with its arrival time.
type recorder struct {
	mu   sync.Mutex
	msgs []got
}

type got struct {
	at  time.Time
	msg pipeline.Message
}

func (r *recorder) Submit(_ context.Context, msg pipeline.Message) (pipeline.Outcome, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.msgs = append(r.msgs, got{time.Now(), msg})
	return pipeline.Queued, nil
}

func (r *recorder) of(device string) []got {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []got
	for _, g := range r.msgs {
		if g.msg.Device == device {
			out = append(out, g)
		}
	}
	return out
}

// attrs decodes a reading's NGSI-like payload.
func attrs(t *testing.T, msg pipeline.Message) map[string]any {
	t.Helper()
	var m map[string]struct {
		Value any    `json:"value"`
		Type  string `json:"type"`
	}
	if err := json.Unmarshal(msg.Payload, &m); err != nil {
		t.Fatalf("payload %s: %v", msg.Payload, err)
	}
	out := map[string]any{}
	for k, v := range m {
		out[k] = v.Value
	}
	return out
}

func startSim(t *testing.T) *radiosim.ModbusSim {
	t.Helper()
	sim, err := radiosim.NewModbus(radiosim.ModbusOptions{Link: filepath.Join(t.TempDir(), "ttyRS485")})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { sim.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return sim
}

func startMaster(t *testing.T, lines []modbus.LineConfig, sub modbus.Submitter, m *metrics.Metrics, tune ...func(*modbus.Options)) *modbus.Master {
	t.Helper()
	var logs testkit.Buffer
	opts := modbus.Options{Metrics: m, Logger: slog.New(slog.NewTextHandler(&logs, nil)),
		MinBackoff: 20 * time.Millisecond, MaxBackoff: 100 * time.Millisecond}
	for _, f := range tune {
		f(&opts)
	}
	ms, err := modbus.New(lines, sub, opts)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- ms.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run = %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Error("Run did not return within 5s of cancel")
		}
		// Every goroutine of the master (bus, submitter, port close) ends
		// with Run. Counted by their frames, not by runtime.NumGoroutine:
		// a real queue in the same test starts and stops its own.
		var stacks string
		if !testkit.Poll(3*time.Second, func() bool {
			buf := make([]byte, 1<<20)
			stacks = string(buf[:runtime.Stack(buf, true)])
			return !strings.Contains(stacks, "edgegate/radio/modbus.")
		}) {
			t.Errorf("goroutines of the master outlive Run:\n%s", stacks)
		}
	})
	return ms
}

func split32(u uint32) (uint16, uint16) { return uint16(u >> 16), uint16(u) }

func TestPollEveryType(t *testing.T) {
	sim := startSim(t)
	u := sim.Unit(7)
	// An energy meter's map, every type and word order.
	u.SetHolding(0, 0xFF38)                   // int16 -200 → ×0.1 = -20
	u.SetHolding(1, 2305)                     // uint16 ×0.1 = 230.5 V
	hi, lo := split32(uint32(0xFFFFFF9C))     // int32 -100
	u.SetHolding(2, hi, lo)                   // big
	hi, lo = split32(123456789)               // uint32
	u.SetHolding(4, lo, hi)                   // little
	hi, lo = split32(math.Float32bits(49.95)) // float32
	u.SetInput(10, hi, lo)                    // big
	hi, lo = split32(math.Float32bits(1.5))   // float32 little, scale 1000 → 1500
	u.SetInput(12, lo, hi)                    //
	u.SetInput(20, 100)                       // uint16 with offset -40 → 60
	u.SetCoils(0, true, false)                //
	u.SetDiscrete(5, true)                    //
	regs := []modbus.Register{
		{Attr: "a_int16", Table: modbus.TableHolding, Addr: 0, Type: modbus.TypeInt16, Scale: 0.1},
		{Attr: "voltage", Table: modbus.TableHolding, Addr: 1, Type: modbus.TypeUint16, Scale: 0.1, Unit: "V"},
		{Attr: "a_int32", Table: modbus.TableHolding, Addr: 2, Type: modbus.TypeInt32},
		{Attr: "energy", Table: modbus.TableHolding, Addr: 4, Type: modbus.TypeUint32, Words: modbus.WordLittle},
		{Attr: "frequency", Table: modbus.TableInput, Addr: 10, Type: modbus.TypeFloat32},
		{Attr: "power", Table: modbus.TableInput, Addr: 12, Type: modbus.TypeFloat32, Words: modbus.WordLittle, Scale: 1000},
		{Attr: "temp", Table: modbus.TableInput, Addr: 20, Type: modbus.TypeUint16, Offset: -40},
		{Attr: "relay", Table: modbus.TableCoil, Addr: 0},
		{Attr: "relay2", Table: modbus.TableCoil, Addr: 1},
		{Attr: "door", Table: modbus.TableDiscrete, Addr: 5},
	}
	rec := &recorder{}
	startMaster(t, []modbus.LineConfig{{Path: sim.Link(), Baud: 9600, Parity: modbus.ParityNone, Timeout: 300 * time.Millisecond,
		Devices: []modbus.DeviceConfig{{Device: "meter-1", Unit: 7, Period: 50 * time.Millisecond, Registers: regs}}}}, rec, nil)
	testkit.Eventually(t, 5*time.Second, "a reading of meter-1", func() bool { return len(rec.of("meter-1")) > 0 })
	g := rec.of("meter-1")[0]
	if g.msg.Source.Kind != "modbus" || g.msg.Source.Port != sim.Link() || g.msg.Source.Node != "7" {
		t.Errorf("source = %+v, want modbus %s unit 7", g.msg.Source, sim.Link())
	}
	want := map[string]any{"a_int16": -20.0, "voltage": 230.5, "a_int32": -100.0, "energy": 123456789.0,
		"frequency": 49.95, "power": 1500.0, "temp": 60.0, "relay": true, "relay2": false, "door": true}
	have := attrs(t, g.msg)
	for k, w := range want {
		hv := have[k]
		if hv != w { // exact: 230.5, not 230.50000000000003
			t.Errorf("%s = %v, want %v", k, hv, w)
		}
	}
	if len(have) != len(want) {
		t.Errorf("attributes %v, want exactly %v", have, want)
	}
	// One request per contiguous run: holding 0..5, input 10..13, input
	// 20, coils 0..1, discrete 5 = 5 requests a poll.
	st := sim.Stats()
	if n, polls := st.Requests[7], len(rec.of("meter-1")); n > 5*(polls+1) {
		t.Errorf("%d requests for %d polls: the register map is not read in blocks", n, polls)
	}
}

// A silent slave (powered off, miswired) listed first and due all the
// time must not starve the others: round-robin gives each due slave its
// turn, so a good slave waits at most its period plus one timeout of the
// silent one (and a poll of each other good one) between two readings.
func TestFairUnderSilentSlave(t *testing.T) {
	for _, n := range []int{2, 3} {
		t.Run(map[int]string{2: "two slaves", 3: "three slaves"}[n], func(t *testing.T) {
			sim := startSim(t)
			const timeout = 150 * time.Millisecond
			const period = 50 * time.Millisecond
			devs := []modbus.DeviceConfig{{Device: "dead", Unit: 1, Period: time.Millisecond, Timeout: timeout,
				Registers: []modbus.Register{{Attr: "x", Table: modbus.TableHolding, Addr: 0, Type: modbus.TypeUint16}}}}
			sim.Unit(1).SetHolding(0, 1)
			sim.Unit(1).SetSilent(true)
			var good []string
			for i := 2; i <= n; i++ {
				id := "good-" + string(rune('0'+i))
				good = append(good, id)
				sim.Unit(i).SetHolding(0, uint16(i))
				devs = append(devs, modbus.DeviceConfig{Device: id, Unit: i, Period: period, Timeout: timeout,
					Registers: []modbus.Register{{Attr: "x", Table: modbus.TableHolding, Addr: 0, Type: modbus.TypeUint16}}})
			}
			rec := &recorder{}
			m := metrics.New()
			// The silent slave's backoff off: round-robin alone must hold.
			ms := startMaster(t, []modbus.LineConfig{{Path: sim.Link(), Baud: 19200, Devices: devs}}, rec, m,
				func(o *modbus.Options) { o.MaxSilentBackoff = -1 })
			run := 2 * time.Second
			testkit.Eventually(t, 10*time.Second, "readings of every good slave over "+run.String(), func() bool {
				for _, id := range good {
					g := rec.of(id)
					if len(g) < 2 || g[len(g)-1].at.Sub(g[0].at) < run {
						return false
					}
				}
				return true
			})
			// Bound of one round: the silent slave's timeout (plus a tty
			// read step of 100 ms), each good slave's poll, the period.
			bound := period + timeout + 100*time.Millisecond + time.Duration(n)*30*time.Millisecond + 150*time.Millisecond
			for _, id := range good {
				g := rec.of(id)
				var worst time.Duration
				for i := 1; i < len(g); i++ {
					worst = max(worst, g[i].at.Sub(g[i-1].at))
				}
				if worst > bound {
					t.Errorf("%s: longest wait between readings %s, want ≤ %s (starved by the silent slave)", id, worst, bound)
				}
				if min := int(run / bound); len(g) < min {
					t.Errorf("%s: %d readings in %s, want ≥ %d", id, len(g), run, min)
				}
				if v := attrs(t, g[0].msg)["x"]; v != float64(g[0].msg.Source.Node[0]-'0') {
					t.Errorf("%s read %v: answers crossed between slaves", id, v)
				}
			}
			dead := statusOf(t, ms, "dead")
			if dead.Errors[modbus.CauseTimeout] < 5 || dead.Polls != 0 {
				t.Errorf("dead slave status = %+v, want timeouts counted and no polls", dead)
			}
			if v := mustCounter(t, m, "dead", modbus.CauseTimeout); v == 0 {
				t.Error("edgegate_modbus_errors_total{device=dead,cause=timeout} = 0")
			}
		})
	}
}

func statusOf(t *testing.T, ms *modbus.Master, device string) modbus.DeviceStatus {
	t.Helper()
	i := slices.IndexFunc(ms.Status(), func(s modbus.DeviceStatus) bool { return s.Device == device })
	if i < 0 {
		t.Fatalf("no status for %s", device)
	}
	return ms.Status()[i]
}

// mustCounter finds edgegate_modbus_errors_total{device,cause} on the
// registry as a scrape would.
func mustCounter(t *testing.T, m *metrics.Metrics, device, cause string) float64 {
	t.Helper()
	mfs, err := m.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "edgegate_modbus_errors_total" {
			continue
		}
		for _, mt := range mf.GetMetric() {
			labels := map[string]string{}
			for _, l := range mt.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			if labels["device"] == device && labels["cause"] == cause {
				return mt.GetCounter().GetValue()
			}
		}
	}
	return 0
}

func TestCRCErrorCounted(t *testing.T) {
	sim := startSim(t)
	u := sim.Unit(3)
	u.SetInput(0, 215)
	u.SetCorruptCRC(true)
	rec := &recorder{}
	m := metrics.New()
	ms := startMaster(t, []modbus.LineConfig{{Path: sim.Link(), Devices: []modbus.DeviceConfig{{Device: "th-1", Unit: 3,
		Period: 20 * time.Millisecond, Registers: []modbus.Register{{Attr: "temperature", Table: modbus.TableInput, Type: modbus.TypeInt16, Scale: 0.1}}}}}}, rec, m)
	testkit.Eventually(t, 5*time.Second, "CRC errors counted", func() bool { return statusOf(t, ms, "th-1").Errors[modbus.CauseCRC] >= 3 })
	if n := len(rec.of("th-1")); n != 0 {
		t.Fatalf("%d readings from answers with a bad CRC, want 0", n)
	}
	if v := mustCounter(t, m, "th-1", modbus.CauseCRC); v < 3 {
		t.Errorf("edgegate_modbus_errors_total{cause=crc} = %v, want ≥ 3", v)
	}
	u.SetCorruptCRC(false)
	testkit.Eventually(t, 5*time.Second, "readings once the line is clean", func() bool { return len(rec.of("th-1")) > 0 })
	if v := attrs(t, rec.of("th-1")[0].msg)["temperature"]; v != 21.5 {
		t.Errorf("temperature = %v, want 21.5", v)
	}
}

// An exception for one block is counted and skips that block only: the
// rest of the map still makes a reading.
func TestExceptionCounted(t *testing.T) {
	sim := startSim(t)
	u := sim.Unit(4)
	u.SetHolding(0, 42)
	rec := &recorder{}
	m := metrics.New()
	ms := startMaster(t, []modbus.LineConfig{{Path: sim.Link(), Devices: []modbus.DeviceConfig{{Device: "plc", Unit: 4,
		Period: 20 * time.Millisecond, Registers: []modbus.Register{
			{Attr: "level", Table: modbus.TableHolding, Addr: 0, Type: modbus.TypeUint16},
			{Attr: "missing", Table: modbus.TableHolding, Addr: 300, Type: modbus.TypeUint16},
		}}}}}, rec, m)
	testkit.Eventually(t, 5*time.Second, "an exception counted and a partial reading", func() bool {
		return statusOf(t, ms, "plc").Errors[modbus.CauseException] > 0 && len(rec.of("plc")) > 0
	})
	a := attrs(t, rec.of("plc")[0].msg)
	if a["level"] != 42.0 || a["missing"] != nil {
		t.Errorf("reading = %v, want level 42 and no missing", a)
	}
	if st := statusOf(t, ms, "plc"); !strings.Contains(st.LastError, "illegal data address") {
		t.Errorf("last error = %q, want the exception named", st.LastError)
	}
	if v := mustCounter(t, m, "plc", modbus.CauseException); v == 0 {
		t.Error("edgegate_modbus_errors_total{cause=exception} = 0")
	}
}

func TestWriteAttr(t *testing.T) {
	sim := startSim(t)
	u := sim.Unit(9)
	u.SetCoils(0, false)
	u.SetHolding(100, 0)
	u.SetHolding(200, 0, 0)
	u.SetInput(0, 5)
	rec := &recorder{}
	ms := startMaster(t, []modbus.LineConfig{{Path: sim.Link(), Devices: []modbus.DeviceConfig{{Device: "valve", Unit: 9,
		Period: time.Hour, Registers: []modbus.Register{
			{Attr: "open", Table: modbus.TableCoil, Addr: 0, Writable: true},
			{Attr: "setpoint", Table: modbus.TableHolding, Addr: 100, Type: modbus.TypeInt16, Scale: 0.5, Writable: true},
			{Attr: "flow", Table: modbus.TableHolding, Addr: 200, Type: modbus.TypeFloat32, Words: modbus.WordLittle, Writable: true},
			{Attr: "pressure", Table: modbus.TableInput, Addr: 0, Type: modbus.TypeUint16},
		}}}}}, rec, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()

	v, err := ms.WriteAttr(ctx, "valve", "open", true)
	if err != nil || v != true {
		t.Fatalf("WriteAttr(open, true) = %v, %v; want true", v, err)
	}
	if !u.Coil(0) {
		t.Error("the slave's coil 0 is still off")
	}
	if v, err := ms.WriteAttr(ctx, "valve", "open", "off"); err != nil || v != false || u.Coil(0) {
		t.Errorf("WriteAttr(open, off) = %v, %v (coil %v); want false", v, err, u.Coil(0))
	}
	v, err = ms.WriteAttr(ctx, "valve", "setpoint", -12.5)
	if err != nil || v != -12.5 {
		t.Fatalf("WriteAttr(setpoint, -12.5) = %v, %v; want -12.5", v, err)
	}
	if got := int16(u.Holding(100)); got != -25 {
		t.Errorf("holding 100 = %d, want -25 (value/scale)", got)
	}
	v, err = ms.WriteAttr(ctx, "valve", "flow", json.Number("3.25"))
	if err != nil || v != 3.25 {
		t.Fatalf("WriteAttr(flow, 3.25) = %v, %v; want 3.25", v, err)
	}
	if bits := uint32(u.Holding(201))<<16 | uint32(u.Holding(200)); math.Float32frombits(bits) != 3.25 {
		t.Errorf("holding 200..201 (little word order) = %#x, want float32 3.25", bits)
	}
	if n := sim.Stats().Writes[9]; n != 4 {
		t.Errorf("slave applied %d writes, want 4", n)
	}
	for _, tt := range []struct {
		dev, attr string
		val       any
		want      error
	}{
		{"valve", "pressure", 1, modbus.ErrNotWritable},
		{"valve", "nope", 1, modbus.ErrUnknownAttr},
		{"pump", "open", true, modbus.ErrUnknownDevice},
	} {
		if _, err := ms.WriteAttr(ctx, tt.dev, tt.attr, tt.val); !errors.Is(err, tt.want) {
			t.Errorf("WriteAttr(%s, %s) = %v, want %v", tt.dev, tt.attr, err, tt.want)
		}
	}
	for _, bad := range []any{100000.0, "hot", []int{1}} {
		if _, err := ms.WriteAttr(ctx, "valve", "setpoint", bad); err == nil || !strings.Contains(err.Error(), "setpoint") {
			t.Errorf("WriteAttr(setpoint, %v) = %v, want an error naming the attribute", bad, err)
		}
	}
	if _, err := ms.WriteAttr(ctx, "valve", "open", 2); err == nil {
		t.Error("WriteAttr(open, 2) succeeded; a coil is 0 or 1")
	}
	if n := sim.Stats().Writes[9]; n != 4 {
		t.Errorf("refused writes reached the slave: %d writes, want 4", n)
	}

	// A slave that does not answer: the write fails with a timeout.
	u.SetSilent(true)
	if _, err := ms.WriteAttr(ctx, "valve", "open", true); !errors.Is(err, modbus.ErrTimeout) {
		t.Errorf("WriteAttr to a silent slave = %v, want ErrTimeout", err)
	}
}

func TestNewRejects(t *testing.T) {
	reg := []modbus.Register{{Attr: "x", Table: modbus.TableHolding, Type: modbus.TypeUint16}}
	tests := []struct {
		name  string
		lines []modbus.LineConfig
		want  string
	}{
		{"bad type", []modbus.LineConfig{{Path: "/dev/x", Devices: []modbus.DeviceConfig{{Device: "d", Unit: 1,
			Registers: []modbus.Register{{Attr: "x", Table: modbus.TableHolding, Type: "float64"}}}}}},
			`type: "float64" is not one of int16, uint16, int32, uint32, float32`},
		{"bad unit", []modbus.LineConfig{{Path: "/dev/x", Devices: []modbus.DeviceConfig{{Device: "d", Unit: 248, Registers: reg}}}}, "unit 248"},
		{"unit twice", []modbus.LineConfig{{Path: "/dev/x", Devices: []modbus.DeviceConfig{{Device: "d", Unit: 1, Registers: reg},
			{Device: "e", Unit: 1, Registers: reg}}}}, "unit 1 is used twice"},
		{"device twice", []modbus.LineConfig{{Path: "/dev/x", Devices: []modbus.DeviceConfig{{Device: "d", Unit: 1, Registers: reg}}},
			{Path: "/dev/y", Devices: []modbus.DeviceConfig{{Device: "d", Unit: 1, Registers: reg}}}}, `"d" is listed twice`},
		{"writable input", []modbus.LineConfig{{Path: "/dev/x", Devices: []modbus.DeviceConfig{{Device: "d", Unit: 1,
			Registers: []modbus.Register{{Attr: "x", Table: modbus.TableInput, Type: modbus.TypeUint16, Writable: true}}}}}}, "writable"},
		{"parity", []modbus.LineConfig{{Path: "/dev/x", Parity: "mark"}}, "parity"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := modbus.New(tt.lines, &recorder{}, modbus.Options{})
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("New = %v, want an error containing %q", err, tt.want)
			}
		})
	}
}

// A line whose adapter is missing is retried; writes meanwhile fail at
// once with ErrLineDown instead of hanging.
func TestLineDown(t *testing.T) {
	link := filepath.Join(t.TempDir(), "ttyGone")
	ms := startMaster(t, []modbus.LineConfig{{Path: link, Devices: []modbus.DeviceConfig{{Device: "d", Unit: 1,
		Registers: []modbus.Register{{Attr: "x", Table: modbus.TableCoil, Writable: true}}}}}}, &recorder{}, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := ms.WriteAttr(ctx, "d", "x", true); !errors.Is(err, modbus.ErrLineDown) {
		t.Errorf("WriteAttr on a missing line = %v, want ErrLineDown", err)
	}
}

// An adapter unplugged while polling (the pty closed, its link gone) and
// plugged back at the same path: the line is reopened and the readings
// resume, without a restart.
func TestLineReplug(t *testing.T) {
	link := filepath.Join(t.TempDir(), "ttyRS485")
	plug := func() (stop func()) {
		sim, err := radiosim.NewModbus(radiosim.ModbusOptions{Link: link})
		if err != nil {
			t.Fatal(err)
		}
		sim.Unit(1).SetHolding(0, 7)
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { sim.Run(ctx); close(done) }()
		return func() { cancel(); <-done }
	}
	unplug := plug()
	rec := &recorder{}
	ms := startMaster(t, []modbus.LineConfig{{Path: link, Devices: []modbus.DeviceConfig{{Device: "d", Unit: 1,
		Period: 20 * time.Millisecond, Timeout: 100 * time.Millisecond,
		Registers: []modbus.Register{{Attr: "x", Table: modbus.TableHolding, Type: modbus.TypeUint16}}}}}}, rec, nil)
	testkit.Eventually(t, 5*time.Second, "readings before the unplug", func() bool { return len(rec.of("d")) > 0 })
	unplug()
	before := len(rec.of("d"))
	testkit.Eventually(t, 5*time.Second, "the unplug noticed", func() bool { return statusOf(t, ms, "d").Errors[modbus.CauseIO] > 0 })
	unplug = plug()
	defer unplug()
	testkit.Eventually(t, 10*time.Second, "readings after the replug", func() bool { return len(rec.of("d")) > before+2 })
}

// BenchmarkPoll measures one whole poll over a pseudo-terminal: request,
// the simulated slave's answer, decoding and the reading handed on. At
// 115200 baud the 1.75 ms inter-frame silence the master keeps before
// each request bounds it from below.
func BenchmarkPoll(b *testing.B) {
	sim, err := radiosim.NewModbus(radiosim.ModbusOptions{Link: filepath.Join(b.TempDir(), "ttyRS485")})
	if err != nil {
		b.Fatal(err)
	}
	sctx, scancel := context.WithCancel(context.Background())
	sdone := make(chan struct{})
	go func() { sim.Run(sctx); close(sdone) }()
	defer func() { scancel(); <-sdone }()
	sim.Unit(1).SetInput(0, make([]uint16, 14)...)
	rec := &recorder{}
	ms, err := modbus.New([]modbus.LineConfig{{Path: sim.Link(), Baud: 115200, Devices: []modbus.DeviceConfig{{Device: "m", Unit: 1,
		Period: time.Millisecond, Registers: []modbus.Register{
			{Attr: "a", Table: modbus.TableInput, Addr: 0, Type: modbus.TypeFloat32},
			{Attr: "b", Table: modbus.TableInput, Addr: 12, Type: modbus.TypeFloat32},
		}}}}}, rec, modbus.Options{})
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { ms.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()
	testkit.Eventually(b, 5*time.Second, "a first poll", func() bool { return len(rec.of("m")) > 0 })
	b.ResetTimer()
	start := len(rec.of("m"))
	if !testkit.Poll(time.Minute, func() bool { return len(rec.of("m")) >= start+b.N }) {
		b.Fatalf("%d polls in a minute, want %d", len(rec.of("m"))-start, b.N)
	}
}

// A command whose caller stopped waiting while it queued behind a slow
// poll never reaches the device; the next one does.
func TestWriteGivenUpIsNotSent(t *testing.T) {
	sim := startSim(t)
	u := sim.Unit(2)
	u.SetCoils(0, false, false)
	u.SetHolding(0, 1)
	u.SetDelay(150 * time.Millisecond) // every answer takes 150 ms
	ms := startMaster(t, []modbus.LineConfig{{Path: sim.Link(), Devices: []modbus.DeviceConfig{{Device: "relay", Unit: 2,
		Period: time.Millisecond, Timeout: time.Second, Registers: []modbus.Register{
			{Attr: "level", Table: modbus.TableHolding, Addr: 0, Type: modbus.TypeUint16},
			{Attr: "a", Table: modbus.TableCoil, Addr: 0, Writable: true},
			{Attr: "b", Table: modbus.TableCoil, Addr: 1, Writable: true},
		}}}}}, &recorder{}, nil)
	testkit.Eventually(t, 5*time.Second, "polls under way", func() bool { return statusOf(t, ms, "relay").Polls > 0 })
	short, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if _, err := ms.WriteAttr(short, "relay", "a", true); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("WriteAttr with a 20ms budget behind a 150ms answer = %v, want DeadlineExceeded", err)
	}
	ctx, cancel2 := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel2()
	if v, err := ms.WriteAttr(ctx, "relay", "b", true); err != nil || v != true {
		t.Fatalf("WriteAttr(b) = %v, %v", v, err)
	}
	if u.Coil(0) || sim.Stats().Writes[2] != 1 {
		t.Errorf("coil a = %v, writes %d: the given-up command reached the device", u.Coil(0), sim.Stats().Writes[2])
	}
}

// A slave that never answers is polled less and less often (up to
// MaxSilentBackoff), and at its period again once it answers.
func TestSilentSlaveBackoff(t *testing.T) {
	sim := startSim(t)
	sim.Unit(1).SetHolding(0, 1)
	sim.Unit(1).SetSilent(true)
	sim.Unit(2).SetHolding(0, 2)
	reg := []modbus.Register{{Attr: "x", Table: modbus.TableHolding, Addr: 0, Type: modbus.TypeUint16}}
	rec := &recorder{}
	ms := startMaster(t, []modbus.LineConfig{{Path: sim.Link(), Devices: []modbus.DeviceConfig{
		{Device: "dead", Unit: 1, Period: 10 * time.Millisecond, Timeout: 30 * time.Millisecond, Registers: reg},
		{Device: "good", Unit: 2, Period: 50 * time.Millisecond, Registers: reg},
	}}}, rec, nil, func(o *modbus.Options) { o.MaxSilentBackoff = time.Second })
	// 3 s by the good slave's readings. Polled every period, the dead one
	// would cost a timeout (a 100 ms tty read step) each round: ~28
	// requests; backing off to 1 s, about 9.
	testkit.Eventually(t, 20*time.Second, "3s of good readings", func() bool {
		g := rec.of("good")
		return len(g) > 1 && g[len(g)-1].at.Sub(g[0].at) >= 3*time.Second
	})
	if n := sim.Stats().Requests[1]; n > 14 || n < 3 {
		t.Errorf("the silent slave got %d requests in 3s, want 3..14 (backed off)", n)
	}
	sim.Unit(1).SetSilent(false)
	testkit.Eventually(t, 3*time.Second, "the slave polled again once it answers", func() bool {
		return statusOf(t, ms, "dead").Polls > 0
	})
	n := statusOf(t, ms, "dead").Polls
	testkit.Eventually(t, 2*time.Second, "its period back", func() bool { return statusOf(t, ms, "dead").Polls >= n+10 })
}

// A broken or hostile slave — noise, another unit's frame, a byte count
// that promises more than it sends, an over-long stream — is counted
// under its cause and never stalls the line: the good slave next to it
// keeps being read.
func TestHostileAnswers(t *testing.T) {
	other := modbus.AppendResponse(nil, modbus.Response{Unit: 9, Func: modbus.FuncReadHoldingRegisters, Regs: []uint16{1}})
	lying := modbus.AppendResponse(nil, modbus.Response{Unit: 3, Func: modbus.FuncReadHoldingRegisters, Regs: []uint16{1}})
	lying[2] = 250 // promises 250 data bytes
	long := bytes.Repeat([]byte{3, 3, 2, 0, 1}, 200)
	tests := []struct {
		name   string
		answer []byte
		cause  string
	}{
		{"noise", []byte{0xFF, 0xFF, 0x00, 0x13, 0x37, 0xFF}, modbus.CauseCRC},
		{"another unit's frame", other, modbus.CauseFrame},
		{"lying byte count", lying, modbus.CauseTimeout},
		{"over-long stream", long, modbus.CauseCRC},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sim := startSim(t)
			sim.Unit(3).SetHolding(0, 1)
			sim.Unit(3).SetRawAnswer(tt.answer)
			sim.Unit(4).SetHolding(0, 4)
			reg := []modbus.Register{{Attr: "x", Table: modbus.TableHolding, Addr: 0, Type: modbus.TypeUint16}}
			rec := &recorder{}
			ms := startMaster(t, []modbus.LineConfig{{Path: sim.Link(), Devices: []modbus.DeviceConfig{
				{Device: "bad", Unit: 3, Period: 10 * time.Millisecond, Timeout: 100 * time.Millisecond, Registers: reg},
				{Device: "good", Unit: 4, Period: 10 * time.Millisecond, Registers: reg},
			}}}, rec, nil, func(o *modbus.Options) { o.MaxSilentBackoff = -1 })
			testkit.Eventually(t, 10*time.Second, "3 "+tt.cause+" errors and good readings", func() bool {
				return statusOf(t, ms, "bad").Errors[tt.cause] >= 3 && len(rec.of("good")) >= 10
			})
			if n := len(rec.of("bad")); n != 0 {
				t.Errorf("%d readings from the bad slave", n)
			}
			for _, g := range rec.of("good") {
				if v := attrs(t, g.msg)["x"]; v != 4.0 {
					t.Fatalf("good read %v, want 4: a bad answer was taken for its", v)
				}
			}
		})
	}
}
