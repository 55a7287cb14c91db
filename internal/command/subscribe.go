package command

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"path"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/edgegate/edgegate/internal/backoff"
	"github.com/edgegate/edgegate/policy"
)

// Learning through an Orion subscription (commands.notify): where the
// platform offers one, the gateway asks Orion, through the broker filter
// and as its own account, to tell it when an actuator's writable
// attributes change, so that a command arrives in about the time of one
// notification instead of up to one poll interval.
//
// The stock filter routes POST /v2/subscriptions and DELETE
// /v2/subscriptions/{id} (OrionBrokerFilter OrionController.subscribeV2,
// unsubscribeV2) and checks them in AccessTokenAuthenticationFilter: every
// entity id of subject.entities must pass the account's ownership or
// delegation check (extractV2SubscriptionEntityInfo; an idPattern is
// refused, "The subscription idPattern is not allowed"), and a DELETE
// needs elementid= naming an element the account may read. It routes no
// PATCH of a subscription: a renewal is a new subscription, then the old
// one deleted. Orion answers 201 with Location: /v2/subscriptions/{id}
// (fiware-orion doc/manuals/orion-api.md "Create Subscription").
//
// A notification is only a HINT. The subscription asks Orion to notify
// only an attribute the entity does not have (hintOnlyAttr): Orion then
// renders id and type alone (orion-api.md "Covered Subscriptions": by
// default only attributes that exist are notified;
// mongoBackend/MongoCommonUpdate.cpp still sends the notification), so no
// value travels through the notification broker. On a notification the
// gateway re-reads the entity through the filter with GET — the
// authenticated truth, as polling does — and learns from that alone. A
// forged or replayed notification can therefore cause at most an extra
// GET, rate-limited per device and overall, and never a command.
//
// Refused or failing subscriptions (401/403/404/501, 5xx, timeouts) fall
// back to polling; the device is tried again after a jittered backoff
// (internal/backoff) up to NotifyOptions.ReprobeMax. While a device's
// subscription is live, polling still reads it every SafetyInterval: a
// notification Orion could not deliver costs at most that.

// hintOnlyAttr is the one attribute a notification is asked to carry. No
// entity has it, so notifications carry id and type only (see above).
const hintOnlyAttr = "edgegateHintOnly"

// maxNotifyBytes bounds one notification taken in.
const maxNotifyBytes = 64 << 10

// maxNotifyEntities bounds the entities one notification may hint.
const maxNotifyEntities = 16

// NotifyTransport carries Orion's notifications to the gateway: an MQTT
// broker both reach (MQTTNotify) or an HTTPS endpoint of the gateway
// (HTTPNotify).
type NotifyTransport interface {
	// Target is the subscription's notification target for one device,
	// {"mqtt": {...}} or {"http": {...}}. It may hold the broker's
	// password: it goes into the request body only, never into a log.
	Target(device string) map[string]any
	// Run takes notifications in until ctx ends, passing each body to
	// hint; resync is called whenever notifications may have been missed
	// (a (re)connection), so that every device is read once.
	Run(ctx context.Context, hint func(body []byte), resync func()) error
	// Live reports whether a notification can reach the gateway now.
	Live() bool
	// Name is "mqtt" or "http", for status and logs.
	Name() string
}

// NotifyOptions configure learning through subscriptions.
type NotifyOptions struct {
	Transport NotifyTransport
	// Expires is the lifetime asked for each subscription (default 1h);
	// it is renewed when a quarter of it is left.
	Expires time.Duration
	// SafetyInterval: a device with a live subscription is still read at
	// least this often (default 5m).
	SafetyInterval time.Duration
	// ReprobeMin, ReprobeMax bound the wait before a refused or failed
	// subscription is tried again (defaults 10s, 10m).
	ReprobeMin, ReprobeMax time.Duration
	// HintInterval is the least time between two reads of one device
	// caused by notifications (default 1s); HintSpacing between any two
	// (default 50ms). Hints in between are merged, not dropped.
	HintInterval, HintSpacing time.Duration
}

