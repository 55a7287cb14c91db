package command_test

import (
	"encoding/json"
	"github.com/prometheus/client_golang/prometheus"
	"slices"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/edgegate/edgegate/internal/command"
	"github.com/edgegate/edgegate/internal/envelope"
	"github.com/edgegate/edgegate/internal/sim/centralsim"
	"github.com/edgegate/edgegate/internal/sim/radiosim"
	"github.com/edgegate/edgegate/internal/testkit"
	"github.com/edgegate/edgegate/policy"
)

const wait = 15 * time.Second

// An owner's write at the filter reaches the MySensors relay (a set with
// the ack flag, echoed by the node) and the relay's state comes back to
// the entity, signed by the gateway.
func TestOwnerSwitchesRelay(t *testing.T) {
	e := newEnv(t, time.Minute)
	t0 := time.Now()
	if code, body := e.patch(owner, relayID, `{"status":{"value":true,"type":"Boolean"}}`); code != 204 {
		t.Fatalf("owner's PATCH through the filter: %d %s", code, body)
	}
	testkit.Eventually(t, wait, "the relay switched on", func() bool { return slices.Contains(e.relaySets(), "1/2=1") })
	switched := time.Since(t0)
	testkit.Eventually(t, wait, "the relay's state back at the platform, signed", func() bool {
		v, verdict := e.attr(relayID, "status")
		return v == true && verdict == envelope.Verified
	})
	t.Logf("PATCH → relay switched %v, → signed state at the platform %v (poll interval 100ms)", switched.Round(time.Millisecond), time.Since(t0).Round(time.Millisecond))
	testkit.Eventually(t, wait, "the command confirmed", func() bool { return e.command(relayID, "status").State == command.Confirmed })
	c := e.command(relayID, "status")
	if c.Seq != 1 || c.Origin != "platform" || string(c.Value) != "true" {
		t.Errorf("command = %+v, want seq 1 from the platform, value true", c)
	}
	// Switched off again: a new command, sent once.
	e.write(owner, relayID, `{"status":{"value":false,"type":"Boolean"}}`)
	testkit.Eventually(t, wait, "the relay switched off", func() bool { return slices.Equal(e.relaySets(), []string{"1/2=1", "1/2=0"}) })
	testkit.Eventually(t, wait, "off confirmed", func() bool {
		c := e.command(relayID, "status")
		return c.State == command.Confirmed && c.Seq == 2
	})
	if got := e.relaySets(); !slices.Equal(got, []string{"1/2=1", "1/2=0"}) {
		t.Errorf("relay sets = %q, want each command once", got)
	}
	// bob's valve, which the filter does not let the gateway's account
	// read, fails on its own and holds nobody up.
	if st := e.svc.Stats(); st.PollErrors == 0 {
		t.Errorf("no failed read counted for %s", bobsID)
	}
}

// A foreign user's write is refused by the filter with the stock answer
// and never reaches the device: the owner's later write is the only set
// the relay ever sees.
func TestForeignWriteRefused(t *testing.T) {
	e := newEnv(t, time.Minute)
	code, body := e.patch(foreign, relayID, `{"status":{"value":true,"type":"Boolean"}}`)
	if code != 401 || !strings.Contains(body, `"result":false`) || !strings.Contains(body, centralsim.MsgCredentialsNotValid) {
		t.Fatalf("foreign PATCH = %d %s, want the filter's 401 refusal", code, body)
	}
	if v, _ := e.attr(relayID, "status"); v != "" {
		t.Fatalf("the refused write changed the entity: %v", v)
	}
	if code, body := e.patch(owner, relayID, `{"status":{"value":false,"type":"Boolean"}}`); code != 204 {
		t.Fatalf("owner's PATCH: %d %s", code, body)
	}
	testkit.Eventually(t, wait, "the owner's command", func() bool { return len(e.relaySets()) > 0 })
	if got := e.relaySets(); !slices.Equal(got, []string{"1/2=0"}) {
		t.Errorf("relay sets = %q, want only the owner's 1/2=0", got)
	}
}

