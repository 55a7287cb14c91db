package centralsim

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/oauth2"
	"golang.org/x/oauth2/clientcredentials"

	"github.com/edgegate/edgegate/internal/envelope"
	"github.com/edgegate/edgegate/internal/testkit"
)

const (
	devTemp   = "urn:ngsi-ld:Device:temp-1"
	devFree   = "urn:ngsi-ld:Device:free-1" // no model attributes, no keys
	devType   = "Thermometer"
	k1, k2    = "k1-secret-aaaa", "k2-secret-bbbb"
	gwSecret  = "gw-client-secret-zzzz"
	offSecret = "offline-client-secret-yyyy"
)

type syncBuffer = testkit.Buffer

type fixture struct {
	sim  *Server
	http *http.Client
	logs *syncBuffer
}

func testOptions(logs io.Writer) Options {
	return Options{
		Clients: []Client{
			{ID: "gw-1", Secret: gwSecret, Username: "alice"},
			{ID: "gw-off", Secret: offSecret, Username: "alice", Offline: true},
		},
		Devices: []Device{
			{ID: devTemp, Type: devType, Owner: "alice", K1: k1, K2: k2, Attrs: []string{"temperature", "humidity"}},
			{ID: devFree, Type: devType, Owner: "alice"},
		},
		Delegations: []Delegation{
			{Device: devTemp, User: "reader", Kind: KindReadAccess},
			{Device: devTemp, User: "writer", Kind: KindReadWrite},
			{Device: devTemp, User: "wonly", Kind: KindWriteOnly},
			{Device: devTemp, User: "modifier", Kind: KindModify},
		},
		Logger: slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
}

func newFixture(t *testing.T, mutate ...func(*Options)) *fixture {
	t.Helper()
	logs := &syncBuffer{}
	opts := testOptions(logs)
	for _, m := range mutate {
		m(&opts)
	}
	sim, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	if err := sim.Start("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: sim.CAPool()}, ForceAttemptHTTP2: true}
	f := &fixture{sim: sim, http: &http.Client{Transport: tr, Timeout: 10 * time.Second}, logs: logs}
	t.Cleanup(func() {
		tr.CloseIdleConnections()
		if err := sim.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		for _, secret := range []string{gwSecret, offSecret, k1, k2, sim.AdminToken()} {
			if strings.Contains(logs.String(), secret) {
				t.Errorf("logs contain a secret %q", secret)
			}
		}
	})
	return f
}

func (f *fixture) token(t *testing.T, user string, ttl time.Duration) string {
	t.Helper()
	tok, err := f.sim.IssueAccessToken(user, ttl)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

type response struct {
	status int
	header http.Header
	body   []byte
}

func (r response) message(t *testing.T) string {
	t.Helper()
	var m struct {
		Result  *bool  `json:"result"`
		Message string `json:"message"`
	}
	if err := json.Unmarshal(r.body, &m); err != nil || m.Result == nil || *m.Result {
		t.Fatalf("body %s is not a filter refusal", r.body)
	}
	return m.Message
}

func (f *fixture) do(t *testing.T, method, rawURL, bearer string, body []byte) (response, error) {
	t.Helper()
	req, err := http.NewRequest(method, rawURL, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if bearer != "" {
		req.Header.Set("Authorization", "Bearer "+bearer)
	}
	resp, err := f.http.Do(req)
	if err != nil {
		return response{}, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return response{status: resp.StatusCode, header: resp.Header, body: b}, err
}

func (f *fixture) mustDo(t *testing.T, method, rawURL, bearer string, body []byte) response {
	t.Helper()
	r, err := f.do(t, method, rawURL, bearer, body)
	if err != nil {
		t.Fatalf("%s %s: %v", method, rawURL, err)
	}
	return r
}

func (f *fixture) patchURL(id string, extra url.Values) string {
	q := url.Values{"elementid": {id}, "type": {devType}}
	for k, v := range extra {
		q[k] = v
	}
	return f.sim.BrokerURL() + "/v2/entities/" + url.PathEscape(id) + "/attrs?" + q.Encode()
}

func (f *fixture) getURL(id string) string {
	return f.sim.BrokerURL() + "/v2/entities/" + url.PathEscape(id) + "?" + url.Values{"elementid": {id}, "type": {devType}}.Encode()
}

// sealed builds a signed NGSI body for device id with the given keys, in
// the form the gateway writes through the filter (signedBody).
func sealed(t *testing.T, id, key1, key2 string, seq uint64, temp float64) ([]byte, envelope.Claims) {
	t.Helper()
	key, err := envelope.DeriveHS256(id, key1, key2)
	if err != nil {
		t.Fatal(err)
	}
	c := envelope.Claims{
		Version: envelope.Version, Gateway: "gw-test", Device: id, Seq: seq,
		Time:  time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC),
		Attrs: map[string]envelope.Attr{"temperature": {Type: "Number", Value: temp}},
	}
	compact, err := envelope.Seal(key, c)
	if err != nil {
		t.Fatal(err)
	}
	return signedBody(t, c, compact), c
}

func TestDiscoveryJWKSAndClientCredentials(t *testing.T) {
	f := newFixture(t)
	r := f.mustDo(t, "GET", f.sim.Issuer()+"/.well-known/openid-configuration", "", nil)
	if r.status != 200 {
		t.Fatalf("discovery status %d", r.status)
	}
	var disc struct {
		Issuer        string   `json:"issuer"`
		TokenEndpoint string   `json:"token_endpoint"`
		JWKSURI       string   `json:"jwks_uri"`
		Grants        []string `json:"grant_types_supported"`
	}
	if err := json.Unmarshal(r.body, &disc); err != nil {
		t.Fatal(err)
	}
	if disc.Issuer != f.sim.URL()+"/auth/realms/master" || disc.TokenEndpoint != f.sim.TokenURL() {
		t.Fatalf("discovery = %+v", disc)
	}
	for _, g := range []string{"client_credentials", "refresh_token"} {
		if !strings.Contains(strings.Join(disc.Grants, " "), g) {
			t.Errorf("grant_types_supported %v lacks %s", disc.Grants, g)
		}
	}

	ctx := context.WithValue(context.Background(), oauth2.HTTPClient, f.http)
	for _, style := range []oauth2.AuthStyle{oauth2.AuthStyleInHeader, oauth2.AuthStyleInParams} {
		cc := clientcredentials.Config{ClientID: "gw-1", ClientSecret: gwSecret, TokenURL: disc.TokenEndpoint, AuthStyle: style}
		tok, err := cc.Token(ctx)
		if err != nil {
			t.Fatalf("auth style %v: %v", style, err)
		}
		if tok.RefreshToken != "" {
			t.Errorf("non-offline client got a refresh token")
		}
		claims := verifyWithJWKS(t, f, disc.JWKSURI, tok.AccessToken)
		want := map[string]any{"iss": disc.Issuer, "azp": "gw-1", "preferred_username": "alice"}
		for k, v := range want {
			if claims[k] != v {
				t.Errorf("claim %s = %v, want %v", k, claims[k], v)
			}
		}
		if aud, _ := claims["aud"].([]any); len(aud) != 1 || aud[0] != "edgegate" {
			if claims["aud"] != "edgegate" {
				t.Errorf("aud = %v, want edgegate", claims["aud"])
			}
		}
		exp, _ := claims["exp"].(float64)
		iat, _ := claims["iat"].(float64)
		if exp-iat != DefaultTokenTTL.Seconds() || claims["jti"] == "" || claims["sub"] == "" {
			t.Errorf("exp-iat = %v, jti %v, sub %v", exp-iat, claims["jti"], claims["sub"])
		}
		// The token opens the broker.
		body, _ := sealed(t, devTemp, k1, k2, 1, 20)
		if r := f.mustDo(t, "PATCH", f.patchURL(devTemp, nil), tok.AccessToken, body); r.status != 204 {
			t.Fatalf("PATCH with a fresh token: %d %s", r.status, r.body)
		}
	}

	tests := []struct {
		name, id, secret string
		style            oauth2.AuthStyle
	}{
		{"wrong secret basic", "gw-1", "nope", oauth2.AuthStyleInHeader},
		{"wrong secret form", "gw-1", "nope", oauth2.AuthStyleInParams},
		{"unknown client", "ghost", gwSecret, oauth2.AuthStyleInHeader},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cc := clientcredentials.Config{ClientID: tt.id, ClientSecret: tt.secret, TokenURL: f.sim.TokenURL(), AuthStyle: tt.style}
			_, err := cc.Token(ctx)
			var re *oauth2.RetrieveError
			if !errors.As(err, &re) || re.Response.StatusCode != 401 || re.ErrorCode != "invalid_client" {
				t.Fatalf("Token() err = %v, want 401 invalid_client", err)
			}
		})
	}
	form := url.Values{"grant_type": {"password"}, "client_id": {"gw-1"}, "client_secret": {gwSecret}}
	resp, err := f.http.PostForm(f.sim.TokenURL(), form)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	// Direct access grants need a user with a password (Options.Users).
	if resp.StatusCode != 401 || !strings.Contains(string(b), `"invalid_grant"`) {
		t.Fatalf("password grant without user credentials: %d %s", resp.StatusCode, b)
	}
	form.Set("grant_type", "implicit")
	resp, err = f.http.PostForm(f.sim.TokenURL(), form)
	if err != nil {
		t.Fatal(err)
	}
	b, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 400 || !strings.Contains(string(b), `"unsupported_grant_type"`) {
		t.Fatalf("implicit grant: %d %s", resp.StatusCode, b)
	}
}

func TestRefreshToken(t *testing.T) {
	f := newFixture(t)
	post := func(form url.Values) (int, map[string]any) {
		resp, err := f.http.PostForm(f.sim.TokenURL(), form)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var m map[string]any
		if err := json.NewDecoder(resp.Body).Decode(&m); err != nil {
			t.Fatal(err)
		}
		return resp.StatusCode, m
	}
	st, m := post(url.Values{"grant_type": {"client_credentials"}, "client_id": {"gw-off"}, "client_secret": {offSecret}})
	rt, _ := m["refresh_token"].(string)
	if st != 200 || rt == "" {
		t.Fatalf("offline client_credentials: %d %v", st, m)
	}
	st, m = post(url.Values{"grant_type": {"refresh_token"}, "refresh_token": {rt}, "client_id": {"gw-off"}, "client_secret": {offSecret}})
	if st != 200 || m["access_token"] == nil || m["refresh_token"] == nil {
		t.Fatalf("refresh: %d %v", st, m)
	}
	st, m = post(url.Values{"grant_type": {"refresh_token"}, "refresh_token": {rt}, "client_id": {"gw-1"}, "client_secret": {gwSecret}})
	if st != 400 || m["error"] != "invalid_grant" {
		t.Fatalf("refresh by another client: %d %v", st, m)
	}
	st, m = post(url.Values{"grant_type": {"refresh_token"}, "refresh_token": {"made-up"}, "client_id": {"gw-off"}, "client_secret": {offSecret}})
	if st != 400 || m["error"] != "invalid_grant" {
		t.Fatalf("unknown refresh token: %d %v", st, m)
	}
	f.sim.RevokeRefreshTokens("gw-off")
	st, m = post(url.Values{"grant_type": {"refresh_token"}, "refresh_token": {rt}, "client_id": {"gw-off"}, "client_secret": {offSecret}})
	if st != 400 || m["error"] != "invalid_grant" {
		t.Fatalf("revoked refresh token: %d %v", st, m)
	}
}

func TestRefreshTokenExpires(t *testing.T) {
	var mu sync.Mutex
	now := time.Now()
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	f := newFixture(t, func(o *Options) { o.Now = clock; o.RefreshTTL = time.Hour })
	ctx := context.WithValue(context.Background(), oauth2.HTTPClient, f.http)
	cc := clientcredentials.Config{ClientID: "gw-off", ClientSecret: offSecret, TokenURL: f.sim.TokenURL()}
	tok, err := cc.Token(ctx)
	if err != nil || tok.RefreshToken == "" {
		t.Fatalf("Token() = %v, %v", tok, err)
	}
	mu.Lock()
	now = now.Add(2 * time.Hour)
	mu.Unlock()
	// The access token has expired too: the filter says so.
	body, _ := sealed(t, devTemp, k1, k2, 1, 20)
	if r := f.mustDo(t, "PATCH", f.patchURL(devTemp, nil), tok.AccessToken, body); r.status != 401 || r.message(t) != MsgAccessTokenNotValid {
		t.Fatalf("PATCH with an expired token: %d %s", r.status, r.body)
	}
	resp, err := f.http.PostForm(f.sim.TokenURL(), url.Values{"grant_type": {"refresh_token"}, "refresh_token": {tok.RefreshToken}, "client_id": {"gw-off"}, "client_secret": {offSecret}})
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 400 {
		t.Fatalf("expired refresh token: status %d, want 400", resp.StatusCode)
	}
}

func TestPatchAuthorization(t *testing.T) {
	f := newFixture(t)
	other, err := New(Options{})
	if err != nil {
		t.Fatal(err)
	}
	foreign, err := other.IssueAccessToken("alice", time.Minute) // signed by another key, other issuer
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		bearer  string
		url     string
		status  int
		message string
	}{
		{"owner", f.token(t, "alice", time.Minute), f.patchURL(devTemp, nil), 204, ""},
		{"READ_WRITE delegate", f.token(t, "writer", time.Minute), f.patchURL(devTemp, nil), 204, ""},
		{"WRITE_ONLY delegate", f.token(t, "wonly", time.Minute), f.patchURL(devTemp, nil), 204, ""},
		{"MODIFY delegate", f.token(t, "modifier", time.Minute), f.patchURL(devTemp, nil), 204, ""},
		{"READ_ACCESS delegate", f.token(t, "reader", time.Minute), f.patchURL(devTemp, nil), 401, MsgCredentialsNotValid},
		{"stranger", f.token(t, "mallory", time.Minute), f.patchURL(devTemp, nil), 401, MsgCredentialsNotValid},
		{"expired token", f.token(t, "alice", -time.Second), f.patchURL(devTemp, nil), 401, MsgAccessTokenNotValid},
		// No Authorization header and k1/k2 off (the deploy): refused.
		{"no token", "", f.patchURL(devTemp, nil), 401, MsgCredentialsNotValid},
		{"garbage token", "not.a.jwt", f.patchURL(devTemp, nil), 401, MsgAccessTokenNotValid},
		{"foreign token", foreign, f.patchURL(devTemp, nil), 401, MsgAccessTokenNotValid},
		// The element id comes from the path; elementid is optional.
		{"no elementid", f.token(t, "alice", time.Minute), f.sim.BrokerURL() + "/v2/entities/" + devTemp + "/attrs", 204, ""},
		{"elementid of another entity", f.token(t, "alice", time.Minute), f.patchURL(devTemp, url.Values{"elementid": {devFree}}), 401, MsgElementIDNotValid},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			body, _ := sealed(t, devTemp, k1, k2, uint64(i+1), 20)
			r := f.mustDo(t, "PATCH", tt.url, tt.bearer, body)
			if r.status != tt.status {
				t.Fatalf("status = %d (%s), want %d", r.status, r.body, tt.status)
			}
			if tt.message != "" {
				if got := r.message(t); got != tt.message {
					t.Fatalf("message = %q, want %q", got, tt.message)
				}
			}
		})
	}
	var refused, accepted int
	for _, rf := range f.sim.Refusals() {
		if rf.Status == 401 && !rf.Fault {
			refused++
		}
		if strings.Contains(rf.Path, "k1") || rf.Message == "" {
			t.Errorf("refusal %+v", rf)
		}
	}
	accepted = len(f.sim.Updates())
	if refused != 7 || accepted != 5 {
		t.Fatalf("refusals %d, updates %d; want 7 and 5", refused, accepted)
	}
	if u := f.sim.Updates()[1]; u.User != "writer" || u.Device != devTemp {
		t.Fatalf("update = %+v", u)
	}
}

