package config

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func writeFile(t *testing.T, dir, name, body string, mode os.FileMode) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(body), mode); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestTemplateLoadsBack(t *testing.T) {
	dir := t.TempDir()
	p := writeFile(t, dir, "edgegate.yaml", Template, 0o640)
	c, err := Load(p)
	if err != nil {
		t.Fatalf("Load(template) = %v", err)
	}
	if c.MQTT.Mode != ModeEmbedded || c.MQTT.Topic != "devices/{device}/telemetry" {
		t.Errorf("template mqtt = %+v", c.MQTT)
	}
	if c.Store.Quota != 512<<20 {
		t.Errorf("template store.quota = %v, want 512MiB", c.Store.Quota)
	}
	if c.Uplink.MaxBackoff != 30*time.Second {
		t.Errorf("template uplink.max_backoff = %v", c.Uplink.MaxBackoff)
	}
	if c.Uplink.RefusalWindow != 15*time.Minute {
		t.Errorf("template uplink.refusal_window = %v, want 15m (above the stock filters' 3- and 10-minute caches)", c.Uplink.RefusalWindow)
	}
	if c.Gateway.ID != "gw-example-01" {
		t.Errorf("gateway.id = %q", c.Gateway.ID)
	}
}

const base = `
state_dir: state
central:
  token_url: https://127.0.0.1:1/token
  client_id: gw
  client_secret_file: secret
`

func TestBadConfigNamesTheKey(t *testing.T) {
	tests := []struct {
		name, extra string
		want        []string
	}{
		{"unknown top key", "mqttt:\n  mode: embedded\n", []string{"mqttt", "is not a known key", "did you mean mqtt?"}},
		{"unknown nested key", "mqtt:\n  embedded:\n    listn: 127.0.0.1:1\n", []string{"mqtt.embedded.listn", "not a known key"}},
		{"bad mode", "mqtt:\n  mode: cloud\n", []string{"mqtt.mode", "embedded or external", `"cloud"`}},
		{"bad duration", "uplink:\n  max_backoff: soon\n", []string{"uplink.max_backoff", `"soon"`, "duration"}},
		{"bad int", "uplink:\n  concurrency: many\n", []string{"uplink.concurrency", `"many"`, "whole number"}},
		{"out of range", "uplink:\n  concurrency: 65\n", []string{"uplink.concurrency", "between 1 and 64", `"65"`}},
		{"bad size", "store:\n  quota: lots\n", []string{"store.quota", `"lots"`}},
		{"send_keys removed", "uplink:\n  send_keys: true\n", []string{"uplink.send_keys", "removed", "never put in URLs"}},
		{"negative refusal window", "uplink:\n  refusal_window: -1s\n", []string{"uplink.refusal_window", `"-1s"`, "between 0"}},
		{"signature named TimeInstant", "uplink:\n  signature_attribute: TimeInstant\n", []string{"uplink.signature_attribute", "other than TimeInstant"}},
		{"public listener", "mqtt:\n  embedded:\n    listen: 0.0.0.0:1883\n", []string{"mqtt.embedded.listen", "loopback"}},
		{"topic without device", "mqtt:\n  topic: devices/telemetry\n", []string{"mqtt.topic", "{device}"}},
		{"topic wildcard", "mqtt:\n  topic: devices/{device}/#\n", []string{"mqtt.topic", "wildcards"}},
		{"plain http token url", "central:\n  token_url: http://x/token\n  client_id: gw\n  client_secret_file: s\n", nil},
		{"external without url", "mqtt:\n  mode: external\n", []string{"mqtt.external.url", "must be set"}},
		{"external plain remote", "mqtt:\n  mode: external\n  external:\n    url: tcp://10.1.2.3:1883\n", []string{"mqtt.external.url", "loopback"}},
		{"external bad accounts", "mqtt:\n  mode: external\n  external:\n    url: tcp://127.0.0.1:1883\n    accounts: acl_file\n", []string{"mqtt.external.accounts", "dynsec or none", `"acl_file"`}},
		{"dynsec without admin", "mqtt:\n  mode: external\n  external:\n    url: tcp://127.0.0.1:1883\n    accounts: dynsec\n", []string{"mqtt.external.admin_username", "dynamic-security administrator"}},
		{"dynsec admin without password", "mqtt:\n  mode: external\n  external:\n    url: tcp://127.0.0.1:1883\n    accounts: dynsec\n    admin_username: a\n", []string{"mqtt.external.admin_password_file"}},
		{"dynsec interval", "mqtt:\n  mode: external\n  external:\n    url: tcp://127.0.0.1:1883\n    username: gw\n    accounts: dynsec\n    accounts_interval: 1s\n", []string{"mqtt.external.accounts_interval", "between 10s and 24h"}},
		{"list instead of map", "uplink: [1, 2]\n", []string{"uplink", "mapping"}},
		{"bad log level", "log:\n  level: loud\n", []string{"log.level", `"loud"`}},
		{"device bad id", "devices:\n  - id: 'bad id'\n    type: T\n    owner: a\n    k1: x\n    k2: y\n    broker: https://b\n", []string{"devices[0].id", `"bad id"`}},
		{"device same keys", "devices:\n  - id: d\n    type: T\n    owner: a\n    k1: same-secret-k\n    k2: same-secret-k\n    broker: https://b\n", []string{"devices[0].k2", "differ"}},
		{"device http broker", "devices:\n  - id: d\n    type: T\n    owner: a\n    k1: x\n    k2: y\n    broker: http://b\n", []string{"devices[0].broker", "https"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			body := base + tt.extra
			if tt.name == "plain http token url" {
				body = "state_dir: s\n" + tt.extra
				tt.want = []string{"central.token_url", "https", `"http://x/token"`}
			}
			p := writeFile(t, dir, "c.yaml", body, 0o600)
			_, err := Load(p)
			if err == nil {
				t.Fatalf("Load(%q) = nil error, want one naming %v", tt.extra, tt.want)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("Load error = %q, want it to contain %q", err, w)
				}
			}
		})
	}
}

