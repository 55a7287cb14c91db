package centralsim

import (
	"crypto/rand"
	"crypto/rsa"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jwk"
	"github.com/lestrrat-go/jwx/v2/jwt"
)

// TestFilterRoutes: only OrionController's mappings exist behind the
// filter, under both mounts; the filter runs first.
func TestFilterRoutes(t *testing.T) {
	f := newFixture(t)
	alice := "Bearer " + f.token(t, "alice", time.Hour)
	mallory := "Bearer " + f.token(t, "mallory", time.Hour)
	body, _ := sealed(t, devTemp, k1, k2, 1, 20)
	sub := func(entity string) string {
		return `{"subject":{"entities":[{"id":"` + entity + `","type":"T"}]},"notification":{"http":{"url":"http://x"},"attrs":["temperature"]}}`
	}
	const (
		spring = "spring"
		filter = "filter"
		orion  = "orion"
		none   = ""
	)
	tests := []struct {
		name, method, path, auth, ctype, body string
		status                                int
		kind, msg                             string
	}{
		{"PATCH under /orion-filter", "PATCH", "/orion-filter/orion-1/v2/entities/" + devTemp + "/attrs", alice, "application/json", string(body), 204, none, ""},
		{"PATCH under /orionfilter", "PATCH", "/orionfilter/orion-1/v2/entities/" + devTemp + "/attrs", alice, "application/json; charset=utf-8", string(body), 204, none, ""},
		{"PATCH with a wrong type query: dropped", "PATCH", "/orion-filter/orion-1/v2/entities/" + devTemp + "/attrs?type=Nope&k1=x", alice, "application/json", string(body), 204, none, ""},
		{"GET with type", "GET", "/orion-filter/orion-1/v2/entities/" + devTemp + "?type=" + devType, alice, "", "", 200, none, ""},
		{"GET without type", "GET", "/orion-filter/orion-1/v2/entities/" + devTemp, alice, "", "", 400, spring, "Required String parameter 'type' is not present"},
		{"POST attrs", "POST", "/orion-filter/orion-1/v2/entities/" + devTemp + "/attrs", alice, "application/json", string(body), 405, spring, "Request method 'POST' not supported"},
		{"PUT attrs", "PUT", "/orion-filter/orion-1/v2/entities/" + devTemp + "/attrs", alice, "application/json", string(body), 405, spring, "Request method 'PUT' not supported"},
		{"POST attrs of a stranger: the filter first", "POST", "/orion-filter/orion-1/v2/entities/" + devTemp + "/attrs", mallory, "application/json", string(body), 401, filter, MsgCredentialsNotValid},
		{"PATCH text/plain", "PATCH", "/orion-filter/orion-1/v2/entities/" + devTemp + "/attrs", alice, "text/plain", string(body), 415, spring, "Content type 'text/plain' not supported"},
		{"PATCH without content type", "PATCH", "/orion-filter/orion-1/v2/entities/" + devTemp + "/attrs", alice, "", string(body), 415, spring, "Content type 'application/octet-stream' not supported"},
		{"OPTIONS without auth", "OPTIONS", "/orion-filter/orion-1/v2/entities/" + devTemp + "/attrs", "", "", "", 204, none, ""},
		{"op/update without elementid", "POST", "/orion-filter/orion-1/v2/op/update", alice, "application/json", `{"actionType":"append","entities":[]}`, 401, filter, MsgMissingElementID},
		{"op/update with elementid", "POST", "/orion-filter/orion-1/v2/op/update?elementid=" + devTemp, alice, "application/json", `{"actionType":"append","entities":[]}`, 404, spring, "No message available"},
		{"entities list", "GET", "/orion-filter/orion-1/v2/entities?elementid=" + devTemp, alice, "", "", 404, spring, "No message available"},
		{"elementid differs from the path", "PATCH", "/orion-filter/orion-1/v2/entities/" + devTemp + "/attrs?elementid=" + devFree, alice, "application/json", string(body), 401, filter, MsgElementIDNotValid},
		{"elementid equals the path", "PATCH", "/orion-filter/orion-1/v2/entities/" + devTemp + "/attrs?elementid=" + devTemp, alice, "application/json", string(body), 204, none, ""},
		{"subscription of an owned entity", "POST", "/orion-filter/orion-1/v2/subscriptions", alice, "application/json", sub(devTemp), 201, none, ""},
		{"subscription as text/plain", "POST", "/orion-filter/orion-1/v2/subscriptions", alice, "text/plain", sub(devTemp), 415, spring, "Content type 'text/plain' not supported"},
		{"subscription GET: not routed", "GET", "/orion-filter/orion-1/v2/subscriptions?elementid=" + devTemp, alice, "", "", 405, spring, "Request method 'GET' not supported"},
		{"subscription of another's entity", "POST", "/orion-filter/orion-1/v2/subscriptions", mallory, "application/json", sub(devTemp), 401, filter, MsgCredentialsNotValid},
		{"subscription with idPattern", "POST", "/orion-filter/orion-1/v2/subscriptions", alice, "application/json", `{"subject":{"entities":[{"idPattern":".*"}]}}`, 401, filter, MsgIDPatternNotAllowed},
		{"subscription elementid not in body", "POST", "/orion-filter/orion-1/v2/subscriptions?elementid=" + devFree, alice, "application/json", sub(devTemp), 401, filter, MsgElementIDNotValid},
		{"unsubscribe of no such subscription", "DELETE", "/orion-filter/orion-1/v2/subscriptions/abc?elementid=" + devTemp, alice, "", "", 404, orion, ""},
		{"unsubscribe with an elementid the user may not read", "DELETE", "/orion-filter/orion-1/v2/subscriptions/abc?elementid=" + devTemp, mallory, "", "", 401, filter, MsgCredentialsNotValid},
		{"unsubscribe without elementid", "DELETE", "/orion-filter/orion-1/v2/subscriptions/abc", alice, "", "", 401, filter, MsgMissingElementID},
		{"v1 updateContext", "POST", "/orion-filter/orion-1/v1/updateContext?elementid=" + devTemp, alice, "application/json", `{}`, 501, orion, ""},
		{"v1 updateContext of a read delegate", "POST", "/orion-filter/orion-1/v1/updateContext?elementid=" + devTemp, "Bearer " + f.token(t, "reader", time.Hour), "application/json", `{}`, 401, filter, MsgCredentialsNotValid},
		{"v1 queryContext GET", "GET", "/orion-filter/orion-1/v1/queryContext?elementid=" + devTemp, alice, "", "", 405, spring, "Request method 'GET' not supported"},
		{"v3", "GET", "/orion-filter/orion-1/v3/entities?elementid=" + devTemp, alice, "", "", 401, filter, MsgRequestURLMalformed},
		{"another broker", "PATCH", "/orion-filter/orion-2/v2/entities/" + devTemp + "/attrs", alice, "application/json", string(body), 404, none, ""},
		{"test endpoint", "GET", "/orion-filter/orion-1/api/test", "", "", "", 200, none, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := http.Header{}
			if tt.auth != "" {
				h.Set("Authorization", tt.auth)
			}
			if tt.ctype != "" {
				h.Set("Content-Type", tt.ctype)
			}
			var b []byte
			if tt.body != "" {
				b = []byte(tt.body)
			}
			r := f.doHeaders(t, tt.method, f.sim.URL()+tt.path, h, b)
			if r.status != tt.status {
				t.Fatalf("status %d %s, want %d", r.status, r.body, tt.status)
			}
			switch tt.kind {
			case spring:
				if st, msg := springErr(t, r); st != tt.status || msg != tt.msg {
					t.Fatalf("Spring error %d %q, want %q", st, msg, tt.msg)
				}
			case filter:
				if m := r.message(t); m != tt.msg {
					t.Fatalf("message %q, want %q", m, tt.msg)
				}
			case orion:
				orionErr(t, r)
			}
		})
	}
}

