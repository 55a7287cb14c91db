package mqtt

import (
	"bytes"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http/httptest"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/mochi-mqtt/server/v2/packets"
	dto "github.com/prometheus/client_model/go"

	"github.com/edgegate/edgegate/internal/envelope"
)

// Hostile-client tests of the per-principal limits (caps.go), each over
// the real protocol against the real embedded broker, next to the allowed
// path: the limit is hit, counted, and another principal is unaffected.

func withLimits(f func(*Limits)) func(*BrokerOptions) {
	return func(o *BrokerOptions) {
		o.Limits = DefaultLimits()
		f(&o.Limits)
	}
}

func (e *accessEnv) hits(limit string) float64 {
	var m dto.Metric
	if err := e.m.LimitHits.WithLabelValues(limit).Write(&m); err != nil {
		e.t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}

func (e *accessEnv) devicePassword(id string) string {
	d := e.devs[id]
	pw, err := envelope.DeriveMQTTPassword(d.ID, d.K1, d.K2)
	if err != nil {
		e.t.Fatal(err)
	}
	return pw
}

func (e *accessEnv) dialID(user, password, id string, clean bool) (paho.Client, error) {
	o := paho.NewClientOptions().AddBroker(e.url).SetClientID(id).SetUsername(user).SetPassword(password).
		SetAutoReconnect(false).SetCleanSession(clean).SetProtocolVersion(4).SetConnectTimeout(5 * time.Second).SetWriteTimeout(5 * time.Second)
	c := paho.NewClient(o)
	tok := c.Connect()
	if !tok.WaitTimeout(10 * time.Second) {
		return nil, fmt.Errorf("connect timed out")
	}
	if err := tok.Error(); err != nil {
		return nil, err
	}
	e.t.Cleanup(func() { c.Disconnect(50) })
	return c, nil
}

// TestCapConnectionsPerDevice: one device's 256 logins take 4 slots; the
// rest are refused with "server unavailable" (not "bad password"), counted;
// another device still logs in, and a freed slot serves the device again.
func TestCapConnectionsPerDevice(t *testing.T) {
	e := newAccessEnv(t, withLimits(func(l *Limits) {}))
	pw := e.devicePassword("a1")
	var held []paho.Client
	refused := 0
	for i := range 256 {
		c, err := e.dialID("a1", pw, fmt.Sprintf("a1-flood-%d", i), true)
		switch {
		case err == nil:
			held = append(held, c)
		case strings.Contains(err.Error(), "server Unavailable"):
			refused++
		default:
			t.Fatalf("login %d: %v, want server unavailable", i, err)
		}
	}
	if len(held) != 4 || refused != 252 {
		t.Fatalf("held %d, refused %d; want 4 and 252", len(held), refused)
	}
	if got := e.hits(limitConnsDevice); got != 252 {
		t.Errorf("limit hits = %v, want 252", got)
	}
	other := e.device("a2") // not locked out
	if !publish(t, other, "a2") {
		t.Fatal("a2's reading not acknowledged")
	}
	if !publish(t, held[0], "a1") {
		t.Fatal("a1's held connection stopped serving")
	}
	held[0].Disconnect(100)
	eventually(t, "a freed slot", func() bool {
		_, err := e.dialID("a1", pw, "a1-again", true)
		return err == nil
	})
	// Resuming its own client id is a take-over, not one more connection.
	if _, err := e.dialID("a1", pw, "a1-again", true); err != nil {
		t.Fatalf("resuming a1's own client id: %v", err)
	}
}

func TestCapConnectionsPerUser(t *testing.T) {
	e := newAccessEnv(t, withLimits(func(l *Limits) { l.ConnectionsPerUser = 3 }))
	for range 3 {
		e.app("alice")
	}
	if _, err := e.dialID("alice", e.sso.token(t, "alice", nil), "alice-4", true); err == nil || !strings.Contains(err.Error(), "server Unavailable") {
		t.Fatalf("alice's 4th login: %v, want server unavailable", err)
	}
	// The user name does not matter: the token's user is the principal.
	if _, err := e.dialID("some-other-name", e.sso.token(t, "alice", nil), "alice-5", true); err == nil {
		t.Fatal("alice's 5th login under another user name accepted")
	}
	if got := e.hits(limitConnsUser); got != 2 {
		t.Errorf("limit hits = %v, want 2", got)
	}
	e.app("bob") // not locked out
}

// TestCapSessionsKept: sessions a device leaves behind (clean=false) with
// ever new client ids count against its bound; the oldest are ended (with
// their subscriptions), the device itself is never locked out.
func TestCapSessionsKept(t *testing.T) {
	e := newAccessEnv(t, withLimits(func(l *Limits) { l.ConnectionsPerDevice = 2 }))
	pw := e.devicePassword("a1")
	for i := range 5 {
		c, err := e.dialID("a1", pw, fmt.Sprintf("a1-kept-%d", i), false)
		if err != nil {
			t.Fatalf("login %d: %v", i, err)
		}
		if code, _ := subscribe(t, c, "devices/a1/telemetry"); code != 1 {
			t.Fatalf("subscribe: %#x", code)
		}
		c.Disconnect(50)
		id := fmt.Sprintf("a1-kept-%d", i)
		eventually(t, "the broker to see the disconnect", func() bool {
			cl, ok := e.broker.srv.Clients.Get(id)
			return !ok || cl.Closed()
		})
	}
	eventually(t, "kept sessions bounded", func() bool {
		n := 0
		for id := range e.broker.srv.Clients.GetAll() {
			if strings.HasPrefix(id, "a1-kept-") {
				n++
			}
		}
		return n <= 2
	})
	if e.hits(limitSessions) < 3 {
		t.Errorf("sessions ended = %v, want at least 3", e.hits(limitSessions))
	}
	if n := e.broker.srv.Topics.Subscribers("devices/a1/telemetry").Subscriptions; len(n) > 2 {
		t.Errorf("%d subscriptions of ended sessions remain", len(n))
	}
}

// TestCapSubscriptionsPerClient: past its bound a client's new filters are
// refused in the SUBACK (0x80), counted; its granted ones keep delivering,
// a re-subscription is not a new one, and another client is unaffected.
func TestCapSubscriptionsPerClient(t *testing.T) {
	e := newAccessEnv(t, withLimits(func(l *Limits) { l.SubscriptionsPerClient = 2 }))
	app := e.app("alice")
	want := map[string]byte{"devices/a1/telemetry": 1, "devices/+/telemetry": 1, "devices/a2/telemetry": 0x80, "devices/#": 0x80}
	order := []string{"devices/a1/telemetry", "devices/+/telemetry", "devices/a2/telemetry", "devices/#"}
	for _, f := range order {
		if code, _ := subscribe(t, app, f); code != want[f] {
			t.Errorf("SUBACK for %s = %#x, want %#x", f, code, want[f])
		}
	}
	code, in := subscribe(t, app, "devices/a1/telemetry")
	if code != 1 {
		t.Errorf("re-subscription refused: %#x", code)
	}
	if got := e.hits(limitSubscriptions); got != 2 {
		t.Errorf("limit hits = %v, want 2", got)
	}
	e.settle(t, e.device("a1"), "a1", in)
	if code, _ := subscribe(t, e.app("bob"), "devices/b1/telemetry"); code != 1 {
		t.Errorf("bob's subscription refused: %#x", code)
	}
}

func TestCapFiltersPerSubscribe(t *testing.T) {
	e := newAccessEnv(t, withLimits(func(l *Limits) { l.FiltersPerSubscribe = 2 }))
	app := e.app("alice")
	filters := map[string]byte{"devices/a1/telemetry": 1, "devices/a2/telemetry": 1, "devices/+/telemetry": 1}
	tok := app.SubscribeMultiple(filters, nil)
	if !tok.WaitTimeout(5 * time.Second) {
		t.Fatal("SUBSCRIBE timed out")
	}
	granted, refused := 0, 0
	for _, code := range tok.(*paho.SubscribeToken).Result() {
		switch code {
		case 1:
			granted++
		case 0x80:
			refused++
		}
	}
	if granted != 2 || refused != 1 {
		t.Errorf("granted %d, refused %d; want 2 and 1", granted, refused)
	}
	if got := e.hits(limitFilters); got != 1 {
		t.Errorf("limit hits = %v, want 1", got)
	}
}

// retainedReading is a reading of about n bytes.
func retainedReading(n int) string {
	return `{"temperature": 21, "note": "` + strings.Repeat("x", max(0, n-40)) + `"}`
}

// retainedSeen subscribes a fresh application of alice to the device's
// topic and tells whether a retained reading arrives.
func (e *accessEnv) retainedSeen(device string) bool {
	e.t.Helper()
	got := make(chan bool, 1)
	app := e.app("alice")
	tok := app.Subscribe("devices/"+device+"/telemetry", 1, func(_ paho.Client, m paho.Message) {
		select {
		case got <- m.Retained():
		default:
		}
	})
	if !tok.WaitTimeout(5 * time.Second) {
		e.t.Fatal("subscribe timed out")
	}
	select {
	case r := <-got:
		return r
	case <-time.After(500 * time.Millisecond):
		return false
	}
}

func publishRetained(t *testing.T, c paho.Client, device, payload string) {
	t.Helper()
	tok := c.Publish("devices/"+device+"/telemetry", 1, true, payload)
	if !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("retained reading of %s not acknowledged: %v", device, tok.Error())
	}
}

