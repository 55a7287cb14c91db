package centralsync

import (
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
	"github.com/lestrrat-go/jwx/v2/jws"
)

type ksKey struct {
	priv *ecdsa.PrivateKey
	pub  jwk.Key
}

func newKSKey(t *testing.T) ksKey {
	t.Helper()
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	pub, _ := jwk.FromRaw(priv.Public())
	_ = jwk.AssignKeyID(pub)
	_ = pub.Set(jwk.AlgorithmKey, jwa.ES256)
	return ksKey{priv: priv, pub: pub}
}

func ksSet(keys ...ksKey) jwk.Set {
	set := jwk.NewSet()
	for _, k := range keys {
		_ = set.AddKey(k.pub)
	}
	return set
}

// signKS signs a key set publishing pub with each signer (typ, alg as given).
func signKS(t *testing.T, pub jwk.Set, issued, expires time.Time, typ string, signers ...ksKey) []byte {
	t.Helper()
	kb, _ := json.Marshal(pub)
	payload, _ := json.Marshal(KeySet{Keys: kb, IssuedAt: issued, ExpiresAt: expires})
	var g GeneralJWS
	for _, s := range signers {
		hdr := jws.NewHeaders()
		_ = hdr.Set(jws.KeyIDKey, s.pub.KeyID())
		_ = hdr.Set(jws.TypeKey, typ)
		c, err := jws.Sign(payload, jws.WithKey(jwa.ES256, s.priv, jws.WithProtectedHeaders(hdr)))
		if err != nil {
			t.Fatal(err)
		}
		p := strings.Split(string(c), ".")
		g.Payload = p[1]
		g.Signatures = append(g.Signatures, GeneralJWSig{Protected: p[0], Signature: p[2]})
	}
	b, _ := json.Marshal(g)
	return b
}

// TestVerifyKeySet: only a set signed by a pinned key, fresh and not
// older than the pinned one, is accepted; each refusal has its reason.
func TestVerifyKeySet(t *testing.T) {
	now := time.Date(2026, 12, 3, 10, 0, 0, 0, time.UTC)
	old, cur, next, stranger := newKSKey(t), newKSKey(t), newKSKey(t), newKSKey(t)
	v, err := NewVerifier(VerifierOptions{Keys: ksSet(old, cur), Gateway: "gw-a", Now: func() time.Time { return now }})
	if err != nil {
		t.Fatal(err)
	}
	fresh, exp := now.Add(-time.Minute), now.Add(time.Hour)

	// Signed by every published key, one of which (cur) is pinned.
	got, err := v.VerifyKeySet(signKS(t, ksSet(cur, next), fresh, exp, KeySetType, next, cur), time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	if ids := keyIDs(got.Keys); len(ids) != 2 || got.SignedBy != cur.pub.KeyID() {
		t.Fatalf("accepted set: %v signed by %s", ids, got.SignedBy)
	}

	for _, tt := range []struct {
		name, reason string
		raw          []byte
		notBefore    time.Time
	}{
		{"signed only by an unpinned key", ReasonKeysRetired, signKS(t, ksSet(next), fresh, exp, KeySetType, next), time.Time{}},
		{"a stranger's set", ReasonKeysRetired, signKS(t, ksSet(stranger), fresh, exp, KeySetType, stranger), time.Time{}},
		{"wrong typ", ReasonKeySetUntrusted, signKS(t, ksSet(cur), fresh, exp, "JWT", cur), time.Time{}},
		{"expired", ReasonExpired, signKS(t, ksSet(cur), now.Add(-2*time.Hour), now.Add(-time.Second), KeySetType, cur), time.Time{}},
		{"from the future", ReasonNotYetValid, signKS(t, ksSet(cur), now.Add(time.Hour), now.Add(2*time.Hour), KeySetType, cur), time.Time{}},
		{"older than the pinned set", ReasonRollback, signKS(t, ksSet(cur), fresh, exp, KeySetType, cur), now},
		{"not JSON", ReasonMalformed, []byte("eyJ.a.b"), time.Time{}},
		{"no signature", ReasonMalformed, []byte(`{"payload":"e30","signatures":[]}`), time.Time{}},
	} {
		_, err := v.VerifyKeySet(tt.raw, tt.notBefore)
		var re *RefusalError
		if !errors.As(err, &re) || re.Reason != tt.reason {
			t.Errorf("%s: %v, want reason %s", tt.name, err, tt.reason)
		}
	}

	// A pinned kid on a signature by another key.
	forged := signKS(t, ksSet(stranger), fresh, exp, KeySetType, stranger)
	var g GeneralJWS
	_ = json.Unmarshal(forged, &g)
	hdr, _ := json.Marshal(map[string]string{"alg": "ES256", "kid": cur.pub.KeyID(), "typ": KeySetType})
	g.Signatures[0].Protected = base64.RawURLEncoding.EncodeToString(hdr)
	forged, _ = json.Marshal(g)
	if _, err := v.VerifyKeySet(forged, time.Time{}); err == nil || !strings.Contains(err.Error(), ReasonKeySetUntrusted) {
		t.Fatalf("impostor signature: %v", err)
	}

	// A private key in the published set is refused.
	priv, _ := jwk.FromRaw(stranger.priv)
	_ = priv.Set(jwk.KeyIDKey, "p")
	_ = priv.Set(jwk.AlgorithmKey, jwa.ES256)
	ps := jwk.NewSet()
	_ = ps.AddKey(priv)
	if _, err := v.VerifyKeySet(signKS(t, ps, fresh, exp, KeySetType, cur), time.Time{}); err == nil || strings.Contains(err.Error(), `"d"`) {
		t.Fatalf("set with a private key: %v", err)
	}
}
