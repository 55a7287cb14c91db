package command_test

import (
	"context"
	"encoding/json"
	"log/slog"
	"slices"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/command"
	"github.com/edgegate/edgegate/internal/envelope"
	"github.com/edgegate/edgegate/internal/mosquittotest"
	"github.com/edgegate/edgegate/internal/testkit"
	"github.com/edgegate/edgegate/mqtt"
	"github.com/edgegate/edgegate/policy"
)

// A device's confirmation never overwrites a newer target: the relay
// confirms T1 (on) while the gateway's link to the platform is down; the
// owner writes T2 (off) at the filter meanwhile; once the link is back the
// relay ends off and the entity shows off, signed — the gateway never
// writes T1 after the owner's T2, a restart in between included.
func TestStaleConfirmationNotWritten(t *testing.T) {
	e := newEnv(t, time.Minute)
	e.unplug()
	if code, body := e.patch(owner, relayID, `{"status":{"value":true,"type":"Boolean"}}`); code != 204 {
		t.Fatalf("PATCH T1: %d %s", code, body)
	}
	e.learned(relayID, "status", 1)
	e.link.set(true)
	e.replug()
	testkit.Eventually(t, wait, "the relay switched on (T1)", func() bool { return slices.Contains(e.relaySets(), "1/2=1") })
	testkit.Eventually(t, wait, "T1 acknowledged by the relay", func() bool { return e.command(relayID, "status").State == command.Delivered })
	// The confirmation waits in the command's record: it needs a read of
	// the platform first, which fails during the outage.
	fails := e.svc.Stats().PollErrors
	testkit.Eventually(t, wait, "reads failing with the confirmation held", func() bool { return e.svc.Stats().PollErrors > fails+1 })
	if c := e.command(relayID, "status"); c.State != command.Delivered || len(c.Reported) == 0 {
		t.Errorf("during the outage the command is %+v, want delivered with its confirmation held", c)
	}
	if st := e.svc.Stats(); st.WriteBacks != 0 {
		t.Errorf("%d write-backs queued while the platform could not be read", st.WriteBacks)
	}
	// The held confirmation is durable: a restart during the outage keeps
	// it, still waiting for a read of the platform.
	e.stop()
	e.startService()
	fails = e.svc.Stats().PollErrors
	testkit.Eventually(t, wait, "reads failing after the restart", func() bool { return e.svc.Stats().PollErrors > fails+1 })
	if c := e.command(relayID, "status"); c.State != command.Delivered || len(c.Reported) == 0 || e.svc.Stats().WriteBacks != 0 {
		t.Errorf("after a restart during the outage the command is %+v, want delivered with its confirmation held", c)
	}
	// The owner's App writes T2 at the filter (the platform is up for it).
	if code, body := e.patch(owner, relayID, `{"status":{"value":false,"type":"Boolean"}}`); code != 204 {
		t.Fatalf("PATCH T2: %d %s", code, body)
	}
	t2 := len(e.sim.Updates()) - 1
	e.link.set(false)
	testkit.Eventually(t, wait, "the relay switched off (T2)", func() bool { return slices.Equal(e.relaySets(), []string{"1/2=1", "1/2=0"}) })
	testkit.Eventually(t, wait, "T2's signed confirmation at the platform", func() bool {
		v, verdict := e.attr(relayID, "status")
		return v == false && verdict == envelope.Verified
	})
	testkit.Eventually(t, wait, "T2 confirmed", func() bool {
		c := e.command(relayID, "status")
		return c.Seq == 2 && c.State == command.Confirmed
	})
	ups := e.sim.Updates()
	if u := ups[t2]; u.Device != relayID || u.Gateway != "" {
		t.Fatalf("update %d = %+v, want the owner's unsigned T2", t2, u)
	}
	for _, u := range ups[t2+1:] {
		if u.Device != relayID {
			continue
		}
		var a struct {
			Value any `json:"value"`
		}
		_ = json.Unmarshal(u.Attrs["status"], &a)
		if a.Value == true {
			t.Errorf("after the owner's T2, the gateway wrote T1: %+v", u)
		}
	}
	if v, verdict := e.attr(relayID, "status"); v != false || verdict != envelope.Verified {
		t.Errorf("final state %v (%s), want off, signed", v, verdict)
	}
	if st := e.svc.Stats(); st.Superseded == 0 {
		t.Errorf("superseded = 0, want T1 counted as superseded")
	}
}

