package centralsync

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jwk"
	"github.com/lestrrat-go/jwx/v2/jws"
	"golang.org/x/oauth2"
)

// Pairing: what `edgegate pair` stores and what the daemon later uses to
// get its access tokens without a shared secret.
//
// Client authentication, decided at pairing from the provider's discovery
// document and never changed silently afterwards:
//
//   - private_key_jwt (RFC 7523) when token_endpoint_auth_methods_supported
//     lists it: a short JWT (iss = sub = client_id, aud = the token
//     endpoint and the issuer, jti, iat, exp = +60s) signed by the gateway's
//     Ed25519 identity key when the provider accepts EdDSA, else by a P-256
//     key generated at pairing and kept in the same encrypted record. (The
//     identity package does not expose its seed, so the ES256 key is
//     generated, not derived; it is exactly as protected as the identity.)
//     Each request gets a fresh assertion, so providers that refuse a
//     replayed jti (Keycloak) accept every poll.
//   - none: a public client (client_id only), when the provider offers no
//     private_key_jwt or only RS256 for it.
//   - client_secret: mass provisioning with `--client-credentials FILE`;
//     the secret then lives in the encrypted record, never in a file the
//     daemon reads.

// CredentialsStateName is the encrypted-store record of the pairing.
const CredentialsStateName = "central-credentials"

// Client authentication methods.
const (
	AuthPrivateKeyJWT = "private_key_jwt"
	AuthNone          = "none"
	AuthClientSecret  = "client_secret"
)

// Grants the daemon uses after pairing.
const (
	GrantRefreshToken      = "refresh_token"
	GrantClientCredentials = "client_credentials"
)

// ErrNotPaired is returned when the store holds no pairing.
var ErrNotPaired = errors.New("this gateway is not paired: run edgegate pair")

// Credentials is the pairing record. Its text forms never show a secret.
type Credentials struct {
	V             int       `json:"v"`
	Gateway       string    `json:"gateway"`
	Issuer        string    `json:"issuer"`
	TokenURL      string    `json:"token_url"`
	RevocationURL string    `json:"revocation_url,omitempty"`
	CentralURL    string    `json:"central_url"`
	ClientID      string    `json:"client_id"`
	Grant         string    `json:"grant"`
	AuthMethod    string    `json:"auth_method"`
	Alg           string    `json:"alg,omitempty"`       // private_key_jwt: EdDSA or ES256
	ES256Key      []byte    `json:"es256_key,omitempty"` // PKCS#8, when Alg is ES256
	ClientSecret  string    `json:"client_secret,omitempty"`
	RefreshToken  string    `json:"refresh_token,omitempty"`
	Scopes        []string  `json:"scopes,omitempty"`
	User          string    `json:"user,omitempty"` // the account that approved
	PairedAt      time.Time `json:"paired_at"`
}

// String describes the pairing without secrets.
func (c Credentials) String() string {
	return fmt.Sprintf("pairing of %s with %s (client %s, %s, %s)", c.Gateway, c.Issuer, c.ClientID, c.Grant, c.AuthMethod)
}

// GoString keeps %#v from printing secrets.
func (c Credentials) GoString() string { return c.String() }

// Format keeps every verb on the safe text.
func (c Credentials) Format(f fmt.State, _ rune) { fmt.Fprint(f, c.String()) }

// LogValue keeps slog from walking the struct.
func (c Credentials) LogValue() slog.Value { return slog.StringValue(c.String()) }

// LoadCredentials reads the pairing record; ErrNotPaired when none.
func LoadCredentials(st StateStore) (*Credentials, error) {
	b, ok, err := st.GetState(CredentialsStateName)
	if err != nil {
		return nil, fmt.Errorf("load pairing: %w", err)
	}
	if !ok {
		return nil, ErrNotPaired
	}
	var c Credentials
	if err := json.Unmarshal(b, &c); err != nil {
		return nil, errors.New("load pairing: the stored record is corrupt: run edgegate pair --force")
	}
	if c.V != 1 {
		return nil, fmt.Errorf("load pairing: record version %d, want 1", c.V)
	}
	return &c, nil
}

