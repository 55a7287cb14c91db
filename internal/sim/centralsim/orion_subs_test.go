package centralsim

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/testkit"
)

// receiver is an HTTPS endpoint recording Orion's notifications.
type receiver struct {
	srv *httptest.Server
	mu  sync.Mutex
	got []notification
}

type notification struct {
	header http.Header
	body   []byte
}

func newReceiver(t *testing.T, f *fixture) *receiver {
	t.Helper()
	r := &receiver{}
	r.srv = httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		b, _ := io.ReadAll(req.Body)
		r.mu.Lock()
		r.got = append(r.got, notification{req.Header.Clone(), b})
		r.mu.Unlock()
		w.WriteHeader(http.StatusNoContent)
	}))
	t.Cleanup(r.srv.Close)
	f.sim.SetNotifyHTTPClient(r.srv.Client())
	return r
}

func (r *receiver) all() []notification {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]notification(nil), r.got...)
}

// Validation of POST /v2/subscriptions with Orion 3.12's texts
// (jsonParseV2/parseSubscription.cpp, parseEntitiesVector.cpp,
// parseStringVector.cpp).
func TestOrionSubscriptionValidation(t *testing.T) {
	f := newFixture(t)
	ent := `"subject":{"entities":[{"id":"E1","type":"T"}]}`
	tests := []struct{ name, body, desc string }{
		{"empty", `{}`, "empty payload"},
		{"no subject", `{"notification":{"http":{"url":"http://x"}}}`, "no subject for subscription specified"},
		{"no entities", `{"subject":{},"notification":{"http":{"url":"http://x"}}}`, "no subject entities specified"},
		{"empty entities", `{"subject":{"entities":[]},"notification":{"http":{"url":"http://x"}}}`, "subject entities is empty"},
		{"id and pattern", `{"subject":{"entities":[{"id":"a","idPattern":".*"}]},"notification":{"http":{"url":"http://x"}}}`, "/entities/ vector item has both /id/ and /idPattern/"},
		{"neither", `{"subject":{"entities":[{"type":"T"}]},"notification":{"http":{"url":"http://x"}}}`, "/entities/ vector item does not have /id/ nor /idPattern/"},
		{"empty condition", `{"subject":{"entities":[{"id":"E1"}],"condition":{}},"notification":{"http":{"url":"http://x"}}}`, "condition is empty"},
		{"no notification", `{` + ent + `}`, "no notification for subscription specified"},
		{"no transport", `{` + ent + `,"notification":{"attrs":[]}}`, "http, httpCustom, mqtt or mqttCustom is missing"},
		{"two transports", `{` + ent + `,"notification":{"http":{"url":"http://x"},"mqtt":{"url":"mqtt://b:1883","topic":"t"}}}`, "only one of http, httpCustom, mqtt or mqttCustom is allowed"},
		{"mqtt url in http", `{` + ent + `,"notification":{"http":{"url":"mqtt://b:1883"}}}`, "mqtt URL cannot be used in http notifications"},
		{"http url in mqtt", `{` + ent + `,"notification":{"mqtt":{"url":"http://b:1883","topic":"t"}}}`, "http or https URL cannot be used in mqtt notifications"},
		{"mqtts url: no TLS in Orion 3.12", `{` + ent + `,"notification":{"mqtt":{"url":"mqtts://b:8883","topic":"t"}}}`, "invalid mqtt /url/"},
		{"mqtt path", `{` + ent + `,"notification":{"mqtt":{"url":"mqtt://b:1883/p","topic":"t"}}}`, "path cannot be used in mqtt url, use topic instead"},
		{"mqtt no topic", `{` + ent + `,"notification":{"mqtt":{"url":"mqtt://b:1883"}}}`, "mandatory mqtt field /topic/"},
		{"mqtt wildcard topic", `{` + ent + `,"notification":{"mqtt":{"url":"mqtt://b:1883","topic":"a/#"}}}`, "+ and # are not allowed in mqtt field /topic/"},
		{"mqtt user alone", `{` + ent + `,"notification":{"mqtt":{"url":"mqtt://b:1883","topic":"t","user":"u"}}}`, "you must use user and passwd fields simultaneously"},
		{"mqtt qos", `{` + ent + `,"notification":{"mqtt":{"url":"mqtt://b:1883","topic":"t","qos":3}}}`, "mqtt qos field must be an integer in the 0 to 2 range"},
		{"attrs and exceptAttrs", `{` + ent + `,"notification":{"http":{"url":"http://x"},"attrs":["a"],"exceptAttrs":["b"]}}`, "http notification has attrs and exceptAttrs"},
		{"duplicated attr", `{` + ent + `,"notification":{"http":{"url":"http://x"},"attrs":["a","a"]}}`, "duplicated item /a/ in array"},
		{"covered without attrs", `{` + ent + `,"notification":{"http":{"url":"http://x"},"covered":true}}`, "covered true cannot be used if notification attributes list is empty"},
		{"attrsFormat", `{` + ent + `,"notification":{"http":{"url":"http://x"},"attrsFormat":"xml"}}`, orionBadAttrsFormat},
		{"expires", `{` + ent + `,"notification":{"http":{"url":"http://x"}},"expires":"tomorrow"}`, "expires has an invalid format"},
		{"status", `{` + ent + `,"notification":{"http":{"url":"http://x"}},"status":"paused"}`, orionBadStatus},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := f.mustDo(t, "POST", f.sim.DirectBrokerURL()+"/v2/subscriptions", "", []byte(tt.body))
			if r.status != 400 {
				t.Fatalf("status %d %s, want 400", r.status, r.body)
			}
			if oe := orionErr(t, r); oe.Description != tt.desc {
				t.Fatalf("description %q, want %q", oe.Description, tt.desc)
			}
		})
	}
}

