package mqtt

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	dto "github.com/prometheus/client_model/go"

	"github.com/edgegate/edgegate/internal/metrics"
	"github.com/edgegate/edgegate/internal/mosquittotest"
	"github.com/edgegate/edgegate/internal/testkit"

	"github.com/edgegate/edgegate/internal/pipeline"
)

// recorder is a Submitter that keeps what it was given, per device, after
// an optional delay per device (a slow device settles late).
type recorder struct {
	mu    sync.Mutex
	got   map[string][]string
	n     int
	delay func(device string) time.Duration
}

func (r *recorder) Submit(_ context.Context, msg pipeline.Message) (pipeline.Outcome, error) {
	if r.delay != nil {
		time.Sleep(r.delay(msg.Device))
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.got == nil {
		r.got = map[string][]string{}
	}
	r.got[msg.Device] = append(r.got[msg.Device], string(msg.Payload))
	r.n++
	return pipeline.Queued, nil
}

func (r *recorder) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.n
}

// mqttTap is a TCP proxy between the ingest client and the broker that
// reads the MQTT packets going through: the packet ids of the QoS 1
// PUBLISHes the broker sends, and of the PUBACKs the client answers, each
// in wire order.
type mqttTap struct {
	ln        net.Listener
	upstream  string
	mu        sync.Mutex
	published []uint16
	acked     []uint16
}

func newMQTTTap(t *testing.T, upstream string) *mqttTap {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	tp := &mqttTap{ln: ln, upstream: upstream}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			u, err := net.Dial("tcp", upstream)
			if err != nil {
				c.Close()
				continue
			}
			go tp.pipe(c, u, false)
			go tp.pipe(u, c, true)
		}
	}()
	return tp
}

func (tp *mqttTap) url() string { return "tcp://" + tp.ln.Addr().String() }

// pipe copies packets from src to dst, recording them.
func (tp *mqttTap) pipe(src, dst net.Conn, fromBroker bool) {
	defer src.Close()
	defer dst.Close()
	r := bufio.NewReader(src)
	for {
		first, err := r.ReadByte()
		if err != nil {
			return
		}
		var n, shift int
		hdr := []byte{first}
		for {
			b, err := r.ReadByte()
			if err != nil {
				return
			}
			hdr = append(hdr, b)
			n |= int(b&0x7f) << shift
			shift += 7
			if b&0x80 == 0 {
				break
			}
		}
		body := make([]byte, n)
		if _, err := io.ReadFull(r, body); err != nil {
			return
		}
		typ, qos := first>>4, (first>>1)&3
		tp.mu.Lock()
		switch {
		case fromBroker && typ == 3 && qos == 1 && len(body) >= 2:
			tl := int(binary.BigEndian.Uint16(body))
			if len(body) >= 4+tl {
				tp.published = append(tp.published, binary.BigEndian.Uint16(body[2+tl:]))
			}
		case !fromBroker && typ == 4 && len(body) >= 2:
			tp.acked = append(tp.acked, binary.BigEndian.Uint16(body))
		}
		tp.mu.Unlock()
		if _, err := dst.Write(append(hdr, body...)); err != nil {
			return
		}
	}
}

func (tp *mqttTap) snapshot() (pub, ack []uint16) {
	tp.mu.Lock()
	defer tp.mu.Unlock()
	return slices.Clone(tp.published), slices.Clone(tp.acked)
}

func runClient(t *testing.T, sub Submitter, opts ClientOptions) *Client {
	t.Helper()
	c := NewClient(sub, opts)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(40 * time.Second):
			t.Error("ingest client did not stop")
		}
	})
	select {
	case <-c.Subscribed():
	case <-time.After(15 * time.Second):
		t.Fatal("ingest client never subscribed")
	}
	return c
}

func publisher(t *testing.T, url, user, pass string) paho.Client {
	t.Helper()
	o := paho.NewClientOptions().AddBroker(url).SetClientID(fmt.Sprintf("pub-%s-%d", user, time.Now().UnixNano())).
		SetUsername(user).SetPassword(pass).SetAutoReconnect(false).SetConnectTimeout(5 * time.Second)
	cl := paho.NewClient(o)
	if err := waitToken(cl.Connect(), 10*time.Second); err != nil {
		t.Fatalf("connect %s: %v", user, err)
	}
	t.Cleanup(func() { cl.Disconnect(0) })
	return cl
}

// TestExternalAckOrder: readings of many devices interleaved on one
// connection, one device slow to settle; the PUBACKs on the wire come in
// the order the PUBLISHes arrived (MQTT 3.1.1 §4.6), each device's readings
// are queued in order, and none is lost.
func TestExternalAckOrder(t *testing.T) {
	m := mosquittotest.Start(t, "", "allow_anonymous true")
	tap := newMQTTTap(t, m.Addr)
	topic, _ := ParseTopic("devices/{device}/telemetry")
	rec := &recorder{delay: func(d string) time.Duration {
		if d == "dev0" || d == "dev5" {
			return 3 * time.Millisecond // settles late: later devices' acks must wait
		}
		return 0
	}}
	var ackOrder []string
	var ackMu sync.Mutex
	runClient(t, rec, ClientOptions{URL: tap.url(), ClientID: "edgegate-order", Topic: topic, Inflight: 64,
		OnAck: func(_ string, p []byte) { ackMu.Lock(); ackOrder = append(ackOrder, string(p)); ackMu.Unlock() }})
	pub := publisher(t, m.URL, "pub", "")
	const devices, each = 12, 40
	want := publishInterleaved(t, pub, devices, each)
	tap.assertAckOrder(t, len(want))
	ackMu.Lock()
	if !slices.Equal(ackOrder, want) {
		t.Errorf("acknowledged readings out of publish order")
	}
	ackMu.Unlock()
	if rec.count() != len(want) {
		t.Fatalf("queued %d readings, want %d (none lost, none twice)", rec.count(), len(want))
	}
	for d := 0; d < devices; d++ {
		dev := fmt.Sprintf("dev%d", d)
		got := rec.got[dev]
		for i, p := range got {
			if p != fmt.Sprintf("%s:%d", dev, i) {
				t.Fatalf("%s queued %q at position %d: per-device order lost", dev, p, i)
			}
		}
	}
}

