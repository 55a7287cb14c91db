package config

import (
	"errors"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

// The template (`edgegate config template`) and Default are the two places
// a reader learns the defaults: the template must load back to exactly
// Default, but for the example values listed here, so the two cannot drift.
func TestTemplateIsDefault(t *testing.T) {
	dir := t.TempDir()
	p := writeFile(t, dir, "edgegate.yaml", Template, 0o640)
	got, err := Load(p)
	if err != nil {
		t.Fatalf("Load(template) = %v", err)
	}
	want := Default()
	want.Path = p
	// The intended differences: the template is a working example, so it
	// fills the keys that have no default (a gateway id, the central
	// sign-on of stock Snap4City, an external broker URL), turns on the
	// TLS listener a networked gateway needs, and writes the empty lists
	// ([]) a reader extends.
	want.Gateway.ID = "gw-example-01"
	want.MQTT.Embedded.TLSListen = "[::]:8883"
	want.MQTT.External.URL = "tls://127.0.0.1:8883"
	want.Central = Central{
		Issuer:      "https://www.snap4city.org/auth/realms/master",
		Audience:    "edgegate",
		TokenURL:    "https://www.snap4city.org/auth/realms/master/protocol/openid-connect/token",
		Credentials: CredentialsPaired,
		ClientID:    "nodered-iotedge",
		Scopes:      []string{"openid", "profile", "offline_access"},
	}
	want.Radio.Ports = []RadioPort{}
	want.Devices = []Device{}
	if !reflect.DeepEqual(*got, want) {
		diffConfig(t, reflect.ValueOf(*got), reflect.ValueOf(want), "")
	}
}

// diffConfig reports every leaf where got and want differ, by Go field path.
func diffConfig(t *testing.T, got, want reflect.Value, path string) {
	t.Helper()
	if got.Kind() == reflect.Struct {
		for i := range got.NumField() {
			diffConfig(t, got.Field(i), want.Field(i), path+"."+got.Type().Field(i).Name)
		}
		return
	}
	if !reflect.DeepEqual(got.Interface(), want.Interface()) {
		t.Errorf("template%s = %#v, Default()%s = %#v", path, got.Interface(), path, want.Interface())
	}
}

// A relative path in the file resolves against the file's own folder
// whether --config is given relative (run --config edgegate.yaml, from
// that folder) or absolute; before, the relative form refused
// admin.socket: state/admin.sock as "not absolute".
func TestRelativePathsResolveAgainstTheFileFolder(t *testing.T) {
	dir := t.TempDir()
	body := base + "admin:\n  socket: state/admin.sock\nstore:\n  key_file: keys/store.key\n"
	abs := writeFile(t, dir, "edgegate.yaml", body, 0o640)
	// The working directory is the file's folder for the relative form,
	// and another folder for the absolute one.
	for _, tc := range []struct{ name, cwd, arg string }{
		{"relative", dir, "edgegate.yaml"},
		{"relative with ./", dir, "./edgegate.yaml"},
		{"absolute", t.TempDir(), abs},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Chdir(tc.cwd)
			c, err := Load(tc.arg)
			if err != nil {
				t.Fatalf("Load(%q) = %v", tc.arg, err)
			}
			checks := map[string][2]string{
				"admin.socket":       {c.Admin.Socket, filepath.Join(dir, "state", "admin.sock")},
				"state_dir":          {c.StateDir, filepath.Join(dir, "state")},
				"store.key_file":     {c.Store.KeyFile, filepath.Join(dir, "keys", "store.key")},
				"central.secret":     {c.Central.ClientSecretFile, filepath.Join(dir, "secret")},
				"Path (the file)":    {c.Path, abs},
				"KeyFile() in force": {c.KeyFile(), filepath.Join(dir, "keys", "store.key")},
			}
			for key, v := range checks {
				if v[0] != v[1] {
					t.Errorf("%s = %q, want %q", key, v[0], v[1])
				}
			}
		})
	}
	// A relative devices_file too: its devices are loaded from the folder.
	t.Run("devices_file", func(t *testing.T) {
		t.Chdir(dir)
		writeFile(t, dir, "devices.yaml", "devices:\n  - {id: d1, type: T, owner: alice, k1: a, k2: b, broker: https://b.example/orion-1}\n", 0o600)
		writeFile(t, dir, "gw.yaml", body+"devices_file: devices.yaml\n", 0o640)
		c, err := Load("gw.yaml")
		if err != nil {
			t.Fatalf("Load(gw.yaml) = %v", err)
		}
		if len(c.Devices) != 1 || c.Devices[0].ID != "d1" {
			t.Errorf("devices = %+v, want d1 from devices.yaml", c.Devices)
		}
	})
}

func TestLoadNoFile(t *testing.T) {
	if _, err := Load(""); err == nil || !strings.Contains(err.Error(), "no file given") {
		t.Errorf("Load(\"\") = %v, want no file given", err)
	}
}

// Validate reports the problems of every section at once, each naming its
// key, in the order of the sections.
func TestValidateReportsEverySection(t *testing.T) {
	c := Default()
	c.Central = Central{TokenURL: "https://127.0.0.1:1/token", ClientID: "gw", ClientSecretFile: "/s"}
	if err := c.Validate(); err != nil {
		t.Fatalf("Validate(default + central) = %v", err)
	}
	c.Gateway.ID = ".."
	c.Store.MaxBatch = 0
	c.MQTT.Embedded.MaxClients = 0
	c.MQTT.Embedded.Limits.Inflight = 0
	c.Central.ClientID = ""
	c.Uplink.BatchSize = 0
	c.Radio.Ports = []RadioPort{{Path: "ttyUSB0"}}
	c.Devices = []Device{{ID: "d1", Type: "T", Owner: "o", K1: "a", K2: "b", Broker: "http://b.example"}}
	c.Metrics.Listen = "0.0.0.0:9464"
	c.Admin.Socket = "admin.sock"
	c.Pipeline.MaxAge = -time.Second
	c.Log.Level = "trace"
	err := c.Validate()
	wantKeys := []string{
		"gateway.id", "store.max_batch", "mqtt.embedded.max_clients", "mqtt.embedded.limits.inflight",
		"central.client_id", "uplink.batch_size", "radio.ports[0].path", "devices[0].broker",
		"metrics.listen", "admin.socket", "pipeline.max_age", "log.level",
	}
	var keys []string
	for _, e := range err.(interface{ Unwrap() []error }).Unwrap() {
		var fe *FieldError
		if !errors.As(e, &fe) {
			t.Fatalf("problem %v is not a *FieldError", e)
		}
		keys = append(keys, fe.Key)
	}
	if !reflect.DeepEqual(keys, wantKeys) {
		t.Errorf("keys reported = %v\nwant %v", keys, wantKeys)
	}
	// A fixed problem is no longer reported; the others still are.
	c.Log.Level = "info"
	if err := c.Validate(); err == nil || strings.Contains(err.Error(), "log.level") {
		t.Errorf("after fixing log.level: %v", err)
	}
}
