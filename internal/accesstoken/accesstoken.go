// Package accesstoken verifies access tokens (JWTs) of the central single
// sign-on offline, against a cached copy of the provider's signing keys.
//
// The rules, each one a known attack closed:
//   - the algorithm is pinned to the key: every key in the set gets an
//     explicit "alg" from its type (RSA → RS256, EC P-256 → ES256, Ed25519 →
//     EdDSA) unless it carries a compatible one, symmetric ("oct") keys are
//     dropped, so a token can neither say "none" nor make a public key into
//     an HMAC secret;
//   - the key is chosen by "kid", which is required;
//   - exp and nbf are checked with a small clock skew, iss must be the
//     configured issuer, aud must contain the configured audience;
//   - an unknown kid triggers at most one refresh of the key set per
//     RefreshInterval, so forged tokens cannot hammer the provider.
//
// The key set is persisted (in the encrypted store) after every successful
// fetch, so verification keeps working after a restart while offline.
package accesstoken

import (
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jwk"
	"github.com/lestrrat-go/jwx/v2/jws"
	"github.com/lestrrat-go/jwx/v2/jwt"

	"github.com/edgegate/edgegate/internal/logx"
)

// MaxTokenBytes bounds what Verify parses.
const MaxTokenBytes = 16 << 10

// maxJWKSBytes bounds a fetched key set.
const maxJWKSBytes = 1 << 20

// stateName is the store record holding the cached key set.
const stateName = "oidc-jwks"

// Errors callers branch on.
var (
	ErrInvalid    = errors.New("access token is not valid")
	ErrUnknownKey = errors.New("access token signed by an unknown key")
	ErrExpired    = errors.New("access token has expired")
)

// StateStore persists the key set.
type StateStore interface {
	GetState(name string) ([]byte, bool, error)
	PutState(name string, v []byte) error
}

// Options configures a Verifier.
type Options struct {
	Issuer   string // expected "iss"
	Audience string // required in "aud"
	// JWKSURL is where the key set is fetched; default: discovered from
	// {Issuer}/.well-known/openid-configuration.
	JWKSURL    string
	HTTPClient *http.Client
	Store      StateStore // may be nil: no persistence
	// Skew tolerated on exp/nbf/iat (default 30s).
	Skew time.Duration
	// RefreshInterval bounds key-set refreshes on unknown kids (default 1m).
	RefreshInterval time.Duration
	Now             func() time.Time
}

// Claims are what the gateway uses of a verified token.
type Claims struct {
	User     string // preferred_username, else sub
	Subject  string
	ClientID string // azp
	Expiry   time.Time
	// Groups is the token's "groups" claim: Keycloak adds it when the
	// realm (or the client) has a "Group Membership" mapper, as group
	// paths ("/staff", "/org/staff") or, with "full path" off, names.
	// Absent: no groups.
	Groups []string
}

// MaxGroups bounds the groups taken from a token.
const MaxGroups = 64

// Verifier verifies access tokens against the cached key set.
type Verifier struct {
	opts Options

	mu          sync.Mutex
	set         jwk.Set
	lastRefresh time.Time
	jwksURL     string
}

