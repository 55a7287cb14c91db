package mqtt

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/edgegate/edgegate/internal/logx"
	"github.com/edgegate/edgegate/internal/metrics"
)

// Limits bounds what one principal (a device, or an application user) can
// take of the embedded broker, so that a flood from one never locks out
// another and the daemon's memory stays bounded (issue 17, item 3). A zero
// field takes its default (DefaultLimits).
//
// Memory, with the defaults and max_clients 256: retained messages 1 MiB;
// wills 256 x 4 KiB; subscriptions 64 per session, 8 sessions per user
// (kept ones included); outbound queues 64 messages per client;
// connections that never send CONNECT 128, each closed after 10 s; QoS 1
// deliveries stored for kept sessions 256 KiB each. make soak-hostile
// measures the floods.
type Limits struct {
	// ConnectionsPerDevice and ConnectionsPerUser bound the sessions of one
	// device / one application user (connected, or kept after a
	// disconnect for a clean=false client): a further login of a principal
	// with that many connected is refused (CONNACK 0x03 in 3.1.1, 0x97
	// quota exceeded in 5); kept sessions beyond the bound are ended,
	// oldest first.
	ConnectionsPerDevice int
	ConnectionsPerUser   int
	// SubscriptionsPerClient bounds one client's subscriptions and
	// FiltersPerSubscribe the filters of one SUBSCRIBE; a filter past
	// either is refused in the SUBACK (0x80 in 3.1.1, 0x8F in 5).
	SubscriptionsPerClient int
	FiltersPerSubscribe    int
	// Inflight is the server's receive maximum announced to MQTT 5
	// clients (QoS 1 publishes a client may have unacknowledged) and the
	// number of QoS 1 deliveries stored for a client that has not
	// acknowledged them (past it mochi drops them: server.go
	// publishToClient). With the pipelined ingest the connection's acker
	// holds at most its window (acker.go) and then stops reading the
	// connection; without it, mochi disconnects a client past this.
	Inflight int
	// WritesPending bounds the messages queued to one slow client; past
	// it, deliveries to that client are dropped (and counted).
	WritesPending int
	// KeptSessionBytes bounds the payloads of the QoS 1 deliveries a kept
	// (disconnected, clean=false) session stores for its client's return;
	// past it further deliveries to that session are dropped.
	KeptSessionBytes int
	// RetainedBytes bounds all retained messages (topic + payload),
	// RetainedBytesPerPrincipal those one principal published, and
	// RetainedMessages their number. A publish or will over a bound is
	// delivered but not retained.
	RetainedBytes             int64
	RetainedBytesPerPrincipal int64
	RetainedMessages          int
	// WillBytes bounds a will's payload; a CONNECT with a larger one is
	// refused (CONNACK 0x03 in 3.1.1, 0x95 packet too large in 5).
	WillBytes int
	// AppPacketBytes bounds any packet an application sends (they only
	// subscribe); a larger one ends its connection.
	AppPacketBytes int
	// ConnectTimeout closes a connection that has not sent its CONNECT
	// (TLS handshake included) in time.
	ConnectTimeout time.Duration
	// PendingConnects bounds connections that have not sent CONNECT yet,
	// PendingConnectsPerHost those from one remote address; a connection
	// past either is closed at once.
	PendingConnects        int
	PendingConnectsPerHost int
	// MaxKeepalive replaces a keep-alive of 0 (none) or above it: a client
	// silent for 1.5 times its keep-alive is disconnected (mochi, MQTT
	// 3.1.1 §3.1.2.10); MQTT 5 clients are told in the CONNACK.
	MaxKeepalive time.Duration
}

// DefaultLimits are the limits of a stock configuration.
func DefaultLimits() Limits {
	return Limits{
		ConnectionsPerDevice: 4, ConnectionsPerUser: 8,
		SubscriptionsPerClient: 64, FiltersPerSubscribe: 16,
		Inflight: 64, WritesPending: 64, KeptSessionBytes: 256 << 10,
		RetainedBytes: 1 << 20, RetainedBytesPerPrincipal: 64 << 10, RetainedMessages: 4096,
		WillBytes: 4 << 10, AppPacketBytes: 64 << 10,
		ConnectTimeout: 10 * time.Second, PendingConnects: 128, PendingConnectsPerHost: 16,
		MaxKeepalive: 10 * time.Minute,
	}
}