// SaveCredentials writes the pairing record (synced by the store).
func SaveCredentials(st StateStore, c *Credentials) error {
	c.V = 1
	b, err := json.Marshal(c)
	if err != nil {
		return fmt.Errorf("save pairing: %w", err)
	}
	if err := st.PutState(CredentialsStateName, b); err != nil {
		return fmt.Errorf("save pairing: %w", err)
	}
	return nil
}

// Discovery is the part of an OIDC discovery document pairing uses.
type Discovery struct {
	Issuer                 string   `json:"issuer"`
	TokenEndpoint          string   `json:"token_endpoint"`
	DeviceAuthorizationURL string   `json:"device_authorization_endpoint"`
	RevocationEndpoint     string   `json:"revocation_endpoint"`
	JWKSURI                string   `json:"jwks_uri"`
	ScopesSupported        []string `json:"scopes_supported"`
	GrantTypesSupported    []string `json:"grant_types_supported"`
	TokenAuthMethods       []string `json:"token_endpoint_auth_methods_supported"`
	TokenAuthSigningAlgs   []string `json:"token_endpoint_auth_signing_alg_values_supported"`
	RevocationAuthMethods  []string `json:"revocation_endpoint_auth_methods_supported"`
}

// maxDiscoveryBytes bounds a discovery document, a key set or an API answer.
const maxDiscoveryBytes = 1 << 20

// Discover fetches {base}/.well-known/openid-configuration for each base in
// turn and returns the first document found (a 404 moves on to the next).
func Discover(ctx context.Context, hc *http.Client, bases ...string) (*Discovery, error) {
	var lastErr error
	for _, base := range bases {
		u := strings.TrimRight(base, "/") + "/.well-known/openid-configuration"
		var d Discovery
		status, err := getJSON(ctx, hc, u, "", &d)
		if status == http.StatusNotFound {
			lastErr = fmt.Errorf("no OIDC discovery document at %s", redactURL(u))
			continue
		}
		if err != nil {
			return nil, err
		}
		if d.Issuer == "" || d.TokenEndpoint == "" {
			return nil, fmt.Errorf("discovery document at %s has no issuer or token_endpoint", redactURL(u))
		}
		for _, e := range []string{d.TokenEndpoint, d.DeviceAuthorizationURL, d.RevocationEndpoint} {
			if e != "" && !strings.HasPrefix(e, "https://") {
				return nil, fmt.Errorf("discovery document at %s: endpoint %s is not https", redactURL(u), redactURL(e))
			}
		}
		return &d, nil
	}
	return nil, lastErr
}

// ClientAuthChoice is how the gateway will authenticate, from discovery.
type ClientAuthChoice struct {
	Method string // AuthPrivateKeyJWT or AuthNone
	Alg    string // EdDSA or ES256 with AuthPrivateKeyJWT
	Why    string // one line for the installer
}

// ChooseClientAuth picks private_key_jwt with EdDSA, then ES256, then a
// public client. An absent alg list (RFC 8414 leaves it optional) is read
// as "ES256 works", the algorithm every provider with private_key_jwt has.
func (d *Discovery) ChooseClientAuth() ClientAuthChoice {
	if !slices.Contains(d.TokenAuthMethods, AuthPrivateKeyJWT) {
		return ClientAuthChoice{Method: AuthNone, Why: "the provider does not offer private_key_jwt: public client, the refresh token is the credential"}
	}
	switch {
	case slices.Contains(d.TokenAuthSigningAlgs, "EdDSA"):
		return ClientAuthChoice{Method: AuthPrivateKeyJWT, Alg: "EdDSA", Why: "private_key_jwt with the gateway identity key (EdDSA)"}
	case len(d.TokenAuthSigningAlgs) == 0 || slices.Contains(d.TokenAuthSigningAlgs, "ES256"):
		return ClientAuthChoice{Method: AuthPrivateKeyJWT, Alg: "ES256", Why: "private_key_jwt with a P-256 key kept in the encrypted store (ES256)"}
	}
	return ClientAuthChoice{Method: AuthNone, Why: "the provider's private_key_jwt takes neither EdDSA nor ES256: public client"}
}

// Scopes returns openid, plus offline_access when the provider offers it.
func (d *Discovery) Scopes() []string {
	s := []string{"openid"}
	if slices.Contains(d.ScopesSupported, "offline_access") {
		s = append(s, "offline_access")
	}
	return s
}