// The MQTT light gets its signed command on its own command topic, and
// confirms by publishing its new state; a foreign device can neither
// subscribe to that topic nor receive the command (proven by the order
// of deliveries: its own command arrives, the other's never did).
func TestMQTTLight(t *testing.T) {
	e := newEnv(t, time.Minute)
	light := e.connectDevice(lightID)
	if q := light.subscribe(t, "devices/"+lightID+"/cmd/+"); q != 1 {
		t.Fatalf("the light's subscription to its command topic: granted %#x", q)
	}
	other := e.connectDevice(light2)
	if q := other.subscribe(t, "devices/"+lightID+"/cmd/+"); q != 0x80 {
		t.Fatalf("a foreign device's subscription to the light's command topic: granted %#x, want 0x80", q)
	}
	if q := other.subscribe(t, "devices/"+lightID+"/#"); q != 0x80 {
		t.Fatalf("a foreign device's wildcard on the light: granted %#x, want 0x80", q)
	}
	if q := other.subscribe(t, "devices/"+light2+"/cmd/#"); q != 1 {
		t.Fatalf("light-2's own command topic: granted %#x", q)
	}
	// A device may not publish commands: MQTT 3.1.1 has no refusal code,
	// so the broker closes the connection (and nothing is delivered).
	evil := e.connectDeviceAs(light2, "light-2-evil")
	evil.c.Publish("devices/"+lightID+"/cmd/power", 1, false, `{"value":true}`).WaitTimeout(2 * time.Second)
	testkit.Eventually(t, wait, "the hostile publisher disconnected", func() bool { return !evil.c.IsConnectionOpen() })

	e.write(owner, lightID, `{"power":{"value":"on","type":"Text"}}`)
	testkit.Eventually(t, wait, "the light's command", func() bool { return len(light.messages()) > 0 })
	m := light.messages()[0]
	if m.topic != "devices/"+lightID+"/cmd/power" {
		t.Fatalf("command topic = %q", m.topic)
	}
	var msg command.Wire
	if err := json.Unmarshal(m.payload, &msg); err != nil {
		t.Fatalf("command message %s: %v", m.payload, err)
	}
	key, _ := envelope.DeriveHS256(lightID, devKeys[lightID][0], devKeys[lightID][1])
	claims, err := envelope.Open(msg.JWS, key)
	if err != nil {
		t.Fatalf("the device cannot verify its command: %v", err)
	}
	if claims.Kind != envelope.KindCommand || claims.Device != lightID || claims.Gateway != gwID || claims.Seq != msg.Seq ||
		claims.Attrs["power"].Value != "on" || string(msg.Value) != `"on"` {
		t.Fatalf("signed command = %+v, message %s", claims, m.payload)
	}
	// Another device's key does not open it.
	k2, _ := envelope.DeriveHS256(light2, devKeys[light2][0], devKeys[light2][1])
	if _, err := envelope.Open(msg.JWS, k2); err == nil {
		t.Fatal("light-2's key verified light-1's command")
	}
	// The light applies it and reports its state as a reading.
	if tok := light.c.Publish("devices/"+lightID+"/telemetry", 1, false, `{"power":"on"}`); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("state publish: %v", tok.Error())
	}
	testkit.Eventually(t, wait, "the light's state at the platform, signed", func() bool {
		v, verdict := e.attr(lightID, "power")
		return v == "on" && verdict == envelope.Verified
	})
	testkit.Eventually(t, wait, "the light's command confirmed", func() bool { return e.command(lightID, "power").State == command.Confirmed })
	// Confirmed, the retained command is cleared: a fresh session of the
	// light gets only the next command, not the old one first.
	fresh := e.connectDeviceAs(lightID, "light-1-fresh")
	if q := fresh.subscribe(t, "devices/"+lightID+"/cmd/#"); q != 1 {
		t.Fatalf("fresh subscription: granted %#x", q)
	}
	e.write(owner, lightID, `{"power":{"value":"off","type":"Text"}}`)
	testkit.Eventually(t, wait, "the next command on the fresh session", func() bool { return len(fresh.messages()) > 0 })
	if c := commandOf(t, fresh.messages()[0]); c.Attrs["power"].Value != "off" || c.Seq != 2 {
		t.Fatalf("fresh session's first message: %+v, want the new command (seq 2, off)", c)
	}

	// The marker: light-2's own command reaches it; light-1's never did.
	e.write(owner, light2, `{"power":{"value":"dim","type":"Text"}}`)
	testkit.Eventually(t, wait, "light-2's own command", func() bool { return len(other.messages()) > 0 })
	for _, m := range other.messages() {
		if !strings.HasPrefix(m.topic, "devices/"+light2+"/") {
			t.Errorf("light-2 received %s: %s", m.topic, m.payload)
		}
	}
	if n := len(light.messages()); n != 2 {
		t.Errorf("light-1 received %d messages, want its two commands (a device's publish on a command topic must not reach it)", n)
	}
}

