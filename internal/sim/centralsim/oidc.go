package centralsim

import (
	"context"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jwk"
	"github.com/lestrrat-go/jwx/v2/jws"
	"github.com/lestrrat-go/jwx/v2/jwt"
)

// maxTokenBytes bounds a bearer token before it is parsed.
const maxTokenBytes = 16 << 10

// maxFormBytes bounds a token request body.
const maxFormBytes = 64 << 10

type refreshGrant struct {
	client  string
	user    string
	offline bool
	expires time.Time
}

func tlsConfig(cert tls.Certificate) *tls.Config {
	return &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
}

func (s *Server) initSigningKey() error {
	raw, err := generateRSA()
	if err != nil {
		return fmt.Errorf("signing key: %w", err)
	}
	key, err := jwk.FromRaw(raw)
	if err != nil {
		return fmt.Errorf("signing key: %w", err)
	}
	if err := jwk.AssignKeyID(key); err != nil {
		return fmt.Errorf("signing key id: %w", err)
	}
	if err := key.Set(jwk.AlgorithmKey, jwa.RS256); err != nil {
		return fmt.Errorf("signing key: %w", err)
	}
	pub, err := jwk.PublicKeyOf(key)
	if err != nil {
		return fmt.Errorf("signing key: %w", err)
	}
	if err := pub.Set(jwk.KeyUsageKey, "sig"); err != nil {
		return fmt.Errorf("signing key: %w", err)
	}
	set := jwk.NewSet()
	if err := set.AddKey(pub); err != nil {
		return fmt.Errorf("signing key: %w", err)
	}
	s.signKey, s.publicJWKS = key, set
	return nil
}

// discoveryDoc is the realm's OpenID configuration without the pairing
// surface (handleDiscoveryPairing adds it).
func (s *Server) discoveryDoc() map[string]any {
	iss := s.Issuer()
	return map[string]any{
		"issuer":                                iss,
		"authorization_endpoint":                iss + "/protocol/openid-connect/auth",
		"token_endpoint":                        s.TokenURL(),
		"jwks_uri":                              s.JWKSURL(),
		"grant_types_supported":                 []string{"client_credentials", "refresh_token"},
		"response_types_supported":              []string{"code"},
		"subject_types_supported":               []string{"public"},
		"id_token_signing_alg_values_supported": []string{"RS256"},
		"token_endpoint_auth_methods_supported": []string{"client_secret_basic", "client_secret_post"},
		"scopes_supported":                      []string{"openid", "offline_access"},
		"claims_supported":                      []string{"iss", "sub", "aud", "exp", "iat", "azp", "preferred_username", "roles"},
		"userinfo_endpoint":                     s.UserinfoURL(),
	}
}

// UserinfoURL is the realm's OpenID Connect userinfo endpoint.
func (s *Server) UserinfoURL() string { return s.Issuer() + "/protocol/openid-connect/userinfo" }

// keycloakInvalidToken is Keycloak's userinfo answer to a bad token
// (UserInfoEndpoint: 401 invalid_token), which the Ownership API's
// session.php echoes.
var keycloakInvalidToken = map[string]string{"error": "invalid_token", "error_description": "Token verification failed"}

// handleUserinfo is GET|POST {issuer}/protocol/openid-connect/userinfo
// (OpenID Connect Core §5.3): the claims of a valid access token's user,
// with "username" and "roles" as Snap4City's realm maps them (the
// Ownership API reads username, else preferred_username, and roles).
func (s *Server) handleUserinfo(w http.ResponseWriter, r *http.Request) {
	raw, err := bearerToken(r)
	if err != nil && r.Method == http.MethodPost {
		form, ok := parseTokenForm(w, r)
		if !ok {
			return // answered
		}
		if form.Get("access_token") != "" {
			raw, err = form.Get("access_token"), nil
		}
	}
	user := ""
	if err == nil {
		user, _, err = s.verifyToken(raw)
	}
	if err != nil {
		w.Header().Set("WWW-Authenticate", `Bearer realm="`+s.opts.Realm+`", error="invalid_token", error_description="Token verification failed"`)
		writeJSON(w, http.StatusUnauthorized, keycloakInvalidToken)
		return
	}
	w.Header().Set("Cache-Control", "no-store")
	writeJSON(w, http.StatusOK, s.userinfoClaims(user))
}

