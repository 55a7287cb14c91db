package centralsim

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"net/url"
	"reflect"
	"strings"
	"sync"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jwk"
	"github.com/lestrrat-go/jwx/v2/jwt"

	"github.com/edgegate/edgegate/internal/envelope"
)

// The Orion Broker Filter (disit/snap4city OrionBrokerFilter) in front of
// the in-memory Orion (orion.go), as a stock deploy runs it:
// security/AccessTokenAuthenticationFilter.java decides, then
// controller/rest/OrionController.java routes and proxies. Every refusal
// of the filter is HTTP 401 {"result":false,"message":...} with a text of
// src/main/resources/messages/messages.properties.

// Messages of messages.properties.
const (
	MsgAccessTokenNotValid = "The passed access token is not valid"                                             // login.ko.accesstokennotvalid
	MsgCredentialsNotValid = "The passed credentials does not have any ownerships or delegations on the device" // login.ko.credentialsnotvalid
	MsgOwnerCredsNotValid  = "The passed credentials are not valid"                                             // login.ko.ownercredentialsnotvalid (k1/k2)
	MsgMissingElementID    = "Missing parameter: elementid"                                                     // login.ko.missingparameterelementid
	MsgElementIDNotValid   = "The passed elementid is not valid"                                                // login.ko.elementidnotvalid
	MsgIDPatternNotAllowed = "The subscription idPattern is not allowed"                                        // login.ko.idpatternnotallowed
	MsgRequestURLMalformed = "The request URL is malformed"                                                     // login.ko.requesturlmalformed
	MsgConfigurationError  = "Configuration error"                                                              // login.ko.configurationerror
	MsgNetworkProblems     = "Network problems"                                                                 // login.ko.networkproblems
	// The two transient refusals: a back-end 4xx in getOwnershipCC and
	// getDelegationCC (literal strings in AccessTokenAuthenticationFilter).
	MsgTroubleOwner      = "Trouble in getOwnerCredentials, see logs"
	MsgTroubleDelegation = "Trouble in getDelegatedCredentials, see logs"
)

// The two mounts of the filter in a Snap4City deploy's nginx:
// {base}{prefix}{broker}/v2/... (SNAP4CITY.md).
const (
	FilterPrefix    = "/orion-filter/"
	FilterPrefixAlt = "/orionfilter/"
)

// DirectPath is where the bare Orion is mounted, after URL(): a broker
// reached on a private network, without the filter and without auth.
const DirectPath = "/orion"

// DirectBrokerURL is the base of the bare Orion's NGSI v2 API (no filter,
// no auth), e.g. https://127.0.0.1:P/orion: PATCH attrs, GET entity and
// POST /v2/op/update.
func (s *Server) DirectBrokerURL() string { return s.url + DirectPath }

// TrustedIssuer is an OpenID provider besides the realm whose access
// tokens the filter accepts. Keys come from KeySet, else from JWKSURL
// (fetched once, with HTTPClient or http.DefaultClient, as the filter
// fetches the realm's certs once per process).
type TrustedIssuer struct {
	Issuer     string
	JWKSURL    string
	KeySet     jwk.Set
	HTTPClient *http.Client
}

type trustedIssuer struct {
	TrustedIssuer
	mu   sync.Mutex
	keys jwk.Set
}

func (s *Server) initFilter() error {
	if s.opts.FilterCacheTTL == 0 {
		s.opts.FilterCacheTTL = DefaultFilterCacheTTL
	}
	if s.opts.FilterCacheTTL < 0 {
		return fmt.Errorf("filter_cache_ttl must be positive: %v", s.opts.FilterCacheTTL)
	}
	if s.opts.CheckKeys {
		s.opts.K1K2Auth = true
	}
	for i, ti := range s.opts.TrustIssuers {
		if ti.KeySet == nil && ti.JWKSURL == "" {
			return fmt.Errorf("trust_issuers[%d]: key set or JWKS URL required", i)
		}
		s.trusted = append(s.trusted, &trustedIssuer{TrustedIssuer: ti, keys: ti.KeySet})
	}
	return nil
}

