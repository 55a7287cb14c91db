package centralsync

import (
	"context"
	"encoding/json"
	"net/http"
	"reflect"
	"strings"
	"sync"
	"testing"

	"github.com/edgegate/edgegate/policy"
)

// Rows shaped like the real Ownership API's answer (IoT Directory's
// common.php reads exactly these fields).
const ownershipRowsJSON = `[
 {"id":17,"username":"alice","elementId":"Organization:orion-1:th-kitchen","elementType":"IOTID","elementName":"th-kitchen",
  "elementUrl":"https://iot.example/th-kitchen","elementDetails":{"k1":"` + polK1 + `","k2":"` + polK2 + `","contextbroker":"orion-1"},
  "created":"2025-03-01 10:00:00","deleted":null},
 {"id":18,"username":"alice","elementId":"Organization:orion-1:th-garden","elementType":"IOTID","elementName":"th-garden",
  "elementDetails":"{\"k1\":\"` + polK1 + `g\",\"k2\":\"` + polK2 + `g\",\"contextbroker\":\"orion-1\",\"type\":\"Thermometer\"}",
  "created":"2025-03-01 10:00:00","deleted":null},
 {"id":19,"username":"alice","elementId":"Organization:orion-1:th-old","elementType":"IOTID","elementName":"th-old",
  "elementDetails":{"k1":"` + polK1 + `o","k2":"` + polK2 + `o","contextbroker":"orion-1"},"created":"2024-01-01 10:00:00","deleted":"2025-01-01 10:00:00"},
 {"id":20,"username":"alice","elementId":"Organization:orion-x:th-far","elementType":"IOTID","elementName":"th-far",
  "elementDetails":{"k1":"` + polK1 + `f","k2":"` + polK2 + `f","contextbroker":"orion-x"},"deleted":null},
 {"id":21,"username":"alice","elementId":"Organization:orion-1:bad-details","elementType":"IOTID","elementName":"bad-details",
  "elementDetails":"{not json ` + polK1 + `","deleted":null},
 {"id":22,"username":"alice","elementId":"Organization:orion-1:same-keys","elementType":"IOTID","elementName":"same-keys",
  "elementDetails":{"k1":"` + polK1 + `","k2":"` + polK1 + `","contextbroker":"orion-1"},"deleted":null},
 {"id":23,"username":"alice","elementId":"Organization:orion-1:th-kitchen","elementType":"IOTID","elementName":"th-kitchen",
  "elementDetails":{"k1":"x1","k2":"x2","contextbroker":"orion-1"},"deleted":null},
 {"id":24,"username":"alice","elementId":"Organization:orion-1:..","elementType":"IOTID","elementName":"..",
  "elementDetails":{"k1":"y1","k2":"y2","contextbroker":"orion-1"},"deleted":null}
]`

// Delegations as /v2/username/alice/delegator returns them.
const delegatorJSON = `[
 {"id":1,"usernameDelegator":"alice","usernameDelegated":"bob","elementId":"Organization:orion-1:th-kitchen","elementType":"IOTID","kind":"READ_ACCESS"},
 {"id":2,"usernameDelegator":"alice","usernameDelegated":"carol","elementId":"Organization:orion-1:th-kitchen","elementType":"IOTID","kind":"READ_WRITE"},
 {"id":3,"usernameDelegator":"alice","usernameDelegated":"dave","elementId":"Organization:orion-1:th-garden","elementType":"IOTID","kind":"WRITE_ONLY"},
 {"id":4,"usernameDelegator":"alice","usernameDelegated":"erin","elementId":"Organization:orion-1:th-garden","elementType":"IOTID","kind":"MODIFY"},
 {"id":5,"usernameDelegator":"alice","usernameDelegated":"frank","elementId":"Organization:orion-1:th-garden","elementType":"IOTID"},
 {"id":6,"usernameDelegator":"alice","usernameDelegated":null,"groupnameDelegated":"cn=staff","elementId":"Organization:orion-1:th-garden","elementType":"IOTID","kind":"READ_ACCESS"},
 {"id":7,"usernameDelegator":"alice","usernameDelegated":"gina","elementId":"Organization:orion-1:th-garden","elementType":"IOTID","kind":"OWN_EVERYTHING"},
 {"id":8,"usernameDelegator":"alice","usernameDelegated":"hank","elementId":"Organization:orion-1:th-old","elementType":"IOTID","kind":"READ_ACCESS"},
 {"id":9,"usernameDelegator":"alice","usernameDelegated":"ivan","elementId":"dash_id","elementType":"DASHID","kind":"READ_ACCESS"},
 {"id":10,"usernameDelegator":"mallory","usernameDelegated":"mallory2","elementId":"Organization:orion-1:th-kitchen","elementType":"IOTID","kind":"READ_ACCESS"}
]`

