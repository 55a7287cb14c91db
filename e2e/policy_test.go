package e2e

import (
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/sim/centralsim"
	"github.com/edgegate/edgegate/internal/testkit"
)

// withPush binds the gateway account to gateway gw-e2e and starts the
// central push broker: what policy bundles need. Bundles, policy keys,
// receipts and the push broker are the edgegate companion's, which stock
// Snap4City lacks (centralsim.Options.Companion).
func withPush(o *centralsim.Options) {
	o.Companion = true
	o.Gateways = map[string]string{gwClientID: "gw-e2e"}
	o.MQTT = true
}

// startPolicySim starts the simulated central service with the push broker
// and the gateway account bound to gateway gw-e2e.
func startPolicySim(t *testing.T, devices ...testDevice) *centralsim.Server {
	t.Helper()
	return startSimWith(t, withPush, devices...)
}

func bundleConfig(t *testing.T, dir string, sim *centralsim.Server, centralURL string) string {
	t.Helper()
	keys, err := json.Marshal(sim.PolicyKeys())
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "policy-keys.json"), keys, 0o600); err != nil {
		t.Fatal(err)
	}
	extra := "policy:\n  source: bundle\n  central_url: " + centralURL + "\n  keys_file: policy-keys.json\n" +
		"  poll_interval: 10s\n  push_url: " + sim.MQTTURL() + "\n"
	// No devices in the file: they come from the bundle.
	return writeGatewayConfig(t, dir, sim, gatewayConfig{Extra: extra})
}

// TestPolicyBundleSyncPushAndRevocation: the gateway takes its devices from
// central ops' signed bundle, reports a signed receipt, applies a pushed
// revocation within seconds (the device's session closed, its queued
// readings purged), and keeps enforcing the cached policy when the central
// service is unreachable at start.
func TestPolicyBundleSyncPushAndRevocation(t *testing.T) {
	a, b := dev("pa-1", "alice"), dev("pb-1", "alice")
	sim := startPolicySim(t, a, b)
	dir := t.TempDir()
	cfg := bundleConfig(t, dir, sim, sim.URL())
	g := startGateway(t, cfg)

	// The first poll brings the bundle; then a's readings flow.
	var pa *publisher
	waitLogin(t, g, a)
	pa = newPublisher(t, "tcp://"+g.MQTT, a)
	pb := newPublisher(t, "tcp://"+g.MQTT, b)
	for i := 1; i <= 5; i++ {
		if !pa.publish(i) || !pb.publish(i) {
			t.Fatalf("reading %d not acknowledged", i)
		}
	}
	testkit.Eventually(t, 20*time.Second, "readings at the broker", func() bool {
		d := delivered(sim)
		return len(d[a.ID]) == 5 && len(d[b.ID]) == 5
	})
	testkit.Eventually(t, 20*time.Second, "a signed receipt", func() bool {
		for _, r := range sim.Receipts() {
			if r.Gateway == "gw-e2e" && r.Valid && r.PolicyVersion > 0 {
				return true
			}
		}
		return false
	})

	// Central ops revoke b and push the new bundle: b's session is closed
	// within seconds and b cannot log in again.
	sim.RemoveDevice(b.ID)
	if err := sim.Push("gw-e2e", true); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, 10*time.Second, "b's session closed after the pushed revocation", func() bool { return !pb.client.IsConnected() })
	if _, err := connect("tcp://"+g.MQTT, "b-again", b.ID, devicePassword(t, b)); err == nil {
		t.Fatal("a revoked device logged in again")
	}
	if !pa.publish(6) {
		t.Fatal("a's reading after the revocation not acknowledged")
	}
	testkit.Eventually(t, 20*time.Second, "a's reading after the revocation", func() bool { return len(delivered(sim)[a.ID]) == 6 })
	if err := g.term(); err != nil {
		t.Fatalf("SIGTERM exit = %v", err)
	}

	// Restart with the central service unreachable: the cached policy is
	// in force from the first second (a logs in, b does not).
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	dead := "https://" + ln.Addr().String()
	ln.Close()
	cfg = bundleConfig(t, dir, sim, dead)
	g = startGateway(t, cfg)
	if _, err := connect("tcp://"+g.MQTT, "a-offline", a.ID, devicePassword(t, a)); err != nil {
		t.Fatalf("with central down, the cached policy does not admit a: %v", err)
	}
	if _, err := connect("tcp://"+g.MQTT, "b-offline", b.ID, devicePassword(t, b)); err == nil {
		t.Fatal("with central down, the revoked device logged in")
	}
	if !strings.Contains(g.log.String(), "cached policy in force") {
		t.Errorf("the daemon did not say that the cached policy is in force")
	}
}
