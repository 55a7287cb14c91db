package centralsim

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
)

// Orion 3.12's NGSI v2 subscriptions (telefonicaid/fiware-orion, tag
// 3.12.0): POST/GET/DELETE /v2/subscriptions, triggered by entity updates,
// notifying over HTTP (a POST to notification.http.url) or MQTT (a publish
// to notification.mqtt.url/topic with user/passwd). Sources, under src/lib/
// unless said: jsonParseV2/parseSubscription.cpp (validation and its
// texts), jsonParseV2/parseEntitiesVector.cpp, jsonParseV2/parseStringVector.cpp,
// mongoBackend/MongoCommonUpdate.cpp (which subscriptions an update
// triggers: expired and inactive ones skipped, condition attrs,
// onlyChangedAttrs, throttling), ngsiNotify/Notifier.cpp (the request),
// doc/manuals/orion-api.md ("Subscriptions Operations", "Notification
// Messages", "Covered Subscriptions", "Filtering out attributes and
// metadata"), doc/manuals/user/mqtt_notifications.md (mqtt:// only, no
// TLS). README.md's parity table lists what is left out.

// Orion's descriptions (common/errorMessages.h, parseSubscription.cpp).
const (
	orionSubNotFound     = "The requested subscription has not been found. Check id" // ERROR_DESC_NOT_FOUND_SUBSCRIPTION
	orionBadAttrsFormat  = "invalid attrsFormat, accepted values: legacy, normalized, simplifiedNormalized, keyValues, simplifiedkeyValues, values"
	orionBadStatus       = "status is not valid: it has to be either active, inactive or oneshot"
	orionPasswdMask      = "******"
	orionDefaultHTTPTime = 5 * time.Second // -httpTimeout default (admin/cli.md)
	// maxSubscriptions bounds the simulator (Orion has no such limit).
	maxSubscriptions = 10000
	// orionUserAgent is what Orion sends with an HTTP notification.
	orionUserAgent = "orion/3.12.0 libcurl/7.88.1"
)

// subscription is one NGSI v2 subscription as Orion keeps it (csubs).
type subscription struct {
	id          string
	service     string // tenant
	servicePath string // "" when created without Fiware-ServicePath
	description string
	entities    []subEntity
	condAttrs   []string
	// notification
	httpURL     string
	httpTimeout time.Duration
	mqtt        *mqttNotif
	attrs       []string
	except      bool // attrs is exceptAttrs
	attrsFormat string
	onlyChanged bool
	covered     bool
	expires     time.Time // zero: permanent
	status      string    // active, inactive, oneshot
	throttling  int64     // seconds
	// what Orion counts (GET shows them)
	timesSent        int64
	lastNotification time.Time
	lastSuccess      time.Time
	lastFailure      time.Time
	lastSuccessCode  int
	failsCounter     int64
}

type subEntity struct{ id, typ string }

type mqttNotif struct {
	url, topic   string
	qos          byte
	retain       bool
	user, passwd string
}

// Subscription is what a test sees of a subscription (no password).
type Subscription struct {
	ID          string
	Entities    []string
	CondAttrs   []string
	NotifyAttrs []string
	HTTPURL     string
	MQTTURL     string
	MQTTTopic   string
	MQTTUser    string
	Expires     time.Time
	Status      string // active, inactive, oneshot or expired
	TimesSent   int64
}

// SetNoSubscriptions switches the broker's subscription routes to 501 (a
// deploy that does not offer them, Options.NoSubscriptions) or back.
func (s *Server) SetNoSubscriptions(off bool) { s.noSubs.Store(off) }

// SetNotifyHTTPClient replaces Options.NotifyHTTPClient (e.g. one that
// trusts a test's receiver).
func (s *Server) SetNotifyHTTPClient(c *http.Client) {
	s.mu.Lock()
	s.opts.NotifyHTTPClient = c
	s.mu.Unlock()
}

