package uplink

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/envelope"
	"github.com/edgegate/edgegate/internal/queue"
	"github.com/edgegate/edgegate/internal/reading"
	"github.com/edgegate/edgegate/internal/testkit"
)

// Stock answers, as the Orion Broker Filter and Orion 3.12 give them.
const (
	// OrionBrokerFilter messages.properties, login.ko.credentialsnotvalid.
	filterNoOwnership = `{"result":false,"message":"The passed credentials does not have any ownerships or delegations on the device"}`
	// Orion errorMessages.h ERROR_NOT_FOUND / ERROR_DESC_NOT_FOUND_ENTITY.
	orionNoEntity = `{"description":"The requested entity has not been found. Check type and id","error":"NotFound"}`
)

// fakeClock is an injectable clock for Options.Now.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// addBody queues one reading with the given body.
func (q *fakeQueue) addBody(broker, device, typ string, body []byte) {
	q.mu.Lock()
	defer q.mu.Unlock()
	l := queue.Lane{Broker: broker, Device: device}
	if !slices.Contains(q.brokers, broker) {
		q.brokers = append(q.brokers, broker)
	}
	seq := uint64(len(q.lanes[l]))
	q.lanes[l] = append(q.lanes[l], queue.Item{Broker: broker, Device: device, Type: typ, Seq: seq, Enqueued: time.Now(), Body: body})
	close(q.changed)
	q.changed = make(chan struct{})
}

// requestsFor counts the requests of a device whose body contains sub.
func (b *broker) requestsFor(device, sub string) int {
	n := 0
	for _, r := range b.requests() {
		if r.device == device && strings.Contains(r.body, sub) {
			n++
		}
	}
	return n
}

// Orion's 422 PartialUpdate applied the attributes the entity has: the
// readings are deleted, never resent, never dead-lettered; the missing
// attributes are counted and shown per device.
func TestPartialUpdateIsDelivered(t *testing.T) {
	b := newBroker(t, func(w http.ResponseWriter, r *http.Request, n int) {
		// error_responses_02_update_existing_entity_attributes.test, 3.12.0.
		orion(w, 422, `{"description":"do not exist: `+deviceOf(r)+` - [ rssi, voltage ]","error":"PartialUpdate"}`)
	})
	q := newFakeQueue()
	q.add(b.URL, "node-7", 3)
	h := start(t, q, &fakeTokens{}, b.pool(), Options{})
	testkit.Eventually(t, 10*time.Second, "queue drained", func() bool { return q.depth() == 0 })
	h.stop(t)
	if dl := q.deadLetters(); len(dl) != 0 {
		t.Fatalf("dead letters = %v, want none: a PartialUpdate was applied", dl)
	}
	if n := len(b.requests()); n != 3 {
		t.Errorf("requests = %d, want 3 (never resent)", n)
	}
	if v := counter(t, h.m.Delivered.WithLabelValues(b.URL)); v != 3 {
		t.Errorf("Delivered = %v, want 3", v)
	}
	if v := counter(t, h.m.MissingAttrs); v != 6 {
		t.Errorf("edgegate_uplink_missing_attributes_total = %v, want 6", v)
	}
	miss := h.u.MissingAttributes()
	if len(miss) != 1 || miss[0].Device != "node-7" || !slices.Equal(miss[0].Attrs, []string{"rssi", "voltage"}) || miss[0].Count != 6 {
		t.Errorf("MissingAttributes = %+v", miss)
	}
	if n := strings.Count(h.logs.String(), "lacks attributes"); n != 1 {
		t.Errorf("missing-attribute warnings = %d, want 1 (once per new name set)", n)
	}
}

