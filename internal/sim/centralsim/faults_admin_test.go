package centralsim

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwk"
	"github.com/lestrrat-go/jwx/v2/jwt"
	"golang.org/x/oauth2"
	"golang.org/x/oauth2/clientcredentials"
)

// verifyWithJWKS verifies tok with the key set served at jwksURL, the way a
// relying party would, and returns its claims.
func verifyWithJWKS(t *testing.T, f *fixture, jwksURL, tok string) map[string]any {
	t.Helper()
	r := f.mustDo(t, "GET", jwksURL, "", nil)
	if r.status != 200 {
		t.Fatalf("JWKS status %d", r.status)
	}
	set, err := jwk.Parse(r.body)
	if err != nil {
		t.Fatal(err)
	}
	key, ok := set.Key(0)
	if !ok || set.Len() != 1 || key.KeyID() == "" || key.KeyType() != "RSA" {
		t.Fatalf("JWKS %s", r.body)
	}
	if _, private := key.(jwk.RSAPrivateKey); private {
		t.Fatal("JWKS publishes a private key")
	}
	parsed, err := jwt.Parse([]byte(tok), jwt.WithKeySet(set), jwt.WithValidate(true))
	if err != nil {
		t.Fatalf("token does not verify against the JWKS: %v", err)
	}
	m, err := parsed.AsMap(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	// Round trip for plain JSON types; times as Unix seconds, as on the wire.
	m["exp"], m["iat"] = float64(parsed.Expiration().Unix()), float64(parsed.IssuedAt().Unix())
	b, _ := json.Marshal(m)
	var out map[string]any
	json.Unmarshal(b, &out)
	return out
}

func TestFaults(t *testing.T) {
	f := newFixture(t)
	tok := f.token(t, "alice", time.Hour)
	patch := func(client *http.Client) (response, error) {
		body, _ := sealed(t, devTemp, k1, k2, 1, 20)
		saved := f.http
		if client != nil {
			f.http = client
		}
		defer func() { f.http = saved }()
		return f.do(t, "PATCH", f.patchURL(devTemp, nil), tok, body)
	}
	expectOK := func(t *testing.T) {
		t.Helper()
		if r, err := patch(nil); err != nil || r.status != 204 {
			t.Fatalf("after the fault: %v %d %s", err, r.status, r.body)
		}
	}
	h1 := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: f.sim.CAPool()},
		TLSNextProto:    map[string]func(string, *tls.Conn) http.RoundTripper{}, // HTTP/1.1 only
	}}

	t.Run("down over HTTP/2", func(t *testing.T) {
		f.sim.SetFault(Fault{Mode: FaultDown, Count: 1})
		if r, err := patch(nil); err == nil {
			t.Fatalf("got a response %d %s, want a broken connection", r.status, r.body)
		}
		expectOK(t)
	})
	t.Run("down over HTTP/1.1", func(t *testing.T) {
		f.sim.SetFault(Fault{Mode: FaultDown, Count: 1})
		if r, err := patch(h1); err == nil {
			t.Fatalf("got a response %d %s, want a broken connection", r.status, r.body)
		}
		expectOK(t)
	})
	t.Run("slow beyond the client's timeout", func(t *testing.T) {
		f.sim.SetFault(Fault{Mode: FaultSlow, Delay: time.Minute})
		impatient := &http.Client{Timeout: 200 * time.Millisecond, Transport: f.http.Transport}
		start := time.Now()
		_, err := patch(impatient)
		if err == nil || !strings.Contains(err.Error(), "Client.Timeout") {
			t.Fatalf("err = %v, want a client timeout", err)
		}
		if d := time.Since(start); d > 5*time.Second {
			t.Fatalf("took %v", d)
		}
		f.sim.ClearFault()
		expectOK(t)
	})
	t.Run("slow within the timeout", func(t *testing.T) {
		f.sim.SetFault(Fault{Mode: FaultSlow, Delay: 100 * time.Millisecond, Count: 1})
		start := time.Now()
		if r, err := patch(nil); err != nil || r.status != 204 {
			t.Fatalf("%v %d", err, r.status)
		}
		if d := time.Since(start); d < 100*time.Millisecond {
			t.Fatalf("answered after %v, want >= 100ms", d)
		}
	})

	tests := []struct {
		name   string
		fault  Fault
		status int
		check  func(t *testing.T, r response)
	}{
		{"status 503", Fault{Mode: FaultStatus, Status: 503, Body: "upstream down", Count: 2}, 503, func(t *testing.T, r response) {
			if string(r.body) != "upstream down" {
				t.Fatalf("body %q", r.body)
			}
		}},
		{"too many", Fault{Mode: FaultTooMany, RetryAfter: 3, Count: 2}, 429, func(t *testing.T, r response) {
			if r.header.Get("Retry-After") != "3" {
				t.Fatalf("Retry-After %q", r.header.Get("Retry-After"))
			}
		}},
		{"transient 401", Fault{Mode: FaultTransient401, Count: 2}, 401, func(t *testing.T, r response) {
			if m := r.message(t); m != MsgTroubleOwner {
				t.Fatalf("message %q", m)
			}
		}},
		{"invalid token", Fault{Mode: FaultInvalidToken, Count: 2}, 401, func(t *testing.T, r response) {
			if m := r.message(t); m != MsgAccessTokenNotValid {
				t.Fatalf("message %q", m)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f.sim.SetFault(tt.fault)
			for i := 0; i < tt.fault.Count; i++ {
				r, err := patch(nil)
				if err != nil || r.status != tt.status {
					t.Fatalf("request %d: %v %d %s", i, err, r.status, r.body)
				}
				tt.check(t, r)
			}
			expectOK(t) // the budget of Count requests is spent
		})
	}

	t.Run("token endpoint", func(t *testing.T) {
		ctx := context.WithValue(context.Background(), oauth2.HTTPClient, f.http)
		// AuthStyleInHeader: auto-detection would retry in the form and
		// spend two requests of the fault's budget.
		cc := clientcredentials.Config{ClientID: "gw-1", ClientSecret: gwSecret, TokenURL: f.sim.TokenURL(), AuthStyle: oauth2.AuthStyleInHeader}
		f.sim.SetFault(Fault{Mode: FaultStatus, Target: TargetToken, Status: 503})
		_, err := cc.Token(ctx)
		var re *oauth2.RetrieveError
		if !errors.As(err, &re) || re.Response.StatusCode != 503 {
			t.Fatalf("Token() err = %v, want 503", err)
		}
		expectOK(t) // the broker is not affected
		f.sim.SetFault(Fault{Mode: FaultInvalidToken, Target: TargetToken, Count: 1})
		if _, err := cc.Token(ctx); !errors.As(err, &re) || re.ErrorCode != "invalid_client" {
			t.Fatalf("Token() err = %v, want invalid_client", err)
		}
		if _, err := cc.Token(ctx); err != nil {
			t.Fatalf("after the fault: %v", err)
		}
		f.sim.ClearFault()
	})

	var faults int
	for _, r := range f.sim.Refusals() {
		if r.Fault {
			faults++
		}
	}
	if faults != 2+2+2+2+2+2 { // down twice, 4 modes × 2, token twice
		t.Errorf("%d fault refusals recorded, want 12", faults)
	}
	for _, bad := range []Fault{{Mode: "explode"}, {Mode: FaultSlow}, {Mode: FaultDown, Target: "dns"}, {Mode: FaultStatus, Status: 200}} {
		if err := f.sim.SetFaultChecked(bad); err == nil {
			t.Errorf("SetFaultChecked(%+v): no error", bad)
		}
	}
}

