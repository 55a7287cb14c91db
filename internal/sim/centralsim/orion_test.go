package centralsim

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"
)

// directPatch is PATCH {DirectBrokerURL}/v2/entities/{id}/attrs[?query].
func (f *fixture) directPatch(t *testing.T, id, query string, h http.Header, body string) response {
	t.Helper()
	if h == nil {
		h = http.Header{}
	}
	if h.Get("Content-Type") == "" {
		h.Set("Content-Type", "application/json")
	}
	u := f.sim.DirectBrokerURL() + "/v2/entities/" + id + "/attrs"
	if query != "" {
		u += "?" + query
	}
	return f.doHeaders(t, "PATCH", u, h, []byte(body))
}

func (f *fixture) directGet(t *testing.T, id, query string, h http.Header) response {
	t.Helper()
	u := f.sim.DirectBrokerURL() + "/v2/entities/" + id
	if query != "" {
		u += "?" + query
	}
	return f.doHeaders(t, "GET", u, h, nil)
}

// attrOf decodes one attribute of an entity read back.
func attrOf(t *testing.T, r response, name string) ngsiAttr {
	t.Helper()
	var doc map[string]json.RawMessage
	if err := json.Unmarshal(r.body, &doc); err != nil {
		t.Fatalf("entity %s: %v", r.body, err)
	}
	var a ngsiAttr
	if err := json.Unmarshal(doc[name], &a); err != nil {
		t.Fatalf("attribute %s of %s: %v", name, r.body, err)
	}
	return a
}