// TestFilterTokenCut: the token is the Authorization header minus its
// first 7 characters, whatever they are, and only when the header is
// longer than 8.
func TestFilterTokenCut(t *testing.T) {
	f := newFixture(t)
	tok := f.token(t, "alice", time.Hour)
	body, _ := sealed(t, devTemp, k1, k2, 1, 20)
	tests := []struct {
		name, header string
		status       int
		msg          string
	}{
		{"Bearer", "Bearer " + tok, 204, ""},
		{"lower-case scheme", "bearer " + tok, 204, ""},
		{"any 7 characters", "Token: " + tok, 204, ""},
		{"two spaces", "Bearer  " + tok, 401, MsgAccessTokenNotValid},
		{"shorter scheme", "JWT " + tok, 401, MsgAccessTokenNotValid},
		{"8 characters: no token", "Bearer x", 401, MsgCredentialsNotValid},
		{"no header", "", 401, MsgCredentialsNotValid},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := http.Header{"Content-Type": {"application/json"}}
			if tt.header != "" {
				h.Set("Authorization", tt.header)
			}
			r := f.doHeaders(t, "PATCH", f.sim.BrokerURL()+"/v2/entities/"+devTemp+"/attrs", h, body)
			if r.status != tt.status {
				t.Fatalf("status %d %s, want %d", r.status, r.body, tt.status)
			}
			if tt.msg != "" && r.message(t) != tt.msg {
				t.Fatalf("message %s, want %q", r.body, tt.msg)
			}
		})
	}
	if strings.Contains(f.logs.String(), tok) {
		t.Fatal("the token was logged")
	}
}