func TestGetEntity(t *testing.T) {
	f := newFixture(t)
	body, _ := sealed(t, devTemp, k1, k2, 1, 21.5)
	if r := f.mustDo(t, "PATCH", f.patchURL(devTemp, nil), f.token(t, "alice", time.Minute), body); r.status != 204 {
		t.Fatalf("PATCH: %d %s", r.status, r.body)
	}
	tests := []struct {
		user   string
		status int
	}{
		{"alice", 200}, {"reader", 200}, {"writer", 200}, {"modifier", 200}, {"wonly", 401}, {"mallory", 401},
	}
	for _, tt := range tests {
		t.Run(tt.user, func(t *testing.T) {
			r := f.mustDo(t, "GET", f.getURL(devTemp), f.token(t, tt.user, time.Minute), nil)
			if r.status != tt.status {
				t.Fatalf("GET as %s: %d %s, want %d", tt.user, r.status, r.body, tt.status)
			}
			if tt.status != 200 {
				if m := r.message(t); m != MsgCredentialsNotValid {
					t.Fatalf("message %q", m)
				}
				return
			}
			var e map[string]json.RawMessage
			if err := json.Unmarshal(r.body, &e); err != nil {
				t.Fatal(err)
			}
			if string(e["id"]) != `"`+devTemp+`"` || string(e["type"]) != `"`+devType+`"` {
				t.Fatalf("entity %s", r.body)
			}
			var temp struct {
				Type     string                     `json:"type"`
				Value    float64                    `json:"value"`
				Metadata map[string]json.RawMessage `json:"metadata"`
			}
			if err := json.Unmarshal(e["temperature"], &temp); err != nil || temp.Type != "Number" || temp.Value != 21.5 || temp.Metadata["TimeInstant"] == nil {
				t.Fatalf("temperature = %s (%v)", e["temperature"], err)
			}
			if _, ok := e["humidity"]; !ok {
				t.Fatal("model attribute humidity missing from the entity")
			}
			// What the broker returns still verifies end to end.
			if v := readBackVerdict(t, f, r.body, devTemp); v.verdict != VerdictValid {
				t.Fatalf("entity read back: %s (%s)", v.verdict, v.detail)
			}
		})
	}
	if r := f.mustDo(t, "GET", f.sim.BrokerURL()+"/v2/entities/"+devTemp+"?elementid="+devTemp+"&type=Other", f.token(t, "alice", time.Minute), nil); r.status != 404 || orionErr(t, r).Description != orionNotFoundDesc {
		t.Fatalf("GET wrong type: %d %s", r.status, r.body)
	}
	// type is a required parameter of the filter's GET mapping.
	r := f.mustDo(t, "GET", f.sim.BrokerURL()+"/v2/entities/"+devTemp, f.token(t, "alice", time.Minute), nil)
	if st, msg := springErr(t, r); r.status != 400 || st != 400 || msg != "Required String parameter 'type' is not present" {
		t.Fatalf("GET without type: %d %s", r.status, r.body)
	}
}

