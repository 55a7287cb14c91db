package radio

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/reading"
)

type splitOut struct {
	line string
	no   int64
	off  int64
	long bool
}

func splitAll(s *LineSplitter, chunks ...[]byte) []splitOut {
	var out []splitOut
	for _, c := range chunks {
		s.Feed(c, func(l Line) {
			out = append(out, splitOut{line: string(l.Bytes), no: l.No, off: l.Offset, long: errors.Is(l.Err, ErrLineTooLong)})
		})
	}
	return out
}

func TestLineSplitter(t *testing.T) {
	tests := []struct {
		name string
		max  int
		in   string
		want []splitOut
	}{
		{"one line", 16, "abc\n", []splitOut{{"abc", 1, 0, false}}},
		{"two lines", 16, "abc\ndef\n", []splitOut{{"abc", 1, 0, false}, {"def", 2, 4, false}}},
		{"partial tail kept", 16, "abc\nde", []splitOut{{"abc", 1, 0, false}}},
		{"crlf", 16, "abc\r\n", []splitOut{{"abc", 1, 0, false}}},
		{"empty lines skipped", 16, "\n\r\nx\n", []splitOut{{"x", 3, 3, false}}},
		{"exactly max", 4, "abcd\n", []splitOut{{"abcd", 1, 0, false}}},
		{"over max resyncs", 4, "abcdefgh\nok\n", []splitOut{{"abcd", 1, 0, true}, {"ok", 2, 9, false}}},
		{"over max twice", 2, "abc\nxyz\nz\n", []splitOut{{"ab", 1, 0, true}, {"xy", 2, 4, true}, {"z", 3, 8, false}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := splitAll(NewLineSplitter(tt.max), []byte(tt.in))
			if !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("Feed(%q) = %v, want %v", tt.in, got, tt.want)
			}
			// Any chunking gives the same frames: one read is not one frame.
			for cut := 0; cut <= len(tt.in); cut++ {
				for cut2 := cut; cut2 <= len(tt.in); cut2++ {
					in := []byte(tt.in)
					got := splitAll(NewLineSplitter(tt.max), in[:cut], in[cut:cut2], in[cut2:])
					if !reflect.DeepEqual(got, tt.want) {
						t.Fatalf("Feed(%q | %q | %q) = %v, want %v", in[:cut], in[cut:cut2], in[cut2:], got, tt.want)
					}
				}
			}
		})
	}
}

var msTable = []struct {
	name string
	line string
	want MSMessage
}{
	{"set temperature", "12;1;1;0;0;21.5", MSMessage{Node: 12, Child: 1, Command: CmdSet, Type: VTemp, Payload: []byte("21.5")}},
	{"gateway log", "0;255;3;0;9;0 MCO:BGN:INIT GW,CP=RNNGA---,REL=255,VER=2.3.2",
		MSMessage{Node: 0, Child: 255, Command: CmdInternal, Type: ILogMessage, Payload: []byte("0 MCO:BGN:INIT GW,CP=RNNGA---,REL=255,VER=2.3.2")}},
	{"id request", "255;255;3;0;3;", MSMessage{Node: 255, Child: 255, Command: CmdInternal, Type: IIDRequest, Payload: []byte{}}},
	{"echo", "1;0;1;1;2;1", MSMessage{Node: 1, Child: 0, Command: CmdSet, Ack: true, Type: 2, Payload: []byte("1")}},
	{"position with semicolons", "3;4;1;0;49;55.7;13.0;18", MSMessage{Node: 3, Child: 4, Command: CmdSet, Type: 49, Payload: []byte("55.7;13.0;18")}},
	{"presentation", "1;0;0;0;6;Temperature", MSMessage{Node: 1, Child: 0, Command: CmdPresentation, Type: STemp, Payload: []byte("Temperature")}},
	{"utf8 payload", "1;5;1;0;47;café", MSMessage{Node: 1, Child: 5, Command: CmdSet, Type: 47, Payload: []byte("café")}},
	{"stream", "7;255;4;0;0;0A0B", MSMessage{Node: 7, Child: 255, Command: CmdStream, Type: 0, Payload: []byte("0A0B")}},
}

