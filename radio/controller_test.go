package radio

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"runtime"
	"testing"
	"time"
)

func newTestController(t testing.TB, dir string) *msController {
	t.Helper()
	ids, err := loadNodeIDs(dir)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Date(2024, 5, 1, 10, 0, 0, 0, time.UTC)
	return newMSController("/dev/ttyUSB0", ids, func() time.Time { return now })
}

func TestControllerProtocol(t *testing.T) {
	c := newTestController(t, t.TempDir())
	tests := []struct {
		in      string
		replies string
		payload string
		event   string
		child   int
		err     error
	}{
		{in: "0;255;3;0;9;0 MCO:BGN:INIT GW", event: evLog},
		{in: "0;255;3;0;14;Gateway startup complete.", event: evInternal, replies: "255;255;3;0;20;\n"},
		{in: "0;255;0;0;18;2.3.2", event: evPresent},
		{in: "255;255;3;0;3;", event: evInternal, replies: "255;255;3;0;4;1\n"},
		{in: "255;255;3;0;3;", event: evInternal, replies: "255;255;3;0;4;2\n"},
		{in: "1;255;0;0;17;2.3.2", event: evPresent},
		{in: "1;0;0;0;6;Temperature", event: evPresent},
		{in: "1;255;3;0;6;0", event: evInternal, replies: "1;255;3;0;6;M\n"},
		{in: "1;255;3;0;1;", event: evInternal, replies: "1;255;3;0;1;1714557600\n"},
		{in: "1;0;2;0;0;", event: evReq}, // nothing known yet: no answer
		{in: "1;0;1;0;0;21.5", event: evReading, child: 0, payload: `{"temperature":{"value":21.5,"type":"Number"}}`},
		{in: "1;0;2;0;0;", event: evReq, replies: "1;0;1;0;0;21.5\n"},
		{in: "1;0;1;1;0;21.5", event: evEcho}, // echo: not a reading
		{in: "1;255;3;0;0;87", event: evReading, child: 255, payload: `{"batteryLevel":{"value":87,"type":"Number"}}`},
		{in: "1;255;3;0;0;187", err: ErrBadValue},
		{in: "1;0;1;0;99;1", err: ErrBadValue},
		{in: "255;0;1;0;0;21.5", err: ErrBadField},
		{in: "99;0;1;0;0;warm", err: ErrBadValue}, // bad frames do not create nodes
		// A node that never presented: reading, and a request to present.
		{in: "7;0;1;0;2;1", event: evReading, child: 0, replies: "7;255;3;0;19;\n", payload: `{"status":{"value":true,"type":"Boolean"}}`},
		{in: "7;0;1;0;2;0", event: evReading, child: 0, payload: `{"status":{"value":false,"type":"Boolean"}}`},
		{in: "1;255;3;0;11;TempHum", event: evInternal},
		{in: "1;255;3;0;22;1234", event: evInternal},
	}
	for _, tt := range tests {
		m, err := DecodeMySensors([]byte(tt.in))
		if err != nil {
			t.Fatalf("DecodeMySensors(%q): %v", tt.in, err)
		}
		var res msResult
		err = c.handle(m, &res)
		if tt.err != nil {
			if !errors.Is(err, tt.err) {
				t.Errorf("handle(%q) error = %v, want %v", tt.in, err, tt.err)
			}
			continue
		}
		if err != nil {
			t.Fatalf("handle(%q) error %v", tt.in, err)
		}
		if res.event != tt.event || string(res.replies) != tt.replies || string(res.payload) != tt.payload ||
			(tt.payload != "" && res.child != tt.child) {
			t.Errorf("handle(%q) = event %q replies %q payload %s child %d; want %q %q %s %d",
				tt.in, res.event, res.replies, res.payload, res.child, tt.event, tt.replies, tt.payload, tt.child)
		}
	}
	snap := c.snapshot()
	if len(snap) != 2 || snap[0].id != 1 || snap[0].sketch != "TempHum" || snap[0].battery != 87 ||
		!reflect.DeepEqual(snap[0].children, []ChildInfo{{ID: 0, Type: STemp, Description: "Temperature"}}) || snap[1].id != 7 {
		t.Errorf("snapshot() = %+v", snap)
	}
}