func TestCloseEndsSlowRequests(t *testing.T) {
	f := newFixture(t)
	f.sim.SetFault(Fault{Mode: FaultSlow, Delay: time.Hour})
	done := make(chan error, 1)
	go func() {
		body, _ := sealed(t, devTemp, k1, k2, 1, 20)
		_, err := f.do(t, "PATCH", f.patchURL(devTemp, nil), f.token(t, "alice", time.Minute), body)
		done <- err
	}()
	// Wait until the request is inside the server, then close.
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	deadline := time.After(5 * time.Second)
	for f.sim.inflight.Load() == 0 {
		select {
		case <-tick.C:
		case <-deadline:
			t.Fatal("the request never reached the server")
		}
	}
	start := time.Now()
	closed := make(chan error, 1)
	go func() { closed <- f.sim.Close() }()
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not return")
	}
	if d := time.Since(start); d > 7*time.Second {
		t.Fatalf("Close took %v", d)
	}
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("client did not return")
	}
}

func TestAdmin(t *testing.T) {
	f := newFixture(t)
	admin := f.sim.AdminToken()
	base := f.sim.URL() + "/_sim"
	for _, tok := range []string{"", "wrong", admin + "x"} {
		for _, ep := range []struct{ method, path string }{{"GET", "/updates"}, {"GET", "/summary"}, {"POST", "/fault"}, {"DELETE", "/fault"}, {"POST", "/devices"}, {"DELETE", "/devices/x"}, {"GET", "/entities/" + devTemp}} {
			if r := f.mustDo(t, ep.method, base+ep.path, tok, []byte(`{}`)); r.status != 401 {
				t.Errorf("%s %s with token %q: %d, want 401", ep.method, ep.path, tok, r.status)
			}
		}
	}

	// Register a device for bob over the admin surface, then write to it.
	dev := `{"id":"urn:ngsi-ld:Device:bob-1","type":"Meter","owner":"bob","k1":"bk1","k2":"bk2","attrs":["power"]}`
	if r := f.mustDo(t, "POST", base+"/devices", admin, []byte(dev)); r.status != 204 {
		t.Fatalf("add device: %d %s", r.status, r.body)
	}
	if r := f.mustDo(t, "POST", base+"/devices", admin, []byte(`{"id":"x","surprise":1}`)); r.status != 400 {
		t.Fatalf("add device with an unknown field: %d", r.status)
	}
	bobURL := f.sim.BrokerURL() + "/v2/entities/urn:ngsi-ld:Device:bob-1/attrs?elementid=urn:ngsi-ld:Device:bob-1&type=Meter"
	bob := f.token(t, "bob", time.Minute)
	if r := f.mustDo(t, "PATCH", bobURL, bob, []byte(`{"power":{"type":"Number","value":5}}`)); r.status != 204 {
		t.Fatalf("PATCH new device: %d %s", r.status, r.body)
	}
	r := f.mustDo(t, "GET", base+"/entities/urn:ngsi-ld:Device:bob-1", admin, nil)
	if r.status != 200 || !strings.Contains(string(r.body), `"value":5`) || strings.Contains(string(r.body), "bk1") {
		t.Fatalf("entity: %d %s", r.status, r.body)
	}
	r = f.mustDo(t, "GET", base+"/updates", admin, nil)
	var ups []Update
	if err := json.Unmarshal(r.body, &ups); err != nil || len(ups) != 1 || ups[0].Verdict != VerdictUnsigned || ups[0].User != "bob" {
		t.Fatalf("updates: %s (%v)", r.body, err)
	}

	// Faults over the admin surface.
	if r := f.mustDo(t, "POST", base+"/fault", admin, []byte(`{"mode":"slow","delay":"nonsense"}`)); r.status != 400 {
		t.Fatalf("bad fault: %d", r.status)
	}
	if r := f.mustDo(t, "POST", base+"/fault", admin, []byte(`{"mode":"status","status":502}`)); r.status != 204 {
		t.Fatalf("set fault: %d %s", r.status, r.body)
	}
	if r := f.mustDo(t, "PATCH", bobURL, bob, []byte(`{"power":{"type":"Number","value":6}}`)); r.status != 502 {
		t.Fatalf("with the fault: %d", r.status)
	}
	r = f.mustDo(t, "GET", base+"/summary", admin, nil)
	var sum Summary
	if err := json.Unmarshal(r.body, &sum); err != nil || sum.Fault == nil || sum.Fault.Mode != FaultStatus || sum.Refusals["502"] != 1 || sum.Devices["urn:ngsi-ld:Device:bob-1"][VerdictUnsigned] != 1 {
		t.Fatalf("summary: %s (%v)", r.body, err)
	}
	if r := f.mustDo(t, "DELETE", base+"/fault", admin, nil); r.status != 204 {
		t.Fatalf("clear fault: %d", r.status)
	}
	if r := f.mustDo(t, "PATCH", bobURL, bob, []byte(`{"power":{"type":"Number","value":6}}`)); r.status != 204 {
		t.Fatalf("after clearing: %d", r.status)
	}
	if r := f.mustDo(t, "PUT", base+"/delegations", admin, []byte(`[{"device":"urn:ngsi-ld:Device:bob-1","user":"carol","kind":"WRITE_ONLY"}]`)); r.status != 204 {
		t.Fatalf("set delegations: %d %s", r.status, r.body)
	}
	if r := f.mustDo(t, "PATCH", bobURL, f.token(t, "carol", time.Minute), []byte(`{"power":{"type":"Number","value":7}}`)); r.status != 204 {
		t.Fatalf("delegate: %d", r.status)
	}

	// Unregister: the filter still holds bob's ownership in its cache, so
	// the request reaches Orion, whose entity is gone (404); once the cache
	// is emptied (a filter restart), the filter refuses.
	if r := f.mustDo(t, "DELETE", base+"/devices/urn:ngsi-ld:Device:bob-1", admin, nil); r.status != 204 {
		t.Fatalf("remove device: %d", r.status)
	}
	if r := f.mustDo(t, "PATCH", bobURL, bob, []byte(`{"power":{"type":"Number","value":8}}`)); r.status != 404 || orionErr(t, r).Error != "NotFound" {
		t.Fatalf("after removal, cached ownership: %d %s", r.status, r.body)
	}
	if r := f.mustDo(t, "DELETE", base+"/filter-cache", admin, nil); r.status != 204 {
		t.Fatalf("clear the filter cache: %d", r.status)
	}
	if r := f.mustDo(t, "PATCH", bobURL, bob, []byte(`{"power":{"type":"Number","value":8}}`)); r.status != 401 || r.message(t) != MsgCredentialsNotValid {
		t.Fatalf("after removal: %d %s", r.status, r.body)
	}
	if r := f.mustDo(t, "GET", base+"/refusals", admin, nil); r.status != 200 || strings.Contains(string(r.body), bob) {
		t.Fatalf("refusals: %d", r.status)
	}
}
