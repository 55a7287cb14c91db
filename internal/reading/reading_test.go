package reading

import (
	"errors"
	"math"
	"strings"
	"testing"
	"time"
	"unicode/utf8"
)

func TestParse(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    []Attribute
		time    time.Time
		wantErr error
	}{
		{"flat", `{"temperature": 21.5, "on": true, "label": "kitchen"}`,
			[]Attribute{{"label", TypeText, "kitchen"}, {"on", TypeBoolean, true}, {"temperature", TypeNumber, 21.5}}, time.Time{}, nil},
		{"ngsi-like", `{"temperature": {"value": 21.5, "type": "Float"}}`,
			[]Attribute{{"temperature", "Float", 21.5}}, time.Time{}, nil},
		{"ngsi-like without type", `{"temperature": {"value": 3}}`,
			[]Attribute{{"temperature", TypeNumber, 3.0}}, time.Time{}, nil},
		{"structured", `{"pos": {"lat": 43.7, "lon": 11.2}}`,
			[]Attribute{{"pos", TypeStructured, map[string]any{"lat": 43.7, "lon": 11.2}}}, time.Time{}, nil},
		{"observation time", `{"TimeInstant": "2026-11-26T05:00:00.5Z", "t": 1}`,
			[]Attribute{{"t", TypeNumber, 1.0}}, time.Date(2026, 11, 26, 5, 0, 0, 5e8, time.UTC), nil},
		{"observedAt with offset", `{"observedAt": "2026-11-26T06:00:00+01:00", "t": 1}`,
			[]Attribute{{"t", TypeNumber, 1.0}}, time.Date(2026, 11, 26, 5, 0, 0, 0, time.UTC), nil},
		{"bad time", `{"TimeInstant": "yesterday", "t": 1}`, nil, time.Time{}, ErrInvalid},
		{"not an object", `[1,2]`, nil, time.Time{}, ErrInvalid},
		{"not json", `temperature=21`, nil, time.Time{}, ErrInvalid},
		{"empty type", `{"t": {"value": 1, "type": ""}}`, nil, time.Time{}, ErrInvalid},
		{"oversized", `{"x":"` + strings.Repeat("a", MaxPayloadBytes) + `"}`, nil, time.Time{}, ErrTooLarge},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ts, err := Parse([]byte(tt.in))
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("Parse(%.40q) error = %v, want %v", tt.in, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("Parse(%q) = %v", tt.in, err)
			}
			if !ts.Equal(tt.time) {
				t.Errorf("Parse(%q) time = %v, want %v", tt.in, ts, tt.time)
			}
			if len(got) != len(tt.want) {
				t.Fatalf("Parse(%q) = %v, want %v", tt.in, got, tt.want)
			}
			for i := range got {
				if got[i].Name != tt.want[i].Name || got[i].Type != tt.want[i].Type || !sameJSON(got[i].Value, tt.want[i].Value) {
					t.Errorf("Parse(%q)[%d] = %+v, want %+v", tt.in, i, got[i], tt.want[i])
				}
			}
		})
	}
}

func sameJSON(a, b any) bool {
	am, aok := a.(map[string]any)
	bm, bok := b.(map[string]any)
	if aok && bok {
		if len(am) != len(bm) {
			return false
		}
		for k := range am {
			if am[k] != bm[k] {
				return false
			}
		}
		return true
	}
	return a == b
}