func TestNodeIDsPersistAndNeverReuse(t *testing.T) {
	dir := t.TempDir()
	c := newTestController(t, dir)
	var res msResult
	idReq, _ := DecodeMySensors([]byte("255;255;3;0;3;"))
	if err := c.handle(idReq, &res); err != nil || string(res.replies) != "255;255;3;0;4;1\n" {
		t.Fatalf("first id: %q, %v", res.replies, err)
	}
	static, _ := DecodeMySensors([]byte("40;0;1;0;0;20"))
	if err := c.handle(static, &res); err != nil {
		t.Fatal(err)
	}
	// A restart: the ids used so far are known, the next is above them.
	c2 := newTestController(t, dir)
	res = msResult{}
	if err := c2.handle(idReq, &res); err != nil || string(res.replies) != "255;255;3;0;4;41\n" {
		t.Fatalf("id after restart: %q, %v", res.replies, err)
	}
	b, err := os.ReadFile(filepath.Join(dir, stateFileName))
	if err != nil {
		t.Fatal(err)
	}
	var f stateFile
	if err := json.Unmarshal(b, &f); err != nil {
		t.Fatal(err)
	}
	if got := f.Ports["/dev/ttyUSB0"].IDs; !reflect.DeepEqual(got, []int{1, 40, 41}) {
		t.Fatalf("persisted ids = %v, want [1 40 41]", got)
	}
	matches, _ := filepath.Glob(filepath.Join(dir, ".*tmp"))
	if len(matches) != 0 {
		t.Fatalf("temp files left behind: %v", matches)
	}
}

func TestNodeIDsWrapToLowestFree(t *testing.T) {
	ids, _ := loadNodeIDs("")
	if err := ids.markSeen("p", MaxNodeID); err != nil {
		t.Fatal(err)
	}
	for want := 1; want <= 3; want++ {
		if got, err := ids.allocate("p", nil); err != nil || got != want {
			t.Fatalf("allocate() = %d, %v; want %d", got, err, want)
		}
	}
	for i := 4; i < MaxNodeID; i++ {
		if _, err := ids.allocate("p", nil); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := ids.allocate("p", nil); err == nil {
		t.Fatal("allocate() with every id used = nil error")
	}
}

func BenchmarkMySensorsDecode(b *testing.B) {
	line := []byte("12;1;1;0;0;21.5")
	b.ReportAllocs()
	for b.Loop() {
		if _, err := DecodeMySensors(line); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "frames/s")
}

// BenchmarkMySensorsFrame is the whole per-frame path short of the pipeline:
// framing a stream, decoding, the controller, and the attribute payload.
func BenchmarkMySensorsFrame(b *testing.B) {
	c := newTestController(b, "")
	var stream []byte
	for range 64 {
		stream = append(stream, "12;1;1;0;0;21.5\n12;2;1;0;1;48.25\n"...)
	}
	s := NewLineSplitter(MaxMySensorsLine)
	var res msResult
	frames := 0
	fn := func(l Line) {
		m, err := DecodeMySensors(l.Bytes)
		if err != nil {
			b.Fatal(err)
		}
		res.replies, res.payload = res.replies[:0], res.payload[:0]
		if err := c.handle(m, &res); err != nil {
			b.Fatal(err)
		}
		frames++
	}
	b.ReportAllocs()
	b.SetBytes(int64(len(stream)))
	var ms0, ms1 runtime.MemStats
	runtime.ReadMemStats(&ms0)
	for b.Loop() {
		s.Feed(stream, fn)
	}
	runtime.ReadMemStats(&ms1)
	b.ReportMetric(float64(frames)/b.Elapsed().Seconds(), "frames/s")
	b.ReportMetric(float64(ms1.Mallocs-ms0.Mallocs)/float64(frames), "allocs/frame")
}

func BenchmarkMySensorsEncode(b *testing.B) {
	m := MSMessage{Node: 12, Child: 1, Command: CmdSet, Type: VTemp, Payload: []byte("21.5")}
	buf := make([]byte, 0, 64)
	b.ReportAllocs()
	for b.Loop() {
		buf = AppendMySensors(buf[:0], m)
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "frames/s")
}

func BenchmarkJSONLineDecode(b *testing.B) {
	line := []byte(`{"device":"th-1","seq":12,"time":"2024-05-01T10:00:00Z","attrs":{"temperature":21.5,"humidity":48.25}}`)
	b.ReportAllocs()
	b.SetBytes(int64(len(line)))
	for b.Loop() {
		l, err := DecodeJSONLine(line)
		if err != nil {
			b.Fatal(err)
		}
		_ = l.pipelinePayload()
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "frames/s")
}

func BenchmarkJSONLineEncode(b *testing.B) {
	l := JSONLine{Device: "th-1", Seq: u64(12), Time: time.Date(2024, 5, 1, 10, 0, 0, 0, time.UTC),
		Attrs: json.RawMessage(`{"temperature":21.5,"humidity":48.25}`)}
	buf := make([]byte, 0, 256)
	b.ReportAllocs()
	for b.Loop() {
		var err error
		if buf, err = AppendJSONLine(buf[:0], l); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "frames/s")
}
