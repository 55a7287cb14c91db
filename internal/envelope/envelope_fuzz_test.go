package envelope

import (
	"bytes"
	"encoding/base64"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v2/jws"

	"github.com/edgegate/edgegate/internal/reading"
)

// Canaries of the fuzz keys: never in an error message.
const (
	fuzzK1 = "k1-canary-envelope-fuzz"
	fuzzK2 = "k2-canary-envelope-fuzz"
)

// fuzzSeeds returns the key and a few genuine envelopes, with the payloads
// they sign (the only payloads a verification may ever return).
func fuzzSeeds(f *testing.F) (Key, []string, [][]byte) {
	f.Helper()
	k, err := DeriveHS256("fz-1", fuzzK1, fuzzK2)
	if err != nil {
		f.Fatal(err)
	}
	r := &reading.Reading{Device: "fz-1", Time: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC), Attrs: []reading.Attribute{
		{Name: "n", Type: "Number", Value: 1.0},
		{Name: "temperature", Type: "Number", Value: 21.5},
		{Name: "label", Type: "Text", Value: "kitchen"},
	}}
	var compacts []string
	var payloads [][]byte
	for seq := uint64(1); seq <= 2; seq++ {
		c, err := Seal(k, ClaimsOf("gw-fz", seq, r))
		if err != nil {
			f.Fatal(err)
		}
		msg, err := jws.Parse([]byte(c), jws.WithCompact())
		if err != nil {
			f.Fatal(err)
		}
		compacts = append(compacts, c)
		payloads = append(payloads, msg.Payload())
	}
	return k, compacts, payloads
}

// attackEnvelopes are known attack inputs on a compact JWS.
func attackEnvelopes(genuine string) []string {
	enc := base64.RawURLEncoding
	parts := strings.Split(genuine, ".")
	none := enc.EncodeToString([]byte(`{"alg":"none","kid":"x"}`))
	hsNoKid := enc.EncodeToString([]byte(`{"alg":"HS256"}`))
	return []string{
		genuine,
		none + "." + parts[1] + ".", // alg: none
		hsNoKid + "." + parts[1] + "." + parts[2], // header swapped
		parts[0] + "." + parts[1],                 // truncated: no signature
		genuine[:len(genuine)/2],                  // truncated mid-payload
		`{"payload":"` + parts[1] + `","signatures":[{"signature":"` + parts[2] + `"}]}`, // JSON serialization, no protected header
		`{"payload":"` + parts[1] + `","protected":"` + parts[0] + `","signature":"` + parts[2] + `"}`,
		"", ".", "..", "...",
		parts[0] + "." + enc.EncodeToString([]byte(`{"v":1,"gw":"g","dev":"fz-1","seq":1,"t":"2026-01-01T00:00:00Z","attrs":{},"extra":1}`)) + "." + parts[2],
		parts[0] + "=." + parts[1] + "." + parts[2], // padded base64
		strings.ReplaceAll(genuine, "-", "+"),       // std alphabet
	}
}

func checkVerdict(t *testing.T, err error, input string) {
	t.Helper()
	if !errors.Is(err, ErrMalformed) && !errors.Is(err, ErrWrongKey) && !errors.Is(err, ErrTampered) {
		t.Fatalf("verdict %v is not ErrMalformed, ErrWrongKey or ErrTampered", err)
	}
	msg := err.Error()
	for _, s := range []string{fuzzK1, fuzzK2} {
		if strings.Contains(msg, s) && !strings.Contains(input, s) {
			t.Fatalf("a key canary appears in the error %q", msg)
		}
	}
}

// FuzzOpen: any string either verifies to the claims of an envelope the key
// really signed, or is refused with one of the three verdicts; nothing
// panics, and the algorithm never comes from the input.
func FuzzOpen(f *testing.F) {
	k, compacts, payloads := fuzzSeeds(f)
	for _, c := range compacts {
		for _, a := range attackEnvelopes(c) {
			f.Add(a)
		}
	}
	f.Fuzz(func(t *testing.T, compact string) {
		c, err := Open(compact, k)
		if err != nil {
			checkVerdict(t, err, compact)
			return
		}
		msg, perr := jws.Parse([]byte(compact), jws.WithCompact())
		if perr != nil {
			t.Fatalf("Open accepted what jws.Parse refuses: %v", perr)
		}
		if !signedPayload(msg.Payload(), payloads) {
			t.Fatalf("Open accepted a payload the key never signed: %q (claims %+v)", msg.Payload(), c)
		}
	})
}

func signedPayload(p []byte, payloads [][]byte) bool {
	for _, q := range payloads {
		if bytes.Equal(p, q) {
			return true
		}
	}
	return false
}