// keySet returns the issuer's keys, fetching them once.
func (t *trustedIssuer) keySet(ctx context.Context) (jwk.Set, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.keys != nil {
		return t.keys, nil
	}
	hc := t.HTTPClient
	if hc == nil {
		hc = http.DefaultClient
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	set, err := jwk.Fetch(ctx, t.JWKSURL, jwk.WithHTTPClient(hc))
	if err != nil {
		return nil, fmt.Errorf("fetch keys of %s: %w", t.Issuer, err)
	}
	t.keys = set
	return set, nil
}

// filterUser is retrieveUserName: the token verifies (signature with a
// key of the realm or a trusted issuer, and exp: Keycloak's TokenVerifier
// without default checks, then isExpired) and names its user
// (preferred_username, else "username").
func (s *Server) filterUser(ctx context.Context, raw string) (string, error) {
	// Keycloak's JWSInput base64url-decodes the parts as they are: a
	// space left by a sloppy cut (two spaces after "Bearer") fails there.
	if strings.IndexFunc(raw, func(r rune) bool { return !isJWSChar(r) }) >= 0 {
		return "", errors.New("access token is not a compact JWS")
	}
	user, _, err := s.verifyToken(raw)
	if err == nil {
		return user, nil
	}
	if len(raw) > maxTokenBytes {
		return "", err
	}
	for _, t := range s.trusted {
		set, ferr := t.keySet(ctx)
		if ferr != nil {
			s.log.Warn("trusted issuer keys unavailable", "issuer", t.Issuer, "err", ferr)
			continue
		}
		tok, perr := parseWithSet(raw, set, s.now)
		if perr != nil {
			continue
		}
		for _, name := range []string{"preferred_username", "username"} {
			if v, ok := tok.Get(name); ok {
				if u, ok := v.(string); ok && u != "" {
					return u, nil
				}
			}
		}
		return "", errors.New("access token names no user")
	}
	return "", err
}

func isJWSChar(r rune) bool {
	return r == '.' || r == '-' || r == '_' || r >= '0' && r <= '9' || r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z'
}

// parseWithSet verifies raw with the key of set named by its "kid", the
// algorithm pinned to the key's (RS256 when the key names none).
func parseWithSet(raw string, set jwk.Set, now func() time.Time) (jwt.Token, error) {
	kid, err := tokenKid(raw)
	if err != nil {
		return nil, err
	}
	key, ok := set.LookupKeyID(kid)
	if !ok {
		return nil, fmt.Errorf("no key %q", kid)
	}
	alg := jwa.RS256
	if a := key.Algorithm(); a != nil && a.String() != "" {
		alg = jwa.SignatureAlgorithm(a.String())
	}
	return jwt.Parse([]byte(raw), jwt.WithKey(alg, key), jwt.WithValidate(true),
		jwt.WithClock(jwt.ClockFunc(now)), jwt.WithRequiredClaim("exp"))
}

func tokenKid(raw string) (string, error) {
	h, _, ok := strings.Cut(raw, ".")
	if !ok {
		return "", errors.New("not a JWS")
	}
	b, err := base64.RawURLEncoding.DecodeString(h)
	if err != nil {
		return "", err
	}
	var hdr struct {
		Kid string `json:"kid"`
	}
	if err := json.Unmarshal(b, &hdr); err != nil {
		return "", err
	}
	return hdr.Kid, nil
}

type filterResult struct {
	Result  bool   `json:"result"`
	Message string `json:"message"`
}

// refuseFilter answers as writeResponseError does and records the refusal.
func (s *Server) refuseFilter(w http.ResponseWriter, ref Refusal, msg string) {
	ref.Status, ref.Message = http.StatusUnauthorized, msg
	s.refuse(ref)
	s.log.Info("broker refused", "method", ref.Method, "device", ref.Device, "user", ref.User, "status", ref.Status, "message", msg)
	writeJSON(w, http.StatusUnauthorized, filterResult{Result: false, Message: msg})
}

// refuseOrion answers like Orion and records the refusal.
func (s *Server) refuseOrion(w http.ResponseWriter, ref Refusal, status int, code, desc string) {
	ref.Status, ref.Message = status, code+": "+desc
	s.refuse(ref)
	s.log.Info("broker refused", "method", ref.Method, "device", ref.Device, "user", ref.User, "status", status, "error", code)
	writeJSON(w, status, orionError{Error: code, Description: desc})
}

// springError answers as Spring Boot 1.5's BasicErrorController does (the
// filter's pom: spring-boot 1.5.7) and records the refusal.
func (s *Server) springError(w http.ResponseWriter, ref Refusal, status int, exception, msg, path string) {
	ref.Status, ref.Message = status, msg
	s.refuse(ref)
	s.log.Info("broker refused", "method", ref.Method, "device", ref.Device, "status", status, "message", msg)
	body := map[string]any{
		"timestamp": s.now().UnixMilli(),
		"status":    status,
		"error":     http.StatusText(status),
		"message":   msg,
		"path":      path,
	}
	if exception != "" {
		body["exception"] = exception
	}
	writeJSON(w, status, body)
}

// filterHandler serves one mount of the filter; base is e.g.
// "/orion-filter/orion-1".
func (s *Server) filterHandler(base string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rest := strings.TrimPrefix(r.URL.EscapedPath(), base)
		ref := Refusal{Method: r.Method, Path: r.URL.Path}
		// Only "/v*/**" goes through the filter (MultiHttpSecurityConfig);
		// anything else is Spring's 404 ("/api/test" answers "alive").
		if rest == "/api/test" && r.Method == http.MethodGet {
			w.Write([]byte("alive"))
			return
		}
		if !strings.HasPrefix(rest, "/v") || !strings.Contains(rest[1:], "/") {
			s.springError(w, ref, http.StatusNotFound, "", "No message available", rest)
			return
		}
		// OPTIONS skips every check; the controller answers 204.
		if r.Method == http.MethodOptions {
			w.WriteHeader(http.StatusNoContent)
			return
		}
		if !s.runFilter(w, r, rest, &ref) {
			return
		}
		s.dispatch(w, r, rest, ref)
	})
}

