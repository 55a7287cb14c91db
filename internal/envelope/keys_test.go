package envelope

import (
	"crypto/ed25519"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"strings"
	"testing"
)

func genKey(t testing.TB, alg string) Key {
	t.Helper()
	k, err := GenerateKey(alg)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func TestAsymmetricSealOpen(t *testing.T) {
	for _, alg := range []string{AlgEdDSA, AlgES256} {
		t.Run(alg, func(t *testing.T) {
			k := genKey(t, alg)
			c := ClaimsOf("", 7, sampleReading())
			jws, err := Seal(k, c)
			if err != nil {
				t.Fatal(err)
			}
			if a, kid, _ := KeyIDOf(jws); a != alg || kid != k.ID() {
				t.Fatalf("header alg %q kid %q, want %q %q", a, kid, alg, k.ID())
			}
			got, err := Open(jws, k.Public())
			if err != nil {
				t.Fatalf("Open with the public key = %v", err)
			}
			if got.Seq != 7 || got.Gateway != "" || got.Device != "th-1" {
				t.Fatalf("claims = %+v", got)
			}
			if _, err := Seal(k.Public(), c); err == nil {
				t.Fatal("Seal with a public key succeeded")
			}
			// Changed payload: tampered.
			parts := strings.Split(jws, ".")
			other, _ := Seal(k, ClaimsOf("", 8, sampleReading()))
			forged := parts[0] + "." + strings.Split(other, ".")[1] + "." + parts[2]
			if _, err := Open(forged, k.Public()); !errors.Is(err, ErrTampered) {
				t.Fatalf("Open(payload swapped) = %v, want ErrTampered", err)
			}
			// Another key of the same algorithm: wrong key.
			if _, err := Open(jws, genKey(t, alg).Public()); !errors.Is(err, ErrWrongKey) {
				t.Fatalf("Open(other key) = %v, want ErrWrongKey", err)
			}
		})
	}
}

func TestKeyRoundTrips(t *testing.T) {
	for _, alg := range []string{AlgEdDSA, AlgES256} {
		t.Run(alg, func(t *testing.T) {
			k := genKey(t, alg)
			pubJWK, err := k.PublicJWK()
			if err != nil {
				t.Fatal(err)
			}
			if strings.Contains(string(pubJWK), `"d"`) {
				t.Fatalf("public JWK holds the private key: %s", pubJWK)
			}
			privJWK, err := k.PrivateJWK()
			if err != nil {
				t.Fatal(err)
			}
			pem, err := k.PublicPEM()
			if err != nil {
				t.Fatal(err)
			}
			set, err := KeySetJSON([]Key{k, genKey(t, alg)})
			if err != nil {
				t.Fatal(err)
			}
			for _, tt := range []struct {
				name    string
				in      []byte
				canSign bool
			}{{"public JWK", pubJWK, false}, {"private JWK", privJWK, true}, {"PEM", pem, false}} {
				got, err := ParseKey(tt.in)
				if err != nil {
					t.Fatalf("ParseKey(%s) = %v", tt.name, err)
				}
				if got.ID() != k.ID() || got.Alg() != alg || got.CanSign() != tt.canSign {
					t.Fatalf("ParseKey(%s) = %s sign=%v, want %s sign=%v", tt.name, got, got.CanSign(), k, tt.canSign)
				}
			}
			keys, err := ParseKeys(set)
			if err != nil || len(keys) != 2 || keys[0].ID() != k.ID() {
				t.Fatalf("ParseKeys(set) = %v, %v", keys, err)
			}
		})
	}
}

func TestParseKeyRefuses(t *testing.T) {
	k := genKey(t, AlgEdDSA)
	pub, _ := k.PublicJWK()
	for _, tt := range []struct{ name, in string }{
		{"oct key", `{"kty":"oct","k":"c2VjcmV0"}`},
		{"kid not the thumbprint", strings.Replace(string(pub), k.ID(), "chosen-kid", 1)},
		{"alg of another type", strings.Replace(string(pub), `"EdDSA"`, `"HS256"`, 1)},
		{"garbage", `hello`},
		{"empty set", `{"keys":[]}`},
	} {
		if got, err := ParseKey([]byte(tt.in)); err == nil {
			t.Errorf("ParseKey(%s) = %s, want an error", tt.name, got)
		}
	}
}

// TestKeyConfusion: an HS256 token whose HMAC secret is the public key (the
// classic confusion attack) and "alg":"none" are refused by asymmetric keys.
func TestKeyConfusion(t *testing.T) {
	k := genKey(t, AlgEdDSA).Public()
	pubJWK, _ := k.PublicJWK()
	pemBytes, _ := k.PublicPEM()
	c := ClaimsOf("", 1, sampleReading())
	payload, err := appendClaims(nil, &c)
	if err != nil {
		t.Fatal(err)
	}
	enc := base64.RawURLEncoding
	body := enc.EncodeToString(payload)
	hsToken := func(secret []byte) string {
		hdr := enc.EncodeToString([]byte(`{"alg":"HS256","kid":"` + k.ID() + `","typ":"edgegate-reading+jws"}`))
		m := hmac.New(sha256.New, secret)
		m.Write([]byte(hdr + "." + body))
		return hdr + "." + body + "." + enc.EncodeToString(m.Sum(nil))
	}
	none := enc.EncodeToString([]byte(`{"alg":"none","kid":"`+k.ID()+`"}`)) + "." + body + "."
	for _, tt := range []struct{ name, jws string }{
		{"HS256 with the public JWK as secret", hsToken(pubJWK)},
		{"HS256 with the PEM as secret", hsToken(pemBytes)},
		{"HS256 with the raw key as secret", hsToken([]byte(k.pub.(ed25519.PublicKey)))},
		{"alg none", none},
	} {
		if _, err := Open(tt.jws, k); !errors.Is(err, ErrWrongKey) && !errors.Is(err, ErrMalformed) {
			t.Errorf("Open(%s) = %v, want ErrWrongKey", tt.name, err)
		}
	}
}

// TestOpenWithRotatedKeys: readings signed with an older key stay
// verifiable while that key is in the list; the kid picks the key.
func TestOpenWithRotatedKeys(t *testing.T) {
	old, cur := genKey(t, AlgEdDSA), genKey(t, AlgES256)
	oldJWS, _ := Seal(old, ClaimsOf("", 1, sampleReading()))
	curJWS, _ := Seal(cur, ClaimsOf("", 2, sampleReading()))
	keys := []Key{cur.Public(), old.Public()}
	for _, jws := range []string{oldJWS, curJWS} {
		if _, err := OpenWith(jws, keys); err != nil {
			t.Fatalf("OpenWith = %v", err)
		}
	}
	if _, err := OpenWith(oldJWS, keys[:1]); !errors.Is(err, ErrWrongKey) {
		t.Fatalf("OpenWith(old key dropped) = %v, want ErrWrongKey", err)
	}
	body, _ := Body(ClaimsOf("", 1, sampleReading()), oldJWS, "")
	if _, err := VerifyAttrsWith(body, keys, ""); err != nil {
		t.Fatalf("VerifyAttrsWith = %v", err)
	}
}

func benchKeys(b *testing.B) map[string]Key {
	return map[string]Key{
		AlgHS256: testKey(b, "th-1", "k1-aaa", "k2-bbb"),
		AlgEdDSA: genKey(b, AlgEdDSA),
		AlgES256: genKey(b, AlgES256),
	}
}

// BenchmarkSealAlg: one signature (Seal alone) per algorithm.
func BenchmarkSealAlg(b *testing.B) {
	c := ClaimsOf("gw-1", 1, sampleReading())
	for _, alg := range []string{AlgHS256, AlgEdDSA, AlgES256} {
		k := benchKeys(b)[alg]
		b.Run(alg, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := Seal(k, c); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkOpenAlg: one verification (Open: parse, verify, decode claims)
// per algorithm.
func BenchmarkOpenAlg(b *testing.B) {
	c := ClaimsOf("gw-1", 1, sampleReading())
	for _, alg := range []string{AlgHS256, AlgEdDSA, AlgES256} {
		k := benchKeys(b)[alg]
		jws, err := Seal(k, c)
		if err != nil {
			b.Fatal(err)
		}
		b.Run(alg, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := Open(jws, k.Public()); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
