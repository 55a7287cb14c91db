package e2e

import (
	"encoding/json"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/edgegate/edgegate/internal/command"
	"github.com/edgegate/edgegate/internal/envelope"
	"github.com/edgegate/edgegate/internal/mosquittotest"
	"github.com/edgegate/edgegate/internal/sim/centralsim"
	"github.com/edgegate/edgegate/internal/testkit"
	"github.com/edgegate/edgegate/internal/uplink"
)

// TestExternalModeCommands: the real daemon in external mode, with the
// accounts of a real Mosquitto kept through its dynamic-security plugin,
// and commands on. The owner's PATCH at the simulated broker filter
// reaches an MQTT light on Mosquitto as a command signed with the light's
// key, on its own command topic; the light's state report comes back to
// the entity signed by the gateway, and the retained command is then
// cleared. Another device's account is refused the light's command topic
// (SUBACK 0x80) and never receives it.
func TestExternalModeCommands(t *testing.T) {
	x := startExternalCommands(t, "1m")
	mq, sim, g, light, other := x.mq, x.sim, x.g, x.light, x.other
	cmdTopic := "devices/" + light.ID + "/cmd/power"
	var mu sync.Mutex
	var got, otherGot []paho.Message
	record := func(into *[]paho.Message) func(*paho.ClientOptions) {
		return func(o *paho.ClientOptions) {
			o.SetDefaultPublishHandler(func(_ paho.Client, m paho.Message) {
				mu.Lock()
				*into = append(*into, m)
				mu.Unlock()
			})
		}
	}
	lc, err := connect(mq.URL, light.ID, light.ID, devicePassword(t, light), record(&got))
	if err != nil {
		t.Fatalf("the light's login to Mosquitto (its account made by the gateway): %v", err)
	}
	defer lc.Disconnect(50)
	if q := subscribe(t, lc, "devices/"+light.ID+"/cmd/#"); q != 1 {
		t.Fatalf("the light's subscription to its command topics: granted %#x, want 1", q)
	}
	oc, err := connect(mq.URL, other.ID, other.ID, devicePassword(t, other), record(&otherGot))
	if err != nil {
		t.Fatal(err)
	}
	defer oc.Disconnect(50)
	for _, f := range []string{cmdTopic, "devices/" + light.ID + "/cmd/#", "devices/+/cmd/#"} {
		if q := subscribe(t, oc, f); q != 0x80 {
			t.Fatalf("another device's subscription to %s: granted %#x, want 0x80", f, q)
		}
	}

	// The owner's IoT App switches the light on through the filter.
	if code, body := ownerPatch(t, sim, "alice", light.ID, `{"power":{"value":"on","type":"Text"}}`); code != http.StatusNoContent {
		t.Fatalf("the owner's PATCH through the filter: %d %s", code, body)
	}
	var first paho.Message
	testkit.Eventually(t, 20*time.Second, "the command at the light", func() bool {
		mu.Lock()
		defer mu.Unlock()
		for _, m := range got {
			if len(m.Payload()) > 0 {
				first = m
				return true
			}
		}
		return false
	})
	if first.Topic() != cmdTopic {
		t.Fatalf("command on %q, want %q", first.Topic(), cmdTopic)
	}
	var msg command.Wire
	if err := json.Unmarshal(first.Payload(), &msg); err != nil {
		t.Fatalf("command message %s: %v", first.Payload(), err)
	}
	key, err := envelope.DeriveHS256(light.ID, light.K1, light.K2)
	if err != nil {
		t.Fatal(err)
	}
	claims, err := envelope.Open(msg.JWS, key)
	if err != nil {
		t.Fatalf("the command does not verify with the light's key: %v", err)
	}
	if claims.Kind != envelope.KindCommand || claims.Device != light.ID || claims.Gateway != "gw-e2e" || claims.Attrs["power"].Value != "on" ||
		msg.Seq != 1 || string(msg.Value) != `"on"` {
		t.Fatalf("command %s with claims %+v, want seq 1, power on, kind command from gw-e2e", first.Payload(), claims)
	}

	// The light applies it and reports its state as a reading.
	if tok := lc.Publish("devices/"+light.ID+"/telemetry", 1, false, `{"power":"on"}`); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("the light's state report: %v", tok.Error())
	}
	testkit.Eventually(t, 20*time.Second, "the light's state at the entity, signed by the gateway", func() bool {
		ent, ok := sim.Entity(light.ID)
		if !ok {
			return false
		}
		doc, _ := json.Marshal(ent)
		rep, err := envelope.VerifyEntity(doc, []envelope.Key{key}, "")
		if err != nil {
			return false
		}
		for _, a := range rep.Attrs {
			if a.Name == "power" {
				m, _ := ent["power"].(map[string]any)
				return a.Verdict == envelope.Verified && m["value"] == "on"
			}
		}
		return false
	})
	// Confirmed at the platform, the retained command is cleared (an empty
	// retained publish, which the light's live subscription sees).
	testkit.Eventually(t, 20*time.Second, "the retained command cleared", func() bool {
		mu.Lock()
		defer mu.Unlock()
		for _, m := range got {
			if m.Topic() == cmdTopic && len(m.Payload()) == 0 {
				return true
			}
		}
		return false
	})
	mu.Lock()
	for _, m := range otherGot {
		t.Errorf("the other device received %s: %s", m.Topic(), m.Payload())
	}
	mu.Unlock()
	assertNoSecrets(t, g.log.String(), light, other)
	if strings.Contains(g.log.String(), mosquittotest.AdminPassword) {
		t.Fatal("the Mosquitto administrator's password reached the log")
	}
}