func TestMySensorsRoundTrip(t *testing.T) {
	for _, tt := range msTable {
		t.Run(tt.name, func(t *testing.T) {
			got, err := DecodeMySensors([]byte(tt.line))
			if err != nil {
				t.Fatalf("DecodeMySensors(%q) error %v", tt.line, err)
			}
			if !msEqual(got, tt.want) {
				t.Fatalf("DecodeMySensors(%q) = %+v, want %+v", tt.line, got, tt.want)
			}
			enc := AppendMySensors(nil, got)
			if string(enc) != tt.line+"\n" {
				t.Fatalf("AppendMySensors(%+v) = %q, want %q", got, enc, tt.line+"\n")
			}
		})
	}
}

func msEqual(a, b MSMessage) bool {
	return a.Node == b.Node && a.Child == b.Child && a.Command == b.Command && a.Ack == b.Ack &&
		a.Type == b.Type && bytes.Equal(a.Payload, b.Payload)
}

func TestMySensorsDecodeErrors(t *testing.T) {
	tests := []struct {
		name string
		line string
		want error
	}{
		{"too few fields", "1;0;1;0", ErrFieldCount},
		{"no payload separator", "1;0;1;0;0", ErrFieldCount},
		{"empty", "", ErrFieldCount},
		{"empty field", "1;;1;0;0;1", ErrBadField},
		{"node 256", "256;0;1;0;0;1", ErrBadField},
		{"four digits", "0001;0;1;0;0;1", ErrBadField},
		{"negative", "-1;0;1;0;0;1", ErrBadField},
		{"command 5", "1;0;5;0;0;1", ErrBadField},
		{"ack 2", "1;0;1;2;0;1", ErrBadField},
		{"letters", "a;0;1;0;0;1", ErrBadField},
		{"invalid utf8", "1;0;1;0;0;\xff", ErrBadText},
		{"nul", "1;0;1;0;0;\x00", ErrBadText},
		{"tab", "1;0;1;0;0;a\tb", ErrBadText},
		{"too long", "1;0;1;0;0;" + strings.Repeat("x", MaxMySensorsLine), ErrLineTooLong},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := DecodeMySensors([]byte(tt.line))
			if !errors.Is(err, tt.want) {
				t.Fatalf("DecodeMySensors(%q) error = %v, want %v", tt.line, err, tt.want)
			}
		})
	}
}

func TestAttrPayload(t *testing.T) {
	tests := []struct {
		vtype   int
		payload string
		want    reading.Attribute
		bad     bool
	}{
		{0, "21.5", reading.Attribute{Name: "temperature", Type: "Number", Value: 21.5}, false},
		{0, "-3", reading.Attribute{Name: "temperature", Type: "Number", Value: -3.0}, false},
		{1, "48.25", reading.Attribute{Name: "humidity", Type: "Number", Value: 48.25}, false},
		{1, "101", reading.Attribute{}, true},
		{2, "1", reading.Attribute{Name: "status", Type: "Boolean", Value: true}, false},
		{16, "0", reading.Attribute{Name: "tripped", Type: "Boolean", Value: false}, false},
		{2, "on", reading.Attribute{}, true},
		{5, "sunny", reading.Attribute{Name: "forecast", Type: "Text", Value: "sunny"}, false},
		{49, "55.7;13.0;18", reading.Attribute{Name: "position", Type: "Text", Value: "55.7,13.0,18"}, false},
		{47, `say "hi"`, reading.Attribute{}, true},
		{47, "", reading.Attribute{}, true},
		{0, "NaN", reading.Attribute{}, true},
		{0, "1e400", reading.Attribute{}, true},
		{0, "warm", reading.Attribute{}, true},
		{56, "-0.5", reading.Attribute{Name: "powerFactor", Type: "Number", Value: -0.5}, false},
	}
	for _, tt := range tests {
		vt, ok := lookupVType(tt.vtype)
		if !ok {
			t.Fatalf("lookupVType(%d) not found", tt.vtype)
		}
		p, err := appendAttrPayload(nil, vt, []byte(tt.payload))
		if tt.bad {
			if !errors.Is(err, ErrBadValue) {
				t.Errorf("appendAttrPayload(%d, %q) error = %v, want ErrBadValue", tt.vtype, tt.payload, err)
			}
			continue
		}
		if err != nil {
			t.Fatalf("appendAttrPayload(%d, %q) error %v", tt.vtype, tt.payload, err)
		}
		attrs, _, err := reading.Parse(p)
		if err != nil || len(attrs) != 1 || !reflect.DeepEqual(attrs[0], tt.want) {
			t.Errorf("reading.Parse(%s) = %v, %v; want %v", p, attrs, err, tt.want)
		}
		r := reading.Reading{Device: "d", Time: time.Now(), Attrs: attrs}
		if err := r.Validate(); err != nil {
			t.Errorf("Validate(%s) = %v", p, err)
		}
	}
	if _, ok := lookupVType(57); ok {
		t.Errorf("lookupVType(57) found, want unknown")
	}
}