func TestUnknownKeyHasLine(t *testing.T) {
	dir := t.TempDir()
	p := writeFile(t, dir, "c.yaml", base+"uplink:\n  concurency: 3\n", 0o600)
	_, err := Load(p)
	var fe *FieldError
	if !errors.As(err, &fe) {
		t.Fatalf("Load error %v is not a FieldError", err)
	}
	if fe.Key != "uplink.concurency" || fe.Line != 8 {
		t.Errorf("FieldError = %+v, want key uplink.concurency at line 8", fe)
	}
}

func TestDevicesFileMustBePrivate(t *testing.T) {
	dir := t.TempDir()
	devs := "devices:\n  - id: d1\n    type: T\n    owner: alice\n    k1: canary-k1-aaaa\n    k2: canary-k2-bbbb\n    broker: https://127.0.0.1:9/b\n"
	writeFile(t, dir, "devices.yaml", devs, 0o644)
	p := writeFile(t, dir, "c.yaml", base+"devices_file: devices.yaml\n", 0o644)
	_, err := Load(p)
	if err == nil || !strings.Contains(err.Error(), "chmod") {
		t.Fatalf("Load with world-readable devices file = %v, want a chmod hint", err)
	}
	if strings.Contains(err.Error(), "canary") {
		t.Fatalf("error leaks a key: %v", err)
	}
	if err := os.Chmod(filepath.Join(dir, "devices.yaml"), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := Load(p)
	if err != nil {
		t.Fatalf("Load = %v", err)
	}
	if len(c.Devices) != 1 || c.Devices[0].ID != "d1" || c.Devices[0].K1 != "canary-k1-aaaa" {
		t.Fatalf("devices = %+v", c.Devices)
	}
	if c.StateDir != filepath.Join(dir, "state") {
		t.Errorf("state_dir = %q, want it relative to the config file", c.StateDir)
	}
}

func TestKeysNeverInErrors(t *testing.T) {
	dir := t.TempDir()
	body := base + "devices:\n  - id: d\n    type: T\n    owner: ''\n    k1: canary-k1-zzzz\n    k2: canary-k2-yyyy\n    broker: ftp://x\n"
	p := writeFile(t, dir, "c.yaml", body, 0o600)
	_, err := Load(p)
	if err == nil {
		t.Fatal("want an error")
	}
	if strings.Contains(err.Error(), "canary") {
		t.Fatalf("error leaks a key: %v", err)
	}
}

func TestParseByteSize(t *testing.T) {
	tests := []struct {
		in   string
		want ByteSize
		ok   bool
	}{
		{"512MiB", 512 << 20, true}, {"1GB", 1e9, true}, {"64k", 64 << 10, true},
		{"1000", 1000, true}, {"2 GiB", 2 << 30, true}, {"-1", 0, false}, {"lots", 0, false}, {"", 0, false},
	}
	for _, tt := range tests {
		got, err := ParseByteSize(tt.in)
		if (err == nil) != tt.ok || got != tt.want {
			t.Errorf("ParseByteSize(%q) = %v, %v; want %v, ok=%v", tt.in, got, err, tt.want, tt.ok)
		}
	}
}

// A file written for an older gateway ("send_keys: false") still loads;
// refusal_window 0 (dead-letter at once) is accepted.
func TestUplinkOldAndZeroKeys(t *testing.T) {
	p := writeFile(t, t.TempDir(), "c.yaml", base+"uplink:\n  send_keys: false\n  refusal_window: 0s\n", 0o600)
	c, err := Load(p)
	if err != nil {
		t.Fatalf("Load = %v", err)
	}
	if c.Uplink.RefusalWindow != 0 {
		t.Errorf("refusal_window = %v, want 0", c.Uplink.RefusalWindow)
	}
}

func TestUplinkConcurrencyByMode(t *testing.T) {
	for _, tt := range []struct {
		yaml string
		want int
	}{
		{"", 16},
		{"uplink:\n  mode: batch\n", 4},
		{"uplink:\n  mode: batch\n  concurrency: 9\n", 9},
		{"uplink:\n  concurrency: 2\n", 2},
	} {
		dir := t.TempDir()
		c, err := Load(writeFile(t, dir, "c.yaml", base+tt.yaml, 0o600))
		if err != nil {
			t.Fatalf("%q: %v", tt.yaml, err)
		}
		if got := c.Uplink.EffectiveConcurrency(); got != tt.want {
			t.Errorf("%q: EffectiveConcurrency = %d, want %d", tt.yaml, got, tt.want)
		}
	}
}

func TestOwnershipMaxAge(t *testing.T) {
	const own = "policy:\n  source: ownership-api\n  ownership:\n    url: https://own.example\n    username: gw-account\n    brokers:\n      orion-1: https://broker.example/orion-filter/orion-1\n"
	dir := t.TempDir()
	c, err := Load(writeFile(t, dir, "c.yaml", base+own, 0o600))
	if err != nil {
		t.Fatal(err)
	}
	if c.Policy.Ownership.MaxAge != 24*time.Hour {
		t.Errorf("default policy.ownership.max_age = %v, want 24h", c.Policy.Ownership.MaxAge)
	}
	c, err = Load(writeFile(t, dir, "c2.yaml", base+own+"    max_age: 2h\n", 0o600))
	if err != nil || c.Policy.Ownership.MaxAge != 2*time.Hour {
		t.Fatalf("max_age 2h: %v, %v", err, c)
	}
	for _, tt := range []struct{ extra, want string }{
		{"    max_age: 30s\n", "at least 1m"},
		{"    max_age: 2m\n", "policy.poll_interval"},
	} {
		_, err := Load(writeFile(t, dir, "c3.yaml", base+own+tt.extra, 0o600))
		if err == nil || !strings.Contains(err.Error(), "policy.ownership.max_age") || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%q: err = %v, want policy.ownership.max_age ... %s", tt.extra, err, tt.want)
		}
	}
}

