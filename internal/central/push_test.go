package central

import (
	"context"
	"crypto/tls"
	"fmt"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	centralsync "github.com/edgegate/edgegate/sync"
)

// TestPushACL: on the push broker a gateway's token reads its own topic
// (and gets its bundle at once, retained) and nothing else; nobody
// publishes; a token of another account is refused at CONNECT. Pairing's
// own client finds the companion's keys.
func TestPushACL(t *testing.T) {
	e := newEnv(t, nil)
	e.insert("alice", "th-1", "gw-a")
	e.insert("alice", "th-2", "gw-b")
	ctx := context.Background()
	if _, err := e.svc.Refresh(ctx, false); err != nil {
		t.Fatal(err)
	}
	if _, n, err := centralsync.FetchPolicyKeys(ctx, e.gwHTTP, e.api.URL); err != nil || n != 1 {
		t.Fatalf("pairing's FetchPolicyKeys: %d keys, %v", n, err)
	}
	tokA := e.gatewayToken("gw-a-client", gwASecret)
	n := 0
	connect := func(user, pass string) (paho.Client, error) {
		n++
		c := paho.NewClient(paho.NewClientOptions().AddBroker(e.mqttURL).SetClientID(fmt.Sprintf("t-%s-%d", user, n)).SetUsername(user).
			SetPassword(pass).SetTLSConfig(&tls.Config{RootCAs: e.ca.Pool()}).SetAutoReconnect(false).SetConnectTimeout(5 * time.Second))
		tok := c.Connect()
		if !tok.WaitTimeout(5 * time.Second) {
			t.Fatal("connect: no answer")
		}
		return c, tok.Error()
	}
	if c, err := connect("gw-b-client", tokA); err == nil {
		c.Disconnect(0)
		t.Fatal("gw-a's token accepted as gw-b-client")
	}
	if c, err := connect("gw-a-client", "not-a-token"); err == nil {
		c.Disconnect(0)
		t.Fatal("a bad token accepted")
	}
	// paho calls every matching handler of a client: the refused
	// subscriptions get a client of their own, which must receive nothing.
	snoop, err := connect("gw-a-client", tokA)
	if err != nil {
		t.Fatal(err)
	}
	defer snoop.Disconnect(0)
	leaked := make(chan []byte, 4)
	sub := func(c paho.Client, topic string, ch chan []byte) byte {
		st := c.Subscribe(topic, 1, func(_ paho.Client, m paho.Message) { ch <- m.Payload() })
		if !st.WaitTimeout(5 * time.Second) {
			t.Fatalf("subscribe %s: no answer", topic)
		}
		return st.(*paho.SubscribeToken).Result()[topic]
	}
	for _, topic := range []string{centralsync.PushTopic("gw-b"), "edgegate/gateways/+/policy", "#"} {
		if code := sub(snoop, topic, leaked); code != 0x80 {
			t.Errorf("subscription to %s granted (%#x)", topic, code)
		}
	}
	c, err := connect("gw-a-client", tokA)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Disconnect(0)
	got := make(chan []byte, 4)
	if code := sub(c, centralsync.PushTopic("gw-a"), got); code == 0x80 {
		t.Fatal("own topic refused")
	}
	select {
	case b := <-got:
		v, err := centralsync.NewVerifier(centralsync.VerifierOptions{Keys: e.pinnedKeys(), Gateway: "gw-a"})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := v.Verify(b, 0); err != nil {
			t.Fatalf("retained bundle: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no retained bundle on the gateway's own topic")
	}
	if _, err := e.svc.Refresh(ctx, true); err != nil { // pushes gw-a's and gw-b's bundles again
		t.Fatal(err)
	}
	select {
	case b := <-got:
		if string(b) == "forged" {
			t.Fatal("a client's publish was delivered")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("forced push not received")
	}
	// A client's publish is refused (mochi drops it, and the MQTT 3
	// client with it).
	snoop.Publish(centralsync.PushTopic("gw-a"), 1, true, "forged").WaitTimeout(time.Second)
	select {
	case b := <-leaked:
		t.Fatalf("a refused subscription received %d bytes", len(b))
	case b := <-got:
		t.Fatalf("unexpected message on the own topic: %.20q", b) // "forged" included
	case <-time.After(300 * time.Millisecond):
	}
}