// runFilter is AccessTokenAuthenticationFilter.doFilter; it returns true
// when the request may go on to the controller, else it has answered.
func (s *Server) runFilter(w http.ResponseWriter, r *http.Request, rest string, ref *Refusal) bool {
	q := r.URL.Query()
	elementID, hasElementID := q.Get("elementid"), q.Has("elementid")
	// The token is what follows the first 7 characters of the header
	// ("Bearer "), and only when the header is longer than 8.
	token := ""
	if h := r.Header.Get("Authorization"); len(h) > 8 {
		token = h[7:]
	}
	version := ""
	switch {
	case strings.Contains(rest, "/v1/"):
		version = "v1"
	case strings.Contains(rest, "/v2/"):
		version = "v2"
	}
	if version == "v2" {
		if id := v2DeviceID(rest); id != "" {
			if hasElementID && elementID != id {
				s.refuseFilter(w, *ref, MsgElementIDNotValid)
				return false
			}
			elementID, hasElementID = id, true
		}
	}
	var subIDs []string
	if version == "v2" && rest == "/v2/subscriptions" && r.Method == http.MethodPost {
		ids, pattern, body, err := subscriptionEntities(r)
		if err != nil {
			s.springError(w, *ref, http.StatusBadRequest, "", err.Error(), rest)
			return false
		}
		r.Body = io.NopCloser(strings.NewReader(string(body)))
		if pattern {
			// spring.auth.subscription.anyid.users is empty in the deploy.
			s.refuseFilter(w, *ref, MsgIDPatternNotAllowed)
			return false
		}
		if len(ids) > 0 {
			if hasElementID && !contains(ids, elementID) {
				s.refuseFilter(w, *ref, MsgElementIDNotValid)
				return false
			}
			if !hasElementID && len(ids) == 1 {
				elementID, hasElementID = ids[0], true
			}
			subIDs = ids
		}
	}
	if !hasElementID && len(subIDs) == 0 {
		s.refuseFilter(w, *ref, MsgMissingElementID)
		return false
	}
	ref.Device = elementID
	if version == "" {
		s.refuseFilter(w, *ref, MsgRequestURLMalformed)
		return false
	}
	write := (version == "v1" && strings.Contains(rest, "updateContext")) || (version == "v2" && r.Method == http.MethodPatch)
	elements := []string{elementID}
	if len(subIDs) > 0 {
		elements = subIDs
	}
	for _, id := range elements {
		// Multitenancy is off by default: the element is
		// {organization}:{context_broker_name}:{id}.
		element := s.opts.Organization + ":" + s.opts.BrokerName + ":" + id
		if !s.checkAuthorization(w, r, ref, element, id, token, write) {
			return false
		}
	}
	return true
}