func (e *env) unplug() {
	e.t.Helper()
	if err := e.rsim.Unplug(); err != nil {
		e.t.Fatal(err)
	}
	testkit.Eventually(e.t, wait, "the radio port closed", func() bool { return !e.radio.Ports()[0].Open })
}

func (e *env) replug() {
	e.t.Helper()
	if err := e.rsim.Replug(); err != nil {
		e.t.Fatal(err)
	}
	testkit.Eventually(e.t, wait, "the radio port open again", func() bool { return e.radio.Ports()[0].Open })
}

func (e *env) learned(attrDevice, attr string, seq uint64) {
	e.t.Helper()
	testkit.Eventually(e.t, wait, "command learned", func() bool { return e.command(attrDevice, attr).Seq == seq })
}

// A command written while the gateway's link to the platform is down is
// learned and delivered once the link returns, and its confirmation
// reaches the platform.
func TestOutageThenDelivery(t *testing.T) {
	e := newEnv(t, time.Minute)
	e.link.set(true)
	before := e.svc.Stats().PollErrors
	testkit.Eventually(t, wait, "the gateway's reads failing", func() bool { return e.svc.Stats().PollErrors > before+1 })
	e.write(owner, relayID, `{"status":{"value":true,"type":"Boolean"}}`)
	fails := e.svc.Stats().PollErrors
	testkit.Eventually(t, wait, "more failed reads during the outage", func() bool { return e.svc.Stats().PollErrors > fails })
	if got := e.relaySets(); len(got) != 0 {
		t.Fatalf("relay sets during the outage = %q", got)
	}
	e.link.set(false)
	testkit.Eventually(t, wait, "the relay switched once the link is back", func() bool { return slices.Contains(e.relaySets(), "1/2=1") })
	testkit.Eventually(t, wait, "confirmed at the platform", func() bool {
		v, verdict := e.attr(relayID, "status")
		return v == true && verdict == envelope.Verified
	})
	if got := e.relaySets(); !slices.Equal(got, []string{"1/2=1"}) {
		t.Errorf("relay sets = %q, want one", got)
	}
}

// A command its device cannot get within commands.ttl expires and is
// never sent, not even once the device is back.
func TestExpiredNeverSent(t *testing.T) {
	e := newEnv(t, 1500*time.Millisecond)
	e.unplug()
	e.write(owner, relayID, `{"status":{"value":true,"type":"Boolean"}}`)
	e.learned(relayID, "status", 1)
	testkit.Eventually(t, wait, "the command expired", func() bool { return e.command(relayID, "status").State == command.Expired })
	if c := e.command(relayID, "status"); c.Attempts == 0 {
		t.Errorf("expired command %+v: no delivery attempt counted while the node was away", c)
	}
	e.replug()
	// The marker: a later command reaches the relay; the expired one never did.
	e.write(owner, relayID, `{"status":{"value":false,"type":"Boolean"}}`)
	testkit.Eventually(t, wait, "the later command", func() bool { return len(e.relaySets()) > 0 })
	if got := e.relaySets(); !slices.Equal(got, []string{"1/2=0"}) {
		t.Errorf("relay sets = %q, want only the later command", got)
	}
	if st := e.svc.Stats(); st.Expired != 1 {
		t.Errorf("expired = %d, want 1", st.Expired)
	}
}

