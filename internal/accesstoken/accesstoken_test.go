package accesstoken

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jwk"
	"github.com/lestrrat-go/jwx/v2/jwt"
)

type provider struct {
	srv     *httptest.Server
	mu      sync.Mutex
	keys    []jwk.Key // private
	fetches atomic.Int32
	down    atomic.Bool
}

func newProvider(t *testing.T) *provider {
	t.Helper()
	p := &provider{}
	p.rotate(t)
	mux := http.NewServeMux()
	mux.HandleFunc("/realm/.well-known/openid-configuration", func(w http.ResponseWriter, r *http.Request) {
		json.NewEncoder(w).Encode(map[string]string{"issuer": p.issuer(), "jwks_uri": p.srv.URL + "/realm/certs"})
	})
	mux.HandleFunc("/realm/certs", func(w http.ResponseWriter, r *http.Request) {
		if p.down.Load() {
			http.Error(w, "down", http.StatusServiceUnavailable)
			return
		}
		p.fetches.Add(1)
		set := jwk.NewSet()
		p.mu.Lock()
		for _, k := range p.keys {
			pub, _ := k.PublicKey()
			set.AddKey(pub)
		}
		p.mu.Unlock()
		json.NewEncoder(w).Encode(set)
	})
	p.srv = httptest.NewTLSServer(mux)
	t.Cleanup(p.srv.Close)
	return p
}

func (p *provider) issuer() string { return p.srv.URL + "/realm" }

func (p *provider) rotate(t *testing.T) jwk.Key {
	t.Helper()
	raw, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	k, _ := jwk.FromRaw(raw)
	k.Set(jwk.KeyIDKey, "k"+string(rune('a'+len(p.keys))))
	k.Set(jwk.AlgorithmKey, jwa.RS256)
	p.mu.Lock()
	p.keys = append(p.keys, k)
	p.mu.Unlock()
	return k
}

func (p *provider) token(t *testing.T, key jwk.Key, alg jwa.SignatureAlgorithm, mut func(jwt.Token)) string {
	t.Helper()
	tok := jwt.New()
	tok.Set(jwt.IssuerKey, p.issuer())
	tok.Set(jwt.AudienceKey, []string{"edgegate"})
	tok.Set(jwt.SubjectKey, "sub-carol")
	tok.Set("preferred_username", "carol")
	tok.Set("azp", "dashboard")
	tok.Set(jwt.ExpirationKey, time.Now().Add(5*time.Minute))
	tok.Set(jwt.IssuedAtKey, time.Now())
	if mut != nil {
		mut(tok)
	}
	b, err := jwt.Sign(tok, jwt.WithKey(alg, key))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

type memStore struct {
	mu sync.Mutex
	m  map[string][]byte
}

func (s *memStore) GetState(n string) ([]byte, bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	v, ok := s.m[n]
	return v, ok, nil
}

func (s *memStore) PutState(n string, v []byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.m == nil {
		s.m = map[string][]byte{}
	}
	s.m[n] = v
	return nil
}

func newVerifier(t *testing.T, p *provider, st StateStore) *Verifier {
	t.Helper()
	v, err := New(Options{Issuer: p.issuer(), Audience: "edgegate", HTTPClient: p.srv.Client(), Store: st})
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func TestVerify(t *testing.T) {
	p := newProvider(t)
	v := newVerifier(t, p, nil)
	ctx := context.Background()
	good := p.keys[0]

	ecRaw, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	stranger, _ := jwk.FromRaw(ecRaw)
	stranger.Set(jwk.KeyIDKey, "ka") // claims the provider's kid

	pubJSON, _ := json.Marshal(func() jwk.Key { k, _ := good.PublicKey(); return k }())
	hmacWithPublic, _ := jwk.FromRaw(pubJSON) // the public key's bytes as an HMAC secret
	hmacWithPublic.Set(jwk.KeyIDKey, "ka")

	tests := []struct {
		name string
		tok  string
		want error
	}{
		{"valid", p.token(t, good, jwa.RS256, nil), nil},
		{"expired", p.token(t, good, jwa.RS256, func(tk jwt.Token) { tk.Set(jwt.ExpirationKey, time.Now().Add(-time.Hour)) }), ErrExpired},
		{"not yet valid", p.token(t, good, jwa.RS256, func(tk jwt.Token) { tk.Set(jwt.NotBeforeKey, time.Now().Add(time.Hour)) }), ErrInvalid},
		{"wrong audience", p.token(t, good, jwa.RS256, func(tk jwt.Token) { tk.Set(jwt.AudienceKey, []string{"other"}) }), ErrInvalid},
		{"wrong issuer", p.token(t, good, jwa.RS256, func(tk jwt.Token) { tk.Set(jwt.IssuerKey, "https://evil") }), ErrInvalid},
		{"no exp", p.token(t, good, jwa.RS256, func(tk jwt.Token) { tk.Remove(jwt.ExpirationKey) }), ErrInvalid},
		{"signed by a stranger with the provider's kid", p.token(t, stranger, jwa.ES256, nil), ErrInvalid},
		{"HS256 with the public key as secret", p.token(t, hmacWithPublic, jwa.HS256, nil), ErrInvalid},
		{"alg none", noneToken(p.issuer()), ErrInvalid},
		{"garbage", "a.b.c", ErrInvalid},
		{"oversized", strings.Repeat("a", MaxTokenBytes+1), ErrInvalid},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := v.Verify(ctx, tt.tok)
			if tt.want == nil {
				if err != nil || c.User != "carol" || c.ClientID != "dashboard" {
					t.Fatalf("Verify = %+v, %v", c, err)
				}
				return
			}
			if !errors.Is(err, tt.want) {
				t.Fatalf("Verify(%s) = %v, want %v", tt.name, err, tt.want)
			}
		})
	}
}