// AssertionSigner signs client assertions.
type AssertionSigner interface {
	Alg() string
	KeyID() string
	PublicJWK() jwk.Key
	SignJWT(claims []byte) (string, error)
}

// IdentitySigner is what the gateway identity provides (identity.Identity).
type IdentitySigner interface {
	Thumbprint() string
	PublicJWK() jwk.Key
	Sign(payload []byte, extra map[string]any) (string, error)
}

type edSigner struct{ id IdentitySigner }

func (s edSigner) Alg() string        { return "EdDSA" }
func (s edSigner) KeyID() string      { return s.id.Thumbprint() }
func (s edSigner) PublicJWK() jwk.Key { return s.id.PublicJWK() }
func (s edSigner) SignJWT(c []byte) (string, error) {
	return s.id.Sign(c, map[string]any{"typ": "JWT"})
}

type esSigner struct {
	priv *ecdsa.PrivateKey
	pub  jwk.Key
	kid  string
}

func (s *esSigner) Alg() string        { return "ES256" }
func (s *esSigner) KeyID() string      { return s.kid }
func (s *esSigner) PublicJWK() jwk.Key { return s.pub }
func (s *esSigner) SignJWT(c []byte) (string, error) {
	hdr := jws.NewHeaders()
	for k, v := range map[string]any{jws.KeyIDKey: s.kid, jws.TypeKey: "JWT", jws.JWKKey: s.pub} {
		if err := hdr.Set(k, v); err != nil {
			return "", err
		}
	}
	out, err := jws.Sign(c, jws.WithKey(jwa.ES256, s.priv, jws.WithProtectedHeaders(hdr)))
	return string(out), err
}

// NewES256Key makes the PKCS#8 P-256 key for providers without EdDSA.
func NewES256Key() ([]byte, error) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate ES256 client key: %w", err)
	}
	return x509.MarshalPKCS8PrivateKey(k)
}

func newESSigner(pkcs8 []byte) (*esSigner, error) {
	k, err := x509.ParsePKCS8PrivateKey(pkcs8)
	if err != nil {
		return nil, errors.New("stored ES256 client key is corrupt")
	}
	priv, ok := k.(*ecdsa.PrivateKey)
	if !ok || priv.Curve != elliptic.P256() {
		return nil, errors.New("stored ES256 client key is not P-256")
	}
	pub, err := jwk.FromRaw(priv.Public())
	if err != nil {
		return nil, err
	}
	tp, err := pub.Thumbprint(crypto.SHA256)
	if err != nil {
		return nil, err
	}
	kid := base64.RawURLEncoding.EncodeToString(tp)
	_ = pub.Set(jwk.KeyIDKey, kid)
	_ = pub.Set(jwk.AlgorithmKey, jwa.ES256)
	return &esSigner{priv: priv, pub: pub, kid: kid}, nil
}

// SignerFor returns the assertion signer of c (nil unless private_key_jwt).
func SignerFor(c *Credentials, id IdentitySigner) (AssertionSigner, error) {
	if c.AuthMethod != AuthPrivateKeyJWT {
		return nil, nil
	}
	switch c.Alg {
	case "EdDSA":
		if id == nil {
			return nil, errors.New("private_key_jwt with EdDSA needs the gateway identity")
		}
		return edSigner{id}, nil
	case "ES256":
		return newESSigner(c.ES256Key)
	}
	return nil, fmt.Errorf("unsupported client assertion algorithm %q", c.Alg)
}

// ClientAuth authenticates the gateway's requests to the provider.
type ClientAuth struct {
	ClientID string
	Secret   string          // AuthClientSecret
	Signer   AssertionSigner // AuthPrivateKeyJWT
	Audience []string        // assertion aud: token endpoint and issuer
	Now      func() time.Time
}