// Learning says how the service learns commands, for status.
type Learning struct {
	// Mode is "polling" or "subscription (mqtt)" / "subscription (http)".
	Mode string
	// Live devices have a live subscription; Devices are commandable.
	Live, Devices int
	// Why, when some commandable device has no live subscription: the
	// last reason (a refusal, the transport not connected).
	Why string
}

// String is the status line's text.
func (l Learning) String() string {
	if l.Mode == "polling" && l.Why != "" {
		return "polling (" + l.Why + ")"
	}
	if l.Mode == "polling" {
		return "polling (commands.notify.mode none)"
	}
	s := fmt.Sprintf("%s live for %d of %d devices", l.Mode, l.Live, l.Devices)
	if l.Live < l.Devices {
		s += ", polling the others"
		if l.Why != "" {
			s += ": " + l.Why
		}
	}
	return s
}

// devSub is one device's subscription as the gateway holds it.
type devSub struct {
	id      string // Orion's subscription id; "" none
	key     string // what it was made for (broker, type, tenant, attrs)
	broker  string
	dev     *policy.Device // the registration it was made under (for DELETE)
	expires time.Time
	bo      *backoff.Backoff
	next    time.Time // next try after a failure
	why     string
	gone    bool // the device left the policy or was re-registered
}

// subManager keeps one subscription per commandable device and turns
// notifications into rate-limited reads.
type subManager struct {
	s    *Service
	o    NotifyOptions
	wake chan struct{}

	mu       sync.Mutex
	devs     map[string]*devSub
	lastPoll map[string]time.Time // device → last read of its entity (any cause)
	// hints: devices hinted and not yet read; lastHint: last hinted read.
	hints    map[string]bool
	lastHint map[string]time.Time
	hintWake chan struct{}
	why      string // last transport-wide reason
	// held: the subscriptions made and not yet seen deleted, by id, as
	// stored (heldKey). Only the run goroutine changes it.
	held      map[string]heldSub
	heldDirty bool // held changed since it was stored (flushHeld)
}

// heldSub is a subscription the gateway made and has not seen deleted.
// They are kept in the store so that those a crash (or a failed DELETE)
// left at Orion are deleted at the next start, instead of notifying
// until they expire.
type heldSub struct {
	Device      string    `json:"device"`
	Broker      string    `json:"broker"`
	Service     string    `json:"service,omitempty"`
	ServicePath string    `json:"service_path,omitempty"`
	Expires     time.Time `json:"expires"`
}

const (
	heldKey = "command-subscriptions"
	// maxHeld bounds the record read back.
	maxHeld = 100000
)

func newSubManager(s *Service, o NotifyOptions) *subManager {
	if o.Expires <= 0 {
		o.Expires = time.Hour
	}
	if o.SafetyInterval <= 0 {
		o.SafetyInterval = 5 * time.Minute
	}
	if o.ReprobeMin <= 0 {
		o.ReprobeMin = 10 * time.Second
	}
	if o.ReprobeMax < o.ReprobeMin {
		o.ReprobeMax = max(10*time.Minute, o.ReprobeMin)
	}
	if o.HintInterval <= 0 {
		o.HintInterval = time.Second
	}
	if o.HintSpacing <= 0 {
		o.HintSpacing = 50 * time.Millisecond
	}
	return &subManager{s: s, o: o, wake: make(chan struct{}, 1), hintWake: make(chan struct{}, 1),
		devs: map[string]*devSub{}, lastPoll: map[string]time.Time{}, hints: map[string]bool{}, lastHint: map[string]time.Time{},
		held: map[string]heldSub{}}
}