// checkAuthorization: with a token, checkAuthorizationWithAccessToken;
// without one, k1/k2 only where the deploy enables them.
func (s *Server) checkAuthorization(w http.ResponseWriter, r *http.Request, ref *Refusal, element, device, token string, write bool) bool {
	if token == "" {
		if !s.opts.K1K2Auth {
			s.refuseFilter(w, *ref, MsgCredentialsNotValid)
			return false
		}
		return s.checkK1K2(w, r, ref, device)
	}
	user, err := s.filterUser(r.Context(), token)
	if err != nil {
		s.log.Debug("access token refused", "err", err)
		s.refuseFilter(w, *ref, MsgAccessTokenNotValid)
		return false
	}
	ref.User = user
	now := s.now()
	own, ok := s.fcache.ownership(element, user, now)
	if !ok {
		owned, err := s.backendOwnership(r.Context(), user, element)
		if err != nil {
			return s.backendFailed(w, *ref, err, MsgTroubleOwner)
		}
		own = cachedCheck{result: owned, elapsing: now.Add(s.opts.FilterCacheTTL)}
		s.fcache.putOwnership(element, user, own)
	}
	if own.result {
		return true
	}
	d, ok := s.fcache.delegation(element, user, now)
	if !ok {
		res, kind, public, err := s.backendAccessCheck(r.Context(), user, element)
		if err != nil {
			return s.backendFailed(w, *ref, err, MsgTroubleDelegation)
		}
		if kind == "" {
			kind = KindReadAccess
		}
		d = cachedCheck{result: res, kind: kind, elapsing: now.Add(s.opts.FilterCacheTTL)}
		s.fcache.putDelegation(element, user, d, public)
	}
	if write {
		if d.result && (d.kind == KindReadWrite || d.kind == KindWriteOnly || d.kind == KindModify) {
			return true
		}
		s.refuseFilter(w, *ref, MsgCredentialsNotValid)
		return false
	}
	if d.result && d.kind != KindWriteOnly {
		return true
	}
	if !d.result && s.fcache.isPublic(element, now) {
		return true
	}
	s.refuseFilter(w, *ref, MsgCredentialsNotValid)
	return false
}

// backendFailed maps a failed back-end call: a 4xx (HttpClientErrorException)
// is the 401 "Trouble in …"; anything else escapes the filter and Spring
// answers 500.
func (s *Server) backendFailed(w http.ResponseWriter, ref Refusal, err error, trouble string) bool {
	var be *BackendError
	if errors.As(err, &be) && be.Status >= 400 && be.Status < 500 {
		s.refuseFilter(w, ref, trouble)
		return false
	}
	s.springError(w, ref, http.StatusInternalServerError, "org.springframework.web.client.HttpServerErrorException", err.Error(), ref.Path)
	return false
}

// checkK1K2 is checkAuthorizationWithK1K2 for a device that is not public:
// k1 and k2 of at least 10 characters that equal the owner's. (Reads by
// delegated k1/k2 and the cache of this path are not simulated.)
func (s *Server) checkK1K2(w http.ResponseWriter, r *http.Request, ref *Refusal, device string) bool {
	q := r.URL.Query()
	k1, k2 := strings.TrimSpace(q.Get("k1")), strings.TrimSpace(q.Get("k2"))
	if len(k1) < 10 || len(k2) < 10 {
		s.refuseFilter(w, *ref, MsgCredentialsNotValid)
		return false
	}
	s.mu.Lock()
	dev, ok := s.devices[device]
	s.mu.Unlock()
	if !ok {
		s.refuseFilter(w, *ref, MsgConfigurationError) // no ownership row
		return false
	}
	if !(secretEqual(k1, dev.K1) && secretEqual(k2, dev.K2)) {
		s.refuseFilter(w, *ref, MsgOwnerCredsNotValid)
		return false
	}
	return true
}

