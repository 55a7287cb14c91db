package centralsync

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
)

// discoveryServer serves a discovery document whose issuer and endpoints
// doc fills from the server's own URL.
func discoveryServer(t *testing.T, doc func(base string) map[string]any) *httptest.Server {
	t.Helper()
	var srv *httptest.Server
	srv = httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/realms/master/.well-known/openid-configuration" {
			http.NotFound(w, r)
			return
		}
		json.NewEncoder(w).Encode(doc(srv.URL))
	}))
	t.Cleanup(srv.Close)
	return srv
}

func TestDiscoverIssuerMustMatch(t *testing.T) {
	good := func(base string) map[string]any {
		iss := base + "/realms/master"
		return map[string]any{"issuer": iss, "token_endpoint": iss + "/token", "device_authorization_endpoint": iss + "/device",
			"revocation_endpoint": iss + "/revoke", "userinfo_endpoint": iss + "/userinfo", "jwks_uri": iss + "/certs"}
	}
	srv := discoveryServer(t, good)
	d, err := Discover(context.Background(), srv.Client(), srv.URL+"/realms/master")
	if err != nil || d.Issuer != srv.URL+"/realms/master" || d.UserinfoEndpoint != d.Issuer+"/userinfo" {
		t.Fatalf("Discover = %+v, %v", d, err)
	}

	// A document that names another issuer (§4.3), even one that differs
	// only by a trailing slash, is refused, naming both.
	other := discoveryServer(t, func(base string) map[string]any {
		m := good(base)
		m["issuer"] = "https://evil.example.org/realms/master"
		return m
	})
	_, err = Discover(context.Background(), other.Client(), other.URL+"/realms/master")
	if err == nil || !strings.Contains(err.Error(), `names issuer "https://evil.example.org/realms/master"`) ||
		!strings.Contains(err.Error(), `configured issuer is "`+other.URL+`/realms/master"`) {
		t.Errorf("other issuer: %v", err)
	}
	slash := discoveryServer(t, func(base string) map[string]any {
		m := good(base)
		m["issuer"] = base + "/realms/master/"
		return m
	})
	if _, err := Discover(context.Background(), slash.Client(), slash.URL+"/realms/master"); err == nil || !strings.Contains(err.Error(), "must be equal") {
		t.Errorf("trailing slash: %v", err)
	}

	// An endpoint on plain http outside loopback is refused, naming it.
	insecure := discoveryServer(t, func(base string) map[string]any {
		m := good(base)
		m["revocation_endpoint"] = "http://sso.example.org/revoke"
		return m
	})
	if _, err := Discover(context.Background(), insecure.Client(), insecure.URL+"/realms/master"); err == nil || !strings.Contains(err.Error(), "revocation_endpoint") {
		t.Errorf("http endpoint: %v", err)
	}
	// A plain http issuer outside loopback is refused before any request.
	if _, err := Discover(context.Background(), nil, "http://sso.example.org/realms/master"); err == nil || !strings.Contains(err.Error(), "not https") {
		t.Errorf("http issuer: %v", err)
	}
	// 404: says where it looked.
	if _, err := Discover(context.Background(), srv.Client(), srv.URL+"/realms/other"); err == nil || !strings.Contains(err.Error(), "no OIDC discovery document") {
		t.Errorf("404: %v", err)
	}
}

func TestSecureURL(t *testing.T) {
	for raw, ok := range map[string]bool{
		"https://www.snap4city.org/auth/realms/master": true,
		"http://127.0.0.1:8080/realms/master":          true,
		"http://127.8.9.10/x":                          true,
		"http://[::1]:80/x":                            true,
		"http://localhost:9000":                        true,
		"http://www.snap4city.org/auth":                false,
		"http://127.0.0.1.example.org/":                false,
		"https://user:pw@sso.example.org/":             false,
		"ftp://sso.example.org/":                       false,
		"/auth/realms/master":                          false,
	} {
		if err := SecureURL(raw); (err == nil) != ok {
			t.Errorf("SecureURL(%q) = %v, want ok %v", raw, err, ok)
		}
	}
}

