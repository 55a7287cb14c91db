package centralsim

import (
	"encoding/json"
	"net/url"
	"testing"
)

// TestRevokeWithFormSecret: a confidential client's form-posted secret is
// decoded once, as at the token endpoint, so a secret with '+' or '%' can
// revoke its refresh token.
func TestRevokeWithFormSecret(t *testing.T) {
	const secret = "a+b%41-secret"
	f := newFixture(t, func(o *Options) {
		o.Clients = append(o.Clients, Client{ID: "gw-odd", Secret: secret, Username: "alice", Offline: true})
	})
	post := func(endpoint string, form url.Values) (int, map[string]any) {
		t.Helper()
		resp, err := f.http.PostForm(endpoint, form)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var m map[string]any
		_ = json.NewDecoder(resp.Body).Decode(&m) // revocation answers 200 without a body
		return resp.StatusCode, m
	}
	creds := url.Values{"client_id": {"gw-odd"}, "client_secret": {secret}}
	with := func(extra url.Values) url.Values {
		v := url.Values{}
		for k, vs := range creds {
			v[k] = vs
		}
		for k, vs := range extra {
			v[k] = vs
		}
		return v
	}
	st, m := post(f.sim.TokenURL(), with(url.Values{"grant_type": {"client_credentials"}}))
	rt, _ := m["refresh_token"].(string)
	if st != 200 || rt == "" {
		t.Fatalf("client_credentials: %d %v", st, m)
	}
	if st, m := post(f.sim.RevocationURL(), with(url.Values{"token": {rt}})); st != 200 {
		t.Fatalf("revoke: %d %v", st, m)
	}
	if st, m := post(f.sim.TokenURL(), with(url.Values{"grant_type": {"refresh_token"}, "refresh_token": {rt}})); st != 400 || m["error"] != "invalid_grant" {
		t.Fatalf("refresh after revocation: %d %v", st, m)
	}
}
