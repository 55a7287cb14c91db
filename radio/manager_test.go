package radio_test

import (
	"context"
	"errors"
	"fmt"
	"github.com/edgegate/edgegate/internal/sim/radiosim"
	"github.com/edgegate/edgegate/radio"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/pipeline"
	"github.com/edgegate/edgegate/internal/reading"
	"github.com/edgegate/edgegate/internal/testkit"
)

// fakeSub records what the pipeline would get. The first failFirst calls
// fail, as a full queue does.
type fakeSub struct {
	mu        sync.Mutex
	msgs      []pipeline.Message
	failFirst int
	calls     int
}

func (f *fakeSub) Submit(ctx context.Context, msg pipeline.Message) (pipeline.Outcome, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	if f.calls <= f.failFirst {
		return 0, errors.New("queue full")
	}
	if attrs, _, err := reading.Parse(msg.Payload); err != nil || len(attrs) == 0 {
		return pipeline.Refused, nil // as the pipeline does
	}
	f.msgs = append(f.msgs, msg)
	return pipeline.Queued, nil
}

func (f *fakeSub) got() []pipeline.Message {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.msgs)
}

func (f *fakeSub) callCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls
}

// count returns how many submitted readings match device and attribute.
func (f *fakeSub) count(device, attr string) int {
	n := 0
	for _, m := range f.got() {
		attrs, _, _ := reading.Parse(m.Payload)
		for _, a := range attrs {
			if m.Device == device && a.Name == attr {
				n++
			}
		}
	}
	return n
}

type binding struct {
	port        string
	node, child int
}

type fakeBinder struct {
	mu sync.Mutex
	b  map[binding]string
}

func (f *fakeBinder) BindRadio(port string, node, child int) (string, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	d, ok := f.b[binding{port, node, child}]
	return d, ok
}

func (f *fakeBinder) set(port string, node, child int, dev string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.b == nil {
		f.b = map[binding]string{}
	}
	f.b[binding{port, node, child}] = dev
}

type fakeDeviceBinder struct {
	fakeBinder
	ports map[string]string
}

func (f *fakeDeviceBinder) RadioPort(device string) (string, bool) {
	p, ok := f.ports[device]
	return p, ok
}

// runManager starts m.Run and returns a stop function that cancels it and
// checks that it returns within bound.
func runManager(t *testing.T, m *radio.Manager, bound time.Duration) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- m.Run(ctx) }()
	stopped := false
	stop = func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		start := time.Now()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run() = %v, want nil", err)
			}
			if el := time.Since(start); el > bound {
				t.Errorf("Run took %s to stop, want at most %s", el, bound)
			}
		case <-time.After(bound + 5*time.Second):
			t.Fatalf("Run did not stop within %s", bound+5*time.Second)
		}
	}
	t.Cleanup(stop)
	return stop
}

func runSim(t *testing.T, opts radiosim.Options) *radiosim.Sim {
	t.Helper()
	s, err := radiosim.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Errorf("sim did not stop")
		}
	})
	return s
}

// runSilentPort runs a silent sim at link and a radio.Manager with the one port
// pc on it, and waits until the port is open. stop is runManager's.
func runSilentPort(t *testing.T, link string, pc radio.PortConfig, sub radio.Submitter, bind radio.Binder, bound time.Duration) (*radiosim.Sim, *radio.Manager, func()) {
	t.Helper()
	sim := runSim(t, radiosim.Options{Link: link, Silent: true})
	pc.Path = link
	m, err := radio.NewManager([]radio.PortConfig{pc}, sub, bind, testOpts(t))
	if err != nil {
		t.Fatal(err)
	}
	stop := runManager(t, m, bound)
	testkit.Eventually(t, 5*time.Second, "port open", func() bool { return m.Ports()[0].Open })
	return sim, m, stop
}

func testOpts(t *testing.T) radio.Options {
	return radio.Options{StateDir: t.TempDir(), MinBackoff: 20 * time.Millisecond, MaxBackoff: 200 * time.Millisecond,
		CloseTimeout: time.Second}
}

// checkNoLeak fails if goroutines started by the test outlive it.
func checkNoLeak(t *testing.T) {
	base := runtime.NumGoroutine()
	t.Cleanup(func() {
		if !testkit.Poll(3*time.Second, func() bool { return runtime.NumGoroutine() <= base }) {
			buf := make([]byte, 1<<16)
			t.Errorf("goroutines: %d, were %d\n%s", runtime.NumGoroutine(), base, buf[:runtime.Stack(buf, true)])
		}
	})
}

