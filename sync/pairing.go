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
	"net"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jwk"
	"github.com/lestrrat-go/jwx/v2/jws"
	"golang.org/x/oauth2"
)

// Pairing: what `edgegate pair` stores and what the daemon later uses to
// get its access tokens.
//
// Client authentication, decided at pairing and never changed silently
// afterwards:
//
//   - none: a public client (client_id only), the default. Snap4City's own
//     IoT Edge uses the public client nodered-iotedge of realm master
//     (node-red-contrib-snap4city-user, snap4city-authentication-dev.js),
//     so a stock platform needs no new client for the gateway.
//   - client_secret_basic or client_secret_post, for a confidential client
//     (`pair --client-secret-file`): basic when the provider's
//     token_endpoint_auth_methods_supported lists it or lists nothing (RFC
//     8414 §2 default), else post. The secret lives in the encrypted record.
//   - private_key_jwt (RFC 7523), only when the operator says the client is
//     registered for it (`pair --private-key-jwt`) AND the provider lists it:
//     a short JWT (iss = sub = client_id, aud = the token endpoint and the
//     issuer, jti, iat, exp = +60s) signed by the gateway's Ed25519 identity
//     key when the provider accepts EdDSA, else by a P-256 key generated at
//     pairing and kept in the same encrypted record. Each request gets a
//     fresh assertion, so providers that refuse a replayed jti (Keycloak)
//     accept every poll. A provider that lists the method does not know the
//     gateway's key unless someone registered it, hence the flag.
//   - client_secret: mass provisioning with `--client-credentials FILE`
//     (the client credentials grant).

// CredentialsStateName is the encrypted-store record of the pairing.
const CredentialsStateName = "central-credentials"

// Client authentication methods.
const (
	AuthPrivateKeyJWT     = "private_key_jwt"
	AuthNone              = "none"
	AuthClientSecret      = "client_secret" // client credentials grant (mass provisioning)
	AuthClientSecretBasic = "client_secret_basic"
	AuthClientSecretPost  = "client_secret_post"
)

// Grants the daemon uses after pairing.
const (
	GrantRefreshToken      = "refresh_token"
	GrantClientCredentials = "client_credentials"
)

// ErrNotPaired is returned when the store holds no pairing.
var ErrNotPaired = errors.New("this gateway is not paired: pair it with edgegate pair --central URL")

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
	UserinfoEndpoint       string   `json:"userinfo_endpoint"`
	ScopesSupported        []string `json:"scopes_supported"`
	GrantTypesSupported    []string `json:"grant_types_supported"`
	TokenAuthMethods       []string `json:"token_endpoint_auth_methods_supported"`
	TokenAuthSigningAlgs   []string `json:"token_endpoint_auth_signing_alg_values_supported"`
	RevocationAuthMethods  []string `json:"revocation_endpoint_auth_methods_supported"`
}

// maxDiscoveryBytes bounds a discovery document, a key set or an API answer.
const maxDiscoveryBytes = 1 << 20

// Discover fetches {issuer}/.well-known/openid-configuration. The
// document's issuer must equal issuer exactly (OpenID Connect Discovery 1.0
// §4.3: otherwise a document could name another provider's endpoints), and
// the issuer and every endpoint must be https, except on loopback hosts
// (tests, a provider on the gateway itself).
func Discover(ctx context.Context, hc *http.Client, issuer string) (*Discovery, error) {
	if err := SecureURL(issuer); err != nil {
		return nil, fmt.Errorf("issuer %s: %w", redactURL(issuer), err)
	}
	u := strings.TrimRight(issuer, "/") + "/.well-known/openid-configuration"
	var d Discovery
	status, err := getJSON(ctx, hc, u, "", &d)
	if status == http.StatusNotFound {
		return nil, fmt.Errorf("no OIDC discovery document at %s: check --central, --realm or --issuer", redactURL(u))
	}
	if err != nil {
		return nil, err
	}
	if d.Issuer != issuer {
		return nil, fmt.Errorf("discovery document at %s names issuer %q, but the configured issuer is %q; they must be equal (OpenID Connect Discovery 1.0 §4.3): pass --issuer %s only if you trust it",
			redactURL(u), clip(d.Issuer), issuer, clip(d.Issuer))
	}
	if d.TokenEndpoint == "" {
		return nil, fmt.Errorf("discovery document at %s has no token_endpoint", redactURL(u))
	}
	for _, e := range []struct{ name, url string }{
		{"token_endpoint", d.TokenEndpoint}, {"device_authorization_endpoint", d.DeviceAuthorizationURL},
		{"revocation_endpoint", d.RevocationEndpoint}, {"userinfo_endpoint", d.UserinfoEndpoint}, {"jwks_uri", d.JWKSURI},
	} {
		if e.url == "" {
			continue
		}
		if err := SecureURL(e.url); err != nil {
			return nil, fmt.Errorf("discovery document at %s: %s %s: %w", redactURL(u), e.name, redactURL(e.url), err)
		}
	}
	return &d, nil
}