// loadHeld reads the subscriptions a previous run left and deletes those
// not expired yet (bounded by ctx).
func (m *subManager) loadHeld(ctx context.Context) {
	b, ok, err := m.s.o.Store.GetState(heldKey)
	if err != nil || !ok {
		if err != nil {
			m.s.log.Warn("read the Orion subscriptions of the last run", "err", err)
		}
		return
	}
	var held map[string]heldSub
	if err := json.Unmarshal(b, &held); err != nil || len(held) > maxHeld {
		m.s.log.Warn("the record of the last run's Orion subscriptions is unreadable; they lapse when they expire", "err", err)
		m.persist(ctx)
		return
	}
	now := m.s.o.Now()
	m.held = map[string]heldSub{}
	for id, h := range held {
		if h.Expires.After(now) {
			m.held[id] = h
		}
	}
	ids := make([]string, 0, len(m.held))
	for id := range m.held {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	for _, id := range ids {
		if ctx.Err() != nil {
			break
		}
		h := m.held[id]
		m.unsubscribe(ctx, &devSub{id: id, broker: h.Broker, expires: h.Expires,
			dev: &policy.Device{ID: h.Device, Broker: h.Broker, Service: h.Service, ServicePath: h.ServicePath}})
	}
	m.persist(ctx)
}

// flushHeld stores held if it changed: once per pass of reconcile (at
// most probeBudget subscriptions made), not per subscription.
func (m *subManager) flushHeld(ctx context.Context) {
	if m.heldDirty {
		m.persist(ctx)
	}
}

// persist writes held to the store (one atomic record).
func (m *subManager) persist(ctx context.Context) {
	b, err := json.Marshal(m.held)
	if err == nil {
		err = m.s.o.Store.PutState(heldKey, b)
	}
	m.heldDirty = err != nil // tried again after the next pass
	if err != nil {
		m.s.limited.Log(ctx, slog.LevelWarn, "subscriptions-record", "could not record the Orion subscriptions held", "err", err)
	}
}

func poke(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

// Resubscribe makes the service check its subscriptions against the
// policy in force now (the daemon calls it on every policy change).
func (s *Service) Resubscribe() {
	if s.subs != nil {
		poke(s.subs.wake)
	}
}

// Learning reports how commands are learned now.
func (s *Service) Learning() Learning {
	if s.subs == nil {
		l := Learning{Mode: "polling"}
		if s.o.Notify != nil {
			l.Why = "no platform account to subscribe with"
		}
		return l
	}
	return s.subs.learning()
}

func (m *subManager) learning() Learning {
	now := m.s.o.Now()
	l := Learning{Mode: "subscription (" + m.o.Transport.Name() + ")"}
	transport := m.o.Transport.Live()
	m.mu.Lock()
	defer m.mu.Unlock()
	// The reason most devices share is the one shown.
	whys := map[string]int{}
	for _, d := range m.s.o.Policy.Current().Devices() {
		if !d.Commandable() {
			continue
		}
		l.Devices++
		ds := m.devs[d.ID]
		switch {
		case transport && ds != nil && ds.id != "" && now.Before(ds.expires):
			l.Live++
		case ds != nil && ds.why != "":
			whys[ds.why]++
		}
	}
	best := 0
	for why, n := range whys {
		if n > best || n == best && why < l.Why {
			l.Why, best = why, n
		}
	}
	if len(whys) > 1 {
		l.Why += fmt.Sprintf(" (%d devices; other reasons for %d)", best, l.Devices-l.Live-best)
	}
	if !transport {
		l.Why = "the notification " + m.o.Transport.Name() + " transport is not connected"
	} else if l.Why == "" && m.why != "" {
		l.Why = m.why
	}
	return l
}

// live reports whether id has a live subscription (and notifications can
// arrive). Caller holds m.mu.
func (m *subManager) liveLocked(id string, now time.Time) bool {
	ds := m.devs[id]
	return ds != nil && ds.id != "" && !ds.gone && now.Before(ds.expires)
}

// skipPoll: a device whose subscription is live is read only every
// SafetyInterval by the polling rounds.
func (m *subManager) skipPoll(id string, now time.Time) bool {
	if !m.o.Transport.Live() {
		return false
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.liveLocked(id, now) && now.Sub(m.lastPoll[id]) < m.o.SafetyInterval
}

func (m *subManager) polled(id string, now time.Time) {
	m.mu.Lock()
	m.lastPoll[id] = now
	m.mu.Unlock()
}

// forget marks the subscriptions of revoked or re-registered devices for
// deletion (a new one is made under the new registration).
func (m *subManager) forget(ids []string) {
	m.mu.Lock()
	for _, id := range ids {
		if ds := m.devs[id]; ds != nil {
			ds.gone = true
		}
		// A revoked device's read times and pending hint go with it: the
		// maps stay bounded by the devices in force.
		delete(m.hints, id)
		delete(m.lastHint, id)
		delete(m.lastPoll, id)
	}
	m.mu.Unlock()
	poke(m.wake)
}

// run keeps the subscriptions and takes notifications until ctx ends,
// then deletes every subscription it holds (bounded).
func (m *subManager) run(ctx context.Context) {
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		if err := m.o.Transport.Run(ctx, m.hint, m.resync); err != nil && ctx.Err() == nil {
			m.mu.Lock()
			m.why = "notification transport: " + err.Error()
			m.mu.Unlock()
			m.s.log.Warn("the notification transport stopped; commands are learned by polling", "transport", m.o.Transport.Name(), "err", err)
		}
	}()
	go func() { defer wg.Done(); m.hintLoop(ctx) }()
	m.loadHeld(ctx)
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		next := m.reconcile(ctx)
		m.flushHeld(ctx)
		wait := min(max(next.Sub(m.s.o.Now()), 10*time.Millisecond), time.Minute)
		timer.Reset(wait) // Go ≥ 1.23 timers: no stale tick after Reset
		select {
		case <-ctx.Done():
			wg.Wait()
			m.deleteAll()
			return
		case <-m.wake:
		case <-timer.C:
		}
	}
}

// subKey is what a subscription depends on: a change makes a new one.
func subKey(d *policy.Device) string {
	return strings.Join([]string{d.Broker, d.Type, d.Service, d.ServicePath, strings.Join(d.Writable, ","), d.Kind}, "\x00")
}

// probeBudget bounds the subscriptions made or renewed in one pass.
const probeBudget = 16

// reconcile brings the subscriptions in line with the policy in force:
// one per commandable device, renewed before it lapses, deleted when the
// device is gone. It returns when something is next due.
func (m *subManager) reconcile(ctx context.Context) time.Time {
	now := m.s.o.Now()
	next := now.Add(time.Minute)
	want := map[string]*policy.Device{}
	for _, d := range m.s.o.Policy.Current().Devices() {
		if d.Commandable() {
			want[d.ID] = d
		}
	}
	// Deletions first: a device that left the policy or changed.
	m.unsubscribeAll(ctx, m.take(func(id string, ds *devSub) bool {
		d := want[id]
		return d == nil || ds.gone || (ds.key != "" && ds.key != subKey(d))
	}))
	if !m.o.Transport.Live() {
		// Nothing could arrive: subscribe once it is up (resync wakes us).
		return next
	}
	ids := make([]string, 0, len(want))
	for id := range want {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	renewAt := m.o.Expires / 4
	budget := probeBudget
	for _, id := range ids {
		d := want[id]
		m.mu.Lock()
		ds := m.devs[id]
		if ds == nil {
			ds = &devSub{bo: backoff.New(m.o.ReprobeMin, m.o.ReprobeMax)}
			ds.bo.Now = m.s.o.Now
			m.devs[id] = ds
		}
		due := now
		switch {
		case ds.id != "" && ds.expires.Sub(now) > renewAt:
			due = ds.expires.Add(-renewAt)
		case now.Before(ds.next):
			due = ds.next
		}
		m.mu.Unlock()
		if due.After(now) {
			if due.Before(next) {
				next = due
			}
			continue
		}
		if budget == 0 || ctx.Err() != nil {
			return now // more is due: come back at once
		}
		budget--
		m.subscribe(ctx, d, ds, now)
		m.mu.Lock()
		due = ds.next
		if ds.id != "" {
			due = ds.expires.Add(-renewAt)
		}
		m.mu.Unlock()
		if due.Before(next) {
			next = due
		}
	}
	return next
}

// subscribe makes the device's subscription (or its renewal, then deletes
// the one it replaces).
func (m *subManager) subscribe(ctx context.Context, d *policy.Device, ds *devSub, now time.Time) {
	expires := now.Add(m.o.Expires).UTC().Truncate(time.Second)
	id, err := m.create(ctx, d, expires)
	m.mu.Lock()
	if err != nil {
		wait := ds.bo.Fail()
		ds.next = now.Add(wait)
		ds.why = err.Error()
		m.mu.Unlock()
		var refused errRefused
		m.s.count(func(st *Stats) {
			if errors.As(err, &refused) {
				st.ProbeRefused++
			} else {
				st.ProbeFailed++
			}
		})
		m.s.limited.Log(ctx, slog.LevelWarn, "subscribe:"+d.ID, "no Orion subscription for the actuator; learning its commands by polling",
			"device", d.ID, "err", err, "retry_in", wait.Round(time.Second))
		return
	}
	old := *ds
	ds.id, ds.expires, ds.key, ds.broker, ds.dev, ds.why, ds.next = id, expires, subKey(d), d.Broker, d, "", time.Time{}
	ds.bo.Reset()
	m.mu.Unlock()
	m.held[id] = heldSub{Device: d.ID, Broker: d.Broker, Service: d.Service, ServicePath: d.ServicePath, Expires: expires}
	m.heldDirty = true
	m.s.count(func(st *Stats) { st.Subscribed++ })
	if old.id == "" {
		m.s.log.Info("commands of the actuator are learned through an Orion subscription", "device", d.ID,
			"transport", m.o.Transport.Name(), "expires", expires)
	} else {
		m.unsubscribe(ctx, &old)
	}
}

// errRefused is a subscription the platform refused (4xx, 501): the
// filter or a deploy without subscriptions.
type errRefused struct{ msg string }

func (e errRefused) Error() string { return e.msg }

// create is POST {broker}/v2/subscriptions through the filter.
func (m *subManager) create(ctx context.Context, d *policy.Device, expires time.Time) (string, error) {
	ent := map[string]string{"id": d.ID}
	if d.Type != "" {
		ent["type"] = d.Type
	}
	subject := map[string]any{"entities": []any{ent}}
	if len(d.Writable) > 0 {
		// An actuator without a writable list takes commands on every
		// attribute but latitude/longitude (policy.Device.Writes); its
		// attributes are not known here, so any change notifies.
		subject["condition"] = map[string]any{"attrs": d.Writable}
	}
	notif := m.o.Transport.Target(d.ID)
	notif["attrs"] = []string{hintOnlyAttr}
	notif["attrsFormat"] = "normalized"
	// No throttling: Orion discards notifications inside the period
	// (orion-api.md "subscription"), which would lose a hint; hintLoop
	// limits the reads instead.
	body, err := json.Marshal(map[string]any{
		"description":  "edgegate " + m.s.o.Gateway + " command hints",
		"subject":      subject,
		"notification": notif,
		"expires":      expires.Format("2006-01-02T15:04:05.000Z"),
	})
	if err != nil {
		return "", err
	}
	u := strings.TrimRight(d.Broker, "/") + "/v2/subscriptions"
	resp, rbody, err := m.do(ctx, http.MethodPost, u, d, body)
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusCreated {
		return "", answerErr("POST /v2/subscriptions", resp.StatusCode, rbody)
	}
	// Location: /v2/subscriptions/{id} (orion-api.md); the filter passes
	// Orion's headers on (OrionController.proxyRequest returns Orion's
	// ResponseEntity).
	loc := resp.Header.Get("Location")
	id := path.Base(loc)
	if !strings.Contains(loc, "/v2/subscriptions/") || id == "" || len(id) > 64 || strings.ContainsAny(id, "?#/ ") {
		return "", fmt.Errorf("POST /v2/subscriptions: 201 without a usable Location header (%q)", clip(loc))
	}
	return id, nil
}

func clip(s string) string { return clipBody([]byte(s)) }

// answerErr classifies a non-success answer: 5xx and 429 are failures of
// the platform (tried again sooner), the rest refusals.
func answerErr(what string, status int, body []byte) error {
	if status >= 500 && status != http.StatusNotImplemented || status == http.StatusTooManyRequests {
		return fmt.Errorf("%s failed (%d): %s", what, status, clipBody(body))
	}
	return errRefused{fmt.Sprintf("%s refused (%d): %s", what, status, clipBody(body))}
}

// unsubscribe is DELETE {broker}/v2/subscriptions/{id}?elementid={device}
// (the filter needs an element the account may read). A 404 means it is
// gone already. Failures are logged: the subscription lapses at expires.
func (m *subManager) unsubscribe(ctx context.Context, ds *devSub) {
	if ds.dev == nil || ds.id == "" {
		return
	}
	u := strings.TrimRight(ds.broker, "/") + "/v2/subscriptions/" + url.PathEscape(ds.id) + "?elementid=" + url.QueryEscape(ds.dev.ID)
	resp, body, err := m.do(ctx, http.MethodDelete, u, ds.dev, nil)
	switch {
	case err != nil:
	case resp.StatusCode == http.StatusNoContent || resp.StatusCode == http.StatusOK || resp.StatusCode == http.StatusNotFound:
		m.s.count(func(st *Stats) { st.Unsubscribed++ })
		if _, ok := m.held[ds.id]; ok {
			delete(m.held, ds.id)
			m.heldDirty = true
		}
		return
	default:
		err = answerErr("DELETE /v2/subscriptions", resp.StatusCode, body)
	}
	m.s.limited.Log(ctx, slog.LevelWarn, "unsubscribe:"+ds.dev.ID, "could not delete the actuator's Orion subscription; it lapses when it expires",
		"device", ds.dev.ID, "expires", ds.expires, "err", err)
}

// deleteAll deletes every subscription held, on a clean stop: at most
// five seconds in all (what is left lapses at its expires).
func (m *subManager) deleteAll() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	m.unsubscribeAll(ctx, m.take(func(string, *devSub) bool { return true }))
	m.flushHeld(ctx)
}

// take removes the devices drop selects and returns those holding a
// subscription.
func (m *subManager) take(drop func(id string, ds *devSub) bool) []*devSub {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []*devSub
	for id, ds := range m.devs {
		if drop(id, ds) {
			if ds.id != "" {
				out = append(out, ds)
			}
			delete(m.devs, id)
		}
	}
	return out
}

func (m *subManager) unsubscribeAll(ctx context.Context, subs []*devSub) {
	for _, ds := range subs {
		if ctx.Err() != nil {
			return
		}
		m.unsubscribe(ctx, ds)
	}
}

// do sends one request through the filter with the account's token.
func (m *subManager) do(ctx context.Context, method, u string, d *policy.Device, body []byte) (*http.Response, []byte, error) {
	tok, err := m.s.o.Tokens.Token(ctx)
	if err != nil {
		return nil, nil, fmt.Errorf("access token: %w", err)
	}
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, u, rd)
	if err != nil {
		return nil, nil, err
	}
	req.Header.Set("Authorization", "Bearer "+tok)
	req.Header.Set("Accept", "application/json")
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if d.Service != "" {
		req.Header.Set("Fiware-Service", d.Service)
	}
	if d.ServicePath != "" {
		req.Header.Set("Fiware-ServicePath", d.ServicePath)
	}
	resp, err := m.s.o.HTTPClient.Do(req)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err // no URL: it names the broker only, but keep logs short
		}
		return nil, nil, fmt.Errorf("%s subscription: %w", method, err)
	}
	defer resp.Body.Close()
	rb, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if err != nil {
		return nil, nil, fmt.Errorf("%s subscription: %w", method, err)
	}
	if resp.StatusCode == http.StatusUnauthorized && bytes.Contains(rb, []byte("access token is not valid")) {
		m.s.o.Tokens.Invalidate(tok)
	}
	return resp, rb, nil
}