// Subscriptions lists the subscriptions Orion holds, by id.
func (s *Server) Subscriptions() []Subscription {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]Subscription, 0, len(s.subs))
	now := s.now()
	for _, sub := range s.subs {
		x := Subscription{ID: sub.id, CondAttrs: slices.Clone(sub.condAttrs), NotifyAttrs: slices.Clone(sub.attrs),
			HTTPURL: sub.httpURL, Expires: sub.expires, Status: sub.statusAt(now), TimesSent: sub.timesSent}
		for _, e := range sub.entities {
			x.Entities = append(x.Entities, e.id)
		}
		if sub.mqtt != nil {
			x.MQTTURL, x.MQTTTopic, x.MQTTUser = sub.mqtt.url, sub.mqtt.topic, sub.mqtt.user
		}
		out = append(out, x)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

func (sub *subscription) statusAt(now time.Time) string {
	if !sub.expires.IsZero() && now.After(sub.expires) {
		return "expired"
	}
	return sub.status
}

// newSubID is a Mongo ObjectId's form: 24 hex digits.
func newSubID() string {
	b := make([]byte, 12)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// parseSubscription is parseSubscription.cpp for a creation: the checks a
// gateway can meet, in Orion's order, with its texts.
func parseSubscription(body []byte) (*subscription, *orionFail) {
	var doc map[string]json.RawMessage
	if len(bytes.TrimSpace(body)) == 0 {
		return nil, badRequest(orionEmptyPayload)
	}
	if err := json.Unmarshal(body, &doc); err != nil {
		return nil, parseFail()
	}
	if len(doc) == 0 {
		return nil, badRequest(orionEmptyPayload)
	}
	sub := &subscription{status: "active", attrsFormat: "normalized"}
	if raw, ok := doc["description"]; ok {
		if json.Unmarshal(raw, &sub.description) != nil {
			return nil, badRequest("invalid JSON type for description")
		}
		if len(sub.description) > 1024 {
			return nil, badRequest("max description length exceeded")
		}
		if forbiddenChars(sub.description) {
			return nil, badRequest("forbidden characters in description")
		}
	}
	subject, ok := doc["subject"]
	if !ok {
		return nil, badRequest("no subject for subscription specified")
	}
	if f := sub.parseSubject(subject); f != nil {
		return nil, f
	}
	notif, ok := doc["notification"]
	if !ok {
		return nil, badRequest("no notification for subscription specified")
	}
	if f := sub.parseNotification(notif); f != nil {
		return nil, f
	}
	if raw, ok := doc["expires"]; ok {
		var exp string
		if json.Unmarshal(raw, &exp) != nil {
			return nil, badRequest("invalid JSON type for expires")
		}
		if exp != "" { // "" is permanent
			norm, ok := normalizeDate(raw)
			if !ok {
				return nil, badRequest("expires has an invalid format")
			}
			var ts string
			_ = json.Unmarshal(norm, &ts)
			sub.expires, _ = time.Parse("2006-01-02T15:04:05.000Z", ts)
		}
	}
	if raw, ok := doc["status"]; ok {
		if json.Unmarshal(raw, &sub.status) != nil || (sub.status != "active" && sub.status != "inactive" && sub.status != "oneshot") {
			return nil, badRequest(orionBadStatus)
		}
	}
	if raw, ok := doc["throttling"]; ok {
		if json.Unmarshal(raw, &sub.throttling) != nil || sub.throttling < 0 {
			return nil, badRequest("invalid JSON type for throttling")
		}
	}
	return sub, nil
}

func (sub *subscription) parseSubject(raw json.RawMessage) *orionFail {
	var subject map[string]json.RawMessage
	if json.Unmarshal(raw, &subject) != nil {
		return badRequest("subject is not an object")
	}
	ents, ok := subject["entities"]
	if !ok {
		return badRequest("no subject entities specified")
	}
	var list []map[string]json.RawMessage
	if json.Unmarshal(ents, &list) != nil {
		return badRequest("/entities/ is not an array")
	}
	for _, e := range list {
		_, hasID := e["id"]
		_, hasPat := e["idPattern"]
		switch {
		case e == nil:
			return badRequest("/entities/ vector item is not an object")
		case !hasID && !hasPat:
			return badRequest("/entities/ vector item does not have /id/ nor /idPattern/")
		case hasID && hasPat:
			return badRequest("/entities/ vector item has both /id/ and /idPattern/")
		case hasPat:
			// A stock filter refuses idPattern before Orion sees it
			// (filter.go); the bare Orion would take it.
			return &orionFail{http.StatusNotImplemented, orionErrNotImpl, "idPattern subscriptions are not simulated by central-sim"}
		}
		var se subEntity
		if json.Unmarshal(e["id"], &se.id) != nil {
			return badRequest("invalid JSON type for /entities/ vector item /id/")
		}
		if se.id == "" {
			return badRequest("/entities/ element id is empty")
		}
		if forbiddenIDChars(se.id) {
			return badRequest("forbidden characters in /entities/ vector item /id/")
		}
		if len(se.id) > orionMaxID {
			return badRequest("max id length exceeded in /entities/ vector item /id/")
		}
		if t, ok := e["type"]; ok {
			if json.Unmarshal(t, &se.typ) != nil {
				return badRequest("invalid JSON type for /entities/ vector item type")
			}
			if se.typ == "" {
				return badRequest("entity type length: 0, min length supported: 1")
			}
			if forbiddenIDChars(se.typ) {
				return badRequest("forbidden characters in /entities/ vector item /type/")
			}
		}
		sub.entities = append(sub.entities, se)
	}
	if len(sub.entities) == 0 {
		return badRequest("subject entities is empty")
	}
	if cond, ok := subject["condition"]; ok {
		var c map[string]json.RawMessage
		if json.Unmarshal(cond, &c) != nil || c == nil {
			return badRequest("condition is not an object")
		}
		if len(c) == 0 {
			return badRequest("condition is empty")
		}
		if a, ok := c["attrs"]; ok {
			var f *orionFail
			if sub.condAttrs, f = stringVector(a, "attrs"); f != nil {
				return f
			}
		}
		if _, ok := c["expression"]; ok {
			return &orionFail{http.StatusNotImplemented, orionErrNotImpl, "condition expressions are not simulated by central-sim"}
		}
	}
	return nil
}

// stringVector is parseStringVector.cpp: an array of distinct strings
// without forbidden characters.
func stringVector(raw json.RawMessage, field string) ([]string, *orionFail) {
	var items []json.RawMessage
	if json.Unmarshal(raw, &items) != nil {
		return nil, badRequest("the field /" + field + "/ must be a JSON array")
	}
	out := make([]string, 0, len(items))
	for _, it := range items {
		var v string
		if json.Unmarshal(it, &v) != nil {
			return nil, badRequest("only JSON Strings allowed in string vector /" + field + "/")
		}
		if slices.Contains(out, v) {
			return nil, badRequest("duplicated item /" + v + "/ in array")
		}
		if forbiddenIDChars(v) {
			return nil, badRequest("forbidden characters in attribute name")
		}
		out = append(out, v)
	}
	return out, nil
}

func (sub *subscription) parseNotification(raw json.RawMessage) *orionFail {
	var n map[string]json.RawMessage
	if json.Unmarshal(raw, &n) != nil || n == nil {
		return badRequest("notification is not an object")
	}
	kinds := 0
	for _, k := range []string{"http", "httpCustom", "mqtt", "mqttCustom"} {
		if _, ok := n[k]; ok {
			kinds++
		}
	}
	switch {
	case kinds > 1:
		return badRequest("only one of http, httpCustom, mqtt or mqttCustom is allowed")
	case kinds == 0:
		return badRequest("http, httpCustom, mqtt or mqttCustom is missing")
	}
	if h, ok := n["http"]; ok {
		var hh map[string]json.RawMessage
		if json.Unmarshal(h, &hh) != nil || hh == nil {
			return badRequest("http notification is not an object")
		}
		var u string
		if _, ok := hh["url"]; !ok || json.Unmarshal(hh["url"], &u) != nil {
			return badRequest("mandatory field /url/ not found in url http notification")
		}
		if forbiddenChars(u) {
			return badRequest("forbidden characters in http field /url/")
		}
		if t, ok := hh["timeout"]; ok {
			var ms int64
			if json.Unmarshal(t, &ms) != nil || ms < 0 || ms > 1800000 {
				return badRequest("timeout field must be an integer between 0 and 1800000")
			}
			sub.httpTimeout = time.Duration(ms) * time.Millisecond
		}
		pu, err := url.Parse(u)
		if err != nil || pu.Host == "" {
			return badRequest("Invalid URL parsing notification url")
		}
		if pu.Scheme == "mqtt" {
			return badRequest("mqtt URL cannot be used in http notifications")
		}
		if pu.Scheme != "http" && pu.Scheme != "https" {
			return badRequest("Invalid URL parsing notification url")
		}
		sub.httpURL = u
	}
	if m, ok := n["mqtt"]; ok {
		mq, f := parseMQTTNotif(m)
		if f != nil {
			return f
		}
		sub.mqtt = mq
	}
	if _, ok := n["httpCustom"]; ok {
		return &orionFail{http.StatusNotImplemented, orionErrNotImpl, "httpCustom notifications are not simulated by central-sim"}
	}
	if _, ok := n["mqttCustom"]; ok {
		return &orionFail{http.StatusNotImplemented, orionErrNotImpl, "mqttCustom notifications are not simulated by central-sim"}
	}
	_, hasAttrs := n["attrs"]
	_, hasExcept := n["exceptAttrs"]
	switch {
	case hasAttrs && hasExcept:
		return badRequest("http notification has attrs and exceptAttrs")
	case hasAttrs:
		var f *orionFail
		if sub.attrs, f = stringVector(n["attrs"], "attrs"); f != nil {
			return f
		}
	case hasExcept:
		var f *orionFail
		if sub.attrs, f = stringVector(n["exceptAttrs"], "exceptAttrs"); f != nil {
			return f
		}
		if len(sub.attrs) == 0 {
			return badRequest("http notification has exceptAttrs is empty")
		}
		sub.except = true
	}
	if raw, ok := n["onlyChangedAttrs"]; ok && json.Unmarshal(raw, &sub.onlyChanged) != nil {
		return badRequest("invalid JSON type for onlyChangedAttrs")
	}
	if raw, ok := n["covered"]; ok {
		if json.Unmarshal(raw, &sub.covered) != nil {
			return badRequest("invalid JSON type for covered")
		}
		if sub.covered && len(sub.attrs) == 0 {
			return badRequest("covered true cannot be used if notification attributes list is empty")
		}
	}
	if raw, ok := n["attrsFormat"]; ok {
		if json.Unmarshal(raw, &sub.attrsFormat) != nil {
			return badRequest("invalid JSON type for attrsFormat")
		}
		switch sub.attrsFormat {
		case "normalized", "keyValues", "simplifiedNormalized", "simplifiedKeyValues", "values":
		default:
			return badRequest(orionBadAttrsFormat)
		}
	}
	return nil
}

// parseMQTTNotif is parseMqttUrl, parseMqttAuth, parseMqttQoS,
// parseMqttRetain and the topic check of parseSubscription.cpp.
func parseMQTTNotif(raw json.RawMessage) (*mqttNotif, *orionFail) {
	var m map[string]json.RawMessage
	if json.Unmarshal(raw, &m) != nil || m == nil {
		return nil, badRequest("mqtt notification is not an object")
	}
	str := func(k string) (string, bool, *orionFail) {
		v, ok := m[k]
		if !ok {
			return "", false, nil
		}
		var s string
		if json.Unmarshal(v, &s) != nil {
			return "", true, badRequest("invalid JSON type for " + k + " mqtt notification")
		}
		return s, true, nil
	}
	mq := &mqttNotif{}
	u, ok, f := str("url")
	if f != nil {
		return nil, f
	}
	if !ok {
		return nil, badRequest("mandatory mqtt field /url/")
	}
	if forbiddenChars(u) {
		return nil, badRequest("forbidden characters in mqtt field /url/")
	}
	// common/string.cpp parseUrl takes http:, https: and mqtt: only.
	pu, err := url.Parse(u)
	if err != nil || pu.Host == "" || (pu.Scheme != "http" && pu.Scheme != "https" && pu.Scheme != "mqtt") {
		return nil, badRequest("invalid mqtt /url/")
	}
	if pu.Scheme != "mqtt" {
		// mqtt_notifications.md: TLS is not supported by Orion.
		return nil, badRequest("http or https URL cannot be used in mqtt notifications")
	}
	if pu.Path != "" && pu.Path != "/" {
		return nil, badRequest("path cannot be used in mqtt url, use topic instead")
	}
	mq.url = u
	user, hasUser, f := str("user")
	if f != nil {
		return nil, f
	}
	if forbiddenChars(user) {
		return nil, badRequest("forbidden characters in mqtt /user/")
	}
	pw, hasPw, f := str("passwd")
	if f != nil {
		return nil, f
	}
	if hasUser != hasPw {
		return nil, badRequest("you must use user and passwd fields simultaneously")
	}
	mq.user, mq.passwd = user, pw
	if q, ok := m["qos"]; ok {
		var qos int64
		if json.Unmarshal(q, &qos) != nil || qos < 0 || qos > 2 {
			return nil, badRequest("mqtt qos field must be an integer in the 0 to 2 range")
		}
		mq.qos = byte(qos)
	}
	if r, ok := m["retain"]; ok && json.Unmarshal(r, &mq.retain) != nil {
		return nil, badRequest("invalid JSON type for retain mqtt notification")
	}
	topic, ok, f := str("topic")
	switch {
	case f != nil:
		return nil, f
	case !ok:
		return nil, badRequest("mandatory mqtt field /topic/")
	case topic == "":
		return nil, badRequest("empty mqtt field /topic/")
	case strings.ContainsAny(topic, "+#"):
		return nil, badRequest("+ and # are not allowed in mqtt field /topic/")
	case forbiddenChars(topic):
		return nil, badRequest("forbidden characters in mqtt field /topic/")
	}
	mq.topic = topic
	return mq, nil
}

// orionCreateSubscription is POST /v2/subscriptions: 201 with Location
// /v2/subscriptions/{id} (orion-api.md "Create Subscription").
func (s *Server) orionCreateSubscription(c orionCall) {
	t, body, ok := s.orionRequest(c)
	if !ok {
		return
	}
	sub, f := parseSubscription(body)
	if f != nil {
		s.orionAnswer(c, f)
		return
	}
	sub.id, sub.service, sub.servicePath = newSubID(), t.service, t.servicePath
	s.mu.Lock()
	if s.subs == nil {
		s.subs = map[string]*subscription{}
	}
	if len(s.subs) >= maxSubscriptions {
		s.mu.Unlock()
		s.orionAnswer(c, &orionFail{http.StatusServiceUnavailable, "TooManySubscriptions", "the simulator holds at most 10000 subscriptions"})
		return
	}
	s.subs[sub.id] = sub
	s.mu.Unlock()
	s.log.Debug("subscription created", "id", sub.id, "entities", len(sub.entities), "user", c.user)
	c.w.Header().Set("Location", "/v2/subscriptions/"+sub.id)
	c.w.WriteHeader(http.StatusCreated)
}

// orionDeleteSubscription is DELETE /v2/subscriptions/{id}: 204, or 404
// (mongoUnsubscribeContext.cpp). The id must be one of the tenant's.
func (s *Server) orionDeleteSubscription(c orionCall, id string) {
	t, ok := s.orionTenant(c)
	if !ok {
		return
	}
	s.mu.Lock()
	sub, ok := s.subs[id]
	if ok && sub.service == t.service {
		delete(s.subs, id)
	}
	s.mu.Unlock()
	if !ok || sub.service != t.service {
		s.orionAnswer(c, &orionFail{http.StatusNotFound, orionErrNotFound, orionSubNotFound})
		return
	}
	c.w.WriteHeader(http.StatusNoContent)
}

// orionGetSubscription is GET /v2/subscriptions/{id} ("" lists them all):
// the passwd is always obfuscated (orion-api.md).
func (s *Server) orionGetSubscription(c orionCall, id string) {
	t, ok := s.orionTenant(c)
	if !ok {
		return
	}
	s.mu.Lock()
	now := s.now()
	var list []map[string]any
	for _, sub := range s.subs {
		if sub.service == t.service && (id == "" || sub.id == id) {
			list = append(list, sub.render(now))
		}
	}
	s.mu.Unlock()
	if id == "" {
		sort.Slice(list, func(i, j int) bool { return list[i]["id"].(string) < list[j]["id"].(string) })
		if list == nil {
			list = []map[string]any{}
		}
		writeJSON(c.w, http.StatusOK, list)
		return
	}
	if len(list) == 0 {
		s.orionAnswer(c, &orionFail{http.StatusNotFound, orionErrNotFound, orionSubNotFound})
		return
	}
	writeJSON(c.w, http.StatusOK, list[0])
}

func orionTime(t time.Time) string { return t.UTC().Format("2006-01-02T15:04:05.000Z") }

// render is the subscription's JSON representation. Caller holds s.mu.
func (sub *subscription) render(now time.Time) map[string]any {
	ents := make([]map[string]string, 0, len(sub.entities))
	for _, e := range sub.entities {
		m := map[string]string{"id": e.id}
		if e.typ != "" {
			m["type"] = e.typ
		}
		ents = append(ents, m)
	}
	subject := map[string]any{"entities": ents}
	if len(sub.condAttrs) > 0 {
		subject["condition"] = map[string]any{"attrs": sub.condAttrs}
	}
	n := map[string]any{"attrsFormat": sub.attrsFormat, "onlyChangedAttrs": sub.onlyChanged, "covered": sub.covered}
	key := "attrs"
	if sub.except {
		key = "exceptAttrs"
	}
	n[key] = append([]string{}, sub.attrs...)
	if sub.httpURL != "" {
		n["http"] = map[string]any{"url": sub.httpURL}
	}
	if m := sub.mqtt; m != nil {
		mm := map[string]any{"url": m.url, "topic": m.topic, "qos": m.qos, "retain": m.retain}
		if m.user != "" {
			mm["user"], mm["passwd"] = m.user, orionPasswdMask
		}
		n["mqtt"] = mm
	}
	if sub.timesSent > 0 {
		n["timesSent"] = sub.timesSent
		n["lastNotification"] = orionTime(sub.lastNotification)
	}
	if !sub.lastSuccess.IsZero() {
		n["lastSuccess"] = orionTime(sub.lastSuccess)
		if sub.mqtt == nil {
			n["lastSuccessCode"] = sub.lastSuccessCode
		}
	}
	if !sub.lastFailure.IsZero() {
		n["lastFailure"] = orionTime(sub.lastFailure)
	}
	if sub.failsCounter > 0 {
		n["failsCounter"] = sub.failsCounter
	}
	out := map[string]any{"id": sub.id, "subject": subject, "notification": n, "status": sub.statusAt(now)}
	if sub.description != "" {
		out["description"] = sub.description
	}
	if !sub.expires.IsZero() {
		out["expires"] = orionTime(sub.expires)
	}
	if sub.throttling > 0 {
		out["throttling"] = sub.throttling
	}
	return out
}

// pendingNotif is one notification to send, rendered under s.mu.
type pendingNotif struct {
	subID   string
	service string
	path    string
	format  string
	body    []byte
	httpURL string
	timeout time.Duration
	mqtt    *mqttNotif
}

// attrSnapshot is the state of some attributes of an entity before an
// update, to tell which ones the update changed.
type attrSnapshot map[string]*ngsiAttr

// snapshotLocked copies the named attributes of e; nil (nothing to
// compare) while no subscription exists, which keeps the update path of
// the load tests as cheap as before. Caller holds s.mu.
func (s *Server) snapshotLocked(e *entity, attrs []orionAttr) attrSnapshot {
	if len(s.subs) == 0 {
		return nil
	}
	snap := make(attrSnapshot, len(attrs))
	for _, a := range attrs {
		if old, ok := e.attrs[a.name]; ok {
			cp := old
			snap[a.name] = &cp
		} else {
			snap[a.name] = nil
		}
	}
	return snap
}

// changedLocked names the attributes whose type, value or metadata the
// update changed: Orion's default alteration type entityChange, with
// notifyOnMetadataChange true (orion-api.md "Notification Triggering",
// "Subscriptions based in alteration type"). Caller holds s.mu.
func (snap attrSnapshot) changedLocked(e *entity) []string {
	var out []string
	for name, old := range snap {
		cur, ok := e.attrs[name]
		if !ok {
			continue
		}
		if old == nil || old.Type != cur.Type || !bytes.Equal(compactJSON(old.Value), compactJSON(cur.Value)) || !sameMetadata(old.Metadata, cur.Metadata) {
			out = append(out, name)
		}
	}
	sort.Strings(out)
	return out
}

func compactJSON(b json.RawMessage) []byte {
	var buf bytes.Buffer
	if json.Compact(&buf, b) != nil {
		return b
	}
	return buf.Bytes()
}

func sameMetadata(a, b map[string]json.RawMessage) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		w, ok := b[k]
		if !ok || !bytes.Equal(compactJSON(v), compactJSON(w)) {
			return false
		}
	}
	return true
}

