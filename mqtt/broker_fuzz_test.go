package mqtt

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/edgegate/edgegate/internal/envelope"
	"github.com/edgegate/edgegate/internal/metrics"
	"github.com/edgegate/edgegate/internal/pipeline"
	"github.com/edgegate/edgegate/internal/queue"
	"github.com/edgegate/edgegate/policy"
)

// fuzzBroker runs the real embedded broker (access and limit hooks, the
// pipeline and its badger queue) for the lifetime of a fuzz worker.
func fuzzBroker(f *testing.F) (addr, password, check string) {
	f.Helper()
	devs := []policy.Registration{reg("a1", "alice"), reg("b1", "bob")}
	p, err := policy.Compile(policy.Document{Format: 1, Version: 1, IssuedAt: time.Now(), Devices: devs}, "test", "")
	if err != nil {
		f.Fatal(err)
	}
	engine := policy.NewEngine(p)
	q, err := queue.Open(queue.Options{Dir: f.TempDir(), Key: bytes.Repeat([]byte{1}, 32)})
	if err != nil {
		f.Fatal(err)
	}
	qctx, qcancel := context.WithCancel(context.Background())
	qdone := make(chan struct{})
	go func() { q.Run(qctx); close(qdone) }()
	topic, _ := ParseTopic("devices/{device}/telemetry")
	lim := DefaultLimits()
	lim.ConnectTimeout = 200 * time.Millisecond
	lim.MaxKeepalive = 2 * time.Second
	b, err := NewBroker(pipeline.New(engine, q, pipeline.Options{Gateway: "gw"}), BrokerOptions{
		Listen: "127.0.0.1:0", Topic: topic, Policy: engine, Metrics: metrics.New(), Limits: lim,
		Logger: slog.New(slog.DiscardHandler), SubmitTimeout: time.Second})
	if err != nil {
		f.Fatal(err)
	}
	ready := make(chan struct{})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { b.Run(ctx, func() { close(ready) }); close(done) }()
	<-ready
	f.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			f.Error("the broker did not stop within 20 s after the fuzzing")
		}
		qcancel()
		<-qdone
		q.Close()
	})
	password, _ = envelope.DeriveMQTTPassword(devs[0].ID, devs[0].K1, devs[0].K2)
	check, _ = envelope.DeriveMQTTPassword(devs[1].ID, devs[1].K1, devs[1].K2)
	return b.Addr(), password, check
}

func fuzzSeeds(tb testing.TB, password string) [][]byte {
	conn := func(v byte, user, pw string, will bool) []byte {
		pk := connectPacket(wireOpts{user: user, password: pw, id: "fz", clean: true, keepalive: 5})
		pk.ProtocolVersion = v
		if v == 5 {
			pk.Connect.ProtocolName = []byte("MQTT")
		}
		if will {
			pk.Connect.WillFlag, pk.Connect.WillTopic, pk.Connect.WillPayload, pk.Connect.WillRetain = true, "devices/b1/telemetry", []byte(`{"t":1}`), true
		}
		return encode(tb, pk)
	}
	pub := func(v, qos byte, retain bool, topic, payload string) []byte {
		return encode(tb, packets.Packet{ProtocolVersion: v, FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: qos, Retain: retain},
			TopicName: topic, PacketID: 7, Payload: []byte(payload)})
	}
	sub := func(v byte, filters ...string) []byte {
		pk := packets.Packet{ProtocolVersion: v, FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, PacketID: 9}
		for _, f := range filters {
			pk.Filters = append(pk.Filters, packets.Subscription{Filter: f, Qos: 1})
		}
		return encode(tb, pk)
	}
	cat := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	reading := `{"temperature": 21.5}`
	return [][]byte{
		conn(4, "a1", password, false),
		cat(conn(4, "a1", password, false), pub(4, 1, false, "devices/a1/telemetry", reading)),
		cat(conn(4, "a1", password, false), pub(4, 0, true, "devices/a1/telemetry", reading), pub(4, 2, false, "devices/a1/telemetry", reading)),
		cat(conn(4, "a1", password, false), sub(4, "devices/a1/telemetry", "devices/+/telemetry", "#", "$share/g/devices/a1/telemetry")),
		cat(conn(4, "a1", password, false), pub(4, 1, false, "devices/b1/telemetry", reading)),
		cat(conn(4, "a1", password, true), []byte{0xc0, 0}),
		cat(conn(5, "a1", password, false), pub(5, 1, false, "devices/a1/telemetry", reading), []byte{0xe0, 0}),
		cat(conn(4, "a1", "wrong", false), pub(4, 1, false, "devices/a1/telemetry", reading)),
		conn(4, "", "", false),
		{0x10, 0xff, 0xff, 0xff, 0x7f}, // a CONNECT announcing 256 MiB
		{0x30, 0x02, 0x00, 0x00},       // PUBLISH before CONNECT
	}
}

// FuzzBrokerPackets sends arbitrary bytes over a raw TCP connection to the
// real embedded broker (seeded with valid CONNECT, PUBLISH and SUBSCRIBE
// packets of 3.1.1 and 5): it must never crash or stop serving — another
// device logs in after every input — and must stop in bounded time after.
func FuzzBrokerPackets(f *testing.F) {
	addr, password, check := fuzzBroker(f)
	for _, s := range fuzzSeeds(f, password) {
		f.Add(s)
	}
	login := encode(f, connectPacket(wireOpts{user: "b1", password: check, id: "fz-check", clean: true, keepalive: 5}))
	f.Fuzz(func(t *testing.T, in []byte) {
		c, err := net.DialTimeout("tcp", addr, 2*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(100 * time.Millisecond))
		c.Write(in)
		io.Copy(io.Discard, c) // whatever it answers, until it closes or 100 ms pass
		c.Close()
		// Still serving.
		ok, err := net.DialTimeout("tcp", addr, 2*time.Second)
		if err != nil {
			t.Fatalf("broker stopped accepting: %v", err)
		}
		defer ok.Close()
		ok.SetDeadline(time.Now().Add(5 * time.Second))
		ok.Write(login)
		var ack [4]byte
		if _, err := io.ReadFull(ok, ack[:]); err != nil || ack[0] != 0x20 || ack[3] != 0 {
			t.Fatalf("device login after the input: % x, %v", ack, err)
		}
	})
}