// TestOrionAttributeChecks: what Orion 3.12 refuses in a PATCH body, with
// its texts (parseEntity.cpp, parseContextAttribute.cpp, parseMetadata.cpp,
// ContextAttribute::check, Metadata::check, forbiddenChars.cpp).
func TestOrionAttributeChecks(t *testing.T) {
	f := newFixture(t)
	long := strings.Repeat("a", 257)
	tests := []struct {
		name string
		body string
		code string
		desc string
	}{
		{"id in payload", `{"id":"x","temperature":{"value":1}}`, "BadRequest", "entity id specified in payload"},
		{"type in payload", `{"type":"T","temperature":{"value":1}}`, "BadRequest", "entity type specified in payload"},
		{"empty object", `{}`, "BadRequest", "empty payload"},
		{"not JSON", `{"temperature":`, "ParseError", orionParseErrorDesc},
		{"array", `[]`, "ParseError", orionParseErrorDesc},
		{"unknown key in attribute", `{"temperature":{"value":1,"unit":"C"}}`, "BadRequest", "unrecognized property for context attribute"},
		{"type not a string", `{"temperature":{"value":1,"type":5}}`, "BadRequest", "invalid JSON type for attribute type"},
		{"empty type", `{"temperature":{"value":1,"type":""}}`, "BadRequest", "attribute type length: 0, min length supported: 1"},
		{"type with a slash", `{"temperature":{"value":1,"type":"a/b"}}`, "BadRequest", "Invalid characters in attribute type"},
		{"type too long", `{"temperature":{"value":1,"type":"` + long + `"}}`, "BadRequest", "attribute type length: 257, max length supported: 256"},
		{"name with a space", `{"temp erature":{"value":1}}`, "BadRequest", "Invalid characters in attribute name"},
		{"name with &", `{"a&b":{"value":1}}`, "BadRequest", "Invalid characters in attribute name"},
		{"name with ?", `{"a?b":{"value":1}}`, "BadRequest", "Invalid characters in attribute name"},
		{"name with #", `{"a#b":{"value":1}}`, "BadRequest", "Invalid characters in attribute name"},
		{"name not ASCII", `{"temp\u00e9":{"value":1}}`, "BadRequest", "Invalid characters in attribute name"},
		{"name too long", `{"` + long + `":{"value":1}}`, "BadRequest", "attribute name length: 257, max length supported: 256"},
		{"empty name", `{"":{"value":1}}`, "BadRequest", "attribute name length: 0, min length supported: 1"},
		{"value with <", `{"temperature":{"value":"a<b"}}`, "BadRequest", OrionInvalidValueChars},
		{"value with >", `{"temperature":{"value":"a>b"}}`, "BadRequest", OrionInvalidValueChars},
		{`value with "`, `{"temperature":{"value":"a\"b"}}`, "BadRequest", OrionInvalidValueChars},
		{"value with '", `{"temperature":{"value":"a'b"}}`, "BadRequest", OrionInvalidValueChars},
		{"value with =", `{"temperature":{"value":"a=b"}}`, "BadRequest", OrionInvalidValueChars},
		{"value with ;", `{"temperature":{"value":"a;b"}}`, "BadRequest", OrionInvalidValueChars},
		{"value with (", `{"temperature":{"value":"f(x"}}`, "BadRequest", OrionInvalidValueChars},
		{"value with )", `{"temperature":{"value":"x)"}}`, "BadRequest", OrionInvalidValueChars},
		{"compound value with <", `{"temperature":{"value":{"a":["ok","<"]}}}`, "BadRequest", OrionInvalidValueChars},
		{"metadata value with =", `{"temperature":{"value":1,"metadata":{"unit":{"type":"Text","value":"a=b"}}}}`, "BadRequest", OrionInvalidMetadataChars},
		{"metadata name with /", `{"temperature":{"value":1,"metadata":{"a/b":{"value":1}}}}`, "BadRequest", "Invalid characters in metadata name"},
		{"metadata type with space", `{"temperature":{"value":1,"metadata":{"m":{"type":"a b","value":1}}}}`, "BadRequest", "Invalid characters in metadata type"},
		{"metadata unknown key", `{"temperature":{"value":1,"metadata":{"m":{"value":1,"x":2}}}}`, "BadRequest", "invalid JSON field for attribute metadata"},
		{"metadata not an object", `{"temperature":{"value":1,"metadata":{"m":5}}}`, "BadRequest", "metadata must be a JSON object"},
		{"metadata vector not an object", `{"temperature":{"value":1,"metadata":[]}}`, "BadRequest", "metadata not a JSON object"},
		{"bad DateTime", `{"temperature":{"value":"yesterday","type":"DateTime"}}`, "BadRequest", "date has invalid format"},
		{"DateTime not a string", `{"temperature":{"value":5,"type":"DateTime"}}`, "BadRequest", "date has invalid format"},
		{"bad TimeInstant", `{"temperature":{"value":1,"metadata":{"TimeInstant":{"type":"DateTime","value":"noon"}}}}`, "BadRequest", "date has invalid format"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := f.directPatch(t, devTemp, "", nil, tt.body)
			oe := orionErr(t, r)
			if r.status != 400 || oe.Error != tt.code || oe.Description != tt.desc {
				t.Fatalf("got %d %+v, want 400 %s %q", r.status, oe, tt.code, tt.desc)
			}
		})
	}
	if n := len(f.sim.Updates()); n != 0 {
		t.Fatalf("%d updates recorded for refused bodies", n)
	}
	// Values of type TextUnrestricted are not checked.
	r := f.directPatch(t, devTemp, "", nil, `{"temperature":{"type":"TextUnrestricted","value":"a<b=(c)"}}`)
	if r.status != 204 {
		t.Fatalf("TextUnrestricted: %d %s", r.status, r.body)
	}
}