func secretEqual(got, want string) bool {
	a, b := sha256.Sum256([]byte(got)), sha256.Sum256([]byte(want))
	return subtle.ConstantTimeCompare(a[:], b[:]) == 1 && want != ""
}

// v2DeviceID is extractV2DeviceId: the segment after "/v2/entities/" of
// the request URI (not decoded).
func v2DeviceID(uri string) string {
	const marker = "/v2/entities/"
	i := strings.Index(uri, marker)
	if i < 0 {
		return ""
	}
	id := uri[i+len(marker):]
	if j := strings.Index(id, "/"); j >= 0 {
		id = id[:j]
	}
	return id
}

// subscriptionEntities is extractV2SubscriptionEntityInfo: the ids and
// whether an idPattern is present in subject.entities. A body that does
// not parse names none. The body is returned for the controller.
func subscriptionEntities(r *http.Request) (ids []string, pattern bool, body []byte, err error) {
	body, err = io.ReadAll(io.LimitReader(r.Body, maxUpdateBytes+1))
	if err != nil {
		return nil, false, nil, fmt.Errorf("read body: %w", err)
	}
	var sub struct {
		Subject struct {
			Entities []struct {
				ID        any `json:"id"`
				IDPattern any `json:"idPattern"`
			} `json:"entities"`
		} `json:"subject"`
	}
	if json.Unmarshal(body, &sub) != nil {
		return nil, false, body, nil
	}
	for _, e := range sub.Subject.Entities {
		if p := fmt.Sprint(e.IDPattern); e.IDPattern != nil && p != "" {
			pattern = true
		}
		if id := fmt.Sprint(e.ID); e.ID != nil && id != "" {
			ids = append(ids, id)
		}
	}
	return ids, pattern, body, nil
}

func contains(xs []string, x string) bool {
	for _, v := range xs {
		if v == x {
			return true
		}
	}
	return false
}