// triggerLocked finds the subscriptions an update of e (changed: the
// attributes it changed) triggers and renders their notifications
// (MongoCommonUpdate.cpp addTriggeredSubscriptions: expired and inactive
// subscriptions are skipped; condition attrs must meet the changed ones;
// throttling; onlyChangedAttrs). Caller holds s.mu.
func (s *Server) triggerLocked(service string, e *entity, changed []string) []pendingNotif {
	if len(changed) == 0 || len(s.subs) == 0 {
		return nil
	}
	now := s.now()
	var out []pendingNotif
	for _, sub := range s.subs {
		if sub.service != service || sub.statusAt(now) == "expired" || sub.status == "inactive" {
			continue
		}
		if sub.servicePath != "" && !(tenant{servicePath: sub.servicePath}).queryMatches(e.servicePath) {
			continue
		}
		match := false
		for _, se := range sub.entities {
			if se.id == e.id && (se.typ == "" || se.typ == e.typ) {
				match = true
				break
			}
		}
		if !match || (len(sub.condAttrs) > 0 && !intersects(sub.condAttrs, changed)) {
			continue
		}
		if sub.throttling > 0 && !sub.lastNotification.IsZero() && now.Sub(sub.lastNotification) < time.Duration(sub.throttling)*time.Second {
			continue
		}
		body, ok := sub.notificationBody(e, changed)
		if !ok {
			continue
		}
		sub.timesSent++
		sub.lastNotification = now
		if sub.status == "oneshot" {
			sub.status = "inactive"
		}
		out = append(out, pendingNotif{subID: sub.id, service: service, path: e.servicePath, format: sub.attrsFormat,
			body: body, httpURL: sub.httpURL, timeout: sub.httpTimeout, mqtt: sub.mqtt})
	}
	return out
}