func TestCapRetainedPerPrincipal(t *testing.T) {
	e := newAccessEnv(t, withLimits(func(l *Limits) { l.RetainedBytesPerPrincipal = 300 }))
	publishRetained(t, e.device("a1"), "a1", retainedReading(1000)) // delivered, ingested, not retained
	publishRetained(t, e.device("a2"), "a2", retainedReading(100))
	eventually(t, "a2's retained reading", func() bool { return e.retainedSeen("a2") })
	if e.retainedSeen("a1") {
		t.Error("a1's reading over its retained bound was retained")
	}
	if got := e.hits(limitRetainedPrinc); got != 1 {
		t.Errorf("limit hits = %v, want 1", got)
	}
}

func TestCapRetainedTotalAndCount(t *testing.T) {
	e := newAccessEnv(t, withLimits(func(l *Limits) { l.RetainedBytes = 400; l.RetainedMessages = 2 }))
	publishRetained(t, e.device("a1"), "a1", retainedReading(300))
	eventually(t, "a1's retained reading", func() bool { return e.retainedSeen("a1") })
	publishRetained(t, e.device("a2"), "a2", retainedReading(300)) // total 600 > 400
	if e.retainedSeen("a2") {
		t.Error("a reading past the total retained bound was retained")
	}
	if got := e.hits(limitRetainedBytes); got != 1 {
		t.Errorf("retained_bytes hits = %v, want 1", got)
	}
	// Replacing one's own retained reading frees what it held.
	publishRetained(t, e.device("a1"), "a1", retainedReading(50))
	publishRetained(t, e.device("a2"), "a2", retainedReading(50))
	eventually(t, "a2's retained reading", func() bool { return e.retainedSeen("a2") })
	publishRetained(t, e.device("b1"), "b1", retainedReading(50)) // a third message
	if got := e.hits(limitRetainedCount); got != 1 {
		t.Errorf("retained_messages hits = %v, want 1", got)
	}
	if b, n := e.broker.caps.retainedUsage(); n != 2 || b > 400 {
		t.Errorf("books: %d bytes in %d messages", b, n)
	}
}