// dispatch is OrionController after the filter let the request through:
// only its mappings exist; the rest is Spring's 404 or 405.
func (s *Server) dispatch(w http.ResponseWriter, r *http.Request, rest string, ref Refusal) {
	seg := strings.Split(strings.TrimPrefix(rest, "/"), "/")
	allow := func(method string) bool {
		if r.Method == method {
			return true
		}
		s.springError(w, ref, http.StatusMethodNotAllowed, "org.springframework.web.HttpRequestMethodNotSupportedException",
			"Request method '"+r.Method+"' not supported", rest)
		return false
	}
	switch {
	case len(seg) == 3 && seg[0] == "v2" && seg[1] == "entities" && seg[2] != "":
		if !allow(http.MethodGet) {
			return
		}
		q := r.URL.Query()
		if !q.Has("type") { // @RequestParam(value = "type", required = true)
			s.springError(w, ref, http.StatusBadRequest, "org.springframework.web.bind.MissingServletRequestParameterException",
				"Required String parameter 'type' is not present", rest)
			return
		}
		id, _ := url.PathUnescape(seg[2])
		c := orionCall{w: w, r: r, ref: ref, user: ref.User, id: id, typ: q.Get("type"), attrs: q.Get("attrs")}
		if s.orionFaultBehindFilter(c) {
			return
		}
		s.orionGetEntity(c)
	case len(seg) == 4 && seg[0] == "v2" && seg[1] == "entities" && seg[2] != "" && seg[3] == "attrs":
		if !allow(http.MethodPatch) {
			return
		}
		// consumes = { "application/json" }: Spring answers 415 itself.
		ct := r.Header.Get("Content-Type")
		if !isJSONType(ct) {
			if ct == "" {
				ct = "application/octet-stream"
			}
			s.springError(w, ref, http.StatusUnsupportedMediaType, "org.springframework.web.HttpMediaTypeNotSupportedException",
				"Content type '"+ct+"' not supported", rest)
			return
		}
		id, _ := url.PathUnescape(seg[2])
		// The PATCH is proxied with body and headers but WITHOUT any query
		// parameter (updateV2 builds the URI from the id only): type, k1,
		// k2 are dropped.
		c := orionCall{w: w, r: r, ref: ref, user: ref.User, id: id}
		if s.orionFaultBehindFilter(c) {
			return
		}
		s.orionPatchAttrs(c)
	case len(seg) == 2 && seg[0] == "v2" && seg[1] == "subscriptions":
		// OC subscribeV2: consumes application/json, proxied with body and
		// headers; Orion's 201 and its Location header come back as they are.
		if !allow(http.MethodPost) {
			return
		}
		if s.noSubs.Load() {
			s.notSimulated(w, ref, "subscriptions")
			return
		}
		if ct := r.Header.Get("Content-Type"); !isJSONType(ct) {
			if ct == "" {
				ct = "application/octet-stream"
			}
			s.springError(w, ref, http.StatusUnsupportedMediaType, "org.springframework.web.HttpMediaTypeNotSupportedException",
				"Content type '"+ct+"' not supported", rest)
			return
		}
		c := orionCall{w: w, r: r, ref: ref, user: ref.User}
		if s.orionFaultBehindFilter(c) {
			return
		}
		s.orionCreateSubscription(c)
	case len(seg) == 3 && seg[0] == "v2" && seg[1] == "subscriptions":
		// OC unsubscribeV2: the filter checked the elementid (any element
		// the user may read); the subscription itself is not tied to it.
		if !allow(http.MethodDelete) {
			return
		}
		if s.noSubs.Load() {
			s.notSimulated(w, ref, "subscriptions")
			return
		}
		c := orionCall{w: w, r: r, ref: ref, user: ref.User}
		if s.orionFaultBehindFilter(c) {
			return
		}
		id, _ := url.PathUnescape(seg[2])
		s.orionDeleteSubscription(c, id)
	case len(seg) == 2 && seg[0] == "v1" && (seg[1] == "queryContext" || seg[1] == "updateContext" || seg[1] == "subscribeContext" || seg[1] == "unsubscribeContext"):
		if allow(http.MethodPost) {
			s.notSimulated(w, ref, "NGSIv1")
		}
	default:
		// e.g. POST /v2/op/update: the filter has no such mapping.
		s.springError(w, ref, http.StatusNotFound, "", "No message available", rest)
	}
}

// isJSONType: Spring's match of consumes = { "application/json" }.
func isJSONType(ct string) bool {
	mt, _, err := mime.ParseMediaType(ct)
	return err == nil && mt == "application/json"
}

// notSimulated answers a route the filter proxies but the simulator does
// not implement (README.md).
func (s *Server) notSimulated(w http.ResponseWriter, ref Refusal, what string) {
	s.refuseOrion(w, ref, http.StatusNotImplemented, orionErrNotImpl, what+" are not simulated by central-sim")
}

// orionFaultBehindFilter applies an injected Orion fault to a proxied
// request: proxyRequest passes a 4xx through (HttpClientErrorException)
// and turns anything else into a 500 whose body is the exception message.
func (s *Server) orionFaultBehindFilter(c orionCall) bool {
	f, ok := s.takeFault(TargetOrion)
	if !ok {
		return false
	}
	ref := c.ref
	ref.Fault = true
	if f.Mode == FaultStatus && f.Status < 500 {
		ref.Status, ref.Message = f.Status, "fault status"
		s.refuse(ref)
		writeFaultBody(c.w, f.Status, f.Body)
		return true
	}
	status := f.Status
	if f.Mode != FaultStatus {
		status = http.StatusServiceUnavailable
	}
	ref.Status, ref.Message = http.StatusInternalServerError, "fault: orion answered "+fmt.Sprint(status)
	s.refuse(ref)
	c.w.Header().Set("Content-Type", "text/plain;charset=UTF-8")
	c.w.WriteHeader(http.StatusInternalServerError)
	fmt.Fprintf(c.w, "%d %s", status, http.StatusText(status))
	return true
}