func intersects(a, b []string) bool {
	for _, x := range a {
		if slices.Contains(b, x) {
			return true
		}
	}
	return false
}

// notificationBody renders {"subscriptionId", "data": [entity]} in the
// subscription's attrsFormat. notification.attrs names what to include:
// an attribute the entity lacks is left out unless covered (then null,
// type None) — so a list of only missing attributes gives id and type
// alone (orion-api.md "Covered Subscriptions"). ok is false when
// onlyChangedAttrs leaves nothing to send (MongoCommonUpdate.cpp).
func (sub *subscription) notificationBody(e *entity, changed []string) ([]byte, bool) {
	var names []string
	switch {
	case sub.except:
		for n := range e.attrs {
			if !slices.Contains(sub.attrs, n) {
				names = append(names, n)
			}
		}
		sort.Strings(names)
	case len(sub.attrs) > 0:
		names = sub.attrs
	default:
		for n := range e.attrs {
			names = append(names, n)
		}
		sort.Strings(names)
	}
	if sub.onlyChanged {
		var keep []string
		for _, n := range names {
			if slices.Contains(changed, n) {
				keep = append(keep, n)
			}
		}
		if len(keep) == 0 {
			return nil, false
		}
		names = keep
	}
	type kv struct {
		name string
		attr ngsiAttr
	}
	var attrs []kv
	for _, n := range names {
		a, ok := e.attrs[n]
		if !ok {
			if !sub.covered {
				continue
			}
			a = ngsiAttr{Type: typeNone, Value: json.RawMessage("null")}
		}
		if a.Metadata == nil {
			a.Metadata = map[string]json.RawMessage{}
		}
		attrs = append(attrs, kv{n, a})
	}
	var data any
	switch sub.attrsFormat {
	case "values":
		vals := make([]json.RawMessage, 0, len(attrs))
		for _, a := range attrs {
			vals = append(vals, a.attr.Value)
		}
		data = vals
	case "keyValues", "simplifiedKeyValues":
		m := map[string]any{"id": e.id, "type": e.typ}
		for _, a := range attrs {
			m[a.name] = a.attr.Value
		}
		data = m
	default:
		m := map[string]any{"id": e.id, "type": e.typ}
		for _, a := range attrs {
			m[a.name] = a.attr
		}
		data = m
	}
	var body []byte
	if strings.HasPrefix(sub.attrsFormat, "simplified") {
		body, _ = json.Marshal(data)
	} else {
		body, _ = json.Marshal(map[string]any{"subscriptionId": sub.id, "data": []any{data}})
	}
	return body, true
}

