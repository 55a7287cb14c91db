package centralsync

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jwk"
	"github.com/lestrrat-go/jwx/v2/jws"

	"github.com/edgegate/edgegate/policy"
)

// Fixed fuzz keys: the Ed25519 key comes from a constant seed so that the
// committed corpus (testdata/fuzz/FuzzVerifyBundle) holds a bundle that
// really verifies; the ES256 key is fresh per run.
const (
	fuzzEdKid = "ops-fuzz-ed"
	fuzzEcKid = "ops-fuzz-es"
	fuzzGW    = "gw-fuzz-1"
	fuzzK1    = "K1-CANARY-bundle-fuzz-4a1e"
	fuzzK2    = "K2-CANARY-bundle-fuzz-c07d"
)

var fuzzEdSeed = sha256.Sum256([]byte("edgegate bundle fuzz key v1"))

// fuzzDoc is a valid document; fixed times far from now so that the
// committed corpus stays valid (issued 2026, expires 2099).
func fuzzDoc(v uint64) policy.Document {
	return policy.Document{
		Format: policy.DocumentFormat, Gateway: fuzzGW, Version: v,
		IssuedAt:  time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC),
		ExpiresAt: time.Date(2099, 1, 1, 0, 0, 0, 0, time.UTC),
		Devices: []policy.Registration{
			{ID: "th-kitchen", Type: "Thermometer", Owner: "alice", Broker: "https://broker.example:8443", K1: fuzzK1, K2: fuzzK2},
		},
		Delegations: []policy.Delegation{{Device: "th-kitchen", User: "bob", Kind: policy.ReadAccess}},
	}
}

// FuzzVerifyBundle: arbitrary bytes never verify unless central ops signed
// exactly that document; every refusal is a *RefusalError with a known
// reason and no key material in its text.
func FuzzVerifyBundle(f *testing.F) {
	ed := ed25519.NewKeyFromSeed(fuzzEdSeed[:])
	ec, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		f.Fatal(err)
	}
	set := polSet(f, map[string]any{fuzzEdKid: ed.Public(), fuzzEcKid: &ec.PublicKey})
	v, err := NewVerifier(VerifierOptions{Keys: set, Gateway: fuzzGW,
		Now: func() time.Time { return time.Date(2026, 6, 1, 0, 0, 0, 0, time.UTC) }})
	if err != nil {
		f.Fatal(err)
	}
	// The payloads central ops signed: only these may ever verify.
	var signed [][]byte
	add := func(b []byte) { signed = append(signed, b) }
	docJSON := func(d policy.Document) []byte { b, _ := json.Marshal(d); return b }

	good := docJSON(fuzzDoc(7))
	add(good)
	edBundle := signRaw(f, jwa.EdDSA, ed, fuzzEdKid, good)
	ecBundle := signRaw(f, jwa.ES256, ec, fuzzEcKid, good)
	parts := bytes.Split(edBundle, []byte("."))
	pubJWK, _ := jwk.FromRaw(&ec.PublicKey)
	pubJSON, _ := json.Marshal(pubJWK)
	for _, s := range [][]byte{
		edBundle,
		ecBundle,
		forged(map[string]any{"alg": "none", "kid": fuzzEdKid}, good, nil),                                       // alg: none
		forged(map[string]any{"alg": "none"}, good, nil),                                                         // alg: none, no kid
		forged(map[string]any{"alg": "HS256", "kid": fuzzEcKid}, good, pubJSON),                                  // confusion (bogus MAC)
		signRaw(f, jwa.HS256, pubJSON, fuzzEcKid, good),                                                          // HMAC keyed with the public JWK
		signRaw(f, jwa.EdDSA, ed, fuzzEcKid, good),                                                               // EdDSA under the ES256 kid
		[]byte(`{"payload":"` + string(parts[1]) + `","signatures":[{"signature":"` + string(parts[2]) + `"}]}`), // JSON JWS, no protected header
		[]byte(`{"payload":"` + string(parts[1]) + `","protected":"` + string(parts[0]) + `","signature":"` + string(parts[2]) + `"}`),
		edBundle[:len(edBundle)/2],                                               // truncated
		edBundle[:len(edBundle)-1],                                               // truncated signature
		bytes.Join([][]byte{parts[0], parts[1]}, []byte(".")),                    // no signature part
		append(append([]byte{}, edBundle...), '.'),                               // four parts
		signRaw(f, jwa.EdDSA, ed, fuzzEdKid, append(good, []byte(`{"v":1}`)...)), // trailing document
		signRaw(f, jwa.EdDSA, ed, fuzzEdKid, []byte(`{"v":1,"version":9,"issued_at":"2026-01-01T00:00:00Z","expires_at":"2099-01-01T00:00:00Z","gateway":"other-gw","devices":[]}`)),
		{}, []byte("."), []byte(".."), []byte("   \n"),
	} {
		f.Add(s)
	}
	// Signed but refused for their content: still signed payloads.
	add(append(good, []byte(`{"v":1}`)...))
	add([]byte(`{"v":1,"version":9,"issued_at":"2026-01-01T00:00:00Z","expires_at":"2099-01-01T00:00:00Z","gateway":"other-gw","devices":[]}`))

	reasons := map[string]bool{ReasonBadSignature: true, ReasonUnknownKey: true, ReasonRollback: true, ReasonExpired: true,
		ReasonNotYetValid: true, ReasonMalformed: true, ReasonOversized: true, ReasonWrongGateway: true, ReasonNoGateway: true}
	f.Fuzz(func(t *testing.T, raw []byte) {
		got, err := v.Verify(raw, 5)
		if err != nil {
			var re *RefusalError
			if !errors.As(err, &re) {
				t.Fatalf("refusal %v is not a *RefusalError", err)
			}
			if !reasons[re.Reason] {
				t.Fatalf("refusal reason %q is not a known label", re.Reason)
			}
			hdr := decodedHeader(raw)
			for _, sec := range []string{fuzzK1, fuzzK2} {
				if strings.Contains(re.Error(), sec) && !strings.Contains(hdr, sec) {
					t.Fatalf("refusal text carries a device key: %q", re.Error())
				}
			}
			if len(re.Detail) > 512 {
				t.Fatalf("refusal detail of %d bytes", len(re.Detail))
			}
			return
		}
		msg, perr := jws.Parse(bytes.TrimSpace(raw), jws.WithCompact())
		if perr != nil {
			t.Fatalf("verified what jws.Parse refuses: %v", perr)
		}
		ok := false
		for _, s := range signed {
			if bytes.Equal(msg.Payload(), s) {
				ok = true
			}
		}
		if !ok {
			t.Fatalf("verified a payload central ops never signed: %q", msg.Payload())
		}
		if got.Document.Version != 7 {
			t.Fatalf("verified version %d", got.Document.Version)
		}
	})
}

// decodedHeader is the protected header of a compact JWS as text, if any,
// so that a kid the input itself chose may be quoted back.
func decodedHeader(raw []byte) string {
	i := bytes.IndexByte(raw, '.')
	if i < 0 {
		return string(raw)
	}
	b, err := base64.RawURLEncoding.DecodeString(string(bytes.TrimSpace(raw[:i])))
	if err != nil {
		return string(raw[:i])
	}
	return string(b)
}
