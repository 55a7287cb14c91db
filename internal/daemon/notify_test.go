package daemon

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/edgegate/edgegate/internal/command"
	"github.com/edgegate/edgegate/internal/config"
)

// commands.notify becomes the service's transport; the broker password
// is read from its private file and registered for redaction first.
func TestNotifyOptions(t *testing.T) {
	c := config.Default().Commands
	if n, err := notifyOptions(c, "gw", func(...string) {}, nil); n != nil || err != nil {
		t.Fatalf("mode none = %+v, %v; want polling only", n, err)
	}
	pw := filepath.Join(t.TempDir(), "notify.pw")
	if err := os.WriteFile(pw, []byte("s3cret-notify\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	c.Notify.Mode = config.NotifyModeMQTT
	c.Notify.MQTT = config.NotifyMQTT{URL: "tcp://broker.example:1883", TopicPrefix: "gw/notify", Username: "gw", PasswordFile: pw}
	var redacted []string
	n, err := notifyOptions(c, "0123456789abcdef0123", func(s ...string) { redacted = append(redacted, s...) }, nil)
	if err != nil {
		t.Fatal(err)
	}
	m, ok := n.Transport.(*command.MQTTNotify)
	if !ok || m.Password != "s3cret-notify" || m.ClientID != "edgegate-notify-0123456789ab" || !slices.Contains(redacted, "s3cret-notify") {
		t.Fatalf("transport = %#v, redacted %q", n.Transport, redacted)
	}
	target := m.Target("relay-1")["mqtt"].(map[string]any)
	if target["url"] != "mqtt://broker.example:1883" || target["topic"] != "gw/notify/relay-1" || target["user"] != "gw" {
		t.Errorf("notification target = %v", target)
	}
	if n.Expires != c.Notify.Expires || n.SafetyInterval != c.Notify.SafetyInterval || n.ReprobeMax != c.Notify.Reprobe {
		t.Errorf("options = %+v", n)
	}
	if err := os.Chmod(pw, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := notifyOptions(c, "gw", func(...string) {}, nil); err == nil || !strings.Contains(err.Error(), "commands.notify.mqtt.password_file") {
		t.Errorf("a world-readable password file: %v, want refused naming the key", err)
	}
	c.Notify.Mode = config.NotifyModeHTTP
	c.Notify.HTTP = config.NotifyHTTP{Listen: "127.0.0.1:0", PublicURL: "https://gw.example/n", CertFile: "/nonexistent.crt", KeyFile: "/nonexistent.key"}
	if _, err := notifyOptions(c, "gw", func(...string) {}, nil); err == nil || !strings.Contains(err.Error(), "commands.notify.http.cert_file") {
		t.Errorf("a missing certificate: %v, want an error naming the key", err)
	}
}