// TestCapWillSize: a CONNECT whose will is over the bound is refused (0x03
// in 3.1.1), counted; a will within it is accepted; a retained will over
// the retained bound is published but not retained.
func TestCapWillSize(t *testing.T) {
	e := newAccessEnv(t, withLimits(func(l *Limits) { l.WillBytes = 1024; l.RetainedBytesPerPrincipal = 300 }))
	pw := e.devicePassword("a1")
	_, rc := e.wireConnect(wireOpts{user: "a1", password: pw, id: "a1-will", clean: true, keepalive: 30,
		will: []byte(retainedReading(2000)), willTopic: "devices/a1/telemetry"})
	if rc != 3 {
		t.Fatalf("CONNACK for a 2000-byte will = %d, want 3 (server unavailable)", rc)
	}
	if got := e.hits(limitWillBytes); got != 1 {
		t.Errorf("limit hits = %v, want 1", got)
	}
	c, rc := e.wireConnect(wireOpts{user: "a1", password: pw, id: "a1-will", clean: true, keepalive: 30,
		will: []byte(retainedReading(600)), willTopic: "devices/a1/telemetry", willRetain: true})
	if rc != 0 {
		t.Fatalf("CONNACK for a 600-byte will = %d, want 0", rc)
	}
	c.Close() // no DISCONNECT: the will is published
	eventually(t, "the will", func() bool { return e.hits(limitRetainedPrinc) == 1 })
	if e.retainedSeen("a1") {
		t.Error("a will over the retained bound was retained")
	}
	e.device("a2")
}

