package centralsim

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"regexp"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jwk"
	"github.com/lestrrat-go/jwx/v2/jws"

	"github.com/edgegate/edgegate/policy"
	centralsync "github.com/edgegate/edgegate/sync"
)

// Signed policy bundles, the central side of policy sync:
//
//	GET  /edgegate/v1/policy-keys                  public JWKS of the policy-signing keys (pinned at pairing)
//	GET  /edgegate/v1/gateways/{gw}/policy         (Bearer) compact JWS of the gateway's policy.Document
//	POST /edgegate/v1/gateways/{gw}/receipts       (Bearer) signed apply receipt (receipts.go)
//
// Gateway accounts. A gateway acts through an OAuth client (its account);
// the token's azp names the client. Options.Gateways binds clients to
// gateways; when it is empty, a gateway is bound to the first known client
// that fetches its policy, posts a receipt or subscribes to its push topic
// (trust on first use), and a client serves one gateway only. Tokens of
// clients the sim does not know (IssueAccessToken's default azp "test")
// are refused with 403.
//
// Contents. A bundle holds the devices owned by the gateway account's user
// (Options.BundleAllDevices: every device), each with K1/K2, type, owner,
// broker = BrokerURL() and radio binding, and every delegation of those
// devices. Devices the gateway could not compile (no K1/K2, K1 == K2, an id
// or type outside [A-Za-z0-9._-]) are left out and logged: one bad device
// must not make the gateway refuse the whole policy.
//
// Versions. A gateway's bundle is minted lazily, when it is asked for: a
// new version when its contents (devices, delegations) changed since the
// last one, or when the last one is past half its lifetime, so a polling
// gateway always holds a bundle with at least PolicyTTL/2 left. issued_at
// and expires_at belong to the version: the same ETag always names the same
// document. Versions are max(previous+1, Unix seconds of now), so they
// keep increasing across restarts of the sim too.

// Defaults and names of policy sync.
const (
	DefaultPolicyTTL = 24 * time.Hour
	// PolicyJWSType is the "typ" header of a policy bundle.
	PolicyJWSType = "edgegate-policy+jws"
	// ContentTypeJOSE is the media type of a compact JWS (RFC 7515 §9.2.1).
	ContentTypeJOSE = "application/jose"
	// PolicyKeysPath is where the public policy-signing keys are served.
	PolicyKeysPath = "/edgegate/v1/policy-keys"
	// maxBundleBytes bounds what the sim signs (the gateway bounds what it
	// parses; staying below keeps the sim's bundles acceptable).
	maxBundleBytes = 4 << 20
)

// Errors callers branch on.
var (
	// ErrUnknownGateway: the gateway is bound to no client, so the sim
	// cannot tell whose devices its bundle holds.
	ErrUnknownGateway = errors.New("centralsim: gateway is bound to no client (Options.Gateways, or let it fetch its policy once)")
	// ErrPushDisabled: the sim runs without its MQTT broker.
	ErrPushDisabled = errors.New("centralsim: push broker not running (Options.MQTT)")
)

var gatewayIDRE = regexp.MustCompile(`^[A-Za-z0-9._-]{1,128}$`)

// syncState is the policy-sync state of a Server, under Server.mu.
type syncState struct {
	// The platform (ownership.go, iotdirectory.go, backend.go).
	rows          []ownRow // the Ownership API's table
	nextRowID     int64
	users         map[string]User       // by lower-case username
	dirDevices    map[string]*dirDevice // the IoT Directory's columns, by device id
	backendFaults map[string]*BackendError

	// Delegations' ids (ownership.go) and the companion's state.
	delegMeta   map[Delegation]delegationMeta
	nextDelegID int64

	policyAlg  jwa.SignatureAlgorithm
	policyKeys []jwk.Key // private, oldest first; the last one signs

	gateways map[string]*gatewayState // by gateway id
	clientGW map[string]string        // client id → gateway id
	receipts []Receipt
}

type gatewayState struct {
	client  string          // the gateway account; "" = unbound
	content [32]byte        // digest of doc's devices and delegations
	doc     policy.Document // the version in force; Version 0 = none yet
	pin     string          // RFC 7638 thumbprint of the gateway identity key
}