func (l Limits) withDefaults() Limits {
	d := DefaultLimits()
	def := func(v *int, dv int) {
		if *v <= 0 {
			*v = dv
		}
	}
	def(&l.ConnectionsPerDevice, d.ConnectionsPerDevice)
	def(&l.ConnectionsPerUser, d.ConnectionsPerUser)
	def(&l.SubscriptionsPerClient, d.SubscriptionsPerClient)
	def(&l.FiltersPerSubscribe, d.FiltersPerSubscribe)
	def(&l.Inflight, d.Inflight)
	def(&l.WritesPending, d.WritesPending)
	def(&l.KeptSessionBytes, d.KeptSessionBytes)
	def(&l.RetainedMessages, d.RetainedMessages)
	def(&l.WillBytes, d.WillBytes)
	def(&l.AppPacketBytes, d.AppPacketBytes)
	def(&l.PendingConnects, d.PendingConnects)
	def(&l.PendingConnectsPerHost, d.PendingConnectsPerHost)
	if l.RetainedBytes <= 0 {
		l.RetainedBytes = d.RetainedBytes
	}
	if l.RetainedBytesPerPrincipal <= 0 {
		l.RetainedBytesPerPrincipal = d.RetainedBytesPerPrincipal
	}
	if l.ConnectTimeout <= 0 {
		l.ConnectTimeout = d.ConnectTimeout
	}
	if l.MaxKeepalive < time.Second {
		l.MaxKeepalive = d.MaxKeepalive
	}
	// Keep-alive is 16 bits of seconds; mochi computes 1.5x of it in 16
	// bits too (clients.go refreshDeadline), so stay below 65535/1.5.
	l.MaxKeepalive = min(l.MaxKeepalive, 43690*time.Second)
	l.Inflight = min(l.Inflight, 65535)
	return l
}

// Limit names (values of the metric label limit).
const (
	limitConnsDevice     = "connections_per_device"
	limitConnsUser       = "connections_per_user"
	limitSessions        = "sessions_per_principal"
	limitSubscriptions   = "subscriptions_per_client"
	limitFilters         = "filters_per_subscribe"
	limitInflight        = "inflight"
	limitWritesPending   = "writes_pending"
	limitKeptBytes       = "kept_session_bytes"
	limitRetainedBytes   = "retained_bytes"
	limitRetainedPrinc   = "retained_bytes_per_principal"
	limitRetainedCount   = "retained_messages"
	limitWillBytes       = "will_bytes"
	limitAppPacket       = "app_packet_bytes"
	limitConnectTimeout  = "connect_timeout"
	limitPending         = "pending_connects"
	limitPendingPerHost  = "pending_connects_per_host"
	limitKeepalive       = "keepalive"
	refusedFilter        = "#/refused" // invalid (MQTT-4.7.1-2): mochi refuses it in the SUBACK
	gatewayPrincipal     = "gateway"
	principalDevicePrefx = "device:"
)

// capsHook enforces Limits. It runs after the access hook has told who a
// client is (gate.OnConnectAuthenticate hands it the principal) and
// before the ingest hook, so a refusal here stops the chain.
type capsHook struct {
	mochi.HookBase
	lim     Limits
	srv     *mochi.Server
	topic   Topic
	m       *metrics.Metrics
	limited *logx.Limiter
	onDeny  func(action, reason, who string)

	mu       sync.Mutex
	owner    map[*mochi.Client]*member             // admitted clients (connected or kept) -> principal
	sessions map[string]map[*mochi.Client]struct{} // principal key -> its clients
	retained map[string]retainedEntry              // topic -> what it holds
	retBytes int64                                 // sum of retained sizes
	retBy    map[string]int64                      // principal key -> its retained bytes

	pmu       sync.Mutex
	pending   int
	pendingBy map[string]int
	conns     map[*pendingConn]struct{}
}

