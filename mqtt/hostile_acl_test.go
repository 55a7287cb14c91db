package mqtt

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/edgegate/edgegate/internal/pipeline"
	"github.com/edgegate/edgegate/policy"
)

// subscribed returns once the broker has finished with c's earlier
// SUBSCRIBEs, their retained deliveries included: it handles one client's
// packets in order, so the SUBACK of one more SUBSCRIBE comes after them.
// The filter matches no topic of the namespace and holds nothing retained.
func subscribed(t *testing.T, c paho.Client) {
	t.Helper()
	tok := c.Subscribe("devices/+/edgegate-test-sync", 0, func(paho.Client, paho.Message) {})
	if !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("the sync SUBSCRIBE: %v", tok.Error())
	}
}

// setOwner puts in force the policy with device id owned by owner.
func (e *accessEnv) setOwner(t *testing.T, id, owner string) {
	t.Helper()
	e.apply(t, func(d *policy.Document) {
		for i := range d.Devices {
			if d.Devices[i].ID == id {
				d.Devices[i].Owner = owner
			}
		}
	})
}

// apply puts a modified copy of the policy in force, as a sync would.
func (e *accessEnv) apply(t *testing.T, mut func(*policy.Document)) {
	t.Helper()
	next := e.engine.Current().Document()
	next.Version++
	mut(&next)
	p, err := policy.Compile(next, "test", "")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.engine.Apply(p, false); err != nil {
		t.Fatal(err)
	}
}

const (
	connAccepted       = 0x00
	connIDRejected     = 0x02
	connNotAuthorized  = 0x05
	sample             = `{"temperature": 21}`
	topicA1, topicA2   = "devices/a1/telemetry", "devices/a2/telemetry"
	topicB1            = "devices/b1/telemetry"
	noDeliveryInterval = 300 * time.Millisecond
)

// TestHostileWillOnAnotherDevice: bob's device b1 leaves a retained will on
// alice's a1 topic and drops the connection. The CONNECT is refused with
// 0x05, so nothing forged reaches alice's subscriber or the retained store.
// Allowed path: a1's will on its own topic is delivered when a1 drops.
func TestHostileWillOnAnotherDevice(t *testing.T) {
	e := newAccessEnv(t)
	alice := e.app("alice")
	_, in := subscribe(t, alice, "devices/+/telemetry")

	_, code, _ := e.rawDial(t, rawConnect{id: "b1-hostile", user: "b1", password: e.devicePassword("b1"),
		clean: true, willTopic: topicA1, willPayload: `{"temperature": -99}`, willRetain: true})
	if code != connNotAuthorized {
		t.Fatalf("CONNECT of b1 with a will on a1's topic: CONNACK 0x%02x, want 0x05", code)
	}
	// paho says the same; an application may leave no will at all.
	o := paho.NewClientOptions().AddBroker(e.url).SetClientID("carol-will").SetUsername("carol").
		SetPassword(e.sso.token(t, "carol", nil)).SetAutoReconnect(false).SetWill(topicA1, "x", 1, true)
	c := paho.NewClient(o)
	if tok := c.Connect(); !tok.WaitTimeout(5*time.Second) || tok.Error() == nil || !strings.Contains(tok.Error().Error(), "not Authorized") {
		c.Disconnect(0)
		t.Fatalf("an application with a will: %v, want not authorized", tok.Error())
	}
	if got := testCounter(t, e.m, "will", denyWillTopic); got != 1 {
		t.Errorf("denied{will,will_not_own_topic} = %v, want 1", got)
	}

	// Allowed: a1 leaves a will on its own topic and drops the TCP link.
	a1, code, _ := e.rawDial(t, rawConnect{id: "a1-will", user: "a1", password: e.devicePassword("a1"),
		clean: true, willTopic: topicA1, willPayload: `{"status": "offline"}`})
	if code != connAccepted {
		t.Fatalf("a1 with a will on its own topic: CONNACK 0x%02x", code)
	}
	a1.Close()
	eventually(t, "a1's will", func() bool { return in.count(topicA1) == 1 })
	// No retained forgery reaches a late subscriber of a1.
	late := e.app("alice")
	_, lateIn := subscribe(t, late, topicA1)
	subscribed(t, late)
	// A reading of a1 after the subscription is the marker: a retained
	// message would have been delivered before it.
	e.settle(t, e.device("a1"), "a1", lateIn)
	if n := lateIn.count(topicA1) - 1; n != 0 {
		t.Fatalf("a late subscriber received %d retained messages on a1's topic", n)
	}
}

