package centralsim

import (
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jwk"
	"github.com/lestrrat-go/jwx/v2/jws"
	"github.com/lestrrat-go/jwx/v2/jwt"
)

// Pairing: the parts of the central service that `edgegate pair` uses, with
// Keycloak's paths:
//
//	POST {issuer}/protocol/openid-connect/auth/device   device authorization (RFC 8628)
//	POST {issuer}/protocol/openid-connect/token         + device_code grant
//	POST {issuer}/protocol/openid-connect/revoke        token revocation (RFC 7009)
//	GET  {issuer}/device                                the verification page (a stub: see ApproveDevice)
//	GET|POST /_sim/device?user_code=..&user=..&action=approve|deny   (admin) what a user does in the browser
//
// An edge gateway's AppID row is a stock Ownership API register
// (ownership.go): an ordinary user's AppID limit is 0, so it is refused
// unless the user is an AreaManager or ToolAdmin.
//
// The pairing client (PairingOptions.ClientID) is a public client for the
// device grant; that much is Keycloak. With Options.Companion only (the
// companion's pairing extension, not Keycloak's), a gateway may prove
// possession of its key from the first request: a client assertion whose
// JWS header carries the public key (jwk) and its RFC 7638 thumbprint
// (kid). The user's approval binds that key to the grant; the refresh
// tokens of the grant are then usable only with a client assertion signed
// by the same key (private_key_jwt), and rotate on every use (Keycloak's
// "Revoke Refresh Token"), so a copied refresh token is worth nothing
// without the gateway's key. A gateway that sends no assertion gets
// unbound, rotating refresh tokens (a plain public client).

// Defaults of PairingOptions.
const (
	DefaultPairingClientID = "edgegate-gateway"
	DefaultDeviceCodeTTL   = 10 * time.Minute
	DefaultDeviceInterval  = 5 * time.Second
	// maxAssertionLife bounds exp - now of a client assertion.
	maxAssertionLife = 10 * time.Minute
	// ElementTypeAppID is the ownership row's elementType of a gateway.
	ElementTypeAppID = "AppID"
)

// PairingOptions configure the pairing surface (Options.Pairing).
type PairingOptions struct {
	// ClientID is the public client that runs the device grant; default
	// DefaultPairingClientID. Put a Client with this id in Options.Clients
	// (any secret, Username the gateway account) for the policy-bundle
	// endpoints to accept its tokens.
	ClientID string
	// DeviceCodeTTL is the life of a device code; default DefaultDeviceCodeTTL.
	DeviceCodeTTL time.Duration
	// Interval is the polling interval announced; default DefaultDeviceInterval.
	Interval time.Duration
	// SlowDownPolls answers slow_down to the first N polls of each device
	// code (on top of the answer to polls faster than the interval).
	SlowDownPolls int
	// NoPrivateKeyJWT leaves private_key_jwt out of discovery and refuses
	// client assertions.
	NoPrivateKeyJWT bool
	// AssertionAlgs are the client assertion algorithms announced and
	// accepted; default EdDSA and ES256.
	AssertionAlgs []string
	// NoRevocation leaves the revocation endpoint out (404, not in discovery).
	NoRevocation bool
	// NoRotation keeps refresh tokens valid after use (Keycloak's default).
	NoRotation bool
}

// pairingState is the pairing surface's state, under its own lock (never
// held together with Server.mu).
type pairingState struct {
	mu      sync.Mutex
	codes   map[string]*deviceCode // by device code
	users   map[string]string      // user code → device code
	refresh map[string]*pairGrant  // refresh token → grant
	keys    map[string]pairedKey   // thumbprint → key registered at pairing
	jtis    map[string]time.Time   // assertion ids seen, until their exp
}

type deviceCode struct {
	userCode string
	client   string
	scope    []string
	expires  time.Time
	key      jwk.Key // key proven at the device authorization; nil: none
	thumb    string
	lastPoll time.Time
	polls    int
	user     string // approver; "" while pending
	denied   bool
}

type pairGrant struct {
	client  string
	user    string
	thumb   string // key the grant is bound to; "" none
	scope   []string
	expires time.Time // zero: offline token, no expiry
}

type pairedKey struct {
	key    jwk.Key
	client string
	user   string
}