// TestOrionPatchSemantics: update of existing attributes only, 422
// PartialUpdate applying the rest, metadata merge, DateTime rendering,
// type kept when not given.
func TestOrionPatchSemantics(t *testing.T) {
	f := newFixture(t)
	// Partial: the existing attribute is written, the missing ones named
	// in request order, with id/type when the type was given.
	r := f.directPatch(t, devTemp, "type="+devType, nil, `{"wind":{"value":1},"temperature":{"type":"Number","value":20},"rain":{"value":2}}`)
	if oe := orionErr(t, r); r.status != 422 || oe.Error != "PartialUpdate" || oe.Description != "do not exist: "+devTemp+"/"+devType+" - [ wind, rain ]" {
		t.Fatalf("partial: %d %+v", r.status, oe)
	}
	if a := attrOf(t, f.directGet(t, devTemp, "", nil), "temperature"); string(a.Value) != "20" || a.Type != "Number" {
		t.Fatalf("applied part: %+v", a)
	}
	if u := f.sim.Updates(); len(u) != 1 || len(u[0].Attrs) != 1 || u[0].Attrs["temperature"] == nil {
		t.Fatalf("recorded: %+v", u)
	}
	r = f.directPatch(t, devTemp, "", nil, `{"wind":{"value":1}}`)
	if oe := orionErr(t, r); r.status != 422 || oe.Error != "Unprocessable" || oe.Description != "do not exist: "+devTemp+" - [ wind ]" {
		t.Fatalf("none exists: %d %+v", r.status, oe)
	}
	r = f.directPatch(t, devTemp, "type=Other", nil, `{"temperature":{"value":1}}`)
	if oe := orionErr(t, r); r.status != 404 || oe.Error != "NotFound" || oe.Description != orionNotFoundDesc {
		t.Fatalf("wrong type: %d %+v", r.status, oe)
	}
	r = f.directPatch(t, "urn:nobody", "", nil, `{"temperature":{"value":1}}`)
	if r.status != 404 {
		t.Fatalf("no entity: %d %s", r.status, r.body)
	}

	// Metadata: named ones replaced, others kept.
	steps := []struct {
		body string
		want map[string]string // metadata name -> value JSON
	}{
		{`{"humidity":{"type":"Number","value":40,"metadata":{"unit":{"type":"Text","value":"pct"},"TimeInstant":{"type":"DateTime","value":"2026-12-03T07:00:00Z"}}}}`,
			map[string]string{"unit": `"pct"`, "TimeInstant": `"2026-12-03T07:00:00.000Z"`}},
		{`{"humidity":{"value":41,"metadata":{"TimeInstant":{"type":"DateTime","value":"2026-12-03T08:00:00.5+01:00"}}}}`,
			map[string]string{"unit": `"pct"`, "TimeInstant": `"2026-12-03T07:00:00.500Z"`}},
		{`{"humidity":{"value":42}}`,
			map[string]string{"unit": `"pct"`, "TimeInstant": `"2026-12-03T07:00:00.500Z"`}},
	}
	for i, st := range steps {
		if r := f.directPatch(t, devTemp, "", nil, st.body); r.status != 204 {
			t.Fatalf("step %d: %d %s", i, r.status, r.body)
		}
		a := attrOf(t, f.directGet(t, devTemp, "", nil), "humidity")
		if a.Type != "Number" {
			t.Fatalf("step %d: type %q, want Number kept", i, a.Type)
		}
		if len(a.Metadata) != len(st.want) {
			t.Fatalf("step %d: metadata %v", i, a.Metadata)
		}
		for name, want := range st.want {
			var m struct {
				Value json.RawMessage `json:"value"`
			}
			_ = json.Unmarshal(a.Metadata[name], &m)
			if string(m.Value) != want {
				t.Fatalf("step %d: metadata %s = %s, want %s", i, name, m.Value, want)
			}
		}
	}
	// A DateTime attribute value is rendered as Orion does.
	f.sim.CreateEntity("", "clock-1", "Clock", map[string]string{"dateObserved": "DateTime"})
	if r := f.directPatch(t, "clock-1", "", nil, `{"dateObserved":{"type":"DateTime","value":"2026-12-03"}}`); r.status != 204 {
		t.Fatalf("DateTime: %d %s", r.status, r.body)
	}
	if a := attrOf(t, f.directGet(t, "clock-1", "", nil), "dateObserved"); string(a.Value) != `"2026-12-03T00:00:00.000Z"` {
		t.Fatalf("DateTime rendered %s", a.Value)
	}
	// Orion's own content-type check on the bare Orion.
	r = f.directPatch(t, devTemp, "", http.Header{"Content-Type": {"application/xml"}}, `{"humidity":{"value":1}}`)
	if oe := orionErr(t, r); r.status != 415 || oe.Description != "not supported content type: application/xml" {
		t.Fatalf("content type: %d %+v", r.status, oe)
	}
	// Bodies over Orion's 1 MB default.
	big := `{"humidity":{"value":"` + strings.Repeat("x", maxUpdateBytes) + `"}}`
	if r := f.directPatch(t, devTemp, "", nil, big); r.status != 413 {
		t.Fatalf("big body: %d", r.status)
	}
	// The device.php entity: latitude and longitude as float, the
	// declared attributes with value "".
	f.sim.CreateEntity("", "dev-x", "Sensor", map[string]string{"pm10": "float", "status": "string"})
	r = f.directGet(t, "dev-x", "type=Sensor", nil)
	for name, typ := range map[string]string{"latitude": "float", "longitude": "float", "pm10": "float", "status": "string"} {
		if a := attrOf(t, r, name); a.Type != typ || string(a.Value) != `""` {
			t.Fatalf("%s = %+v", name, a)
		}
	}
	if r := f.directGet(t, "dev-x", "attrs=pm10", nil); strings.Contains(string(r.body), "latitude") || !strings.Contains(string(r.body), "pm10") {
		t.Fatalf("attrs=pm10: %s", r.body)
	}
}

