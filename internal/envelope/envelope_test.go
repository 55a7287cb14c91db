package envelope

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/reading"
)

func testKey(t testing.TB, dev, k1, k2 string) Key {
	t.Helper()
	k, err := DeriveHS256(dev, k1, k2)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func sampleReading() *reading.Reading {
	return &reading.Reading{
		Device: "th-1",
		Time:   time.Date(2026, 11, 26, 5, 0, 0, 123000000, time.UTC),
		Attrs: []reading.Attribute{
			{Name: "humidity", Type: "Number", Value: 40.0},
			{Name: "temperature", Type: "Number", Value: 21.5},
		},
	}
}

func TestSealOpenRoundTrip(t *testing.T) {
	k := testKey(t, "th-1", "k1-aaa", "k2-bbb")
	c := ClaimsOf("gw-1", 42, sampleReading())
	jws, err := Seal(k, c)
	if err != nil {
		t.Fatal(err)
	}
	got, err := Open(jws, k)
	if err != nil {
		t.Fatalf("Open = %v", err)
	}
	if got.Device != "th-1" || got.Seq != 42 || got.Gateway != "gw-1" || !got.Time.Equal(c.Time) {
		t.Errorf("Open claims = %+v", got)
	}
	if got.Attrs["temperature"].Value != 21.5 {
		t.Errorf("temperature = %v", got.Attrs["temperature"])
	}
}

func TestDerivationIsPerDeviceAndKeyed(t *testing.T) {
	a := testKey(t, "d1", "k1", "k2")
	b := testKey(t, "d2", "k1", "k2")
	c := testKey(t, "d1", "k1", "k2x")
	// "k1"+"\x00"+"k2" must not collide with a split elsewhere.
	d := testKey(t, "d1", "k1\x00k", "2")
	if a.ID() == b.ID() || a.ID() == c.ID() || a.ID() == d.ID() {
		t.Fatalf("distinct inputs gave one key id: %s %s %s %s", a.ID(), b.ID(), c.ID(), d.ID())
	}
	if again := testKey(t, "d1", "k1", "k2"); again.ID() != a.ID() {
		t.Fatalf("derivation is not deterministic")
	}
	if _, err := DeriveHS256("d", "", "x"); err == nil {
		t.Fatal("empty k1 accepted")
	}
}

func TestKeyNeverPrinted(t *testing.T) {
	k := testKey(t, "d1", "canary-k1", "canary-k2")
	for _, s := range []string{fmt.Sprint(k), fmt.Sprintf("%v %+v %#v %s", k, k, k, k)} {
		if strings.Contains(s, string(k.secret)) || strings.Contains(s, "canary") {
			t.Fatalf("key printed: %q", s)
		}
	}
}

func TestOpenVerdicts(t *testing.T) {
	k := testKey(t, "th-1", "k1-aaa", "k2-bbb")
	other := testKey(t, "th-1", "k1-zzz", "k2-bbb")
	jws, err := Seal(k, ClaimsOf("gw-1", 1, sampleReading()))
	if err != nil {
		t.Fatal(err)
	}
	parts := strings.Split(jws, ".")
	payload, _ := base64.RawURLEncoding.DecodeString(parts[1])
	forged := strings.Replace(string(payload), `21.5`, `99.5`, 1)
	tamperedJWS := parts[0] + "." + base64.RawURLEncoding.EncodeToString([]byte(forged)) + "." + parts[2]

	noneHdr := base64.RawURLEncoding.EncodeToString([]byte(`{"alg":"none","kid":"` + k.ID() + `"}`))
	noneJWS := noneHdr + "." + parts[1] + "."
	// HS256 header with another key id: verification must not even try.
	tests := []struct {
		name string
		in   string
		key  Key
		want error
	}{
		{"valid", jws, k, nil},
		{"wrong key", jws, other, ErrWrongKey},
		{"tampered payload", tamperedJWS, k, ErrTampered},
		{"alg none", noneJWS, k, ErrWrongKey},
		{"garbage", "not.a.jws", k, ErrMalformed},
		{"empty", "", k, ErrMalformed},
		{"oversized", strings.Repeat("a", MaxEnvelopeBytes+1), k, ErrMalformed},
		{"json serialization", `{"payload":"e30","signatures":[]}`, k, ErrMalformed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Open(tt.in, tt.key)
			if !errors.Is(err, tt.want) {
				t.Fatalf("Open(%s) = %v, want %v", tt.name, err, tt.want)
			}
		})
	}
}

