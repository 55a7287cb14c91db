package e2e

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/config"
	"github.com/edgegate/edgegate/internal/envelope"
	"github.com/edgegate/edgegate/internal/keys"
	"github.com/edgegate/edgegate/internal/queue"
	"github.com/edgegate/edgegate/internal/reading"
	"github.com/edgegate/edgegate/internal/testkit"
)

// TestUpgradeDeliversFullBodies: a store written before readings were
// stored packed — bodies rendered in full, the JWS on every attribute, as
// the version before 2026-12-03 wrote them — is delivered by this daemon
// after an upgrade in place: every reading once, in order, and verified by
// the broker with the device's key.
func TestUpgradeDeliversFullBodies(t *testing.T) {
	d := dev("th-old", "alice")
	sim := startSim(t, d)
	dir := t.TempDir()
	cfgPath := writeGatewayConfig(t, dir, sim, gatewayConfig{}, d)
	// A first start makes the store and its key; then the old version's
	// readings are written into it, with the store's own code.
	if err := startGateway(t, cfgPath).term(); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	key, _, err := keys.LoadStoreKey(cfg.Store.Credential, cfg.KeyFile(), os.Getenv)
	if err != nil {
		t.Fatal(err)
	}
	q, err := queue.Open(queue.Options{Dir: cfg.QueueDir(), Key: key})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	qctx, qcancel := context.WithCancel(ctx)
	qdone := make(chan error, 1)
	go func() { qdone <- q.Run(qctx) }()
	sign, err := envelope.DeriveHS256(d.ID, d.K1, d.K2)
	if err != nil {
		t.Fatal(err)
	}
	const n = 20
	for i := 1; i <= n; i++ {
		r := reading.Reading{Device: d.ID, Time: time.Now().UTC(), Attrs: []reading.Attribute{
			{Name: "n", Type: "Number", Value: float64(i)}, {Name: "temperature", Type: "Number", Value: 21.5}}}
		_, err := q.Append(ctx, queue.Entry{Broker: sim.BrokerURL(), Device: d.ID, Type: d.Type,
			Seal: func(seq uint64) ([]byte, error) { return envelope.SealBody(sign, "gw-e2e", seq, &r, "") }})
		if err != nil {
			t.Fatalf("queue reading %d: %v", i, err)
		}
	}
	qcancel()
	<-qdone
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}

	g := startGateway(t, cfgPath)
	defer g.term()
	testkit.Eventually(t, 30*time.Second, "the old readings delivered", func() bool { return len(delivered(sim)[d.ID]) == n })
	got := delivered(sim)[d.ID]
	for i := 1; i <= n; i++ {
		if got[i] != 1 {
			t.Errorf("reading %d delivered and verified %d times, want once", i, got[i])
		}
	}
	var last int
	for _, u := range sim.Updates() {
		if u.Device != d.ID {
			continue
		}
		m, ok := nOf(u)
		if !ok || m <= last {
			t.Fatalf("update %+v after n=%d: out of order or unreadable", u, last)
		}
		last = m
	}
}