func (s *Server) userinfoClaims(user string) map[string]any {
	c := map[string]any{
		"sub": subjectOf(user), "preferred_username": user, "username": user,
		"email_verified": false, "roles": s.userRoles(user),
	}
	if u, known := s.platformUser(user); known && len(u.Groups) > 0 {
		c["groups"] = u.Groups
	}
	return c
}

// clientUser is the user of a client's client_credentials tokens:
// Keycloak's service account "service-account-{client_id}", unless the
// client maps another preferred_username (Client.Username).
func clientUser(c Client) string {
	if c.Username != "" {
		return c.Username
	}
	return "service-account-" + c.ID
}

func (s *Server) handleJWKS(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, s.publicJWKS)
}

// oauthError writes an RFC 6749 §5.2 error.
func oauthError(w http.ResponseWriter, status int, code, desc string) {
	w.Header().Set("Cache-Control", "no-store")
	writeJSON(w, status, map[string]string{"error": code, "error_description": desc})
}

func (s *Server) handleToken(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		oauthError(w, http.StatusMethodNotAllowed, "invalid_request", "HTTP method not allowed")
		return
	}
	form, ok := parseTokenForm(w, r)
	if !ok {
		return
	}
	id, secret, basic, err := clientCredentials(r)
	if err != nil {
		oauthError(w, http.StatusBadRequest, "invalid_request", "malformed client credentials")
		return
	}
	client, ok := s.authenticateClient(id, secret)
	if !ok {
		if basic {
			w.Header().Set("WWW-Authenticate", `Basic realm="`+s.opts.Realm+`"`)
		}
		s.log.Info("token refused", "client_id", id, "reason", "invalid client credentials")
		oauthError(w, http.StatusUnauthorized, "invalid_client", "Invalid client or Invalid client credentials")
		return
	}
	switch gt := form.Get("grant_type"); gt {
	case "client_credentials":
		s.issueTokens(w, client, clientUser(client), client.Offline, client.Offline)
	case "password":
		// Keycloak's "direct access grants" (RFC 6749 §4.3) for a user
		// with a password in Options.Users.
		u, known := s.platformUser(form.Get("username"))
		if !known || u.Password == "" || !secretEqual(form.Get("password"), u.Password) {
			s.log.Info("token refused", "client_id", client.ID, "reason", "invalid user credentials")
			oauthError(w, http.StatusUnauthorized, "invalid_grant", "Invalid user credentials")
			return
		}
		offline := slices.Contains(strings.Fields(form.Get("scope")), "offline_access")
		s.issueTokens(w, client, u.Username, true, offline)
	case "refresh_token":
		rt := form.Get("refresh_token")
		if rt == "" {
			oauthError(w, http.StatusBadRequest, "invalid_request", "Missing parameter: refresh_token")
			return
		}
		g, ok := s.useRefreshToken(rt, client.ID)
		if !ok {
			s.log.Info("token refused", "client_id", client.ID, "reason", "invalid refresh token")
			oauthError(w, http.StatusBadRequest, "invalid_grant", "Invalid refresh token")
			return
		}
		s.issueTokens(w, client, g.user, true, g.offline)
	case "":
		oauthError(w, http.StatusBadRequest, "invalid_request", "Missing form parameter: grant_type")
	default:
		oauthError(w, http.StatusBadRequest, "unsupported_grant_type", "Unsupported grant_type")
	}
}

// parseTokenForm bounds and parses the form body of a request to an OAuth
// endpoint; on failure it has answered.
func parseTokenForm(w http.ResponseWriter, r *http.Request) (url.Values, bool) {
	r.Body = http.MaxBytesReader(w, r.Body, maxFormBytes)
	if err := r.ParseForm(); err != nil {
		oauthError(w, http.StatusBadRequest, "invalid_request", "malformed form body")
		return nil, false
	}
	return r.PostForm, true
}