// initSyncState fills in the policy-sync defaults, checks the gateway
// bindings and makes the first policy-signing key. It runs in New before
// any device is registered.
func (s *Server) initSyncState() error {
	o := &s.opts
	if o.BrokerName == "" {
		o.BrokerName = DefaultBrokerName
	}
	if o.Organization == "" {
		o.Organization = DefaultOrganization
	}
	for name, v := range map[string]string{"broker_name": o.BrokerName, "organization": o.Organization} {
		if !gatewayIDRE.MatchString(v) {
			return fmt.Errorf("%s must match %s: %q", name, gatewayIDRE, v)
		}
	}
	if o.PolicyTTL == 0 {
		o.PolicyTTL = DefaultPolicyTTL
	}
	if o.PolicyTTL < 0 {
		return fmt.Errorf("policy_ttl must be positive: %v", o.PolicyTTL)
	}
	if o.MQTTListen == "" {
		o.MQTTListen = "127.0.0.1:0"
	}
	switch strings.ToUpper(o.PolicyKeyAlg) {
	case "", "ES256":
		s.ps.policyAlg = jwa.ES256
	case "EDDSA":
		s.ps.policyAlg = jwa.EdDSA
	case "RS256":
		s.ps.policyAlg = jwa.RS256
	default:
		return fmt.Errorf("policy_key_alg must be ES256, EdDSA or RS256: %q", o.PolicyKeyAlg)
	}
	s.ps.delegMeta = map[Delegation]delegationMeta{}
	s.ps.gateways = map[string]*gatewayState{}
	s.ps.clientGW = map[string]string{}
	known := map[string]bool{}
	for _, c := range o.Clients {
		known[c.ID] = true
	}
	for _, client := range sortedKeys(o.Gateways) {
		gw := o.Gateways[client]
		switch {
		case !known[client]:
			return fmt.Errorf("gateways: %q is not a client", client)
		case !gatewayIDRE.MatchString(gw):
			return fmt.Errorf("gateways[%s]: gateway id must match %s: %q", client, gatewayIDRE, gw)
		case s.ps.gateways[gw] != nil:
			return fmt.Errorf("gateways[%s]: gateway %q already has the account %q", client, gw, s.ps.gateways[gw].client)
		}
		s.ps.gateways[gw] = &gatewayState{client: client}
		s.ps.clientGW[client] = gw
	}
	key, err := newPolicyKey(s.ps.policyAlg)
	if err != nil {
		return err
	}
	s.ps.policyKeys = []jwk.Key{key}
	return nil
}

func newPolicyKey(alg jwa.SignatureAlgorithm) (jwk.Key, error) {
	var raw any
	var err error
	switch alg {
	case jwa.ES256:
		raw, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	case jwa.EdDSA:
		_, raw, err = ed25519.GenerateKey(rand.Reader)
	default:
		raw, err = generateRSA()
	}
	if err != nil {
		return nil, fmt.Errorf("policy key: %w", err)
	}
	key, err := jwk.FromRaw(raw)
	if err != nil {
		return nil, fmt.Errorf("policy key: %w", err)
	}
	if err := jwk.AssignKeyID(key); err != nil { // RFC 7638 thumbprint
		return nil, fmt.Errorf("policy key id: %w", err)
	}
	if err := key.Set(jwk.AlgorithmKey, alg); err != nil {
		return nil, fmt.Errorf("policy key: %w", err)
	}
	return key, nil
}

// RotatePolicyKey makes a new policy-signing key (new kid) that signs
// every bundle from now on; the old keys stay in the JWKS so bundles
// already handed out still verify. It returns the new kid.
func (s *Server) RotatePolicyKey() (string, error) {
	s.mu.Lock()
	alg := s.ps.policyAlg
	s.mu.Unlock()
	key, err := newPolicyKey(alg) // slow for RSA: outside the lock
	if err != nil {
		return "", fmt.Errorf("centralsim: rotate: %w", err)
	}
	s.mu.Lock()
	s.ps.policyKeys = append(s.ps.policyKeys, key)
	s.mu.Unlock()
	s.log.Info("policy key rotated", "kid", key.KeyID(), "alg", alg)
	return key.KeyID(), nil
}

