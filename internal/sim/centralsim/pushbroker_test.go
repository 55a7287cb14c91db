package centralsim

import (
	"crypto/tls"
	"fmt"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
)

// TestPushWillRefused: a gateway account leaving a will on another
// gateway's policy topic (a forged bundle, retained) is refused at CONNECT,
// so nothing it "drops" ever reaches the other gateway; a will on its own
// topic is refused too (clients publish nothing). The same account without
// a will connects.
func TestPushWillRefused(t *testing.T) {
	f := newFixture(t, syncOptions, func(o *Options) { o.MQTT = true })
	victim, err := mqttClient(t, f, "gw-bob", f.clientToken(t, "bob", "gw-bob"))
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan string, 8)
	sub := victim.Subscribe(PushTopic(gwBeta), 1, func(_ paho.Client, m paho.Message) { got <- string(m.Payload()) })
	if !sub.WaitTimeout(5*time.Second) || sub.Error() != nil {
		t.Fatalf("subscribe: %v", sub.Error())
	}
	withWill := func(topic string) error {
		o := paho.NewClientOptions().AddBroker(f.sim.MQTTURL()).
			SetClientID(fmt.Sprintf("hostile-%d", time.Now().UnixNano())).
			SetUsername("gw-1").SetPassword(f.clientToken(t, "alice", "gw-1")).
			SetTLSConfig(&tls.Config{RootCAs: f.sim.CAPool(), MinVersion: tls.VersionTLS12}).
			SetConnectTimeout(5*time.Second).SetAutoReconnect(false).
			SetBinaryWill(topic, []byte(`forged-bundle`), 1, true)
		c := paho.NewClient(o)
		tok := c.Connect()
		if !tok.WaitTimeout(10 * time.Second) {
			return fmt.Errorf("connect timed out")
		}
		if tok.Error() == nil {
			c.Disconnect(0)
		}
		return tok.Error()
	}
	for _, topic := range []string{PushTopic(gwBeta), PushTopic(gwAlpha)} {
		err := withWill(topic)
		if err == nil || !strings.Contains(err.Error(), "not Authorized") {
			t.Fatalf("CONNECT with a will on %s: %v, want CONNACK 0x05 not authorized", topic, err)
		}
	}
	if _, err := mqttClient(t, f, "gw-1", f.clientToken(t, "alice", "gw-1")); err != nil {
		t.Fatalf("the same account without a will: %v", err)
	}
	if err := f.sim.Push(gwBeta, false); err != nil {
		t.Fatal(err)
	}
	select {
	case p := <-got:
		if p != NudgePayload {
			t.Fatalf("gw-beta received %q first, want only the operator's nudge", p)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the operator's push was not delivered")
	}
	// A new subscriber gets no retained forgery either.
	late, err := mqttClient(t, f, "gw-bob", f.clientToken(t, "bob", "gw-bob"))
	if err != nil {
		t.Fatal(err)
	}
	retained := make(chan string, 1)
	late.Subscribe(PushTopic(gwBeta), 1, func(_ paho.Client, m paho.Message) { retained <- string(m.Payload()) }).WaitTimeout(5 * time.Second)
	select {
	case p := <-retained:
		t.Fatalf("a retained message %q reached a new subscriber", p)
	case <-time.After(300 * time.Millisecond):
	}
}

// TestPushSessionBoundToAccount: gw-1 presenting gw-bob's client id (its
// persistent session is subscribed to gw-beta's bundles) is refused; gw-bob
// resumes its own session.
func TestPushSessionBoundToAccount(t *testing.T) {
	f := newFixture(t, syncOptions, func(o *Options) { o.MQTT = true })
	dial := func(user, token string) (paho.Client, error) {
		o := paho.NewClientOptions().AddBroker(f.sim.MQTTURL()).SetClientID("gw-bob-session").SetCleanSession(false).
			SetUsername(user).SetPassword(token).
			SetTLSConfig(&tls.Config{RootCAs: f.sim.CAPool(), MinVersion: tls.VersionTLS12}).
			SetConnectTimeout(5 * time.Second).SetAutoReconnect(false)
		c := paho.NewClient(o)
		tok := c.Connect()
		if !tok.WaitTimeout(10 * time.Second) {
			return nil, fmt.Errorf("connect timed out")
		}
		return c, tok.Error()
	}
	bob, err := dial("gw-bob", f.clientToken(t, "bob", "gw-bob"))
	if err != nil {
		t.Fatal(err)
	}
	if s := bob.Subscribe(PushTopic(gwBeta), 1, nil); !s.WaitTimeout(5*time.Second) || s.Error() != nil {
		t.Fatalf("subscribe: %v", s.Error())
	}
	bob.Disconnect(0)
	if c, err := dial("gw-1", f.clientToken(t, "alice", "gw-1")); err == nil || !strings.Contains(err.Error(), "not Authorized") {
		if c != nil && err == nil {
			c.Disconnect(0)
		}
		t.Fatalf("gw-1 with gw-bob's client id: %v, want not authorized", err)
	}
	back, err := dial("gw-bob", f.clientToken(t, "bob", "gw-bob"))
	if err != nil {
		t.Fatalf("gw-bob resuming its session: %v", err)
	}
	back.Disconnect(0)
}