// clientCredentials returns a confidential client's id and secret: from
// HTTP Basic, where RFC 6749 §2.3.1 form-urlencodes both parts, else from
// the (already decoded) form. The form must be parsed.
func clientCredentials(r *http.Request) (id, secret string, basic bool, err error) {
	id, secret, basic = r.BasicAuth()
	if !basic {
		return r.PostForm.Get("client_id"), r.PostForm.Get("client_secret"), false, nil
	}
	var e1, e2 error
	id, e1 = url.QueryUnescape(id)
	secret, e2 = url.QueryUnescape(secret)
	if e1 != nil || e2 != nil {
		return "", "", true, errors.New("malformed client credentials")
	}
	return id, secret, true, nil
}

// authenticateClient compares in constant time, and does the same work for
// an unknown client id as for a known one.
func (s *Server) authenticateClient(id, secret string) (Client, bool) {
	c, known := s.clients[id]
	want := c.Secret
	if !known {
		want = "\x00unknown client\x00"
	}
	a, b := sha256.Sum256([]byte(secret)), sha256.Sum256([]byte(want))
	match := subtle.ConstantTimeCompare(a[:], b[:]) == 1
	return c, known && match && id != ""
}

// issueTokens answers a token response for user; offline (first of the
// optional flags) makes the refresh token an offline token (scope
// offline_access): it does not expire with the session.
func (s *Server) issueTokens(w http.ResponseWriter, c Client, user string, withRefresh bool, offline ...bool) {
	at, err := s.IssueAccessToken(user, s.opts.TokenTTL, c.ID)
	if err != nil {
		s.log.Error("sign access token", "err", err)
		oauthError(w, http.StatusInternalServerError, "server_error", "cannot sign token")
		return
	}
	resp := map[string]any{
		"access_token":       at,
		"token_type":         "Bearer",
		"expires_in":         int(s.opts.TokenTTL / time.Second),
		"refresh_expires_in": 0,
		"not-before-policy":  0,
		"scope":              "profile email",
	}
	if withRefresh {
		rt, err := randomToken(32)
		if err != nil {
			oauthError(w, http.StatusInternalServerError, "server_error", "cannot make refresh token")
			return
		}
		now := s.now()
		s.mu.Lock()
		for k, g := range s.refresh { // prune
			if !now.Before(g.expires) {
				delete(s.refresh, k)
			}
		}
		off := len(offline) > 0 && offline[0]
		g := refreshGrant{client: c.ID, user: user, offline: off, expires: now.Add(s.opts.RefreshTTL)}
		s.refresh[rt] = g
		s.mu.Unlock()
		resp["refresh_token"] = rt
		resp["refresh_expires_in"] = int(s.opts.RefreshTTL / time.Second)
		if off {
			resp["refresh_expires_in"] = 0 // Keycloak: an offline token has no session expiry
			resp["scope"] = "profile email offline_access"
		}
	}
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("Pragma", "no-cache")
	writeJSON(w, http.StatusOK, resp)
}

// useRefreshToken checks that rt was issued to client and has not expired.
// Like Keycloak's default (no refresh token rotation), it stays valid.
func (s *Server) useRefreshToken(rt, client string) (refreshGrant, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	g, ok := s.refresh[rt]
	if !ok {
		return refreshGrant{}, false
	}
	if !s.now().Before(g.expires) {
		delete(s.refresh, rt)
		return refreshGrant{}, false
	}
	return g, g.client == client
}

// RevokeRefreshTokens forgets every refresh token of a client (a logout or
// a session reset on the real platform).
func (s *Server) RevokeRefreshTokens(clientID string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for k, g := range s.refresh {
		if g.client == clientID {
			delete(s.refresh, k)
		}
	}
}

