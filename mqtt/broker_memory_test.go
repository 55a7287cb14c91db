package mqtt

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/edgegate/edgegate/internal/pipeline"
	"github.com/edgegate/edgegate/internal/testkit"
)

// countingGate holds every commit until gate closes and counts the
// readings handed to it.
type countingGate struct {
	*pipeline.Pipeline
	gate   chan struct{}
	starts *atomic.Int64
}

func (g countingGate) Start(ctx context.Context, msg pipeline.Message) pipeline.Pending {
	wait := g.Pipeline.Start(ctx, msg)
	g.starts.Add(1)
	return func(ctx context.Context) (pipeline.Outcome, error) {
		select {
		case <-g.gate:
		case <-ctx.Done():
		}
		return wait(ctx)
	}
}

// TestBrokerInflightBytesBackpressure: readings waiting for the disk hold
// at most BrokerOptions.InflightBytes of payloads across connections; past
// it the broker stops reading the publishing connections (the devices wait
// for their PUBACKs) instead of buffering, and every reading is committed
// and acknowledged once the disk catches up.
func TestBrokerInflightBytesBackpressure(t *testing.T) {
	gate := make(chan struct{})
	var starts atomic.Int64
	const room = 3
	e := newAccessEnvWith(t, func(p *pipeline.Pipeline) Submitter { return countingGate{p, gate, &starts} },
		func(o *BrokerOptions) { o.InflightBytes = room*inflightCost([]byte(sample)) + 1 })
	var toks []paho.Token
	for _, id := range []string{"a1", "a2"} {
		c := e.device(id)
		for i := range 5 {
			toks = append(toks, c.Publish(fmt.Sprintf("devices/%s/telemetry", id), 1, false, fmt.Sprintf(`{"temperature": %d}`, 20+i)))
		}
	}
	testkit.Eventually(t, 10*time.Second, "the budget's room of readings handed to the queue", func() bool { return starts.Load() >= room })
	// Not more: the two connections wait. (A bounded look: 300 ms.)
	for deadline := time.Now().Add(300 * time.Millisecond); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if n := starts.Load(); n > room {
			t.Fatalf("%d readings held waiting for the disk, budget %d", n, room)
		}
	}
	for _, tk := range toks {
		if tk.WaitTimeout(50 * time.Millisecond) {
			t.Fatal("a reading was acknowledged before its commit")
		}
	}
	close(gate)
	for i, tk := range toks {
		if !tk.WaitTimeout(10*time.Second) || tk.Error() != nil {
			t.Fatalf("publish %d not acknowledged once the disk caught up: %v", i, tk.Error())
		}
	}
	if n := starts.Load(); n != int64(len(toks)) {
		t.Fatalf("%d readings queued, want %d", n, len(toks))
	}
}