// SecureURL accepts an https URL, or an http one to a loopback host
// (127.0.0.0/8, ::1, localhost), and nothing else.
func SecureURL(raw string) error {
	u, err := url.Parse(raw)
	if err != nil || u.Host == "" {
		return errors.New("not an absolute URL")
	}
	if u.User != nil {
		return errors.New("must not carry credentials")
	}
	switch u.Scheme {
	case "https":
		return nil
	case "http":
		if isLoopbackHost(u.Hostname()) {
			return nil
		}
		return errors.New("is not https (plain http is allowed only to a loopback host)")
	}
	return fmt.Errorf("scheme %q: want https", u.Scheme)
}

func isLoopbackHost(h string) bool {
	if strings.EqualFold(h, "localhost") {
		return true
	}
	ip := net.ParseIP(h)
	return ip != nil && ip.IsLoopback()
}

// ClientAuthChoice is how the gateway will authenticate.
type ClientAuthChoice struct {
	Method string // AuthNone, AuthClientSecretBasic/Post or AuthPrivateKeyJWT
	Alg    string // EdDSA or ES256 with AuthPrivateKeyJWT
	Why    string // one line for the installer
}

// ChooseClientAuth decides the client authentication of the device grant.
// Without a secret or the operator's word that the client is registered
// for private_key_jwt, the gateway is a public client: a provider listing
// private_key_jwt says nothing about this client. withSecret picks
// client_secret_basic (listed, or nothing listed: RFC 8414 §2's default),
// else client_secret_post. privateKeyJWT needs the method listed, with
// EdDSA, else ES256 (an absent alg list is read as "ES256 works").
func (d *Discovery) ChooseClientAuth(withSecret, privateKeyJWT bool) (ClientAuthChoice, error) {
	switch {
	case withSecret && privateKeyJWT:
		return ClientAuthChoice{}, errors.New("a client secret and private_key_jwt exclude each other")
	case privateKeyJWT:
		if !slices.Contains(d.TokenAuthMethods, AuthPrivateKeyJWT) {
			return ClientAuthChoice{}, fmt.Errorf("%s does not list private_key_jwt in token_endpoint_auth_methods_supported (it lists %v)", d.Issuer, d.TokenAuthMethods)
		}
		switch {
		case slices.Contains(d.TokenAuthSigningAlgs, "EdDSA"):
			return ClientAuthChoice{Method: AuthPrivateKeyJWT, Alg: "EdDSA", Why: "private_key_jwt with the gateway identity key (EdDSA)"}, nil
		case len(d.TokenAuthSigningAlgs) == 0 || slices.Contains(d.TokenAuthSigningAlgs, "ES256"):
			return ClientAuthChoice{Method: AuthPrivateKeyJWT, Alg: "ES256", Why: "private_key_jwt with a P-256 key kept in the encrypted store (ES256)"}, nil
		}
		return ClientAuthChoice{}, fmt.Errorf("%s takes private_key_jwt only with %v; the gateway signs with EdDSA or ES256", d.Issuer, d.TokenAuthSigningAlgs)
	case withSecret:
		if len(d.TokenAuthMethods) == 0 || slices.Contains(d.TokenAuthMethods, AuthClientSecretBasic) {
			return ClientAuthChoice{Method: AuthClientSecretBasic, Why: "confidential client, client_secret_basic"}, nil
		}
		if slices.Contains(d.TokenAuthMethods, AuthClientSecretPost) {
			return ClientAuthChoice{Method: AuthClientSecretPost, Why: "confidential client, client_secret_post"}, nil
		}
		return ClientAuthChoice{}, fmt.Errorf("%s takes neither client_secret_basic nor client_secret_post (it lists %v)", d.Issuer, d.TokenAuthMethods)
	}
	return ClientAuthChoice{Method: AuthNone, Why: "public client, the refresh token is the credential"}, nil
}