// TestCapAppPacketSize: an application's oversized packet ends its
// connection, counted; another application is unaffected.
func TestCapAppPacketSize(t *testing.T) {
	e := newAccessEnv(t, withLimits(func(l *Limits) { l.AppPacketBytes = 512 }))
	big := e.app("alice")
	big.Subscribe("devices/"+strings.Repeat("x", 2000)+"/telemetry", 1, nil)
	eventually(t, "the connection to end", func() bool { return !big.IsConnected() })
	if got := e.hits(limitAppPacket); got != 1 {
		t.Errorf("limit hits = %v, want 1", got)
	}
	if code, _ := subscribe(t, e.app("bob"), "devices/b1/telemetry"); code != 1 {
		t.Errorf("bob's subscription: %#x", code)
	}
	// A device's larger packets are readings: not bounded by this.
	if !publish(t, e.device("a1"), "a1") {
		t.Error("device reading refused")
	}
}

// TestDeadlineConnect: a connection that sends nothing, or half a CONNECT,
// is closed at the deadline, counted; a device logs in meanwhile.
func TestDeadlineConnect(t *testing.T) {
	e := newAccessEnv(t, withLimits(func(l *Limits) { l.ConnectTimeout = 300 * time.Millisecond }))
	silent := e.wireDial("")
	half := e.wireDial("")
	half.Write(encode(t, connectPacket(wireOpts{user: "a1", id: "x"}))[:5])
	start := time.Now()
	e.device("a1")
	if !silent.closed(3*time.Second) || !half.closed(3*time.Second) {
		t.Fatal("a connection without CONNECT was not closed")
	}
	if took := time.Since(start); took < 250*time.Millisecond {
		t.Errorf("closed after %v, before the deadline", took)
	}
	eventually(t, "the count", func() bool { return e.hits(limitConnectTimeout) == 2 })
	if n := e.broker.caps.pendingCount(); n != 0 {
		t.Errorf("%d connections still counted as waiting", n)
	}
}

// TestFloodPendingConnects: connections from one address that never send
// CONNECT are bounded; past the bound they are closed at once, and
// clients from another address are not locked out.
func TestFloodPendingConnects(t *testing.T) {
	e := newAccessEnv(t, withLimits(func(l *Limits) { l.PendingConnectsPerHost = 3; l.PendingConnects = 5 }))
	for range 3 {
		e.wireDial("127.0.0.2")
	}
	eventually(t, "3 waiting", func() bool { return e.broker.caps.pendingCount() == 3 })
	if c := e.wireDial("127.0.0.2"); !c.closed(2 * time.Second) {
		t.Fatal("a 4th silent connection from the same address was kept")
	}
	if got := e.hits(limitPendingPerHost); got != 1 {
		t.Errorf("per-host hits = %v, want 1", got)
	}
	// Another address still gets in, and so does a device on loopback.
	if _, rc := e.wireConnect(wireOpts{user: "a2", password: e.devicePassword("a2"), id: "a2-raw", clean: true, keepalive: 30, from: "127.0.0.3"}); rc != 0 {
		t.Fatalf("a2 from another address: CONNACK %d", rc)
	}
	e.device("a1")
	e.wireDial("127.0.0.4")
	e.wireDial("127.0.0.5")
	eventually(t, "5 waiting", func() bool { return e.broker.caps.pendingCount() == 5 })
	if c := e.wireDial("127.0.0.6"); !c.closed(2 * time.Second) {
		t.Fatal("a connection past the global bound was kept")
	}
	if got := e.hits(limitPending); got != 1 {
		t.Errorf("global hits = %v, want 1", got)
	}
}