// TestHostileWillAfterRevocation: a device's will passed the check at
// CONNECT, then the device is revoked; closing its session must not
// publish (or retain) its will.
func TestHostileWillAfterRevocation(t *testing.T) {
	e := newAccessEnv(t)
	alice := e.app("alice")
	_, in := subscribe(t, alice, "devices/+/telemetry")
	_, code, _ := e.rawDial(t, rawConnect{id: "a2-will", user: "a2", password: e.devicePassword("a2"),
		clean: true, willTopic: topicA2, willPayload: `{"status": "offline"}`, willRetain: true})
	if code != connAccepted {
		t.Fatalf("CONNACK 0x%02x", code)
	}
	e.apply(t, func(d *policy.Document) { d.Devices = []policy.Registration{e.devs["a1"], e.devs["b1"]} })
	eventually(t, "the revoked device's will refused", func() bool { return testCounter(t, e.m, "will", denyWillRevoked) == 1 })
	e.settle(t, e.device("a1"), "a1", in)
	if n := in.count(topicA2); n != 0 {
		t.Fatalf("the revoked device's will was delivered %d times", n)
	}
	if _, ok := e.broker.srv.Topics.Retained.Get(topicA2); ok {
		t.Fatal("the revoked device's will was retained")
	}
}

// TestHostileRetainedAfterOwnerChange: a retained reading of a1, collected
// under alice, is not delivered to bob once a1 moves to him; retained
// deliveries follow the reader's rights at delivery time.
func TestHostileRetainedAfterOwnerChange(t *testing.T) {
	e := newAccessEnv(t)
	a1 := e.device("a1")
	if tok := a1.Publish(topicA1, 1, true, sample); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("retained reading not acknowledged: %v", tok.Error())
	}
	eventually(t, "the retained reading", func() bool { _, ok := e.broker.srv.Topics.Retained.Get(topicA1); return ok })
	// Allowed now: the owner and carol (READ_ACCESS) get it on subscribing.
	for _, user := range []string{"alice", "carol"} {
		_, in := subscribe(t, e.app(user), topicA1)
		eventually(t, user+"'s retained delivery", func() bool { return in.count(topicA1) == 1 })
	}
	// Not allowed: dave (WRITE_ONLY) through a wildcard, bob. Each
	// subscription's retained delivery is refused (and counted) before the
	// broker answers the client's next SUBSCRIBE; bob also gets a marker
	// from his own device after it.
	for _, sub := range []struct{ user, filter string }{{"dave", "devices/#"}, {"bob", "devices/+/telemetry"}} {
		user := sub.user
		refused := testCounter(t, e.m, "read", denyNotReadable)
		c := e.app(user)
		_, in := subscribe(t, c, sub.filter)
		subscribed(t, c)
		if got := testCounter(t, e.m, "read", denyNotReadable) - refused; got != 1 {
			t.Errorf("%s: %v retained deliveries of a1 refused, want 1", user, got)
		}
		if user == "bob" {
			e.settle(t, e.device("b1"), "b1", in)
		}
		if n := in.count(topicA1); n != 0 {
			t.Fatalf("a retained reading reached %s, who may not read a1", user)
		}
	}

	// a1 moves to bob: the reading collected under alice is dropped.
	e.setOwner(t, "a1", "bob")
	bob := e.app("bob")
	_, bobNew := subscribe(t, bob, topicA1)
	subscribed(t, bob)
	// The new owner does get what a1 sends from now on; that reading is
	// the marker: a retained one would have come before it.
	e.settle(t, e.device("a1"), "a1", bobNew)
	if n := bobNew.count(topicA1) - 1; n != 0 {
		t.Fatalf("the new owner received %d readings retained under the old owner", n)
	}
}