// A command published retained on an external Mosquitto, whose TTL ran
// out while the gateway was down, is not delivered to the device after
// the restart: the restarted gateway clears it, though its ingest client
// connects only after the command service has settled it (the clear is
// retried until Mosquitto takes it).
func TestExpiredRetainedCommandClearedAfterRestart(t *testing.T) {
	e := newEnv(t, 3*time.Second)
	mq, _ := e.external(owner, "app-password-0123456789")
	e.write(owner, lightID, `{"power":{"value":"on","type":"Text"}}`)
	testkit.Eventually(t, wait, "the command published, retained", func() bool { return e.command(lightID, "power").State == command.Sent })
	if got := e.svc.HeldAttrs(lightID); !slices.Equal(got, []string{"power"}) {
		t.Fatalf("held = %q, want power", got)
	}
	// The gateway goes down; the command's TTL runs out meanwhile.
	e.stop()
	expires := e.command(lightID, "power").Expires
	testkit.Eventually(t, wait, "the TTL run out", func() bool { return time.Now().After(expires) })

	// The restart: the command service runs before the new ingest client
	// has a connection.
	cl := e.restartExternal(mq)
	testkit.Eventually(t, wait, "the command expired", func() bool { return e.command(lightID, "power").State == command.Expired })
	if got := e.svc.HeldAttrs(lightID); !slices.Equal(got, []string{"power"}) {
		t.Fatalf("held before the broker is reachable = %q, want power (the clear is still to make)", got)
	}
	runClient(t, cl)
	testkit.Eventually(t, wait, "the retained command cleared", func() bool { return len(e.svc.HeldAttrs(lightID)) == 0 })

	// The light connects after the restart: the expired command is not
	// delivered; the next command is its first message.
	light := e.dialDeviceAt(mq.URL, lightID, "light-1-after-restart")
	if q := light.subscribe(t, "devices/"+lightID+"/cmd/#"); q != 1 {
		t.Fatalf("subscribe: granted %#x", q)
	}
	e.write(owner, lightID, `{"power":{"value":"off","type":"Text"}}`)
	testkit.Eventually(t, wait, "the next command", func() bool { return len(light.messages()) > 0 })
	for _, m := range light.messages() {
		if len(m.payload) == 0 {
			continue
		}
		if c := commandOf(t, m); c.Seq != 2 || c.Attrs["power"].Value != "off" {
			t.Fatalf("the light got %+v after the restart, want only the new command (seq 2, off)", c)
		}
	}
	if c := commandOf(t, light.messages()[0]); c.Seq != 2 {
		t.Fatalf("first message seq %d, want 2", c.Seq)
	}
}

// A device that left the policy while the gateway was down has its
// retained command cleared at the restart (the command record index): a
// later registration of the same id never gets it.
func TestGoneDeviceRetainedCommandClearedAfterRestart(t *testing.T) {
	e := newEnv(t, time.Minute)
	mq, _ := e.external(owner, "app-password-0123456789")
	e.write(owner, light2, `{"power":{"value":"dim","type":"Text"}}`)
	testkit.Eventually(t, wait, "the command published, retained", func() bool { return e.command(light2, "power").State == command.Sent })
	e.stop()
	// light-2 leaves the policy while the gateway is down: the restarted
	// gateway starts with a policy that does not list it (no change event).
	pol := e.policyWithout(t, light2)
	// The accounts stay as they were (Dynsec runs on the old engine): the
	// light-2 account can still look at its command topic.
	e.engine = policy.NewEngine(pol)
	cl := e.restartExternal(mq)
	runClient(t, cl)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("gateway:\n%s", e.bus.String())
		}
	})
	testkit.Eventually(t, wait, "the gone device's retained command cleared", func() bool { return len(e.svc.HeldAttrs(light2)) == 0 })
	d := e.dialDeviceAt(mq.URL, light2, "light-2-after-restart")
	if q := d.subscribe(t, "devices/"+light2+"/cmd/#"); q != 1 {
		t.Fatalf("subscribe: granted %#x", q)
	}
	markerFirst(t, cl, d, light2, "after the restart", "the old command cleared")
}

// restartExternal stands for a gateway restart in external mode: a new
// ingest client (not running yet: Run it with runClient) and a new command
// service routed to it, started at once.
func (e *env) restartExternal(mq *mosquittotest.Broker) *mqtt.Client {
	e.t.Helper()
	topic, err := mqtt.ParseTopic("devices/{device}/telemetry")
	if err != nil {
		e.t.Fatal(err)
	}
	cl := mqtt.NewClient(e.pipe, mqtt.ClientOptions{URL: mq.URL, ClientID: "edgegate-ingest-restarted", Username: "edgegate",
		Password: mosquittotest.AdminPassword, Topic: topic, Logger: slog.New(slog.NewTextHandler(e.bus, nil))})
	e.route = func(d *policy.Device) command.Deliverer {
		if d.Radio != nil || d.ID == coilID {
			return nil
		}
		return command.MQTT{Broker: cl}
	}
	e.startService()
	return cl
}

func runClient(t *testing.T, cl *mqtt.Client) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = cl.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	select {
	case <-cl.Subscribed():
	case <-time.After(wait):
		t.Fatal("the restarted ingest client never subscribed")
	}
}