// TestExternalReadyMeansSubscribed: on a first start (the broker holds no
// session for the gateway), a reading published right after the client
// says it is subscribed is not lost.
func TestExternalReadyMeansSubscribed(t *testing.T) {
	m := mosquittotest.Start(t, "", "allow_anonymous true")
	topic, _ := ParseTopic("devices/{device}/telemetry")
	for i := 0; i < 20; i++ { // a fresh session each time: a new client id
		rec := &recorder{}
		pub := publisher(t, m.URL, "pub", "")
		c := NewClient(rec, ClientOptions{URL: m.URL, ClientID: fmt.Sprintf("edgegate-first-%d", i), Topic: topic})
		if c.Live() {
			t.Fatal("Live before connecting")
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- c.Run(ctx) }()
		select {
		case <-c.Subscribed():
		case <-time.After(15 * time.Second):
			t.Fatal("never subscribed")
		}
		if err := waitToken(pub.Publish("devices/d1/telemetry", 1, false, "right-after-ready"), 5*time.Second); err != nil {
			t.Fatal(err)
		}
		testkit.Poll(5*time.Second, func() bool { return rec.count() > 0 }) // asserted below
		if rec.count() != 1 || !c.Live() {
			t.Fatalf("start %d: the reading published right after ready was queued %d times (live %v), want once", i, rec.count(), c.Live())
		}
		cancel()
		<-done
		if c.Live() {
			t.Error("Live after Run returned")
		}
	}
}

// TestExternalRetainedCopyNotIngested: the copy of a retained reading the
// broker sends for a new subscription is acknowledged but not taken in
// (it may date from another owner); live readings are.
func TestExternalRetainedCopyNotIngested(t *testing.T) {
	m := mosquittotest.Start(t, "", "allow_anonymous true", "log_type all")
	defer func() {
		if t.Failed() {
			b, _ := os.ReadFile(m.LogFile)
			t.Log(string(b))
		}
	}()
	topic, _ := ParseTopic("devices/{device}/telemetry")
	pub := publisher(t, m.URL, "pub", "")
	if err := waitToken(pub.Publish("devices/d1/telemetry", 1, true, "stored-under-old-owner"), 5*time.Second); err != nil {
		t.Fatal(err)
	}
	rec := &recorder{}
	met := metrics.New()
	runClient(t, rec, ClientOptions{URL: m.URL, ClientID: "edgegate-retained", Topic: topic, Metrics: met})
	if err := waitToken(pub.Publish("devices/d1/telemetry", 1, false, "live"), 5*time.Second); err != nil {
		t.Fatal(err)
	}
	// A device that sets RETAIN on its live readings: forwarded on an
	// established subscription, it arrives with RETAIN=0 and is taken in.
	if err := waitToken(pub.Publish("devices/d1/telemetry", 1, true, "live-retained"), 5*time.Second); err != nil {
		t.Fatal(err)
	}
	testkit.Poll(5*time.Second, func() bool { return rec.count() >= 2 }) // asserted below
	rec.mu.Lock()
	got := slices.Clone(rec.got["d1"])
	rec.mu.Unlock()
	if !slices.Equal(got, []string{"live", "live-retained"}) {
		t.Fatalf("ingested %q, want only the live readings", got)
	}
	var dm dto.Metric
	if err := met.AccessDenied.WithLabelValues("deliver", "retained").Write(&dm); err != nil || dm.GetCounter().GetValue() != 1 {
		t.Fatalf("retained copies counted = %v (%v), want 1", dm.GetCounter().GetValue(), err)
	}
}

// publishInterleaved publishes each readings of devices devices, one of
// each device in turn, waits for every PUBACK, and returns the payloads in
// publish order.
func publishInterleaved(t *testing.T, pub paho.Client, devices, each int) []string {
	t.Helper()
	var want []string
	var toks []paho.Token
	for i := range each {
		for d := range devices {
			p := fmt.Sprintf("dev%d:%d", d, i)
			want = append(want, p)
			toks = append(toks, pub.Publish(fmt.Sprintf("devices/dev%d/telemetry", d), 1, false, p))
		}
	}
	for _, tk := range toks {
		if err := waitToken(tk, 20*time.Second); err != nil {
			t.Fatalf("publish: %v", err)
		}
	}
	return want
}

// assertAckOrder waits until n PUBACKs crossed the tap and fails unless
// they follow the order of the PUBLISHes on the wire (MQTT 3.1.1 §4.6).
func (tp *mqttTap) assertAckOrder(t *testing.T, n int) {
	t.Helper()
	testkit.Poll(30*time.Second, func() bool { _, ack := tp.snapshot(); return len(ack) >= n }) // asserted below
	pubIDs, ackIDs := tp.snapshot()
	if len(pubIDs) != n || !slices.Equal(pubIDs, ackIDs) {
		first := -1
		for i := range min(len(pubIDs), len(ackIDs)) {
			if pubIDs[i] != ackIDs[i] {
				first = i
				break
			}
		}
		t.Fatalf("%d PUBLISH, %d PUBACK; first out-of-order PUBACK at %d: the PUBACKs must follow the arrival order", len(pubIDs), len(ackIDs), first)
	}
}