// TestHostileDeliveryAfterDelegationRemoved: an exact subscription granted
// under a delegation stops delivering when the delegation goes, while the
// owner keeps receiving.
func TestHostileDeliveryAfterDelegationRemoved(t *testing.T) {
	e := newAccessEnv(t)
	a1 := e.device("a1")
	_, carolIn := subscribe(t, e.app("carol"), topicA1)
	_, aliceIn := subscribe(t, e.app("alice"), topicA1)
	e.settle(t, a1, "a1", carolIn, aliceIn)
	e.apply(t, func(d *policy.Document) { d.Delegations = nil })
	e.settle(t, a1, "a1", aliceIn)
	if n := carolIn.count(topicA1); n != 1 {
		t.Fatalf("carol received %d readings, want 1: the subscription outlived the delegation", n)
	}
}

// TestHostileSessionTakeover: device b1 (and an application) presenting
// a1's client id are refused with 0x02 and never see a1's session; a1
// itself resumes it.
func TestHostileSessionTakeover(t *testing.T) {
	e := newAccessEnv(t)
	const id = "a1-persistent"
	a1, code, present := e.rawDial(t, rawConnect{id: id, user: "a1", password: e.devicePassword("a1")})
	if code != connAccepted || present {
		t.Fatalf("a1's first CONNECT: 0x%02x present=%v", code, present)
	}
	a1.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe}, PacketID: 1,
		Filters: packets.Subscriptions{{Filter: topicA1, Qos: 1}}})
	if ack := a1.read(); ack.FixedHeader.Type != packets.Suback || ack.ReasonCodes[0] != 1 {
		t.Fatalf("a1's subscription: %+v", ack)
	}
	a1.Close() // the session stays (clean session 0)
	eventually(t, "a1 offline", func() bool {
		cl, ok := e.broker.srv.Clients.Get(id)
		return ok && cl.Closed()
	})

	for _, who := range []struct{ user, pw string }{
		{"b1", e.devicePassword("b1")},
		{"bob", e.sso.token(t, "bob", nil)},
	} {
		r, code, present := e.rawDial(t, rawConnect{id: id, user: who.user, password: who.pw})
		if code != connIDRejected || present {
			t.Fatalf("%s with a1's client id: CONNACK 0x%02x present=%v, want 0x02 and no session", who.user, code, present)
		}
		if !r.closed(2 * time.Second) {
			t.Fatalf("%s's refused connection stays open", who.user)
		}
	}
	if got := testCounter(t, e.m, "connect", denyClientID); got != 2 {
		t.Errorf("denied{connect,client_id_in_use} = %v, want 2", got)
	}
	// The broker's own inline client id is nobody's.
	if _, code, _ := e.rawDial(t, rawConnect{id: "inline", user: "b1", password: e.devicePassword("b1"), clean: true}); code != connIDRejected {
		t.Fatalf("CONNECT as the inline client: 0x%02x, want 0x02", code)
	}
	// a1 resumes its own session, with its subscription.
	back, code, present := e.rawDial(t, rawConnect{id: id, user: "a1", password: e.devicePassword("a1")})
	if code != connAccepted || !present {
		t.Fatalf("a1 resuming: 0x%02x present=%v, want its session", code, present)
	}
	back.send(rawPublish(topicA1, 1, 9, false, false, sample))
	for {
		pk := back.read()
		if pk.FixedHeader.Type == packets.Publish && pk.TopicName == topicA1 {
			break // its own reading, through the resumed subscription
		}
	}
}

