package modbus_test

import (
	"bytes"
	"context"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/envelope"
	"github.com/edgegate/edgegate/internal/metrics"
	"github.com/edgegate/edgegate/internal/pipeline"
	"github.com/edgegate/edgegate/internal/queue"
	"github.com/edgegate/edgegate/internal/testkit"
	"github.com/edgegate/edgegate/policy"
	"github.com/edgegate/edgegate/radio/modbus"
)

// Through the real pipeline, queue (badger on disk) and policy: a polled
// register becomes a signed, queued reading of the right device, and a
// slave mapped to a device the policy does not list is refused like any
// unknown device.
func TestPolledValueBecomesASignedReading(t *testing.T) {
	const broker = "https://b.example/orion-filter/orion-1"
	p, err := policy.New(1, "test", []policy.Registration{{ID: "meter-1", Type: "EnergyMeter", Owner: "alice", Broker: broker,
		K1: "k1-canary-meter", K2: "k2-canary-meter"}})
	if err != nil {
		t.Fatal(err)
	}
	engine := policy.NewEngine(p)
	q, err := queue.Open(queue.Options{Dir: t.TempDir(), Key: bytes.Repeat([]byte{7}, 32)})
	if err != nil {
		t.Fatal(err)
	}
	qctx, qcancel := context.WithCancel(context.Background())
	qdone := make(chan struct{})
	go func() { q.Run(qctx); close(qdone) }()
	t.Cleanup(func() { qcancel(); <-qdone; q.Close() })
	m := metrics.New()
	pipe := pipeline.New(engine, q, pipeline.Options{Gateway: "gw-1", Metrics: m})

	sim := startSim(t)
	sim.Unit(1).SetInput(0, 0x4366, 0x8000) // float32 230.5, big word order
	sim.Unit(2).SetInput(0, 0x4366, 0x8000)
	reg := func(attr string) []modbus.Register {
		return []modbus.Register{{Attr: attr, Table: modbus.TableInput, Addr: 0, Type: modbus.TypeFloat32, Unit: "V"}}
	}
	ms := startMaster(t, []modbus.LineConfig{{Path: sim.Link(), Devices: []modbus.DeviceConfig{
		{Device: "meter-1", Unit: 1, Period: 50 * time.Millisecond, Registers: reg("voltage")},
		{Device: "stranger", Unit: 2, Period: 50 * time.Millisecond, Registers: reg("voltage")},
	}}}, pipe, m)

	lane := queue.Lane{Broker: broker, Device: "meter-1"}
	var items []queue.Item
	testkit.Eventually(t, 10*time.Second, "a queued reading of meter-1", func() bool {
		items, err = q.Peek(lane, 1)
		return err == nil && len(items) > 0
	})
	dev, _ := engine.Current().Device("meter-1")
	body, err := envelope.AppendBody(nil, items[0].Body) // as the uplink sends it
	if err != nil {
		t.Fatal(err)
	}
	claims, err := envelope.VerifyAttrs(body, dev.Key(), envelope.DefaultSignatureAttr)
	if err != nil {
		t.Fatalf("the queued reading does not verify with meter-1's key: %v\n%s", err, body)
	}
	if claims.Device != "meter-1" || claims.Gateway != "gw-1" {
		t.Errorf("claims = %+v, want device meter-1 signed by gw-1", claims)
	}
	if a := claims.Attrs["voltage"]; a.Type != "Number" || a.Value != 230.5 {
		t.Errorf("voltage = %+v, want Number 230.5", a)
	}
	testkit.Eventually(t, 5*time.Second, "the stranger's readings refused", func() bool {
		return statusOf(t, ms, "stranger").Refused > 0
	})
	if lanes := q.Lanes(broker); len(lanes) != 1 {
		t.Errorf("lanes = %v, want meter-1's only", lanes)
	}
	if st := statusOf(t, ms, "meter-1"); st.Submitted == 0 || st.Refused != 0 {
		t.Errorf("meter-1 status = %+v, want submitted and none refused", st)
	}
}
