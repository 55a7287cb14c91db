package mqtt

import (
	"context"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/edgegate/edgegate/internal/pipeline"
	"github.com/edgegate/edgegate/internal/reading"
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
	openGate(t, gate, toks, &starts)
}

// TestBrokerInflightShare: one device publishing large readings while the
// disk is slow holds at most its share of the in-flight budget, so the
// readings of another device are still read and handed to the queue (not
// stuck behind the large device's next reading in the budget's queue), and
// everything is acknowledged once the disk catches up.
func TestBrokerInflightShare(t *testing.T) {
	gate := make(chan struct{})
	var starts atomic.Int64
	big := fmt.Sprintf(`{"blob": %q}`, strings.Repeat("x", 60<<10))
	// The budget takes 9 large readings; one connection's share is the
	// floor of one reading of the largest size (256 KiB), i.e. 4 of them.
	budget := 9*inflightCost([]byte(big)) + 1
	e := newAccessEnvWith(t, func(p *pipeline.Pipeline) Submitter { return countingGate{p, gate, &starts} },
		func(o *BrokerOptions) { o.InflightBytes = budget })
	share := max(budget/inflightShares, inflightCost(nil)+reading.MaxPayloadBytes)
	perConn := share / inflightCost([]byte(big))
	if perConn < 1 || perConn >= 9 {
		t.Fatalf("test set-up: %d large readings per connection", perConn)
	}

	hog := e.device("a1")
	var toks []paho.Token
	for range 12 {
		toks = append(toks, hog.Publish("devices/a1/telemetry", 1, false, big))
	}
	testkit.Eventually(t, 10*time.Second, "the large device's share handed to the queue", func() bool { return starts.Load() >= perConn })
	other := e.device("a2")
	for i := range 3 {
		toks = append(toks, other.Publish("devices/a2/telemetry", 1, false, fmt.Sprintf(`{"temperature": %d}`, 20+i)))
	}
	// The small readings get in although the large device keeps
	// publishing: without a share it had 9 of its readings in and its 10th
	// at the head of the budget's queue, and a2 waited behind it.
	testkit.Eventually(t, 10*time.Second, "the other device's readings handed to the queue", func() bool { return starts.Load() == perConn+3 })
	for _, tk := range toks {
		if tk.WaitTimeout(20 * time.Millisecond) {
			t.Fatal("a reading was acknowledged before its commit")
		}
	}
	openGate(t, gate, toks, &starts)
}

// openGate lets the commits through and checks that every publish is then
// acknowledged and every reading was handed to the queue once.
func openGate(t *testing.T, gate chan struct{}, toks []paho.Token, starts *atomic.Int64) {
	t.Helper()
	close(gate)
	for i, tk := range toks {
		if !tk.WaitTimeout(20*time.Second) || tk.Error() != nil {
			t.Fatalf("publish %d not acknowledged once the disk caught up: %v", i, tk.Error())
		}
	}
	if n := starts.Load(); n != int64(len(toks)) {
		t.Fatalf("%d readings queued, want %d", n, len(toks))
	}
}
