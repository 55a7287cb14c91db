package centralsync

import (
	"context"
	"encoding/json"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/edgegate/edgegate/policy"
)

// mapRegistry is a small in-test registry: the gateway's own records by id.
type mapRegistry map[string]policy.Registration

func (m mapRegistry) Lookup(id string) (policy.Registration, bool) {
	r, ok := m[id]
	return r, ok
}

// stockDetails is a delegationDetails as the datamanager serialises it: a
// JSON string holding an object (DelegationSerializer.writeStringField).
func stockDetails(k1, k2 string) string {
	inner, _ := json.Marshal(map[string]string{"k1": k1, "k2": k2})
	outer, _ := json.Marshal(string(inner))
	return string(outer)
}

// A received delegation as GET /v2/username/alice/delegated returns it
// (v2 keeps group rows, whose usernameDelegated is absent).
func receivedRow(delegator, delegated, group, element, kind, details string) string {
	m := map[string]any{"id": 40, "usernameDelegator": delegator, "elementId": element, "elementType": "IOTID",
		"insertTime": 1733100000000, "kind": kind}
	if delegated != "" {
		m["usernameDelegated"] = delegated
	}
	if group != "" {
		m["groupnameDelegated"] = group
	}
	if details != "" {
		m["delegationDetails"] = json.RawMessage(details)
	}
	b, _ := json.Marshal(m)
	return string(b)
}

func ownedRow(id, details string) string {
	return `{"username":"alice","elementId":"Organization:orion-1:` + id + `","elementType":"IOTID","elementName":"` + id +
		`","elementDetails":` + details + `,"created":"2025-03-01 10:00:00"}`
}

func decodeList[T any](t *testing.T, items ...string) []T {
	t.Helper()
	var out []T
	if err := json.Unmarshal([]byte("["+strings.Join(items, ",")+"]"), &out); err != nil {
		t.Fatal(err)
	}
	return out
}