// A subscription made through the filter: 201 with Location, readable on
// the bare Orion (passwd masked), notified on a change of a condition
// attribute only, with only the notification attrs that exist, then
// deleted through the filter.
func TestOrionSubscriptionLifecycle(t *testing.T) {
	f := newFixture(t)
	rcv := newReceiver(t, f)
	alice := f.token(t, "alice", time.Hour)
	body := `{"description":"gw hints","subject":{"entities":[{"id":"` + devTemp + `","type":"` + devType + `"}],"condition":{"attrs":["temperature"]}},` +
		`"notification":{"http":{"url":"` + rcv.srv.URL + `/n"},"attrs":["noSuchAttr"]},"expires":"2099-01-01T00:00:00Z"}`
	r := f.mustDo(t, "POST", f.sim.BrokerURL()+"/v2/subscriptions", alice, []byte(body))
	if r.status != 201 {
		t.Fatalf("POST: %d %s", r.status, r.body)
	}
	loc := r.header.Get("Location")
	id := strings.TrimPrefix(loc, "/v2/subscriptions/")
	if len(id) != 24 || loc != "/v2/subscriptions/"+id {
		t.Fatalf("Location = %q", loc)
	}
	g := f.mustDo(t, "GET", f.sim.DirectBrokerURL()+"/v2/subscriptions/"+id, "", nil)
	var sub map[string]any
	if err := json.Unmarshal(g.body, &sub); err != nil || g.status != 200 {
		t.Fatalf("GET: %d %s", g.status, g.body)
	}
	if sub["status"] != "active" || sub["expires"] != "2099-01-01T00:00:00.000Z" || sub["description"] != "gw hints" {
		t.Errorf("subscription = %s", g.body)
	}

	// humidity is not a condition attribute: no notification.
	patch := func(attrs string) {
		t.Helper()
		r := f.mustDo(t, "PATCH", f.sim.BrokerURL()+"/v2/entities/"+devTemp+"/attrs", alice, []byte(attrs))
		if r.status != 204 {
			t.Fatalf("PATCH: %d %s", r.status, r.body)
		}
	}
	patch(`{"humidity":{"value":40,"type":"Number"}}`)
	patch(`{"temperature":{"value":21.5,"type":"Number"}}`)
	testkit.Eventually(t, 10*time.Second, "the notification", func() bool { return len(rcv.all()) == 1 })
	n := rcv.all()[0]
	var doc struct {
		SubscriptionID string           `json:"subscriptionId"`
		Data           []map[string]any `json:"data"`
	}
	if err := json.Unmarshal(n.body, &doc); err != nil || doc.SubscriptionID != id || len(doc.Data) != 1 {
		t.Fatalf("notification %s", n.body)
	}
	if d := doc.Data[0]; len(d) != 2 || d["id"] != devTemp || d["type"] != devType {
		t.Errorf("notified entity = %v, want id and type only (notification attrs name a missing attribute)", d)
	}
	if n.header.Get("Ngsiv2-AttrsFormat") != "normalized" || n.header.Get("Fiware-ServicePath") != "/" || !strings.HasPrefix(n.header.Get("User-Agent"), "orion/") {
		t.Errorf("notification headers = %v", n.header)
	}
	// The same value again changes nothing: no notification (entityChange).
	patch(`{"temperature":{"value":21.5,"type":"Number"}}`)
	patch(`{"temperature":{"value":22,"type":"Number"}}`)
	testkit.Eventually(t, 10*time.Second, "the second notification", func() bool { return len(rcv.all()) == 2 })
	g = f.mustDo(t, "GET", f.sim.DirectBrokerURL()+"/v2/subscriptions/"+id, "", nil)
	if !strings.Contains(string(g.body), `"timesSent":2`) {
		t.Errorf("timesSent after two notifications: %s", g.body)
	}

	if r := f.mustDo(t, "DELETE", f.sim.BrokerURL()+"/v2/subscriptions/"+id+"?elementid="+devTemp, alice, nil); r.status != 204 {
		t.Fatalf("DELETE: %d %s", r.status, r.body)
	}
	r = f.mustDo(t, "DELETE", f.sim.BrokerURL()+"/v2/subscriptions/"+id+"?elementid="+devTemp, alice, nil)
	if r.status != 404 || orionErr(t, r).Description != orionSubNotFound {
		t.Fatalf("DELETE again: %d %s", r.status, r.body)
	}
	patch(`{"temperature":{"value":23,"type":"Number"}}`)
	if len(f.sim.Subscriptions()) != 0 {
		t.Errorf("subscriptions left: %+v", f.sim.Subscriptions())
	}
}