// TestKeepaliveEnforced: a client asking for no keep-alive gets the
// server's; silent past 1.5 times it, it is disconnected. A client that
// pings stays.
func TestKeepaliveEnforced(t *testing.T) {
	e := newAccessEnv(t, withLimits(func(l *Limits) { l.MaxKeepalive = 2 * time.Second }))
	c, rc := e.wireConnect(wireOpts{user: "a1", password: e.devicePassword("a1"), id: "a1-ka0", clean: true, keepalive: 0})
	if rc != 0 {
		t.Fatalf("CONNACK %d", rc)
	}
	pinger, rc := e.wireConnect(wireOpts{user: "a2", password: e.devicePassword("a2"), id: "a2-ka1", clean: true, keepalive: 1})
	if rc != 0 {
		t.Fatalf("CONNACK %d", rc)
	}
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		t := time.NewTicker(300 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
				pinger.Write([]byte{0xc0, 0})
			}
		}
	}()
	start := time.Now()
	if !c.closed(6 * time.Second) {
		t.Fatal("a silent client with keep-alive 0 was kept")
	}
	if took := time.Since(start); took < 2500*time.Millisecond {
		t.Errorf("closed after %v, before 1.5 x the server keep-alive", took)
	}
	if got := e.hits(limitKeepalive); got != 1 {
		t.Errorf("limit hits = %v, want 1", got)
	}
	if pinger.closed(200 * time.Millisecond) {
		t.Error("the pinging client was disconnected")
	}
}

func TestLimitsDefaults(t *testing.T) {
	got := Limits{ConnectionsPerDevice: 2, MaxKeepalive: 100 * time.Hour}.withDefaults()
	want := DefaultLimits()
	want.ConnectionsPerDevice = 2
	want.MaxKeepalive = 43690 * time.Second
	if got != want {
		t.Errorf("withDefaults = %+v, want %+v", got, want)
	}
}

// TestCapRetainedWillsFlood: wills of one device on ever other topics,
// each connection taking the previous one's client id over, stay within
// the device's retained bound: a taken-over client's will is booked to its
// principal too.
func TestCapRetainedWillsFlood(t *testing.T) {
	e := newAccessEnv(t, withLimits(func(l *Limits) { l.RetainedBytesPerPrincipal = 2000 }))
	pw := e.devicePassword("a1")
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := range 50 {
				c, err := net.Dial("tcp", e.broker.Addr())
				if err != nil {
					t.Error(err)
					return
				}
				c.Write(encode(t, connectPacket(wireOpts{user: "a1", password: pw, id: fmt.Sprintf("w%d-%d", g, n%2), clean: true, keepalive: 30,
					will: []byte(retainedReading(300)), willTopic: fmt.Sprintf("devices/w%d-%d/telemetry", g, n), willRetain: true})))
				c.SetReadDeadline(time.Now().Add(5 * time.Second))
				c.Read(make([]byte, 4)) // CONNACK: accepted, or refused past 4 connections
				c.Close()
			}
		}()
	}
	wg.Wait()
	e.device("a2")
	eventually(t, "the wills", func() bool { return e.broker.srv.Clients.Len() <= 2 })
	if b, _ := e.broker.caps.retainedUsage(); b > 2000 {
		t.Errorf("one device's wills retained %d bytes, past its 2000", b)
	}
	for topic := range e.broker.srv.Topics.Retained.GetAll() {
		if strings.HasPrefix(topic, "$SYS/") {
			continue // mochi's own, not published by a client
		}
		e.broker.caps.mu.Lock()
		owner := e.broker.caps.retained[topic].owner
		e.broker.caps.mu.Unlock()
		if owner != "device:a1" {
			t.Errorf("retained %s booked to %q, want device:a1", topic, owner)
		}
	}
}