// TestK1K2Auth: without an Authorization header, k1/k2 are used only
// where the deploy enables them (spring.auth.k1k2.enabled); with a header
// they are never consulted.
func TestK1K2Auth(t *testing.T) {
	f := newFixture(t, func(o *Options) { o.K1K2Auth = true })
	tok := f.token(t, "alice", time.Minute)
	tests := []struct {
		name   string
		bearer string
		q      url.Values
		status int
		msg    string
	}{
		{"right keys, no token", "", url.Values{"k1": {k1}, "k2": {k2}}, 204, ""},
		{"wrong k2, no token", "", url.Values{"k1": {k1}, "k2": {"nope-nope-nope"}}, 401, MsgOwnerCredsNotValid},
		{"keys shorter than 10", "", url.Values{"k1": {"short"}, "k2": {"short"}}, 401, MsgCredentialsNotValid},
		{"no keys, no token", "", nil, 401, MsgCredentialsNotValid},
		{"token and wrong keys: keys ignored", tok, url.Values{"k1": {"wrong-wrong-wrong"}, "k2": {"wrong-wrong-wrong"}}, 204, ""},
		{"stranger's token and right keys: keys ignored", f.token(t, "mallory", time.Minute), url.Values{"k1": {k1}, "k2": {k2}}, 401, MsgCredentialsNotValid},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			body, _ := sealed(t, devTemp, k1, k2, uint64(i+1), 20)
			r := f.mustDo(t, "PATCH", f.patchURL(devTemp, tt.q), tt.bearer, body)
			if r.status != tt.status {
				t.Fatalf("status %d (%s), want %d", r.status, r.body, tt.status)
			}
			if tt.msg != "" && r.message(t) != tt.msg {
				t.Fatalf("message %s, want %q", r.body, tt.msg)
			}
		})
	}
	// Off (the default): k1/k2 alone are refused.
	off := newFixture(t)
	body, _ := sealed(t, devTemp, k1, k2, 1, 20)
	if r := off.mustDo(t, "PATCH", off.patchURL(devTemp, url.Values{"k1": {k1}, "k2": {k2}}), "", body); r.status != 401 || r.message(t) != MsgCredentialsNotValid {
		t.Fatalf("k1/k2 with K1K2Auth off: %d %s", r.status, r.body)
	}
}

