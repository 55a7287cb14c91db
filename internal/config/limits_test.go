package config

import (
	"strings"
	"testing"
	"time"
)

func TestConfigBrokerLimits(t *testing.T) {
	dir := t.TempDir()
	c, err := Load(writeFile(t, dir, "t.yaml", Template, 0o640))
	if err != nil {
		t.Fatal(err)
	}
	if got, want := c.MQTT.Embedded.Limits, Default().MQTT.Embedded.Limits; got != want {
		t.Errorf("template limits = %+v, want the defaults %+v", got, want)
	}
	// A partial section keeps the other defaults.
	c, err = Load(writeFile(t, dir, "p.yaml", base+"mqtt:\n  embedded:\n    limits:\n      connections_per_device: 2\n      will_bytes: 1KiB\n", 0o600))
	if err != nil {
		t.Fatal(err)
	}
	l := c.MQTT.Embedded.Limits
	if l.ConnectionsPerDevice != 2 || l.WillBytes != 1<<10 || l.ConnectionsPerUser != 8 || l.ConnectTimeout != 10*time.Second {
		t.Errorf("partial limits = %+v", l)
	}
}

func TestConfigBrokerLimitsNameTheKey(t *testing.T) {
	tests := []struct{ yaml, want string }{
		{"connections_per_device: 0", "mqtt.embedded.limits.connections_per_device"},
		{"connections_per_user: -1", "mqtt.embedded.limits.connections_per_user"},
		{"subscriptions_per_client: 100000", "mqtt.embedded.limits.subscriptions_per_client"},
		{"filters_per_subscribe: 0", "mqtt.embedded.limits.filters_per_subscribe"},
		{"inflight: 70000", "mqtt.embedded.limits.inflight"},
		{"writes_pending: 0", "mqtt.embedded.limits.writes_pending"},
		{"kept_session_bytes: 1GiB", "mqtt.embedded.limits.kept_session_bytes"},
		{"retained_bytes: 1GiB", "mqtt.embedded.limits.retained_bytes"},
		{"retained_bytes_per_principal: 2MiB", "mqtt.embedded.limits.retained_bytes_per_principal"},
		{"retained_messages: 0", "mqtt.embedded.limits.retained_messages"},
		{"will_bytes: 0", "mqtt.embedded.limits.will_bytes"},
		{"app_packet_bytes: 1MiB", "mqtt.embedded.limits.app_packet_bytes"},
		{"connect_timeout: 0s", "mqtt.embedded.limits.connect_timeout"},
		{"pending_connects: 0", "mqtt.embedded.limits.pending_connects"},
		{"pending_connects_per_host: 1000", "mqtt.embedded.limits.pending_connects_per_host"},
		{"max_keepalive: 24h", "mqtt.embedded.limits.max_keepalive"},
		{"max_conections: 3", "mqtt.embedded.limits.max_conections"},
	}
	for _, tt := range tests {
		t.Run(tt.yaml, func(t *testing.T) {
			_, err := Load(writeFile(t, t.TempDir(), "c.yaml", base+"mqtt:\n  embedded:\n    limits:\n      "+tt.yaml+"\n", 0o600))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("Load(limits %s) = %v, want an error naming %s", tt.yaml, err, tt.want)
			}
		})
	}
}