func u64(v uint64) *uint64 { return &v }

var jsonTable = []struct {
	name string
	line string
	want JSONLine
}{
	{"full", `{"device":"th-1","seq":12,"time":"2024-05-01T10:00:00Z","attrs":{"temperature":21.5}}`,
		JSONLine{Device: "th-1", Seq: u64(12), Time: time.Date(2024, 5, 1, 10, 0, 0, 0, time.UTC), Attrs: json.RawMessage(`{"temperature":21.5}`)}},
	{"minimal", `{"device":"d.2","attrs":{"on":true}}`, JSONLine{Device: "d.2", Attrs: json.RawMessage(`{"on":true}`)}},
	{"ngsi attrs", `{"device":"x","seq":0,"attrs":{"t":{"value":1,"type":"Integer"}}}`,
		JSONLine{Device: "x", Seq: u64(0), Attrs: json.RawMessage(`{"t":{"value":1,"type":"Integer"}}`)}},
	{"fractional time", `{"device":"x","time":"2024-05-01T10:00:00.25+02:00","attrs":{"a":"b"}}`,
		JSONLine{Device: "x", Time: time.Date(2024, 5, 1, 8, 0, 0, 250e6, time.UTC), Attrs: json.RawMessage(`{"a":"b"}`)}},
}

func TestJSONLineRoundTrip(t *testing.T) {
	for _, tt := range jsonTable {
		t.Run(tt.name, func(t *testing.T) {
			got, err := DecodeJSONLine([]byte(tt.line))
			if err != nil {
				t.Fatalf("DecodeJSONLine(%q) error %v", tt.line, err)
			}
			if !jsonLineEqual(got, tt.want) {
				t.Fatalf("DecodeJSONLine(%q) = %+v, want %+v", tt.line, got, tt.want)
			}
			enc, err := AppendJSONLine(nil, got)
			if err != nil {
				t.Fatal(err)
			}
			again, err := DecodeJSONLine(bytes.TrimSuffix(enc, []byte("\n")))
			if err != nil || !jsonLineEqual(again, got) {
				t.Fatalf("round trip of %q via %q = %+v, %v", tt.line, enc, again, err)
			}
			// What the pipeline gets parses, with the line's time.
			attrs, observed, err := reading.Parse(got.pipelinePayload())
			if err != nil || len(attrs) == 0 || !observed.Equal(got.Time) {
				t.Fatalf("reading.Parse(%s) = %v, %v, %v; want time %v", got.pipelinePayload(), attrs, observed, err, got.Time)
			}
		})
	}
}

func jsonLineEqual(a, b JSONLine) bool {
	var ca, cb bytes.Buffer
	if json.Compact(&ca, a.Attrs) != nil || json.Compact(&cb, b.Attrs) != nil {
		return false
	}
	return a.Device == b.Device && reflect.DeepEqual(a.Seq, b.Seq) && a.Time.Equal(b.Time) && ca.String() == cb.String()
}

func TestJSONLineDecodeErrors(t *testing.T) {
	for _, line := range []string{
		`not json`,
		`{"device":"th 1","attrs":{"t":1}}`,
		`{"device":"","attrs":{"t":1}}`,
		`{"attrs":{"t":1}}`,
		`{"device":"a","attrs":[1]}`,
		`{"device":"a","attrs":"x"}`,
		`{"device":"a"}`,
		`{"device":"a","attrs":{"t":1},"x":2}`,
		`{"device":"a","seq":-1,"attrs":{"t":1}}`,
		`{"device":"a","time":"noon","attrs":{"t":1}}`,
		`{"device":"a","attrs":{"t":1}} {}`,
		"{\"device\":\"a\",\"attrs\":{\"t\":\"\xff\"}}",
		`{"device":"a","attrs":{"t":` + strings.Repeat("1", MaxJSONLine) + `}}`,
	} {
		if _, err := DecodeJSONLine([]byte(line)); err == nil {
			t.Errorf("DecodeJSONLine(%.60q) = nil error, want one", line)
		}
	}
}

