package e2e

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/sim/centralsim"
	"github.com/edgegate/edgegate/internal/testkit"
)

// TestTwoBrokersNoMisrouting: devices bound to two different brokers (two
// filters behind the same single sign-on); across a SIGKILL under load,
// each device's readings reach its own broker, all of them, and never the
// other.
func TestTwoBrokersNoMisrouting(t *testing.T) {
	a, b := dev("br-a", "alice"), dev("br-b", "alice")
	simA := startSim(t, a)
	simB := startSimWith(t, func(o *centralsim.Options) {
		o.Clients, o.TrustTokensOf = nil, simA // a broker only, behind simA's sign-on
	}, b)

	b.Broker = simB.BrokerURL()

	dir := t.TempDir()
	cfg := writeGatewayConfig(t, dir, simA, gatewayConfig{}, a, b)
	// One CA bundle for both brokers.
	ca := append(append([]byte(nil), simA.CACertPEM()...), simB.CACertPEM()...)
	os.WriteFile(filepath.Join(dir, "ca.pem"), ca, 0o600)

	acked := map[string][]int{}
	n := 0
	for cycle := 0; cycle < 2; cycle++ {
		g := startGateway(t, cfg)
		pa, pb := newPublisher(t, "tcp://"+g.MQTT, a), newPublisher(t, "tcp://"+g.MQTT, b)
		for i := 0; i < 30; i++ {
			n++
			if pa.publish(n) {
				acked[a.ID] = append(acked[a.ID], n)
			}
			if pb.publish(n) {
				acked[b.ID] = append(acked[b.ID], n)
			}
		}
		if cycle == 0 {
			g.kill()
		} else {
			testkit.Eventually(t, 30*time.Second, "every acknowledged reading at its own broker", func() bool {
				da, db := delivered(simA)[a.ID], delivered(simB)[b.ID]
				for _, i := range acked[a.ID] {
					if da[i] == 0 {
						return false
					}
				}
				for _, i := range acked[b.ID] {
					if db[i] == 0 {
						return false
					}
				}
				return true
			})
			g.term()
		}
	}
	for _, u := range simA.Updates() {
		if u.Device != a.ID {
			t.Errorf("broker A received a reading of %s", u.Device)
		}
	}
	for _, u := range simB.Updates() {
		if u.Device != b.ID {
			t.Errorf("broker B received a reading of %s", u.Device)
		}
	}
	for _, r := range append(simA.Refusals(), simB.Refusals()...) {
		if strings.Contains(r.Message, "not valid") {
			t.Errorf("a broker refused the gateway: %+v", r)
		}
	}
	t.Logf("%d + %d readings acknowledged, each at its own broker only", len(acked[a.ID]), len(acked[b.ID]))
}
