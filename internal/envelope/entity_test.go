package envelope

import (
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/reading"
)

// orionEntity is a stand-in for what stock Orion 3.12 stores of one entity
// and answers to GET /v2/entities/{id} (normalized): a PATCH of attrs
// updates the attributes the entity has and skips the others (422
// PartialUpdate), replaces type and value, and merges metadata — those not
// named in the update are kept (orion-api.md, "Attribute metadata").
// Numbers come back as double2string renders them ("%.9f", trailing
// zeros trimmed; src/lib/common/string.cpp).
type orionEntity struct {
	id, typ string
	attrs   map[string]map[string]any // name -> {"type","value","metadata"}
}

func newOrionEntity(id, typ string, attrs ...string) *orionEntity {
	e := &orionEntity{id: id, typ: typ, attrs: map[string]map[string]any{}}
	for _, a := range attrs {
		// What the IoT Directory's insert creates: value "", no metadata.
		e.attrs[a] = map[string]any{"type": "Number", "value": "", "metadata": map[string]any{}}
	}
	return e
}

func (e *orionEntity) patch(t *testing.T, body []byte) (missing []string) {
	t.Helper()
	var upd map[string]map[string]any
	if err := json.Unmarshal(body, &upd); err != nil {
		t.Fatalf("PATCH body is not an attribute object: %v", err)
	}
	for name, a := range upd {
		cur, ok := e.attrs[name]
		if !ok {
			missing = append(missing, name)
			continue
		}
		cur["type"], cur["value"] = a["type"], orionRender(a["value"])
		meta := cur["metadata"].(map[string]any)
		if m, ok := a["metadata"].(map[string]any); ok {
			for k, v := range m {
				meta[k] = v
			}
		}
	}
	return missing
}

// orionRender renders numbers as Orion's double2string does.
func orionRender(v any) any {
	f, ok := v.(float64)
	if !ok || f != f {
		return v
	}
	if f == float64(int64(f)) {
		return f
	}
	s := strings.TrimRight(fmt.Sprintf("%.9f", f), "0")
	s = strings.TrimSuffix(s, ".")
	g, _ := strconv.ParseFloat(s, 64)
	return g
}

