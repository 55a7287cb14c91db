package centralsync

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jwk"

	"github.com/edgegate/edgegate/policy"
)

// forged builds a compact JWS with any header and signature bytes.
func forged(header map[string]any, payload []byte, sig []byte) []byte {
	h, _ := json.Marshal(header)
	enc := base64.RawURLEncoding
	return []byte(enc.EncodeToString(h) + "." + enc.EncodeToString(payload) + "." + enc.EncodeToString(sig))
}

// badBundles are the refusal cases, built against ops and now, for a
// floor of 5.
func badBundles(t *testing.T, ops *polOps, now time.Time) []struct {
	name, reason string
	raw          []byte
} {
	t.Helper()
	docBytes := func(d policy.Document) []byte { b, _ := json.Marshal(d); return b }
	good := docBytes(polDoc(7, now))
	otherEC, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	pubJWK, _ := jwk.FromRaw(&ops.ecKey.PublicKey)
	pubJSON, _ := json.Marshal(pubJWK)

	expired := polDoc(7, now)
	expired.IssuedAt, expired.ExpiresAt = now.Add(-48*time.Hour), now.Add(-time.Hour)
	future := polDoc(7, now)
	future.IssuedAt, future.ExpiresAt = now.Add(time.Hour), now.Add(48*time.Hour)
	noExpiry := polDoc(7, now)
	noExpiry.ExpiresAt = time.Time{}
	otherGW := polDoc(7, now)
	otherGW.Gateway = "gw-someone-else"
	noGW := polDoc(7, now)
	noGW.Gateway = ""
	dotDot := polDoc(7, now)
	dotDot.Devices[0].ID = ".."
	sameKeys := polDoc(7, now)
	sameKeys.Devices[0].K2 = sameKeys.Devices[0].K1
	badFormat := polDoc(7, now)
	badFormat.Format = 2

	big := polDoc(7, now)
	big.Devices[0].Service = strings.Repeat("x", DefaultMaxBundleBytes)

	return []struct {
		name, reason string
		raw          []byte
	}{
		{"signed by another key under a pinned kid", ReasonBadSignature, signRaw(t, jwa.ES256, otherEC, ops.ecKid, good)},
		{"payload swapped after signing", ReasonBadSignature, func() []byte {
			parts := bytes.Split(ops.sign(t, polDoc(7, now)), []byte("."))
			parts[1] = []byte(base64.RawURLEncoding.EncodeToString(docBytes(polDoc(900, now))))
			return bytes.Join(parts, []byte("."))
		}()},
		{"unknown kid", ReasonUnknownKey, signRaw(t, jwa.ES256, otherEC, "ops-1999", good)},
		{"no kid", ReasonUnknownKey, signRaw(t, jwa.ES256, ops.ecKey, "", good)},
		{"alg none", ReasonBadSignature, forged(map[string]any{"alg": "none", "kid": ops.ecKid}, good, nil)},
		{"alg none, no kid", ReasonUnknownKey, forged(map[string]any{"alg": "none"}, good, nil)},
		{"HS256 keyed with the pinned public JWK", ReasonBadSignature, signRaw(t, jwa.HS256, pubJSON, ops.ecKid, good)},
		{"HS256 keyed with the public key bytes", ReasonBadSignature,
			signRaw(t, jwa.HS256, elliptic.MarshalCompressed(elliptic.P256(), ops.ecKey.X, ops.ecKey.Y), ops.ecKid, good)},
		{"EdDSA header on the ES256 key", ReasonBadSignature, signRaw(t, jwa.EdDSA, ops.edKey, ops.ecKid, good)},
		{"ES256 header on the EdDSA key", ReasonBadSignature, signRaw(t, jwa.ES256, ops.ecKey, ops.edKid, good)},
		{"rollback: lower version", ReasonRollback, ops.sign(t, polDoc(4, now))},
		// Equal version, other content (the same content signed anew is
		// no change: TestSameVersionResignedIsNoChange).
		{"rollback: equal version", ReasonRollback, ops.sign(t, func() policy.Document { d := polDoc(5, now); d.Delegations = nil; return d }())},
		{"expired", ReasonExpired, ops.sign(t, expired)},
		{"issued in the future", ReasonNotYetValid, ops.sign(t, future)},
		{"no expiry", ReasonMalformed, ops.sign(t, noExpiry)},
		{"payload not JSON", ReasonMalformed, signRaw(t, jwa.ES256, ops.ecKey, ops.ecKid, []byte("not json {"))},
		{"payload JSON with trailing data", ReasonMalformed, signRaw(t, jwa.ES256, ops.ecKey, ops.ecKid, append(append([]byte(nil), good...), []byte(" {}")...))},
		{"payload a JSON array", ReasonMalformed, signRaw(t, jwa.ES256, ops.ecKey, ops.ecKid, []byte(`[1,2]`))},
		{"document the policy refuses (k1 == k2)", ReasonMalformed, ops.sign(t, sameKeys)},
		{"unknown document format", ReasonMalformed, ops.sign(t, badFormat)},
		{"not a JWS", ReasonMalformed, []byte("hello")},
		{"JSON serialization", ReasonMalformed, []byte(`{"payload":"e30","signatures":[]}`)},
		{"four parts", ReasonMalformed, append(ops.sign(t, polDoc(7, now)), []byte(".x")...)},
		{"empty", ReasonMalformed, nil},
		{"oversized", ReasonOversized, ops.sign(t, big)},
		{"wrong gateway", ReasonWrongGateway, ops.sign(t, otherGW)},
		{"no gateway named", ReasonNoGateway, ops.sign(t, noGW)},
		{"device id ..", ReasonMalformed, ops.sign(t, dotDot)},
	}
}

