package reading

import (
	"encoding/json"
	"errors"
	"math"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"
	"unicode/utf8"
)

// diffSeeds are payloads at the edges of what the two parsers must agree
// on; FuzzParseDifferential starts from them and the FuzzParseSealBody
// corpus.
var diffSeeds = []string{
	`{"temperature": 21.5, "on": true, "label": "kitchen"}`,
	`{"temperature": {"value": 21.5, "type": "Float"}}`,
	`{"t": {"value": 3}}`, `{"t": {"value": 3, "metadata": {"a": 1}}}`,
	`{"t": {"value": 3, "type": null}}`, `{"t": {"value": 3, "type": 5}}`, `{"t": {"value": 3, "type": ""}}`,
	`{"t": {"value": 3, "unit": "C"}}`, `{"t": {"type": "Float"}}`, `{"t": {}}`, `{"t": []}`,
	`{"t": {"value": 1, "value": 2, "type": "A", "type": "B"}}`,
	`{"pos": {"lat": 43.7, "lon": 11.2, "lat": 1}}`,
	`{"TimeInstant": "2026-11-26T05:00:00.5Z", "t": 1}`,
	`{"observedAt": "2026-11-26T06:00:00+01:00", "TimeInstant": "2026-11-26T05:00:00Z", "t": 1}`,
	`{"TimeInstant": null, "t": 1}`, `{"TimeInstant": 5}`, `{"TimeInstant": "x", "TimeInstant": "2026-01-01T00:00:00Z"}`,
	`{"Time\u0049nstant": "2026-11-26T05:00:00Z"}`,
	`{"x":1,"x":2}`, `{"b":1,"a":2,"b":3,"a":4}`, `{"":1}`, `{}`, ` { } `, `{"a":1}x`, `{"a":1,}`, `{,}`,
	`[]`, `null`, ``, `{`, `"str"`, `1`, `true`,
	`{"n":-0}`, `{"n":0.1e-2}`, `{"n":1E+2}`, `{"n":01}`, `{"n":1.}`, `{"n":.5}`, `{"n":-}`, `{"n":+1}`, `{"n":1e}`,
	`{"n":0x10}`, `{"n":1_0}`, `{"n":Infinity}`, `{"n":NaN}`, `{"n":1e400}`, `{"n":-1e400}`, `{"n":4.9e-325}`,
	`{"n":123456789012345678901234567890}`,
	`{"s":"a\"b\\c\/d\b\f\n\r\t"}`, `{"s":"\u00e9\u20AC\ud83d\ude00"}`, `{"s":"\ud800"}`, `{"s":"\udc00"}`,
	`{"s":"\ud800\u0041"}`, `{"s":"\ufffd"}`, `{"s":"�"}`, `{"s":"\x"}`, `{"s":"\u12"}`, `{"s":"a` + "\x01" + `"}`,
	`{"\ud800":1}`, `{"a\u0000b":"\u0000"}`, `{"a":[1,"x",true,null,{"b":[]}]}`, `{"a":[1,]}`, `{"a":[,1]}`,
	`{"a":tru}`, `{"a":nul}`, `{"a":falsey}`, `{"a" 1}`, `{a:1}`, `{'a':1}`, "{\"a\":1\u00a0}",
	`{"a":{"b":{"c":{"d":{"e":{"f":{"g":{"h":{"i":{"j":"\ud800"}}}}}}}}}}`,
	"\t\r\n{\"a\":1}\n",
	`{"id":1,"type":"x","dateModified":2}`,
	`{"x":"<script>"}`, `{"signature":"x"}`,
}

// FuzzParseDifferential: on any input, Parse (the hand-written parser with
// its fallback) and parseStd (encoding/json) agree: both refuse, with the
// same error class and reason, or both accept with the same attributes
// and time.
func FuzzParseDifferential(f *testing.F) {
	for _, s := range diffSeeds {
		f.Add([]byte(s))
	}
	f.Add([]byte(`{"deep":` + strings.Repeat(`[`, 70) + strings.Repeat(`]`, 70) + `}`))
	f.Add([]byte(`{"deep":` + strings.Repeat(`{"a":`, 70) + `1` + strings.Repeat(`}`, 70) + `}`))
	for _, s := range corpusOf(f, "FuzzParseSealBody") {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, payload []byte) {
		compareParsers(t, payload)
	})
}