func TestManagerMySensorsEndToEnd(t *testing.T) {
	checkNoLeak(t)
	link := filepath.Join(t.TempDir(), "ttyRADIO")
	// Nodes 1 and 2 have static ids, the third asks for one (gets 3).
	sim := runSim(t, radiosim.Options{Link: link, Nodes: 3, AutoID: 1, Interval: 40 * time.Millisecond, Garbage: true, Seed: 7})
	sub := &fakeSub{}
	bind := &fakeBinder{}
	bind.set(link, 1, -1, "th-1")     // the whole node
	bind.set(link, 3, 0, "th-3-temp") // only node 3's thermometer
	opts := testOpts(t)
	m, err := radio.NewManager([]radio.PortConfig{{Path: link, ReadTimeout: 100 * time.Millisecond}}, sub, bind, opts)
	if err != nil {
		t.Fatal(err)
	}
	stop := runManager(t, m, 2*time.Second)

	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("sim %+v\nport %+v\nth-1 t=%d h=%d b=%d th-3 t=%d", sim.Stats(), m.Ports()[0], sub.count("th-1", "temperature"),
				sub.count("th-1", "humidity"), sub.count("th-1", "batteryLevel"), sub.count("th-3-temp", "temperature"))
		}
	})
	testkit.Eventually(t, 10*time.Second, "readings of th-1 and th-3-temp, battery, and protocol answers", func() bool {
		st := sim.Stats()
		return sub.count("th-1", "temperature") >= 3 && sub.count("th-1", "humidity") >= 3 &&
			sub.count("th-1", "batteryLevel") >= 1 && sub.count("th-3-temp", "temperature") >= 2 &&
			len(st.AssignedIDs) >= 1 && st.TimeAnswers >= 3 && st.ConfigAnswers >= 3 && st.ReqAnswers >= 1 &&
			st.Discovers >= 1 && st.Garbage >= 2 && m.Ports()[0].FramesBad >= 2
	})
	if got := sim.Stats().AssignedIDs[0]; got != 3 {
		t.Errorf("assigned id = %d, want 3 (above the static 1 and 2)", got)
	}
	for _, msg := range sub.got() {
		if msg.Source.Kind != "radio" || msg.Source.Port != link || msg.Received.IsZero() {
			t.Fatalf("message source = %+v", msg)
		}
		if msg.Device == "th-3-temp" && msg.Source.Node != "3/0" {
			t.Fatalf("th-3-temp from node %q, want 3/0", msg.Source.Node)
		}
		if msg.Device == "th-3-temp" && strings.Contains(string(msg.Payload), "humidity") {
			t.Fatalf("node 3's humidity (child 1, unbound) reached th-3-temp: %s", msg.Payload)
		}
	}
	// Node 2 is bound to nothing: refused and pending, with what it presented.
	var pend []radio.PendingNode
	testkit.Eventually(t, 5*time.Second, "node 2 pending", func() bool {
		pend = m.Pending()
		return len(pend) == 1 && pend[0].Node == 2 && len(pend[0].Children) == 2 && pend[0].Sketch == "TempHum"
	})
	if pend[0].Port != link || pend[0].LastSeen.IsZero() || pend[0].Children[0].Type != radio.STemp {
		t.Errorf("pending = %+v", pend[0])
	}
	st := m.Ports()[0]
	if !st.Open || st.Refused == 0 || st.FramesOK == 0 || st.Submitted == 0 {
		t.Errorf("port status = %+v", st)
	}
	stop()
	// The id given out survives: the state file names it.
	b, err := os.ReadFile(filepath.Join(opts.StateDir, radio.StateFileName))
	if err != nil || !strings.Contains(string(b), "3") {
		t.Errorf("state file = %s, %v", b, err)
	}
}

func TestManagerUnplugReplug(t *testing.T) {
	checkNoLeak(t)
	link := filepath.Join(t.TempDir(), "ttyUSB-by-id")
	sim := runSim(t, radiosim.Options{Link: link, Nodes: 1, Interval: 30 * time.Millisecond})
	sub := &fakeSub{}
	bind := &fakeBinder{}
	bind.set(link, 1, -1, "th-1")
	m, err := radio.NewManager([]radio.PortConfig{{Path: link, ReadTimeout: 100 * time.Millisecond}}, sub, bind, testOpts(t))
	if err != nil {
		t.Fatal(err)
	}
	runManager(t, m, 2*time.Second)
	testkit.Eventually(t, 5*time.Second, "first readings", func() bool { return sub.count("th-1", "temperature") >= 2 })

	for round := 1; round <= 3; round++ {
		if err := sim.Unplug(); err != nil {
			t.Fatal(err)
		}
		testkit.Eventually(t, 5*time.Second, "port seen closed", func() bool { return !m.Ports()[0].Open })
		before := sub.count("th-1", "temperature")
		if err := sim.Replug(); err != nil {
			t.Fatal(err)
		}
		testkit.Eventually(t, 10*time.Second, fmt.Sprintf("readings after replug %d", round), func() bool {
			st := m.Ports()[0]
			return st.Open && st.Reconnects >= uint64(round) && sub.count("th-1", "temperature") >= before+2
		})
	}
	if st := m.Ports()[0]; st.LastError == "" {
		t.Errorf("port status after unplugs has no last error: %+v", st)
	}
}