func TestOrionErrors(t *testing.T) {
	var mu sync.Mutex
	now := time.Now()
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	f := newFixture(t, func(o *Options) { o.Now = clock })
	tok := f.token(t, "alice", time.Hour)
	good, _ := sealed(t, devTemp, k1, k2, 1, 20)
	tests := []struct {
		name   string
		url    string
		body   string
		status int
		code   string
		desc   string
	}{
		{"invalid JSON", f.patchURL(devTemp, nil), `{"temperature":`, 400, "ParseError", orionParseErrorDesc},
		{"not an object", f.patchURL(devTemp, nil), `[1,2]`, 400, "ParseError", orionParseErrorDesc},
		{"attribute not an object", f.patchURL(devTemp, nil), `{"temperature":20}`, 400, "BadRequest", "attribute must be a JSON object, unless keyValues option is used"},
		// The filter forwards the PATCH without its query: a wrong type
		// never reaches Orion, and the missing attribute is named with the
		// id alone.
		{"attribute outside the model", f.patchURL(devTemp, url.Values{"type": {"Other"}}), `{"pressure":{"type":"Number","value":1},"temperature":{"type":"Number","value":2}}`,
			422, "PartialUpdate", "do not exist: " + devTemp + " - [ pressure ]"},
		{"no attribute exists", f.patchURL(devFree, nil), `{"pressure":{"type":"Number","value":1},"wind":{"type":"Number","value":1}}`,
			422, "Unprocessable", "do not exist: " + devFree + " - [ pressure, wind ]"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := f.mustDo(t, "PATCH", tt.url, tok, []byte(tt.body))
			oe := orionErr(t, r)
			if r.status != tt.status || oe.Error != tt.code || (tt.desc != "" && oe.Description != tt.desc) {
				t.Fatalf("got %d %+v, want %d %s %q", r.status, oe, tt.status, tt.code, tt.desc)
			}
		})
	}
	// The partial update WAS applied.
	if e, _ := f.sim.Entity(devTemp); e["temperature"].(map[string]any)["value"] != 2.0 || e["pressure"] != nil {
		t.Fatalf("after PartialUpdate: %v", e)
	}
	if n := len(f.sim.Updates()); n != 1 {
		t.Fatalf("%d updates recorded, want 1 (the applied part of the 422)", n)
	}
	// Owned, but the entity is gone from the broker: Orion's 404.
	f.sim.RemoveEntity(devTemp)
	r := f.mustDo(t, "PATCH", f.patchURL(devTemp, nil), tok, good)
	if r.status != 404 || orionErr(t, r).Description != orionNotFoundDesc {
		t.Fatalf("removed entity: %d %s", r.status, r.body)
	}
	// Unregistered: the filter's cached ownership still lets the request
	// through to Orion until the cache elapses; then the filter refuses.
	f.sim.RemoveDevice(devFree)
	body := []byte(`{"latitude":{"type":"float","value":1}}`)
	if r := f.mustDo(t, "PATCH", f.patchURL(devFree, nil), tok, body); r.status != 404 {
		t.Fatalf("removed device, cached ownership: %d %s", r.status, r.body)
	}
	mu.Lock()
	now = now.Add(DefaultFilterCacheTTL + time.Second)
	mu.Unlock()
	r = f.mustDo(t, "PATCH", f.patchURL(devFree, nil), tok, body)
	if r.status != 401 || r.message(t) != MsgCredentialsNotValid {
		t.Fatalf("removed device after the cache elapsed: %d %s", r.status, r.body)
	}
}

