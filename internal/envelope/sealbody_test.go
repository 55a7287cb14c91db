package envelope

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v2/jws"

	"github.com/edgegate/edgegate/internal/reading"
)

// jwxSeal is Seal as jwx renders it (the implementation before issue 20
// signed through jws.NewSigner; jws.Sign is the reference both match):
// json.Marshal of the claims, the same protected header, any algorithm.
func jwxSeal(t testing.TB, k Key, c Claims) string {
	t.Helper()
	payload, err := json.Marshal(c)
	if err != nil {
		t.Fatal(err)
	}
	hdr := jws.NewHeaders()
	_ = hdr.Set(jws.KeyIDKey, k.id)
	_ = hdr.Set(jws.TypeKey, "edgegate-reading+jws")
	out, err := jws.Sign(payload, jws.WithKey(k.alg, k.signingKey(), jws.WithProtectedHeaders(hdr)))
	if err != nil {
		t.Fatal(err)
	}
	return string(out)
}

func allAlgKeys(t testing.TB) []Key {
	t.Helper()
	keys := []Key{testKey(t, "th-1", "k1-aaa", "k2-bbb")}
	for _, alg := range []string{AlgEdDSA, AlgES256} {
		k, err := GenerateKey(alg)
		if err != nil {
			t.Fatal(err)
		}
		keys = append(keys, k)
	}
	return keys
}

// sealBodyReadings are readings of every value kind Parse produces.
func sealBodyReadings() []*reading.Reading {
	tm := time.Date(2026, 11, 26, 5, 0, 0, 123456789, time.UTC)
	return []*reading.Reading{
		sampleReading(),
		{Device: "th-1", Time: tm, Attrs: []reading.Attribute{
			{Name: "a", Type: "Number", Value: 1e21}, {Name: "b", Type: "Number", Value: 1e-7},
			{Name: "c", Type: "Number", Value: -123456789.125}, {Name: "d", Type: "Number", Value: math.MaxFloat64},
			{Name: "label", Type: "Text", Value: "héllo \u2028 <b>&\\\n\x01 \U0001F600"},
			{Name: "n", Type: "None", Value: nil}, {Name: "on", Type: "Boolean", Value: true},
			{Name: "pos", Type: "StructuredValue", Value: map[string]any{"z": []any{1.5, "x", nil, map[string]any{"b": true, "a": 2.0}}, "a": "b"}},
		}},
		{Device: "x.y_z-1", Time: tm.In(time.FixedZone("CET", 3600)), Attrs: []reading.Attribute{{Name: "t", Type: "Float", Value: 0.0}}},
	}
}

// TestSealBodyMatchesSealAndBody: SealBody renders byte for byte what
// ClaimsOf + Seal + Body render, and the JWS is what jws.Sign renders for
// the deterministic algorithms (HS256, EdDSA); an ES256 signature (random)
// verifies through jwx and Open.
func TestSealBodyMatchesSealAndBody(t *testing.T) {
	for _, k := range allAlgKeys(t) {
		for _, r := range sealBodyReadings() {
			for _, sigMeta := range []string{"", "signature", "Asig", "sig\"<"} {
				got, err := SealBody(k, "gw-1", 7, r, sigMeta)
				if err != nil {
					t.Fatalf("%s: SealBody: %v", k.Alg(), err)
				}
				c := ClaimsOf("gw-1", 7, r)
				compact := jwsOf(t, got, sigMeta)
				if k.Alg() == AlgES256 {
					if _, err := jws.Verify([]byte(compact), jws.WithKey(k.alg, k.verifyKey())); err != nil {
						t.Fatalf("ES256: jwx does not verify SealBody's JWS: %v", err)
					}
				} else if want := jwxSeal(t, k, c); compact != want {
					t.Fatalf("%s: SealBody's JWS\n %s\nwant (jws.Sign)\n %s", k.Alg(), compact, want)
				}
				want, err := Body(c, compact, sigMeta)
				if err != nil {
					t.Fatal(err)
				}
				if string(got) != string(want) {
					t.Fatalf("%s: SealBody\n %s\nwant Body\n %s", k.Alg(), got, want)
				}
				if want := referenceBody(t, c, compact, metaName(sigMeta)); string(got) != string(want) {
					t.Fatalf("%s: SealBody\n %s\nwant json.Marshal's\n %s", k.Alg(), got, want)
				}
				// And the verifiers read it: Open (fast path and jwx) and
				// the broker-side VerifyAttrs.
				if _, err := Open(compact, k.Public()); err != nil {
					t.Fatalf("%s: Open(SealBody's JWS): %v", k.Alg(), err)
				}
				vc, err := VerifyAttrs(got, k.Public(), sigMeta)
				if err != nil || vc.Seq != 7 || vc.Device != r.Device || !vc.Time.Equal(r.Time) {
					t.Fatalf("%s: VerifyAttrs(SealBody) = %+v, %v", k.Alg(), vc, err)
				}
			}
		}
	}
}