// hint takes one notification in: its entity ids name devices to read
// again. Nothing else of it is used. A body that does not parse, or names
// no commandable device of the policy, is counted and ignored.
func (m *subManager) hint(body []byte) {
	m.s.count(func(st *Stats) { st.Notifications++ })
	ids, ok := notifiedIDs(body)
	pol := m.s.o.Policy.Current()
	n := 0
	m.mu.Lock()
	for _, id := range ids {
		if d, ok := pol.Device(id); ok && d.Commandable() {
			m.hints[id] = true
			n++
		}
	}
	m.mu.Unlock()
	if !ok || n == 0 {
		m.s.count(func(st *Stats) { st.NotifyIgnored++ })
		return
	}
	poke(m.hintWake)
}

// notifiedIDs reads the entity ids of an Orion notification:
// {"subscriptionId": …, "data": [{"id": …, "type": …}, …]}, or one
// entity (the simplified formats). Values are never read.
func notifiedIDs(body []byte) ([]string, bool) {
	if len(body) > maxNotifyBytes {
		return nil, false
	}
	var n struct {
		Data []struct {
			ID string `json:"id"`
		} `json:"data"`
		ID string `json:"id"`
	}
	if json.Unmarshal(body, &n) != nil {
		return nil, false
	}
	var ids []string
	if n.ID != "" {
		ids = append(ids, n.ID)
	}
	for _, e := range n.Data {
		if e.ID != "" && !slices.Contains(ids, e.ID) {
			ids = append(ids, e.ID)
		}
		if len(ids) >= maxNotifyEntities {
			break
		}
	}
	return ids, len(ids) > 0
}