// TestFilterCache: the filter caches positive and negative answers of both
// checks per element and user for FilterCacheTTL (spring.elapsingcache.minutes).
func TestFilterCache(t *testing.T) {
	var mu sync.Mutex
	now := time.Now()
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	advance := func(d time.Duration) { mu.Lock(); now = now.Add(d); mu.Unlock() }
	f := newFixture(t, func(o *Options) { o.Now = clock })
	patch := func(t *testing.T, user, id string) int {
		t.Helper()
		body := []byte(`{"latitude":{"type":"float","value":43.7}}`)
		return f.mustDo(t, "PATCH", f.sim.BrokerURL()+"/v2/entities/"+id+"/attrs", f.token(t, user, 24*time.Hour), body).status
	}

	// Negative: delegated a moment ago, refused until the entry elapses.
	if st := patch(t, "newbie", devTemp); st != 401 {
		t.Fatalf("newbie before the delegation: %d", st)
	}
	f.sim.SetDelegations([]Delegation{{Device: devTemp, User: "newbie", Kind: KindReadWrite}})
	if st := patch(t, "newbie", devTemp); st != 401 {
		t.Fatalf("newbie just delegated: %d, want the cached refusal", st)
	}
	advance(DefaultFilterCacheTTL - time.Second)
	if st := patch(t, "newbie", devTemp); st != 401 {
		t.Fatalf("newbie before the entry elapses: %d", st)
	}
	advance(2 * time.Second)
	if st := patch(t, "newbie", devTemp); st != 204 {
		t.Fatalf("newbie after the entry elapsed: %d", st)
	}

	// Positive: the delegation is revoked, still accepted until it elapses.
	f.sim.SetDelegations(nil)
	if st := patch(t, "newbie", devTemp); st != 204 {
		t.Fatalf("newbie just revoked: %d, want the cached grant", st)
	}
	advance(DefaultFilterCacheTTL + time.Second)
	if st := patch(t, "newbie", devTemp); st != 401 {
		t.Fatalf("newbie after revocation elapsed: %d", st)
	}

	// A device registered a moment ago: the owner's earlier refusal holds.
	const fresh = "urn:ngsi-ld:Device:fresh-1"
	if st := patch(t, "alice", fresh); st != 401 {
		t.Fatalf("before registration: %d", st)
	}
	f.sim.AddDevice(Device{ID: fresh, Type: devType, Owner: "alice"})
	if st := patch(t, "alice", fresh); st != 401 {
		t.Fatalf("just registered: %d, want the cached refusal", st)
	}
	// Per user: bob's first look is not cached, and the device is not his.
	if st := patch(t, "bob", fresh); st != 401 {
		t.Fatalf("bob: %d", st)
	}
	advance(DefaultFilterCacheTTL + time.Second)
	if st := patch(t, "alice", fresh); st != 204 {
		t.Fatalf("registered, cache elapsed: %d", st)
	}

	// Options.FilterCacheTTL and ClearFilterCache.
	g := newFixture(t, func(o *Options) { o.Now = clock; o.FilterCacheTTL = 10 * time.Second })
	gpatch := func(user string) int {
		return g.mustDo(t, "PATCH", g.sim.BrokerURL()+"/v2/entities/"+devTemp+"/attrs", g.token(t, user, 24*time.Hour), []byte(`{"latitude":{"value":1}}`)).status
	}
	if st := gpatch("late"); st != 401 {
		t.Fatalf("late: %d", st)
	}
	g.sim.SetDelegations([]Delegation{{Device: devTemp, User: "late", Kind: KindModify}})
	advance(11 * time.Second)
	if st := gpatch("late"); st != 204 {
		t.Fatalf("late after a 10 s cache: %d", st)
	}
	g.sim.SetDelegations(nil)
	g.sim.ClearFilterCache()
	if st := gpatch("late"); st != 401 {
		t.Fatalf("late after revocation and a cleared cache: %d", st)
	}
}