// A restart between learning a command and delivering it delivers it
// once, with the same sequence number; a restart after delivery sends
// nothing again.
func TestRestartDeliversOnce(t *testing.T) {
	e := newEnv(t, time.Minute)
	e.unplug()
	e.write(owner, relayID, `{"status":{"value":true,"type":"Boolean"}}`)
	e.learned(relayID, "status", 1)
	e.stop()
	e.replug()
	e.startService()
	testkit.Eventually(t, wait, "delivered after the restart", func() bool { return slices.Contains(e.relaySets(), "1/2=1") })
	testkit.Eventually(t, wait, "confirmed", func() bool { return e.command(relayID, "status").State == command.Confirmed })
	if c := e.command(relayID, "status"); c.Seq != 1 {
		t.Errorf("seq after the restart = %d, want the same command (1)", c.Seq)
	}
	e.stop()
	e.startService()
	e.write(owner, relayID, `{"status":{"value":false,"type":"Boolean"}}`)
	testkit.Eventually(t, wait, "the next command", func() bool { return len(e.relaySets()) >= 2 })
	if got := e.relaySets(); !slices.Equal(got, []string{"1/2=1", "1/2=0"}) {
		t.Errorf("relay sets = %q, want each command once", got)
	}
	if c := e.command(relayID, "status"); c.Seq != 2 {
		t.Errorf("seq = %d, want 2 (sequence numbers survive restarts)", c.Seq)
	}
}

// Newest wins: a value learned while an older one waits replaces it; the
// older one is never sent, before or after a restart.
func TestNewestWins(t *testing.T) {
	e := newEnv(t, time.Minute)
	e.unplug()
	e.write(owner, relayID, `{"status":{"value":true,"type":"Boolean"}}`)
	e.learned(relayID, "status", 1)
	e.write(owner, relayID, `{"status":{"value":false,"type":"Boolean"}}`)
	e.learned(relayID, "status", 2)
	e.stop()
	e.replug()
	e.startService()
	testkit.Eventually(t, wait, "the newest value delivered", func() bool { return len(e.relaySets()) > 0 })
	testkit.Eventually(t, wait, "confirmed", func() bool { return e.command(relayID, "status").State == command.Confirmed })
	if got := e.relaySets(); !slices.Equal(got, []string{"1/2=0"}) {
		t.Errorf("relay sets = %q, want only the newest value", got)
	}
	// The marker: a new command goes out; the superseded one still never.
	e.write(owner, relayID, `{"status":{"value":true,"type":"Boolean"}}`)
	testkit.Eventually(t, wait, "the marker command", func() bool { return len(e.relaySets()) >= 2 })
	if got := e.relaySets(); !slices.Equal(got, []string{"1/2=0", "1/2=1"}) {
		t.Errorf("relay sets = %q", got)
	}
}

// A set lost on the air (no echo) is sent again until the node echoes
// it; the relay applies it once.
func TestLostSetResent(t *testing.T) {
	e := newEnv(t, time.Minute, envOpt{radio: func(o *radiosim.Options) { o.DropSets = 2 }})
	e.write(owner, relayID, `{"status":{"value":true,"type":"Boolean"}}`)
	testkit.Eventually(t, wait, "the relay switched", func() bool { return slices.Contains(e.relaySets(), "1/2=1") })
	testkit.Eventually(t, wait, "confirmed", func() bool { return e.command(relayID, "status").State == command.Confirmed })
	if st := e.rsim.Stats(); st.RelayDropped != 2 || len(st.RelaySets) != 1 {
		t.Errorf("dropped %d, applied %q; want 2 lost sends and one applied", st.RelayDropped, st.RelaySets)
	}
}