func TestOwnershipStockShapes(t *testing.T) {
	plainDetails := `{"k1":"` + polK1 + `","k2":"` + polK2 + `","contextbroker":"orion-1"}`
	edgeDetails := func(gw, query string) string {
		return `{"k1":"` + polK1 + `e","k2":"` + polK2 + `e","contextbroker":"orion-1","edgegateway_type":"edgegate","edgegateway_uri":"edgegate://` +
			gw + `/radio?` + query + `"}`
	}
	type want struct {
		devices  map[string]policy.Registration // by id; nil: none
		dels     []policy.Delegation
		skips    map[string]int
		unusable []string // ids
	}
	tests := []struct {
		name     string
		rows     []string
		given    []string
		received []string
		registry mapRegistry
		deflt    string
		want     want
	}{
		{
			name: "received READ_WRITE with keys in delegationDetails: usable, owned by the delegator",
			received: []string{receivedRow("bob", "alice", "", "Organization:orion-1:bob-meter", "READ_WRITE",
				stockDetails(polK1+"b", polK2+"b"))},
			registry: mapRegistry{"bob-meter": {ID: "bob-meter", Type: "PowerMeter"}},
			want: want{
				devices: map[string]policy.Registration{"bob-meter": {ID: "bob-meter", Type: "PowerMeter", Owner: "bob",
					Broker: polBrokerURL, K1: polK1 + "b", K2: polK2 + "b"}},
				dels: []policy.Delegation{{Device: "bob-meter", User: "alice", Kind: policy.ReadWrite}},
			},
		},
		{
			name:     "received WRITE_ONLY, keys from the registry, type from default_type",
			received: []string{receivedRow("bob", "ALICE", "", "Organization:orion-1:bob-valve", "WRITE_ONLY", "")},
			registry: mapRegistry{"bob-valve": {ID: "bob-valve", K1: polK1 + "r", K2: polK2 + "r"}},
			deflt:    "Actuator",
			want: want{
				devices: map[string]policy.Registration{"bob-valve": {ID: "bob-valve", Type: "Actuator", Owner: "bob",
					Broker: polBrokerURL, K1: polK1 + "r", K2: polK2 + "r"}},
				dels: []policy.Delegation{{Device: "bob-valve", User: "alice", Kind: policy.WriteOnly}},
			},
		},
		{
			name: "received by group MODIFY: the datamanager lists it for members",
			received: []string{receivedRow("carol", "", "cn=field,ou=Firenze,dc=ldap,dc=org", "Organization:orion-1:carol-pump", "MODIFY",
				stockDetails(polK1+"c", polK2+"c"))},
			registry: mapRegistry{"carol-pump": {ID: "carol-pump", Type: "Pump", Radio: &policy.RadioBinding{Port: "/dev/ttyUSB0", Node: 4, Child: -1}}},
			want: want{
				devices: map[string]policy.Registration{"carol-pump": {ID: "carol-pump", Type: "Pump", Owner: "carol", Broker: polBrokerURL,
					K1: polK1 + "c", K2: polK2 + "c", Radio: &policy.RadioBinding{Port: "/dev/ttyUSB0", Node: 4, Child: -1}}},
				dels: []policy.Delegation{{Device: "carol-pump", User: "alice", Kind: policy.Modify}},
			},
		},
		{
			name: "received READ_ACCESS only: not the gateway's to write",
			received: []string{receivedRow("bob", "alice", "", "Organization:orion-1:bob-view", "READ_ACCESS",
				stockDetails(polK1+"v", polK2+"v")), receivedRow("bob", "alice", "", "Organization:orion-1:bob-old", "", "")},
			registry: mapRegistry{"bob-view": {ID: "bob-view", Type: "T"}},
			deflt:    "T",
			want:     want{skips: map[string]int{skipReadOnly: 2}},
		},
		{
			name: "read and write rows for one element merge: the write kind counts, keys from either",
			received: []string{
				receivedRow("bob", "alice", "", "Organization:orion-1:bob-x", "READ_ACCESS", stockDetails(polK1+"x", polK2+"x")),
				receivedRow("bob", "", "cn=field", "Organization:orion-1:bob-x", "WRITE_ONLY", ""),
				receivedRow("bob", "alice", "", "Organization:orion-1:bob-x", "READ_WRITE", stockDetails(polK1+"x", polK2+"x")),
			},
			deflt: "T",
			want: want{
				devices: map[string]policy.Registration{"bob-x": {ID: "bob-x", Type: "T", Owner: "bob", Broker: polBrokerURL,
					K1: polK1 + "x", K2: polK2 + "x"}},
				dels:  []policy.Delegation{{Device: "bob-x", User: "alice", Kind: policy.ReadWrite}},
				skips: map[string]int{skipReadOnly: 1},
			},
		},
		{
			name:     "received with a write kind but keys nowhere: reported, not served",
			received: []string{receivedRow("bob", "alice", "", "Organization:orion-1:bob-nokeys", "READ_WRITE", "")},
			registry: mapRegistry{"bob-nokeys": {ID: "bob-nokeys", Type: "T"}},
			want:     want{skips: map[string]int{skipKeysMissing: 1}, unusable: []string{"bob-nokeys"}},
		},
		{
			name:     "received with no type anywhere: reported with what is missing",
			received: []string{receivedRow("bob", "alice", "", "Organization:orion-1:bob-notype", "READ_WRITE", "")},
			want:     want{skips: map[string]int{skipNoType: 1}, unusable: []string{"bob-notype"}},
		},
		{
			name: "received rows that are not grants to the account, on an unknown broker, or deleted",
			received: []string{
				receivedRow("bob", "ANONYMOUS", "", "Organization:orion-1:pub", "READ_WRITE", ""),
				receivedRow("bob", "", "", "Organization:orion-1:nobody", "READ_WRITE", ""),
				receivedRow("bob", "alice", "", "Organization:orion-9:far", "READ_WRITE", stockDetails(polK1+"f", polK2+"f")),
				receivedRow("bob", "alice", "", "Organization:orion-1:dash", "READ_WRITE", "") + `,{"usernameDelegator":"bob","usernameDelegated":"alice","elementId":"Organization:orion-1:gone","elementType":"IOTID","kind":"READ_WRITE","deleteTime":1733100000000}`,
				`{"usernameDelegator":"bob","usernameDelegated":"alice","elementId":"dash-1","elementType":"DashboardID","kind":"READ_WRITE"}`,
				receivedRow("bob", "alice", "", "Organization:orion-1:weird", "OWN_ALL", ""),
			},
			deflt: "T",
			want: want{
				skips: map[string]int{skipNotToAccount: 1, skipNoDelegate: 1, skipUnknownBroker: 1, skipKeysMissing: 1,
					skipDeleted: 1, skipElementType: 1, skipUnknownKind: 1},
				unusable: []string{"dash"},
			},
		},
		{
			name:     "owned and received: the ownership row wins",
			rows:     []string{ownedRow("th-1", plainDetails)},
			received: []string{receivedRow("alice", "alice", "", "Organization:orion-1:th-1", "READ_WRITE", "")},
			deflt:    "T",
			want: want{
				devices: map[string]policy.Registration{"th-1": {ID: "th-1", Type: "T", Owner: "alice", Broker: polBrokerURL, K1: polK1, K2: polK2}},
			},
		},
		{
			name: "given delegations: user, group (v2 row without usernameDelegated), ANONYMOUS",
			rows: []string{ownedRow("th-1", plainDetails)},
			given: []string{
				`{"id":1,"usernameDelegator":"alice","usernameDelegated":"bob","elementId":"Organization:orion-1:th-1","elementType":"IOTID","kind":"READ_ACCESS"}`,
				`{"id":2,"usernameDelegator":"alice","groupnameDelegated":"cn=staff,ou=Firenze,dc=ldap,dc=org","elementId":"Organization:orion-1:th-1","elementType":"IOTID","kind":"READ_WRITE"}`,
				`{"id":3,"usernameDelegator":"alice","usernameDelegated":"ANONYMOUS","elementId":"Organization:orion-1:th-1","elementType":"IOTID","kind":"READ_ACCESS"}`,
				`{"id":4,"usernameDelegator":"alice","elementId":"Organization:orion-1:th-1","elementType":"IOTID","kind":"READ_ACCESS"}`,
			},
			deflt: "T",
			want: want{
				devices: map[string]policy.Registration{"th-1": {ID: "th-1", Type: "T", Owner: "alice", Broker: polBrokerURL, K1: polK1, K2: polK2}},
				dels: []policy.Delegation{
					{Device: "th-1", Group: "cn=staff,ou=Firenze,dc=ldap,dc=org", Kind: policy.ReadWrite},
					{Device: "th-1", User: "ANONYMOUS", Kind: policy.ReadAccess},
					{Device: "th-1", User: "bob", Kind: policy.ReadAccess},
				},
				skips: map[string]int{skipNoDelegate: 1},
			},
		},
		{
			name: "registry over elementDetails over default_type; edgegateway_uri binds only for this gateway",
			rows: []string{
				ownedRow("reg-wins", `{"k1":"`+polK1+`","k2":"`+polK2+`","contextbroker":"orion-1","type":"FromDetails","edgegateway_type":"edgegate","edgegateway_uri":"edgegate://`+polGateway+`/radio?port=%2Fdev%2FttyUSB0&node=7"}`),
				ownedRow("details-type", `{"k1":"`+polK1+`d","k2":"`+polK2+`d","contextbroker":"orion-1","entityType":"FromDetails"}`),
				ownedRow("edge-mine", edgeDetails(polGateway, "port=%2Fdev%2FttyAMA0&node=3&child=1")),
				ownedRow("edge-other", `{"k1":"`+polK1+`o","k2":"`+polK2+`o","contextbroker":"orion-1","edgegateway_type":"edgegate","edgegateway_uri":"edgegate://gw-other/radio?port=%2Fdev%2FttyAMA0&node=3"}`),
				ownedRow("default-type", `"{\"k1\":\"`+polK1+`t\",\"k2\":\"`+polK2+`t\",\"contextbroker\":\"orion-1\"}"`),
				`{"username":"alice","elementId":"Organization:orion-1:gone","elementType":"IOTID","elementDetails":` + plainDetails + `,"deleted":"2025-01-01 10:00:00"}`,
			},
			registry: mapRegistry{"reg-wins": {ID: "reg-wins", Type: "FromRegistry", Radio: &policy.RadioBinding{Port: "/dev/ttyUSB1", Node: 2, Child: -1},
				K1: "registry-k1", K2: "registry-k2"}},
			deflt: "Default",
			want: want{
				devices: map[string]policy.Registration{
					// The platform's keys stay: they are what its filter checks.
					"reg-wins":     {ID: "reg-wins", Type: "FromRegistry", Owner: "alice", Broker: polBrokerURL, K1: polK1, K2: polK2, Radio: &policy.RadioBinding{Port: "/dev/ttyUSB1", Node: 2, Child: -1}},
					"details-type": {ID: "details-type", Type: "FromDetails", Owner: "alice", Broker: polBrokerURL, K1: polK1 + "d", K2: polK2 + "d"},
					"edge-mine":    {ID: "edge-mine", Type: "Default", Owner: "alice", Broker: polBrokerURL, K1: polK1 + "e", K2: polK2 + "e", Radio: &policy.RadioBinding{Port: "/dev/ttyAMA0", Node: 3, Child: 1}},
					"edge-other":   {ID: "edge-other", Type: "Default", Owner: "alice", Broker: polBrokerURL, K1: polK1 + "o", K2: polK2 + "o"},
					"default-type": {ID: "default-type", Type: "Default", Owner: "alice", Broker: polBrokerURL, K1: polK1 + "t", K2: polK2 + "t"},
				},
				skips: map[string]int{skipDeleted: 1},
			},
		},
		{
			name:     "stock rows without a type and no default: kept out, each reported",
			rows:     []string{ownedRow("th-a", plainDetails), ownedRow("th-b", `{"k1":"`+polK1+`b","k2":"`+polK2+`b","contextbroker":"orion-1"}`)},
			registry: mapRegistry{"th-b": {ID: "th-b", Type: "Thermometer"}},
			want: want{
				devices:  map[string]policy.Registration{"th-b": {ID: "th-b", Type: "Thermometer", Owner: "alice", Broker: polBrokerURL, K1: polK1 + "b", K2: polK2 + "b"}},
				skips:    map[string]int{skipNoType: 1},
				unusable: []string{"th-a"},
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			in := ownershipInput{
				Rows:     decodeList[OwnershipRow](t, tt.rows...),
				Given:    decodeList[DelegationRow](t, tt.given...),
				Received: decodeList[DelegationRow](t, tt.received...),
			}
			o := OwnershipOptions{Username: "alice", Brokers: polBrokers, DefaultType: tt.deflt}
			if tt.registry != nil {
				o.Registry = tt.registry
			}
			doc, skipped, unusable := buildOwnershipDocument(in, o, polGateway)
			got := map[string]policy.Registration{}
			for _, d := range doc.Devices {
				got[d.ID] = d
			}
			if len(got) == 0 {
				got = nil
			}
			if !reflect.DeepEqual(got, tt.want.devices) {
				t.Errorf("devices = %+v\nwant %+v", got, tt.want.devices)
			}
			if !reflect.DeepEqual(doc.Delegations, tt.want.dels) {
				t.Errorf("delegations = %+v\nwant %+v", doc.Delegations, tt.want.dels)
			}
			counts := map[string]int{}
			for _, s := range skipped {
				counts[s.Reason]++
			}
			if tt.want.skips == nil {
				tt.want.skips = map[string]int{}
			}
			if !reflect.DeepEqual(counts, tt.want.skips) {
				t.Errorf("skips = %v, want %v (%+v)", counts, tt.want.skips, skipped)
			}
			var ids []string
			for _, u := range unusable {
				ids = append(ids, u.ID)
				if u.Fix == "" || len(u.Missing) == 0 || !strings.HasPrefix(u.Fix, BindCommand+" "+u.ID) {
					t.Errorf("unusable %+v: no fix", u)
				}
			}
			if !reflect.DeepEqual(ids, tt.want.unusable) {
				t.Errorf("unusable = %v, want %v", ids, tt.want.unusable)
			}
			out, _ := json.Marshal([]any{skipped, unusable})
			for _, c := range polCanaries {
				if strings.Contains(string(out), c) {
					t.Fatalf("a key in the skips or the unusable list: %s", out)
				}
			}
			doc.Version = 1
			p, err := policy.Compile(doc, SourceOwnership, contentDigest(doc))
			if err != nil {
				t.Fatalf("document does not compile: %v", err)
			}
			// A device in the document is one the gateway accepts readings of.
			for id := range tt.want.devices {
				if d := policy.NewEngine(p).DecideIngest(id); !d.Allow {
					t.Errorf("DecideIngest(%s) = %+v", id, d)
				}
			}
		})
	}
}