// TestQoS2ExactlyOnce: a QoS 2 reading is answered PUBREC (never PUBACK)
// after commit, a resend with the same packet id before PUBREL is not
// queued again, PUBREL gets PUBCOMP; acknowledgements follow the order of
// the publishes (§4.6). paho's QoS 2 publish completes.
func TestQoS2ExactlyOnce(t *testing.T) {
	e := newAccessEnv(t)
	_, in := subscribe(t, e.app("alice"), "devices/+/telemetry")

	r, code, _ := e.rawDial(t, rawConnect{id: "a1-qos2", user: "a1", password: e.devicePassword("a1"), clean: true})
	if code != connAccepted {
		t.Fatalf("CONNACK 0x%02x", code)
	}
	// Pipelined: QoS 1, QoS 2, the QoS 2 again (DUP), QoS 1.
	r.send(rawPublish(topicA1, 1, 1, false, false, sample))
	r.send(rawPublish(topicA1, 2, 2, false, false, sample))
	r.send(rawPublish(topicA1, 2, 2, true, false, sample))
	r.send(rawPublish(topicA1, 1, 3, false, false, sample))
	want := []struct {
		typ byte
		id  uint16
	}{{packets.Puback, 1}, {packets.Pubrec, 2}, {packets.Pubrec, 2}, {packets.Puback, 3}}
	for i, w := range want {
		pk := r.read()
		if pk.FixedHeader.Type != w.typ || pk.PacketID != w.id {
			t.Fatalf("acknowledgement %d: type %d id %d, want type %d id %d", i, pk.FixedHeader.Type, pk.PacketID, w.typ, w.id)
		}
	}
	// A resend after PUBREC is still the same message.
	r.send(rawPublish(topicA1, 2, 2, true, false, sample))
	if pk := r.read(); pk.FixedHeader.Type != packets.Pubrec || pk.PacketID != 2 {
		t.Fatalf("resend after PUBREC answered with type %d id %d", pk.FixedHeader.Type, pk.PacketID)
	}
	r.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubrel}, PacketID: 2})
	if pk := r.read(); pk.FixedHeader.Type != packets.Pubcomp || pk.PacketID != 2 {
		t.Fatalf("PUBREL answered with type %d id %d, want PUBCOMP 2", pk.FixedHeader.Type, pk.PacketID)
	}
	// After the release the id is free: a new QoS 2 publish with it is a new reading.
	r.send(rawPublish(topicA1, 2, 2, false, false, sample))
	if pk := r.read(); pk.FixedHeader.Type != packets.Pubrec || pk.PacketID != 2 {
		t.Fatalf("reused id answered with type %d id %d", pk.FixedHeader.Type, pk.PacketID)
	}
	// A fifth reading on the same connection is the marker: the broker
	// delivers one connection's readings in order, so a resend queued
	// again would arrive before it.
	r.send(rawPublish(topicA1, 1, 4, false, false, sample))
	if pk := r.read(); pk.FixedHeader.Type != packets.Puback || pk.PacketID != 4 {
		t.Fatalf("the marker answered with type %d id %d, want PUBACK 4", pk.FixedHeader.Type, pk.PacketID)
	}
	eventually(t, "five readings", func() bool { return in.count(topicA1) >= 5 })
	if n := in.count(topicA1) - 1; n != 4 {
		t.Fatalf("%d readings delivered before the marker, want 4 (the QoS 2 resends queued again?)", n)
	}

	// paho: a QoS 2 publish completes (it fails on a PUBACK).
	a2 := e.device("a2")
	tok := a2.Publish(topicA2, 2, false, sample)
	if !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("paho QoS 2 publish: %v", tok.Error())
	}
	eventually(t, "a2's QoS 2 reading", func() bool { return in.count(topicA2) == 1 })
	// QoS 2 keeps the publish rule: a1 publishing as b1 is cut off.
	r2, _, _ := e.rawDial(t, rawConnect{id: "a1-qos2-hostile", user: "a1", password: e.devicePassword("a1"), clean: true})
	r2.send(rawPublish(topicB1, 2, 5, false, false, sample))
	if !r2.closed(2 * time.Second) {
		t.Fatal("a QoS 2 publish to another device's topic did not end the connection")
	}
}

