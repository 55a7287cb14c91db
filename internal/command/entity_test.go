package command

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/envelope"
	"github.com/edgegate/edgegate/policy"
)

func testRelay(t testing.TB) *policy.Device {
	t.Helper()
	p, err := policy.New(0, "config", []policy.Registration{{ID: "relay-1", Type: "Relay", Owner: "alice",
		Broker: "https://b.example/f", K1: "k1-relay-0123", K2: "k2-relay-0123", Kind: policy.KindActuator}})
	if err != nil {
		t.Fatal(err)
	}
	d, _ := p.Device("relay-1")
	return d
}

// signedAttr is an attribute as the gateway's uplink leaves it: value,
// type and the signature metadata over them.
func signedAttr(t testing.TB, d *policy.Device, name string, value any, typ string) string {
	t.Helper()
	jws, err := envelope.Seal(d.Key(), envelope.Claims{Version: envelope.Version, Gateway: "gw", Device: d.ID, Seq: 1,
		Time: time.Unix(1700000000, 0).UTC(), Attrs: map[string]envelope.Attr{name: {Type: typ, Value: value}}})
	if err != nil {
		t.Fatal(err)
	}
	v, _ := json.Marshal(value)
	return fmt.Sprintf(`{"type":%q,"value":%s,"metadata":{"signature":{"type":"Text","value":%q}}}`, typ, v, jws)
}

func TestReadEntity(t *testing.T) {
	d := testRelay(t)
	signedOn := signedAttr(t, d, "status", true, "Boolean")
	tampered := strings.Replace(signedOn, `"value":true`, `"value":false`, 1)
	for _, tt := range []struct {
		name   string
		body   string
		want   string // "attr=value/reported|target", joined by spaces
		errSub string
	}{
		{"app's write", `{"id":"relay-1","type":"Relay","status":{"type":"Boolean","value":true,"metadata":{}}}`, "status=true/target", ""},
		{"directory placeholder", `{"id":"relay-1","type":"Relay","status":{"type":"Boolean","value":""}}`, "", ""},
		{"gateway's signed state", `{"id":"relay-1","type":"Relay","status":` + signedOn + `}`, "status=true/reported", ""},
		{"app's write over the signed state", `{"id":"relay-1","type":"Relay","status":` + tampered + `}`, "status=false/target", ""},
		{"location is not a command", `{"id":"relay-1","type":"Relay","latitude":{"type":"float","value":43.7}}`, "", ""},
		{"bad type skipped", `{"id":"relay-1","type":"Relay","status":{"type":"a b","value":1}}`, "", ""},
		{"no type: Orion's default", `{"id":"relay-1","type":"Relay","level":{"value":40}}`, "level=40/target", ""},
		{"another entity", `{"id":"relay-2","type":"Relay","status":{"type":"Boolean","value":true}}`, "", "answered entity"},
		{"not JSON", `{"id":`, "", "malformed"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got, err := readEntity([]byte(tt.body), d, "")
			if tt.errSub != "" {
				if err == nil || !strings.Contains(err.Error(), tt.errSub) {
					t.Fatalf("readEntity error = %v, want one with %q", err, tt.errSub)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var parts []string
			for _, f := range got {
				kind := "target"
				if f.reported {
					kind = "reported"
				}
				parts = append(parts, f.attr+"="+string(f.value)+"/"+kind)
			}
			if s := strings.Join(parts, " "); s != tt.want {
				t.Errorf("readEntity = %q, want %q", s, tt.want)
			}
		})
	}
}

// The same write read twice is one mark; the same value over another
// signed state is another.
func TestMarkTellsWritesApart(t *testing.T) {
	a := attrDoc{Type: "Boolean", Value: json.RawMessage(`true`), Metadata: json.RawMessage(`{"signature":{"type":"Text","value":"x.y.z"}}`)}
	b := a
	b.Value = json.RawMessage(` true `)
	c := a
	c.Metadata = json.RawMessage(`{"signature":{"type":"Text","value":"x.y.w"}}`)
	if mark(a) != mark(b) || mark(a) == mark(c) {
		t.Errorf("marks: %s %s %s", mark(a), mark(b), mark(c))
	}
}

// FuzzReadEntity: whatever the broker answers, reading it never panics,
// and every target it finds is a writable attribute with a valid type and
// a bounded value.
func FuzzReadEntity(f *testing.F) {
	d := testRelay(f)
	f.Add([]byte(`{"id":"relay-1","type":"Relay","status":{"type":"Boolean","value":true}}`))
	f.Add([]byte(`{"id":"relay-1","type":"Relay","status":` + signedAttr(f, d, "status", true, "Boolean") + `}`))
	f.Add([]byte(`{"id":"relay-1","latitude":{"value":1},"x":{"value":{"a":[1,2]}}}`))
	f.Add([]byte(`[]`))
	f.Fuzz(func(t *testing.T, body []byte) {
		got, err := readEntity(body, d, "")
		if err != nil {
			return
		}
		for _, g := range got {
			if !d.Writes(g.attr) || g.typ == "" || len(g.value) > maxValueBytes || (!g.reported && g.mark == "") {
				t.Fatalf("found %+v in %q", g, body)
			}
		}
	})
}
