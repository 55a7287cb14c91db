package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestMissingCentral: only a configuration whose sole problem is an absent
// central section counts as "not configured" (edgegate run exits 78 for
// it); a wrong value anywhere keeps it a configuration error.
func TestMissingCentral(t *testing.T) {
	dir := t.TempDir()
	load := func(body string) error {
		p := filepath.Join(dir, "c.yaml")
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		_, err := Load(p)
		return err
	}
	for body, want := range map[string]bool{
		"state_dir: s\n": true,
		"state_dir: s\ncentral:\n  credentials: paired\n":                                     true,
		"state_dir: s\nmqtt:\n  mode: cloud\n":                                                false,
		"state_dir: s\nuplink:\n  concurency: 2\n":                                            false,
		"state_dir: s\ncentral:\n  token_url: http://sso.example.org/token\n  client_id: x\n": false,
	} {
		err := load(body)
		if err == nil || MissingCentral(err) != want {
			t.Errorf("%q: err %v, MissingCentral %v, want %v", body, err, MissingCentral(err), want)
		}
	}
	if MissingCentral(nil) {
		t.Error("MissingCentral(nil)")
	}
}

// TestCentralLoopbackHTTP: the sign-on may be plain http on loopback only.
func TestCentralLoopbackHTTP(t *testing.T) {
	for u, ok := range map[string]bool{
		"http://127.0.0.1:8080/realms/master/protocol/openid-connect/token": true,
		"http://localhost/token":         true,
		"http://[::1]:9000/token":        true,
		"http://sso.example.org/token":   false,
		"https://sso.example.org/token":  true,
		"http://user:pw@127.0.0.1/token": false,
	} {
		c := Default()
		c.Central = Central{Issuer: u, Audience: "edgegate", TokenURL: u, ClientID: "gw", Credentials: CredentialsPaired}
		err := c.Validate()
		if (err == nil) != ok || (err != nil && !strings.Contains(err.Error(), "central.")) {
			t.Errorf("%s: %v, want ok %v", u, err, ok)
		}
	}
}