// IssueAccessToken signs an access token for username that expires after
// ttl (negative: already expired). azp is the first of azp, else "test".
func (s *Server) IssueAccessToken(username string, ttl time.Duration, azp ...string) (string, error) {
	if username == "" {
		return "", errors.New("issue access token: empty username")
	}
	party := "test"
	if len(azp) > 0 && azp[0] != "" {
		party = azp[0]
	}
	jti, err := randomToken(16)
	if err != nil {
		return "", fmt.Errorf("issue access token: %w", err)
	}
	now := s.now().Truncate(time.Second)
	iat := now
	if ttl < 0 {
		iat = now.Add(ttl - time.Minute)
	}
	tok, err := jwt.NewBuilder().
		Issuer(s.Issuer()).
		Audience([]string{s.opts.Audience}).
		Subject(subjectOf(username)).
		IssuedAt(iat).
		Expiration(now.Add(ttl)).
		JwtID(jti).
		Claim("azp", party).
		Claim("typ", "Bearer").
		Claim("preferred_username", username).
		Claim("scope", "profile email").
		// Snap4City's realm maps the roles to a "roles" claim (read by the
		// IoT Directory's get_user_info); Keycloak's own place is
		// realm_access.roles.
		Claim("roles", s.userRoles(username)).
		Claim("realm_access", map[string]any{"roles": s.userRoles(username)}).
		Build()
	if err != nil {
		return "", fmt.Errorf("issue access token: %w", err)
	}
	hdr := jws.NewHeaders()
	if err := hdr.Set(jws.KeyIDKey, s.signKey.KeyID()); err != nil {
		return "", fmt.Errorf("issue access token: %w", err)
	}
	if err := hdr.Set(jws.TypeKey, "JWT"); err != nil {
		return "", fmt.Errorf("issue access token: %w", err)
	}
	b, err := jwt.Sign(tok, jwt.WithKey(jwa.RS256, s.signKey, jws.WithProtectedHeaders(hdr)))
	if err != nil {
		return "", fmt.Errorf("issue access token: %w", err)
	}
	return string(b), nil
}

// subjectOf is a stable, opaque subject per account, like Keycloak's user ids.
func subjectOf(username string) string {
	h := sha256.Sum256([]byte("edgegate/centralsim/sub\x00" + username))
	return base64.RawURLEncoding.EncodeToString(h[:16])
}

// bearerToken extracts the token of an "Authorization: Bearer" header.
func bearerToken(r *http.Request) (string, error) {
	h := r.Header.Get("Authorization")
	const prefix = "bearer "
	if len(h) <= len(prefix) || !strings.EqualFold(h[:len(prefix)], prefix) {
		return "", errors.New("no bearer token")
	}
	return strings.TrimSpace(h[len(prefix):]), nil
}