// TestSealVerifiesBothWays: what jwx's own signer renders (the form of
// every envelope sealed before this change, and of a device's) opens with
// today's Open, and what Seal renders now opens through jwx's verifier.
func TestSealVerifiesBothWays(t *testing.T) {
	for _, k := range allAlgKeys(t) {
		c := ClaimsOf("gw-1", 9, sampleReading())
		old := jwxSeal(t, k, c)
		if got, err := Open(old, k.Public()); err != nil || got.Seq != 9 {
			t.Fatalf("%s: Open(jws.Sign's) = %+v, %v", k.Alg(), got, err)
		}
		now, err := Seal(k, c)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := jws.Verify([]byte(now), jws.WithKey(k.alg, k.verifyKey())); err != nil {
			t.Fatalf("%s: jws.Verify(Seal's) = %v", k.Alg(), err)
		}
		if k.Alg() != AlgES256 && now != old {
			t.Fatalf("%s: Seal = %s, jws.Sign = %s", k.Alg(), now, old)
		}
		// A changed byte of the payload is caught.
		parts := strings.Split(now, ".")
		tampered := parts[0] + "." + parts[1][:len(parts[1])-2] + "AA." + parts[2]
		if _, err := Open(tampered, k.Public()); !errors.Is(err, ErrTampered) && !errors.Is(err, ErrMalformed) {
			t.Fatalf("%s: Open(tampered) = %v", k.Alg(), err)
		}
	}
}

// TestSealBodyRefusals: the same refusals as Seal and Body.
func TestSealBodyRefusals(t *testing.T) {
	k := testKey(t, "th-1", "k1-aaa", "k2-bbb")
	r := sampleReading()
	if _, err := SealBody(Key{}, "gw", 1, r, ""); err == nil || !strings.Contains(err.Error(), "no key") {
		t.Errorf("SealBody without key = %v", err)
	}
	if _, err := SealBody(k, "gw", 1, r, TimeInstantMeta); !errors.Is(err, reading.ErrInvalid) {
		t.Errorf("SealBody with metadata TimeInstant = %v, want ErrInvalid", err)
	}
	if _, err := SealBody(k, "gw", 1, &reading.Reading{Device: "th-1", Time: r.Time}, ""); !errors.Is(err, reading.ErrInvalid) {
		t.Errorf("SealBody without attributes = %v, want ErrInvalid", err)
	}
	nan := &reading.Reading{Device: "th-1", Time: r.Time, Attrs: []reading.Attribute{{Name: "x", Type: "Number", Value: math.NaN()}}}
	if _, err := SealBody(k, "gw", 1, nan, ""); err == nil {
		t.Error("SealBody with NaN = nil error")
	}
	big := &reading.Reading{Device: "th-1", Time: r.Time}
	for i := range 40 {
		big.Attrs = append(big.Attrs, reading.Attribute{Name: string(rune('A'+i%26)) + strings.Repeat("a", i), Type: "Text", Value: strings.Repeat("v", 6000)})
	}
	bigSorted := *big
	bigSorted.Attrs = append([]reading.Attribute(nil), big.Attrs...)
	sortAttrs(bigSorted.Attrs)
	if _, err := SealBody(k, "gw", 1, &bigSorted, ""); !errors.Is(err, reading.ErrTooLarge) {
		t.Errorf("SealBody of a body over 1 MiB = %v, want ErrTooLarge", err)
	}
	// Unsorted attributes take the map path, with the same result.
	un := &reading.Reading{Device: "th-1", Time: r.Time, Attrs: []reading.Attribute{r.Attrs[1], r.Attrs[0]}}
	a, err1 := SealBody(k, "gw", 1, un, "")
	b, err2 := SealBody(k, "gw", 1, r, "")
	if err1 != nil || err2 != nil || string(a) != string(b) {
		t.Errorf("unsorted: %s, %v; sorted: %s, %v", a, err1, b, err2)
	}
}