// A port missing at start does not hold up another, and opens once its
// device appears.
func TestManagerMissingPortThenAppears(t *testing.T) {
	checkNoLeak(t)
	dir := t.TempDir()
	late := filepath.Join(dir, "ttyLATE")
	early := filepath.Join(dir, "ttyEARLY")
	runSim(t, radiosim.Options{Link: early, Nodes: 1, FirstID: 5, Interval: 30 * time.Millisecond})
	sub := &fakeSub{}
	bind := &fakeBinder{}
	bind.set(early, 5, -1, "early")
	bind.set(late, 6, -1, "late")
	m, err := radio.NewManager([]radio.PortConfig{
		{Path: late, ReadTimeout: 100 * time.Millisecond},
		{Path: early, ReadTimeout: 100 * time.Millisecond},
	}, sub, bind, testOpts(t))
	if err != nil {
		t.Fatal(err)
	}
	runManager(t, m, 2*time.Second)
	testkit.Eventually(t, 5*time.Second, "early port readings while late is missing", func() bool {
		return sub.count("early", "temperature") >= 2 && m.Ports()[0].LastError != ""
	})
	if m.Ports()[0].Open {
		t.Fatal("missing port reported open")
	}
	runSim(t, radiosim.Options{Link: late, Nodes: 1, FirstID: 6, Interval: 30 * time.Millisecond})
	testkit.Eventually(t, 10*time.Second, "late port readings", func() bool { return sub.count("late", "temperature") >= 2 })
}

// Hostile traffic on a real pty, byte by byte and in bursts: every bad
// frame counted, every good one delivered, the stream resynchronised.
func TestManagerHostileTraffic(t *testing.T) {
	checkNoLeak(t)
	link := filepath.Join(t.TempDir(), "ttyHOSTILE")
	sub := &fakeSub{}
	bind := &fakeBinder{}
	bind.set(link, 1, -1, "th-1")
	sim, m, _ := runSilentPort(t, link, radio.PortConfig{ReadTimeout: 100 * time.Millisecond}, sub, bind, 2*time.Second)

	trace := radio.TraceBytes(t, "mysensors-hostile.trace") // 2 good readings, 11 bad lines
	// Byte by byte first: framing must not depend on read boundaries.
	for i := range trace {
		if err := sim.Inject(trace[i : i+1]); err != nil {
			t.Fatal(err)
		}
	}
	long := strings.Repeat("Z", 10*radio.MaxMySensorsLine)
	if err := sim.Inject([]byte(long + "\n1;0;1;0;0;22.5\n")); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, 5*time.Second, "3 good readings and 12 bad frames", func() bool {
		st := m.Ports()[0]
		return sub.count("th-1", "temperature") == 3 && st.FramesBad == 12
	})
	var vals []float64
	for _, msg := range sub.got() {
		attrs, _, _ := reading.Parse(msg.Payload)
		vals = append(vals, attrs[0].Value.(float64))
	}
	if !slices.Equal(vals, []float64{21.5, 21.5, 22.5}) {
		t.Errorf("values = %v, want [21.5 21.5 22.5]", vals)
	}
}