// member is an admitted client's principal. It is kept until the
// client's own OnDisconnect has run (its will is sent just before), even
// when the client no longer counts against its principal.
type member struct {
	key  string
	gone bool // OnDisconnect has run: a kept (clean=false) session
}

type retainedEntry struct {
	size   int64
	owner  string
	booked time.Time // when a publish booked it, before mochi stored it
}

func newCapsHook(lim Limits, srv *mochi.Server, topic Topic, log *slog.Logger, m *metrics.Metrics) *capsHook {
	return &capsHook{
		lim: lim.withDefaults(), srv: srv, topic: topic, m: m,
		limited:   logx.NewLimiter(log, 30*time.Second),
		owner:     map[*mochi.Client]*member{},
		sessions:  map[string]map[*mochi.Client]struct{}{},
		retained:  map[string]retainedEntry{},
		retBy:     map[string]int64{},
		pendingBy: map[string]int{},
		conns:     map[*pendingConn]struct{}{},
	}
}

func (h *capsHook) ID() string { return "edgegate-caps" }

func (h *capsHook) Provides(b byte) bool {
	switch b {
	case mochi.OnConnect, mochi.OnDisconnect, mochi.OnClientExpired, mochi.OnPacketRead,
		mochi.OnSubscribe, mochi.OnPublish, mochi.OnPublishDropped, mochi.OnQosPublish,
		mochi.OnRetainMessage, mochi.OnRetainedExpired:
		return true
	}
	return false
}

// hit counts a limit reached and logs it (and tells the audit), at most
// once per 30 s per limit and principal.
func (h *capsHook) hit(limit, who string, args ...any) {
	if h.m != nil {
		h.m.LimitHits.WithLabelValues(limit).Inc()
	}
	if h.limited.Log(context.Background(), slog.LevelWarn, limit+"/"+who, "local MQTT limit reached",
		append([]any{"limit", limit, "who", who}, args...)...) && h.onDeny != nil {
		h.onDeny("limit", limit, who)
	}
}

func principalKey(p *principal) string {
	if p == nil {
		return ""
	}
	if p.device != "" {
		return principalDevicePrefx + p.device
	}
	return "user:" + p.user
}

// who renders a principal key for logs (ids clipped: they come from outside).
func who(key string) string { return clipName(key) }

// admit decides whether an authenticated client may have a session; on a
// refusal it returns the limit and the CONNACK code. Sessions the principal
// keeps beyond its bound are ended (oldest first) to make room.
func (h *capsHook) admit(cl *mochi.Client, key string, pk packets.Packet) (string, packets.Code, bool) {
	v5 := cl.Properties.ProtocolVersion == 5
	refuse := func(v5code packets.Code) packets.Code {
		if v5 {
			return v5code
		}
		return packets.ErrServerUnavailable // 3.1.1 has no finer code (§3.2.2.3): 0x03
	}
	if pk.Connect.WillFlag && len(pk.Connect.WillPayload) > h.lim.WillBytes {
		return limitWillBytes, refuse(packets.ErrPacketTooLarge), false
	}
	limit, bound := limitConnsUser, h.lim.ConnectionsPerUser
	if strings.HasPrefix(key, principalDevicePrefx) {
		limit, bound = limitConnsDevice, h.lim.ConnectionsPerDevice
	}
	h.mu.Lock()
	var live int
	var kept []*mochi.Client
	for c := range h.sessions[key] {
		switch {
		case c.ID == cl.ID:
			// The same principal resuming its own client id: mochi takes
			// the old session over (server.go inheritClientSession), so
			// it does not count.
		case !c.Closed():
			live++
		default:
			if cur, ok := h.srv.Clients.Get(c.ID); ok && cur == c {
				kept = append(kept, c)
			} else {
				h.uncountLocked(c) // expired or taken over
			}
		}
	}
	if live >= bound {
		h.mu.Unlock()
		return limit, refuse(packets.ErrQuotaExceeded), false
	}
	var evict []*mochi.Client
	if over := live + len(kept) + 1 - bound; over > 0 {
		slices.SortFunc(kept, func(a, b *mochi.Client) int { return int(a.StopTime() - b.StopTime()) })
		evict = kept[:over]
		for _, c := range evict {
			h.uncountLocked(c)
		}
	}
	h.owner[cl] = &member{key: key}
	if h.sessions[key] == nil {
		h.sessions[key] = map[*mochi.Client]struct{}{}
	}
	h.sessions[key][cl] = struct{}{}
	h.mu.Unlock()
	for _, c := range evict {
		h.endSession(c)
		h.hit(limitSessions, who(key))
	}
	return "", packets.CodeSuccess, true
}