// TestQoS2UnreleasedBounded: a device that never releases its QoS 2
// publishes (no PUBREL) cannot make the broker hold ids without bound: past
// maxHeldQoS2 its connection is closed; every publish it had PUBREC for
// was committed.
func TestQoS2UnreleasedBounded(t *testing.T) {
	e := newAccessEnv(t)
	r, code, _ := e.rawDial(t, rawConnect{id: "a1-hoard", user: "a1", password: e.devicePassword("a1"), clean: true})
	if code != connAccepted {
		t.Fatalf("CONNACK 0x%02x", code)
	}
	go func() {
		for i := 1; i <= maxHeldQoS2+1; i++ {
			pk := rawPublish(topicA1, 2, uint16(i), false, false, sample)
			pk.ProtocolVersion = 4
			var buf bytes.Buffer
			if pk.PublishEncode(&buf) != nil {
				return
			}
			r.SetWriteDeadline(time.Now().Add(10 * time.Second))
			if _, err := r.Write(buf.Bytes()); err != nil {
				return
			}
		}
	}()
	recs := 0
	for {
		pk, err := r.next(15 * time.Second)
		if err != nil {
			if isTimeout(err) {
				t.Fatalf("connection still open after %d PUBRECs", recs)
			}
			break
		}
		if pk.FixedHeader.Type == packets.Pubrec {
			recs++
		}
	}
	if recs != maxHeldQoS2 {
		t.Fatalf("%d PUBRECs before the connection closed, want %d", recs, maxHeldQoS2)
	}
	if got := testCounter(t, e.m, "publish", denyQoS2Unreleased); got != 1 {
		t.Errorf("denied{publish,qos2_unreleased} = %v, want 1", got)
	}
}

// TestMosquittoClientsQoS2AndRefusals drives the same rules with
// Mosquitto's command-line clients (libmosquitto), MQTT 3.1.1 and 5: QoS 2
// publishes complete; a will on another device's topic and another
// principal's client id are refused with the version's reason.
func TestMosquittoClientsQoS2AndRefusals(t *testing.T) {
	if _, err := exec.LookPath("mosquitto_pub"); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("mosquitto_pub missing; .ci/run installs mosquitto-clients")
		}
		t.Skip("mosquitto-clients not installed (CI installs them)")
	}
	e := newAccessEnv(t)
	_, in := subscribe(t, e.app("alice"), "devices/+/telemetry")
	host, port, _ := strings.Cut(strings.TrimPrefix(e.url, "tcp://"), ":")
	pub := func(version, dev string, extra ...string) (string, error) {
		args := append([]string{"-h", host, "-p", port, "-V", version, "-u", dev, "-P", e.devicePassword(dev),
			"-t", "devices/" + dev + "/telemetry", "-m", sample}, extra...)
		out, err := exec.Command("mosquitto_pub", args...).CombinedOutput()
		return string(out), err
	}
	// Both acknowledgements the acker encodes itself (acker.ack), in both
	// protocol versions: mosquitto_pub fails on a malformed one.
	n := 0
	for _, v := range []string{"mqttv311", "mqttv5"} {
		for _, qos := range []string{"1", "2"} {
			if out, err := pub(v, "a1", "-q", qos); err != nil {
				t.Fatalf("%s QoS %s publish: %v %s", v, qos, err, out)
			}
			n++
			want := n
			eventually(t, v+" QoS "+qos+" reading", func() bool { return in.count(topicA1) == want })
		}
	}
	// A persistent session of a1's, then b1 presenting its client id.
	a1 := e.rawConnectPersistent(t, "a1-mosq")
	a1.Close()
	for _, v := range []struct{ version, want string }{
		{"mqttv311", "identifier rejected"}, {"mqttv5", "client identifier not valid"},
	} {
		out, err := pub(v.version, "b1", "-q", "1", "-i", "a1-mosq")
		t.Logf("%s client id: %s", v.version, strings.TrimSpace(out))
		if err == nil || !strings.Contains(strings.ToLower(out), v.want) {
			t.Errorf("%s: b1 with a1's client id: %v %q, want %q", v.version, err, out, v.want)
		}
		out, err = pub(v.version, "b1", "-q", "1", "--will-topic", topicA1, "--will-payload", "forged", "--will-retain")
		t.Logf("%s will: %s", v.version, strings.TrimSpace(out))
		if err == nil || !strings.Contains(strings.ToLower(out), "not author") {
			t.Errorf("%s: b1 with a will on a1's topic: %v %q, want not authorized", v.version, err, out)
		}
	}
	if got := in.count(topicA1); got != n {
		t.Fatalf("a1's topic received %d messages, want its %d readings only", got, n)
	}
}

// rawConnectPersistent opens a clean-session=0 session of device a1.
func (e *accessEnv) rawConnectPersistent(t *testing.T, id string) *rawConn {
	t.Helper()
	r, code, _ := e.rawDial(t, rawConnect{id: id, user: "a1", password: e.devicePassword("a1")})
	if code != connAccepted {
		t.Fatalf("CONNACK 0x%02x", code)
	}
	return r
}