func TestPipelinePayloadEmptyAttrs(t *testing.T) {
	l := JSONLine{Device: "a", Time: time.Unix(0, 0), Attrs: json.RawMessage(`{ }`)}
	if got := string(l.pipelinePayload()); got != `{"TimeInstant":"1970-01-01T00:00:00Z"}` {
		t.Fatalf("pipelinePayload() = %s", got)
	}
}

// traceLines reads a trace file from testdata, one frame per line.
func traceLines(tb testing.TB, name string) [][]byte {
	tb.Helper()
	f, err := os.Open(filepath.Join("testdata", name))
	if err != nil {
		tb.Fatal(err)
	}
	defer f.Close()
	var out [][]byte
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		out = append(out, bytes.Clone(sc.Bytes()))
	}
	if err := sc.Err(); err != nil {
		tb.Fatal(err)
	}
	return out
}

func traceBytes(tb testing.TB, name string) []byte {
	tb.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		tb.Fatal(err)
	}
	return b
}

func TestGatewayTraceDecodes(t *testing.T) {
	for _, l := range traceLines(t, "mysensors-gateway.trace") {
		if _, err := DecodeMySensors(l); err != nil {
			t.Errorf("DecodeMySensors(%q) error %v", l, err)
		}
	}
}

// FuzzMySensors feeds arbitrary bytes, cut in two reads, through the
// splitter and the decoder: no panic, frames bounded, and whatever decodes
// encodes back to something that decodes to the same message.
func FuzzMySensors(f *testing.F) {
	for _, tt := range msTable {
		f.Add([]byte(tt.line+"\n"), uint8(3))
	}
	for _, name := range []string{"mysensors-gateway.trace", "mysensors-hostile.trace"} {
		f.Add(traceBytes(f, name), uint8(17))
		for _, l := range traceLines(f, name) {
			f.Add(append(l, '\n'), uint8(0))
		}
	}
	f.Fuzz(func(t *testing.T, data []byte, cut uint8) {
		c := min(int(cut), len(data))
		s := NewLineSplitter(MaxMySensorsLine)
		check := func(l Line) {
			if len(l.Bytes) > MaxMySensorsLine || bytes.IndexByte(l.Bytes, '\n') >= 0 {
				t.Fatalf("frame %q breaks the splitter's bounds", l.Bytes)
			}
			if l.Err != nil {
				return
			}
			m, err := DecodeMySensors(l.Bytes)
			if err != nil {
				return
			}
			enc := AppendMySensors(nil, m)
			m2, err := DecodeMySensors(bytes.TrimSuffix(enc, []byte("\n")))
			if err != nil || !msEqual(m, m2) {
				t.Fatalf("round trip %q -> %q -> %+v, %v", l.Bytes, enc, m2, err)
			}
			if vt, ok := lookupVType(m.Type); ok && m.Command == CmdSet {
				if p, err := appendAttrPayload(nil, vt, m.Payload); err == nil {
					if _, _, err := reading.Parse(p); err != nil {
						t.Fatalf("payload %s of %q does not parse: %v", p, l.Bytes, err)
					}
				}
			}
		}
		s.Feed(data[:c], check)
		s.Feed(data[c:], check)
	})
}

// FuzzJSONLines: no panic; a decoded line encodes and decodes back equal,
// and its pipeline payload is a JSON object.
func FuzzJSONLines(f *testing.F) {
	for _, tt := range jsonTable {
		f.Add([]byte(tt.line + "\n"))
	}
	f.Add(traceBytes(f, "jsonlines.trace"))
	for _, l := range traceLines(f, "jsonlines.trace") {
		f.Add(append(l, '\n'))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		s := NewLineSplitter(MaxJSONLine)
		s.Feed(data, func(l Line) {
			if l.Err != nil {
				return
			}
			jl, err := DecodeJSONLine(l.Bytes)
			if err != nil {
				return
			}
			enc, err := AppendJSONLine(nil, jl)
			if err != nil {
				t.Fatalf("AppendJSONLine(%+v): %v", jl, err)
			}
			again, err := DecodeJSONLine(bytes.TrimSuffix(enc, []byte("\n")))
			if err != nil || !jsonLineEqual(again, jl) {
				t.Fatalf("round trip %q -> %q -> %+v, %v", l.Bytes, enc, again, err)
			}
			var obj map[string]json.RawMessage
			if err := json.Unmarshal(jl.pipelinePayload(), &obj); err != nil {
				t.Fatalf("pipeline payload %q of %q is not an object: %v", jl.pipelinePayload(), l.Bytes, err)
			}
		})
	})
}
