package central

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/edgegate/edgegate/policy"
)

func row(owner, id, details string) OwnershipRow {
	raw, _ := json.Marshal(details) // stock answers elementDetails JSON-encoded as a string too
	return OwnershipRow{Username: owner, ElementID: "Org:orion-1:" + id, ElementType: "IOTID", ElementName: id, ElementDetails: raw}
}

const okDetails = `{"k1":"k1-0123456789","k2":"k2-0123456789","contextbroker":"orion-1","edgegateway_type":"edgegate","edgegateway_uri":"edgegate://gw-1/radio?port=%2Fdev%2FttyUSB0&node=12"}`

func TestBuildMapsRowsAndDelegations(t *testing.T) {
	s := &Snapshot{
		Rows: []OwnershipRow{
			row("alice", "th-1", okDetails),
			row("alice", "th-2", strings.Replace(okDetails, "gw-1/radio?port=%2Fdev%2FttyUSB0&node=12", "gw-2/mqtt", 1)),
			row("carol", "plain", `{"k1":"a","k2":"b","contextbroker":"orion-1"}`), // not bound to a gateway
		},
		Types: map[string]string{"orion-1/th-1": "Thermometer", "orion-1/th-2": "Hygrometer"},
		Given: map[string][]DelegationRow{"alice": {
			{UsernameDelegator: "alice", UsernameDelegated: "bob", ElementID: "Org:orion-1:th-1", ElementType: "IOTID", Kind: "READ_ACCESS"},
			{UsernameDelegator: "alice", UsernameDelegated: "ANONYMOUS", ElementID: "Org:orion-1:th-1", ElementType: "IOTID", Kind: "READ_ACCESS"},
			{UsernameDelegator: "alice", GroupnameDelegated: "cn=staff,ou=Org,dc=ldap,dc=org", ElementID: "Org:orion-1:th-1", Kind: "MODIFY"},
			{UsernameDelegator: "alice", UsernameDelegated: "dave", ElementID: "Org:orion-1:th-1", Kind: "READ_ACCESS", DeleteTime: json.RawMessage(`"2026-01-01 00:00:00"`)},
		}},
	}
	out, err := Build(s, map[string]string{"orion-1": "https://broker.example/orion-filter/orion-1"}, []string{"gw-3"})
	if err != nil {
		t.Fatal(err)
	}
	g1 := out["gw-1"]
	if len(g1.Problems) != 0 || len(g1.Doc.Devices) != 1 {
		t.Fatalf("gw-1: %+v", g1)
	}
	d := g1.Doc.Devices[0]
	if d.ID != "th-1" || d.Type != "Thermometer" || d.Radio == nil || d.Radio.Port != "/dev/ttyUSB0" || d.Radio.Node != 12 || d.Radio.Child != -1 {
		t.Fatalf("th-1: %+v %+v", d, d.Radio)
	}
	want := []policy.Delegation{
		{Device: "th-1", User: "", Group: "cn=staff,ou=Org,dc=ldap,dc=org", Kind: policy.Modify},
		{Device: "th-1", User: "ANONYMOUS", Kind: policy.ReadAccess},
		{Device: "th-1", User: "bob", Kind: policy.ReadAccess},
	}
	if len(g1.Doc.Delegations) != len(want) {
		t.Fatalf("delegations: %+v", g1.Doc.Delegations)
	}
	for i := range want {
		if g1.Doc.Delegations[i] != want[i] {
			t.Fatalf("delegation %d: %+v, want %+v", i, g1.Doc.Delegations[i], want[i])
		}
	}
	if g2 := out["gw-2"]; len(g2.Doc.Devices) != 1 || g2.Doc.Devices[0].Radio != nil {
		t.Fatalf("gw-2: %+v", g2.Doc.Devices)
	}
	if g3 := out["gw-3"]; g3 == nil || len(g3.Doc.Devices) != 0 || len(g3.Problems) != 0 {
		t.Fatalf("configured gateway without devices: %+v", g3)
	}
	if len(out) != 3 {
		t.Fatalf("gateways: %d", len(out))
	}
}

func TestBuildRefusesInsteadOfDropping(t *testing.T) {
	brokers := map[string]string{"orion-1": "https://broker.example/x"}
	cases := map[string]struct {
		s       *Snapshot
		problem string // "" with fatal
		fatal   bool
	}{
		"untyped device": {s: &Snapshot{Rows: []OwnershipRow{row("alice", "th-1", okDetails)}}, problem: "no entity type"},
		"unknown broker": {s: &Snapshot{Rows: []OwnershipRow{row("alice", "th-1", strings.Replace(okDetails, `"contextbroker":"orion-1"`, `"contextbroker":"orion-9"`, 1))},
			Types: map[string]string{"orion-9/th-1": "T"}}, problem: "not in platform.brokers"},
		"unknown kind": {s: &Snapshot{Rows: []OwnershipRow{row("alice", "th-1", okDetails)}, Types: map[string]string{"orion-1/th-1": "T"},
			Given: map[string][]DelegationRow{"alice": {{UsernameDelegated: "bob", ElementID: "Org:orion-1:th-1", Kind: "READ_ALL"}}}}, problem: "unknown kind"},
		"delegations unreadable": {s: &Snapshot{Rows: []OwnershipRow{row("alice", "th-1", okDetails)}, Types: map[string]string{"orion-1/th-1": "T"},
			Failed: map[string]string{"alice": "HTTP 500"}}, problem: "delegations of alice unreadable"},
		"device the gateway refuses": {s: &Snapshot{Rows: []OwnershipRow{row("alice", "th-1", strings.Replace(okDetails, `"k2":"k2-0123456789"`, `"k2":"k1-0123456789"`, 1)),
			row("alice", "th-2", strings.Replace(okDetails, "node=12", "node=13", 1))},
			Types: map[string]string{"orion-1/th-1": "T", "orion-1/th-2": "T"}}, problem: "k1 and k2 must differ"},
		"radio bound twice": {s: &Snapshot{Rows: []OwnershipRow{row("alice", "th-1", okDetails), row("alice", "th-2", okDetails)},
			Types: map[string]string{"orion-1/th-1": "T", "orion-1/th-2": "T"}}, problem: "already bound to th-1"},
		"bad details":   {s: &Snapshot{Rows: []OwnershipRow{{Username: "a", ElementID: "O:b:c", ElementDetails: json.RawMessage(`"{\"k1\":"`)}}}, fatal: true},
		"bad edge uri":  {s: &Snapshot{Rows: []OwnershipRow{row("alice", "th-1", strings.Replace(okDetails, "edgegate://gw-1/radio", "http://gw-1/radio", 1))}}, fatal: true},
		"bad edge path": {s: &Snapshot{Rows: []OwnershipRow{row("alice", "th-1", strings.Replace(okDetails, "gw-1/radio", "gw-1/zigbee", 1))}}, fatal: true},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			out, err := Build(c.s, brokers, nil)
			if c.fatal {
				if err == nil {
					t.Fatalf("no error; built %+v", out)
				}
				if strings.Contains(err.Error(), "k1-0123456789") {
					t.Fatalf("error quotes a key: %v", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			b := out["gw-1"]
			if b == nil || len(b.Problems) == 0 || !strings.Contains(strings.Join(b.Problems, ";"), c.problem) {
				t.Fatalf("problems: %+v", b)
			}
		})
	}
}