// apply adds the client's credentials to a form.
func (a *ClientAuth) apply(form url.Values) error {
	form.Set("client_id", a.ClientID)
	switch {
	case a.Signer != nil:
		form.Del("client_secret")
		now := time.Now
		if a.Now != nil {
			now = a.Now
		}
		jti := make([]byte, 16)
		if _, err := rand.Read(jti); err != nil {
			return err
		}
		t := now().Unix()
		claims, err := json.Marshal(map[string]any{
			"iss": a.ClientID, "sub": a.ClientID, "aud": a.Audience,
			"jti": base64.RawURLEncoding.EncodeToString(jti), "iat": t, "exp": t + 60,
		})
		if err != nil {
			return err
		}
		jwtStr, err := a.Signer.SignJWT(claims)
		if err != nil {
			return fmt.Errorf("sign client assertion: %w", err)
		}
		form.Set("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
		form.Set("client_assertion", jwtStr)
	case a.Secret != "":
		form.Set("client_secret", a.Secret)
	}
	return nil
}

// Transport adds a fresh client assertion to every form POST that carries
// this client's client_id (oauth2's device and refresh requests), so that
// golang.org/x/oauth2 can run the grants while each request is signed anew.
type Transport struct {
	Base http.RoundTripper
	Auth *ClientAuth
}

func (t *Transport) RoundTrip(r *http.Request) (*http.Response, error) {
	base := t.Base
	if base == nil {
		base = http.DefaultTransport
	}
	mt, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if r.Method != http.MethodPost || mt != "application/x-www-form-urlencoded" || r.Body == nil || t.Auth == nil || t.Auth.Signer == nil {
		return base.RoundTrip(r)
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, maxDiscoveryBytes))
	r.Body.Close()
	if err != nil {
		return nil, err
	}
	form, err := url.ParseQuery(string(body))
	if err != nil || form.Get("client_id") != t.Auth.ClientID {
		return nil, errors.New("client assertion transport: unexpected request body")
	}
	if err := t.Auth.apply(form); err != nil {
		return nil, err
	}
	enc := form.Encode()
	r2 := r.Clone(r.Context())
	r2.Body = io.NopCloser(strings.NewReader(enc))
	r2.ContentLength = int64(len(enc))
	r2.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(strings.NewReader(enc)), nil }
	return base.RoundTrip(r2)
}

// HTTPClientWithAuth returns a copy of hc whose requests carry auth's
// client assertions.
func HTTPClientWithAuth(hc *http.Client, auth *ClientAuth) *http.Client {
	if hc == nil {
		hc = http.DefaultClient
	}
	c := *hc
	c.Transport = &Transport{Base: hc.Transport, Auth: auth}
	return &c
}

// OAuth2Config is the oauth2 configuration of a pairing (no secret field
// unless client_secret: assertions are added by the Transport).
func OAuth2Config(d *Discovery, clientID, secret string, scopes []string) *oauth2.Config {
	return &oauth2.Config{
		ClientID: clientID, ClientSecret: secret, Scopes: scopes,
		Endpoint: oauth2.Endpoint{
			TokenURL: d.TokenEndpoint, DeviceAuthURL: d.DeviceAuthorizationURL,
			AuthStyle: oauth2.AuthStyleInParams,
		},
	}
}

// PairedOptions configure NewPairedTokenSource.
type PairedOptions struct {
	Store      StateStore
	Identity   IdentitySigner // required for EdDSA assertions
	HTTPClient *http.Client
	// ClientCredentials carries EarlyRefresh, Metrics, Logger and Now to the
	// TokenSource; its grant fields are ignored.
	ClientCredentials
}

// NewPairedTokenSource returns a TokenSource for a paired gateway: the
// refresh_token grant authenticated by private_key_jwt (or as a public
// client), or the client credentials grant of mass provisioning. A
// rotated refresh token is written back to the store before the access
// token is handed out; if that write fails the new token is kept in memory
// and the write retried at the next fetch (the old one is already dead).
func NewPairedTokenSource(o PairedOptions) (*TokenSource, error) {
	c, err := LoadCredentials(o.Store)
	if err != nil {
		return nil, err
	}
	signer, err := SignerFor(c, o.Identity)
	if err != nil {
		return nil, fmt.Errorf("paired token source: %w", err)
	}
	cfg := o.ClientCredentials
	cfg.TokenURL = c.TokenURL
	switch c.Grant {
	case GrantClientCredentials:
		cfg.ClientID, cfg.ClientSecret, cfg.Scopes, cfg.HTTPClient = c.ClientID, c.ClientSecret, c.Scopes, o.HTTPClient
		return NewTokenSource(cfg), nil
	case GrantRefreshToken:
	default:
		return nil, fmt.Errorf("paired token source: unknown grant %q", c.Grant)
	}
	auth := &ClientAuth{ClientID: c.ClientID, Signer: signer, Audience: []string{c.TokenURL, c.Issuer}, Now: cfg.Now}
	r := &refresher{store: o.Store, creds: c, hc: HTTPClientWithAuth(o.HTTPClient, auth),
		conf: &oauth2.Config{ClientID: c.ClientID, Endpoint: oauth2.Endpoint{TokenURL: c.TokenURL, AuthStyle: oauth2.AuthStyleInParams}}}
	if cfg.Logger != nil {
		r.log = cfg.Logger
	} else {
		r.log = slog.New(slog.DiscardHandler)
	}
	return newTokenSource(cfg, r.fetch), nil
}