var polBrokers = map[string]string{"orion-1": polBrokerURL}

func TestBuildOwnershipDocument(t *testing.T) {
	var rows []OwnershipRow
	var dels []DelegationRow
	if err := json.Unmarshal([]byte(ownershipRowsJSON), &rows); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal([]byte(delegatorJSON), &dels); err != nil {
		t.Fatal(err)
	}
	doc, skipped, unusable := buildOwnershipDocument(ownershipInput{Rows: rows, Given: dels},
		OwnershipOptions{Username: "alice", Brokers: polBrokers, DefaultType: "IoTDevice"}, polGateway)
	if len(unusable) != 0 {
		t.Fatalf("unusable = %+v", unusable)
	}
	wantDevices := []policy.Registration{
		{ID: "th-garden", Type: "Thermometer", Owner: "alice", Broker: polBrokerURL, K1: polK1 + "g", K2: polK2 + "g"},
		{ID: "th-kitchen", Type: "IoTDevice", Owner: "alice", Broker: polBrokerURL, K1: polK1, K2: polK2},
	}
	if !reflect.DeepEqual(doc.Devices, wantDevices) {
		t.Fatalf("devices = %+v\nwant %+v", doc.Devices, wantDevices)
	}
	wantDels := []policy.Delegation{
		{Device: "th-garden", Group: "cn=staff", Kind: policy.ReadAccess},
		{Device: "th-garden", User: "dave", Kind: policy.WriteOnly},
		{Device: "th-garden", User: "erin", Kind: policy.Modify},
		{Device: "th-garden", User: "frank", Kind: policy.ReadAccess}, // no kind: a read grant
		{Device: "th-kitchen", User: "bob", Kind: policy.ReadAccess},
		{Device: "th-kitchen", User: "carol", Kind: policy.ReadWrite},
	}
	if !reflect.DeepEqual(doc.Delegations, wantDels) {
		t.Fatalf("delegations = %+v\nwant %+v", doc.Delegations, wantDels)
	}
	counts := map[string]int{}
	for _, s := range skipped {
		counts[s.Reason]++
		for _, c := range polCanaries {
			if strings.Contains(s.Detail, c) {
				t.Fatalf("skip detail %q shows a key", s.Detail)
			}
		}
	}
	wantCounts := map[string]int{
		skipDeleted: 1, skipUnknownBroker: 1, skipDetails: 1, skipInvalid: 2, skipDuplicate: 1, // invalid: a:b and ..
		skipUnknownKind: 1, skipUnknownDevice: 1, skipElementType: 1, skipNotOwner: 1,
	}
	if !reflect.DeepEqual(counts, wantCounts) {
		t.Fatalf("skipped = %v\nwant %v", counts, wantCounts)
	}
	// The document compiles, and decides as the platform would.
	p, err := policy.Compile(doc, SourceOwnership, contentDigest(doc))
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		user, device string
		read, write  bool
	}{
		{"alice", "th-kitchen", true, true},
		{"bob", "th-kitchen", true, false},
		{"carol", "th-kitchen", true, true},
		{"dave", "th-garden", false, true},
		{"erin", "th-garden", true, true},
		{"frank", "th-garden", true, false},
		{"gina", "th-garden", false, false},
		{"mallory2", "th-kitchen", false, false},
	} {
		if got := p.CanRead(tt.user, tt.device); got != tt.read {
			t.Errorf("CanRead(%q, %q) = %v, want %v", tt.user, tt.device, got, tt.read)
		}
		if got := p.CanWrite(tt.user, tt.device); got != tt.write {
			t.Errorf("CanWrite(%q, %q) = %v, want %v", tt.user, tt.device, got, tt.write)
		}
	}
}