// TestURLSecretsRefused: a URL that carries a credential is refused with
// an error naming the key, and no error echoes the secret (issue 17 item 9).
func TestURLSecretsRefused(t *testing.T) {
	dev := "devices:\n  - id: d\n    type: T\n    owner: a\n    k1: x1\n    k2: y2\n    broker: %s\n"
	tests := []struct {
		name, body, key string
	}{
		{"token url userinfo", "state_dir: s\ncentral:\n  token_url: https://gw:canary-pw@sso.example/token\n  client_id: gw\n  client_secret_file: s\n", "central.token_url"},
		{"loopback http userinfo", "state_dir: s\ncentral:\n  token_url: http://gw:canary-pw@127.0.0.1:8080/token\n  client_id: gw\n  client_secret_file: s\n", "central.token_url"},
		{"issuer query token", strings.Replace(base, "central:\n", "central:\n  issuer: https://sso.example/realms/x?access_token=canary-tok\n  audience: gw\n", 1), "central.issuer"},
		{"external broker userinfo", base + "mqtt:\n  mode: external\n  external:\n    url: tls://ingest:canary-pw@broker.example:8883\n", "mqtt.external.url"},
		{"external broker query token", base + "mqtt:\n  mode: external\n  external:\n    url: tls://broker.example:8883/?token=canary-tok\n", "mqtt.external.url"},
		{"device broker k1 in query", base + strings.Replace(dev, "%s", "https://filter.example/orion?k1=canary-k1&k2=canary-k2", 1), "devices[0].broker"},
		{"device broker userinfo", base + strings.Replace(dev, "%s", "https://u:canary-pw@filter.example/orion", 1), "devices[0].broker"},
		{"ownership broker userinfo", base + "policy:\n  source: ownership-api\n  ownership:\n    url: https://own.example/ownership-api\n    username: gw\n    brokers:\n      orion-1: https://u:canary-pw@filter.example\n", "policy.ownership.brokers.orion-1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := writeFile(t, t.TempDir(), "c.yaml", tt.body, 0o600)
			_, err := Load(p)
			if err == nil {
				t.Fatalf("Load = nil, want an error naming %s", tt.key)
			}
			if !strings.Contains(err.Error(), tt.key+" must not carry") {
				t.Errorf("Load error = %q, want %q refused for carrying credentials", err, tt.key)
			}
			if strings.Contains(err.Error(), "canary") {
				t.Fatalf("error leaks the secret: %v", err)
			}
		})
	}
	// A query without a credential (and an owner with '@') stays accepted.
	ok := base + strings.Replace(dev, "%s", "https://filter.example/orion?x=1", 1)
	ok = strings.Replace(ok, "owner: a", "owner: alice@example.org", 1)
	if _, err := Load(writeFile(t, t.TempDir(), "c.yaml", ok, 0o600)); err != nil {
		t.Fatalf("Load(harmless query) = %v", err)
	}
}

// TestDeviceIDDotSegments: "." and ".." pass the character rule but would
// make PATCH /v2/entities/../attrs; the config refuses them.
func TestDeviceIDDotSegments(t *testing.T) {
	for _, gw := range []string{".", ".."} {
		_, err := Load(writeFile(t, t.TempDir(), "c.yaml", base+"gateway:\n  id: '"+gw+"'\n", 0o600))
		if err == nil || !strings.Contains(err.Error(), "gateway.id") {
			t.Errorf("Load(gateway.id %q) = %v, want gateway.id refused", gw, err)
		}
	}
	for _, id := range []string{".", "..", "a:b"} {
		body := base + "devices:\n  - id: '" + id + "'\n    type: T\n    owner: a\n    k1: x1\n    k2: y2\n    broker: https://b.example\n"
		_, err := Load(writeFile(t, t.TempDir(), "c.yaml", body, 0o600))
		if err == nil || !strings.Contains(err.Error(), "devices[0].id") {
			t.Errorf("Load(id %q) = %v, want devices[0].id refused", id, err)
		}
	}
}
