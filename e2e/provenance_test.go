package e2e

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/envelope"
	"github.com/edgegate/edgegate/internal/sim/centralsim"
	"github.com/edgegate/edgegate/internal/testkit"
	"github.com/edgegate/edgegate/policy"
)

// TestDeviceSignedProvenance: a device that signs its own readings
// publishes compact JWSs over MQTT to the real daemon; the gateway verifies
// and forwards the device's own signature, which the simulated broker
// filter verifies with the device's registered public key (verdict valid,
// signed by no gateway). A gateway-forged (HS256 from K1/K2) reading, a
// replay and a re-ordering are refused, a QoS 1 redelivery is recognised
// and not forwarded twice, also across a restart of the daemon; after a key
// rotation old and new readings verify; `edgegate verify` agrees.
func TestDeviceSignedProvenance(t *testing.T) {
	d := dev("ds-1", "alice")
	devKey, err := envelope.GenerateKey(envelope.AlgEdDSA)
	if err != nil {
		t.Fatal(err)
	}
	pub, _ := devKey.PublicJWK()
	sim := startSimWith(t, func(o *centralsim.Options) {
		withPush(o)
		o.Devices[0].Signing, o.Devices[0].PublicKeys = policy.SigningDevice, []json.RawMessage{pub}
	}, d)
	dir := t.TempDir()
	cfg := bundleConfig(t, dir, sim, sim.URL())
	g := startGateway(t, cfg)
	waitLogin(t, g, d)
	p := newPublisher(t, "tcp://"+g.MQTT, d)
	sign := func(k envelope.Key, seq uint64, n int) string {
		t.Helper()
		jws, err := envelope.Seal(k, envelope.Claims{Version: envelope.Version, Device: d.ID, Seq: seq, Time: time.Now().UTC().Round(time.Millisecond),
			Attrs: map[string]envelope.Attr{"n": {Type: "Number", Value: float64(n)}}})
		if err != nil {
			t.Fatal(err)
		}
		return jws
	}
	send := func(payload string) {
		t.Helper()
		tok := p.client.Publish("devices/"+d.ID+"/telemetry", 1, false, payload)
		if !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
			t.Fatalf("publish not acknowledged: %v", tok.Error())
		}
	}
	refused := func(reason string) string {
		return scrape(t, g.Metrics, `edgegate_readings_refused_total{reason="`+reason+`"} `)
	}

	r1, r2, r3 := sign(devKey, 1, 1), sign(devKey, 2, 2), sign(devKey, 3, 3)
	for _, jws := range []string{r1, r2, r3} {
		send(jws)
	}
	send(r3)                  // a redelivery: acknowledged, not forwarded again
	send(sign(devKey, 2, 99)) // a replayed seq with other content
	hs, _ := envelope.DeriveHS256(d.ID, d.K1, d.K2)
	send(sign(hs, 4, 100)) // what a gateway holding K1/K2 could forge
	testkit.Eventually(t, 20*time.Second, "the three readings at the broker", func() bool { return len(delivered(sim)[d.ID]) == 3 })
	for _, u := range sim.Updates() {
		if u.Verdict != centralsim.VerdictValid || u.Gateway != "" || u.KeyID != devKey.ID() || u.Duplicate {
			t.Fatalf("update %+v: want valid, signed by the device's key, no duplicate", u)
		}
	}
	for reason, want := range map[string]string{"duplicate": "1", "replay": "1", "bad_signature": "1"} {
		if got := refused(reason); got != want {
			t.Errorf("refused{reason=%q} = %q, want %s", reason, got, want)
		}
	}

	// The replay mark survives a restart.
	if err := g.term(); err != nil {
		t.Fatalf("SIGTERM exit = %v", err)
	}
	g = startGateway(t, cfg)
	p = newPublisher(t, "tcp://"+g.MQTT, d)
	send(r3)
	send(sign(devKey, 3, 98))
	send(sign(devKey, 4, 4))
	testkit.Eventually(t, 20*time.Second, "reading 4 after the restart", func() bool { return len(delivered(sim)[d.ID]) == 4 })
	if got := refused("duplicate") + "/" + refused("replay"); got != "1/1" {
		t.Errorf("after restart refused duplicate/replay = %s, want 1/1", got)
	}

	// Rotation: the new key is registered, the gateway accepts it once its
	// policy lists it, and readings of both keys verify at the broker.
	newKey, _ := envelope.GenerateKey(envelope.AlgES256)
	newPub, _ := newKey.PublicJWK()
	if err := sim.RotateDeviceKey(d.ID, newPub); err != nil {
		t.Fatal(err)
	}
	if err := sim.Push("gw-e2e", true); err != nil {
		t.Fatal(err)
	}
	seq := uint64(5)
	testkit.Eventually(t, 20*time.Second, "a reading signed with the rotated key", func() bool {
		send(sign(newKey, seq, int(seq)))
		seq++
		time.Sleep(200 * time.Millisecond)
		for _, u := range sim.Updates() {
			if u.KeyID == newKey.ID() && u.Verdict == centralsim.VerdictValid {
				return true
			}
		}
		return false
	})

	// edgegate verify, with the platform's keys (a JWK Set, newest first).
	set, _ := envelope.KeySetJSON([]envelope.Key{newKey.Public(), devKey.Public()})
	keyFile := filepath.Join(dir, "device-keys.json")
	if err := os.WriteFile(keyFile, set, 0o600); err != nil {
		t.Fatal(err)
	}
	first := sim.Updates()[0]
	good, _ := json.Marshal(first.Attrs)
	forgedClaims := envelope.Claims{Version: envelope.Version, Gateway: "gw-e2e", Device: d.ID, Seq: 1, Time: time.Now().UTC(),
		Attrs: map[string]envelope.Attr{"n": {Type: "Number", Value: 1.0}}}
	forgedJWS, _ := envelope.Seal(hs, forgedClaims)
	forged, _ := envelope.Body(forgedClaims, forgedJWS, "")
	for _, tt := range []struct {
		name string
		doc  []byte
		code int
		out  string
	}{
		{"device's reading with the old key", good, 0, "valid: reading of device ds-1, seq 1, signed by the device itself"},
		{"forged by the gateway", forged, 1, "wrong key"},
	} {
		in := filepath.Join(dir, "in.json")
		if err := os.WriteFile(in, tt.doc, 0o600); err != nil {
			t.Fatal(err)
		}
		out, err := exec.Command(binary, "verify", "--key", keyFile, in).CombinedOutput()
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		}
		if code != tt.code || !strings.Contains(string(out), tt.out) {
			t.Errorf("verify %s: exit %d %q, want %d %q", tt.name, code, out, tt.code, tt.out)
		}
	}
}