// TestFilterDelegationKinds: writes need READ_WRITE, WRITE_ONLY or
// MODIFY; reads any kind but WRITE_ONLY; a delegation to ANONYMOUS makes
// reads public.
func TestFilterDelegationKinds(t *testing.T) {
	f := newFixture(t, func(o *Options) {
		o.Delegations = append(o.Delegations, Delegation{Device: devFree, User: AnonymousUser, Kind: KindReadAccess})
	})
	get := func(user, id string) int {
		return f.mustDo(t, "GET", f.sim.BrokerURL()+"/v2/entities/"+id+"?type="+devType, f.token(t, user, time.Hour), nil).status
	}
	patch := func(user, id string) int {
		return f.mustDo(t, "PATCH", f.sim.BrokerURL()+"/v2/entities/"+id+"/attrs", f.token(t, user, time.Hour), []byte(`{"latitude":{"value":1}}`)).status
	}
	for _, tt := range []struct {
		user       string
		get, patch int
	}{
		{"alice", 200, 204}, {"reader", 200, 401}, {"writer", 200, 204}, {"wonly", 401, 204}, {"modifier", 200, 204}, {"mallory", 401, 401},
	} {
		if g, p := get(tt.user, devTemp), patch(tt.user, devTemp); g != tt.get || p != tt.patch {
			t.Errorf("%s: GET %d PATCH %d, want %d %d", tt.user, g, p, tt.get, tt.patch)
		}
	}
	if g, p := get("mallory", devFree), patch("mallory", devFree); g != 200 || p != 401 {
		t.Errorf("public device: GET %d PATCH %d, want 200 401", g, p)
	}
}

// TestFilterBackendFaults: a back-end 4xx is the filter's transient 401,
// a 5xx its 500; nothing is cached from a failed call. An Orion 4xx passes
// through the filter, an Orion 5xx becomes a 500.
func TestFilterBackendFaults(t *testing.T) {
	f := newFixture(t)
	patch := func(user string) response {
		return f.mustDo(t, "PATCH", f.sim.BrokerURL()+"/v2/entities/"+devTemp+"/attrs", f.token(t, user, time.Hour), []byte(`{"latitude":{"value":1}}`))
	}
	tests := []struct {
		name   string
		fault  Fault
		user   string
		status int
		msg    string
	}{
		{"ownership 4xx", Fault{Mode: FaultStatus, Target: TargetOwnership, Status: 403, Count: 1}, "alice", 401, MsgTroubleOwner},
		{"ownership 5xx", Fault{Mode: FaultStatus, Target: TargetOwnership, Status: 503, Count: 1}, "alice", 500, ""},
		{"delegation 4xx", Fault{Mode: FaultStatus, Target: TargetDelegation, Status: 404, Count: 1}, "writer", 401, MsgTroubleDelegation},
		{"delegation 5xx", Fault{Mode: FaultStatus, Target: TargetDelegation, Status: 500, Count: 1}, "writer", 500, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f.sim.ClearFilterCache()
			if err := f.sim.SetFaultChecked(tt.fault); err != nil {
				t.Fatal(err)
			}
			r := patch(tt.user)
			if r.status != tt.status {
				t.Fatalf("status %d %s, want %d", r.status, r.body, tt.status)
			}
			if tt.msg != "" && r.message(t) != tt.msg {
				t.Fatalf("message %s", r.body)
			}
			if tt.status == 500 {
				springErr(t, r)
			}
			// The failure was not cached: the next request passes.
			if r := patch(tt.user); r.status != 204 {
				t.Fatalf("after the fault: %d %s", r.status, r.body)
			}
		})
	}
	// Orion behind the filter.
	f.sim.SetFault(Fault{Mode: FaultStatus, Target: TargetOrion, Status: 503, Count: 1})
	if r := patch("alice"); r.status != 500 || string(r.body) != "503 Service Unavailable" {
		t.Fatalf("Orion 503 behind the filter: %d %q", r.status, r.body)
	}
	f.sim.SetFault(Fault{Mode: FaultStatus, Target: TargetOrion, Status: 429, Body: `{"error":"TooManyRequests"}`, Count: 1})
	if r := patch("alice"); r.status != 429 || !strings.Contains(string(r.body), "TooManyRequests") {
		t.Fatalf("Orion 429 behind the filter: %d %q", r.status, r.body)
	}
	// The bare Orion answers its fault as it is.
	f.sim.SetFault(Fault{Mode: FaultStatus, Target: TargetOrion, Status: 503, Count: 1})
	if r := f.directPatch(t, devTemp, "", nil, `{"latitude":{"value":1}}`); r.status != 503 {
		t.Fatalf("bare Orion fault: %d", r.status)
	}
	if r := f.directPatch(t, devTemp, "", nil, `{"latitude":{"value":1}}`); r.status != 204 {
		t.Fatalf("bare Orion after the fault: %d", r.status)
	}
	for _, bad := range []Fault{{Mode: FaultDown, Target: TargetOwnership}, {Mode: FaultSlow, Delay: time.Second, Target: TargetDelegation}} {
		if err := f.sim.SetFaultChecked(bad); err == nil {
			t.Errorf("SetFaultChecked(%+v): no error", bad)
		}
	}
}