// directRoutes serves the bare Orion at DirectPath: no filter, no auth.
func (s *Server) directRoutes(mux *http.ServeMux) {
	wrap := func(h func(http.ResponseWriter, *http.Request)) http.Handler {
		return s.withFaults(TargetOrion, http.HandlerFunc(h))
	}
	mux.Handle("PATCH "+DirectPath+"/v2/entities/{id}/attrs", wrap(func(w http.ResponseWriter, r *http.Request) {
		ref := Refusal{Method: r.Method, Path: r.URL.Path, Device: r.PathValue("id")}
		s.orionPatchAttrs(orionCall{w: w, r: r, ref: ref, id: r.PathValue("id"), typ: r.URL.Query().Get("type")})
	}))
	mux.Handle("GET "+DirectPath+"/v2/entities/{id}", wrap(func(w http.ResponseWriter, r *http.Request) {
		ref := Refusal{Method: r.Method, Path: r.URL.Path, Device: r.PathValue("id")}
		q := r.URL.Query()
		s.orionGetEntity(orionCall{w: w, r: r, ref: ref, id: r.PathValue("id"), typ: q.Get("type"), attrs: q.Get("attrs")})
	}))
	mux.Handle("POST "+DirectPath+"/v2/op/update", wrap(s.handleBatchUpdate))
	direct := func(r *http.Request, w http.ResponseWriter) orionCall {
		return orionCall{w: w, r: r, ref: Refusal{Method: r.Method, Path: r.URL.Path}}
	}
	mux.Handle("POST "+DirectPath+"/v2/subscriptions", wrap(func(w http.ResponseWriter, r *http.Request) {
		s.orionCreateSubscription(direct(r, w))
	}))
	mux.Handle("GET "+DirectPath+"/v2/subscriptions", wrap(func(w http.ResponseWriter, r *http.Request) {
		s.orionGetSubscription(direct(r, w), "")
	}))
	mux.Handle("GET "+DirectPath+"/v2/subscriptions/{id}", wrap(func(w http.ResponseWriter, r *http.Request) {
		s.orionGetSubscription(direct(r, w), r.PathValue("id"))
	}))
	mux.Handle("DELETE "+DirectPath+"/v2/subscriptions/{id}", wrap(func(w http.ResponseWriter, r *http.Request) {
		s.orionDeleteSubscription(direct(r, w), r.PathValue("id"))
	}))
}

// brokerRoutes mounts the filter (both prefixes) and the bare Orion.
func (s *Server) brokerRoutes(mux *http.ServeMux) {
	for _, p := range []string{FilterPrefix, FilterPrefixAlt} {
		base := p + s.opts.BrokerName
		mux.Handle(base+"/", s.withFaults(TargetBroker, s.filterHandler(base)))
	}
	s.directRoutes(mux)
}

// verdict is the signature check of an accepted update (an edgegate
// extension: stock records nothing of the kind).
type verdict struct {
	verdict, detail string
	claims          envelope.Claims // Version != 0 only when verified
	alg, kid        string
}