func (s *Server) pairingOpts() PairingOptions {
	o := s.opts.Pairing
	if o.ClientID == "" {
		o.ClientID = DefaultPairingClientID
	}
	if o.DeviceCodeTTL <= 0 {
		o.DeviceCodeTTL = DefaultDeviceCodeTTL
	}
	if o.Interval <= 0 {
		o.Interval = DefaultDeviceInterval
	}
	if len(o.AssertionAlgs) == 0 {
		o.AssertionAlgs = []string{"EdDSA", "ES256"}
	}
	return o
}

// Paths of the pairing surface.
func (s *Server) DeviceAuthURL() string   { return s.Issuer() + "/protocol/openid-connect/auth/device" }
func (s *Server) RevocationURL() string   { return s.Issuer() + "/protocol/openid-connect/revoke" }
func (s *Server) VerificationURL() string { return s.Issuer() + "/device" }

// pairingRoutes adds the pairing and IoT directory surface.
func (s *Server) pairingRoutes(mux *http.ServeMux, admin func(string, http.HandlerFunc)) {
	realm := s.realmPath()
	mux.Handle("POST "+realm+"/protocol/openid-connect/auth/device", s.withFaults(TargetToken, http.HandlerFunc(s.handleDeviceAuth)))
	mux.Handle("POST "+realm+"/protocol/openid-connect/revoke", s.withFaults(TargetToken, http.HandlerFunc(s.handleRevoke)))
	mux.HandleFunc("GET "+realm+"/device", s.handleVerificationPage)
	mux.HandleFunc("/iot-directory/api/device.php", s.handleIoTDirectory)
	admin("GET /_sim/device", s.handleAdminDevice)
	admin("POST /_sim/device", s.handleAdminDevice)
}

// handleDiscoveryPairing is the discovery document with the pairing
// endpoints and methods added.
func (s *Server) handleDiscoveryPairing(w http.ResponseWriter, r *http.Request) {
	doc := s.discoveryDoc()
	o := s.pairingOpts()
	doc["device_authorization_endpoint"] = s.DeviceAuthURL()
	grants := []string{"client_credentials", "refresh_token", "password", "urn:ietf:params:oauth:grant-type:device_code"}
	doc["grant_types_supported"] = grants
	methods := []string{"client_secret_basic", "client_secret_post", "none"}
	if !o.NoPrivateKeyJWT && s.opts.Companion {
		methods = append(methods, "private_key_jwt")
		doc["token_endpoint_auth_signing_alg_values_supported"] = o.AssertionAlgs
	}
	doc["token_endpoint_auth_methods_supported"] = methods
	if !o.NoRevocation {
		doc["revocation_endpoint"] = s.RevocationURL()
		doc["revocation_endpoint_auth_methods_supported"] = methods
	}
	writeJSON(w, http.StatusOK, doc)
}

const (
	grantDeviceCode     = "urn:ietf:params:oauth:grant-type:device_code"
	assertionTypeJWTBrr = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
)

// handleTokenPairing serves the device_code grant, the refresh tokens of
// pairing grants and client assertions; everything else goes to handleToken.
func (s *Server) handleTokenPairing(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		s.handleToken(w, r)
		return
	}
	form, ok := parseTokenForm(w, r)
	if !ok {
		return
	}
	gt := form.Get("grant_type")
	s.pair.mu.Lock()
	_, pairedRefresh := s.pair.refresh[form.Get("refresh_token")]
	s.pair.mu.Unlock()
	switch {
	case gt == grantDeviceCode:
		s.deviceToken(w, form)
	case gt == "refresh_token" && pairedRefresh:
		s.pairedRefresh(w, form)
	case form.Get("client_assertion") != "":
		// private_key_jwt is only for pairing grants here.
		oauthError(w, http.StatusUnauthorized, "invalid_client", "client assertion not accepted for this grant")
	default:
		s.handleToken(w, r) // PostForm is parsed: its ParseForm is a no-op
	}
}