// A read-only received delegation never makes a device writable, and the
// device is refused at ingest as unknown; a write one makes it usable.
func TestReceivedDelegationDecidesIngest(t *testing.T) {
	in := ownershipInput{Received: decodeList[DelegationRow](t,
		receivedRow("bob", "alice", "", "Organization:orion-1:bob-ro", "READ_ACCESS", stockDetails(polK1+"1", polK2+"1")),
		receivedRow("bob", "alice", "", "Organization:orion-1:bob-rw", "READ_WRITE", stockDetails(polK1+"2", polK2+"2")),
	)}
	doc, _, _ := buildOwnershipDocument(in, OwnershipOptions{Username: "alice", Brokers: polBrokers, DefaultType: "T"}, polGateway)
	doc.Version = 1
	p, err := policy.Compile(doc, SourceOwnership, "")
	if err != nil {
		t.Fatal(err)
	}
	e := policy.NewEngine(p)
	if d := e.DecideIngest("bob-ro"); d.Allow || d.Reason != policy.ReasonUnknownDevice {
		t.Errorf("read-only delegated device: %+v", d)
	}
	if p.CanWrite("alice", "bob-ro") {
		t.Error("read-only delegation made the device writable")
	}
	if d := e.DecideIngest("bob-rw"); !d.Allow || d.Device.Owner != "bob" {
		t.Errorf("READ_WRITE delegated device: %+v", d)
	}
	if !p.CanWrite("alice", "bob-rw") || !p.CanWrite("bob", "bob-rw") || p.CanWrite("mallory", "bob-rw") {
		t.Error("write rights of the delegated device")
	}
}