// endSession ends a kept (disconnected) session as its expiry would
// (server.go clearExpiredClients), also dropping its subscriptions and
// stored deliveries.
func (h *capsHook) endSession(cl *mochi.Client) {
	if cur, ok := h.srv.Clients.Get(cl.ID); !ok || cur != cl {
		return
	}
	h.srv.Clients.Delete(cl.ID)
	h.srv.UnsubscribeClient(cl)
	cl.ClearInflights()
}

// uncountLocked stops counting cl against its principal; its principal
// is forgotten too once its OnDisconnect has run.
func (h *capsHook) uncountLocked(cl *mochi.Client) {
	m, ok := h.owner[cl]
	if !ok {
		return
	}
	if s := h.sessions[m.key]; s != nil {
		delete(s, cl)
		if len(s) == 0 {
			delete(h.sessions, m.key)
		}
	}
	if m.gone {
		delete(h.owner, cl)
	}
}

func (h *capsHook) counted(cl *mochi.Client) bool {
	m, ok := h.owner[cl]
	if !ok {
		return false
	}
	_, in := h.sessions[m.key][cl]
	return in
}

func (h *capsHook) forgetLocked(cl *mochi.Client) {
	if m, ok := h.owner[cl]; ok {
		m.gone = true
		h.uncountLocked(cl)
	}
}

func (h *capsHook) forget(cl *mochi.Client) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.forgetLocked(cl)
}

func (h *capsHook) keyOf(cl *mochi.Client) string {
	h.mu.Lock()
	defer h.mu.Unlock()
	if m, ok := h.owner[cl]; ok {
		return m.key
	}
	return ""
}

// refuseConnect answers a refused CONNECT with code and closes the
// connection, so that mochi's own answer for a failed authentication
// (bad user name or password) is never written: a device told its
// password is wrong might give up for good.
func (h *capsHook) refuseConnect(cl *mochi.Client, code packets.Code) {
	_ = h.srv.SendConnack(cl, code, false, nil)
	cl.Stop(code)
}

// OnConnect runs once CONNECT is read, before authentication.
func (h *capsHook) OnConnect(cl *mochi.Client, _ packets.Packet) error {
	if pc, ok := cl.Net.Conn.(*pendingConn); ok {
		pc.connected()
	}
	if cl.Net.Inline {
		return nil
	}
	maxKA := uint16(h.lim.MaxKeepalive / time.Second)
	if ka := cl.State.Keepalive; ka == 0 || ka > maxKA {
		// mochi sets the read deadline from this right after the
		// OnConnect hooks (server.go attachClient) and tells MQTT 5
		// clients in the CONNACK (ServerKeepAlive).
		cl.State.Keepalive = maxKA
		cl.State.ServerKeepalive = true
		h.hit(limitKeepalive, clipName(string(cl.Properties.Username)), "asked", ka, "granted", maxKA)
	}
	// A delayed will is held by client id for up to the session expiry
	// (server.go sendLWT, willDelayed), outside any session a principal
	// can be bounded by: a will is published at disconnect instead.
	cl.Properties.Will.WillDelayInterval = 0
	return nil
}