// clientAuth authenticates a pairing-client request: a client assertion,
// or the public client's client_id. allowNew accepts a key not registered
// yet, carried in the assertion's header (proof of possession only).
func (s *Server) clientAuth(form url.Values, allowNew bool) (client, thumb string, key jwk.Key, err error) {
	o := s.pairingOpts()
	client = form.Get("client_id")
	if form.Get("client_assertion") == "" {
		if form.Get("client_assertion_type") != "" {
			return "", "", nil, errors.New("client_assertion_type without client_assertion")
		}
		if client != o.ClientID {
			return "", "", nil, fmt.Errorf("unknown client %q", client)
		}
		return client, "", nil, nil
	}
	if o.NoPrivateKeyJWT || !s.opts.Companion {
		// Keys asserted in the JWS header and bound at the device grant
		// are the companion's pairing extension, not Keycloak's.
		return "", "", nil, errors.New("private_key_jwt is not enabled")
	}
	if form.Get("client_assertion_type") != assertionTypeJWTBrr {
		return "", "", nil, errors.New("unsupported client_assertion_type")
	}
	raw := form.Get("client_assertion")
	if len(raw) > maxTokenBytes {
		return "", "", nil, errors.New("client assertion too large")
	}
	msg, err := jws.Parse([]byte(raw))
	if err != nil || len(msg.Signatures()) != 1 {
		return "", "", nil, errors.New("malformed client assertion")
	}
	hdr := msg.Signatures()[0].ProtectedHeaders()
	kid := hdr.KeyID()
	s.pair.mu.Lock()
	pk, known := s.pair.keys[kid]
	s.pair.mu.Unlock()
	switch {
	case known:
		key = pk.key
	case allowNew && hdr.JWK() != nil:
		key, err = jwk.PublicKeyOf(hdr.JWK())
		if err != nil {
			return "", "", nil, errors.New("bad jwk in assertion header")
		}
		if tp, err := Thumbprint(key); err != nil || tp != kid {
			return "", "", nil, errors.New("assertion kid is not the thumbprint of its jwk")
		}
	default:
		return "", "", nil, fmt.Errorf("no key registered with kid %q", kid)
	}
	alg, ok := algOf(key)
	if !ok || !slices.Contains(o.AssertionAlgs, alg.String()) || hdr.Algorithm() != alg {
		return "", "", nil, fmt.Errorf("assertion algorithm %s not accepted", hdr.Algorithm())
	}
	tok, err := jwt.Parse([]byte(raw), jwt.WithKey(alg, key), jwt.WithValidate(true),
		jwt.WithClock(jwt.ClockFunc(s.now)), jwt.WithAcceptableSkew(30*time.Second),
		jwt.WithRequiredClaim("exp"), jwt.WithRequiredClaim("jti"))
	if err != nil {
		return "", "", nil, fmt.Errorf("client assertion: %w", err)
	}
	if tok.Issuer() == "" || tok.Issuer() != tok.Subject() || (client != "" && client != tok.Issuer()) {
		return "", "", nil, errors.New("client assertion: iss and sub must both be the client id")
	}
	client = tok.Issuer()
	if client != o.ClientID {
		return "", "", nil, fmt.Errorf("unknown client %q", client)
	}
	if known && pk.client != client {
		return "", "", nil, errors.New("key registered for another client")
	}
	if !slices.Contains(tok.Audience(), s.TokenURL()) && !slices.Contains(tok.Audience(), s.Issuer()) {
		return "", "", nil, errors.New("client assertion: aud must name the token endpoint or the issuer")
	}
	now := s.now()
	if tok.Expiration().After(now.Add(maxAssertionLife)) {
		return "", "", nil, errors.New("client assertion: exp too far ahead")
	}
	s.pair.mu.Lock()
	defer s.pair.mu.Unlock()
	for j, exp := range s.pair.jtis {
		if now.After(exp.Add(time.Minute)) {
			delete(s.pair.jtis, j)
		}
	}
	if _, seen := s.pair.jtis[tok.JwtID()]; seen {
		return "", "", nil, errors.New("client assertion replayed (jti)")
	}
	s.pair.jtis[tok.JwtID()] = tok.Expiration()
	return client, kid, key, nil
}

func algOf(k jwk.Key) (jwa.SignatureAlgorithm, bool) {
	switch k.KeyType() {
	case "OKP":
		return jwa.EdDSA, true
	case "EC":
		if crv, ok := k.Get("crv"); ok && fmt.Sprint(crv) == "P-256" {
			return jwa.ES256, true
		}
	}
	return "", false
}