// verdictOf checks the signatures of an update with the device's keys.
// The gateway carries the compact JWS of the whole reading as metadata
// "signature" on every attribute it writes (where stock Orion accepts it);
// each such attribute must verify: the JWS opens with a key of the device,
// names this entity, and signs this attribute with this type and value.
// An update with no signature metadata but a signature attribute is
// checked the former way (envelope.VerifyAttrMap).
func (s *Server) verdictOf(dev Device, entityID string, attrs []orionAttr) verdict {
	sigName := s.opts.SignatureAttr
	signed := false
	for _, a := range attrs {
		if _, ok := a.md[sigName]; ok {
			signed = true
			break
		}
	}
	if !signed {
		for _, a := range attrs {
			if a.name == sigName {
				return s.legacyVerdict(dev, entityID, attrs)
			}
		}
		return verdict{verdict: VerdictUnsigned}
	}
	keys, err := deviceVerifyKeys(dev)
	if err != nil {
		return verdict{verdict: VerdictNoKey, detail: err.Error()}
	}
	if len(keys) == 0 {
		return verdict{verdict: VerdictNoKey, detail: "device has no K1/K2 and no public key"}
	}
	opened := map[string]envelope.Claims{}
	var first verdict
	for _, a := range attrs {
		rawSig, ok := a.md[sigName]
		if !ok {
			return verdict{verdict: VerdictTampered, detail: fmt.Sprintf("attribute %q carries no signature", a.name)}
		}
		var m struct {
			Value string `json:"value"`
		}
		if json.Unmarshal(rawSig, &m) != nil || m.Value == "" {
			return verdict{verdict: VerdictMalformed, detail: fmt.Sprintf("attribute %q: signature metadata is not a string", a.name)}
		}
		c, seen := opened[m.Value]
		if !seen {
			c, err = envelope.OpenWith(m.Value, keys)
			switch {
			case errors.Is(err, envelope.ErrTampered):
				return verdict{verdict: VerdictTampered, detail: err.Error()}
			case errors.Is(err, envelope.ErrWrongKey):
				return verdict{verdict: VerdictWrongKey, detail: err.Error()}
			case err != nil:
				return verdict{verdict: VerdictMalformed, detail: err.Error()}
			}
			opened[m.Value] = c
		}
		if c.Device != entityID {
			return verdict{verdict: VerdictTampered, detail: fmt.Sprintf("entity %q carries a reading of device %q", entityID, c.Device)}
		}
		want, ok := c.Attrs[a.name]
		if !ok {
			return verdict{verdict: VerdictTampered, detail: fmt.Sprintf("attribute %q is not in the signed reading", a.name)}
		}
		if a.typ != want.Type {
			return verdict{verdict: VerdictTampered, detail: fmt.Sprintf("attribute %q has type %q, signed %q", a.name, a.typ, want.Type)}
		}
		if !sameJSONValue(sentValue(a), want.Value) {
			return verdict{verdict: VerdictTampered, detail: fmt.Sprintf("attribute %q has a value other than the signed one", a.name)}
		}
		if first.claims.Version == 0 {
			first.claims = c
			first.alg, first.kid, _ = envelope.KeyIDOf(m.Value)
		}
	}
	first.verdict = VerdictValid
	return first
}

// sentValue is the attribute's value as the client sent it (a DateTime is
// normalized in the store, not in the signature).
func sentValue(a orionAttr) json.RawMessage {
	var m struct {
		Value json.RawMessage `json:"value"`
	}
	if json.Unmarshal(a.raw, &m) != nil || m.Value == nil {
		return json.RawMessage("null")
	}
	return m.Value
}

// sameJSONValue compares a received JSON value with a signed one after a
// round trip, so both have the types encoding/json produces.
func sameJSONValue(got json.RawMessage, want any) bool {
	var g any
	if json.Unmarshal(got, &g) != nil {
		return false
	}
	b, err := json.Marshal(want)
	if err != nil {
		return false
	}
	var w any
	if json.Unmarshal(b, &w) != nil {
		return false
	}
	return reflect.DeepEqual(g, w)
}

// legacyVerdict checks a signature carried as its own attribute.
func (s *Server) legacyVerdict(dev Device, entityID string, attrs []orionAttr) verdict {
	raw := make(map[string]json.RawMessage, len(attrs)+1)
	for _, a := range attrs {
		raw[a.name] = a.raw
	}
	raw["id"], _ = json.Marshal(entityID)
	keys, err := deviceVerifyKeys(dev)
	if err != nil {
		return verdict{verdict: VerdictNoKey, detail: err.Error()}
	}
	if len(keys) == 0 {
		return verdict{verdict: VerdictNoKey, detail: "device has no K1/K2 and no public key"}
	}
	c, err := envelope.VerifyAttrMap(raw, keys, s.opts.SignatureAttr)
	switch {
	case err == nil:
		v := verdict{verdict: VerdictValid, claims: c}
		v.alg, v.kid = s.keyOfSignature(raw)
		return v
	case errors.Is(err, envelope.ErrTampered):
		return verdict{verdict: VerdictTampered, detail: err.Error()}
	case errors.Is(err, envelope.ErrWrongKey):
		return verdict{verdict: VerdictWrongKey, detail: err.Error()}
	default:
		return verdict{verdict: VerdictMalformed, detail: err.Error()}
	}
}