func (e *orionEntity) get(t *testing.T) []byte {
	t.Helper()
	doc := map[string]any{"id": e.id, "type": e.typ}
	for n, a := range e.attrs {
		doc[n] = a
	}
	b, err := json.Marshal(doc)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func sealBody(t *testing.T, k Key, seq uint64, r *reading.Reading) []byte {
	t.Helper()
	c := ClaimsOf("gw-1", seq, r)
	jws, err := Seal(k, c)
	if err != nil {
		t.Fatal(err)
	}
	body, err := Body(c, jws, "")
	if err != nil {
		t.Fatal(err)
	}
	return body
}

func verdicts(rep EntityReport) map[string]AttrReport {
	m := map[string]AttrReport{}
	for _, a := range rep.Attrs {
		m[a.Name] = a
	}
	return m
}

// A body goes through a simulated Orion (merge by attribute) and the
// entity read back verifies attribute by attribute, each with the reading
// that last wrote it.
func TestEntityRoundTripThroughOrionStorage(t *testing.T) {
	k := testKey(t, "th-1", "k1-aaa", "k2-bbb")
	e := newOrionEntity("th-1", "Thermometer", "latitude", "longitude", "temperature", "humidity")
	t1 := time.Date(2026, 11, 26, 5, 0, 0, 123456789, time.UTC)
	r1 := &reading.Reading{Device: "th-1", Time: t1, Attrs: []reading.Attribute{
		{Name: "humidity", Type: "Number", Value: 40.0},
		{Name: "temperature", Type: "Number", Value: 21.5},
		{Name: "voltage", Type: "Number", Value: 3.3}, // not in the model
	}}
	if missing := e.patch(t, sealBody(t, k, 1, r1)); len(missing) != 1 || missing[0] != "voltage" {
		t.Fatalf("missing = %v, want [voltage] (PartialUpdate)", missing)
	}
	// A later reading of one attribute only (a MySensors node), with more
	// decimals than Orion keeps.
	t2 := t1.Add(time.Minute)
	r2 := &reading.Reading{Device: "th-1", Time: t2, Attrs: []reading.Attribute{
		{Name: "humidity", Type: "Number", Value: 41.1234567891234},
	}}
	e.patch(t, sealBody(t, k, 2, r2))

	rep, err := VerifyEntity(e.get(t), []Key{k}, "")
	if err != nil {
		t.Fatal(err)
	}
	if rep.ID != "th-1" || rep.Type != "Thermometer" || rep.Bad() != 0 {
		t.Fatalf("report = %+v", rep)
	}
	v := verdicts(rep)
	if a := v["temperature"]; a.Verdict != Verified || a.Seq != 1 || !a.Time.Equal(t1) || a.Gateway != "gw-1" {
		t.Errorf("temperature = %+v, want verified by seq 1", a)
	}
	if a := v["humidity"]; a.Verdict != Verified || a.Seq != 2 || !a.Time.Equal(t2) {
		t.Errorf("humidity = %+v, want verified by seq 2 (overwritten by a later reading)", a)
	}
	for _, n := range []string{"latitude", "longitude"} {
		if a := v[n]; a.Verdict != Unsigned {
			t.Errorf("%s = %+v, want unsigned", n, a)
		}
	}

	// Someone changes a stored value: detected on that attribute only.
	e.attrs["temperature"]["value"] = 25.0
	v = verdicts(mustVerify(t, e.get(t), []Key{k}))
	if a := v["temperature"]; a.Verdict != Tampered || a.Seq != 1 || !strings.Contains(a.Detail, "value") {
		t.Errorf("changed temperature = %+v, want tampered (seq 1)", a)
	}
	if v["humidity"].Verdict != Verified {
		t.Errorf("humidity = %+v after another attribute changed", v["humidity"])
	}
	// Or its observation time.
	e.attrs["temperature"]["value"] = 21.5
	e.attrs["temperature"]["metadata"].(map[string]any)["TimeInstant"] = map[string]any{"type": "DateTime", "value": "2026-11-26T04:00:00.000Z"}
	if a := verdicts(mustVerify(t, e.get(t), []Key{k}))["temperature"]; a.Verdict != Tampered {
		t.Errorf("changed TimeInstant = %+v, want tampered", a)
	}
}

func TestVerifyEntityVerdicts(t *testing.T) {
	k := testKey(t, "th-1", "k1-aaa", "k2-bbb")
	other := testKey(t, "th-1", "k1-zzz", "k2-zzz")
	r := sampleReading()
	good := sealBody(t, k, 3, r)
	entity := func(body []byte) []byte { return append([]byte(`{"id":"th-1","type":"T",`), body[1:]...) }

	// Signed with another key.
	if a := verdicts(mustVerify(t, entity(sealBody(t, other, 3, r)), []Key{k}))["temperature"]; a.Verdict != WrongKey {
		t.Errorf("other key: %+v, want wrong_key", a)
	}
	// A reading of another device copied into this entity.
	r2 := sampleReading()
	r2.Device = "th-2"
	if a := verdicts(mustVerify(t, entity(sealBody(t, k, 3, r2)), []Key{k}))["temperature"]; a.Verdict != Tampered || !strings.Contains(a.Detail, "th-2") {
		t.Errorf("other device: %+v, want tampered", a)
	}
	// A signature copied onto an attribute the reading did not sign.
	moved := strings.Replace(string(entity(good)), `"humidity"`, `"pressure"`, 1)
	if a := verdicts(mustVerify(t, []byte(moved), []Key{k}))["pressure"]; a.Verdict != Tampered {
		t.Errorf("moved signature: %+v, want tampered", a)
	}
	// A signed attribute whose signature was removed along with a change of
	// its value: tampered, not merely unsigned; an attribute no reading
	// signs (the directory's latitude) stays unsigned.
	var doc map[string]json.RawMessage
	if err := json.Unmarshal(entity(good), &doc); err != nil {
		t.Fatal(err)
	}
	doc["humidity"] = json.RawMessage(`{"type":"Number","value":99}`)
	doc["latitude"] = json.RawMessage(`{"type":"float","value":"43.7"}`)
	stripped, _ := json.Marshal(doc)
	v0 := verdicts(mustVerify(t, stripped, []Key{k}))
	if v0["humidity"].Verdict != Tampered || !strings.Contains(v0["humidity"].Detail, "signature was removed") {
		t.Errorf("stripped signature: %+v, want tampered", v0["humidity"])
	}
	if v0["latitude"].Verdict != Unsigned || v0["temperature"].Verdict != Verified {
		t.Errorf("beside a stripped signature: latitude %+v, temperature %+v", v0["latitude"], v0["temperature"])
	}
	// A signature that is not an envelope.
	garbage := `{"id":"th-1","t":{"type":"Number","value":1,"metadata":{"signature":{"type":"Text","value":"a.b.c"}}},` +
		`"u":{"type":"Number","value":1,"metadata":{"signature":{"type":"Text","value":7}}}}`
	v := verdicts(mustVerify(t, []byte(garbage), []Key{k}))
	if v["t"].Verdict != Malformed || v["u"].Verdict != Malformed {
		t.Errorf("garbage signatures: %+v", v)
	}
	for _, doc := range []string{`[]`, `{"type":"T"}`, `{"id":1}`, `{`} {
		if _, err := VerifyEntity([]byte(doc), []Key{k}, ""); err == nil {
			t.Errorf("VerifyEntity(%s) = nil error", doc)
		}
	}
}

func TestOrionNumber(t *testing.T) {
	for _, tt := range []struct{ in, want float64 }{
		{21.5, 21.5},
		{0.1234567891, 0.123456789},
		{2.00000000001, 2},
		{7.999999999536117, 8},
		{-123.4567890004, -123.456789},
		{1e21, 1e21},
	} {
		if got := orionNumber(tt.in); got != tt.want {
			t.Errorf("orionNumber(%v) = %v, want %v", tt.in, got, tt.want)
		}
	}
}

func mustVerify(t *testing.T, doc []byte, keys []Key) EntityReport {
	t.Helper()
	rep, err := VerifyEntity(doc, keys, "")
	if err != nil {
		t.Fatalf("VerifyEntity: %v", err)
	}
	return rep
}
