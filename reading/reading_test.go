package reading

import (
	"errors"
	"strings"
	"testing"
	"time"
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
	f.Fuzz(func(t *testing.T, b []byte) {
		attrs, _, err := Parse(b)
		if err != nil {
			return
		}
		r := Reading{Device: "d", Attrs: attrs}
		_ = r.Validate() // must not panic; NGSI rules are checked here
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
		{"a b", DropBadName}, {"id", DropBadName}, {"label", DropForbiddenChars},
		{strings.Repeat("l", 257), DropBadName}, {"nested", DropForbiddenChars},
		{"semi", DropBadType}, {"type", DropBadName}, {"\u00e9t\u00e9", DropBadName},
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
