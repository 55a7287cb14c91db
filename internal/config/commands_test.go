package config

import (
	"errors"
	"slices"
	"testing"
	"time"
)

func TestValidateCommands(t *testing.T) {
	c := Default()
	c.Central = Central{TokenURL: "https://127.0.0.1:1/token", ClientID: "gw", ClientSecretFile: "/s"}
	c.Commands.Enabled = true
	if err := c.Validate(); err != nil {
		t.Fatalf("Validate(default commands) = %v", err)
	}
	c.Commands = Commands{TTL: 0, PollInterval: time.Millisecond, PollBudget: 0, Retries: 0, AckTimeout: time.Hour}
	c.Devices = []Device{{ID: "d1", Type: "T", Owner: "o", K1: "a", K2: "b", Broker: "https://b.example", Kind: "switch"}}
	err := c.Validate()
	var keys []string
	for _, e := range err.(interface{ Unwrap() []error }).Unwrap() {
		var fe *FieldError
		if errors.As(e, &fe) {
			keys = append(keys, fe.Key)
		}
	}
	for _, k := range []string{"commands.ttl", "commands.poll_interval", "commands.poll_budget", "commands.retries", "commands.ack_timeout", "devices[d1].kind"} {
		if !slices.Contains(keys, k) {
			t.Errorf("no problem reported for %s (got %q)", k, keys)
		}
	}
}

// Local control needs the embedded broker: Mosquitto would deliver an
// app's command before the gateway saw it.
func TestLocalControlNeedsEmbedded(t *testing.T) {
	keys := problemKeys
	c := Default()
	c.Central = Central{TokenURL: "https://127.0.0.1:1/token", ClientID: "gw", ClientSecretFile: "/s"}
	c.Commands.Enabled, c.Commands.LocalControl = true, true
	if k := keys(c); slices.Contains(k, "commands.local_control") {
		t.Fatalf("embedded mode: local_control refused (%q)", k)
	}
	c.MQTT.Mode = ModeExternal
	if k := keys(c); !slices.Contains(k, "commands.local_control") {
		t.Fatalf("external mode: local_control not refused (%q)", k)
	}
}

// commands.notify: each bad value is named by its key.
func TestValidateNotify(t *testing.T) {
	keys := problemKeys
	base := func() Config {
		c := Default()
		c.Central = Central{TokenURL: "https://127.0.0.1:1/token", ClientID: "gw", ClientSecretFile: "/s"}
		c.Commands.Enabled = true
		return c
	}
	ok := base()
	ok.Commands.Notify.Mode = NotifyModeMQTT
	ok.Commands.Notify.MQTT.URL = "tcp://broker.example:1883"
	if k := keys(ok); len(k) != 0 {
		t.Fatalf("valid mqtt notify refused: %q", k)
	}
	okHTTP := base()
	okHTTP.Commands.Notify.Mode = NotifyModeHTTP
	okHTTP.Commands.Notify.HTTP = NotifyHTTP{Listen: ":8443", PublicURL: "https://gw.example:8443/notify", CertFile: "/c", KeyFile: "/k"}
	if k := keys(okHTTP); len(k) != 0 {
		t.Fatalf("valid http notify refused: %q", k)
	}
	tests := []struct {
		name string
		edit func(*Notify)
		key  string
	}{
		{"mode", func(n *Notify) { n.Mode = "websocket" }, "commands.notify.mode"},
		{"expires", func(n *Notify) { n.Mode = NotifyModeMQTT; n.MQTT.URL = "tcp://b:1"; n.Expires = time.Second }, "commands.notify.expires"},
		{"safety below poll", func(n *Notify) { n.Mode = NotifyModeMQTT; n.MQTT.URL = "tcp://b:1"; n.SafetyInterval = time.Second }, "commands.notify.safety_interval"},
		{"reprobe", func(n *Notify) { n.Mode = NotifyModeMQTT; n.MQTT.URL = "tcp://b:1"; n.Reprobe = 0 }, "commands.notify.reprobe"},
		{"mqtt url", func(n *Notify) { n.Mode = NotifyModeMQTT; n.MQTT.URL = "http://b:1" }, "commands.notify.mqtt.url"},
		{"tls needs orion_url", func(n *Notify) { n.Mode = NotifyModeMQTT; n.MQTT.URL = "ssl://b:8883" }, "commands.notify.mqtt.orion_url"},
		{"orion_url tls", func(n *Notify) { n.Mode = NotifyModeMQTT; n.MQTT.URL = "tcp://b:1"; n.MQTT.OrionURL = "mqtts://b:8883" }, "commands.notify.mqtt.orion_url"},
		{"topic wildcard", func(n *Notify) { n.Mode = NotifyModeMQTT; n.MQTT.URL = "tcp://b:1"; n.MQTT.TopicPrefix = "a/#" }, "commands.notify.mqtt.topic_prefix"},
		{"user without password", func(n *Notify) { n.Mode = NotifyModeMQTT; n.MQTT.URL = "tcp://b:1"; n.MQTT.Username = "u" }, "commands.notify.mqtt.username"},
		{"http listen", func(n *Notify) {
			n.Mode = NotifyModeHTTP
			n.HTTP = NotifyHTTP{PublicURL: "https://g:1/n", CertFile: "/c", KeyFile: "/k"}
		}, "commands.notify.http.listen"},
		{"http public url", func(n *Notify) {
			n.Mode = NotifyModeHTTP
			n.HTTP = NotifyHTTP{Listen: ":1", PublicURL: "http://g:1/n", CertFile: "/c", KeyFile: "/k"}
		}, "commands.notify.http.public_url"},
		{"http cert", func(n *Notify) {
			n.Mode = NotifyModeHTTP
			n.HTTP = NotifyHTTP{Listen: ":1", PublicURL: "https://g:1/n"}
		}, "commands.notify.http.cert_file"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := base()
			tt.edit(&c.Commands.Notify)
			if k := keys(c); !slices.Contains(k, tt.key) {
				t.Errorf("Validate() keys = %q, want %s", k, tt.key)
			}
		})
	}
}

// problemKeys are the keys Validate names, in order.
func problemKeys(c Config) []string {
	var out []string
	err := c.Validate()
	if err == nil {
		return nil
	}
	for _, e := range err.(interface{ Unwrap() []error }).Unwrap() {
		var fe *FieldError
		if errors.As(e, &fe) {
			out = append(out, fe.Key)
		}
	}
	return out
}