// TestSealBodyAllocs pins SealBody's allocations for HS256: the body.
func TestSealBodyAllocs(t *testing.T) {
	k := testKey(t, "th-1", "k1-aaa", "k2-bbb")
	r := sampleReading()
	if _, err := SealBody(k, "gw-1", 1, r, ""); err != nil {
		t.Fatal(err)
	}
	n := testing.AllocsPerRun(200, func() {
		if _, err := SealBody(k, "gw-1", 1, r, ""); err != nil {
			t.Fatal(err)
		}
	})
	if n > 1 && !raceEnabled {
		t.Fatalf("SealBody HS256: %.1f allocations, want 1 (the body)", n)
	}
}

// FuzzAppendString: appendString is json.Marshal's string encoding.
func FuzzAppendString(f *testing.F) {
	for _, s := range []string{"", "plain", "héllo \u2028\u2029 <b>&\"\\\n\x01\x7f", "\xff\xfe", "\xed\xa0\x80", "\U0001F600"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		want, _ := json.Marshal(s)
		if got := appendString(nil, s); string(got) != string(want) {
			t.Fatalf("appendString(%q) = %s, json.Marshal %s", s, got, want)
		}
	})
}

// FuzzSealBody: for readings Parse accepts and Validate passes, SealBody
// renders what ClaimsOf + Seal + Body render.
func FuzzSealBody(f *testing.F) {
	for _, s := range []string{`{"t":21.5,"h":40}`, `{"s":"<&>\u2028","n":null,"b":false}`, `{"p":{"a":[1,{"b":"c"}],"z":1e21}}`} {
		f.Add([]byte(s), uint64(1))
	}
	k := testKey(f, "th-1", "k1-aaa", "k2-bbb")
	f.Fuzz(func(t *testing.T, payload []byte, seq uint64) {
		attrs, _, err := reading.Parse(payload)
		if err != nil {
			return
		}
		r := &reading.Reading{Device: "th-1", Time: time.Unix(int64(seq%4e9), int64(seq%1e9)).UTC(), Attrs: attrs}
		got, err := SealBody(k, "gw-1", seq, r, "")
		c := ClaimsOf("gw-1", seq, r)
		compact, err2 := Seal(k, c)
		var want []byte
		if err2 == nil {
			want, err2 = Body(c, compact, "")
		}
		if (err == nil) != (err2 == nil) {
			t.Fatalf("SealBody error %v, Seal+Body %v", err, err2)
		}
		if string(got) != string(want) {
			t.Fatalf("SealBody\n %s\nSeal+Body\n %s", got, want)
		}
	})
}

func jwsOf(t testing.TB, body []byte, sigMeta string) string {
	t.Helper()
	var attrs map[string]struct {
		Metadata map[string]struct {
			Value string `json:"value"`
		} `json:"metadata"`
	}
	if err := json.Unmarshal(body, &attrs); err != nil {
		t.Fatalf("body %s: %v", body, err)
	}
	for _, a := range attrs {
		return a.Metadata[metaName(sigMeta)].Value
	}
	t.Fatal("no attribute")
	return ""
}

func metaName(sigMeta string) string {
	if sigMeta == "" {
		return DefaultSignatureAttr
	}
	return sigMeta
}

func sortAttrs(a []reading.Attribute) {
	for i := 1; i < len(a); i++ {
		for j := i; j > 0 && a[j].Name < a[j-1].Name; j-- {
			a[j], a[j-1] = a[j-1], a[j]
		}
	}
}

// TestHMACSHA256 holds the pooled HMAC equal to crypto/hmac's, for keys
// of every length up to a block and inputs around the block size.
func TestHMACSHA256(t *testing.T) {
	s := getScratch()
	defer putScratch(s)
	for _, kl := range []int{1, 31, 32, 63, 64} {
		key := []byte(strings.Repeat("k", kl))
		for _, il := range []int{0, 1, 55, 56, 64, 65, 1000} {
			in := []byte(strings.Repeat("i", il))
			m := hmac.New(sha256.New, key)
			m.Write(in)
			if got, want := hmacSHA256(s, key, in), m.Sum(nil); !hmac.Equal(got, want) {
				t.Fatalf("key %d bytes, input %d: %x, crypto/hmac %x", kl, il, got, want)
			}
		}
	}
}