func TestChooseClientAuth(t *testing.T) {
	keycloak := &Discovery{Issuer: "https://sso", TokenAuthMethods: []string{"private_key_jwt", "client_secret_basic", "client_secret_post", "tls_client_auth", "client_secret_jwt"},
		TokenAuthSigningAlgs: []string{"PS384", "ES384", "RS384", "HS256", "ES256", "RS256", "EdDSA"}}
	postOnly := &Discovery{Issuer: "https://sso", TokenAuthMethods: []string{"client_secret_post"}}
	rsOnly := &Discovery{Issuer: "https://sso", TokenAuthMethods: []string{"none", "client_secret_basic", "private_key_jwt"}, TokenAuthSigningAlgs: []string{"RS256"}}
	unlisted := &Discovery{Issuer: "https://sso"}
	tests := []struct {
		name          string
		d             *Discovery
		secret, pkjwt bool
		method, alg   string
		errPart       string
	}{
		// Listing private_key_jwt is not the operator's word: public client.
		{"public by default", keycloak, false, false, AuthNone, "", ""},
		{"private_key_jwt asked, EdDSA", keycloak, false, true, AuthPrivateKeyJWT, "EdDSA", ""},
		{"private_key_jwt asked, RS256 only", rsOnly, false, true, "", "", "only with [RS256]"},
		{"private_key_jwt asked, not listed", postOnly, false, true, "", "", "does not list private_key_jwt"},
		{"secret, basic listed", keycloak, true, false, AuthClientSecretBasic, "", ""},
		{"secret, post only", postOnly, true, false, AuthClientSecretPost, "", ""},
		{"secret, nothing listed: RFC 8414 default basic", unlisted, true, false, AuthClientSecretBasic, "", ""},
		{"secret and private_key_jwt", keycloak, true, true, "", "", "exclude each other"},
	}
	for _, tt := range tests {
		c, err := tt.d.ChooseClientAuth(tt.secret, tt.pkjwt)
		if tt.errPart != "" {
			if err == nil || !strings.Contains(err.Error(), tt.errPart) {
				t.Errorf("%s: err %v, want %q", tt.name, err, tt.errPart)
			}
			continue
		}
		if err != nil || c.Method != tt.method || c.Alg != tt.alg {
			t.Errorf("%s: %+v %v, want %s %s", tt.name, c, err, tt.method, tt.alg)
		}
	}
}

// TestOwnershipLimitsStockAnswer reads the answer of
// Ownership-API/v1/limits/index.php as PHP writes it: limit from SELECT
// max(maxCount) (a string, or null without a limits row), current from
// count(*) (a string).
func TestOwnershipLimitsStockAnswer(t *testing.T) {
	const answer = `{"username":"alice","role":"Manager","organization":"Firenze","limits":[` +
		`{"elementType":"AppID","limit":null,"current":"0"},{"elementType":"IOTID","limit":"5","current":"2"},` +
		`{"elementType":"DashboardID","limit":3,"current":4}]}`
	var l OwnershipLimits
	if err := json.Unmarshal([]byte(answer), &l); err != nil {
		t.Fatal(err)
	}
	for typ, want := range map[string]int64{"AppID": 0, "IOTID": 3, "DashboardID": 0} {
		if free, ok := l.Free(typ); !ok || free != want {
			t.Errorf("Free(%s) = %d %v, want %d", typ, free, ok, want)
		}
	}
	if _, ok := l.Free("DAAppID"); ok {
		t.Error("Free of a type the answer does not name")
	}
	if err := json.Unmarshal([]byte(`{"limits":[{"elementType":"AppID","limit":"many","current":"0"}]}`), &l); err == nil || !strings.Contains(err.Error(), "not a count") {
		t.Errorf("bad count: %v", err)
	}
}