func TestBuildOwnershipNoDefaultType(t *testing.T) {
	var rows []OwnershipRow
	if err := json.Unmarshal([]byte(ownershipRowsJSON), &rows); err != nil {
		t.Fatal(err)
	}
	doc, skipped, unusable := buildOwnershipDocument(ownershipInput{Rows: rows[:2]}, OwnershipOptions{Brokers: polBrokers}, polGateway)
	if len(doc.Devices) != 1 || doc.Devices[0].ID != "th-garden" || len(skipped) != 1 || skipped[0].Reason != skipNoType {
		t.Fatalf("devices %+v skipped %+v", doc.Devices, skipped)
	}
	want := []UnusableDevice{{ID: "th-kitchen", Element: "Organization:orion-1:th-kitchen", Owner: "alice", Reason: skipNoType,
		Missing: []string{missingType, missingRadio},
		Fix:     "edgegate device bind th-kitchen --type TYPE [--mqtt | --radio-port PORT --radio-node N]"}}
	if !reflect.DeepEqual(unusable, want) {
		t.Fatalf("unusable = %+v\nwant %+v", unusable, want)
	}
}

func TestDeviceIDOf(t *testing.T) {
	for _, tt := range []struct{ id, name, want string }{
		{"Organization:orion-1:th-kitchen", "x", "th-kitchen"},
		{"th-kitchen", "x", "th-kitchen"},
		{"Org:only", "named", "named"},
		{"Org:cb:a:b", "x", "a:b"}, // refused later as an invalid id
	} {
		if got := deviceIDOf(tt.id, tt.name); got != tt.want {
			t.Errorf("deviceIDOf(%q, %q) = %q, want %q", tt.id, tt.name, got, tt.want)
		}
	}
}

// ownershipAPI serves the platform endpoints on one TLS server, answering
// as stock does: the datamanager answers 204 with no body for no
// delegations (UserController.getDelegatorV2/getDelegatedV2); fail makes
// every answer a 500 (the platform down).
type ownershipAPI struct {
	mu       sync.Mutex
	rows     string
	dels     string // given: /delegator
	received string // /delegated
	fail     bool
	calls    []string
}

// writeDelegations answers a datamanager list: 204 for an empty one.
func writeDelegations(w http.ResponseWriter, list string) {
	if t := strings.TrimSpace(list); t == "" || t == "[]" {
		w.WriteHeader(http.StatusNoContent)
		return
	}
	w.Write([]byte(list))
}

func (a *ownershipAPI) set(rows string) { a.mu.Lock(); a.rows = rows; a.mu.Unlock() }

