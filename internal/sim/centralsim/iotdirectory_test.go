package centralsim

import (
	"encoding/json"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/envelope"
)

// TestDirectoryUpdateNudgesGatewaysBoundOnFirstUse: a key rotation nudges
// the gateways bound on first use, not only those of Options.Gateways.
func TestDirectoryUpdateNudgesGatewaysBoundOnFirstUse(t *testing.T) {
	f := newFixture(t, syncOptions, func(o *Options) { o.Gateways = nil; o.MQTT = true })
	alice := f.token(t, "alice", time.Minute)
	update := func() bool {
		t.Helper()
		key, err := envelope.GenerateKey(envelope.AlgEdDSA)
		if err != nil {
			t.Fatal(err)
		}
		pub, err := key.PublicJWK()
		if err != nil {
			t.Fatal(err)
		}
		q := url.Values{"action": {"update"}, "nodered": {"yes"}, "id": {"th-garden"}, "type": {"Thermometer"},
			"contextbroker": {DefaultBrokerName}, "gb_old_cb": {DefaultBrokerName}, "kind": {"sensor"}, "format": {"json"},
			"model": {"custom"}, "producer": {"acme"}, "latitude": {"43.77"}, "longitude": {"11.25"},
			"k1": {"kk1-garden"}, "k2": {"kk2-garden"}, "frequency": {"600"}, "publickey": {string(pub)}}
		r := f.mustDo(t, "GET", f.sim.URL()+"/iot-directory/api/device.php?"+q.Encode(), alice, nil)
		res := decodeJSON[struct {
			Status string `json:"status"`
			Nudged bool   `json:"nudged"`
		}](t, r)
		if res.Status != "ok" {
			t.Fatalf("update: %d %s", r.status, r.body)
		}
		return res.Nudged
	}
	if update() {
		t.Error("nudged with no gateway bound")
	}
	if r := f.mustDo(t, "GET", f.sim.PolicyURL(gwAlpha), f.clientToken(t, "alice", "gw-1"), nil); r.status != 200 {
		t.Fatalf("first use: %d %s", r.status, r.body)
	}
	if !update() {
		t.Error("the gateway bound on first use was not nudged")
	}
}

// TestDirectoryInsertPublicKey: with the companion, insert's publickey is
// the device's first key (in elementDetails.publickey); stock ignores it.
func TestDirectoryInsertPublicKey(t *testing.T) {
	key, err := envelope.GenerateKey(envelope.AlgEdDSA)
	if err != nil {
		t.Fatal(err)
	}
	pub, err := key.PublicJWK()
	if err != nil {
		t.Fatal(err)
	}
	for _, companion := range []bool{false, true} {
		f := newFixture(t, platformOptions, func(o *Options) { o.Companion = companion })
		alice := f.token(t, "alice", time.Minute)
		p := insertParams("d-key")
		p.Set("publickey", string(pub))
		if res := f.directory(t, alice, p); res["status"] != "ok" {
			t.Fatalf("companion %v: insert: %v", companion, res)
		}
		var det ElementDetails
		for _, r := range f.sim.OwnershipRows("alice") {
			if r.ElementID == f.sim.ElementID("d-key") {
				if err := json.Unmarshal(r.ElementDetails, &det); err != nil {
					t.Fatal(err)
				}
			}
		}
		if got := det.PublicKey != ""; got != companion {
			t.Errorf("companion %v: elementDetails.publickey = %q", companion, det.PublicKey)
		}
		if companion {
			p := insertParams("d-badkey")
			p.Set("publickey", "not a key")
			if res := f.directory(t, alice, p); res["status"] != "ko" || !strings.Contains(res["error_msg"].(string), "publickey") {
				t.Errorf("insert with a bad publickey: %v", res)
			}
		}
	}
}