// handleDeviceAuth is the device authorization endpoint (RFC 8628 §3.1).
func (s *Server) handleDeviceAuth(w http.ResponseWriter, r *http.Request) {
	form, ok := parseTokenForm(w, r)
	if !ok {
		return
	}
	client, thumb, key, err := s.clientAuth(form, true)
	if err != nil {
		s.log.Info("device authorization refused", "err", err)
		oauthError(w, http.StatusUnauthorized, "invalid_client", "Invalid client or Invalid client credentials")
		return
	}
	o := s.pairingOpts()
	dc, err1 := randomToken(32)
	uc, err2 := userCode()
	if err1 != nil || err2 != nil {
		oauthError(w, http.StatusInternalServerError, "server_error", "cannot make codes")
		return
	}
	now := s.now()
	s.pair.mu.Lock()
	for k, c := range s.pair.codes { // prune
		if now.After(c.expires.Add(time.Minute)) {
			delete(s.pair.users, c.userCode)
			delete(s.pair.codes, k)
		}
	}
	s.pair.codes[dc] = &deviceCode{userCode: uc, client: client, scope: strings.Fields(form.Get("scope")),
		expires: now.Add(o.DeviceCodeTTL), key: key, thumb: thumb}
	s.pair.users[uc] = dc
	s.pair.mu.Unlock()
	w.Header().Set("Cache-Control", "no-store")
	writeJSON(w, http.StatusOK, map[string]any{
		"device_code":               dc,
		"user_code":                 uc,
		"verification_uri":          s.VerificationURL(),
		"verification_uri_complete": s.VerificationURL() + "?user_code=" + url.QueryEscape(uc),
		"expires_in":                int(o.DeviceCodeTTL / time.Second),
		"interval":                  int(o.Interval / time.Second),
	})
}

// userCode is 8 letters without vowels (RFC 8628 §6.1), shown as XXXX-XXXX.
func userCode() (string, error) {
	const alphabet = "BCDFGHJKLMNPQRSTVWXZ"
	b := make([]byte, 0, 9)
	for i := 0; i < 8; i++ {
		n, err := rand.Int(rand.Reader, big.NewInt(int64(len(alphabet))))
		if err != nil {
			return "", err
		}
		if i == 4 {
			b = append(b, '-')
		}
		b = append(b, alphabet[n.Int64()])
	}
	return string(b), nil
}

// deviceToken is the device_code grant (RFC 8628 §3.4, §3.5).
func (s *Server) deviceToken(w http.ResponseWriter, form url.Values) {
	client, thumb, _, err := s.clientAuth(form, true)
	if err != nil {
		s.log.Info("device token refused", "err", err)
		oauthError(w, http.StatusUnauthorized, "invalid_client", "Invalid client or Invalid client credentials")
		return
	}
	o := s.pairingOpts()
	now := s.now()
	s.pair.mu.Lock()
	dc := form.Get("device_code")
	c, ok := s.pair.codes[dc]
	if !ok || c.client != client {
		s.pair.mu.Unlock()
		oauthError(w, http.StatusBadRequest, "invalid_grant", "Device code not valid")
		return
	}
	if c.thumb != thumb {
		s.pair.mu.Unlock()
		oauthError(w, http.StatusUnauthorized, "invalid_client", "device code was requested with another key")
		return
	}
	fast := !c.lastPoll.IsZero() && now.Sub(c.lastPoll) < o.Interval-100*time.Millisecond
	c.lastPoll = now
	c.polls++
	switch {
	case !now.Before(c.expires):
		delete(s.pair.codes, dc)
		delete(s.pair.users, c.userCode)
		s.pair.mu.Unlock()
		oauthError(w, http.StatusBadRequest, "expired_token", "Device code is expired")
		return
	case c.denied:
		delete(s.pair.codes, dc)
		delete(s.pair.users, c.userCode)
		s.pair.mu.Unlock()
		oauthError(w, http.StatusBadRequest, "access_denied", "The end user denied the authorization request")
		return
	case fast || c.polls <= o.SlowDownPolls:
		s.pair.mu.Unlock()
		oauthError(w, http.StatusBadRequest, "slow_down", "Slow down")
		return
	case c.user == "":
		s.pair.mu.Unlock()
		oauthError(w, http.StatusBadRequest, "authorization_pending", "The authorization request is still pending")
		return
	}
	delete(s.pair.codes, dc)
	delete(s.pair.users, c.userCode)
	if c.key != nil {
		if _, had := s.pair.keys[c.thumb]; !had {
			s.pair.keys[c.thumb] = pairedKey{key: c.key, client: client, user: c.user}
		}
	}
	g := &pairGrant{client: client, user: c.user, thumb: c.thumb, scope: c.scope}
	s.pair.mu.Unlock()
	s.issuePairTokens(w, g)
}

