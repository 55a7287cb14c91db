package accesstoken

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jwk"
	"github.com/lestrrat-go/jwx/v2/jws"
	"github.com/lestrrat-go/jwx/v2/jwt"
)

// jwksTransport answers every request with a fixed key set: the verifier's
// rate-limited refresh runs without a network.
type jwksTransport struct{ body []byte }

func (j jwksTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	return &http.Response{StatusCode: 200, Header: http.Header{"Content-Type": {"application/json"}},
		Body: io.NopCloser(bytes.NewReader(j.body)), Request: r}, nil
}

// FuzzVerify: any string either verifies to the claims of a token the
// provider signed, or is refused with ErrInvalid, ErrUnknownKey or
// ErrExpired; the error never quotes the token.
func FuzzVerify(f *testing.F) {
	const iss = "https://sso.example/realms/edgegate"
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		f.Fatal(err)
	}
	ecKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		f.Fatal(err)
	}
	set := jwk.NewSet()
	priv := map[string]jwk.Key{}
	for kid, raw := range map[string]any{"rs-1": rsaKey, "es-1": ecKey} {
		k, _ := jwk.FromRaw(raw)
		_ = k.Set(jwk.KeyIDKey, kid)
		priv[kid] = k
		pub, _ := k.PublicKey()
		_ = set.AddKey(pub)
	}
	setJSON, _ := json.Marshal(set)
	st := &memStore{m: map[string][]byte{stateName: setJSON}}
	now := time.Date(2026, 6, 1, 0, 0, 0, 0, time.UTC)
	v, err := New(Options{Issuer: iss, Audience: "edgegate", JWKSURL: "https://sso.invalid/certs",
		HTTPClient: &http.Client{Transport: jwksTransport{setJSON}, Timeout: time.Second}, Store: st,
		RefreshInterval: time.Hour, Now: func() time.Time { return now }})
	if err != nil {
		f.Fatal(err)
	}
	var signed [][]byte
	sign := func(kid string, alg jwa.SignatureAlgorithm, mut func(jwt.Token)) string {
		tok := jwt.New()
		_ = tok.Set(jwt.IssuerKey, iss)
		_ = tok.Set(jwt.AudienceKey, []string{"edgegate"})
		_ = tok.Set(jwt.SubjectKey, "sub-carol")
		_ = tok.Set("preferred_username", "carol")
		_ = tok.Set(jwt.ExpirationKey, now.Add(5*time.Minute))
		_ = tok.Set(jwt.IssuedAtKey, now)
		if mut != nil {
			mut(tok)
		}
		b, err := jwt.Sign(tok, jwt.WithKey(alg, priv[kid]))
		if err != nil {
			f.Fatal(err)
		}
		msg, _ := jws.Parse(b)
		signed = append(signed, msg.Payload())
		return string(b)
	}
	good := sign("rs-1", jwa.RS256, nil)
	enc := base64.RawURLEncoding
	parts := strings.Split(good, ".")
	pubJSON, _ := json.Marshal(set)
	for _, s := range []string{
		good,
		sign("es-1", jwa.ES256, nil),
		sign("rs-1", jwa.RS256, func(t jwt.Token) { _ = t.Set(jwt.ExpirationKey, now.Add(-time.Hour)) }),
		sign("rs-1", jwa.RS256, func(t jwt.Token) { _ = t.Set(jwt.AudienceKey, "other") }),
		sign("rs-1", jwa.PS256, nil),
		enc.EncodeToString([]byte(`{"alg":"none","kid":"rs-1"}`)) + "." + parts[1] + ".",
		enc.EncodeToString([]byte(`{"alg":"HS256","kid":"rs-1"}`)) + "." + parts[1] + "." + enc.EncodeToString(pubJSON),
		enc.EncodeToString([]byte(`{"alg":"RS256"}`)) + "." + parts[1] + "." + parts[2],
		enc.EncodeToString([]byte(`{"alg":"RS256","kid":"nope"}`)) + "." + parts[1] + "." + parts[2],
		`{"payload":"` + parts[1] + `","signatures":[{"signature":"` + parts[2] + `"}]}`,
		parts[0] + "." + parts[1],
		good[:len(good)/2],
		"", "..", "Bearer " + good,
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, token string) {
		c, err := v.Verify(context.Background(), token)
		if err != nil {
			if !errors.Is(err, ErrInvalid) && !errors.Is(err, ErrUnknownKey) && !errors.Is(err, ErrExpired) {
				t.Fatalf("refusal %v has no sentinel", err)
			}
			if len(token) > 80 && strings.Contains(err.Error(), token) {
				t.Fatalf("refusal quotes the token")
			}
			if len(parts[2]) > 0 && strings.Contains(token, parts[2]) && strings.Contains(err.Error(), parts[2]) {
				t.Fatalf("refusal quotes a signature")
			}
			return
		}
		msg, perr := jws.Parse([]byte(token), jws.WithCompact())
		if perr != nil {
			t.Fatalf("verified what jws.Parse refuses: %v", perr)
		}
		for _, s := range signed {
			if bytes.Equal(s, msg.Payload()) {
				if c.User != "carol" {
					t.Fatalf("verified user %q", c.User)
				}
				return
			}
		}
		t.Fatalf("verified a token the provider never signed: %q", msg.Payload())
	})
}