// subNotifier sends notifications off the request's goroutine, as Orion's
// notification threads do (-notificationMode transient): the update's
// answer never waits for them.
type subNotifier struct {
	mu    sync.Mutex
	conns map[string]paho.Client // url + user → connection kept while used (mqtt_notifications.md)
	wg    sync.WaitGroup
	sem   chan struct{}
}

func newSubNotifier() *subNotifier {
	return &subNotifier{conns: map[string]paho.Client{}, sem: make(chan struct{}, 8)}
}

// notifyAsync sends each notification and records its outcome.
func (s *Server) notifyAsync(ns []pendingNotif) {
	for _, n := range ns {
		select {
		case <-s.closing:
			return
		default:
		}
		s.notifier.wg.Add(1)
		go func() {
			defer s.notifier.wg.Done()
			s.notifier.sem <- struct{}{}
			defer func() { <-s.notifier.sem }()
			code, err := s.sendNotification(n)
			s.mu.Lock()
			if sub := s.subs[n.subID]; sub != nil {
				if err != nil {
					sub.lastFailure = s.now()
					sub.failsCounter++
				} else {
					sub.lastSuccess, sub.lastSuccessCode, sub.failsCounter = s.now(), code, 0
				}
			}
			s.mu.Unlock()
			if err != nil {
				s.log.Debug("notification failed", "subscription", n.subID, "err", err)
			}
		}()
	}
}