// TestWillDelayV5: an MQTT 5 will waits for its Will Delay; a reconnection
// of the same session within the delay cancels it [MQTT-3.1.3-9], while
// another principal presenting the client id is refused (0x85) and cancels
// nothing.
func TestWillDelayV5(t *testing.T) {
	e := newAccessEnv(t)
	_, in := subscribe(t, e.app("alice"), "devices/+/telemetry")
	rc := rawConnect{id: "a1-delay", user: "a1", password: e.devicePassword("a1"), clean: true, v5: true,
		expiry: 30, willDelaySec: 1, willTopic: topicA1, willPayload: `{"status": "offline"}`}
	r, code, _ := e.rawDial(t, rc)
	if code != connAccepted {
		t.Fatalf("CONNACK 0x%02x", code)
	}
	dropped := time.Now()
	r.Close()
	if _, code, _ := e.rawDial(t, rawConnect{id: "a1-delay", user: "b1", password: e.devicePassword("b1"), v5: true}); code != packets.ErrClientIdentifierNotValid.Code {
		t.Fatalf("b1 with a1's client id during the delay: 0x%02x, want 0x85", code)
	}
	eventually(t, "the delayed will", func() bool { return in.count(topicA1) == 1 })
	if took := time.Since(dropped); took < 900*time.Millisecond {
		t.Fatalf("the will came %v after the drop, before its 1 s delay", took)
	}

	// Back within the delay: the will is not sent.
	rc.willDelaySec, rc.clean = 2, false
	r, _, _ = e.rawDial(t, rc)
	cl, ok := e.broker.srv.Clients.Get(rc.id)
	if !ok {
		t.Fatalf("%s not among the broker's clients", rc.id)
	}
	r.Close()
	// mochi makes the will pending before it marks the client closed.
	eventually(t, "the broker took the drop", cl.Closed)
	back, code, present := e.rawDial(t, rawConnect{id: "a1-delay", user: "a1", password: e.devicePassword("a1"), v5: true, expiry: 30})
	if code != connAccepted || !present {
		t.Fatalf("a1 back: 0x%02x present=%v", code, present)
	}
	time.Sleep(2500 * time.Millisecond) // real time past the 2 s will delay: the cancelled will must not come
	if n := in.count(topicA1); n != 1 {
		t.Fatalf("%d wills delivered, want 1: the reconnection did not cancel the pending will", n)
	}
	back.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Disconnect}})
}

// TestHostileSessionRace: a1 and b1 connect at the same moment with the
// same fresh client id (clean session 0): at most one of them gets it.
func TestHostileSessionRace(t *testing.T) {
	// Twenty persistent sessions per device: the connection limit (its own
	// tests in caps_test.go) must not be what refuses here.
	e := newAccessEnv(t, withLimits(func(l *Limits) { l.ConnectionsPerDevice = 64 }))
	for i := range 20 {
		id := fmt.Sprintf("race-%d", i)
		codes := make(chan byte, 2)
		for _, dev := range []string{"a1", "b1"} {
			go func() {
				c, err := net.DialTimeout("tcp", strings.TrimPrefix(e.url, "tcp://"), 5*time.Second)
				if err != nil {
					codes <- 0xff
					return
				}
				defer c.Close()
				r := newRawConn(t, c)
				pk := connectPacket(wireOpts{user: dev, password: e.devicePassword(dev), id: id, keepalive: 30})
				var buf bytes.Buffer
				pk.ConnectEncode(&buf)
				c.Write(buf.Bytes())
				ack, err := r.next(5 * time.Second)
				if err != nil {
					codes <- 0xff
					return
				}
				codes <- ack.ReasonCode
				time.Sleep(100 * time.Millisecond) // hold the connection while the other tries
			}()
		}
		a, b := <-codes, <-codes
		if a == connAccepted && b == connAccepted {
			t.Fatalf("round %d: both principals were given client id %s", i, id)
		}
		if a != connAccepted && b != connAccepted {
			t.Fatalf("round %d: neither principal got the fresh client id (0x%02x, 0x%02x)", i, a, b)
		}
	}
}