// New builds a verifier and loads the persisted key set, if any. It does
// not touch the network.
func New(opts Options) (*Verifier, error) {
	if opts.Issuer == "" || opts.Audience == "" {
		return nil, errors.New("access token verifier: issuer and audience are required")
	}
	if opts.Skew == 0 {
		opts.Skew = 30 * time.Second
	}
	if opts.RefreshInterval == 0 {
		opts.RefreshInterval = time.Minute
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.HTTPClient == nil {
		opts.HTTPClient = &http.Client{Timeout: 15 * time.Second}
	}
	v := &Verifier{opts: opts, set: jwk.NewSet(), jwksURL: opts.JWKSURL}
	if opts.Store != nil {
		b, ok, err := opts.Store.GetState(stateName)
		if err != nil {
			return nil, fmt.Errorf("load cached key set: %w", err)
		}
		if ok {
			set, err := pinned(b)
			if err != nil {
				return nil, fmt.Errorf("load cached key set: %w", err)
			}
			v.set = set
		}
	}
	return v, nil
}

// Keys is the number of keys in the cached set.
func (v *Verifier) Keys() int {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.set.Len()
}

// Verify checks a token and returns its claims. A token whose kid is not in
// the cached set triggers one rate-limited refresh of the set.
func (v *Verifier) Verify(ctx context.Context, token string) (Claims, error) {
	if len(token) > MaxTokenBytes {
		return Claims{}, fmt.Errorf("%w: %d bytes", ErrInvalid, len(token))
	}
	msg, err := jws.Parse([]byte(token), jws.WithCompact())
	if err != nil || len(msg.Signatures()) != 1 {
		return Claims{}, fmt.Errorf("%w: not a compact JWS", ErrInvalid)
	}
	kid := msg.Signatures()[0].ProtectedHeaders().KeyID()
	if kid == "" {
		return Claims{}, fmt.Errorf("%w: no kid", ErrInvalid)
	}
	set := v.keys()
	if _, ok := set.LookupKeyID(kid); !ok {
		if err := v.refresh(ctx); err != nil && !errors.Is(err, errRateLimited) {
			return Claims{}, fmt.Errorf("%w: kid %q: %v", ErrUnknownKey, clip(kid), err)
		}
		set = v.keys()
		if _, ok := set.LookupKeyID(kid); !ok {
			return Claims{}, fmt.Errorf("%w: kid %q", ErrUnknownKey, clip(kid))
		}
	}
	tok, err := jwt.Parse([]byte(token),
		jwt.WithKeySet(set, jws.WithRequireKid(true), jws.WithInferAlgorithmFromKey(false)),
		jwt.WithValidate(true),
		jwt.WithIssuer(v.opts.Issuer),
		jwt.WithAudience(v.opts.Audience),
		jwt.WithAcceptableSkew(v.opts.Skew),
		jwt.WithClock(jwt.ClockFunc(v.opts.Now)),
		jwt.WithRequiredClaim("exp"),
	)
	if err != nil {
		if errors.Is(err, jwt.ErrTokenExpired()) {
			return Claims{}, ErrExpired
		}
		return Claims{}, fmt.Errorf("%w: %v", ErrInvalid, scrub(err))
	}
	c := Claims{Subject: tok.Subject(), Expiry: tok.Expiration()}
	if u, ok := tok.Get("preferred_username"); ok {
		c.User, _ = u.(string)
	}
	if c.User == "" {
		c.User = c.Subject
	}
	if azp, ok := tok.Get("azp"); ok {
		c.ClientID, _ = azp.(string)
	}
	if g, ok := tok.Get("groups"); ok {
		c.Groups = groupsClaim(g)
	}
	if c.User == "" {
		return Claims{}, fmt.Errorf("%w: no preferred_username or sub", ErrInvalid)
	}
	return c, nil
}

func (v *Verifier) keys() jwk.Set {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.set
}

var errRateLimited = errors.New("key set refreshed recently")

// Refresh fetches the key set now (at start, and periodically by callers
// that want it fresh).
func (v *Verifier) Refresh(ctx context.Context) error {
	v.mu.Lock()
	v.lastRefresh = time.Time{}
	v.mu.Unlock()
	return v.refresh(ctx)
}

func (v *Verifier) refresh(ctx context.Context) error {
	v.mu.Lock()
	now := v.opts.Now()
	if !v.lastRefresh.IsZero() && now.Sub(v.lastRefresh) < v.opts.RefreshInterval {
		v.mu.Unlock()
		return errRateLimited
	}
	v.lastRefresh = now
	url := v.jwksURL
	v.mu.Unlock()

	if url == "" {
		var err error
		if url, err = v.discover(ctx); err != nil {
			return err
		}
	}
	raw, err := v.get(ctx, url)
	if err != nil {
		return fmt.Errorf("fetch key set: %w", err)
	}
	set, err := pinned(raw)
	if err != nil {
		return fmt.Errorf("fetch key set: %w", err)
	}
	if set.Len() == 0 {
		return errors.New("fetch key set: no usable keys")
	}
	if v.opts.Store != nil {
		if err := v.opts.Store.PutState(stateName, raw); err != nil {
			return fmt.Errorf("persist key set: %w", err)
		}
	}
	v.mu.Lock()
	v.set, v.jwksURL = set, url
	v.mu.Unlock()
	return nil
}

func (v *Verifier) discover(ctx context.Context) (string, error) {
	raw, err := v.get(ctx, strings.TrimRight(v.opts.Issuer, "/")+"/.well-known/openid-configuration")
	if err != nil {
		return "", fmt.Errorf("discover key set: %w", err)
	}
	var doc struct {
		Issuer  string `json:"issuer"`
		JWKSURI string `json:"jwks_uri"`
	}
	if err := json.Unmarshal(raw, &doc); err != nil || doc.JWKSURI == "" {
		return "", errors.New("discover key set: no jwks_uri in the discovery document")
	}
	if doc.Issuer != v.opts.Issuer {
		return "", fmt.Errorf("discover key set: issuer %q, want %q", clip(doc.Issuer), v.opts.Issuer)
	}
	if !strings.HasPrefix(doc.JWKSURI, "https://") {
		return "", errors.New("discover key set: jwks_uri is not https")
	}
	return doc.JWKSURI, nil
}

func (v *Verifier) get(ctx context.Context, url string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := v.opts.HTTPClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: status %d", url, resp.StatusCode)
	}
	b, err := io.ReadAll(io.LimitReader(resp.Body, maxJWKSBytes+1))
	if err != nil {
		return nil, err
	}
	if len(b) > maxJWKSBytes {
		return nil, fmt.Errorf("GET %s: key set larger than %d bytes", url, maxJWKSBytes)
	}
	return b, nil
}