func TestValidate(t *testing.T) {
	ok := func() Reading {
		return Reading{Device: "th-1", Attrs: []Attribute{{"temperature", TypeNumber, 21.5}}}
	}
	tests := []struct {
		name   string
		mutate func(*Reading)
		want   string
	}{
		{"valid", func(*Reading) {}, ""},
		{"bad device id", func(r *Reading) { r.Device = "th 1" }, "device id"},
		{"long device id", func(r *Reading) { r.Device = strings.Repeat("a", 257) }, "device id"},
		{"no attributes", func(r *Reading) { r.Attrs = nil }, "no attributes"},
		{"forbidden char in value", func(r *Reading) { r.Attrs[0] = Attribute{"label", TypeText, "a<script>"} }, `forbidden character '<'`},
		{"forbidden char nested", func(r *Reading) {
			r.Attrs[0] = Attribute{"pos", TypeStructured, map[string]any{"k": []any{"x=1"}}}
		}, `forbidden character '='`},
		{"forbidden char in name", func(r *Reading) { r.Attrs[0].Name = "temp(c)" }, "attribute name"},
		{"space in name", func(r *Reading) { r.Attrs[0].Name = "temp c" }, "attribute name"},
		{"bad type", func(r *Reading) { r.Attrs[0].Type = "Num;ber" }, "type"},
		{"duplicate", func(r *Reading) { r.Attrs = append(r.Attrs, r.Attrs[0]) }, "duplicated"},
		{"dot device id", func(r *Reading) { r.Device = "." }, "relative path segment"},
		{"dotdot device id", func(r *Reading) { r.Device = ".." }, "relative path segment"},
		{"slash device id", func(r *Reading) { r.Device = "a/b" }, "byte 1 ('/')"},
		{"reserved id", func(r *Reading) { r.Attrs[0].Name = "id" }, "reserved"},
		{"reserved dateExpires", func(r *Reading) { r.Attrs[0].Name = "dateExpires" }, "reserved"},
		{"NaN string as Number", func(r *Reading) { r.Attrs[0].Value = "NaN" }, "finite JSON number"},
		{"Inf string as float", func(r *Reading) { r.Attrs[0] = Attribute{"t", "float", "Inf"} }, "finite JSON number"},
		{"NaN float", func(r *Reading) { r.Attrs[0].Value = math.NaN() }, "finite"},
		{"null Number", func(r *Reading) { r.Attrs[0].Value = nil }, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := ok()
			tt.mutate(&r)
			err := r.Validate()
			if tt.want == "" {
				if err != nil {
					t.Fatalf("Validate() = %v, want nil", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Validate() = %v, want an error containing %q", err, tt.want)
			}
		})
	}
}

func FuzzParse(f *testing.F) {
	for _, s := range []string{`{"t":1}`, `{"t":{"value":1,"type":"Float"}}`, `{"TimeInstant":"2026-01-01T00:00:00Z","x":"y"}`, `[]`, ``, `{"a":{"value":{"b":[1,"<"]}}}`} {
		f.Add([]byte(s))
	}
	for _, s := range []string{"{\"t\":\"\xff\"}", `{"t":"\ud800"}`, `{"t":1e999}`, `{"t":{"value":"NaN","type":"Number"}}`, `{"id":1}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		attrs, _, err := Parse(b)
		if err != nil {
			return
		}
		// Accepted: valid UTF-8, and no U+FFFD the device did not send.
		if !utf8.Valid(b) {
			t.Fatalf("Parse accepted invalid UTF-8 %q", b)
		}
		if !sentReplacement(b) {
			for _, a := range attrs {
				if hasReplacement(a.Value, 0) {
					t.Fatalf("Parse(%q) made up a U+FFFD in %s", b, a.Name)
				}
			}
		}
		r := Reading{Device: "d", Attrs: attrs}
		r.DropOrionInvalid()
		if err := r.Validate(); err == nil {
			// What validates has no reserved name and only finite numbers.
			for _, a := range r.Attrs {
				if ReservedName(a.Name) || (numericType(a.Type) && !finiteNumber(a.Value)) {
					t.Fatalf("Validate accepted %+v", a)
				}
			}
		}
	})
}

func TestDropOrionInvalid(t *testing.T) {
	r := Reading{Device: "th-1", Attrs: []Attribute{
		{"a b", TypeNumber, 1.0},
		{"id", TypeText, "x"},
		{"label", TypeText, "a<script>"},
		{"long", TypeText, "ok"},
		{"nested", TypeStructured, map[string]any{"k": []any{"x=1"}}},
		{"semi", "Num;ber", 1.0},
		{"temperature", TypeNumber, 21.5},
		{"type", TypeText, "x"},
		{"\u00e9t\u00e9", TypeNumber, 1.0},
	}}
	r.Attrs[3].Name = strings.Repeat("l", 257)
	got := r.DropOrionInvalid()
	want := []Dropped{
		{"a b", DropBadName}, {"id", DropReservedName}, {"label", DropForbiddenChars},
		{strings.Repeat("l", 257), DropBadName}, {"nested", DropForbiddenChars},
		{"semi", DropBadType}, {"type", DropReservedName}, {"\u00e9t\u00e9", DropBadName},
	}
	if len(got) != len(want) {
		t.Fatalf("dropped = %+v, want %d", got, len(want))
	}
	for i := range want {
		if got[i].Reason != want[i].Reason || !strings.HasPrefix(want[i].Name, strings.TrimSuffix(got[i].Name, "...")[:1]) {
			t.Errorf("dropped[%d] = %+v, want %+v", i, got[i], want[i])
		}
		if strings.Contains(got[i].Name, "script") || strings.Contains(got[i].Name, "x=1") {
			t.Errorf("dropped[%d] carries the value: %+v", i, got[i])
		}
	}
	if len(r.Attrs) != 1 || r.Attrs[0].Name != "temperature" {
		t.Fatalf("kept = %+v, want only temperature", r.Attrs)
	}
	if err := r.Validate(); err != nil {
		t.Fatalf("Validate after dropping = %v", err)
	}
	// Nothing left: the caller refuses the reading.
	empty := Reading{Device: "th-1", Attrs: []Attribute{{"label", TypeText, "(x)"}}}
	if d := empty.DropOrionInvalid(); len(d) != 1 || len(empty.Attrs) != 0 {
		t.Fatalf("dropped %+v, kept %+v", d, empty.Attrs)
	}
	if err := empty.Validate(); err == nil || !strings.Contains(err.Error(), "no attributes") {
		t.Fatalf("Validate of an emptied reading = %v", err)
	}
}

// TestParseRefusalReasons: each input rule of issue 17 item 8 refuses with
// its own counted reason, at Parse or per attribute.
func TestParseRefusalReasons(t *testing.T) {
	tests := []struct {
		name string
		in   string
		want string // Reason of Parse's error; "" when Parse accepts
		drop string // the reason DropOrionInvalid gives the attribute "x"
	}{
		{"invalid UTF-8", "{\"x\":\"caf\xe9\"}", ReasonBadUTF8, ""},
		{"invalid UTF-8 in a name", "{\"\xff\":1}", ReasonBadUTF8, ""},
		{"lone surrogate escape", `{"x":"\ud800"}`, ReasonBadUTF8, ""},
		{"lone surrogate escape in a name", `{"\udc00x":1}`, ReasonBadUTF8, ""},
		{"real replacement character is kept", `{"x":"\ufffd"}`, "", ""},
		{"1e999", `{"x":1e999}`, ReasonNotFinite, ""},
		{"-1e999 in NGSI form", `{"x":{"value":-1e999,"type":"Number"}}`, ReasonNotFinite, ""},
		{"string NaN typed Number", `{"x":{"value":"NaN","type":"Number"}}`, "", DropNotFinite},
		{"string Inf typed Integer", `{"x":{"value":"Inf","type":"Integer"}}`, "", DropNotFinite},
		{"string NaN as Text is text", `{"x":"NaN"}`, "", ""},
		{"attribute id", `{"id":"other-device","x":1}`, "", ""},
		{"finite", `{"x":1e308}`, "", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			attrs, _, err := Parse([]byte(tt.in))
			if tt.want != "" {
				if !errors.Is(err, ErrInvalid) || Reason(err) != tt.want {
					t.Fatalf("Parse(%q) = %v (reason %q), want reason %q", tt.in, err, Reason(err), tt.want)
				}
				if strings.ContainsRune(err.Error(), 0xfffd) {
					t.Errorf("error %q carries a replacement character", err)
				}
				return
			}
			if err != nil {
				t.Fatalf("Parse(%q) = %v", tt.in, err)
			}
			r := Reading{Device: "d", Attrs: attrs}
			dropped := r.DropOrionInvalid()
			got := ""
			for _, d := range dropped {
				if d.Name == "x" {
					got = d.Reason
				}
			}
			if got != tt.drop {
				t.Errorf("DropOrionInvalid(%q) = %+v, want x dropped for %q", tt.in, dropped, tt.drop)
			}
		})
	}
	// The reserved name is counted as such, not as a bad name.
	r := Reading{Device: "d", Attrs: []Attribute{{"id", TypeText, "other"}, {"x", TypeNumber, 1.0}}}
	if d := r.DropOrionInvalid(); len(d) != 1 || d[0].Reason != DropReservedName {
		t.Fatalf("dropped %+v, want id as %s", d, DropReservedName)
	}
	// Validate refuses what DropOrionInvalid drops, with the same reason.
	bad := Reading{Device: "d", Attrs: []Attribute{{"x", TypeNumber, "NaN"}}}
	if err := bad.Validate(); Reason(err) != DropNotFinite {
		t.Fatalf("Validate(NaN string) = %v, reason %q", err, Reason(err))
	}
}

func TestValidateDeviceID(t *testing.T) {
	for _, id := range []string{"th-1", "a.b_c-D9", "...", ".x", strings.Repeat("a", MaxDeviceIDLen)} {
		if err := ValidateDeviceID(id); err != nil {
			t.Errorf("ValidateDeviceID(%q) = %v, want nil", id, err)
		}
	}
	for _, tt := range []struct{ id, want string }{
		{"", "empty"}, {".", "relative path"}, {"..", "relative path"},
		{"a:b", "byte 1 (':')"}, {"a/b", "byte 1 ('/')"}, {"a%2e", "byte 1 ('%')"},
		{"a b", "byte 1 (0x20)"}, {"\xff", "byte 0 (0xff)"},
		{strings.Repeat("a", MaxDeviceIDLen+1), "longer than 255"},
	} {
		if err := ValidateDeviceID(tt.id); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("ValidateDeviceID(%q) = %v, want an error containing %q", tt.id, err, tt.want)
		}
	}
}