func TestVerifierRefusals(t *testing.T) {
	ops := newPolOps(t)
	now := time.Now()
	v, err := NewVerifier(VerifierOptions{Keys: ops.pinned, Gateway: polGateway, Now: func() time.Time { return now }})
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range badBundles(t, ops, now) {
		t.Run(tt.name, func(t *testing.T) {
			got, err := v.Verify(tt.raw, 5)
			var re *RefusalError
			if !errors.As(err, &re) {
				t.Fatalf("Verify = %v, %v; want a refusal %q", got, err, tt.reason)
			}
			if re.Reason != tt.reason {
				t.Fatalf("Verify reason = %q (%s), want %q", re.Reason, re.Detail, tt.reason)
			}
			for _, c := range polCanaries {
				if strings.Contains(err.Error(), c) {
					t.Fatalf("refusal %q shows a secret", err)
				}
			}
		})
	}
}

func TestVerifierAccepts(t *testing.T) {
	ops := newPolOps(t)
	now := time.Now()
	v, err := NewVerifier(VerifierOptions{Keys: ops.pinned, Gateway: polGateway, Now: func() time.Time { return now }})
	if err != nil {
		t.Fatal(err)
	}
	skewed := polDoc(9, now)
	skewed.IssuedAt = now.Add(2 * time.Minute) // within the default 5 min skew
	b, _ := json.Marshal(polDoc(9, now))
	for _, tt := range []struct {
		name string
		raw  []byte
	}{
		{"ES256", ops.sign(t, polDoc(9, now))},
		{"EdDSA", signRaw(t, jwa.EdDSA, ops.edKey, ops.edKid, b)},
		{"issued slightly ahead of our clock", ops.sign(t, skewed)},
		{"surrounding whitespace", append(append([]byte("\n "), ops.sign(t, polDoc(9, now))...), '\n')},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got, err := v.Verify(tt.raw, 5)
			if err != nil {
				t.Fatalf("Verify = %v", err)
			}
			if got.Document.Version != 9 || got.Policy.Len() != 2 || got.Policy.Source != SourceBundle {
				t.Fatalf("Verify = version %d, %d devices, source %q", got.Document.Version, got.Policy.Len(), got.Policy.Source)
			}
			if want := Digest(tt.raw); got.Digest != want || got.Policy.Digest != want || !strings.HasPrefix(want, "sha256:") || len(want) != 7+64 {
				t.Fatalf("digest = %q / %q, want %q", got.Digest, got.Policy.Digest, want)
			}
		})
	}
}

func TestNewVerifierRefusesUnsafeKeys(t *testing.T) {
	ec, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	mk := func(raw any, kid string, alg jwa.KeyAlgorithm) jwk.Set {
		k, _ := jwk.FromRaw(raw)
		if kid != "" {
			_ = k.Set(jwk.KeyIDKey, kid)
		}
		if alg != nil {
			_ = k.Set(jwk.AlgorithmKey, alg)
		}
		s := jwk.NewSet()
		_ = s.AddKey(k)
		return s
	}
	for _, tt := range []struct {
		name string
		set  jwk.Set
	}{
		{"empty", jwk.NewSet()},
		{"nil", nil},
		{"no kid", mk(&ec.PublicKey, "", jwa.ES256)},
		{"no alg", mk(&ec.PublicKey, "k", nil)},
		{"HS256 secret", mk([]byte("0123456789abcdef0123456789abcdef"), "k", jwa.HS256)},
		{"ES384 key", mk(&p384.PublicKey, "k", jwa.ES384)},
		{"P-384 key claiming ES256", mk(&p384.PublicKey, "k", jwa.ES256)},
		{"alg none", mk(&ec.PublicKey, "k", jwa.NoSignature)},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := NewVerifier(VerifierOptions{Keys: tt.set, Gateway: polGateway}); err == nil {
				t.Fatalf("NewVerifier(%s) = nil error, want refusal", tt.name)
			}
		})
	}
}

// Every refusal through the Syncer leaves the policy in force, is counted
// under its exact reason and recorded for status.
func TestOfferRefusedLeavesPolicyInForce(t *testing.T) {
	e := newPolEnv(t)
	s := e.syncer(nil)
	if err := s.LoadCached(); err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	if err := e.note(s.Offer(context.Background(), e.ops.sign(t, polDoc(5, now)), "offer")); err != nil {
		t.Fatalf("Offer(v5) = %v", err)
	}
	inForce := e.engine.Current()
	for _, tt := range badBundles(t, e.ops, now) {
		t.Run(tt.name, func(t *testing.T) {
			before := e.refused(tt.reason)
			err := e.note(s.Offer(context.Background(), tt.raw, "offer"))
			var re *RefusalError
			if !errors.As(err, &re) || re.Reason != tt.reason {
				t.Fatalf("Offer = %v, want refusal %q", err, tt.reason)
			}
			if e.engine.Current() != inForce {
				t.Fatalf("policy in force changed to %s", e.engine.Current().Describe())
			}
			if got := e.refused(tt.reason); got != before+1 {
				t.Fatalf("refused{%s} = %v, want %v", tt.reason, got, before+1)
			}
			lr := s.Status().LastRefusal
			if lr == nil || lr.Reason != tt.reason || lr.Via != "offer" || lr.At.IsZero() || lr.Detail == "" {
				t.Fatalf("LastRefusal = %+v", lr)
			}
		})
	}
	if st := s.Status(); st.Version != 5 || st.Floor != 5 {
		t.Fatalf("status version %d floor %d, want 5, 5", st.Version, st.Floor)
	}
	if got := e.applied(SourceBundle); got != 1 {
		t.Fatalf("applied{bundle} = %v, want 1", got)
	}
}
