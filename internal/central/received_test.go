package central

import (
	"context"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/sim/centralsim"
	"github.com/edgegate/edgegate/policy"
	centralsync "github.com/edgegate/edgegate/sync"
)

// insertUnbound registers a device the stock way without binding it to
// an edgegate gateway (another edge gateway type).
func (e *env) insertUnbound(owner, id string) {
	e.t.Helper()
	tok, err := e.sim.IssueAccessToken(owner, time.Hour)
	if err != nil {
		e.t.Fatal(err)
	}
	dir := centralsync.NewDirectory(e.sim.URL(), e.simHTTP, func(context.Context) (string, error) { return tok, nil })
	spec := centralsync.DeviceSpec{ID: id, Type: "Thermometer", ContextBroker: centralsim.DefaultBrokerName, Kind: "sensor",
		Format: "json", Model: "custom", Producer: "edgegate", Latitude: 43.77, Longitude: 11.25, Frequency: 600,
		K1: devK1, K2: devK2,
		Attributes: []centralsync.DeviceAttr{{Name: "temperature", DataType: "float", Type: "temperature", Editable: "0",
			Unit: "C", HealthinessCriteria: centralsync.HealthRefreshRate, HealthinessValue: "1200"}},
		EdgeType: "linux", EdgeURIRaw: "iotapp-1", RadioNode: -1, RadioChild: -1}
	if _, err := dir.Insert(context.Background(), spec); err != nil {
		e.t.Fatalf("insert %s: %v", id, err)
	}
}

// TestDelegatedToGatewayAccount: a device another user delegated to the
// gateway's own account (stock delegation, usernameDelegated = the
// account) is in that gateway's bundle with its owner's keys and the
// delegation; revoking the delegation removes it; the other gateway never
// gets it.
func TestDelegatedToGatewayAccount(t *testing.T) {
	e := newEnv(t, func(c *Config) { c.GatewayUsers = map[string]string{"gw-a": "gwa-user", "gw-b": "gwb-user"} })
	e.insert("alice", "th-1", "gw-a")
	e.insertUnbound("bob", "th-bob")
	e.sim.SetDelegations([]centralsim.Delegation{{Device: "th-bob", User: "gwa-user", Kind: centralsim.KindModify}})
	ctx := context.Background()
	if _, err := e.svc.Refresh(ctx, false); err != nil {
		t.Fatal(err)
	}
	doc := e.bundleDoc("gw-a", "gw-a-client", gwASecret)
	got := map[string]policy.Registration{}
	for _, d := range doc.Devices {
		got[d.ID] = d
	}
	d, ok := got["th-bob"]
	if !ok || d.Owner != "bob" || d.K1 != devK1 || d.K2 != devK2 || d.Type != "Thermometer" || len(got) != 2 {
		t.Fatalf("gw-a's devices: %+v", doc.Devices)
	}
	found := false
	for _, dl := range doc.Delegations {
		found = found || (dl.Device == "th-bob" && dl.User == "gwa-user" && dl.Kind == policy.Kind(centralsim.KindModify))
	}
	if !found {
		t.Fatalf("gw-a's delegations lack th-bob → gwa-user: %+v", doc.Delegations)
	}
	for _, d := range e.bundleDoc("gw-b", "gw-b-client", gwBSecret).Devices {
		if d.ID == "th-bob" {
			t.Fatal("gw-b got a device delegated to gw-a's account")
		}
	}

	e.sim.SetDelegations(nil)
	if _, err := e.svc.Refresh(ctx, false); err != nil {
		t.Fatal(err)
	}
	for _, d := range e.bundleDoc("gw-a", "gw-a-client", gwASecret).Devices {
		if d.ID == "th-bob" {
			t.Fatal("th-bob still in gw-a's bundle after the delegation was revoked")
		}
	}
}

// bundleDoc fetches and verifies gw's bundle as the gateway does.
func (e *env) bundleDoc(gw, client, secret string) policy.Document {
	e.t.Helper()
	resp, body := e.do("GET", "/edgegate/v1/gateways/"+gw+"/policy", e.gatewayToken(client, secret), nil, nil)
	if resp.StatusCode != 200 {
		e.t.Fatalf("%s's policy: %d %s", gw, resp.StatusCode, body)
	}
	v, err := centralsync.NewVerifier(centralsync.VerifierOptions{Keys: e.pinnedKeys(), Gateway: gw})
	if err != nil {
		e.t.Fatal(err)
	}
	got, err := v.Verify(body, 0)
	if err != nil {
		e.t.Fatal(err)
	}
	return got.Document
}