// resync hints every commandable device (the transport (re)connected:
// notifications may have been missed meanwhile) and re-checks the
// subscriptions.
func (m *subManager) resync() {
	m.mu.Lock()
	for _, d := range m.s.o.Policy.Current().Devices() {
		if d.Commandable() {
			m.hints[d.ID] = true
		}
	}
	m.mu.Unlock()
	poke(m.hintWake)
	poke(m.wake)
}

// hintLoop reads hinted devices through the filter: each at most once per
// HintInterval, any two at least HintSpacing apart. A hint that arrives
// meanwhile is merged with the one pending.
func (m *subManager) hintLoop(ctx context.Context) {
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		now := m.s.o.Now()
		var id string
		wait := time.Hour
		m.mu.Lock()
		for h := range m.hints {
			if d := m.o.HintInterval - now.Sub(m.lastHint[h]); d > 0 {
				wait = min(wait, d)
				continue
			}
			id = h
			break
		}
		if id != "" {
			delete(m.hints, id)
			m.lastHint[id] = now
		}
		m.mu.Unlock()
		if id != "" {
			m.read(ctx, id, now)
			wait = m.o.HintSpacing
		}
		timer.Reset(wait) // Go ≥ 1.23 timers: no stale tick after Reset
		select {
		case <-ctx.Done():
			return
		case <-m.hintWake:
			if id != "" {
				// Keep the spacing even when woken.
				select {
				case <-ctx.Done():
					return
				case <-timer.C:
				}
			}
		case <-timer.C:
		}
	}
}

// read is one hinted read of a device's entity, as a poll does.
func (m *subManager) read(ctx context.Context, id string, now time.Time) {
	d, ok := m.s.o.Policy.Current().Device(id)
	if !ok || !d.Commandable() {
		return
	}
	before := m.s.Stats().Learned
	err := m.s.poll(ctx, d)
	m.s.count(func(st *Stats) {
		st.Hints++
		if err != nil {
			st.PollErrors++
		}
	})
	if err != nil {
		m.s.limited.Log(ctx, slog.LevelWarn, "hint:"+id, "could not read the actuator's entity after a notification", "device", id, "err", err)
		return
	}
	m.polled(id, now)
	if m.s.Stats().Learned != before {
		m.s.Nudge()
	}
}
