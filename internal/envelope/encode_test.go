package envelope

import (
	"encoding/json"
	"math"
	"testing"
	"time"
)

// referenceSeal and referenceBody are the straightforward encoding/json and
// jws.Sign implementations the hand-rolled encoders replace.
func referenceSeal(t *testing.T, k Key, c Claims) string {
	t.Helper()
	return jwxSeal(t, k, c) // sealbody_test.go
}

func referenceBody(t *testing.T, c Claims, compact, sigAttr string) []byte {
	t.Helper()
	type attr struct {
		Type     string                     `json:"type"`
		Value    any                        `json:"value"`
		Metadata map[string]json.RawMessage `json:"metadata,omitempty"`
	}
	ts, _ := json.Marshal(map[string]string{"type": "DateTime", "value": c.Time.UTC().Format("2006-01-02T15:04:05.999Z07:00")})
	sig, _ := json.Marshal(map[string]string{"type": "Text", "value": compact})
	meta := map[string]json.RawMessage{"TimeInstant": ts, sigAttr: sig}
	out := map[string]attr{}
	for n, a := range c.Attrs {
		out[n] = attr{Type: a.Type, Value: a.Value, Metadata: meta}
	}
	b, err := json.Marshal(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestEncodersMatchEncodingJSON(t *testing.T) {
	k := testKey(t, "th-1", "k1-aaa", "k2-bbb")
	tests := []struct {
		name  string
		attrs map[string]Attr
	}{
		{"numbers", map[string]Attr{"t": {"Number", 21.5}, "h": {"Number", 40.0}, "z": {"Number", 0.0}}},
		{"float formats", map[string]Attr{"a": {"Number", 1e21}, "b": {"Number", 1e-7}, "c": {"Number", -123456789.125}, "d": {"Number", math.MaxFloat64}, "e": {"Number", 5e-324}}},
		{"strings", map[string]Attr{"s": {"Text", "plain"}, "u": {"Text", "héllo \u2028 <b>&\"\\\n\x01"}, "bad": {"Text", "\xff\xfe"}}},
		{"bool and null", map[string]Attr{"on": {"Boolean", true}, "off": {"Boolean", false}, "n": {"None", nil}}},
		{"structured", map[string]Attr{"loc": {"StructuredValue", map[string]any{"z": []any{1.5, "x", nil, map[string]any{"b": true, "a": 2.0}}, "a": "b"}}}},
		{"other types", map[string]Attr{"i": {"Number", 42}, "n": {"Number", json.Number("3.25")}}},
		{"none", map[string]Attr{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := Claims{Version: Version, Gateway: "gw-1", Device: "th-1", Seq: 7,
				Time: time.Date(2026, 11, 26, 5, 0, 0, 123456789, time.UTC), Attrs: tt.attrs}
			got, err := Seal(k, c)
			if err != nil {
				t.Fatal(err)
			}
			if want := referenceSeal(t, k, c); got != want {
				t.Errorf("Seal = %s\nwant %s", got, want)
			}
			if _, err := Open(got, k); err != nil {
				t.Errorf("Open(Seal) = %v", err)
			}
			if len(c.Attrs) == 0 {
				if _, err := Body(c, got, "signature"); err == nil {
					t.Error("Body without attributes = nil error, want one (Orion refuses an empty update)")
				}
				return
			}
			body, err := Body(c, got, "signature")
			if err != nil {
				t.Fatal(err)
			}
			// A signature metadata name that sorts before TimeInstant.
			if b2, err := Body(c, got, "Asig"); err != nil || string(b2) != string(referenceBody(t, c, got, "Asig")) {
				t.Errorf("Body(Asig) = %s, %v\nwant %s", b2, err, referenceBody(t, c, got, "Asig"))
			}
			if want := referenceBody(t, c, got, "signature"); string(body) != string(want) {
				t.Errorf("Body = %s\nwant %s", body, want)
			}
		})
	}
}

func TestSealRefusesWhatJSONRefuses(t *testing.T) {
	k := testKey(t, "th-1", "k1-aaa", "k2-bbb")
	c := Claims{Version: Version, Device: "th-1", Time: time.Now(), Attrs: map[string]Attr{"x": {"Number", math.NaN()}}}
	if _, err := Seal(k, c); err == nil {
		t.Error("Seal with NaN = nil error, want one")
	}
	if _, err := Body(c, "a.b.c", ""); err == nil {
		t.Error("Body with NaN = nil error, want one")
	}
}