func TestBodyAndVerifyAttrs(t *testing.T) {
	k := testKey(t, "th-1", "k1-aaa", "k2-bbb")
	c := ClaimsOf("gw-1", 7, sampleReading())
	jws, err := Seal(k, c)
	if err != nil {
		t.Fatal(err)
	}
	body, err := Body(c, jws, "signature")
	if err != nil {
		t.Fatal(err)
	}
	var doc map[string]ngsiAttr
	if err := json.Unmarshal(body, &doc); err != nil {
		t.Fatal(err)
	}
	if _, ok := doc["signature"]; ok || len(doc) != 2 {
		t.Fatalf("body has attributes %v, want only the reading's (no signature attribute)", doc)
	}
	for _, name := range []string{"humidity", "temperature"} {
		a := doc[name]
		var sig, ti ngsiMeta
		_ = json.Unmarshal(a.Metadata["signature"], &sig)
		_ = json.Unmarshal(a.Metadata["TimeInstant"], &ti)
		if sig.Type != "Text" || sig.Value != jws {
			t.Errorf("%s: signature metadata = %+v, want the JWS as Text", name, sig)
		}
		if ti.Type != "DateTime" || ti.Value != "2026-11-26T05:00:00.123Z" {
			t.Errorf("%s: TimeInstant metadata = %+v", name, ti)
		}
	}
	if doc["temperature"].Value != 21.5 || doc["temperature"].Type != "Number" {
		t.Fatalf("temperature attribute = %v", doc["temperature"])
	}
	if _, err := VerifyAttrs(body, k, "signature"); err != nil {
		t.Fatalf("VerifyAttrs(body) = %v", err)
	}
	// The same body with one attribute left out (Orion would refuse it)
	// still verifies: its JWS signs more than the body carries.
	delete(c.Attrs, "humidity")
	partial, err := Body(c, jws, "signature")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := VerifyAttrs(partial, k, "signature"); err != nil {
		t.Fatalf("VerifyAttrs(body without an attribute) = %v", err)
	}

	entity := strings.Replace(string(body), "{", `{"id":"th-1","type":"T",`, 1)
	tests := []struct {
		name string
		doc  string
		want error
	}{
		{"changed value", strings.Replace(entity, `"value":21.5`, `"value":22.5`, 1), ErrTampered},
		{"changed type", strings.Replace(entity, `"type":"Number","value":21.5`, `"type":"Text","value":21.5`, 1), ErrTampered},
		{"changed time", strings.Replace(entity, `05:00:00.123Z`, `06:00:00.123Z`, 1), ErrTampered},
		{"other entity", strings.Replace(entity, `"id":"th-1"`, `"id":"th-2"`, 1), ErrTampered},
		{"unsigned attribute", strings.Replace(entity, `"humidity"`, `"humidity_x"`, 1), ErrTampered},
		{"no signature", `{"id":"th-1","temperature":{"type":"Number","value":1}}`, ErrMalformed},
		{"not json", `{"id"`, ErrMalformed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := VerifyAttrs([]byte(tt.doc), k, "signature")
			if !errors.Is(err, tt.want) {
				t.Fatalf("VerifyAttrs(%s) = %v, want %v", tt.name, err, tt.want)
			}
		})
	}
}

// The older form, a top-level signature attribute, is still read.
func TestVerifyAttrsLegacyForm(t *testing.T) {
	k := testKey(t, "th-1", "k1-aaa", "k2-bbb")
	c := ClaimsOf("gw-1", 7, sampleReading())
	jws, err := Seal(k, c)
	if err != nil {
		t.Fatal(err)
	}
	doc := `{"humidity":{"type":"Number","value":40},"signature":{"type":"string","value":"` + jws + `"},"temperature":{"type":"Number","value":21.5}}`
	if _, err := VerifyAttrs([]byte(doc), k, "signature"); err != nil {
		t.Fatalf("VerifyAttrs(legacy) = %v", err)
	}
	if _, err := VerifyAttrs([]byte(strings.Replace(doc, "21.5", "22", 1)), k, "signature"); !errors.Is(err, ErrTampered) {
		t.Fatalf("VerifyAttrs(legacy, changed) = %v, want ErrTampered", err)
	}
}

func TestBodyRefusesTimeInstantAsSignatureName(t *testing.T) {
	c := ClaimsOf("gw", 1, sampleReading())
	if _, err := Body(c, "a.b.c", "TimeInstant"); !errors.Is(err, reading.ErrInvalid) {
		t.Fatalf("Body with signature metadata TimeInstant = %v, want ErrInvalid", err)
	}
	c.Attrs = nil
	if _, err := Body(c, "a.b.c", ""); !errors.Is(err, reading.ErrInvalid) {
		t.Fatalf("Body without attributes = %v, want ErrInvalid", err)
	}
}

func BenchmarkSeal(b *testing.B) {
	k := testKey(b, "th-1", "k1-aaa", "k2-bbb")
	c := ClaimsOf("gw-1", 1, sampleReading())
	b.ReportAllocs()
	for b.Loop() {
		jws, err := Seal(k, c)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := Body(c, jws, "signature"); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkOpen(b *testing.B) {
	k := testKey(b, "th-1", "k1-aaa", "k2-bbb")
	jws, err := Seal(k, ClaimsOf("gw-1", 1, sampleReading()))
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Open(jws, k); err != nil {
			b.Fatal(err)
		}
	}
}