// PolicyKeys is the public JWKS of every policy-signing key, oldest first.
func (s *Server) PolicyKeys() jwk.Set {
	s.mu.Lock()
	keys := append([]jwk.Key(nil), s.ps.policyKeys...)
	s.mu.Unlock()
	set := jwk.NewSet()
	for _, k := range keys {
		pub, err := jwk.PublicKeyOf(k)
		if err != nil {
			continue // keys made by newPolicyKey always have a public form
		}
		_ = pub.Set(jwk.KeyUsageKey, "sig")
		_ = set.AddKey(pub)
	}
	return set
}

// PolicyKeyID is the kid of the key that signs bundles now.
func (s *Server) PolicyKeyID() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.ps.policyKeys[len(s.ps.policyKeys)-1].KeyID()
}

// PolicyKeysURL is where the public policy-signing keys are served.
func (s *Server) PolicyKeysURL() string { return s.url + PolicyKeysPath }

// PolicyURL is the bundle endpoint of gateway gw.
func (s *Server) PolicyURL(gw string) string {
	return s.url + "/edgegate/v1/gateways/" + gw + "/policy"
}

// SignDocument signs doc as a bundle with the current policy key, as is:
// for tests that need crafted bundles (rolled back, expired, foreign).
func (s *Server) SignDocument(doc policy.Document) (string, error) {
	s.mu.Lock()
	key, alg := s.ps.policyKeys[len(s.ps.policyKeys)-1], s.ps.policyAlg
	s.mu.Unlock()
	payload, err := json.Marshal(doc)
	if err != nil {
		return "", fmt.Errorf("centralsim: sign policy: %w", err)
	}
	if len(payload) > maxBundleBytes {
		return "", fmt.Errorf("centralsim: sign policy: document is %d bytes, more than %d", len(payload), maxBundleBytes)
	}
	hdr := jws.NewHeaders()
	for k, v := range map[string]any{jws.KeyIDKey: key.KeyID(), jws.TypeKey: PolicyJWSType} {
		if err := hdr.Set(k, v); err != nil {
			return "", fmt.Errorf("centralsim: sign policy: %w", err)
		}
	}
	b, err := jws.Sign(payload, jws.WithKey(alg, key, jws.WithProtectedHeaders(hdr)))
	if err != nil {
		return "", fmt.Errorf("centralsim: sign policy: %w", err)
	}
	return string(b), nil
}