// refresher runs the refresh_token grant and persists rotations. Only the
// TokenSource's single flight calls fetch, but mu keeps it safe anyway.
type refresher struct {
	mu    sync.Mutex
	store StateStore
	creds *Credentials
	dirty bool // creds.RefreshToken not yet persisted
	hc    *http.Client
	conf  *oauth2.Config
	log   *slog.Logger
}

func (r *refresher) fetch(ctx context.Context) (*oauth2.Token, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.dirty {
		r.persist()
	}
	ctx = context.WithValue(ctx, oauth2.HTTPClient, r.hc)
	tok, err := r.conf.TokenSource(ctx, &oauth2.Token{RefreshToken: r.creds.RefreshToken, Expiry: time.Unix(1, 0)}).Token()
	if err != nil {
		var re *oauth2.RetrieveError
		if errors.As(err, &re) && re.ErrorCode == "invalid_grant" {
			re.ErrorDescription = "the pairing is no longer valid (revoked or expired): run edgegate pair --force"
		}
		return nil, err
	}
	if tok.RefreshToken != "" && tok.RefreshToken != r.creds.RefreshToken {
		r.creds.RefreshToken = tok.RefreshToken
		r.dirty = true
		r.persist()
	}
	return tok, nil
}

func (r *refresher) persist() {
	if err := SaveCredentials(r.store, r.creds); err != nil {
		r.log.Error("rotated refresh token not persisted; keeping it in memory and retrying", "err", err)
		return
	}
	r.dirty = false
}

// Revoke revokes c's refresh token (RFC 7009) at revocationURL. A provider
// without a revocation endpoint is not an error: the caller says so.
func Revoke(ctx context.Context, hc *http.Client, c *Credentials, signer AssertionSigner) error {
	if c.RevocationURL == "" {
		return errors.New("the provider has no revocation endpoint")
	}
	tok, hint := c.RefreshToken, "refresh_token"
	if tok == "" {
		return nil // client credentials: nothing long-lived was issued to us
	}
	form := url.Values{"token": {tok}, "token_type_hint": {hint}}
	auth := &ClientAuth{ClientID: c.ClientID, Secret: c.ClientSecret, Signer: signer, Audience: []string{c.TokenURL, c.Issuer}}
	if err := auth.apply(form); err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.RevocationURL, strings.NewReader(form.Encode()))
	if err != nil {
		return fmt.Errorf("revoke: %w", err)
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	resp, err := httpClient(hc).Do(req)
	if err != nil {
		return fmt.Errorf("revoke at %s: %w", redactURL(c.RevocationURL), unwrapURL(err))
	}
	defer resp.Body.Close()
	io.Copy(io.Discard, io.LimitReader(resp.Body, maxDiscoveryBytes))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("revoke at %s: status %d", redactURL(c.RevocationURL), resp.StatusCode)
	}
	return nil
}

// GatewayRegistration is the AppID row of an edge gateway at the
// platform's Ownership API, as the platform's IoT edge registers itself.
type GatewayRegistration struct {
	ElementID      string         `json:"elementId"`
	ElementType    string         `json:"elementType"`
	ElementName    string         `json:"elementName"`
	ElementURL     string         `json:"elementUrl"`
	ElementDetails map[string]any `json:"elementDetails"`
}

// RegisteredApp is the row the Ownership API answers with.
type RegisteredApp struct {
	ID        int64  `json:"id"`
	Username  string `json:"username"`
	ElementID string `json:"elementId"`
	Error     any    `json:"error"`
}