// stockReceived: one device delegated READ_WRITE to alice, one owned
// device with no type anywhere.
const stockRowsJSON = `[
 {"username":"alice","elementId":"Organization:orion-1:th-kitchen","elementType":"IOTID","elementName":"th-kitchen",
  "elementDetails":{"k1":"` + polK1 + `","k2":"` + polK2 + `","contextbroker":"orion-1"},"created":"2025-03-01 10:00:00"},
 {"username":"alice","elementId":"Organization:orion-1:th-untyped","elementType":"IOTID","elementName":"th-untyped",
  "elementDetails":{"k1":"` + polK1 + `u","k2":"` + polK2 + `u","contextbroker":"orion-1"},"created":"2025-03-01 10:00:00"}
]`

// TestOwnershipSyncerStockLifetime runs the Syncer against a TLS server
// answering like the stock Ownership API and datamanager (204 for no
// delegations), with an injected clock: the policy expires max_age after
// the last successful sync, an unchanged re-read extends it without a new
// version (and survives a restart), a failing platform lets it run out.
func TestOwnershipSyncerStockLifetime(t *testing.T) {
	e := newPolEnv(t)
	api := &ownershipAPI{rows: stockRowsJSON,
		dels: `[{"usernameDelegator":"alice","usernameDelegated":"ANONYMOUS","elementId":"Organization:orion-1:th-kitchen","elementType":"IOTID","kind":"READ_ACCESS"},
		        {"usernameDelegator":"alice","groupnameDelegated":"cn=staff,dc=ldap","elementId":"Organization:orion-1:th-kitchen","elementType":"IOTID","kind":"READ_ACCESS"}]`,
		received: "[" + receivedRow("bob", "alice", "", "Organization:orion-1:bob-meter", "READ_WRITE", stockDetails(polK1+"b", polK2+"b")) + "]"}
	srv := e.tlsServer(api)
	t0 := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	now := t0
	const maxAge = 6 * time.Hour
	registry := mapRegistry{"th-kitchen": {ID: "th-kitchen", Type: "Thermometer"}, "bob-meter": {ID: "bob-meter", Type: "PowerMeter"}}
	mk := func() *Syncer {
		return e.syncer(func(o *Options) {
			o.Source, o.Keys, o.Now = SourceOwnership, nil, func() time.Time { return now }
			o.Ownership = OwnershipOptions{OwnershipURL: srv.URL, DataManagerURL: srv.URL + "/datamanager/api", Username: "alice",
				Brokers: polBrokers, Registry: registry, MaxAge: maxAge}
		})
	}
	s := mk()
	ctx := context.Background()
	if err := e.note(s.poll(ctx)); err != nil {
		t.Fatal(err)
	}
	p := e.engine.Current()
	if p.Version != 1 || p.Len() != 2 || !p.ExpiresAt.Equal(t0.Add(maxAge)) {
		t.Fatalf("first sync: %s", p.Describe())
	}
	if d := e.engine.DecideIngest("bob-meter"); !d.Allow || d.Device.Owner != "bob" || d.Device.Type != "PowerMeter" {
		t.Fatalf("delegated device: %+v", d)
	}
	if !p.MayRead("anyone", nil, "th-kitchen") || p.MayRead("", nil, "th-kitchen") || !p.MayRead("bob", []string{"/staff"}, "th-kitchen") {
		t.Fatal("public and group reads of the owned device")
	}
	st := s.Status()
	if len(st.Unusable) != 1 || st.Unusable[0].ID != "th-untyped" || st.Unusable[0].Reason != skipNoType ||
		!strings.Contains(st.Unusable[0].Fix, "edgegate device bind th-untyped --type") {
		t.Fatalf("status unusable = %+v", st.Unusable)
	}
	if st.ExpiresAt.IsZero() || !st.ExpiresAt.Equal(t0.Add(maxAge)) {
		t.Fatalf("status expires_at = %v", st.ExpiresAt)
	}
	// An hour later, the same answers: same version, a later expiry.
	now = t0.Add(time.Hour)
	if err := e.note(s.poll(ctx)); err != nil {
		t.Fatal(err)
	}
	p2 := e.engine.Current()
	if p2.Version != 1 || p2.Digest != p.Digest || !p2.ExpiresAt.Equal(now.Add(maxAge)) || s.Status().LastFetchResult != resultUnchanged {
		t.Fatalf("unchanged re-read: %s (%s)", p2.Describe(), s.Status().LastFetchResult)
	}
	if got := gaugeValue(t, e.m.PolicyExpiry); got != float64(now.Add(maxAge).Unix()) {
		t.Fatalf("expiry gauge = %v", got)
	}
	// The renewed lifetime is what a restart finds.
	e.restart()
	s = mk()
	if err := s.LoadCached(); err != nil {
		t.Fatal(err)
	}
	if c := e.engine.Current(); c.Version != 1 || !c.ExpiresAt.Equal(t0.Add(time.Hour+maxAge)) {
		t.Fatalf("after restart: %s", c.Describe())
	}
	// The platform fails: the lifetime is not extended, and past it plus
	// the grace the policy is expired (the daemon then holds every reading,
	// as for an expired bundle).
	api.mu.Lock()
	api.fail = true
	api.mu.Unlock()
	now = t0.Add(3 * time.Hour)
	if err := e.note(s.poll(ctx)); err == nil {
		t.Fatal("poll against a failing platform succeeded")
	}
	c := e.engine.Current()
	grace := 30 * time.Minute
	if !c.ExpiresAt.Equal(t0.Add(time.Hour+maxAge)) || c.Expired(t0.Add(time.Hour+maxAge+grace), grace) ||
		!c.Expired(t0.Add(time.Hour+maxAge+grace+time.Second), grace) {
		t.Fatalf("after a failed sync: %s", c.Describe())
	}
	// Back, with a change (bob withdrew his delegation: 204): a new version
	// with a fresh lifetime, the delegated device revoked.
	api.mu.Lock()
	api.fail, api.received = false, ""
	api.mu.Unlock()
	now = t0.Add(20 * time.Hour)
	if err := e.note(s.poll(ctx)); err != nil {
		t.Fatal(err)
	}
	c = e.engine.Current()
	if _, still := c.Device("bob-meter"); c.Version != 2 || still || !c.ExpiresAt.Equal(now.Add(maxAge)) {
		t.Fatalf("after the delegation was withdrawn: %s", c.Describe())
	}
	api.mu.Lock()
	calls := strings.Join(api.calls, "\n")
	api.mu.Unlock()
	for _, want := range []string{"/ownership-api/v1/list/?type=IOTID&onlyMine=true", "/datamanager/api/v2/username/alice/delegator?elementType=IOTID&sourceRequest=edgegate",
		"/datamanager/api/v2/username/alice/delegated?elementType=IOTID&sourceRequest=edgegate"} {
		if !strings.Contains(calls, want) {
			t.Errorf("no call %s in\n%s", want, calls)
		}
	}
	if strings.Contains(calls, polToken) {
		t.Fatal("token in a URL")
	}
}