// An expired subscription is shown "expired" and notifies nothing; the
// MQTT passwd is masked on GET; a deploy without subscriptions answers
// 501.
func TestOrionSubscriptionExpiredAndMasked(t *testing.T) {
	f := newFixture(t)
	rcv := newReceiver(t, f)
	alice := f.token(t, "alice", time.Hour)
	past := `{"subject":{"entities":[{"id":"` + devTemp + `"}]},"notification":{"http":{"url":"` + rcv.srv.URL + `"}},"expires":"2020-01-01T00:00:00Z"}`
	if r := f.mustDo(t, "POST", f.sim.BrokerURL()+"/v2/subscriptions", alice, []byte(past)); r.status != 201 {
		t.Fatalf("POST: %d %s", r.status, r.body)
	}
	mq := `{"subject":{"entities":[{"id":"` + devTemp + `"}]},"notification":{"mqtt":{"url":"mqtt://127.0.0.1:1","topic":"t","user":"u","passwd":"pw-secret"}}}`
	if r := f.mustDo(t, "POST", f.sim.BrokerURL()+"/v2/subscriptions", alice, []byte(mq)); r.status != 201 {
		t.Fatalf("POST: %d %s", r.status, r.body)
	}
	g := f.mustDo(t, "GET", f.sim.DirectBrokerURL()+"/v2/subscriptions", "", nil)
	if strings.Contains(string(g.body), "pw-secret") || !strings.Contains(string(g.body), `"passwd":"******"`) || !strings.Contains(string(g.body), `"status":"expired"`) {
		t.Errorf("GET /v2/subscriptions = %s", g.body)
	}
	r := f.mustDo(t, "PATCH", f.sim.BrokerURL()+"/v2/entities/"+devTemp+"/attrs", alice, []byte(`{"temperature":{"value":30,"type":"Number"}}`))
	if r.status != 204 {
		t.Fatalf("PATCH: %d", r.status)
	}
	// The MQTT one fails (nothing listens on port 1): counted, not retried.
	testkit.Eventually(t, 10*time.Second, "the failed MQTT notification counted", func() bool {
		g := f.mustDo(t, "GET", f.sim.DirectBrokerURL()+"/v2/subscriptions", "", nil)
		return strings.Contains(string(g.body), `"failsCounter":1`)
	})
	if n := len(rcv.all()); n != 0 {
		t.Errorf("%d notifications of an expired subscription", n)
	}
	f.sim.SetNoSubscriptions(true)
	r = f.mustDo(t, "POST", f.sim.BrokerURL()+"/v2/subscriptions", alice, []byte(mq))
	if r.status != 501 || orionErr(t, r).Error != orionErrNotImpl {
		t.Fatalf("POST without subscriptions: %d %s", r.status, r.body)
	}
}