// sendNotification is Notifier.cpp: an HTTP POST with Orion's headers, or
// an MQTT publish; an HTTP answer other than 2xx is a failure.
func (s *Server) sendNotification(n pendingNotif) (int, error) {
	if n.mqtt != nil {
		return 0, s.publishNotification(n)
	}
	timeout := n.timeout
	if timeout == 0 {
		timeout = orionDefaultHTTPTime
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	go func() {
		select {
		case <-s.closing:
			cancel()
		case <-ctx.Done():
		}
	}()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, n.httpURL, bytes.NewReader(n.body))
	if err != nil {
		return 0, err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Ngsiv2-AttrsFormat", n.format)
	req.Header.Set("User-Agent", orionUserAgent)
	req.Header.Set("Fiware-Correlator", newSubID())
	if n.service != "" {
		req.Header.Set("Fiware-Service", n.service)
	}
	req.Header.Set("Fiware-ServicePath", n.path)
	s.mu.Lock()
	client := s.opts.NotifyHTTPClient
	s.mu.Unlock()
	if client == nil {
		client = http.DefaultClient
	}
	resp, err := client.Do(req)
	if err != nil {
		return 0, err
	}
	resp.Body.Close()
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return resp.StatusCode, fmt.Errorf("notification answered %d", resp.StatusCode)
	}
	return resp.StatusCode, nil
}