func TestOwnershipMaxAgeOptions(t *testing.T) {
	e := newPolEnv(t)
	base := OwnershipOptions{OwnershipURL: "https://own.example", Brokers: polBrokers}
	o := e.options()
	o.Source, o.Keys, o.Ownership = SourceOwnership, nil, base
	s, err := New(o)
	if err != nil || s.o.Ownership.MaxAge != DefaultOwnershipMaxAge {
		t.Fatalf("default max age: %v, %v", err, s)
	}
	o.Ownership.MaxAge = time.Second
	if _, err := New(o); err == nil || !strings.Contains(err.Error(), "max age") {
		t.Fatalf("max age 1s: %v", err)
	}
}

// Two devices bound to one radio source: the first keeps it, the second is
// left out with a reason, and the rest of the policy stands.
func TestOwnershipRadioConflictCostsOneDevice(t *testing.T) {
	rb := &policy.RadioBinding{Port: "/dev/ttyUSB0", Node: 5, Child: -1}
	in := ownershipInput{Rows: decodeList[OwnershipRow](t,
		ownedRow("first", `{"k1":"`+polK1+`1","k2":"`+polK2+`1","contextbroker":"orion-1"}`),
		ownedRow("second", `{"k1":"`+polK1+`2","k2":"`+polK2+`2","contextbroker":"orion-1"}`),
		ownedRow("third", `{"k1":"`+polK1+`3","k2":"`+polK2+`3","contextbroker":"orion-1"}`))}
	reg := mapRegistry{"first": {ID: "first", Radio: rb}, "second": {ID: "second", Radio: rb}}
	doc, skipped, _ := buildOwnershipDocument(in, OwnershipOptions{Username: "alice", Brokers: polBrokers, DefaultType: "T", Registry: reg}, polGateway)
	if len(doc.Devices) != 2 || doc.Devices[0].ID != "first" || doc.Devices[1].ID != "third" ||
		len(skipped) != 1 || skipped[0].Reason != skipRadioConflict || !strings.Contains(skipped[0].Detail, "first") {
		t.Fatalf("devices %+v skipped %+v", doc.Devices, skipped)
	}
	doc.Version = 1
	if _, err := policy.Compile(doc, SourceOwnership, ""); err != nil {
		t.Fatal(err)
	}
}