// DefaultScopes are what pair asks for: openid; profile, which defines
// preferred_username in userinfo (OpenID Connect Core §5.4), the name the
// Ownership API and the Orion Broker Filter know the account by
// (Ownership-API/session.php; a default client scope on Keycloak); and
// offline_access, an offline refresh token that survives weeks of
// reboots and outages.
var DefaultScopes = []string{"openid", "profile", "offline_access"}

// AssertionSigner signs client assertions.
type AssertionSigner interface {
	Alg() string
	KeyID() string
	PublicJWK() jwk.Key
	SignJWT(claims []byte) (string, error)
}

// IdentitySigner is what the gateway identity provides (keys.Identity).
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
	Secret   string          // client_secret_basic/post, client credentials
	Basic    bool            // the secret goes in the Authorization header (client_secret_basic)
	Signer   AssertionSigner // AuthPrivateKeyJWT
	Audience []string        // assertion aud: token endpoint and issuer
	Now      func() time.Time
}

// ClientAuthFor is the client authentication of a pairing record.
func ClientAuthFor(c *Credentials, signer AssertionSigner) *ClientAuth {
	return &ClientAuth{ClientID: c.ClientID, Secret: c.ClientSecret, Basic: c.AuthMethod == AuthClientSecretBasic,
		Signer: signer, Audience: []string{c.TokenURL, c.Issuer}}
}

// authorize adds the client's credentials to a form POST (RFC 6749 §2.3.1:
// basic credentials are form-encoded before base64).
func (a *ClientAuth) authorize(req *http.Request, form url.Values) error {
	if a.Signer == nil && a.Secret != "" && a.Basic {
		form.Del("client_id")
		form.Del("client_secret")
		req.SetBasicAuth(url.QueryEscape(a.ClientID), url.QueryEscape(a.Secret))
		return nil
	}
	return a.apply(form)
}

// apply adds the client's credentials to a form (client_secret_post or
// private_key_jwt or, for a public client, the client_id alone).
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

// Transport authenticates the client on every form POST that carries this
// client's client_id, so that golang.org/x/oauth2 can run the grants: a
// fresh client assertion on each request (private_key_jwt), or the secret
// where oauth2 sends none (its device authorization request, which RFC
// 8628 §3.1 says a confidential client authenticates).
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
	if r.Method != http.MethodPost || mt != "application/x-www-form-urlencoded" || r.Body == nil || t.Auth == nil ||
		(t.Auth.Signer == nil && (t.Auth.Secret == "" || r.Header.Get("Authorization") != "")) {
		return base.RoundTrip(r)
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, maxDiscoveryBytes))
	r.Body.Close()
	if err != nil {
		return nil, err
	}
	form, err := url.ParseQuery(string(body))
	if err != nil || form.Get("client_id") != t.Auth.ClientID {
		return nil, errors.New("client authentication transport: unexpected request body")
	}
	r2 := r.Clone(r.Context())
	if t.Auth.Signer != nil || form.Get("client_secret") == "" {
		if err := t.Auth.authorize(r2, form); err != nil {
			return nil, err
		}
	}
	enc := form.Encode()
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

// OAuth2Config is the oauth2 configuration of pairing record c at the
// provider d (no secret unless client_secret_*: assertions are added by
// the Transport).
func OAuth2Config(d *Discovery, c *Credentials) *oauth2.Config {
	return &oauth2.Config{
		ClientID: c.ClientID, ClientSecret: c.ClientSecret, Scopes: c.Scopes,
		Endpoint: oauth2.Endpoint{
			TokenURL: d.TokenEndpoint, DeviceAuthURL: d.DeviceAuthorizationURL,
			AuthStyle: authStyle(c.AuthMethod),
		},
	}
}