// TestDeadlineConnectTLS: on the TLS listener the deadline covers the
// handshake: a client that opens TCP and never says hello is closed.
func TestDeadlineConnectTLS(t *testing.T) {
	cert := httptest.NewTLSServer(nil)
	defer cert.Close()
	e := newAccessEnv(t, withLimits(func(l *Limits) { l.ConnectTimeout = 300 * time.Millisecond }), func(o *BrokerOptions) {
		o.TLSListen = "127.0.0.1:0"
		o.TLS = &tls.Config{Certificates: cert.TLS.Certificates}
	})
	c, err := net.Dial("tcp", e.broker.TLSAddr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if !newRawConn(t, c).closed(3 * time.Second) {
		t.Fatal("a TLS connection without a handshake was kept")
	}
	eventually(t, "the count", func() bool { return e.hits(limitConnectTimeout) == 1 })
	// A real TLS client logs in.
	tc, err := tls.Dial("tcp", e.broker.TLSAddr(), &tls.Config{InsecureSkipVerify: true})
	if err != nil {
		t.Fatal(err)
	}
	defer tc.Close()
	tc.Write(encode(t, connectPacket(wireOpts{user: "a1", password: e.devicePassword("a1"), id: "a1-tls", clean: true, keepalive: 30})))
	var ack [4]byte
	tc.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(tc, ack[:]); err != nil || ack[3] != 0 {
		t.Fatalf("device over TLS: CONNACK % x, %v", ack, err)
	}
}

// TestCapConnectionsMQTT5Codes: MQTT 5 clients are told why: quota
// exceeded (0x97) past the connections, packet too large (0x95) for a will.
func TestCapConnectionsMQTT5Codes(t *testing.T) {
	e := newAccessEnv(t, withLimits(func(l *Limits) { l.ConnectionsPerDevice = 1; l.WillBytes = 100 }))
	pw := e.devicePassword("a1")
	v5 := func(id string, will []byte) byte {
		pk := connectPacket(wireOpts{user: "a1", password: pw, id: id, clean: true, keepalive: 30, will: will, willTopic: "devices/a1/telemetry"})
		pk.ProtocolVersion = 5
		c := e.wireDial("")
		c.Write(encode(t, pk))
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		var ack [4]byte // type, length, flags, reason
		if _, err := io.ReadFull(c.br, ack[:]); err != nil || ack[0] != 0x20 {
			t.Fatalf("no CONNACK: % x %v", ack, err)
		}
		return ack[3]
	}
	if rc := v5("a1-one", nil); rc != 0 {
		t.Fatalf("first login: %#x", rc)
	}
	if rc := v5("a1-two", nil); rc != packets.ErrQuotaExceeded.Code {
		t.Errorf("second login: %#x, want 0x97", rc)
	}
	if rc := v5("a1-three", []byte(strings.Repeat("x", 200))); rc != packets.ErrPacketTooLarge.Code {
		t.Errorf("login with a 200-byte will: %#x, want 0x95", rc)
	}
}

// TestCapWritesPending: an application that stops reading its socket gets
// at most writes_pending messages queued; the rest of its deliveries are
// dropped and counted, while another application receives every reading.
func TestCapWritesPending(t *testing.T) {
	e := newAccessEnv(t, withLimits(func(l *Limits) { l.WritesPending = 2 }))
	// The stalled reader: a tiny receive window, and it never reads.
	d := net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
		return rc.Control(func(fd uintptr) { syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096) })
	}}
	c, err := d.Dial("tcp", e.broker.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write(encode(t, connectPacket(wireOpts{user: "alice", password: e.sso.token(t, "alice", nil), id: "stalled", clean: true, keepalive: 60})))
	var ack [4]byte
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(c, ack[:]); err != nil || ack[3] != 0 {
		t.Fatalf("CONNACK % x %v", ack, err)
	}
	c.Write(encode(t, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, PacketID: 1,
		ProtocolVersion: 4, Filters: packets.Subscriptions{{Filter: "devices/a1/telemetry", Qos: 0}}}))
	var suback [5]byte
	if _, err := io.ReadFull(c, suback[:]); err != nil || suback[4] != 0 {
		t.Fatalf("SUBACK % x %v", suback, err)
	}
	code, in := subscribe(t, e.app("alice"), "devices/a1/telemetry")
	if code != 1 {
		t.Fatalf("subscribe: %#x", code)
	}
	dev := e.device("a1")
	const n = 80
	big := retainedReading(100 << 10)
	for i := range n {
		tok := dev.Publish("devices/a1/telemetry", 1, false, big)
		if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
			t.Fatalf("reading %d not acknowledged", i)
		}
	}
	eventually(t, "every reading at the reading application", func() bool { return in.count("devices/a1/telemetry") == n })
	if e.hits(limitWritesPending) == 0 {
		t.Error("no delivery to the stalled application was dropped")
	}
}

