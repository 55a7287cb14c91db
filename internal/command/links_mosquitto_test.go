package command_test

import (
	"context"
	"log/slog"
	"os"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/edgegate/edgegate/internal/command"
	"github.com/edgegate/edgegate/internal/envelope"
	"github.com/edgegate/edgegate/internal/mosquittotest"
	"github.com/edgegate/edgegate/internal/testkit"
	"github.com/edgegate/edgegate/mqtt"
	"github.com/edgegate/edgegate/policy"
)

// external puts the env's devices behind a real Mosquitto with the
// dynamic-security plugin, as mqtt.mode external with accounts dynsec
// does (components.go): the gateway's Dynsec keeps the accounts, its
// ingest client takes the readings into the pipeline and publishes the
// commands. It returns the broker and the ingest client.
func (e *env) external(appUser, appPW string) (*mosquittotest.Broker, *mqtt.Client) {
	e.t.Helper()
	const admin = "edgegate"
	mq := mosquittotest.Start(e.t, admin, "log_type all")
	e.t.Cleanup(func() {
		if e.t.Failed() {
			b, _ := os.ReadFile(mq.LogFile)
			e.t.Logf("mosquitto:\n%s", b)
		}
	})
	topic, err := mqtt.ParseTopic("devices/{device}/telemetry")
	if err != nil {
		e.t.Fatal(err)
	}
	app := mqtt.AppAccount{User: appUser, Fingerprint: mqtt.AppFingerprint(appUser, appPW)}
	dyn := mqtt.NewDynsec(mqtt.DynsecOptions{URL: mq.URL, Username: admin, Password: mosquittotest.AdminPassword,
		Topic: topic, Policy: e.engine, IngestUser: admin, Timeout: 5 * time.Second,
		Apps:   func() ([]mqtt.AppAccount, error) { return []mqtt.AppAccount{app}, nil },
		Logger: slog.New(slog.NewTextHandler(e.bus, nil))})
	cl := mqtt.NewClient(e.pipe, mqtt.ClientOptions{URL: mq.URL, ClientID: "edgegate-ingest", Username: admin,
		Password: mosquittotest.AdminPassword, Topic: topic, Logger: slog.New(slog.NewTextHandler(e.bus, nil))})
	// As the daemon does (components.go openIngest, openCommands).
	e.engine.OnChange(func(ch policy.Change) {
		dyn.Nudge()
		cl.PurgeCommands(append(append([]string(nil), ch.Revoked...), ch.Rebound...))
	})
	ctx, cancel := context.WithCancel(context.Background())
	dDone, cDone := make(chan struct{}), make(chan struct{})
	go func() { defer close(dDone); _ = dyn.Run(ctx) }()
	go func() { defer close(cDone); _ = cl.Run(ctx) }()
	e.t.Cleanup(func() { cancel(); <-dDone; <-cDone })
	for what, ch := range map[string]<-chan struct{}{"accounts synced": dyn.Synced(), "ingest subscribed": cl.Subscribed()} {
		select {
		case <-ch:
		case <-time.After(20 * time.Second):
			e.t.Fatalf("%s: never (%s)", what, dyn.LastError())
		}
	}
	if err := dyn.AddApp(ctx, app, appPW); err != nil {
		e.t.Fatal(err)
	}
	e.stop()
	e.route = func(d *policy.Device) command.Deliverer {
		if d.Radio != nil || d.ID == coilID {
			return nil
		}
		return command.MQTT{Broker: cl}
	}
	e.startService()
	return mq, cl
}

// dialAt connects a paho client to url as user, recording what it gets.
func (e *env) dialAt(url, user, pw, clientID string) *device {
	e.t.Helper()
	d := &device{}
	o := paho.NewClientOptions().AddBroker(url).SetClientID(clientID).
		SetUsername(user).SetPassword(pw).SetAutoReconnect(false).SetConnectTimeout(5 * time.Second)
	o.SetDefaultPublishHandler(func(_ paho.Client, m paho.Message) {
		d.mu.Lock()
		d.got = append(d.got, mqttMsg{m.Topic(), append([]byte(nil), m.Payload()...)})
		d.mu.Unlock()
	})
	d.c = paho.NewClient(o)
	if tok := d.c.Connect(); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		e.t.Fatalf("connect %s: %v", user, tok.Error())
	}
	e.t.Cleanup(func() { d.c.Disconnect(100) })
	return d
}

