package mqtt

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/mosquittotest"
	"github.com/edgegate/edgegate/internal/pipeline"
)

// startRecorder is a Starter (as the real pipeline is): Start records the
// reading at once — the order of Start calls is the commit order — and
// its outcome arrives after a per-device delay, so readings settle out of
// their arrival order.
type startRecorder struct {
	recorder
	starts int
	slow   func(device string) time.Duration
}

func (s *startRecorder) Start(ctx context.Context, msg pipeline.Message) pipeline.Pending {
	ready := time.Now().Add(s.slow(msg.Device))
	_, _ = s.recorder.Submit(ctx, msg)
	s.mu.Lock()
	s.starts++
	s.mu.Unlock()
	return func(ctx context.Context) (pipeline.Outcome, error) {
		t := time.NewTimer(time.Until(ready))
		defer t.Stop()
		select {
		case <-t.C:
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
