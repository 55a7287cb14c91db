package mqtt

import (
	"context"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
)

// cmdInbox records what a client receives, in order.
type cmdInbox struct {
	mu  sync.Mutex
	got []string
}

func (i *cmdInbox) on(_ paho.Client, m paho.Message) {
	i.mu.Lock()
	defer i.mu.Unlock()
	i.got = append(i.got, m.Topic()+" "+string(m.Payload()))
}

func (i *cmdInbox) list() []string {
	i.mu.Lock()
	defer i.mu.Unlock()
	return append([]string(nil), i.got...)
}

// subscribeCode subscribes and returns the SUBACK code (0x80: refused).
func subscribeCode(t *testing.T, c paho.Client, filter string, in *cmdInbox) byte {
	t.Helper()
	tok := c.Subscribe(filter, 1, in.on)
	if err := waitToken(tok, 5*time.Second); err != nil {
		t.Fatalf("subscribe %s: %v", filter, err)
	}
	return tok.(*paho.SubscribeToken).Result()[filter]
}

// TestMosquittoCommands: for both kinds of ingest account (the dynsec
// administrator, and a separate account), the gateway's client publishes a
// device's command on a real Mosquitto; only that device may subscribe to
// it; the device cannot publish there (the gateway's next command is the
// marker); a purge clears what a re-registered device would otherwise get;
// and Check finds the accounts in line.
func TestMosquittoCommands(t *testing.T) {
	for _, tc := range []struct{ name, user, pw string }{{"admin ingests", "", ""}, {"own ingest account", "ingest", "ingest-pw"}} {
		t.Run(tc.name, func(t *testing.T) {
			e := newDynsecEnvIngest(t, tc.user, tc.pw)
			// The first sync may have disconnected the gateway (the
			// administrator's grant); publish once it is back.
			eventually(t, "the ingest client live", e.client.Live)
			a1, err := e.dial("a1", e.password("a1"))
			if err != nil {
				t.Fatal(err)
			}
			defer a1.Disconnect(0)
			b1, err := e.dial("b1", e.password("b1"))
			if err != nil {
				t.Fatal(err)
			}
			defer b1.Disconnect(0)
			var inA, inB cmdInbox
			if q := subscribeCode(t, a1, "devices/a1/cmd/#", &inA); q != 1 {
				t.Fatalf("a1 on its own command topics: %#x", q)
			}
			for _, f := range []string{"devices/a1/cmd/#", "devices/a1/cmd/power", "devices/+/cmd/+", "#"} {
				if q := subscribeCode(t, b1, f, &inB); q != 0x80 {
					t.Fatalf("b1 on %s: %#x, want 0x80", f, q)
				}
			}
			if err := waitToken(a1.Publish("devices/a1/cmd/power", 1, true, "forged"), 5*time.Second); err != nil {
				t.Fatal(err)
			}
			if err := e.client.PublishCommand("a1", "power", []byte(`"on"`)); err != nil {
				t.Fatal(err)
			}
			eventually(t, "a1's command", func() bool { return len(inA.list()) > 0 })
			if got := inA.list(); got[0] != `devices/a1/cmd/power "on"` {
				t.Fatalf("a1's first message = %q, want the gateway's command", got)
			}
			if err := e.client.PublishCommand("a1", "a/b", []byte(`1`)); err == nil {
				t.Error("a command attribute with a '/' was published")
			}
			// Purged, a new session of a1 gets the marker first.
			if n := e.client.PurgeCommands([]string{"a1"}); n != 1 {
				t.Errorf("purged %d, want 1", n)
			}
			a1.Disconnect(0)
			again, err := e.dial("a1", e.password("a1"))
			if err != nil {
				t.Fatal(err)
			}
			defer again.Disconnect(0)
			var inA2 cmdInbox
			if q := subscribeCode(t, again, "devices/a1/cmd/#", &inA2); q != 1 {
				t.Fatalf("a1 again: %#x", q)
			}
			if err := e.client.PublishCommand("a1", "marker", []byte(`"m"`)); err != nil {
				t.Fatal(err)
			}
			eventually(t, "the marker", func() bool { return len(inA2.list()) > 0 })
			if got := inA2.list(); got[0] != `devices/a1/cmd/marker "m"` {
				t.Fatalf("a1's first message after the purge = %q, want the marker", got)
			}
			if got := inB.list(); len(got) != 0 {
				t.Errorf("b1 received %q", got)
			}
			if issues, err := e.dyn.Check(context.Background()); err != nil || len(issues) != 0 {
				t.Errorf("Check = %q, %v; want none", issues, err)
			}
		})
	}
}

func TestCommandOverlap(t *testing.T) {
	topic, _ := ParseTopic("devices/{device}/telemetry")
	for f, want := range map[string]bool{
		"devices/+/cmd/#": true, "devices/a1/cmd/power": true, "devices/+/+/+": true, "#": true, "devices/#": true,
		"$share/g/devices/+/cmd/+": true, "devices/+/telemetry": false, "devices/a1/cmd": false, "other/+/cmd/+": false,
		"devices/a1/cmd/power/x": false, "+/+/+": false,
	} {
		if got := topic.commandOverlap(f); got != want {
			t.Errorf("commandOverlap(%q) = %v, want %v", f, got, want)
		}
	}
}