func compareParsers(t *testing.T, payload []byte) {
	t.Helper()
	got, gotT, gotErr := Parse(payload)
	var want []Attribute
	var wantT time.Time
	var wantErr error
	switch {
	case len(payload) > MaxPayloadBytes:
		wantErr = ErrTooLarge
	case !utf8.Valid(payload):
		wantErr = &reasonError{ReasonBadUTF8, ""}
	default:
		want, wantT, wantErr = parseStd(payload)
	}
	if (gotErr == nil) != (wantErr == nil) {
		t.Fatalf("Parse(%q): error %v, encoding/json's %v", clipQ(payload), gotErr, wantErr)
	}
	if gotErr != nil {
		for _, class := range []error{ErrInvalid, ErrTooLarge} {
			if errors.Is(gotErr, class) != errors.Is(wantErr, class) {
				t.Fatalf("Parse(%q): error %v, encoding/json's %v", clipQ(payload), gotErr, wantErr)
			}
		}
		if Reason(gotErr) != Reason(wantErr) {
			t.Fatalf("Parse(%q): reason %q, encoding/json's %q", clipQ(payload), Reason(gotErr), Reason(wantErr))
		}
		// The same words, wherever encoding/json's are deterministic (with
		// two bad attributes, the one its map yields first is named).
		if _, _, again := parseStd(payload); len(payload) <= MaxPayloadBytes && utf8.Valid(payload) &&
			again.Error() == wantErr.Error() && gotErr.Error() != wantErr.Error() {
			t.Fatalf("Parse(%q): error %q, encoding/json's %q", clipQ(payload), gotErr, wantErr)
		}
		return
	}
	if !gotT.Equal(wantT) || gotT.Location() != wantT.Location() {
		t.Fatalf("Parse(%q): time %v, encoding/json's %v", clipQ(payload), gotT, wantT)
	}
	if len(got) == 0 && len(want) == 0 {
		return
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("Parse(%q):\n got %#v\nwant %#v", clipQ(payload), got, want)
	}
}

// TestParseDifferentialSeeds runs the seeds in every `go test`, with the
// fuzz corpus of both fuzz tests.
func TestParseDifferentialSeeds(t *testing.T) {
	for _, s := range diffSeeds {
		compareParsers(t, []byte(s))
	}
	for _, s := range corpusOf(t, "FuzzParseSealBody") {
		compareParsers(t, s)
	}
}

// TestParseFastPathTaken: the payload shapes devices send are parsed by
// the fast path, not handed to encoding/json.
func TestParseFastPathTaken(t *testing.T) {
	for _, s := range append([]string{
		`{"t": {"value": 3, "metadata": {"a": 1}}}`,
		`{"s":"\u00e9\u20AC\ud83d\ude00 \n"}`,
		`{"pos": {"lat": 43.7, "lon": [11.2, null, false]}}`,
		` {"b":1,"a":2,"b":3} `,
	}, func() []string {
		var out []string
		for _, bp := range benchPayloads {
			out = append(out, bp.payload)
		}
		return out
	}()...) {
		if _, _, ok := parseFast([]byte(s)); !ok {
			t.Errorf("parseFast(%q) left it to encoding/json", s)
		}
	}
}

// TestParseAllocs pins the allocation count of the common payload: one
// copy of the payload, the attribute slice, one boxed number each.
func TestParseAllocs(t *testing.T) {
	payload := []byte(`{"temperature": 21.5, "humidity": 40}`)
	n := testing.AllocsPerRun(100, func() {
		if _, _, err := Parse(payload); err != nil {
			t.Fatal(err)
		}
	})
	if n > 4 {
		t.Fatalf("Parse of a two-number payload: %.0f allocations, want at most 4", n)
	}
}

// corpusOf reads the byte-slice inputs of a fuzz test's checked-in corpus.
func corpusOf(tb testing.TB, fuzz string) [][]byte {
	tb.Helper()
	files, err := filepath.Glob(filepath.Join("testdata", "fuzz", fuzz, "*"))
	if err != nil {
		tb.Fatal(err)
	}
	var out [][]byte
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			tb.Fatal(err)
		}
		v, ok := corpusBytes(string(b))
		if !ok {
			tb.Fatalf("%s: not a go test fuzz v1 file of one []byte", f)
		}
		out = append(out, v)
	}
	return out
}

// corpusBytes decodes `go test fuzz v1` / `[]byte("...")`.
func corpusBytes(file string) ([]byte, bool) {
	lines := strings.Split(strings.TrimSpace(file), "\n")
	if len(lines) != 2 || lines[0] != "go test fuzz v1" {
		return nil, false
	}
	lit, ok := strings.CutPrefix(lines[1], "[]byte(")
	if !ok {
		return nil, false
	}
	lit, ok = strings.CutSuffix(lit, ")")
	if !ok {
		return nil, false
	}
	s, err := strconv.Unquote(lit)
	if err != nil {
		return nil, false
	}
	return []byte(s), true
}

func clipQ(b []byte) string {
	if len(b) > 200 {
		return string(b[:200]) + "…"
	}
	return string(b)
}

// TestValueOKAgreesWithCheckValue: Validate's allocation-free check
// accepts exactly what checkValue (which words the errors) accepts.
func TestValueOKAgreesWithCheckValue(t *testing.T) {
	deep := any(1.0)
	for range maxDepth + 1 {
		deep = []any{deep}
	}
	for _, v := range []any{
		nil, true, 1.5, "ok", []any{1.0, "a", nil}, map[string]any{"a": map[string]any{"b": []any{false}}},
		math.NaN(), math.Inf(-1), "a<b", []any{1.0, "x'y"}, map[string]any{"k=": 1.0}, map[string]any{"k": math.Inf(1)},
		deep, 42, json.Number("1"), []string{"a"},
	} {
		if ok, err := valueOK(v, 0), checkValue("attribute x", v, 0); ok != (err == nil) {
			t.Errorf("valueOK(%#v) = %v, checkValue = %v", v, ok, err)
		}
	}
}