func (h *capsHook) OnDisconnect(cl *mochi.Client, err error, expire bool) {
	if cl.Net.Inline {
		return
	}
	if errors.Is(cl.StopCause(), packets.ErrReceiveMaximum) {
		h.hit(limitInflight, who(h.keyOf(cl)))
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	m, ok := h.owner[cl]
	switch {
	case !ok:
	case expire || !h.counted(cl):
		h.forgetLocked(cl)
	default:
		// A kept session stays counted until it expires, is resumed or
		// is ended to make room (admit).
		m.gone = true
	}
}

func (h *capsHook) OnClientExpired(cl *mochi.Client) { h.forget(cl) }

// OnPacketRead bounds what an application may send: it only subscribes.
func (h *capsHook) OnPacketRead(cl *mochi.Client, pk packets.Packet) (packets.Packet, error) {
	if cl.Net.Inline || pk.FixedHeader.Type == packets.Connect {
		return pk, nil
	}
	key := h.keyOf(cl)
	if key == "" || strings.HasPrefix(key, principalDevicePrefx) {
		return pk, nil
	}
	if pk.FixedHeader.Remaining > h.lim.AppPacketBytes {
		h.hit(limitAppPacket, who(key), "bytes", pk.FixedHeader.Remaining)
		_ = h.srv.DisconnectClient(cl, packets.ErrPacketTooLarge)
		return pk, packets.ErrRejectPacket // ends the connection (clients.go Read)
	}
	return pk, nil
}

// OnSubscribe refuses the filters past the per-packet and per-client
// bounds; the others proceed to the access check.
func (h *capsHook) OnSubscribe(cl *mochi.Client, pk packets.Packet) packets.Packet {
	if cl.Net.Inline {
		return pk
	}
	key := who(h.keyOf(cl))
	filters := slices.Clone(pk.Filters)
	have := cl.State.Subscriptions.Len()
	seen := map[string]bool{}
	for i := range filters {
		f := filters[i].Filter
		var limit string
		if _, ok := cl.State.Subscriptions.Get(f); ok || seen[f] {
			if i < h.lim.FiltersPerSubscribe {
				continue // a re-subscription replaces, takes nothing
			}
		}
		switch {
		case i >= h.lim.FiltersPerSubscribe:
			limit = limitFilters
		case have >= h.lim.SubscriptionsPerClient:
			limit = limitSubscriptions
		default:
			have++
			seen[f] = true
			continue
		}
		filters[i].Filter = refusedFilter
		h.hit(limit, key, "filter", clipName(f))
	}
	pk.Filters = filters
	return pk
}

// OnPublish keeps a retained publish within the retained bounds; over
// them it is delivered (and ingested) but not retained. It runs before the
// ingest hook, which retains (or not) what it is handed.
func (h *capsHook) OnPublish(cl *mochi.Client, pk packets.Packet) (packets.Packet, error) {
	if !pk.FixedHeader.Retain || len(pk.Payload) == 0 {
		return pk, nil
	}
	key := h.keyOf(cl)
	if cl.Net.Inline {
		// The broker's own publishes: a device's will (which the access
		// hook holds and sends itself, session.go) or a reading delivered
		// after its commit. A device topic's retained bytes are its
		// device's; anything else the gateway's own.
		dev, isDev := h.topic.Match(pk.TopicName)
		if !isDev {
			return pk, nil
		}
		key = principalDevicePrefx + dev
	}
	if limit := h.reserveRetained(pk.TopicName, key, len(pk.Payload)); limit != "" {
		pk.FixedHeader.Retain = false
		h.hit(limit, who(key), "topic", clipName(pk.TopicName))
	}
	return pk, nil
}

// reserveRetained books size bytes of retained payload on topic for owner,
// replacing what the topic held, or returns the limit that refuses it.
// Booking before mochi stores it keeps concurrent publishers from
// overshooting; a booking whose reading is later refused by the pipeline
// (so never stored) stays counted until the topic is retained again:
// conservative.
func (h *capsHook) reserveRetained(topic, owner string, payload int) string {
	if owner == "" {
		owner = gatewayPrincipal
	}
	size := int64(len(topic) + payload)
	h.mu.Lock()
	defer h.mu.Unlock()
	old, had := h.retained[topic]
	total := h.retBytes - old.size + size
	mine := h.retBy[owner] + size
	if had && old.owner == owner {
		mine -= old.size
	}
	switch {
	case !had && len(h.retained) >= h.lim.RetainedMessages:
		return limitRetainedCount
	case mine > h.lim.RetainedBytesPerPrincipal:
		return limitRetainedPrinc
	case total > h.lim.RetainedBytes:
		return limitRetainedBytes
	}
	h.setRetainedLocked(topic, retainedEntry{size: size, owner: owner, booked: time.Now()})
	return ""
}

// bookingGrace is how long a booking may wait for mochi to store the
// message: a pipelined reading is stored once committed (SubmitTimeout at
// most, 30 s by default).
const bookingGrace = 2 * time.Minute

// reconcile brings the books in line with what mochi holds: bookings of
// readings the pipeline refused (never stored) and retained messages
// removed without a hook (mochi's store edited directly, say when a device
// is revoked) stop counting. Called periodically (Broker.Run).
func (h *capsHook) reconcile(now time.Time) {
	stored := h.srv.Topics.Retained.GetAll()
	h.mu.Lock()
	defer h.mu.Unlock()
	for topic, e := range h.retained {
		pk, ok := stored[topic]
		switch {
		case ok:
			if size := int64(len(topic) + len(pk.Payload)); size != e.size && now.Sub(e.booked) > bookingGrace {
				e.size, e.booked = size, time.Time{}
				h.setRetainedLocked(topic, e)
			}
		case now.Sub(e.booked) > bookingGrace:
			h.setRetainedLocked(topic, retainedEntry{})
		}
	}
}

func (h *capsHook) setRetainedLocked(topic string, e retainedEntry) {
	if old, ok := h.retained[topic]; ok {
		h.retBytes -= old.size
		if h.retBy[old.owner] -= old.size; h.retBy[old.owner] <= 0 {
			delete(h.retBy, old.owner)
		}
		delete(h.retained, topic)
	}
	if e.size > 0 {
		h.retained[topic] = e
		h.retBytes += e.size
		h.retBy[e.owner] += e.size
	}
}

// OnRetainMessage settles the books with what mochi stored (r < 0 or an
// empty payload: the topic's retained message was cleared).
func (h *capsHook) OnRetainMessage(cl *mochi.Client, pk packets.Packet, r int64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(pk.Payload) == 0 || r < 0 {
		h.setRetainedLocked(pk.TopicName, retainedEntry{})
		return
	}
	e, ok := h.retained[pk.TopicName]
	if !ok {
		// Not booked (the pipelined re-publication of a reading after a
		// restart of the books, say): a device topic belongs to its device.
		if m, ok := h.owner[cl]; ok {
			e.owner = m.key
		}
		if dev, isDev := h.topic.Match(pk.TopicName); isDev {
			e.owner = principalDevicePrefx + dev
		}
		if e.owner == "" {
			e.owner = gatewayPrincipal
		}
	}
	e.size, e.booked = int64(len(pk.TopicName)+len(pk.Payload)), time.Time{}
	h.setRetainedLocked(pk.TopicName, e)
}

func (h *capsHook) OnRetainedExpired(topic string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.setRetainedLocked(topic, retainedEntry{})
}

// OnPublishDropped: a delivery to a client with WritesPending messages
// already queued was dropped (server.go publishToClient).
func (h *capsHook) OnPublishDropped(cl *mochi.Client, _ packets.Packet) {
	h.hit(limitWritesPending, who(h.keyOf(cl)))
}

// OnQosPublish bounds what a kept session stores: mochi stores QoS 1
// deliveries for a disconnected clean=false client up to Inflight
// messages, whatever their size (server.go publishToClient, which calls
// this once the delivery is stored and then, for a disconnected client,
// stops).
func (h *capsHook) OnQosPublish(cl *mochi.Client, pk packets.Packet, _ int64, _ int) {
	if cl.Net.Inline || !cl.Closed() || pk.FixedHeader.Type != packets.Publish {
		return
	}
	total := 0
	for _, p := range cl.State.Inflight.GetAll(false) {
		total += len(p.Payload)
	}
	if total > h.lim.KeptSessionBytes && cl.State.Inflight.Delete(pk.PacketID) {
		h.hit(limitKeptBytes, who(h.keyOf(cl)))
	}
}

// retainedUsage reports the books (for tests and the soak).
func (h *capsHook) retainedUsage() (bytes int64, messages int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.retBytes, len(h.retained)
}

// gate is the access hook with the connection limits applied after its
// authentication: mochi accepts a client as soon as one hook authenticates
// it (hooks.go OnConnectAuthenticate), so a separate hook could not refuse
// after the access hook said yes.
type gate struct {
	*accessHook
	caps *capsHook
}

func (g *gate) OnConnectAuthenticate(cl *mochi.Client, pk packets.Packet) bool {
	if !g.accessHook.OnConnectAuthenticate(cl, pk) {
		return false
	}
	if cl.Net.Inline {
		return true
	}
	key := principalKey(g.accessHook.get(cl))
	if key == "" {
		return true // the access hook keeps no principal for it: nothing to bound
	}
	limit, code, ok := g.caps.admit(cl, key, pk)
	if ok {
		return true
	}
	// Forget the principal the access hook just recorded: mochi calls no
	// OnDisconnect for a refused login.
	g.accessHook.OnDisconnect(cl, code, true)
	g.caps.hit(limit, who(key), "remote", cl.Net.Remote)
	g.caps.refuseConnect(cl, code)
	return false
}

// capListener closes connections that do not send CONNECT in time and
// bounds how many may be waiting for theirs; mochi reads the CONNECT with
// no deadline (server.go readConnectionPacket).
type capListener struct {
	*listeners.TCP
	caps *capsHook
}

func (l *capListener) Serve(establish listeners.EstablishFn) {
	l.TCP.Serve(func(id string, c net.Conn) error { return l.caps.establish(id, c, establish) })
}

// Close also closes the connections still waiting for their CONNECT,
// which mochi does not know of yet.
func (l *capListener) Close(closeClients listeners.CloseFn) {
	l.TCP.Close(closeClients)
	l.caps.closePending()
}

func (h *capsHook) establish(id string, c net.Conn, next listeners.EstablishFn) error {
	host, _, err := net.SplitHostPort(c.RemoteAddr().String())
	if err != nil {
		host = c.RemoteAddr().String()
	}
	h.pmu.Lock()
	limit := ""
	switch {
	case h.pending >= h.lim.PendingConnects:
		limit = limitPending
	case h.pendingBy[host] >= h.lim.PendingConnectsPerHost:
		limit = limitPendingPerHost
	}
	if limit != "" {
		h.pmu.Unlock()
		h.hit(limit, host)
		_ = c.Close()
		return nil
	}
	pc := &pendingConn{Conn: c, h: h, host: host}
	h.pending++
	h.pendingBy[host]++
	h.conns[pc] = struct{}{}
	h.pmu.Unlock()
	defer pc.connected()
	// Covers the TLS handshake (done on the first read) and the CONNECT;
	// mochi replaces the deadline from the keep-alive once CONNECT is read.
	_ = c.SetReadDeadline(time.Now().Add(h.lim.ConnectTimeout))
	err = next(id, pc)
	if !pc.wasConnected() && errors.Is(err, os.ErrDeadlineExceeded) {
		h.hit(limitConnectTimeout, host)
	}
	return err
}

func (h *capsHook) closePending() {
	h.pmu.Lock()
	conns := make([]*pendingConn, 0, len(h.conns))
	for pc := range h.conns {
		conns = append(conns, pc)
	}
	h.pmu.Unlock()
	for _, pc := range conns {
		_ = pc.Conn.Close()
	}
}

// pendingCount reports the connections waiting for their CONNECT.
func (h *capsHook) pendingCount() int {
	h.pmu.Lock()
	defer h.pmu.Unlock()
	return h.pending
}

// pendingConn is a connection counted as waiting for its CONNECT until
// OnConnect (or its end).
type pendingConn struct {
	net.Conn
	h    *capsHook
	host string
	once sync.Once
	done bool // under h.pmu
}

func (pc *pendingConn) connected() {
	pc.once.Do(func() {
		h := pc.h
		h.pmu.Lock()
		defer h.pmu.Unlock()
		pc.done = true
		h.pending--
		if h.pendingBy[pc.host]--; h.pendingBy[pc.host] <= 0 {
			delete(h.pendingBy, pc.host)
		}
		delete(h.conns, pc)
	})
}

func (pc *pendingConn) wasConnected() bool {
	pc.h.pmu.Lock()
	defer pc.h.pmu.Unlock()
	return pc.done
}
