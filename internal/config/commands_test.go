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
	keys := func(c Config) []string {
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
