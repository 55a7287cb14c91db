package mqtt

import (
	"context"
	"log/slog"
	"time"

	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// Sessions and wills of the embedded broker (documented in README.md):
//
//   - A client id belongs to the principal (device, or application user)
//     whose session holds it. Another principal presenting it while that
//     session exists (connected, or kept for a clean-session=0 client) is
//     refused with CONNACK "identifier rejected" (3.1.1 return code 0x02,
//     MQTT 5 reason 0x85): it never takes over the session, its
//     subscriptions or its in-flight messages. The same principal resumes
//     its session as MQTT specifies, and the messages in flight it resumes
//     are checked again against the policy in force.
//   - A client id held by no principal (the broker's own inline client)
//     cannot be used at all.
//   - A will is a publish: at CONNECT it must pass the publish rule (a
//     device's will goes to its own device topic only; applications publish
//     nothing, so they may not leave a will). A CONNECT whose will breaks
//     the rule is refused with CONNACK "not authorized" (0x05; MQTT 5
//     0x87), not accepted with its will silently dropped, so a
//     misconfigured client learns it at once.
//   - The broker keeps the will itself (mochi never sees it) and checks it
//     again when it is due: the will of a device revoked or re-registered
//     since (its session closed by the policy change) is dropped. It is
//     delivered like any publish, each subscriber checked at delivery; it
//     is not a reading (it is not queued or forwarded). MQTT 5 Will Delay
//     is honoured up to the session expiry; a new connection of the same
//     session cancels a pending will [MQTT-3.1.3-9].

// Refusal reasons of sessions and wills (metric label values).
const (
	denyWillTopic    = "will_not_own_topic"
	denyWillRevoked  = "will_device_revoked"
	denyClientID     = "client_id_in_use"
	denyInflightGone = "inflight_not_readable"
)

// heldWill is a will the broker took from mochi at CONNECT.
type heldWill struct {
	topic   string
	payload []byte
	retain  bool
	qos     byte
	delay   time.Duration
}

// key names a principal for session ownership.
func (p *principal) key() string {
	if p.device != "" {
		return "d:" + p.device
	}
	return "u:" + p.user
}

// mayWill applies the publish rule to a will topic.
func (h *accessHook) mayWill(p *principal, topic string) bool {
	if p.device == "" {
		return false
	}
	dev, ok := h.topic.Match(topic)
	return ok && dev == p.device
}

// admit runs once a client is authenticated as p, before mochi looks up
// its session: it binds the client id to p and takes the will. false means
// the connection was refused (the CONNACK is already written for a refusal
// that is not "not authorized").
func (h *accessHook) admit(cl *mochi.Client, pk packets.Packet, p *principal) bool {
	if pk.Connect.WillFlag && !h.mayWill(p, pk.Connect.WillTopic) {
		reason := denyWillTopic
		if p.device == "" {
			reason = denyAppPublish
		}
		h.deny("will", reason, p.String(), "topic", clipName(pk.Connect.WillTopic))
		if cl.Properties.ProtocolVersion == 5 {
			h.refuse(cl, packets.ErrNotAuthorized) // 0x87
		}
		return false // mochi answers 3.1.1 with CONNACK 0x05 not authorized
	}
	// The session of the id, if any: one mochi holds, or one being
	// established by a connection authenticated a moment ago (claims), so
	// that two principals connecting at once cannot share it.
	h.mu.Lock()
	claim := h.claims[cl.ID]
	existing, exists := h.srvClient(cl.ID)
	taken := (exists || (claim != nil && !claim.Closed())) && h.owners[cl.ID] != p.key()
	if !taken {
		h.owners[cl.ID] = p.key()
		h.claims[cl.ID] = cl
	}
	h.mu.Unlock()
	if taken {
		h.deny("connect", denyClientID, p.String(), "client", clipName(cl.ID))
		h.refuse(cl, packets.ErrClientIdentifierNotValid)
		return false
	}
	if exists {
		h.recheckInflight(existing, p)
	}
	var w *heldWill
	if pk.Connect.WillFlag {
		w = &heldWill{topic: pk.Connect.WillTopic, payload: pk.Connect.WillPayload,
			retain: pk.Connect.WillRetain, qos: pk.Connect.WillQos}
		if cl.Properties.ProtocolVersion == 5 {
			// The will waits for its delay, but not past the session.
			d := pk.Connect.WillProperties.WillDelayInterval
			if exp := pk.Properties.SessionExpiryInterval; exp < d {
				d = exp
			}
			w.delay = time.Duration(d) * time.Second
		}
		// mochi would publish the will without any check; the broker
		// sends it itself (sendWill).
		cl.Properties.Will = mochi.Will{}
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if pw, ok := h.delayed[cl.ID]; ok && pw.p.key() == p.key() { // [MQTT-3.1.3-9]
		pw.t.Stop()
		delete(h.delayed, cl.ID)
	}
	h.principals[cl] = p
	if w != nil {
		h.wills[cl] = w
	}
	return true
}

// OnSessionEstablished: mochi holds the session now; the claim ends.
func (h *accessHook) OnSessionEstablished(cl *mochi.Client, _ packets.Packet) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.claims[cl.ID] == cl {
		delete(h.claims, cl.ID)
	}
}

// refuse writes a CONNACK refusal and ends the connection, so that mochi's
// own CONNACK (it answers a failed authentication with "not authorized")
// is never written.
func (h *accessHook) refuse(cl *mochi.Client, code packets.Code) {
	if h.srv != nil {
		_ = h.srv.SendConnack(cl, code, false, nil)
	}
	cl.Stop(code)
}

// recheckInflight drops, from a session being resumed, the messages in
// flight to it that its principal may no longer read.
func (h *accessHook) recheckInflight(existing *mochi.Client, p *principal) {
	for _, pk := range existing.State.Inflight.GetAll(false) {
		if pk.FixedHeader.Type != packets.Publish || h.mayRead(p, pk.TopicName) {
			continue
		}
		existing.State.Inflight.Delete(pk.PacketID)
		h.deny("deliver", denyInflightGone, p.String(), "topic", clipName(pk.TopicName))
	}
}

// mayRead is the delivery rule for a concrete topic, without counting.
func (h *accessHook) mayRead(p *principal, topic string) bool {
	if dev, ok := h.topic.MatchCommand(topic); ok {
		// A command topic is delivered to its device only.
		return p.device != "" && dev == p.device
	}
	dev, ok := h.topic.Match(topic)
	if !ok {
		return false
	}
	if p.device != "" {
		return dev == p.device
	}
	if !p.expires.IsZero() && h.now().After(p.expires) {
		return false
	}
	return h.pol.Current().MayRead(p.user, p.groups, dev)
}

// disconnected is called by OnDisconnect: it sends the client's will when
// it is due and forgets the session when it ends.
func (h *accessHook) disconnected(cl *mochi.Client, err error, expire bool) {
	h.mu.Lock()
	p := h.principals[cl]
	delete(h.principals, cl)
	w := h.wills[cl]
	delete(h.wills, cl)
	if h.claims[cl.ID] == cl {
		delete(h.claims, cl.ID)
	}
	// The id's owner is forgotten only when no other connection holds or
	// is establishing its session: a same-principal reconnect can claim
	// the id before mochi replaces this client in its list, and dropping
	// the owner then refused that principal's next connection with 0x02
	// (seen in FuzzBrokerPackets, whose check client reconnects each run).
	if claim := h.claims[cl.ID]; expire && !cl.IsTakenOver() && h.owners[cl.ID] != "" && (claim == nil || claim.Closed()) {
		if cur, ok := h.srvClient(cl.ID); !ok || cur == cl {
			delete(h.owners, cl.ID)
		}
	}
	h.mu.Unlock()
	if w == nil || p == nil || !willDue(cl, err) {
		return
	}
	if w.delay <= 0 {
		h.sendWill(p, w)
		return
	}
	if cl.IsTakenOver() {
		return // the session goes on in a new connection [MQTT-3.1.3-9]
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.stopped {
		return
	}
	id := cl.ID
	pw := &pendingWill{p: p}
	pw.t = time.AfterFunc(w.delay, func() {
		h.mu.Lock()
		cur, ok := h.delayed[id]
		if ok && cur == pw {
			delete(h.delayed, id)
		}
		h.mu.Unlock()
		if ok && cur == pw {
			h.sendWill(p, w)
		}
	})
	h.delayed[id] = pw
}

// pendingWill is a will waiting for its delay.
type pendingWill struct {
	t *time.Timer
	p *principal
}

func (h *accessHook) srvClient(id string) (*mochi.Client, bool) {
	if h.srv == nil {
		return nil, false
	}
	return h.srv.Clients.Get(id)
}

// willDue: a will is sent unless the client ended with a normal DISCONNECT
// [MQTT-3.1.2-10]. MQTT 5's DISCONNECT 0x04 ("with will") comes back from
// mochi as an error, so it is due.
func willDue(cl *mochi.Client, err error) bool {
	if err != nil {
		return true
	}
	c, ok := cl.StopCause().(packets.Code)
	return !ok || c.Code != packets.CodeDisconnect.Code
}

// sendWill publishes a will after checking it again against the policy in
// force: the device must still be registered and its session must not
// have been closed by a policy change.
func (h *accessHook) sendWill(p *principal, w *heldWill) {
	h.mu.Lock()
	stopped := h.stopped
	h.mu.Unlock()
	if stopped || h.srv == nil {
		return
	}
	if _, ok := h.pol.Current().Device(p.device); !ok || p.revoked.Load() {
		h.deny("will", denyWillRevoked, p.String(), "topic", clipName(w.topic))
		return
	}
	if !h.mayWill(p, w.topic) {
		h.deny("will", denyWillTopic, p.String(), "topic", clipName(w.topic))
		return
	}
	// Through the inline client: no publish check (done above), each
	// subscriber checked at delivery (OnACLCheck).
	if err := h.srv.Publish(w.topic, w.payload, w.retain, w.qos); err != nil {
		h.limited.Log(context.Background(), slog.LevelWarn, "will/"+p.device, "will not published", "device", p.device, "err", err)
	}
}

// revokeDevices marks the sessions of devices whose registration ended or
// changed: their wills are never sent, now or after a delay, and readings
// taken before (generation) are not delivered locally after.
func (h *accessHook) revokeDevices(set map[string]bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for d := range set {
		h.gens[d]++
	}
	for _, p := range h.principals {
		if set[p.device] {
			p.revoked.Store(true)
		}
	}
	for _, pw := range h.delayed {
		if set[pw.p.device] {
			pw.p.revoked.Store(true)
		}
	}
}

// Stop is called by mochi when the broker closes: wills still waiting for
// their delay are not sent.
func (h *accessHook) Stop() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.stopped = true
	for id, pw := range h.delayed {
		pw.t.Stop()
		delete(h.delayed, id)
	}
	return nil
}

// OnClientExpired forgets the owner of an expired session.
func (h *accessHook) OnClientExpired(cl *mochi.Client) {
	h.mu.Lock()
	defer h.mu.Unlock()
	delete(h.owners, cl.ID)
}

// generation counts the registration changes of a device seen by the
// broker: a reading taken under one generation and committed under another
// is acknowledged but not delivered to local subscribers (nor retained),
// since it was collected under the old registration.
func (h *accessHook) generation(device string) uint64 {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.gens[device]
}