func TestSignatureVerdicts(t *testing.T) {
	f := newFixture(t)
	tok := f.token(t, "alice", time.Minute)

	valid, _ := sealed(t, devTemp, k1, k2, 7, 20)
	wrongKey, _ := sealed(t, devTemp, k1, "another-k2", 8, 20)
	otherDevice, _ := sealed(t, devFree, k1, k2, 9, 20) // devFree's reading, devTemp's keys do not derive its key
	tampered := bytes.Replace(valid, []byte(`"value":20`), []byte(`"value":99`), 1)
	if bytes.Equal(tampered, valid) {
		t.Fatalf("could not tamper with %s", valid)
	}
	// An attribute added beside the signed one, without a signature.
	var m map[string]json.RawMessage
	_ = json.Unmarshal(valid, &m)
	m["humidity"] = json.RawMessage(`{"type":"Number","value":50}`)
	smuggled, _ := json.Marshal(m)
	// The former form: the signature as its own attribute, which the
	// entity lacks (422 PartialUpdate), the rest applied and verified.
	key, _ := envelope.DeriveHS256(devTemp, k1, k2)
	c := envelope.Claims{Version: envelope.Version, Gateway: "gw-test", Device: devTemp, Seq: 10, Time: time.Now().UTC(),
		Attrs: map[string]envelope.Attr{"temperature": {Type: "Number", Value: 23.0}}}
	compact, _ := envelope.Seal(key, c)
	legacy := []byte(`{"temperature":{"type":"Number","value":23},"signature":{"type":"string","value":"` + compact + `"}}`)
	tests := []struct {
		name    string
		body    []byte
		status  int
		verdict string
		seq     uint64
	}{
		{"valid", valid, 204, VerdictValid, 7},
		{"replayed", valid, 204, VerdictValid, 7},
		{"tampered", tampered, 204, VerdictTampered, 0},
		{"wrong key", wrongKey, 204, VerdictWrongKey, 0},
		{"other device's key", otherDevice, 204, VerdictWrongKey, 0},
		{"unsigned", []byte(`{"temperature":{"type":"Number","value":1}}`), 204, VerdictUnsigned, 0},
		{"malformed", []byte(`{"temperature":{"type":"Number","value":1,"metadata":{"signature":{"type":"string","value":"abc"}}}}`), 204, VerdictMalformed, 0},
		{"unsigned attribute beside signed ones", smuggled, 204, VerdictTampered, 0},
		{"signature attribute (former form)", legacy, 422, VerdictValid, 10},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if r := f.mustDo(t, "PATCH", f.patchURL(devTemp, nil), tok, tt.body); r.status != tt.status {
				t.Fatalf("status %d %s, want %d", r.status, r.body, tt.status)
			}
			ups := f.sim.Updates()
			if len(ups) != i+1 {
				t.Fatalf("%d updates, want %d", len(ups), i+1)
			}
			u := ups[i]
			if u.Verdict != tt.verdict || u.Seq != tt.seq || u.User != "alice" {
				t.Fatalf("update = %+v, want verdict %q seq %d", u, tt.verdict, tt.seq)
			}
			if tt.seq != 0 && (u.Gateway != "gw-test" || u.KeyID != key.ID()) {
				t.Fatalf("gateway = %q, kid %q", u.Gateway, u.KeyID)
			}
			if tt.name == "replayed" != u.Duplicate {
				t.Fatalf("duplicate = %v", u.Duplicate)
			}
			if !bytes.Contains(u.Attrs["temperature"], []byte(`"value"`)) {
				t.Fatalf("attrs as received: %v", u.Attrs)
			}
			if _, ok := u.Attrs["signature"]; ok {
				t.Fatalf("attribute that was not applied recorded: %v", u.Attrs)
			}
		})
	}
	sum := f.sim.Summary()
	if got := sum.Devices[devTemp]; got[VerdictValid] != 3 || got[VerdictWrongKey] != 2 || got[VerdictTampered] != 2 {
		t.Fatalf("summary %+v", sum)
	}
}