// gatedPipeline holds every commit until its gate opens; it tells arrived
// (if not full) of each reading handed to it.
type gatedPipeline struct {
	*pipeline.Pipeline
	gate    chan struct{}
	arrived chan struct{}
}

func (g gatedPipeline) Start(ctx context.Context, msg pipeline.Message) pipeline.Pending {
	wait := g.Pipeline.Start(ctx, msg)
	select {
	case g.arrived <- struct{}{}:
	default:
	}
	return func(ctx context.Context) (pipeline.Outcome, error) {
		select {
		case <-g.gate:
		case <-ctx.Done():
		}
		return wait(ctx)
	}
}

// TestHostileReadingAcrossOwnerChange: a retained reading a1 sent under
// alice, still being committed when a1 moves to bob, is neither delivered
// to bob nor retained for him.
func TestHostileReadingAcrossOwnerChange(t *testing.T) {
	gate := make(chan struct{})
	arrived := make(chan struct{}, 1)
	e := newAccessEnvWith(t, func(p *pipeline.Pipeline) Submitter { return gatedPipeline{p, gate, arrived} })
	a1 := e.device("a1")
	tok := a1.Publish(topicA1, 1, true, sample)
	select { // handed to the pipeline, held at the gate
	case <-arrived:
	case <-time.After(10 * time.Second):
		t.Fatal("the reading never reached the pipeline")
	}
	e.setOwner(t, "a1", "bob")
	_, bobIn := subscribe(t, e.app("bob"), topicA1)
	close(gate)
	tok.WaitTimeout(2 * time.Second) // its session was closed: acknowledged or not, it is committed
	e.settle(t, e.device("a1"), "a1", bobIn)
	if n := bobIn.count(topicA1); n != 1 {
		t.Fatalf("bob received %d readings of a1, want only the one sent after the move", n)
	}
	if _, ok := e.broker.srv.Topics.Retained.Get(topicA1); ok {
		t.Fatal("the reading taken under alice was retained after a1 moved to bob")
	}
}

// TestHostileQueuedDeliveryAfterDelegationRemoved: an MQTT 5 application
// with a receive maximum of 1 has a second reading queued behind an
// unacknowledged one; its delegation is withdrawn; its PUBACK must not
// release the queued reading (mochi writes it without asking OnACLCheck).
func TestHostileQueuedDeliveryAfterDelegationRemoved(t *testing.T) {
	e := newAccessEnv(t)
	carol, code, _ := e.rawDial(t, rawConnect{id: "carol-rm1", user: "carol", password: e.sso.token(t, "carol", nil),
		clean: true, v5: true, recvMax: 1})
	if code != connAccepted {
		t.Fatalf("CONNACK 0x%02x", code)
	}
	carol.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe}, PacketID: 1,
		Filters: packets.Subscriptions{{Filter: topicA1, Qos: 1}}})
	if ack := carol.read(); ack.FixedHeader.Type != packets.Suback || ack.ReasonCodes[0] != 1 {
		t.Fatalf("carol's subscription: %+v", ack)
	}
	_, aliceIn := subscribe(t, e.app("alice"), topicA1)
	a1 := e.device("a1")
	e.settle(t, a1, "a1", aliceIn)
	first := carol.read()
	if first.FixedHeader.Type != packets.Publish {
		t.Fatalf("carol's first delivery: type %d", first.FixedHeader.Type)
	}
	e.settle(t, a1, "a1", aliceIn) // queued for carol behind the unacknowledged one
	e.apply(t, func(d *policy.Document) { d.Delegations = nil })
	carol.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}, PacketID: first.PacketID})
	if pk, err := carol.next(noDeliveryInterval * 2); err == nil {
		t.Fatalf("carol received packet type %d (topic %q) after her delegation was withdrawn", pk.FixedHeader.Type, pk.TopicName)
	} else if !isTimeout(err) {
		t.Fatalf("carol's connection: %v", err)
	}
	if got := testCounter(t, e.m, "deliver", denyLate); got < 1 {
		t.Errorf("denied{deliver,not_readable_at_write} = %v", got)
	}
}