// The filter's cached refusal of a device the policy lists is retried for
// the refusal window from the device's first refusal, then dead-lettered;
// later readings of the still-refused device go at once; a success starts
// over. The other devices keep flowing meanwhile.
func TestRefusalWindow(t *testing.T) {
	clk := &fakeClock{t: time.Date(2026, 12, 3, 6, 0, 0, 0, time.UTC)}
	var refuse atomic.Bool
	refuse.Store(true)
	b := newBroker(t, func(w http.ResponseWriter, r *http.Request, n int) {
		if deviceOf(r) == "fresh" && refuse.Load() {
			orion(w, http.StatusUnauthorized, filterNoOwnership)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
	q := newFakeQueue()
	mark := func(m string) []byte { return []byte(`{"mark":{"type":"Text","value":"` + m + `"}}`) }
	q.addBody(b.URL, "fresh", "Sensor", mark("r0"))
	q.add(b.URL, "other", 3)
	h := start(t, q, &fakeTokens{}, b.pool(), Options{Now: clk.Now, RefusalWindow: 5 * time.Minute})
	first := `"r0"`
	testkit.Eventually(t, 10*time.Second, "the other device delivered and the refused one tried", func() bool {
		return len(q.Lanes(b.URL)) == 1 && b.requestsFor("fresh", first) >= 1
	})
	// The gateway's clock moves on while it waits (200ms of fake time per
	// poll), but never past limit from the first refusal.
	start := clk.Now()
	ticking := func(what string, limit time.Duration, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s", what)
			}
			if clk.Now().Sub(start) < limit {
				clk.advance(200 * time.Millisecond)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	for _, at := range []time.Duration{time.Minute, 4 * time.Minute} {
		n := b.requestsFor("fresh", first)
		clk.advance(at - clk.Now().Sub(start))
		ticking("a retry within the window", 5*time.Minute-time.Second, func() bool { return b.requestsFor("fresh", first) > n })
		if dl := q.deadLetters(); len(dl) != 0 {
			t.Fatalf("dead-lettered within the window (at %s): %v", clk.Now().Sub(start), dl)
		}
	}
	clk.advance(5*time.Minute + time.Second - clk.Now().Sub(start)) // past uplink.refusal_window
	ticking("dead letter after the window", time.Hour, func() bool { return len(q.deadLetters()) == 1 })
	reason := q.deadLetters()[0].reason
	if !strings.Contains(reason, "does not have any ownerships") || !strings.Contains(reason, "uplink.refusal_window 5m0s") {
		t.Errorf("reason = %q", reason)
	}
	if v := counter(t, h.m.Retried.WithLabelValues("refused_401")); v < 2 {
		t.Errorf("Retried{refused_401} = %v, want ≥ 2", v)
	}
	if v := counter(t, h.m.DeadLettered.WithLabelValues("401")); v != 1 {
		t.Errorf("DeadLettered{401} = %v, want 1", v)
	}

	// Still refused: the next reading is dead-lettered at its first refusal.
	q.addBody(b.URL, "fresh", "Sensor", mark("r1"))
	testkit.Eventually(t, 10*time.Second, "second dead letter", func() bool { return len(q.deadLetters()) == 2 })
	if n := b.requestsFor("fresh", `"r1"`); n != 1 {
		t.Errorf("the reading after the window was sent %d times, want 1", n)
	}

	// Accepted again (the filter's cache expired): delivered; a later
	// refusal starts a new window instead of dead-lettering.
	refuse.Store(false)
	q.addBody(b.URL, "fresh", "Sensor", mark("r2"))
	testkit.Eventually(t, 10*time.Second, "delivered once accepted", func() bool { return q.depth() == 0 })
	refuse.Store(true)
	retried := counter(t, h.m.Retried.WithLabelValues("refused_401"))
	q.addBody(b.URL, "fresh", "Sensor", mark("r3"))
	testkit.Eventually(t, 10*time.Second, "refused again", func() bool { return b.requestsFor("fresh", `"r3"`) >= 1 })
	// The refusal handled (a retry or a dead letter), not a bare sleep.
	testkit.Eventually(t, 10*time.Second, "the refusal of r3 handled", func() bool {
		return counter(t, h.m.Retried.WithLabelValues("refused_401")) > retried || len(q.deadLetters()) > 2
	})
	if n := len(q.deadLetters()); n != 2 || q.depth() != 1 {
		t.Errorf("after a success, a refusal: dead letters %d, depth %d; want 2, 1 (a new window)", n, q.depth())
	}
	h.stop(t)
}

// Orion's 404 (no entity yet) is retried like a refusal, and delivered
// once the entity exists; refusal_window 0 dead-letters at once.
func TestNoEntityYet(t *testing.T) {
	b := newBroker(t, func(w http.ResponseWriter, r *http.Request, n int) {
		if n <= 2 {
			orion(w, http.StatusNotFound, orionNoEntity)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
	q := newFakeQueue()
	q.add(b.URL, "new", 1)
	h := start(t, q, &fakeTokens{}, b.pool(), Options{})
	testkit.Eventually(t, 10*time.Second, "delivered", func() bool { return q.depth() == 0 })
	h.stop(t)
	if len(q.deadLetters()) != 0 || len(b.requests()) != 3 {
		t.Errorf("dead letters %v, requests %d; want none, 3", q.deadLetters(), len(b.requests()))
	}

	b2 := newBroker(t, func(w http.ResponseWriter, r *http.Request, n int) { orion(w, http.StatusNotFound, orionNoEntity) })
	q2 := newFakeQueue()
	q2.add(b2.URL, "gone", 1)
	h2 := start(t, q2, &fakeTokens{}, b2.pool(), Options{RefusalWindow: NoRefusalWindow})
	testkit.Eventually(t, 10*time.Second, "dead-lettered at once", func() bool { return len(q2.deadLetters()) == 1 })
	h2.stop(t)
	if r := q2.deadLetters()[0].reason; r != "404 Not Found: The requested entity has not been found. Check type and id" {
		t.Errorf("reason = %q", r)
	}
	if n := len(b2.requests()); n != 1 {
		t.Errorf("requests = %d, want 1", n)
	}
}

// stockOrion answers PATCH /v2/entities/{id}/attrs and GET
// /v2/entities/{id} as Orion 3.12 does (orion-api.md; errorMessages.h):
// 400 for the whole request when a string value or metadata value holds
// one of < > " ' = ; ( ); otherwise the existing attributes are updated
// (metadata merged, those not named kept), 422 PartialUpdate or
// Unprocessable names the others, 404 without the entity.
type stockOrion struct {
	mu       sync.Mutex
	entities map[string]map[string]map[string]any
}

func (o *stockOrion) handle(w http.ResponseWriter, r *http.Request, body string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if r.Method == http.MethodGet {
		id := strings.TrimPrefix(r.URL.Path, "/v2/entities/")
		e, ok := o.entities[id]
		if !ok {
			orion(w, 404, orionNoEntity)
			return
		}
		doc := map[string]any{"id": id, "type": r.URL.Query().Get("type")}
		for n, a := range e {
			doc[n] = a
		}
		json.NewEncoder(w).Encode(doc)
		return
	}
	id := deviceOf(r)
	var upd map[string]map[string]any
	if err := json.Unmarshal([]byte(body), &upd); err != nil {
		orion(w, 400, `{"error":"ParseError","description":"Errors found in incoming JSON buffer"}`)
		return
	}
	for _, a := range upd {
		if forbiddenIn(a["value"]) || forbiddenIn(a["metadata"]) {
			orion(w, 400, `{"error":"BadRequest","description":"Invalid characters in attribute value"}`)
			return
		}
	}
	e, ok := o.entities[id]
	if !ok {
		orion(w, 404, orionNoEntity)
		return
	}
	var missing []string
	for name, a := range upd {
		cur, ok := e[name]
		if !ok {
			missing = append(missing, name)
			continue
		}
		cur["type"], cur["value"] = a["type"], a["value"]
		meta, _ := cur["metadata"].(map[string]any)
		if meta == nil {
			meta = map[string]any{}
			cur["metadata"] = meta
		}
		if m, ok := a["metadata"].(map[string]any); ok {
			for k, v := range m {
				meta[k] = v
			}
		}
	}
	sort.Strings(missing)
	switch {
	case len(missing) == len(upd):
		orion(w, 422, fmt.Sprintf(`{"description":"do not exist: %s - [ %s ]","error":"Unprocessable"}`, id, strings.Join(missing, ", ")))
	case len(missing) > 0:
		orion(w, 422, fmt.Sprintf(`{"description":"do not exist: %s - [ %s ]","error":"PartialUpdate"}`, id, strings.Join(missing, ", ")))
	default:
		w.WriteHeader(http.StatusNoContent)
	}
}

func forbiddenIn(v any) bool {
	switch x := v.(type) {
	case string:
		return strings.ContainsAny(x, `<>"'=;()`)
	case map[string]any:
		for _, e := range x {
			if forbiddenIn(e) {
				return true
			}
		}
	case []any:
		for _, e := range x {
			if forbiddenIn(e) {
				return true
			}
		}
	}
	return false
}

// A reading with a value Orion refuses: prepared as the pipeline does
// (reading.DropOrionInvalid, then Seal and Body), the forbidden attribute
// is left out and the rest is delivered and verifies as read back; the
// same reading sent whole is refused by Orion for every attribute.
func TestForbiddenAttributeDroppedRestDelivered(t *testing.T) {
	o := &stockOrion{entities: map[string]map[string]map[string]any{}}
	for _, id := range []string{"th-1", "th-2"} {
		// What the IoT Directory's insert creates (SNAP4CITY.md).
		o.entities[id] = map[string]map[string]any{
			"latitude":    {"type": "float", "value": "", "metadata": map[string]any{}},
			"temperature": {"type": "Number", "value": "", "metadata": map[string]any{}},
			"label":       {"type": "Text", "value": "", "metadata": map[string]any{}},
		}
	}
	var b *broker
	b = newBroker(t, func(w http.ResponseWriter, r *http.Request, n int) { o.handle(w, r, b.requests()[n-1].body) })
	key, err := envelope.DeriveHS256("th-1", "k1-secret", "k2-secret")
	if err != nil {
		t.Fatal(err)
	}
	at := time.Date(2026, 12, 3, 6, 0, 0, 0, time.UTC)
	prepare := func(dev string, drop bool) []byte {
		r := reading.Reading{Device: dev, Time: at, Attrs: []reading.Attribute{
			{Name: "label", Type: "Text", Value: "a=b"},
			{Name: "temperature", Type: "Number", Value: 21.5},
			{Name: "voltage", Type: "Number", Value: 3.3}, // not in the model
		}}
		if drop {
			if d := r.DropOrionInvalid(); len(d) != 1 || d[0].Name != "label" {
				t.Fatalf("dropped %+v", d)
			}
		}
		c := envelope.ClaimsOf("gw-1", 1, &r)
		jws, err := envelope.Seal(key, c)
		if err != nil {
			t.Fatal(err)
		}
		// Stored packed, as the pipeline stores it: the PATCH renders it.
		body, err := envelope.PackBody(c, jws, "")
		if err != nil {
			t.Fatal(err)
		}
		return body
	}
	q := newFakeQueue()
	q.addBody(b.URL, "th-1", "Thermometer", prepare("th-1", true))
	q.addBody(b.URL, "th-2", "Thermometer", prepare("th-2", false))
	h := start(t, q, &fakeTokens{}, b.pool(), Options{})
	testkit.Eventually(t, 10*time.Second, "queue settled", func() bool { return q.depth() == 0 })
	h.stop(t)

	dl := q.deadLetters()
	if len(dl) != 1 || dl[0].it.Device != "th-2" || !strings.Contains(dl[0].reason, "Invalid characters in attribute value") {
		t.Fatalf("dead letters = %+v, want th-2's whole reading refused (400)", dl)
	}
	if v := counter(t, h.m.MissingAttrs); v != 1 {
		t.Errorf("missing attributes = %v, want 1 (voltage)", v)
	}
	// Read back as `edgegate verify` does.
	rec := httptest.NewRecorder()
	o.handle(rec, httptest.NewRequest(http.MethodGet, "/v2/entities/th-1?type=Thermometer", nil), "")
	rep, err := envelope.VerifyEntity(rec.Body.Bytes(), []envelope.Key{key}, "")
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]envelope.Verdict{}
	for _, a := range rep.Attrs {
		got[a.Name] = a.Verdict
	}
	want := map[string]envelope.Verdict{"latitude": envelope.Unsigned, "label": envelope.Unsigned, "temperature": envelope.Verified}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("verdicts = %v, want %v", got, want)
	}
}

// TestMalformedPackedBodyDeadLettered: a stored body that is packed but
// cut short can never be rendered. It is dead-lettered with the reason,
// in either mode, and never sent; the reading queued after it still goes.
func TestMalformedPackedBodyDeadLettered(t *testing.T) {
	for _, mode := range []string{ModeFilter, ModeBatch} {
		t.Run(mode, func(t *testing.T) {
			b := newBroker(t, func(w http.ResponseWriter, r *http.Request, n int) { w.WriteHeader(http.StatusNoContent) })
			q := newFakeQueue()
			q.addBody(b.URL, "th-1", "T", []byte{0x01, 0, 0, 0, 200, '}'})
			q.addBody(b.URL, "th-1", "T", []byte(`{"t":{"type":"Number","value":1}}`))
			h := start(t, q, &fakeTokens{}, b.pool(), Options{Mode: mode})
			testkit.Eventually(t, 10*time.Second, "queue settled", func() bool { return q.depth() == 0 })
			h.stop(t)
			dl := q.deadLetters()
			if len(dl) != 1 || dl[0].it.Body[0] != 0x01 || !strings.Contains(dl[0].reason, "malformed packed body") {
				t.Fatalf("dead letters = %+v, want the first reading, as a malformed packed body", dl)
			}
			reqs := b.requests()
			if len(reqs) != 1 || !strings.Contains(string(reqs[0].body), `"t":{"type":"Number","value":1}`) {
				t.Fatalf("requests = %d (%v), want the second reading alone", len(reqs), reqs)
			}
		})
	}
}
