package mqtt

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/edgegate/edgegate/internal/mosquittotest"
	"github.com/edgegate/edgegate/internal/pipeline"
	"github.com/edgegate/edgegate/internal/testkit"
)

// startRecorder is a Starter (as the real pipeline is): Start records the
// reading at once — the order of Start calls is the commit order — and
// its outcome arrives after a per-device delay, so readings settle out of
// their arrival order.
//
// With gate set instead, no outcome arrives until gate is closed: a disk
// that does not keep up.
type startRecorder struct {
	recorder
	starts int
	slow   func(device string) time.Duration
	gate   chan struct{}
}

func (s *startRecorder) Start(ctx context.Context, msg pipeline.Message) pipeline.Pending {
	ready := s.gate
	if ready == nil {
		ready = make(chan struct{})
		time.AfterFunc(s.slow(msg.Device), func() { close(ready) })
	}
	_, _ = s.recorder.Submit(ctx, msg)
	s.mu.Lock()
	s.starts++
	s.mu.Unlock()
	return func(ctx context.Context) (pipeline.Outcome, error) {
		select {
		case <-ready:
			return pipeline.Queued, nil
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
}

// TestExternalAckOrderPipelined: through a real Mosquitto, 50 devices'
// readings interleaved on the gateway's one connection, handed to the
// pipeline without waiting (many in one group commit), two devices slow to
// commit: the PUBACKs on the wire follow the PUBLISHes' order (MQTT 3.1.1
// §4.6), each device's readings are queued in publish order, none lost.
func TestExternalAckOrderPipelined(t *testing.T) {
	m := mosquittotest.Start(t, "", "allow_anonymous true", "max_inflight_messages 64")
	tap := newMQTTTap(t, m.Addr)
	topic, _ := ParseTopic("devices/{device}/telemetry")
	rec := &startRecorder{slow: func(d string) time.Duration {
		if d == "dev0" || d == "dev17" {
			return 4 * time.Millisecond
		}
		return 0
	}}
	var acked []string
	var ackMu sync.Mutex
	runClient(t, rec, ClientOptions{URL: tap.url(), ClientID: "edgegate-pipelined", Topic: topic, Inflight: 64,
		OnAck: func(_ string, p []byte) { ackMu.Lock(); acked = append(acked, string(p)); ackMu.Unlock() }})
	pub := publisher(t, m.URL, "pub", "")
	const devices, each = 50, 20
	want := publishInterleaved(t, pub, devices, each)
	tap.assertAckOrder(t, len(want))
	rec.mu.Lock()
	defer rec.mu.Unlock()
	if rec.starts != len(want) || rec.n != len(want) {
		t.Fatalf("started %d, queued %d readings, want %d (pipelined, none lost, none twice)", rec.starts, rec.n, len(want))
	}
	ackMu.Lock()
	if !slices.Equal(acked, want) {
		t.Errorf("acknowledged readings out of publish order")
	}
	ackMu.Unlock()
	for d := range devices {
		dev := fmt.Sprintf("dev%d", d)
		for i, p := range rec.got[dev] {
			if p != fmt.Sprintf("%s:%d", dev, i) {
				t.Fatalf("%s queued %q at position %d: per-device order lost", dev, p, i)
			}
		}
	}
}

// TestExternalInflightBytes: with a wide in-flight window, the readings
// waiting for their commit still hold at most ClientOptions.InflightBytes
// of payloads: past it the client reads no more from Mosquitto (which
// keeps the rest), and every reading is queued and acknowledged once the
// disk catches up.
func TestExternalInflightBytes(t *testing.T) {
	m := mosquittotest.Start(t, "", "allow_anonymous true")
	topic, _ := ParseTopic("devices/{device}/telemetry")
	payload := func(i int) string { return fmt.Sprintf(`{"blob": "%s", "i": %d}`, strings.Repeat("x", 4<<10), i) }
	const room = 3
	g := &startRecorder{gate: make(chan struct{})}
	runClient(t, g, ClientOptions{URL: m.URL, ClientID: "edgegate-bytes", Topic: topic, Inflight: 512,
		InflightBytes: room*inflightCost([]byte(payload(0))) + 1})
	pub := publisher(t, m.URL, "pub", "")
	var toks []paho.Token
	for i := range 10 {
		toks = append(toks, pub.Publish("devices/d1/telemetry", 1, false, payload(i)))
	}
	for i, tk := range toks {
		if err := waitToken(tk, 10*time.Second); err != nil {
			t.Fatalf("publish %d to Mosquitto: %v", i, err)
		}
	}
	testkit.Eventually(t, 10*time.Second, "the budget's room of readings started", func() bool { return g.count() >= room })
	// Not more (a bounded look: 300 ms); Mosquitto holds the rest.
	for deadline := time.Now().Add(300 * time.Millisecond); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if n := g.count(); n > room {
			t.Fatalf("%d readings held waiting for the disk, budget %d", n, room)
		}
	}
	close(g.gate)
	testkit.Eventually(t, 10*time.Second, "every reading queued once the disk caught up", func() bool { return g.count() == len(toks) })
	g.mu.Lock()
	defer g.mu.Unlock()
	for i, p := range g.got["d1"] {
		if p != payload(i) {
			t.Fatalf("reading %d queued out of order", i)
		}
	}
}
