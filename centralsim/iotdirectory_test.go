package centralsim

import (
	"net/url"
	"testing"
	"time"

	"github.com/edgegate/edgegate/envelope"
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