func TestCustomSignatureAttr(t *testing.T) {
	f := newFixture(t, func(o *Options) { o.SignatureAttr = "edgegateSig" })
	key, _ := envelope.DeriveHS256(devFree, "a", "b")
	f.sim.AddDevice(Device{ID: devFree, Type: devType, Owner: "alice", K1: "a", K2: "b", Attrs: []string{"t"}})
	c := envelope.Claims{Version: envelope.Version, Gateway: "g", Device: devFree, Seq: 1, Time: time.Now().UTC(), Attrs: map[string]envelope.Attr{"t": {Type: "Number", Value: 1.0}}}
	compact, _ := envelope.Seal(key, c)
	body := signedBodyAs(t, c, compact, "edgegateSig")
	if r := f.mustDo(t, "PATCH", f.patchURL(devFree, nil), f.token(t, "alice", time.Minute), body); r.status != 204 {
		t.Fatalf("%d %s", r.status, r.body)
	}
	if u := f.sim.Updates()[0]; u.Verdict != VerdictValid {
		t.Fatalf("verdict %q (%s)", u.Verdict, u.Detail)
	}
}

func TestNewRejectsBadOptions(t *testing.T) {
	tests := []struct {
		name string
		opts Options
		want string
	}{
		{"client without secret", Options{Clients: []Client{{ID: "a", Username: "u"}}}, "clients[0].secret"},
		{"duplicate device", Options{Devices: []Device{{ID: "d", Type: "T", Owner: "o"}, {ID: "d", Type: "T", Owner: "o"}}}, "devices[1].id"},
		{"half keys", Options{Devices: []Device{{ID: "d", Type: "T", Owner: "o", K1: "x"}}}, "k1 and k2"},
		{"bad kind", Options{Delegations: []Delegation{{Device: "d", User: "u", Kind: "READ"}}}, "delegations[0]: kind"},
		{"bad realm", Options{Realm: "a/b"}, "realm"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := New(tt.opts)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("New() err = %v, want mention of %q", err, tt.want)
			}
		})
	}
}