// TestFilterTrustedIssuer: tokens of a third-party OpenID provider listed
// in TrustIssuers are accepted like the realm's (signature and exp), the
// user from preferred_username or else "username".
func TestFilterTrustedIssuer(t *testing.T) {
	priv, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	key, _ := jwk.FromRaw(priv)
	_ = key.Set(jwk.KeyIDKey, "op-key-1")
	_ = key.Set(jwk.AlgorithmKey, jwa.RS256)
	pub, _ := jwk.PublicKeyOf(key)
	set := jwk.NewSet()
	_ = set.AddKey(pub)
	jwks, _ := json.Marshal(set)
	op := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Write(jwks)
	}))
	t.Cleanup(op.Close)
	f := newFixture(t, func(o *Options) {
		o.TrustIssuers = []TrustedIssuer{{Issuer: "https://zitadel.test", JWKSURL: op.URL + "/oauth/v2/keys", HTTPClient: op.Client()}}
	})
	sign := func(claim, user string, ttl time.Duration, k jwk.Key) string {
		tok, _ := jwt.NewBuilder().Issuer("https://zitadel.test").Subject("123").Expiration(time.Now().Add(ttl)).Claim(claim, user).Build()
		b, err := jwt.Sign(tok, jwt.WithKey(jwa.RS256, k))
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	otherPriv, _ := rsa.GenerateKey(rand.Reader, 2048)
	other, _ := jwk.FromRaw(otherPriv)
	_ = other.Set(jwk.KeyIDKey, "op-key-1")
	tests := []struct {
		name, token string
		status      int
	}{
		{"preferred_username", sign("preferred_username", "alice", time.Hour, key), 204},
		{"username", sign("username", "alice", time.Hour, key), 204},
		{"another user", sign("preferred_username", "mallory", time.Hour, key), 401},
		{"expired", sign("preferred_username", "alice", -time.Minute, key), 401},
		{"same kid, other key", sign("preferred_username", "alice", time.Hour, other), 401},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := f.mustDo(t, "PATCH", f.sim.BrokerURL()+"/v2/entities/"+devTemp+"/attrs", tt.token, []byte(`{"latitude":{"value":1}}`))
			if r.status != tt.status {
				t.Fatalf("status %d %s, want %d", r.status, r.body, tt.status)
			}
		})
	}
	if _, err := New(Options{TrustIssuers: []TrustedIssuer{{Issuer: "x"}}}); err == nil {
		t.Fatal("a trusted issuer without keys was accepted")
	}
}