// RegisterGateway posts reg to {central}/ownership-api/v1/register/ with
// the Bearer token. The platform reports failures in an "error" member.
func RegisterGateway(ctx context.Context, hc *http.Client, central, bearer string, reg GatewayRegistration) (*RegisteredApp, error) {
	if reg.ElementType == "" {
		reg.ElementType = "AppID"
	}
	body, err := json.Marshal(reg)
	if err != nil {
		return nil, err
	}
	u := strings.TrimRight(central, "/") + "/ownership-api/v1/register/"
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u, bytes.NewReader(body))
	if err != nil {
		return nil, fmt.Errorf("register gateway: %w", err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+bearer)
	resp, err := httpClient(hc).Do(req)
	if err != nil {
		return nil, fmt.Errorf("register gateway at %s: %w", redactURL(u), unwrapURL(err))
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, maxDiscoveryBytes))
	var row RegisteredApp
	jerr := json.Unmarshal(b, &row)
	if resp.StatusCode/100 != 2 || jerr != nil || row.Error != nil {
		return nil, fmt.Errorf("register gateway at %s: status %d: %s", redactURL(u), resp.StatusCode, apiMessage(b))
	}
	return &row, nil
}

// FetchPolicyKeys gets the central policy-signing keys (a JWKS of public
// keys) from {central}/edgegate/v1/policy-keys and returns them as JSON.
func FetchPolicyKeys(ctx context.Context, hc *http.Client, central string) ([]byte, int, error) {
	u := strings.TrimRight(central, "/") + "/edgegate/v1/policy-keys"
	var raw json.RawMessage
	if _, err := getJSON(ctx, hc, u, "", &raw); err != nil {
		return nil, 0, err
	}
	set, err := jwk.Parse(raw)
	if err != nil {
		return nil, 0, fmt.Errorf("policy keys at %s: %w", redactURL(u), err)
	}
	if set.Len() == 0 {
		return nil, 0, fmt.Errorf("policy keys at %s: the set is empty", redactURL(u))
	}
	for i := 0; i < set.Len(); i++ {
		k, _ := set.Key(i)
		if _, isPriv := k.(interface{ D() []byte }); isPriv || k.KeyType() == "oct" {
			return nil, 0, fmt.Errorf("policy keys at %s: key %d is not a public key", redactURL(u), i)
		}
	}
	out, err := json.MarshalIndent(set, "", "  ")
	return append(out, '\n'), set.Len(), err
}

// getJSON GETs u (Bearer when given) into v; it returns the status.
func getJSON(ctx context.Context, hc *http.Client, u, bearer string, v any) (int, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return 0, fmt.Errorf("GET %s: %w", redactURL(u), err)
	}
	req.Header.Set("Accept", "application/json")
	if bearer != "" {
		req.Header.Set("Authorization", "Bearer "+bearer)
	}
	resp, err := httpClient(hc).Do(req)
	if err != nil {
		return 0, fmt.Errorf("GET %s: %w", redactURL(u), unwrapURL(err))
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, maxDiscoveryBytes))
	if err != nil {
		return resp.StatusCode, fmt.Errorf("GET %s: %w", redactURL(u), err)
	}
	if resp.StatusCode != http.StatusOK {
		return resp.StatusCode, fmt.Errorf("GET %s: status %d: %s", redactURL(u), resp.StatusCode, apiMessage(b))
	}
	if err := json.Unmarshal(b, v); err != nil {
		return resp.StatusCode, fmt.Errorf("GET %s: not JSON: %w", redactURL(u), err)
	}
	return resp.StatusCode, nil
}

// apiMessage extracts a short, printable reason from an API error body.
func apiMessage(b []byte) string {
	var m map[string]any
	if json.Unmarshal(b, &m) == nil {
		var parts []string
		for _, k := range []string{"error", "msg", "description", "error_description", "error_msg", "message"} {
			if v, ok := m[k]; ok && v != nil && fmt.Sprint(v) != "" {
				parts = append(parts, fmt.Sprint(v))
			}
		}
		if len(parts) > 0 {
			return clip(strings.Join(parts, ": "))
		}
	}
	return clip(strings.TrimSpace(string(b)))
}

func httpClient(hc *http.Client) *http.Client {
	if hc == nil {
		return http.DefaultClient
	}
	return hc
}

func unwrapURL(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}

// KeyFingerprint is a short SHA-256 of a key set, to show what was pinned.
func KeyFingerprint(keys []byte) string {
	h := sha256.Sum256(keys)
	return base64.RawURLEncoding.EncodeToString(h[:9])
}