// externalCommands is a running daemon in external mode with dynsec
// accounts and commands on, two MQTT lights (actuators) of alice.
type externalCommands struct {
	mq           *mosquittotest.Broker
	sim          *centralsim.Server
	g            *gateway
	cfg          string
	light, other testDevice
}

// lightSession opens a session of the light (client id suffixed with
// name), subscribed to its command topics, closed at the test's end.
func (x externalCommands) lightSession(t *testing.T, name string) *inbox {
	t.Helper()
	in := &inbox{}
	c, err := connect(x.mq.URL, x.light.ID+"-"+name, x.light.ID, devicePassword(t, x.light), in.option)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Disconnect(50) })
	if q := subscribe(t, c, "devices/"+x.light.ID+"/cmd/#"); q != 1 {
		t.Fatalf("subscribe: granted %#x", q)
	}
	return in
}

func startExternalCommands(t *testing.T, ttl string) externalCommands {
	t.Helper()
	const admin = "edgegate"
	mq := mosquittotest.Start(t, admin)
	t.Cleanup(func() {
		if t.Failed() {
			b, _ := os.ReadFile(mq.LogFile)
			t.Logf("mosquitto:\n%s", tail(string(b), 60))
		}
	})
	light, other := dev("light-e2e", "alice"), dev("light-other", "alice")
	light.Type, other.Type = "Light", "Light"
	sim := startSimWith(t, func(o *centralsim.Options) {
		for i := range o.Devices {
			o.Devices[i].Attrs = []string{"power"}
		}
	}, light, other)
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "mqtt-password"), []byte(mosquittotest.AdminPassword+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	mqttCfg := "mqtt:\n  mode: external\n  external:\n    url: " + mq.URL + "\n    client_id: edgegate-cmd\n    username: " + admin +
		"\n    password_file: mqtt-password\n    accounts: dynsec\n"
	cfg := writeGatewayConfig(t, dir, sim, gatewayConfig{MQTT: mqttCfg,
		Extra: "commands:\n  enabled: true\n  ttl: " + ttl + "\n  poll_interval: 200ms\n"}, light, other)
	// Both lights are actuators (writeGatewayConfig writes sensors).
	devs, err := os.ReadFile(filepath.Join(dir, "devices.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	devs = []byte(strings.ReplaceAll(string(devs), "    broker: ", "    kind: actuator\n    broker: "))
	if err := os.WriteFile(filepath.Join(dir, "devices.yaml"), devs, 0o600); err != nil {
		t.Fatal(err)
	}
	g := startGateway(t, cfg) // ready: the accounts are in line and the ingest subscribed
	return externalCommands{mq: mq, sim: sim, g: g, cfg: cfg, light: light, other: other}
}

// TestExternalModeStaleRetainedAfterRestart: a command published retained
// on Mosquitto and not confirmed when the daemon is killed, whose TTL runs
// out while it is down, is cleared by the restarted daemon: a device
// session opened afterwards does not get it, only the next command.
func TestExternalModeStaleRetainedAfterRestart(t *testing.T) {
	x := startExternalCommands(t, "3s")
	cmdTopic := "devices/" + x.light.ID + "/cmd/power"
	live := x.lightSession(t, "live")
	if code, body := ownerPatch(t, x.sim, "alice", x.light.ID, `{"power":{"value":"on","type":"Text"}}`); code != http.StatusNoContent {
		t.Fatalf("PATCH: %d %s", code, body)
	}
	testkit.Eventually(t, 20*time.Second, "the command at the light", func() bool { return len(live.commands(t)) > 0 })
	first := live.commands(t)[0]
	// The light never confirms; the daemon is killed with the command
	// retained at Mosquitto, and stays down past its TTL.
	x.g.kill()
	testkit.Eventually(t, 20*time.Second, "the command's TTL run out", func() bool { return time.Now().After(first.Expires) })
	startGateway(t, x.cfg)
	testkit.Eventually(t, 20*time.Second, "the restarted daemon clearing the expired command", func() bool {
		return live.cleared(cmdTopic)
	})
	fresh := x.lightSession(t, "fresh")
	if code, body := ownerPatch(t, x.sim, "alice", x.light.ID, `{"power":{"value":"off","type":"Text"}}`); code != http.StatusNoContent {
		t.Fatalf("PATCH: %d %s", code, body)
	}
	testkit.Eventually(t, 20*time.Second, "the next command on the fresh session", func() bool { return len(fresh.commands(t)) > 0 })
	for _, c := range fresh.commands(t) {
		if c.Seq != 2 || string(c.Value) != `"off"` {
			t.Fatalf("the fresh session got seq %d %s, want only the next command (seq 2, off)", c.Seq, c.Value)
		}
	}
}

// inbox records what an MQTT session receives.
type inbox struct {
	mu  sync.Mutex
	got []paho.Message
}

func (b *inbox) option(o *paho.ClientOptions) {
	o.SetDefaultPublishHandler(func(_ paho.Client, m paho.Message) {
		b.mu.Lock()
		b.got = append(b.got, m)
		b.mu.Unlock()
	})
}

// commands are the non-empty messages received, decoded.
func (b *inbox) commands(t *testing.T) []command.Wire {
	t.Helper()
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []command.Wire
	for _, m := range b.got {
		if len(m.Payload()) == 0 {
			continue
		}
		var c command.Wire
		if err := json.Unmarshal(m.Payload(), &c); err != nil {
			t.Fatalf("message on %s is not a command: %s", m.Topic(), m.Payload())
		}
		out = append(out, c)
	}
	return out
}

// cleared reports whether an empty (clearing) publish on topic arrived.
func (b *inbox) cleared(topic string) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, m := range b.got {
		if m.Topic() == topic && len(m.Payload()) == 0 {
			return true
		}
	}
	return false
}

// subscribe returns the QoS Mosquitto granted (0x80: refused).
func subscribe(t *testing.T, c paho.Client, filter string) byte {
	t.Helper()
	tok := c.Subscribe(filter, 1, nil)
	if !tok.WaitTimeout(5 * time.Second) {
		t.Fatalf("subscribe %s: no SUBACK", filter)
	}
	st, _ := tok.(*paho.SubscribeToken)
	return st.Result()[filter]
}

// ownerPatch is an IoT App's write of device's attributes through the
// simulated filter, as user.
func ownerPatch(t *testing.T, sim *centralsim.Server, user, device, body string) (int, string) {
	t.Helper()
	tok, err := sim.IssueAccessToken(user, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	req, err := http.NewRequest(http.MethodPatch, sim.BrokerURL()+"/v2/entities/"+device+"/attrs", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+tok)
	req.Header.Set("Content-Type", "application/json")
	resp, err := uplink.NewHTTPClient(sim.CAPool(), 5*time.Second, 1).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}