// pinned parses a JWKS and gives every usable public key an explicit
// algorithm; symmetric and unknown keys are dropped.
func pinned(raw []byte) (jwk.Set, error) {
	in, err := jwk.Parse(raw)
	if err != nil {
		return nil, fmt.Errorf("parse key set: %w", err)
	}
	out := jwk.NewSet()
	for i := range in.Len() {
		k, _ := in.Key(i)
		if k.KeyID() == "" {
			continue
		}
		if use := k.KeyUsage(); use != "" && use != "sig" {
			continue
		}
		pub, err := k.PublicKey()
		if err != nil {
			continue
		}
		want, ok := algFor(pub)
		if !ok {
			continue // symmetric or unsupported: never usable for verification
		}
		if have := pub.Algorithm().String(); have != "" && have != want.String() && !compatible(pub, have) {
			continue
		}
		if pub.Algorithm().String() == "" {
			if err := pub.Set(jwk.AlgorithmKey, want); err != nil {
				continue
			}
		}
		if err := out.AddKey(pub); err != nil {
			continue
		}
	}
	return out, nil
}

func algFor(k jwk.Key) (jwa.SignatureAlgorithm, bool) {
	var raw any
	if err := k.Raw(&raw); err != nil {
		return "", false
	}
	switch p := raw.(type) {
	case *rsa.PublicKey:
		return jwa.RS256, true
	case *ecdsa.PublicKey:
		switch p.Curve {
		case elliptic.P256():
			return jwa.ES256, true
		case elliptic.P384():
			return jwa.ES384, true
		}
	case ed25519.PublicKey:
		return jwa.EdDSA, true
	}
	return "", false
}

// compatible accepts an explicit alg of the key's own family (RS384 on an
// RSA key, PS256, ...), never one of another family.
func compatible(k jwk.Key, alg string) bool {
	switch k.KeyType() {
	case jwa.RSA:
		return strings.HasPrefix(alg, "RS") || strings.HasPrefix(alg, "PS")
	case jwa.EC:
		return strings.HasPrefix(alg, "ES")
	case jwa.OKP:
		return alg == "EdDSA"
	}
	return false
}

func clip(s string) string { return logx.Clip(s, 64) }

// scrub keeps library errors short; they never contain the token itself.
func scrub(err error) string {
	return clip(err.Error())
}

// groupsClaim reads a "groups" claim: an array of strings (a lone string
// is taken as one group); other values are ignored, and at most MaxGroups
// are kept.
func groupsClaim(v any) []string {
	var out []string
	add := func(x any) {
		if s, ok := x.(string); ok && s != "" && len(out) < MaxGroups {
			out = append(out, s)
		}
	}
	switch g := v.(type) {
	case []any:
		for _, x := range g {
			add(x)
		}
	case []string:
		for _, x := range g {
			add(x)
		}
	case string:
		add(g)
	}
	return out
}
