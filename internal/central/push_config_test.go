package central

import (
	"strings"
	"testing"
)

// TestPushConfigCheck: push.* is checked and every error names its key.
func TestPushConfigCheck(t *testing.T) {
	good := func() Config {
		return Config{StateDir: t.TempDir(), Platform: PlatformConfig{URL: "https://p.example", Issuer: "https://p.example/auth/realms/master",
			ClientID: "c", ClientSecretFile: "/x", Brokers: map[string]string{"orion-1": "https://b.example/orion-filter/orion-1"}},
			Push: PushConfig{Mode: PushExternal, Brokers: []string{"ssl://mqtt.example:8883"}, Username: "edgegate-central", PasswordFile: "/pw"}}
	}
	c := good()
	if err := c.Check(); err != nil {
		t.Fatal(err)
	}
	if c.Push.ClientID != "edgegate-central" {
		t.Fatalf("push.client_id default: %q", c.Push.ClientID)
	}
	embedded := Config{StateDir: t.TempDir(), Platform: good().Platform}
	if err := embedded.Check(); err != nil || embedded.Push.Mode != PushEmbedded {
		t.Fatalf("no push section: mode %q, %v", embedded.Push.Mode, err)
	}
	t.Setenv("CREDENTIALS_DIRECTORY", "")
	for name, tc := range map[string]struct {
		mut  func(*Config)
		want string
	}{
		"unknown mode":                 {func(c *Config) { c.Push.Mode = "cluster" }, "push.mode"},
		"no brokers":                   {func(c *Config) { c.Push.Brokers = nil }, "push.brokers"},
		"plain tcp":                    {func(c *Config) { c.Push.Brokers = []string{"tcp://mqtt.example:1883"} }, "push.brokers[0]"},
		"no port":                      {func(c *Config) { c.Push.Brokers = []string{"ssl://mqtt.example"} }, "push.brokers[0]"},
		"password in url":              {func(c *Config) { c.Push.Brokers = []string{"ssl://u:p@mqtt.example:8883"} }, "push.brokers[0]"},
		"bad leaf":                     {func(c *Config) { c.Push.LeafBrokers = []string{"ws://leaf:80"} }, "push.leaf_brokers[0]"},
		"no username":                  {func(c *Config) { c.Push.Username = "" }, "push.username"},
		"no password":                  {func(c *Config) { c.Push.PasswordFile = "" }, "push.password_file"},
		"wildcard client id":           {func(c *Config) { c.Push.ClientID = "central/#" }, "push.client_id"},
		"embedded broker too":          {func(c *Config) { c.MQTTListen = ":8883" }, "mqtt_listen"},
		"external keys, embedded mode": {func(c *Config) { c.Push.Mode = PushEmbedded }, "push.mode: external"},
	} {
		c := good()
		tc.mut(&c)
		if err := c.Check(); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error naming %s", name, err, tc.want)
		}
	}
}