// verifyToken checks a raw access token as the filter does and returns its
// user and its authorized party (azp: the OAuth client it was issued to).
// It is shared by the filter, the ownership and personal-data APIs, the
// policy endpoints and the MQTT broker's authentication.
func (s *Server) verifyToken(raw string) (user, azp string, err error) {
	if len(raw) > maxTokenBytes {
		return "", "", errors.New("bearer token too large")
	}
	if t, ok := s.tokens.get(raw, s.now()); ok {
		return t.user, t.azp, nil
	}
	tok, err := s.parseToken(raw)
	if err != nil && s.opts.TrustTokensOf != nil {
		// A second broker behind the same single sign-on.
		if t2, err2 := s.opts.TrustTokensOf.parseToken(raw); err2 == nil {
			tok, err = t2, nil
		}
	}
	if err != nil {
		return "", "", fmt.Errorf("verify access token: %w", err)
	}
	if v, ok := tok.Get("azp"); ok {
		azp, _ = v.(string)
	}
	for _, name := range []string{"preferred_username", "username"} {
		if v, ok := tok.Get(name); ok {
			if u, ok := v.(string); ok && u != "" {
				s.tokens.put(raw, cachedToken{user: u, azp: azp, exp: tok.Expiration()})
				return u, azp, nil
			}
		}
	}
	return "", "", errors.New("access token names no user")
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		http.Error(w, `{"error":"InternalError"}`, http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", fmt.Sprint(len(b)+1))
	w.WriteHeader(status)
	w.Write(append(b, '\n'))
}

// parseToken verifies an access token against this server's key and issuer.
func (s *Server) parseToken(raw string) (jwt.Token, error) {
	pub, ok := s.publicJWKS.Key(0)
	if !ok {
		return nil, errors.New("no verification key")
	}
	return jwt.Parse([]byte(raw),
		jwt.WithKey(jwa.RS256, pub),
		jwt.WithValidate(true),
		jwt.WithIssuer(s.Issuer()),
		jwt.WithClock(jwt.ClockFunc(s.now)),
		jwt.WithRequiredClaim("exp"),
	)
}

// resolveUser finds the user of an access token as the platform's APIs do
// through the provider's userinfo: a token of this realm (or of
// TrustTokensOf) is verified here; a token of a trusted third-party issuer
// (Options.TrustIssuers) is sent to that provider's userinfo endpoint,
// found in its discovery document, and its answer's "username", else
// "preferred_username", is the user.
func (s *Server) resolveUser(ctx context.Context, raw string) (string, error) {
	user, _, err := s.verifyToken(raw)
	if err == nil {
		return user, nil
	}
	iss := unverifiedIssuer(raw)
	for _, t := range s.opts.TrustIssuers {
		if iss != "" && t.Issuer == iss {
			return s.externalUserinfo(ctx, t.Issuer, raw)
		}
	}
	return "", err
}

// unverifiedIssuer reads the iss claim without verifying: it only picks
// which provider to ask.
func unverifiedIssuer(raw string) string {
	tok, err := jwt.ParseInsecure([]byte(raw))
	if err != nil {
		return ""
	}
	return tok.Issuer()
}

// maxProviderBody bounds what a third-party provider may send.
const maxProviderBody = 64 << 10

func (s *Server) externalUserinfo(ctx context.Context, issuer, raw string) (string, error) {
	hc := s.opts.PlatformHTTPClient
	if hc == nil {
		hc = &http.Client{Timeout: 10 * time.Second}
	}
	get := func(u string, bearer bool, v any) error {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
		if err != nil {
			return err
		}
		req.Header.Set("Accept", "application/json")
		if bearer {
			req.Header.Set("Authorization", "Bearer "+raw)
		}
		resp, err := hc.Do(req)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(io.LimitReader(resp.Body, maxProviderBody))
		if err != nil {
			return err
		}
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("%s answered %d", u, resp.StatusCode)
		}
		return json.Unmarshal(b, v)
	}
	var disc struct {
		Issuer   string `json:"issuer"`
		Userinfo string `json:"userinfo_endpoint"`
	}
	if err := get(strings.TrimSuffix(issuer, "/")+"/.well-known/openid-configuration", false, &disc); err != nil {
		return "", fmt.Errorf("trusted issuer discovery: %w", err)
	}
	if disc.Issuer != issuer || disc.Userinfo == "" {
		// OpenID Connect Discovery §4.3: the issuer must match exactly.
		return "", fmt.Errorf("trusted issuer discovery: issuer %q does not match %q or no userinfo_endpoint", disc.Issuer, issuer)
	}
	var ui struct {
		Username          string `json:"username"`
		PreferredUsername string `json:"preferred_username"`
	}
	if err := get(disc.Userinfo, true, &ui); err != nil {
		return "", fmt.Errorf("trusted issuer userinfo: %w", err)
	}
	if ui.Username != "" {
		return ui.Username, nil
	}
	if ui.PreferredUsername != "" {
		return ui.PreferredUsername, nil
	}
	return "", errNoUsername
}

func sha1Hex(v string) string {
	h := sha1.Sum([]byte(v))
	return fmt.Sprintf("%x", h)
}

// readBounded reads a request body of at most limit bytes.
func readBounded(w http.ResponseWriter, r *http.Request, limit int64) ([]byte, error) {
	return io.ReadAll(http.MaxBytesReader(w, r.Body, limit))
}