func TestManagerJSONLines(t *testing.T) {
	checkNoLeak(t)
	link := filepath.Join(t.TempDir(), "ttyJSON")
	sub := &fakeSub{}
	bind := &fakeDeviceBinder{ports: map[string]string{"th-1": link, "elsewhere": "/dev/ttyOTHER"}}
	sim, m, _ := runSilentPort(t, link, radio.PortConfig{Codec: radio.CodecJSONLines, ReadTimeout: 100 * time.Millisecond}, sub, bind, 2*time.Second)
	// jsonlines.trace: th-1 seq 1 (with time), seq 2, seq 2 again (dup),
	// door-3 (unbound), th-1 with empty attrs (the pipeline's to refuse),
	// then 6 bad lines; plus "elsewhere" (bound to another port) and an
	// over-long line.
	if err := sim.Inject(radio.TraceBytes(t, "jsonlines.trace")); err != nil {
		t.Fatal(err)
	}
	if err := sim.Inject([]byte(`{"device":"elsewhere","attrs":{"t":1}}` + "\n" + strings.Repeat("x", radio.MaxJSONLine+10) + "\n")); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("port %+v got %d", m.Ports()[0], len(sub.got()))
		}
	})
	testkit.Eventually(t, 5*time.Second, "th-1 readings, refusals and bad frames", func() bool {
		st := m.Ports()[0]
		return sub.callCount() == 3 && len(sub.got()) == 2 && st.Duplicates == 1 && st.Refused == 3 && st.FramesBad == 7
	})
	first := sub.got()[0]
	_, observed, err := reading.Parse(first.Payload)
	if err != nil || !observed.Equal(time.Date(2024, 5, 1, 10, 0, 0, 0, time.UTC)) || first.Device != "th-1" {
		t.Errorf("first reading %s: time %v, %v", first.Payload, observed, err)
	}
	pend := m.Pending()
	if len(pend) != 2 || pend[0].Device != "door-3" || pend[1].Device != "elsewhere" || pend[0].Node != -1 {
		t.Errorf("pending = %+v", pend)
	}
}

// Without DeviceBinder a JSON-lines port takes only BindRadio(port,-1,-1).
func TestJSONLinesPlainBinder(t *testing.T) {
	bind := &fakeBinder{}
	bind.set("/dev/ttyX", -1, -1, "th-1")
	bound := radio.PortBoundJSON(radio.PortConfig{Path: "/dev/ttyX", Codec: radio.CodecJSONLines}, &fakeSub{}, bind, radio.Options{Now: time.Now})
	if !bound("th-1") || bound("th-2") {
		t.Fatal("boundJSON: want th-1 only")
	}
}

// The pipeline refusing to queue (quota) holds the reading and retries it,
// in order, until it goes in.
func TestManagerSubmitRetry(t *testing.T) {
	checkNoLeak(t)
	link := filepath.Join(t.TempDir(), "ttyRETRY")
	sub := &fakeSub{failFirst: 3}
	bind := &fakeBinder{}
	bind.set(link, 1, -1, "th-1")
	sim, _, _ := runSilentPort(t, link, radio.PortConfig{ReadTimeout: 100 * time.Millisecond}, sub, bind, 2*time.Second)
	if err := sim.Inject([]byte("1;0;1;0;0;1\n1;0;1;0;0;2\n1;0;1;0;0;3\n")); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, 5*time.Second, "3 readings", func() bool { return len(sub.got()) == 3 })
	for i, msg := range sub.got() {
		if want := fmt.Sprintf(`{"temperature":{"value":%d,"type":"Number"}}`, i+1); string(msg.Payload) != want {
			t.Errorf("reading %d = %s, want %s", i, msg.Payload, want)
		}
	}
}

// Shutdown is bounded even with a read blocked and the pipeline refusing.
func TestManagerShutdownBounded(t *testing.T) {
	checkNoLeak(t)
	link := filepath.Join(t.TempDir(), "ttySTOP")
	sub := &fakeSub{failFirst: 1 << 30}
	bind := &fakeBinder{}
	bind.set(link, 1, -1, "th-1")
	sim, m, stop := runSilentPort(t, link, radio.PortConfig{ReadTimeout: 2 * time.Second}, sub, bind, 3*time.Second)
	if err := sim.Inject([]byte("1;0;1;0;0;1\n1;0;1;0;0;2\n")); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, 5*time.Second, "frames read", func() bool { return m.Ports()[0].FramesOK == 2 })
	stop()
	if st := m.Ports()[0]; st.Dropped != 2 || st.Open {
		t.Errorf("after shutdown: %+v, want 2 dropped, closed", st)
	}
}

func TestNewManagerValidates(t *testing.T) {
	sub, bind := &fakeSub{}, &fakeBinder{}
	for _, tt := range []struct {
		name  string
		ports []radio.PortConfig
		want  string
	}{
		{"empty path", []radio.PortConfig{{}}, "path is empty"},
		{"duplicate", []radio.PortConfig{{Path: "/a"}, {Path: "/a"}}, "listed twice"},
		{"baud", []radio.PortConfig{{Path: "/a", Baud: 12345}}, "baud"},
		{"codec", []radio.PortConfig{{Path: "/a", Codec: "xml"}}, "codec"},
		{"timeout", []radio.PortConfig{{Path: "/a", ReadTimeout: time.Millisecond}}, "read_timeout"},
	} {
		if _, err := radio.NewManager(tt.ports, sub, bind, radio.Options{}); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: radio.NewManager error = %v, want %q", tt.name, err, tt.want)
		}
	}
}