func commandOf(t *testing.T, m mqttMsg) envelope.Claims {
	t.Helper()
	var msg command.Wire
	if err := json.Unmarshal(m.payload, &msg); err != nil {
		t.Fatalf("command message %s: %v", m.payload, err)
	}
	key, _ := envelope.DeriveHS256(lightID, devKeys[lightID][0], devKeys[lightID][1])
	c, err := envelope.Open(msg.JWS, key)
	if err != nil || c.Kind != envelope.KindCommand {
		t.Fatalf("not a signed command (%v): %s", err, m.payload)
	}
	return c
}

// Local control on: the owner's application publishes a command on the
// light's command topic; the light gets it signed, never raw. A user with
// no write grant is refused and nothing reaches the light.
func TestLocalControl(t *testing.T) {
	e := newEnv(t, time.Minute, envOpt{local: true})
	light := e.connectDevice(lightID)
	if q := light.subscribe(t, "devices/"+lightID+"/cmd/#"); q != 1 {
		t.Fatalf("subscribe: granted %#x", q)
	}
	app := e.connectApp(owner)
	if tok := app.c.Publish("devices/"+lightID+"/cmd/power", 1, false, `"off"`); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("owner's local command: %v", tok.Error())
	}
	testkit.Eventually(t, wait, "the local command at the light", func() bool { return len(light.messages()) > 0 })
	if c := commandOf(t, light.messages()[0]); c.Attrs["power"].Value != "off" || c.Seq != 1 {
		t.Fatalf("command = %+v", c)
	}
	if c := e.command(lightID, "power"); c.Origin != "local:"+owner {
		t.Errorf("origin = %q", c.Origin)
	}
	evil := e.connectApp(foreign)
	evil.c.Publish("devices/"+lightID+"/cmd/power", 1, false, `"on"`).WaitTimeout(2 * time.Second)
	testkit.Eventually(t, wait, "the foreign application disconnected", func() bool { return !evil.c.IsConnectionOpen() })
	// The marker: the owner's next command arrives second; nothing came between.
	if tok := app.c.Publish("devices/"+lightID+"/cmd/power", 1, false, `{"value":"dim","type":"Text"}`); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("owner's second command: %v", tok.Error())
	}
	testkit.Eventually(t, wait, "the second command", func() bool { return len(light.messages()) >= 2 })
	msgs := light.messages()
	if c := commandOf(t, msgs[1]); len(msgs) != 2 || c.Attrs["power"].Value != "dim" || c.Seq != 2 {
		t.Fatalf("light got %d messages, second %+v", len(msgs), c)
	}
}

// Local control off (the default): an application's publish on a command
// topic is refused, even the owner's.
func TestLocalControlOff(t *testing.T) {
	e := newEnv(t, time.Minute)
	light := e.connectDevice(lightID)
	if q := light.subscribe(t, "devices/"+lightID+"/cmd/#"); q != 1 {
		t.Fatalf("subscribe: granted %#x", q)
	}
	app := e.connectApp(owner)
	app.c.Publish("devices/"+lightID+"/cmd/power", 1, false, `"off"`).WaitTimeout(2 * time.Second)
	testkit.Eventually(t, wait, "the application disconnected", func() bool { return !app.c.IsConnectionOpen() })
	e.write(owner, lightID, `{"power":{"value":"on","type":"Text"}}`)
	testkit.Eventually(t, wait, "the platform's command", func() bool { return len(light.messages()) > 0 })
	if msgs := light.messages(); len(msgs) != 1 || commandOf(t, msgs[0]).Attrs["power"].Value != "on" {
		t.Fatalf("light got %d messages: want only the platform's command", len(msgs))
	}
}