func noneToken(iss string) string {
	enc := base64.RawURLEncoding.EncodeToString
	h := enc([]byte(`{"alg":"none","kid":"ka","typ":"JWT"}`))
	b := enc([]byte(`{"iss":"` + iss + `","aud":"edgegate","preferred_username":"carol","exp":9999999999}`))
	return h + "." + b + "."
}

func TestUnknownKidRefreshesOnceAndRateLimits(t *testing.T) {
	p := newProvider(t)
	v := newVerifier(t, p, nil)
	ctx := context.Background()
	if _, err := v.Verify(ctx, p.token(t, p.keys[0], jwa.RS256, nil)); err != nil {
		t.Fatal(err)
	}
	if n := p.fetches.Load(); n != 1 {
		t.Fatalf("fetches after the first token = %d, want 1", n)
	}
	// Rotation: a token with a new kid is accepted after one refresh...
	now := time.Now().Add(2 * time.Minute)
	v.opts.Now = func() time.Time { return now }
	newKey := p.rotate(t)
	if _, err := v.Verify(ctx, p.token(t, newKey, jwa.RS256, nil)); err != nil {
		t.Fatalf("rotated key: %v", err)
	}
	// ...and forged kids right after do not hammer the provider.
	for i := range 20 {
		k := p.keys[0]
		forged, _ := k.Clone()
		forged.Set(jwk.KeyIDKey, "forged-"+string(rune('a'+i)))
		if _, err := v.Verify(ctx, p.token(t, forged, jwa.RS256, nil)); !errors.Is(err, ErrUnknownKey) {
			t.Fatalf("forged kid: %v, want ErrUnknownKey", err)
		}
	}
	if n := p.fetches.Load(); n != 2 {
		t.Fatalf("key set fetched %d times, want 2 (one per rotation, forged kids rate-limited)", n)
	}
}

func TestCachedKeysWorkOffline(t *testing.T) {
	p := newProvider(t)
	st := &memStore{}
	v := newVerifier(t, p, st)
	tok := p.token(t, p.keys[0], jwa.RS256, nil)
	if _, err := v.Verify(context.Background(), tok); err != nil {
		t.Fatal(err)
	}
	p.down.Store(true)
	// A restarted gateway, provider unreachable: the persisted set verifies.
	v2 := newVerifier(t, p, st)
	if v2.Keys() != 1 {
		t.Fatalf("cached keys = %d, want 1", v2.Keys())
	}
	if _, err := v2.Verify(context.Background(), tok); err != nil {
		t.Fatalf("Verify offline with cached keys = %v", err)
	}
}

func TestPinnedDropsSymmetricKeys(t *testing.T) {
	set, err := pinned([]byte(`{"keys":[{"kty":"oct","kid":"h","k":"c2VjcmV0"}]}`))
	if err != nil {
		t.Fatal(err)
	}
	if set.Len() != 0 {
		t.Fatalf("symmetric key kept: %d keys", set.Len())
	}
}