// TestCapKeptSessionBytes: a session kept after its client left
// (clean=false) stores QoS 1 deliveries up to its byte bound, counted past
// it. Today the access hook forgets a principal at disconnect, so mochi's
// delivery check refuses every delivery to a kept session and nothing is
// stored; this bound holds if that changes. Driven through the hook with
// mochi's own client and inflight store, as publishToClient does.
func TestCapKeptSessionBytes(t *testing.T) {
	e := newAccessEnv(t, withLimits(func(l *Limits) { l.KeptSessionBytes = 100 << 10 }))
	h := e.broker.caps
	cl := e.broker.srv.NewClient(nil, "local", "alice-away", false)
	cl.Stop(nil) // disconnected, session kept
	for i := range 20 {
		pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, PacketID: uint16(i + 1),
			TopicName: "devices/a1/telemetry", Payload: bytes.Repeat([]byte("x"), 30<<10)}
		cl.State.Inflight.Set(pk) // stored, then the hook runs
		h.OnQosPublish(cl, pk, 0, 0)
	}
	stored := 0
	for _, p := range cl.State.Inflight.GetAll(false) {
		stored += len(p.Payload)
	}
	if stored > 100<<10 || stored < 90<<10 {
		t.Errorf("kept session stores %d bytes, want 90..100 KiB", stored)
	}
	if got := e.hits(limitKeptBytes); got != 17 {
		t.Errorf("limit hits = %v, want 17", got)
	}
	// A connected client's deliveries are bounded by inflight, not this.
	live := e.broker.srv.NewClient(nil, "local", "alice-live", false)
	for i := range 20 {
		pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, PacketID: uint16(i + 1),
			TopicName: "devices/a1/telemetry", Payload: bytes.Repeat([]byte("x"), 30<<10)}
		live.State.Inflight.Set(pk)
		h.OnQosPublish(live, pk, 0, 0)
	}
	if n := live.State.Inflight.Len(); n != 20 {
		t.Errorf("a connected client's stored deliveries cut to %d", n)
	}
}

// TestCapRetainedReconcile: a booking whose reading the pipeline refused
// (so never retained), and a retained message removed from mochi's store
// without a hook, stop counting at the next reconciliation, so they do not
// hold the budget against later readings.
func TestCapRetainedReconcile(t *testing.T) {
	e := newAccessEnv(t, withLimits(func(l *Limits) { l.RetainedBytes = 1500 }))
	h := e.broker.caps
	publishRetained(t, e.device("a1"), "a1", "not a reading "+strings.Repeat("x", 1000)) // refused by the pipeline
	publishRetained(t, e.device("a2"), "a2", retainedReading(300))
	eventually(t, "a2's retained reading", func() bool { return e.retainedSeen("a2") })
	if b, n := h.retainedUsage(); n != 2 || b < 1300 {
		t.Fatalf("books before: %d bytes in %d", b, n)
	}
	h.reconcile(time.Now()) // within the grace: the booking stays
	if _, n := h.retainedUsage(); n != 2 {
		t.Fatalf("a fresh booking was dropped")
	}
	e.broker.srv.Topics.Retained.Delete("devices/a2/telemetry") // removed without a hook
	h.reconcile(time.Now().Add(bookingGrace + time.Second))
	if b, n := h.retainedUsage(); n != 0 || b != 0 {
		t.Errorf("books after: %d bytes in %d, want none", b, n)
	}
	publishRetained(t, e.device("b1"), "b1", retainedReading(1000))
	eventually(t, "b1's retained reading within the freed budget", func() bool {
		b, n := h.retainedUsage()
		return n == 1 && b > 1000
	})
}
