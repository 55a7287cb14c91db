package radio_test

import (
	"github.com/edgegate/edgegate/internal/sim/radiosim"
	"github.com/edgegate/edgegate/radio"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/edgegate/edgegate/internal/metrics"
	"github.com/edgegate/edgegate/internal/testkit"
	"github.com/edgegate/edgegate/policy"
)

// identityPolicy is a real policy engine binding node 1 on portA and
// node 2 on portB (issue 17 item 6).
func identityPolicy(t *testing.T, portA, portB string) *policy.Engine {
	t.Helper()
	reg := func(id string, port string, node int) policy.Registration {
		return policy.Registration{ID: id, Type: "Thermometer", Owner: "alice", Broker: "https://broker.example/orion",
			K1: id + "-k1", K2: id + "-k2", Radio: &policy.RadioBinding{Port: port, Node: node, Child: -1}}
	}
	p, err := policy.New(1, "config", []policy.Registration{reg("th-a1", portA, 1), reg("th-b2", portB, 2)})
	if err != nil {
		t.Fatal(err)
	}
	return policy.NewEngine(p)
}

// TestIDRequestSkipsBoundAndSeenIDs: a new node asking for an id never
// gets one the policy binds (on this port or another) nor one already
// seen on the port; the ids handed out survive a restart in the state
// file.
func TestIDRequestSkipsBoundAndSeenIDs(t *testing.T) {
	checkNoLeak(t)
	dir := t.TempDir()
	link := filepath.Join(dir, "ttyA")
	eng := identityPolicy(t, link, filepath.Join(dir, "ttyB"))
	sub := &fakeSub{}
	opts := testOpts(t)
	sim := runSim(t, radiosim.Options{Link: link, Silent: true, HearController: true})
	m, err := radio.NewManager([]radio.PortConfig{{Path: link, ReadTimeout: 100 * time.Millisecond}}, sub, eng, opts)
	if err != nil {
		t.Fatal(err)
	}
	stop := runManager(t, m, 2*time.Second)
	testkit.Eventually(t, 5*time.Second, "port open", func() bool { return m.Ports()[0].Open })

	// Node 3 speaks with a static id: seen, so never handed out either.
	if err := sim.Inject([]byte("3;255;3;0;6;0\n")); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, 5*time.Second, "node 3 seen", func() bool { return m.Ports()[0].FramesOK >= 1 })
	for range 2 {
		if err := sim.Inject([]byte("255;255;3;0;3;\n")); err != nil {
			t.Fatal(err)
		}
	}
	testkit.Eventually(t, 5*time.Second, "two ids handed out", func() bool { return len(sim.Stats().AssignedIDs) == 2 })
	if got := sim.Stats().AssignedIDs; got[0] != 4 || got[1] != 5 {
		t.Fatalf("assigned ids = %v, want [4 5]: 1 and 2 are bound in the policy, 3 was seen", got)
	}
	stop()

	// After a restart, with the policy unchanged, the next id is 6.
	m2, err := radio.NewManager([]radio.PortConfig{{Path: link, ReadTimeout: 100 * time.Millisecond}}, sub, eng, opts)
	if err != nil {
		t.Fatal(err)
	}
	runManager(t, m2, 2*time.Second)
	testkit.Eventually(t, 5*time.Second, "port open again", func() bool { return m2.Ports()[0].Open })
	if err := sim.Inject([]byte("255;255;3;0;3;\n")); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, 5*time.Second, "a third id", func() bool { return len(sim.Stats().AssignedIDs) == 3 })
	if got := sim.Stats().AssignedIDs[2]; got != 6 {
		t.Fatalf("id after restart = %d, want 6", got)
	}
}

// TestFrameFromNodeBoundOnOtherPortRefused: node 2 is th-b2 on port B; a
// node on port A claiming id 2 is refused and counted, even when port A
// has a whole-port binding, while node 1 (bound on A) is delivered.
func TestFrameFromNodeBoundOnOtherPortRefused(t *testing.T) {
	checkNoLeak(t)
	dir := t.TempDir()
	link := filepath.Join(dir, "ttyA")
	portB := filepath.Join(dir, "ttyB")
	reg := func(id string, port string, node int) policy.Registration {
		return policy.Registration{ID: id, Type: "Thermometer", Owner: "alice", Broker: "https://broker.example/orion",
			K1: id + "-k1", K2: id + "-k2", Radio: &policy.RadioBinding{Port: port, Node: node, Child: -1}}
	}
	p, err := policy.New(1, "config", []policy.Registration{reg("th-a1", link, 1), reg("th-b2", portB, 2), reg("gw-a", link, -1)})
	if err != nil {
		t.Fatal(err)
	}
	eng := policy.NewEngine(p)
	sub := &fakeSub{}
	opts := testOpts(t)
	opts.Metrics = metrics.New()
	var mu sync.Mutex
	var audited []string
	opts.OnRefusal = func(reason, port, node, bound string) {
		mu.Lock()
		audited = append(audited, reason+" "+port+" "+node+" "+bound)
		mu.Unlock()
	}
	sim := runSim(t, radiosim.Options{Link: link, Silent: true, HearController: true})
	m, err := radio.NewManager([]radio.PortConfig{{Path: link, ReadTimeout: 100 * time.Millisecond}}, sub, eng, opts)
	if err != nil {
		t.Fatal(err)
	}
	runManager(t, m, 2*time.Second)
	testkit.Eventually(t, 5*time.Second, "port open", func() bool { return m.Ports()[0].Open })
	if err := sim.Inject([]byte("2;0;1;0;0;99.0\n1;0;1;0;0;21.5\n")); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, 5*time.Second, "node 1 delivered", func() bool { return sub.count("th-a1", "temperature") == 1 })
	testkit.Eventually(t, 5*time.Second, "node 2 refused", func() bool {
		var c dto.Metric
		_ = opts.Metrics.Refused.WithLabelValues(radio.ReasonNodeOtherPort).Write(&c)
		return c.GetCounter().GetValue() == 1
	})
	for _, msg := range sub.got() {
		if msg.Device != "th-a1" || strings.Contains(string(msg.Payload), "99") {
			t.Fatalf("a frame of node 2 reached %s: %s", msg.Device, msg.Payload)
		}
	}
	if st := m.Ports()[0]; st.Refused != 1 {
		t.Errorf("port refused = %d, want 1", st.Refused)
	}
	mu.Lock()
	defer mu.Unlock()
	if want := radio.ReasonNodeOtherPort + " " + link + " 2/0 " + portB; len(audited) != 1 || audited[0] != want {
		t.Errorf("audited %q, want [%q]", audited, want)
	}
}