func TestRevokeTokenClientSecretBasic(t *testing.T) {
	const secret, token = "se:cr+et", "refresh-token-CANARY"
	var got url.Values
	var user, pass string
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		r.ParseForm()
		got = r.PostForm
		user, pass, _ = r.BasicAuth()
		if got.Get("token") == "bad" {
			w.WriteHeader(http.StatusBadRequest)
			w.Write([]byte(`{"error":"invalid_client"}`))
		}
	}))
	defer srv.Close()
	auth := &ClientAuth{ClientID: "gw client", Secret: secret, Basic: true}
	if err := RevokeToken(context.Background(), srv.Client(), srv.URL, token, "refresh_token", auth); err != nil {
		t.Fatal(err)
	}
	// RFC 6749 §2.3.1: form-encoded, then basic; not in the body.
	if user != url.QueryEscape("gw client") || pass != url.QueryEscape(secret) || got.Get("client_secret") != "" ||
		got.Get("token") != token || got.Get("token_type_hint") != "refresh_token" {
		t.Errorf("request: user %q pass %q form %v", user, pass, got)
	}
	err := RevokeToken(context.Background(), srv.Client(), srv.URL, "bad", "access_token", auth)
	if err == nil || !strings.Contains(err.Error(), "status 400: invalid_client") || strings.Contains(err.Error(), secret) {
		t.Errorf("refused: %v", err)
	}
}

// TestDeleteAppStockAnswer: Ownership-API/v1/delete/index.php answers
// {"deleted": N} and HTTP 400 when N is 0.
func TestDeleteAppStockAnswer(t *testing.T) {
	var deleted int
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.FormValue("type") != "AppID" || r.FormValue("elementId") != "gw-1" || r.Header.Get("Authorization") != "Bearer tok" {
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		if deleted == 0 {
			w.WriteHeader(http.StatusBadRequest)
		}
		w.Write([]byte(`{ "deleted": ` + string(rune('0'+deleted)) + "}\n"))
	}))
	defer srv.Close()
	deleted = 1
	if err := DeleteApp(context.Background(), srv.Client(), srv.URL, "tok", "AppID", "gw-1"); err != nil {
		t.Errorf("delete: %v", err)
	}
	deleted = 0
	if err := DeleteApp(context.Background(), srv.Client(), srv.URL, "tok", "AppID", "gw-1"); err == nil || !strings.Contains(err.Error(), "status 400") {
		t.Errorf("nothing deleted: %v", err)
	}
}

// TestRegisterGatewayStockAnswers: Ownership-API/v1/register/index.php
// echoes a new row with id and username, an updated one without id, and
// refuses beyond the limit with 400 {"error":"reached limit of N",...}.
func TestRegisterGatewayStockAnswers(t *testing.T) {
	answer, status := "", http.StatusOK
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(status)
		w.Write([]byte(answer))
	}))
	defer srv.Close()
	reg := GatewayRegistration{ElementID: "gw-1", ElementName: "gw-1"}
	answer = `{"elementId":"gw-1","elementType":"AppID","elementName":"gw-1","elementDetails":{"edgegateway_type":"x"},"username":"alice","id":42}`
	row, err := RegisterGateway(context.Background(), srv.Client(), srv.URL, "tok", reg)
	if err != nil || !row.Created() || row.Username != "alice" {
		t.Errorf("insert: %+v %v", row, err)
	}
	answer = `{"elementId":"gw-1","elementType":"AppID","elementName":"gw-1"}`
	if row, err := RegisterGateway(context.Background(), srv.Client(), srv.URL, "tok", reg); err != nil || row.Created() {
		t.Errorf("update: %+v %v", row, err)
	}
	answer, status = `{"error":"reached limit of 0","limit":0,"current":0}`, http.StatusBadRequest
	if _, err := RegisterGateway(context.Background(), srv.Client(), srv.URL, "tok", reg); !errors.Is(err, ErrLimitReached) || !strings.Contains(err.Error(), "reached limit of 0") {
		t.Errorf("refusal: %v", err)
	}
	answer = `{"error":"invalid elementType AppIDs"}`
	if _, err := RegisterGateway(context.Background(), srv.Client(), srv.URL, "tok", reg); err == nil || errors.Is(err, ErrLimitReached) {
		t.Errorf("other refusal: %v", err)
	}
}