func (a *ownershipAPI) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Header.Get("Authorization") != "Bearer "+polToken {
		http.Error(w, `{"result":false}`, http.StatusUnauthorized)
		return
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	a.calls = append(a.calls, r.URL.RequestURI())
	if a.fail {
		http.Error(w, "down", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	dm := r.URL.Query().Get("sourceRequest") == "edgegate" && r.URL.Query().Get("elementType") == "IOTID"
	switch {
	case r.URL.Path == "/ownership-api/v1/list/" && r.URL.Query().Get("type") == "IOTID":
		w.Write([]byte(a.rows))
	case r.URL.Path == "/datamanager/api/v2/username/alice/delegator" && dm:
		writeDelegations(w, a.dels)
	case r.URL.Path == "/datamanager/api/v2/username/alice/delegated" && dm:
		writeDelegations(w, a.received)
	default:
		http.NotFound(w, r)
	}
}

// ownershipSyncer reads both platform APIs at base (an ownershipAPI).
func (e *polEnv) ownershipSyncer(base string) *Syncer {
	return e.syncer(func(o *Options) {
		o.Source = SourceOwnership
		o.Keys = nil
		o.Ownership = OwnershipOptions{OwnershipURL: base, DataManagerURL: base + "/datamanager/api", Username: "alice",
			Brokers: polBrokers, DefaultType: "IoTDevice"}
	})
}

func TestOwnershipSourceEndToEnd(t *testing.T) {
	e := newPolEnv(t)
	api := &ownershipAPI{rows: ownershipRowsJSON, dels: delegatorJSON}
	srv := e.tlsServer(api)
	s := e.ownershipSyncer(srv.URL)
	if err := s.LoadCached(); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := e.note(s.poll(ctx)); err != nil {
		t.Fatal(err)
	}
	p := e.engine.Current()
	if p.Version != 1 || p.Source != SourceOwnership || p.Len() != 2 || !p.CanRead("bob", "th-kitchen") || !strings.HasPrefix(p.Digest, "sha256:") {
		t.Fatalf("in force: %s digest %q", p.Describe(), p.Digest)
	}
	st := s.Status()
	if st.LastFetchResult != resultApplied || st.Skipped[skipUnknownBroker] != 1 || st.Skipped[skipDeleted] != 1 {
		t.Fatalf("status = %+v", st)
	}
	// Same rows: no new version.
	if err := e.note(s.poll(ctx)); err != nil {
		t.Fatal(err)
	}
	if c := e.engine.Current(); c.Version != p.Version || c.Digest != p.Digest || s.Status().LastFetchResult != resultUnchanged {
		t.Fatalf("unchanged rows gave %s (%s)", e.engine.Current().Describe(), s.Status().LastFetchResult)
	}
	// A device revoked at the platform: version 2, th-garden gone.
	api.set(withoutElement(t, ownershipRowsJSON, "Organization:orion-1:th-garden"))
	if err := e.note(s.poll(ctx)); err != nil {
		t.Fatal(err)
	}
	p2 := e.engine.Current()
	if _, still := p2.Device("th-garden"); p2.Version != 2 || still {
		t.Fatalf("after revocation: %s", p2.Describe())
	}
	// A restart keeps the local version monotonic and the policy cached.
	e.restart()
	s2 := e.ownershipSyncer(srv.URL)
	if err := s2.LoadCached(); err != nil || e.engine.Current().Version != 2 {
		t.Fatalf("LoadCached = %v, version %d", err, e.engine.Current().Version)
	}
	api.set(ownershipRowsJSON)
	if err := e.note(s2.poll(ctx)); err != nil {
		t.Fatal(err)
	}
	if v := e.engine.Current().Version; v != 3 {
		t.Fatalf("version after restart and change = %d, want 3", v)
	}
	// The receipt waiting for delivery names the source and the content
	// digest.
	s2.mu.Lock()
	pr := s2.pending
	s2.mu.Unlock()
	if pr == nil {
		t.Fatal("no receipt queued")
	}
	r := checkReceipt(t, e, pr.body)
	if r.Source != SourceOwnership || r.PolicyVersion != 3 || r.BundleDigest != e.engine.Current().Digest {
		t.Fatalf("receipt = %+v", r)
	}
	api.mu.Lock()
	calls := append([]string(nil), api.calls...)
	api.mu.Unlock()
	for _, c := range calls {
		if strings.Contains(c, polToken) {
			t.Fatalf("token in a URL: %s", c)
		}
	}
}

// withoutElement drops the rows of one elementId from a JSON array.
func withoutElement(t *testing.T, rowsJSON, elementID string) string {
	t.Helper()
	var rows []map[string]any
	if err := json.Unmarshal([]byte(rowsJSON), &rows); err != nil {
		t.Fatal(err)
	}
	out := rows[:0]
	for _, r := range rows {
		if r["elementId"] != elementID {
			out = append(out, r)
		}
	}
	b, _ := json.Marshal(out)
	return string(b)
}