func (e *env) dialDeviceAt(url, id, clientID string) *device {
	e.t.Helper()
	pw, err := envelope.DeriveMQTTPassword(id, devKeys[id][0], devKeys[id][1])
	if err != nil {
		e.t.Fatal(err)
	}
	return e.dialAt(url, id, pw, clientID)
}

// An owner's write at the simulated filter reaches an MQTT light behind an
// external Mosquitto on its own command topic, signed, and is confirmed by
// the state the light publishes; nobody else can read that topic (another
// device, the owner's own app account) and the light cannot write it; the
// confirmed command is cleared, and a re-registration purges an
// unconfirmed one.
func TestMQTTLightMosquitto(t *testing.T) {
	e := newEnv(t, time.Minute)
	const appPW = "app-password-0123456789"
	mq, cl := e.external(owner, appPW)

	light := e.dialDeviceAt(mq.URL, lightID, "light-1-client")
	if q := light.subscribe(t, "devices/"+lightID+"/cmd/+"); q != 1 {
		t.Fatalf("the light's subscription to its command topic: granted %#x", q)
	}
	other := e.dialDeviceAt(mq.URL, light2, "light-2-client")
	for _, f := range []string{"devices/" + lightID + "/cmd/+", "devices/" + lightID + "/#", "devices/+/cmd/#", "#"} {
		if q := other.subscribe(t, f); q != 0x80 {
			t.Fatalf("light-2's subscription to %s: granted %#x, want 0x80", f, q)
		}
	}
	if q := other.subscribe(t, "devices/"+light2+"/cmd/#"); q != 1 {
		t.Fatalf("light-2's own command topic: granted %#x", q)
	}
	// The owner's app account (the policy lets alice read the light) may
	// read its readings, never its commands.
	app := e.dialAt(mq.URL, owner, appPW, "alice-app")
	for _, f := range []string{"devices/" + lightID + "/cmd/+", "devices/" + lightID + "/cmd/power", "devices/#", "#"} {
		if q := app.subscribe(t, f); q != 0x80 {
			t.Fatalf("the app's subscription to %s: granted %#x, want 0x80", f, q)
		}
	}
	if q := app.subscribe(t, "devices/+/telemetry"); q != 1 {
		t.Fatalf("the app's subscription to the readings: granted %#x", q)
	}
	// The light publishes on its own command topic (and light-2 on the
	// light's): Mosquitto acknowledges and drops both (MQTT 3.1.1 has no
	// refusal code). The gateway's command, published after, is the marker:
	// it is the first message the light gets.
	for _, d := range []*device{light, other} {
		if tok := d.c.Publish("devices/"+lightID+"/cmd/power", 1, true, `"forged"`); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
			t.Fatalf("forged publish: %v", tok.Error())
		}
	}
	e.write(owner, lightID, `{"power":{"value":"on","type":"Text"}}`)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("gateway:\n%s", e.bus.String())
		}
	})
	testkit.Eventually(t, wait, "the light's command", func() bool { return len(light.messages()) > 0 })
	m := light.messages()[0]
	if m.topic != "devices/"+lightID+"/cmd/power" {
		t.Fatalf("command topic = %q (%s)", m.topic, m.payload)
	}
	if c := commandOf(t, m); c.Kind != envelope.KindCommand || c.Device != lightID || c.Gateway != gwID || c.Attrs["power"].Value != "on" {
		t.Fatalf("the light's first message: %+v, want the signed command", c)
	}
	// The light applies it and reports its state as a reading, which the
	// gateway ingests from Mosquitto and forwards signed.
	if tok := light.c.Publish("devices/"+lightID+"/telemetry", 1, false, `{"power":"on"}`); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("state publish: %v", tok.Error())
	}
	testkit.Eventually(t, wait, "the light's state at the platform, signed", func() bool {
		v, verdict := e.attr(lightID, "power")
		return v == "on" && verdict == envelope.Verified
	})
	testkit.Eventually(t, wait, "the light's command confirmed", func() bool { return e.command(lightID, "power").State == command.Confirmed })
	testkit.Eventually(t, wait, "the app got the light's state reading", func() bool {
		for _, m := range app.messages() {
			if m.topic == "devices/"+lightID+"/telemetry" {
				return true
			}
		}
		return false
	})
	// Confirmed, the retained command is cleared: a fresh session gets only
	// the next command. The clear (an empty retained publish) reaches the
	// light's live subscription too; once it has, Mosquitto holds no
	// retained command for a new session.
	testkit.Eventually(t, wait, "the retained command cleared", func() bool {
		for _, m := range light.messages() {
			if m.topic == "devices/"+lightID+"/cmd/power" && len(m.payload) == 0 {
				return true
			}
		}
		return false
	})
	fresh := e.dialDeviceAt(mq.URL, lightID, "light-1-fresh")
	if q := fresh.subscribe(t, "devices/"+lightID+"/cmd/#"); q != 1 {
		t.Fatalf("fresh subscription: granted %#x", q)
	}
	e.write(owner, lightID, `{"power":{"value":"off","type":"Text"}}`)
	testkit.Eventually(t, wait, "the next command on the fresh session", func() bool { return len(fresh.messages()) > 0 })
	if c := commandOf(t, fresh.messages()[0]); c.Attrs["power"].Value != "off" || c.Seq != 2 {
		t.Fatalf("fresh session's first message: %+v, want the new command (seq 2, off)", c)
	}

	// light-2's own command reaches it; it never got the light's.
	e.write(owner, light2, `{"power":{"value":"dim","type":"Text"}}`)
	testkit.Eventually(t, wait, "light-2's own command", func() bool { return len(other.messages()) > 0 })
	for _, m := range other.messages() {
		if !strings.HasPrefix(m.topic, "devices/"+light2+"/cmd/") {
			t.Errorf("light-2 received %s: %s", m.topic, m.payload)
		}
	}
	for _, m := range app.messages() {
		if strings.Contains(m.topic, "/cmd/") {
			t.Errorf("the app received a command: %s %s", m.topic, m.payload)
		}
	}
	// Clearing a retained message is an empty retained publish, which
	// Mosquitto also delivers to the subscribers of the moment: the light
	// sees its first command's clear, and nothing else but its commands.
	var cmds, clears int
	for _, m := range light.messages() {
		switch {
		case m.topic == "devices/"+lightID+"/cmd/power" && len(m.payload) == 0:
			clears++
		case m.topic == "devices/"+lightID+"/cmd/power":
			cmds++
		default:
			t.Errorf("light-1 received %s: %s", m.topic, m.payload)
		}
	}
	if cmds != 2 || clears < 1 {
		t.Errorf("light-1 received %d commands and %d clears, want its two commands and the first one's clear", cmds, clears)
	}

	// light-2 is re-registered to bob with its "dim" unconfirmed: the
	// retained command is purged. A new session of light-2 subscribes; the
	// gateway then publishes a marker; the marker is the first message.
	regs := append([]policy.Registration(nil), e.regs...)
	for i := range regs {
		if regs[i].ID == light2 {
			regs[i].Owner = "bob"
		}
	}
	pol, err := policy.New(1, "config", regs)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.engine.Apply(pol, true); err != nil {
		t.Fatal(err)
	}
	other.c.Disconnect(100)
	again := e.dialDeviceAt(mq.URL, light2, "light-2-again")
	if q := again.subscribe(t, "devices/"+light2+"/cmd/#"); q != 1 {
		t.Fatalf("light-2 again: granted %#x", q)
	}
	markerFirst(t, cl, again, light2, "after the re-registration", "the old command purged")
}

// markerFirst publishes a marker command to dev through cl and fails
// unless it is the first message d receives: nothing older (a retained
// command that should be gone) came before it.
func markerFirst(t *testing.T, cl *mqtt.Client, d *device, dev, when, why string) {
	t.Helper()
	if err := cl.PublishCommand(dev, "marker", []byte(`"marker"`)); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, wait, "the marker", func() bool { return len(d.messages()) > 0 })
	if m := d.messages()[0]; m.topic != "devices/"+dev+"/cmd/marker" {
		t.Fatalf("%s's first message %s: %s %s, want the marker (%s)", dev, when, m.topic, m.payload, why)
	}
}