// A device re-registered (here: another owner) has its open commands
// dropped: what was learned under the old registration is never sent.
func TestReboundDropsCommands(t *testing.T) {
	e := newEnv(t, time.Minute)
	e.unplug()
	e.write(owner, relayID, `{"status":{"value":true,"type":"Boolean"}}`)
	e.learned(relayID, "status", 1)
	regs := append([]policy.Registration(nil), e.regs...)
	regs[0].Owner = "bob"
	pol, err := policy.New(1, "config", regs)
	if err != nil {
		t.Fatal(err)
	}
	if ch, err := e.engine.Apply(pol, true); err != nil || !slices.Contains(ch.Rebound, relayID) {
		t.Fatalf("Apply = %+v, %v", ch, err)
	}
	if c := e.command(relayID, "status"); c.State != command.Dropped {
		t.Fatalf("command after the re-registration = %+v, want dropped", c)
	}
	e.replug()
	e.write(owner, relayID, `{"status":{"value":false,"type":"Boolean"}}`)
	testkit.Eventually(t, wait, "the new registration's command", func() bool { return len(e.relaySets()) > 0 })
	if got := e.relaySets(); !slices.Equal(got, []string{"1/2=0"}) {
		t.Errorf("relay sets = %q, want only the command learned after the re-registration", got)
	}
}

// A Modbus coil, through the real master and a simulated slave on a
// pseudo-terminal: the value written and read back
// is the reported state, written back to the entity; a value the coil
// cannot take is dropped, not retried.
func TestModbusCoil(t *testing.T) {
	e := newEnv(t, time.Minute)
	e.write(owner, coilID, `{"on":{"value":true,"type":"Boolean"}}`)
	testkit.Eventually(t, wait, "the coil written", func() bool { n, on := e.coils.writes(); return n == 1 && on })
	testkit.Eventually(t, wait, "the coil's state at the platform, signed", func() bool {
		v, verdict := e.attr(coilID, "on")
		return v == true && verdict == envelope.Verified
	})
	testkit.Eventually(t, wait, "confirmed", func() bool { return e.command(coilID, "on").State == command.Confirmed })
	// What /metrics shows is what Stats counts.
	reg := prometheus.NewRegistry()
	reg.MustRegister(e.svc.Collector())
	if got := collectorEvent(t, reg, "confirmed"); got < 1 {
		t.Errorf(`edgegate_commands_total{event="confirmed"} = %v, want ≥ 1`, got)
	}
	e.write(owner, coilID, `{"on":{"value":"half","type":"Text"}}`)
	testkit.Eventually(t, wait, "the bad value dropped", func() bool {
		c := e.command(coilID, "on")
		return c.Seq == 2 && c.State == command.Dropped
	})
	if n, on := e.coils.writes(); n != 1 || !on {
		t.Errorf("the slave applied %d writes (coil on=%v), want only the first", n, on)
	}
}

// An application never gets a command, not even the device's owner with
// a wildcard; a re-registered device's retained command is dropped.
func TestCommandTopicAppsAndRebound(t *testing.T) {
	e := newEnv(t, time.Minute)
	app := e.connectApp(owner)
	app.c.AddRoute("#", func(_ paho.Client, m paho.Message) {
		app.mu.Lock()
		app.got = append(app.got, mqttMsg{m.Topic(), append([]byte(nil), m.Payload()...)})
		app.mu.Unlock()
	})
	if q := app.subscribe(t, "devices/"+lightID+"/cmd/+"); q != 0x80 {
		t.Fatalf("the owner's application on the command topic: granted %#x, want 0x80", q)
	}
	if q := app.subscribe(t, "#"); q != 1 {
		t.Fatalf("the owner's application on #: granted %#x", q)
	}
	e.write(owner, lightID, `{"power":{"value":"on","type":"Text"}}`)
	testkit.Eventually(t, wait, "the command sent", func() bool { return e.command(lightID, "power").State == command.Sent })
	// The marker: the light's own reading reaches the application (it may
	// read it), the command published before it never did.
	light := e.connectDevice(lightID)
	if tok := light.c.Publish("devices/"+lightID+"/telemetry", 1, false, `{"power":"on"}`); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("reading: %v", tok.Error())
	}
	testkit.Eventually(t, wait, "the light's reading at the application", func() bool { return len(app.messages()) > 0 })
	for _, m := range app.messages() {
		if strings.Contains(m.topic, "/cmd/") {
			t.Fatalf("an application got a command: %s", m.topic)
		}
	}
	// Re-registered (another owner) before a device took the retained
	// command: it is dropped, and a session of the device gets only what
	// is learned after.
	e.write(owner, light2, `{"power":{"value":"on","type":"Text"}}`)
	testkit.Eventually(t, wait, "light-2's command sent", func() bool { return e.command(light2, "power").State == command.Sent })
	regs := append([]policy.Registration(nil), e.regs...)
	regs[2].Owner = "bob"
	pol, err := policy.New(1, "config", regs)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.engine.Apply(pol, true); err != nil {
		t.Fatal(err)
	}
	if c := e.command(light2, "power"); c.State != command.Dropped {
		t.Fatalf("light-2's command after the re-registration: %+v", c)
	}
	l2 := e.connectDevice(light2)
	if q := l2.subscribe(t, "devices/"+light2+"/cmd/#"); q != 1 {
		t.Fatalf("subscribe: granted %#x", q)
	}
	e.write(owner, light2, `{"power":{"value":"off","type":"Text"}}`)
	testkit.Eventually(t, wait, "light-2's new command", func() bool { return len(l2.messages()) > 0 })
	var msg struct {
		Seq   uint64          `json:"seq"`
		Value json.RawMessage `json:"value"`
	}
	if err := json.Unmarshal(l2.messages()[0].payload, &msg); err != nil || msg.Seq != 2 || string(msg.Value) != `"off"` {
		t.Fatalf("light-2's first message: %s (%v), want the command learned after the re-registration", l2.messages()[0].payload, err)
	}
}