// pairedRefresh is the refresh_token grant of a pairing grant.
func (s *Server) pairedRefresh(w http.ResponseWriter, form url.Values) {
	client, thumb, _, err := s.clientAuth(form, false)
	if err != nil {
		s.log.Info("token refused", "err", err)
		oauthError(w, http.StatusUnauthorized, "invalid_client", "Invalid client or Invalid client credentials")
		return
	}
	rt := form.Get("refresh_token")
	now := s.now()
	s.pair.mu.Lock()
	g, ok := s.pair.refresh[rt]
	switch {
	case !ok || g.client != client:
		s.pair.mu.Unlock()
		oauthError(w, http.StatusBadRequest, "invalid_grant", "Invalid refresh token")
		return
	case g.thumb != thumb:
		s.pair.mu.Unlock()
		s.log.Info("token refused", "client_id", client, "reason", "refresh token bound to another key")
		oauthError(w, http.StatusBadRequest, "invalid_grant", "Invalid refresh token")
		return
	case !g.expires.IsZero() && !now.Before(g.expires):
		delete(s.pair.refresh, rt)
		s.pair.mu.Unlock()
		oauthError(w, http.StatusBadRequest, "invalid_grant", "Token is not active")
		return
	}
	if !s.pairingOpts().NoRotation {
		delete(s.pair.refresh, rt)
	}
	s.pair.mu.Unlock()
	s.issuePairTokens(w, g)
}

func (s *Server) issuePairTokens(w http.ResponseWriter, g *pairGrant) {
	at, err := s.IssueAccessToken(g.user, s.opts.TokenTTL, g.client)
	rt, err2 := randomToken(32)
	if err != nil || err2 != nil {
		oauthError(w, http.StatusInternalServerError, "server_error", "cannot sign token")
		return
	}
	offline := slices.Contains(g.scope, "offline_access")
	ng := *g
	ng.expires = time.Time{}
	refreshIn := 0
	if !offline {
		ng.expires = s.now().Add(s.opts.RefreshTTL)
		refreshIn = int(s.opts.RefreshTTL / time.Second)
	}
	s.pair.mu.Lock()
	s.pair.refresh[rt] = &ng
	s.pair.mu.Unlock()
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("Pragma", "no-cache")
	writeJSON(w, http.StatusOK, map[string]any{
		"access_token":       at,
		"token_type":         "Bearer",
		"expires_in":         int(s.opts.TokenTTL / time.Second),
		"refresh_token":      rt,
		"refresh_expires_in": refreshIn,
		"scope":              strings.Join(g.scope, " "),
	})
}

// handleRevoke is RFC 7009 token revocation. It answers 200 for unknown
// tokens too, as the RFC asks.
func (s *Server) handleRevoke(w http.ResponseWriter, r *http.Request) {
	if s.pairingOpts().NoRevocation {
		http.NotFound(w, r)
		return
	}
	form, ok := parseTokenForm(w, r)
	if !ok {
		return
	}
	tok := form.Get("token")
	if tok == "" {
		oauthError(w, http.StatusBadRequest, "invalid_request", "Missing token")
		return
	}
	// A confidential client with a secret (client_credentials mode).
	id, secret, _, err := clientCredentials(r)
	if err != nil {
		oauthError(w, http.StatusBadRequest, "invalid_request", "malformed client credentials")
		return
	}
	if secret != "" {
		c, ok := s.authenticateClient(id, secret)
		if !ok {
			oauthError(w, http.StatusUnauthorized, "invalid_client", "Invalid client or Invalid client credentials")
			return
		}
		s.mu.Lock()
		if g, ok := s.refresh[tok]; ok && g.client == c.ID {
			delete(s.refresh, tok)
		}
		s.mu.Unlock()
		w.WriteHeader(http.StatusOK)
		return
	}
	client, thumb, _, err := s.clientAuth(form, false)
	if err != nil {
		oauthError(w, http.StatusUnauthorized, "invalid_client", "Invalid client or Invalid client credentials")
		return
	}
	s.pair.mu.Lock()
	if g, ok := s.pair.refresh[tok]; ok && g.client == client && g.thumb == thumb {
		delete(s.pair.refresh, tok)
		s.log.Info("refresh token revoked", "client_id", client)
	}
	s.pair.mu.Unlock()
	w.WriteHeader(http.StatusOK)
}

// ApproveDevice approves a pending user code as user (what the user does
// after logging in at the verification page).
func (s *Server) ApproveDevice(userCode, user string) error {
	return s.decideDevice(userCode, user, false)
}

// DenyDevice denies a pending user code.
func (s *Server) DenyDevice(userCode string) error { return s.decideDevice(userCode, "", true) }