// Bundle returns the document of gw's current bundle, minting a new
// version if its contents changed (see the versioning rules above).
func (s *Server) Bundle(gw string) (policy.Document, error) {
	if !gatewayIDRE.MatchString(gw) {
		return policy.Document{}, fmt.Errorf("centralsim: gateway id must match %s: %q", gatewayIDRE, gw)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.bundleLocked(gw)
}

// PublishBundle returns gw's current bundle as a compact JWS.
func (s *Server) PublishBundle(gw string) (string, error) {
	doc, err := s.Bundle(gw)
	if err != nil {
		return "", err
	}
	return s.SignDocument(doc)
}

func (s *Server) bundleLocked(gw string) (policy.Document, error) {
	st := s.ps.gateways[gw]
	user := ""
	if !s.opts.BundleAllDevices {
		if st == nil || st.client == "" {
			return policy.Document{}, fmt.Errorf("%w: %q", ErrUnknownGateway, gw)
		}
		user = clientUser(s.clients[st.client])
	}
	if st == nil {
		st = &gatewayState{}
		s.ps.gateways[gw] = st
	}
	now := s.now().UTC()
	regs, dls, skipped := s.policyContentLocked(user)
	content := contentDigest(regs, dls)
	if st.doc.Version != 0 && content == st.content && now.Before(st.doc.IssuedAt.Add(s.opts.PolicyTTL/2)) {
		return st.doc, nil
	}
	v := st.doc.Version + 1
	if u := now.Unix(); u > 0 && uint64(u) > v {
		v = uint64(u)
	}
	doc := policy.Document{
		Format: policy.DocumentFormat, Gateway: gw, Version: v,
		IssuedAt: now, ExpiresAt: now.Add(s.opts.PolicyTTL),
		Devices: regs, Delegations: dls,
	}
	if _, err := policy.Compile(doc, "bundle", ""); err != nil {
		// E.g. two devices bound to the same radio node: fix the registry.
		return policy.Document{}, fmt.Errorf("centralsim: bundle of %s would not compile: %w", gw, err)
	}
	for _, sk := range skipped {
		s.log.Warn("device left out of the bundle", "gateway", gw, "device", sk.id, "reason", sk.reason)
	}
	st.doc, st.content = doc, content
	s.log.Info("policy bundle minted", "gateway", gw, "version", v, "devices", len(regs), "delegations", len(dls))
	return doc, nil
}

type skippedDevice struct{ id, reason string }

// policyContentLocked lists the registrations and delegations of a bundle:
// user's devices, or all devices when user is "" (BundleAllDevices).
func (s *Server) policyContentLocked(user string) ([]policy.Registration, []policy.Delegation, []skippedDevice) {
	regs := []policy.Registration{}
	var skipped []skippedDevice
	in := map[string]bool{}
	for _, id := range sortedKeys(s.devices) {
		d := s.devices[id]
		if user != "" && d.Owner != user {
			continue
		}
		r := policy.Registration{ID: d.ID, Type: d.Type, Owner: d.Owner, Broker: s.BrokerURL(), K1: d.K1, K2: d.K2,
			Signing: d.Signing, PublicKeys: slices.Clone(d.PublicKeys)}
		if d.Radio != nil {
			b := *d.Radio
			r.Radio = &b
		}
		// The gateway refuses a whole document over one bad device; check
		// each alone with the gateway's own rules.
		if _, err := policy.Compile(policy.Document{Format: policy.DocumentFormat, Devices: []policy.Registration{r}}, "check", ""); err != nil {
			skipped = append(skipped, skippedDevice{d.ID, strings.TrimPrefix(err.Error(), policy.ErrInvalid.Error()+": ")})
			continue
		}
		regs = append(regs, r)
		in[d.ID] = true
	}
	var dls []policy.Delegation
	seen := map[Delegation]bool{}
	for _, dl := range s.delegs {
		// Bundles carry user delegations of this server's devices only.
		dev := strings.TrimPrefix(dl.Device, s.opts.Organization+":"+s.opts.BrokerName+":")
		if !in[dev] || seen[dl] || dl.User == "" {
			continue
		}
		dl.Device = dev
		seen[dl] = true
		dls = append(dls, policy.Delegation{Device: dl.Device, User: dl.User, Kind: policy.Kind(dl.Kind)})
	}
	sort.Slice(dls, func(i, j int) bool {
		a, b := dls[i], dls[j]
		if a.Device != b.Device {
			return a.Device < b.Device
		}
		if a.User != b.User {
			return a.User < b.User
		}
		return a.Kind < b.Kind
	})
	return regs, dls, skipped
}

func contentDigest(regs []policy.Registration, dls []policy.Delegation) [32]byte {
	b, _ := json.Marshal(struct {
		R []policy.Registration
		D []policy.Delegation
	}{regs, dls})
	return sha256.Sum256(b)
}

// authorizeGatewayLocked checks that client is gw's account, binding them
// on first use when Options.Gateways is empty.
func (s *Server) authorizeGatewayLocked(client, gw string) error {
	if _, ok := s.clients[client]; !ok || client == "" {
		return fmt.Errorf("token was issued to %q, which is not a gateway account", client)
	}
	st := s.ps.gateways[gw]
	if st != nil && st.client != "" {
		if st.client == client {
			return nil
		}
		return fmt.Errorf("client %q is not the account of gateway %q", client, gw)
	}
	if len(s.opts.Gateways) > 0 {
		return fmt.Errorf("client %q is not the account of gateway %q (Options.Gateways)", client, gw)
	}
	if other, ok := s.ps.clientGW[client]; ok {
		return fmt.Errorf("client %q is the account of gateway %q, not %q", client, other, gw)
	}
	if st == nil {
		st = &gatewayState{}
		s.ps.gateways[gw] = st
	}
	st.client = client
	s.ps.clientGW[client] = gw
	s.log.Info("gateway bound to its account on first use", "gateway", gw, "client", client)
	return nil
}

// GatewayAccount returns the client bound to gw, if any.
func (s *Server) GatewayAccount(gw string) (string, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.ps.gateways[gw]
	if st == nil || st.client == "" {
		return "", false
	}
	return st.client, true
}

// gatewayRequest authenticates a request to /edgegate/v1/gateways/{gw}/...
// and returns gw; on failure it has answered.
func (s *Server) gatewayRequest(w http.ResponseWriter, r *http.Request) (string, bool) {
	_, azp, ok := s.tokenUser(w, r)
	if !ok {
		return "", false
	}
	gw := r.PathValue("gw")
	if !gatewayIDRE.MatchString(gw) {
		apiError(w, http.StatusBadRequest, "bad_request", "gateway id must match "+gatewayIDRE.String())
		return "", false
	}
	s.mu.Lock()
	err := s.authorizeGatewayLocked(azp, gw)
	s.mu.Unlock()
	if err != nil {
		s.log.Info("gateway request refused", "path", r.URL.Path, "status", http.StatusForbidden, "err", err)
		apiError(w, http.StatusForbidden, "forbidden", err.Error())
		return "", false
	}
	return gw, true
}

func (s *Server) handlePolicyKeys(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Cache-Control", "no-cache")
	writeJSON(w, http.StatusOK, s.PolicyKeys())
}

// handleGatewayPolicy is GET /edgegate/v1/gateways/{gw}/policy.
func (s *Server) handleGatewayPolicy(w http.ResponseWriter, r *http.Request) {
	gw, ok := s.gatewayRequest(w, r)
	if !ok {
		return
	}
	doc, err := s.Bundle(gw)
	if err != nil {
		s.log.Error("policy bundle", "gateway", gw, "err", err)
		apiError(w, http.StatusInternalServerError, "server_error", "cannot build the policy bundle")
		return
	}
	etag := fmt.Sprintf(`"v%d"`, doc.Version)
	w.Header().Set("ETag", etag)
	w.Header().Set("Cache-Control", "no-store") // it holds K1/K2
	if inm := r.Header.Get("If-None-Match"); inm != "" && centralsync.ETagMatches(inm, etag) {
		w.WriteHeader(http.StatusNotModified)
		return
	}
	compact, err := s.SignDocument(doc)
	if err != nil {
		s.log.Error("policy bundle", "gateway", gw, "err", err)
		apiError(w, http.StatusInternalServerError, "server_error", "cannot sign the policy bundle")
		return
	}
	w.Header().Set("Content-Type", ContentTypeJOSE)
	w.Header().Set("Content-Length", fmt.Sprint(len(compact)))
	w.WriteHeader(http.StatusOK)
	w.Write([]byte(compact))
}

// Admin: GET /_sim/gateways/{gw}/bundle.
func (s *Server) handleAdminBundle(w http.ResponseWriter, r *http.Request) {
	compact, err := s.PublishBundle(r.PathValue("gw"))
	if err != nil {
		status := http.StatusInternalServerError
		if errors.Is(err, ErrUnknownGateway) || !gatewayIDRE.MatchString(r.PathValue("gw")) {
			status = http.StatusNotFound
		}
		writeJSON(w, status, map[string]string{"error": "bundle", "description": err.Error()})
		return
	}
	w.Header().Set("Content-Type", ContentTypeJOSE)
	w.WriteHeader(http.StatusOK)
	w.Write([]byte(compact))
}

// Admin: POST /_sim/policy-keys/rotate.
func (s *Server) handleAdminRotate(w http.ResponseWriter, r *http.Request) {
	kid, err := s.RotatePolicyKey()
	if err != nil {
		writeJSON(w, http.StatusInternalServerError, map[string]string{"error": "rotate", "description": err.Error()})
		return
	}
	writeJSON(w, http.StatusOK, map[string]string{"kid": kid})
}

// apiError answers the companion's and the admin surface's errors.
func apiError(w http.ResponseWriter, status int, code, desc string) {
	if status == http.StatusUnauthorized {
		w.Header().Set("WWW-Authenticate", `Bearer error="invalid_token"`)
	}
	writeJSON(w, status, map[string]string{"error": code, "description": desc})
}

// tokenUser verifies the Bearer token of a companion request and returns
// its user and client; on failure it has answered 401.
func (s *Server) tokenUser(w http.ResponseWriter, r *http.Request) (user, azp string, ok bool) {
	raw, err := bearerToken(r)
	if err == nil {
		user, azp, err = s.verifyToken(raw)
	}
	if err != nil {
		s.log.Info("api refused", "path", r.URL.Path, "status", http.StatusUnauthorized, "err", err)
		apiError(w, http.StatusUnauthorized, "unauthorized", MsgAccessTokenNotValid)
		return "", "", false
	}
	return user, azp, true
}