// TestOrionTenants: Fiware-Service is a separate tenant (lower-cased);
// Fiware-ServicePath defaults to "/" for updates and to every path for a
// query.
func TestOrionTenants(t *testing.T) {
	f := newFixture(t)
	f.sim.CreateEntity("city_a", devTemp, devType, map[string]string{"temperature": "Number"})
	svc := func(s string) http.Header { return http.Header{"Fiware-Service": {s}} }
	if r := f.directPatch(t, devTemp, "", svc("city_a"), `{"temperature":{"value":5}}`); r.status != 204 {
		t.Fatalf("tenant PATCH: %d %s", r.status, r.body)
	}
	if r := f.directPatch(t, devTemp, "", svc("CITY_A"), `{"temperature":{"value":6}}`); r.status != 204 {
		t.Fatalf("tenant in capitals: %d %s", r.status, r.body)
	}
	if e, _ := f.sim.TenantEntity("city_a", devTemp); e["temperature"].(map[string]any)["value"] != 6.0 {
		t.Fatalf("tenant entity %v", e)
	}
	if e, _ := f.sim.Entity(devTemp); e["temperature"].(map[string]any)["value"] != "" {
		t.Fatalf("default tenant touched: %v", e["temperature"])
	}
	if r := f.directPatch(t, devTemp, "", svc("city_b"), `{"temperature":{"value":5}}`); r.status != 404 {
		t.Fatalf("other tenant: %d %s", r.status, r.body)
	}
	r := f.directPatch(t, devTemp, "", svc("bad-name"), `{"temperature":{"value":5}}`)
	if oe := orionErr(t, r); r.status != 400 || !strings.HasPrefix(oe.Description, "bad character in tenant name") {
		t.Fatalf("bad tenant: %d %+v", r.status, oe)
	}
	// Service paths: entities are created in "/".
	if r := f.directPatch(t, devTemp, "", http.Header{"Fiware-ServicePath": {"/other"}}, `{"temperature":{"value":5}}`); r.status != 404 {
		t.Fatalf("other service path: %d", r.status)
	}
	if r := f.directGet(t, devTemp, "", http.Header{"Fiware-ServicePath": {"/#"}}); r.status != 200 {
		t.Fatalf("query /#: %d", r.status)
	}
	if r := f.directGet(t, devTemp, "", http.Header{"Fiware-ServicePath": {"/other"}}); r.status != 404 {
		t.Fatalf("query /other: %d", r.status)
	}
	// Through the filter, the headers are forwarded.
	h := http.Header{"Authorization": {"Bearer " + f.token(t, "alice", time.Minute)}, "Fiware-Service": {"city_a"}, "Content-Type": {"application/json"}}
	r = f.doHeaders(t, "PATCH", f.sim.BrokerURL()+"/v2/entities/"+devTemp+"/attrs", h, []byte(`{"temperature":{"value":7}}`))
	if e, _ := f.sim.TenantEntity("city_a", devTemp); r.status != 204 || e["temperature"].(map[string]any)["value"] != 7.0 {
		t.Fatalf("tenant through the filter: %d %s, %v", r.status, r.body, e)
	}
}