func (s *Server) decideDevice(userCode, user string, deny bool) error {
	if !deny && !usernameRE.MatchString(user) {
		return fmt.Errorf("centralsim: user must match %s: %q", usernameRE, user)
	}
	s.pair.mu.Lock()
	defer s.pair.mu.Unlock()
	c, ok := s.pair.codes[s.pair.users[strings.ToUpper(strings.TrimSpace(userCode))]]
	if !ok || !s.now().Before(c.expires) {
		return fmt.Errorf("centralsim: no pending device authorization with user code %q", userCode)
	}
	if c.user != "" || c.denied {
		return fmt.Errorf("centralsim: user code %q was already decided", userCode)
	}
	c.user, c.denied = user, deny
	return nil
}

// PendingUserCodes lists the user codes waiting for a decision.
func (s *Server) PendingUserCodes() []string {
	s.pair.mu.Lock()
	defer s.pair.mu.Unlock()
	var out []string
	for _, c := range s.pair.codes {
		if c.user == "" && !c.denied {
			out = append(out, c.userCode)
		}
	}
	slices.Sort(out)
	return out
}

var usernameRE = gatewayIDRE

// handleAdminDevice is GET|POST /_sim/device?user_code=X&user=alice&action=approve|deny.
func (s *Server) handleAdminDevice(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	var err error
	switch q.Get("action") {
	case "approve", "":
		err = s.ApproveDevice(q.Get("user_code"), q.Get("user"))
	case "deny":
		err = s.DenyDevice(q.Get("user_code"))
	default:
		err = errors.New("action must be approve or deny")
	}
	if err != nil {
		adminError(w, http.StatusBadRequest, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// handleVerificationPage stands in for Keycloak's login and consent page.
func (s *Server) handleVerificationPage(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	fmt.Fprintf(w, "central-sim: approve user code %q with the admin API:\nPOST %s/_sim/device?user_code=CODE&user=USER&action=approve|deny\n",
		r.URL.Query().Get("user_code"), s.URL())
}

// noteAppRegistration runs the companion's side of a stock AppID
// registration (an edge gateway, as Snap4City's IoT edge registers one):
// with Options.Companion, elementDetails.jwk pins the gateway's identity
// key and elementDetails.assertion_jwk registers its client assertion key.
// Stock stores both as opaque details.
func (s *Server) noteAppRegistration(user string, row ownRow, obj map[string]json.RawMessage) {
	if !s.opts.Companion || row.details == nil {
		return
	}
	var details struct {
		JWK          json.RawMessage `json:"jwk"`
		AssertionJWK json.RawMessage `json:"assertion_jwk"`
	}
	if json.Unmarshal(row.details, &details) != nil {
		return
	}
	if len(details.JWK) > 0 {
		k, err := jwk.ParseKey(details.JWK)
		if err == nil {
			k, err = jwk.PublicKeyOf(k)
		}
		var thumb string
		if err == nil {
			thumb, err = Thumbprint(k)
		}
		if err == nil && gatewayIDRE.MatchString(row.elementID) {
			err = s.PinGatewayKey(row.elementID, thumb)
		}
		if err != nil {
			s.log.Warn("edge gateway identity key not pinned", "gateway", row.elementID, "err", err)
		}
	}
	if len(details.AssertionJWK) > 0 {
		k, err := jwk.ParseKey(details.AssertionJWK)
		var akey jwk.Key
		if err == nil {
			akey, err = jwk.PublicKeyOf(k)
		}
		if _, ok := algOf(akey); err == nil && ok {
			if tp, err := Thumbprint(akey); err == nil {
				s.pair.mu.Lock()
				if _, had := s.pair.keys[tp]; !had {
					s.pair.keys[tp] = pairedKey{key: akey, client: s.pairingOpts().ClientID, user: user}
				}
				s.pair.mu.Unlock()
			}
		}
	}
	s.log.Info("edge gateway registered", "gateway", row.elementID, "user", user)
}

// AppRows returns the active AppID rows (registered gateways) of user.
func (s *Server) AppRows(user string) []OwnershipRow {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []OwnershipRow
	for _, r := range s.ps.rows {
		if r.username == user && r.elementType == ElementTypeAppID && r.deleted.IsZero() {
			out = append(out, rowJSON(r, false))
		}
	}
	return out
}

// PairedGrants counts the live refresh tokens of pairing grants.
func (s *Server) PairedGrants() int {
	s.pair.mu.Lock()
	defer s.pair.mu.Unlock()
	return len(s.pair.refresh)
}