func authStyle(method string) oauth2.AuthStyle {
	if method == AuthClientSecretBasic {
		return oauth2.AuthStyleInHeader
	}
	return oauth2.AuthStyleInParams
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
	auth := ClientAuthFor(c, signer)
	auth.Now = cfg.Now
	r := &refresher{store: o.Store, creds: c, hc: HTTPClientWithAuth(o.HTTPClient, auth),
		conf: &oauth2.Config{ClientID: c.ClientID, ClientSecret: c.ClientSecret,
			Endpoint: oauth2.Endpoint{TokenURL: c.TokenURL, AuthStyle: authStyle(c.AuthMethod)}}}
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

// Revoke revokes c's refresh token (RFC 7009) at its revocation endpoint.
// A provider without a revocation endpoint is not an error: the caller says so.
func Revoke(ctx context.Context, hc *http.Client, c *Credentials, signer AssertionSigner) error {
	if c.RevocationURL == "" {
		return errors.New("the provider has no revocation endpoint")
	}
	if c.RefreshToken == "" {
		return nil // client credentials: nothing long-lived was issued to us
	}
	return RevokeToken(ctx, hc, c.RevocationURL, c.RefreshToken, "refresh_token", ClientAuthFor(c, signer))
}

// RevokeToken revokes one token (RFC 7009 §2.1) with hint refresh_token or
// access_token. The provider answers 200 also for a token it does not know
// (§2.2), so 200 is success; the token never appears in an error.
func RevokeToken(ctx context.Context, hc *http.Client, revocationURL, token, hint string, auth *ClientAuth) error {
	if revocationURL == "" {
		return errors.New("the provider has no revocation endpoint")
	}
	form := url.Values{"token": {token}, "token_type_hint": {hint}}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, revocationURL, nil)
	if err != nil {
		return fmt.Errorf("revoke: %w", err)
	}
	if err := auth.authorize(req, form); err != nil {
		return err
	}
	enc := form.Encode()
	req.Body = io.NopCloser(strings.NewReader(enc))
	req.ContentLength = int64(len(enc))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	resp, err := httpClient(hc).Do(req)
	if err != nil {
		return fmt.Errorf("revoke %s at %s: %w", hint, redactURL(revocationURL), unwrapURL(err))
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, maxDiscoveryBytes))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("revoke %s at %s: status %d: %s", hint, redactURL(revocationURL), resp.StatusCode, apiMessage(b))
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

// RegisteredApp is the row the Ownership API answers with. Stock echoes
// the posted object with username, plus id only when it inserted a new
// row; re-registering an existing row updates it and answers no id
// (Ownership-API/v1/register/index.php).
type RegisteredApp struct {
	ID        int64  `json:"id"`
	Username  string `json:"username"`
	ElementID string `json:"elementId"`
	Error     any    `json:"error"`
}

// Created reports whether the registration inserted a new row (which a
// failed pairing must then delete) rather than updating the caller's own.
func (r *RegisteredApp) Created() bool { return r.ID != 0 }

// RegisterGateway posts reg to {central}/ownership-api/v1/register/ with
// the Bearer token. Stock reports failures as HTTP 400 with an "error"
// member, e.g. {"error":"reached limit of 0","limit":0,"current":0}
// (Ownership-API/v1/register/index.php).
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
		var refusal struct {
			Limit *phpInt `json:"limit"`
		}
		if resp.StatusCode == http.StatusBadRequest && json.Unmarshal(b, &refusal) == nil && refusal.Limit != nil {
			return nil, fmt.Errorf("register gateway at %s: %w: %s", redactURL(u), ErrLimitReached, apiMessage(b))
		}
		return nil, fmt.Errorf("register gateway at %s: status %d: %s", redactURL(u), resp.StatusCode, apiMessage(b))
	}
	return &row, nil
}

// ErrLimitReached is the Ownership API's refusal of a new row beyond the
// account's limit: HTTP 400 {"error":"reached limit of N","limit":N,
// "current":M} (Ownership-API/v1/register/index.php).
var ErrLimitReached = errors.New("the account's limit for this element type is reached")

// ErrNoOwnershipAPI says the central URL serves no Ownership API (404).
var ErrNoOwnershipAPI = errors.New("no Ownership API")

// DeleteApp deletes the caller's ownership row elementID of type
// elementType. Stock reads type and elementId from the request (any
// method), marks the rows deleted and answers {"deleted": N}, with HTTP
// 400 when N is 0 (Ownership-API/v1/delete/index.php).
func DeleteApp(ctx context.Context, hc *http.Client, central, bearer, elementType, elementID string) error {
	q := url.Values{"type": {elementType}, "elementId": {elementID}}
	u := strings.TrimRight(central, "/") + "/ownership-api/v1/delete/?" + q.Encode()
	var ans struct {
		Deleted int `json:"deleted"`
	}
	if _, err := getJSON(ctx, hc, u, bearer, &ans); err != nil {
		return fmt.Errorf("delete %s %s: %w", elementType, elementID, err)
	}
	if ans.Deleted < 1 {
		return fmt.Errorf("delete %s %s: the Ownership API deleted nothing", elementType, elementID)
	}
	return nil
}

// OwnershipLimits is the answer of {central}/ownership-api/v1/limits/:
// the caller's username, role and organization, and per element type its
// limit and current count (Ownership-API/v1/limits/index.php).
type OwnershipLimits struct {
	Username     string         `json:"username"`
	Role         string         `json:"role"`
	Organization string         `json:"organization"`
	Limits       []ElementLimit `json:"limits"`
}