// FuzzVerifyAttrs: any document either verifies — and then every signed
// attribute is present with its signed type and value, and the envelope is
// one the key signed — or is refused with a verdict; nothing panics.
func FuzzVerifyAttrs(f *testing.F) {
	k, compacts, payloads := fuzzSeeds(f)
	for _, c := range compacts {
		claims, err := Open(c, k)
		if err != nil {
			f.Fatal(err)
		}
		body, err := Body(claims, c, "")
		if err != nil {
			f.Fatal(err)
		}
		f.Add(body)
		f.Add(append([]byte(`{"id":"fz-1","type":"T",`), body[1:]...))
		f.Add(append([]byte(`{"id":"other","type":"T",`), body[1:]...))
		f.Add(bytes.Replace(body, []byte(`"value":21.5`), []byte(`"value":22.5`), 1))
		f.Add(bytes.Replace(body, []byte(`"type":"Number"`), []byte(`"type":"Text"`), 1))
		for _, a := range attackEnvelopes(c) {
			f.Add([]byte(`{"signature":{"type":"string","value":"` + strings.ReplaceAll(a, `"`, `\"`) + `"}}`))
		}
	}
	f.Add([]byte(`{"signature":{"type":"string","value":1}}`))
	f.Add([]byte(`{"signature":null}`))
	f.Add([]byte(`[]`))
	f.Add([]byte(``))
	f.Fuzz(func(t *testing.T, doc []byte) {
		c, err := VerifyAttrs(doc, k, "")
		if err != nil {
			checkVerdict(t, err, string(doc))
			return
		}
		enc := base64.RawURLEncoding
		found := false
		for _, p := range payloads {
			if bytes.Contains(doc, []byte(enc.EncodeToString(p))) {
				found = true
			}
		}
		if !found {
			// The envelope may be in another base64 spelling; its claims
			// must still be one of the signed ones.
			if c.Device != "fz-1" || c.Gateway != "gw-fz" || (c.Seq != 1 && c.Seq != 2) {
				t.Fatalf("VerifyAttrs accepted claims the key never signed: %+v", c)
			}
		}
		if len(c.Attrs) == 0 {
			t.Fatalf("verified a document with no signed attributes")
		}
	})
}

// FuzzVerifyEntity: any document is refused as a whole (ErrMalformed) or
// yields one verdict per attribute; nothing panics; an attribute is
// verified only in entity fz-1, for a name a reading the key signed
// carries, by that reading.
func FuzzVerifyEntity(f *testing.F) {
	k, compacts, _ := fuzzSeeds(f)
	signed := map[string]Attr{}
	for _, c := range compacts {
		claims, err := Open(c, k)
		if err != nil {
			f.Fatal(err)
		}
		for n, a := range claims.Attrs {
			signed[n] = a // both readings sign the same values
		}
		body, err := Body(claims, c, "")
		if err != nil {
			f.Fatal(err)
		}
		entity := append([]byte(`{"id":"fz-1","type":"T",`), body[1:]...)
		f.Add(entity)
		f.Add(append([]byte(`{"id":"other",`), body[1:]...))
		f.Add(bytes.Replace(entity, []byte(`"value":21.5`), []byte(`"value":22.5`), 1))
		f.Add(bytes.Replace(entity, []byte(`"temperature"`), []byte(`"label2"`), 1))
		for _, a := range attackEnvelopes(c) {
			f.Add([]byte(`{"id":"fz-1","n":{"type":"Number","value":1,"metadata":{"signature":{"type":"Text","value":"` +
				strings.ReplaceAll(a, `"`, `\"`) + `"}}}}`))
		}
	}
	f.Add([]byte(`{"id":"fz-1","a":{"type":"Number","value":1,"metadata":{"signature":{"type":"Text","value":1}}}}`))
	f.Add([]byte(`{"id":"fz-1","a":null,"b":[],"c":{"metadata":null}}`))
	f.Add([]byte(`{"id":1}`))
	f.Add([]byte(`[]`))
	f.Fuzz(func(t *testing.T, doc []byte) {
		rep, err := VerifyEntity(doc, []Key{k}, "")
		if err != nil {
			checkVerdict(t, err, string(doc))
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("a whole-document error other than ErrMalformed: %v", err)
			}
			return
		}
		for _, a := range rep.Attrs {
			if a.Verdict == "" {
				t.Fatalf("attribute %q has no verdict", a.Name)
			}
			if a.Verdict != Verified {
				continue
			}
			if _, ok := signed[a.Name]; rep.ID != "fz-1" || !ok || (a.Seq != 1 && a.Seq != 2) || a.Gateway != "gw-fz" {
				t.Fatalf("verified %q in %q by seq %d: never signed so", a.Name, rep.ID, a.Seq)
			}
		}
	})
}