// After a restart, a command handed to the MQTT link but not confirmed
// is published again with the same seq: the embedded broker keeps no
// retained message across restarts (here its loss is made explicit), and
// a device that connects afterwards still gets the newest command.
func TestMQTTRepublishAfterRestart(t *testing.T) {
	e := newEnv(t, time.Minute)
	e.write(owner, lightID, `{"power":{"value":"on","type":"Text"}}`)
	testkit.Eventually(t, wait, "the command sent", func() bool { return e.command(lightID, "power").State == command.Sent })
	e.stop()
	e.broker.ClearCommand(lightID, "power") // what a restarted broker holds: nothing
	e.startService()
	light := e.connectDevice(lightID)
	if q := light.subscribe(t, "devices/"+lightID+"/cmd/#"); q != 1 {
		t.Fatalf("subscribe: granted %#x", q)
	}
	testkit.Eventually(t, wait, "the command published again", func() bool { return len(light.messages()) > 0 })
	if c := commandOf(t, light.messages()[0]); c.Seq != 1 || c.Attrs["power"].Value != "on" {
		t.Fatalf("republished command = %+v, want seq 1, on", c)
	}
}

// A confirmation the store cannot take yet (full) stays with its command
// and is queued once it can: the relay's state still reaches the platform,
// and the relay is not switched again.
func TestWriteBackRetried(t *testing.T) {
	e := newEnv(t, time.Minute, envOpt{submitFails: 2})
	e.write(owner, relayID, `{"status":{"value":true,"type":"Boolean"}}`)
	testkit.Eventually(t, wait, "the relay's state at the platform, signed", func() bool {
		v, verdict := e.attr(relayID, "status")
		return v == true && verdict == envelope.Verified
	})
	if st := e.svc.Stats(); st.WriteBackFailures != 2 || st.WriteBacks != 1 {
		t.Errorf("write-backs: %d failed, %d queued; want 2 and 1", st.WriteBackFailures, st.WriteBacks)
	}
	if got := e.relaySets(); !slices.Equal(got, []string{"1/2=1"}) {
		t.Errorf("relay sets = %q, want one", got)
	}
}

// collectorEvent is one event's edgegate_commands_total, gathered from reg.
func collectorEvent(t *testing.T, reg *prometheus.Registry, event string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "edgegate_commands_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			if m.GetLabel()[0].GetValue() == event {
				return m.GetCounter().GetValue()
			}
		}
	}
	t.Fatalf("edgegate_commands_total{event=%q} not exported", event)
	return 0
}
