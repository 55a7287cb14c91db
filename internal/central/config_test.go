package central

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestConfigCheck(t *testing.T) {
	good := func() Config {
		return Config{StateDir: t.TempDir(), Platform: PlatformConfig{URL: "https://p.example", Issuer: "https://p.example/auth/realms/master",
			ClientID: "c", ClientSecretFile: "/x", Brokers: map[string]string{"orion-1": "https://b.example/orion-filter/orion-1"}}}
	}
	c := good()
	if err := c.Check(); err != nil {
		t.Fatal(err)
	}
	if c.PolicyTTL != DefaultPolicyTTL || c.Platform.DataManagerURL != "https://p.example/datamanager/api" || c.Store != StoreBadger ||
		c.KeyFile != filepath.Join(c.StateDir, "policy-keys.json") {
		t.Fatalf("defaults: %+v", c)
	}
	for name, tc := range map[string]struct {
		mut  func(*Config)
		want string
	}{
		"http platform":    {func(c *Config) { c.Platform.URL = "http://p.example" }, "platform.url"},
		"no state dir":     {func(c *Config) { c.StateDir = "" }, "state_dir"},
		"two credentials":  {func(c *Config) { c.Platform.RefreshTokenFile = "/y" }, "exactly one"},
		"no broker":        {func(c *Config) { c.Platform.Brokers = nil }, "platform.brokers"},
		"bad gateway id":   {func(c *Config) { c.Gateways = map[string]string{"gw/1": "c"} }, "gateways"},
		"short ttl":        {func(c *Config) { c.PolicyTTL = time.Second }, "policy_ttl"},
		"too much at once": {func(c *Config) { c.Concurrency = 1000 }, "concurrency"},
		"unknown store":    {func(c *Config) { c.Store = "mysql" }, "store"},
		"postgres no url":  {func(c *Config) { c.Store = StorePostgres }, "postgres_url_file"},
		"url for badger":   {func(c *Config) { c.PostgresURLFile = "/x" }, "postgres_url_file"},
	} {
		c := good()
		tc.mut(&c)
		if err := c.Check(); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error naming %s", name, err, tc.want)
		}
	}
}

func TestKeyFileModeAndContent(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "keys.json")
	r, err := OpenKeyRing(path, true)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(path)
	if _, err := r.Sign([]byte(`{}`)); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := OpenKeyRing(path, false); err == nil || !strings.Contains(err.Error(), "0600") {
		t.Fatalf("world-readable key file: %v", err)
	}
	os.Chmod(path, 0o600)
	os.WriteFile(path, []byte(`{"keys":[{"jwk":{"kty":"oct","k":"c2VjcmV0"}}]}`), 0o600)
	_, err = OpenKeyRing(path, false)
	if err == nil || strings.Contains(err.Error(), "c2VjcmV0") {
		t.Fatalf("symmetric key accepted or quoted: %v", err)
	}
	// The public set never carries the private part.
	pub, _ := r.Public(time.Now()).Key(0)
	if _, private := pub.Get("d"); private || len(b) == 0 {
		t.Fatal("the published JWKS holds a private key")
	}
}