// ElementLimit is one element type's limit and count.
type ElementLimit struct {
	ElementType string `json:"elementType"`
	Limit       phpInt `json:"limit"`
	Current     phpInt `json:"current"`
}

// Free returns the free slots of elementType and whether the answer
// named that type at all.
func (l *OwnershipLimits) Free(elementType string) (int64, bool) {
	for _, e := range l.Limits {
		if e.ElementType == elementType {
			return max(int64(e.Limit)-int64(e.Current), 0), true
		}
	}
	return 0, false
}

// Limit returns the limit and the current count of elementType.
func (l *OwnershipLimits) Limit(elementType string) (limit, current int64) {
	for _, e := range l.Limits {
		if e.ElementType == elementType {
			return int64(e.Limit), int64(e.Current)
		}
	}
	return 0, 0
}

// phpInt reads a count as PHP's json_encode writes a MySQL value: a
// number, a numeric string ("5", mysqli returns strings) or null (no
// limits row: SELECT max() is NULL, which register compares as 0).
type phpInt int64

func (n *phpInt) UnmarshalJSON(b []byte) error {
	s := strings.Trim(string(b), `"`)
	if s == "null" || s == "" {
		*n = 0
		return nil
	}
	v, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		f, ferr := strconv.ParseFloat(s, 64)
		if ferr != nil {
			return fmt.Errorf("not a count: %s", clip(string(b)))
		}
		v = int64(f)
	}
	*n = phpInt(v)
	return nil
}

// FetchOwnershipLimits gets the caller's limits for the given element
// types (stock's default without type is all of DashboardID, AppID,
// IOTID, DAAppID).
func FetchOwnershipLimits(ctx context.Context, hc *http.Client, central, bearer string, types ...string) (*OwnershipLimits, error) {
	u := strings.TrimRight(central, "/") + "/ownership-api/v1/limits/"
	if len(types) > 0 {
		u += "?" + url.Values{"type": {strings.Join(types, ";")}}.Encode()
	}
	var l OwnershipLimits
	if status, err := getJSON(ctx, hc, u, bearer, &l); err != nil {
		if status == http.StatusNotFound {
			return nil, fmt.Errorf("ownership limits: %w at %s", ErrNoOwnershipAPI, redactURL(u))
		}
		return nil, fmt.Errorf("ownership limits: %w", err)
	}
	return &l, nil
}

// UserInfo asks the provider's userinfo endpoint who bearer belongs to:
// username, else preferred_username, the order the Ownership API uses
// (Ownership-API/session.php).
func UserInfo(ctx context.Context, hc *http.Client, userinfoURL, bearer string) (string, error) {
	var ui struct {
		Username          string `json:"username"`
		PreferredUsername string `json:"preferred_username"`
	}
	if _, err := getJSON(ctx, hc, userinfoURL, bearer, &ui); err != nil {
		return "", fmt.Errorf("userinfo: %w", err)
	}
	if ui.Username != "" {
		return ui.Username, nil
	}
	if ui.PreferredUsername != "" {
		return ui.PreferredUsername, nil
	}
	return "", fmt.Errorf("userinfo at %s names no username or preferred_username", redactURL(userinfoURL))
}

// ErrNoCompanion says the central companion's extension is not there: a
// stock platform, reported plainly, not an error.
var ErrNoCompanion = errors.New("no edgegate companion (policy keys not found)")

// FetchPolicyKeys gets the companion's policy-signing keys (a JWKS of
// public keys) from {base}/edgegate/v1/policy-keys and returns them as
// JSON. A 404 or 410 wraps ErrNoCompanion.
func FetchPolicyKeys(ctx context.Context, hc *http.Client, base string) ([]byte, int, error) {
	u := strings.TrimRight(base, "/") + "/edgegate/v1/policy-keys"
	var raw json.RawMessage
	if status, err := getJSON(ctx, hc, u, "", &raw); err != nil {
		if status == http.StatusNotFound || status == http.StatusGone {
			return nil, 0, fmt.Errorf("%w at %s", ErrNoCompanion, redactURL(u))
		}
		return nil, 0, err
	}
	// Pairing pins this JWKS on the TLS of the companion (trust on first
	// use); later rotations reach the gateway only as a set signed by a
	// key pinned here (keyset.go).
	set, err := ParsePublicKeySet(raw)
	if err != nil {
		return nil, 0, fmt.Errorf("policy keys at %s: %w", redactURL(u), err)
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