// publishNotification publishes on the subscription's broker, over a
// connection kept for the next one; a failure closes it (Orion re-creates
// it at the next notification, mqtt_notifications.md).
func (s *Server) publishNotification(n pendingNotif) error {
	key := n.mqtt.url + "\x00" + n.mqtt.user + "\x00" + n.mqtt.passwd
	s.notifier.mu.Lock()
	c := s.notifier.conns[key]
	s.notifier.mu.Unlock()
	if c == nil || !c.IsConnectionOpen() {
		u, _ := url.Parse(n.mqtt.url)
		o := paho.NewClientOptions().AddBroker("tcp://" + u.Host).SetClientID("orion-" + newSubID()[:12]).
			SetAutoReconnect(false).SetConnectRetry(false).SetConnectTimeout(5 * time.Second).SetCleanSession(true)
		if n.mqtt.user != "" {
			o.SetUsername(n.mqtt.user).SetPassword(n.mqtt.passwd)
		}
		c = paho.NewClient(o)
		tok := c.Connect()
		if !tok.WaitTimeout(5 * time.Second) {
			c.Disconnect(0)
			return errors.New("mqtt connect: timed out")
		}
		if err := tok.Error(); err != nil {
			return fmt.Errorf("mqtt connect: %w", err)
		}
		s.notifier.mu.Lock()
		if old := s.notifier.conns[key]; old != nil {
			old.Disconnect(0)
		}
		s.notifier.conns[key] = c
		s.notifier.mu.Unlock()
	}
	tok := c.Publish(n.mqtt.topic, n.mqtt.qos, n.mqtt.retain, n.body)
	var err error
	if !tok.WaitTimeout(5 * time.Second) {
		err = errors.New("mqtt publish: timed out")
	} else {
		err = tok.Error()
	}
	if err != nil {
		s.notifier.mu.Lock()
		if s.notifier.conns[key] == c {
			delete(s.notifier.conns, key)
		}
		s.notifier.mu.Unlock()
		c.Disconnect(0)
	}
	return err
}

// closeNotifier waits for notifications in flight (each bounded) and
// closes the MQTT connections. Close calls it.
func (s *Server) closeNotifier() {
	s.notifier.wg.Wait()
	s.notifier.mu.Lock()
	defer s.notifier.mu.Unlock()
	for k, c := range s.notifier.conns {
		c.Disconnect(100)
		delete(s.notifier.conns, k)
	}
}
