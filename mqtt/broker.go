package mqtt

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"
	"golang.org/x/sync/semaphore"

	"github.com/edgegate/edgegate/internal/logx"
	"github.com/edgegate/edgegate/internal/metrics"
	"github.com/edgegate/edgegate/internal/pipeline"
	"github.com/edgegate/edgegate/internal/reading"
)

// Submitter is what the MQTT link needs of the pipeline.
type Submitter interface {
	Submit(ctx context.Context, msg pipeline.Message) (pipeline.Outcome, error)
}

// BrokerOptions configures the embedded broker.
type BrokerOptions struct {
	Listen    string      // plain listener, loopback host:port (port 0 picks one); empty: none
	TLSListen string      // TLS listener for the local network; empty: none
	TLS       *tls.Config // the gateway's certificate, for TLSListen
	Topic     Topic
	Policy    Policy        // who may log in, publish and read
	Tokens    TokenVerifier // application access tokens; nil refuses applications
	Metrics   *metrics.Metrics
	Logger    *slog.Logger
	// SubmitTimeout bounds one attempt to queue a reading (default 30s).
	SubmitTimeout time.Duration
	// RetryInterval is the wait between attempts while the queue refuses
	// (disk quota) — the reading is held unacknowledged meanwhile.
	RetryInterval time.Duration
	// DeviceRate paces each device (readings per second, 0: unlimited)
	// with a burst of DeviceBurst; a device over its rate waits.
	DeviceRate  float64
	DeviceBurst int
	// MaxClients bounds concurrent connections (0: 256).
	MaxClients int
	// Limits bounds what one device or application user may take of the
	// broker (zero fields: DefaultLimits).
	Limits Limits
	// OnDeny, when set, is told of every access refusal (the audit log).
	OnDeny func(action, reason, who string)
	// Now is the wall clock for token expiry (default time.Now).
	Now func() time.Time
	// InflightBytes bounds the payload bytes of all the readings handed
	// to the queue and not yet acknowledged, across every connection
	// (0: DefaultInflightBytes). Past it a publishing connection waits
	// (is not read) until commits free some: backpressure, not buffering.
	// One connection holds at most an inflightShares-th of it (and at
	// least one reading of the largest size), so that one device sending
	// large payloads cannot take the whole budget from the others.
	InflightBytes int64
}

// inflightShares: one connection's share of BrokerOptions.InflightBytes
// is 1/inflightShares of it. The budget is a FIFO semaphore: without a
// share, a device keeping Limits.Inflight (64) publishes of 256 KiB in
// flight took all of the 8 MiB, and the next reading of every other
// device waited behind its next large one (TestBrokerInflightShare).
// An eighth (1 MiB by default) is ~3,500 readings of 300 bytes per
// connection, far above what any device's window holds.
const inflightShares = 8

// DefaultInflightBytes is the default of BrokerOptions.InflightBytes.
// Limits.Inflight (64) readings per connection of up to
// reading.MaxPayloadBytes (256 KiB) each would let 50 devices hold 800 MB
// waiting for the disk; 8 MiB is ~27,000 readings of 300 bytes, far more
// than group commit takes at once (store.max_batch), so it only ever holds
// back large payloads.
const DefaultInflightBytes = 8 << 20

// inflightCost is what a held reading counts against InflightBytes: its
// payload (cloned) and the inflight record around it.
func inflightCost(payload []byte) int64 { return int64(len(payload)) + 512 }

// Broker is the MQTT broker embedded in the daemon.
type Broker struct {
	srv    *mochi.Server
	tcp    *listeners.TCP
	tlsL   *listeners.TCP
	hook   *ingestHook
	access *accessHook
	caps   *capsHook
	log    *slog.Logger
}

// NewBroker builds the embedded broker; Run starts it.
func NewBroker(sub Submitter, opts BrokerOptions) (*Broker, error) {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if opts.SubmitTimeout <= 0 {
		opts.SubmitTimeout = 30 * time.Second
	}
	if opts.RetryInterval <= 0 {
		opts.RetryInterval = time.Second
	}
	if opts.InflightBytes <= 0 {
		opts.InflightBytes = DefaultInflightBytes
	}
	lim := opts.Limits.withDefaults()
	caps := mochi.NewDefaultServerCapabilities()
	// A reading's payload is bounded; the packet adds topic and headers.
	caps.MaximumPacketSize = uint32(reading.MaxPayloadBytes + 64<<10)
	// Bounds how many readings one client may have waiting for the disk,
	// and the QoS 1 deliveries stored for one client.
	caps.ReceiveMaximum = uint16(lim.Inflight)
	caps.MaximumInflight = uint16(lim.Inflight)
	// Each client's outbound queue is allocated at this size, and a slow
	// reader holds up to this many messages (payloads up to 256 KiB).
	caps.MaximumClientWritesPending = int32(lim.WritesPending)
	// The broker keeps no session state across restarts; don't promise more.
	caps.MaximumSessionExpiryInterval = 24 * 60 * 60
	if opts.MaxClients <= 0 {
		opts.MaxClients = 256
	}
	caps.MaximumClients = int64(opts.MaxClients)
	srv := mochi.New(&mochi.Options{
		Capabilities: caps,
		// $SYS is read by no one: OnACLCheck refuses every filter outside
		// the device topic tree (access.go). mochi would still rebuild and
		// retain its 20 $SYS topics every second (publishSysTopics,
		// server.go of mochi-mqtt/server v2.7.9), with a stop-the-world
		// runtime.ReadMemStats each time; once a day is enough.
		SysTopicResendInterval: 24 * 60 * 60,
		// The inline client publishes pipelined readings to local
		// subscribers once they are committed.
		InlineClient: true,
		// mochi logs every refused login and dropped connection at warn
		// level, unthrottled; the access hook logs refusals itself,
		// rate-limited, so mochi keeps errors only.
		Logger: slog.New(minLevel{log.Handler(), slog.LevelError}).With("component", "mqtt-broker"),
	})
	hook := &ingestHook{sub: sub, topic: opts.Topic, log: log, timeout: opts.SubmitTimeout, retry: opts.RetryInterval,
		ackers: map[*mochi.Client]*acker{}, qos2: map[string]map[uint16]*inflight{},
		limited: logx.NewLimiter(log, 10*time.Second), pace: newDeviceLimiter(opts.DeviceRate, opts.DeviceBurst, time.Now),
		held: semaphore.NewWeighted(opts.InflightBytes), heldMax: opts.InflightBytes,
		connMax: max(opts.InflightBytes/inflightShares, inflightCost(nil)+reading.MaxPayloadBytes)}
	hook.ctx, hook.cancel = context.WithCancel(context.Background())
	if st, ok := sub.(Starter); ok {
		hook.starter, hook.srv = st, srv
	}
	if opts.Policy == nil {
		return nil, errors.New("embedded broker: no policy for access control")
	}
	access := newAccessHook(opts.Policy, opts.Tokens, opts.Topic, log.With("component", "mqtt-access"), opts.Metrics)
	access.onDeny = opts.OnDeny
	access.srv = srv
	hook.deny, hook.generation = access.deny, access.generation
	if opts.Now != nil {
		access.now = opts.Now
	}
	capsH := newCapsHook(lim, srv, opts.Topic, log.With("component", "mqtt-limits"), opts.Metrics)
	capsH.onDeny = opts.OnDeny
	// Order matters: the access decision (with the connection limits
	// after it), then the other limits, then the ingest, so that a
	// refusal stops the chain before a reading is queued.
	if err := srv.AddHook(&gate{accessHook: access, caps: capsH}, nil); err != nil {
		return nil, fmt.Errorf("add access hook: %w", err)
	}
	if err := srv.AddHook(capsH, nil); err != nil {
		return nil, fmt.Errorf("add limits hook: %w", err)
	}
	if err := srv.AddHook(hook, nil); err != nil {
		return nil, fmt.Errorf("add ingest hook: %w", err)
	}
	b := &Broker{srv: srv, hook: hook, access: access, caps: capsH, log: log}
	if opts.Listen != "" {
		b.tcp = listeners.NewTCP(listeners.Config{ID: "local", Address: opts.Listen})
		if err := srv.AddListener(&capListener{TCP: b.tcp, caps: capsH}); err != nil {
			return nil, fmt.Errorf("listen on %s: %w", opts.Listen, err)
		}
	}
	if opts.TLSListen != "" {
		if opts.TLS == nil {
			return nil, errors.New("embedded broker: TLS listener without a certificate")
		}
		b.tlsL = listeners.NewTCP(listeners.Config{ID: "tls", Address: opts.TLSListen, TLSConfig: opts.TLS})
		if err := srv.AddListener(&capListener{TCP: b.tlsL, caps: capsH}); err != nil {
			_ = srv.Close()
			return nil, fmt.Errorf("listen (TLS) on %s: %w", opts.TLSListen, err)
		}
	}
	if b.tcp == nil && b.tlsL == nil {
		return nil, errors.New("embedded broker: no listener configured")
	}
	return b, nil
}

// Addr is the address of the plain (loopback) listener, or "".
func (b *Broker) Addr() string {
	if b.tcp == nil {
		return ""
	}
	return b.tcp.Address()
}

// TLSAddr is the address of the TLS listener, or "".
func (b *Broker) TLSAddr() string {
	if b.tlsL == nil {
		return ""
	}
	return b.tlsL.Address()
}

// CloseDeviceSessions disconnects the sessions of the given devices (revoked,
// or re-registered with other keys) at once.
func (b *Broker) CloseDeviceSessions(devices []string) int {
	if len(devices) == 0 {
		return 0
	}
	set := make(map[string]bool, len(devices))
	for _, d := range devices {
		set[d] = true
	}
	b.access.revokeDevices(set) // their wills are never sent
	n := 0
	for _, cl := range b.access.sessions(func(p *principal) bool { return set[p.device] }) {
		_ = b.srv.DisconnectClient(cl, packets.ErrNotAuthorized)
		b.log.Info("closed the session of a revoked device", "client", clipName(cl.ID))
		n++
	}
	return n
}

// closeExpired disconnects applications whose token expired.
func (b *Broker) closeExpired() {
	now := b.access.now()
	for _, cl := range b.access.sessions(func(p *principal) bool {
		return p.user != "" && !p.expires.IsZero() && now.After(p.expires)
	}) {
		_ = b.srv.DisconnectClient(cl, packets.ErrNotAuthorized)
	}
}

// Run serves until ctx is done, then stops accepting, ends the held
// publishes (unacknowledged, so their senders keep them) and closes every
// connection. ready, when set, is called once the broker accepts clients.
func (b *Broker) Run(ctx context.Context, ready func()) error {
	if err := b.srv.Serve(); err != nil {
		return fmt.Errorf("serve MQTT: %w", err)
	}
	b.log.Info("local MQTT broker listening", "plain", b.Addr(), "tls", b.TLSAddr())
	if ready != nil {
		ready()
	}
	tick := time.NewTicker(5 * time.Second)
	defer tick.Stop()
	for done := false; !done; {
		select {
		case <-ctx.Done():
			done = true
		case t := <-tick.C:
			b.closeExpired()
			b.caps.reconcile(t)
		}
	}
	b.hook.cancel()
	err := CloseServer(b.srv, "local", "tls")
	// Readings handed to the queue are resolved before the queue stops.
	if !b.hook.stopAckers(b.hook.timeout + 5*time.Second) {
		b.log.Error("readings still being committed when the broker stopped; they stay unacknowledged")
	}
	if err != nil {
		return fmt.Errorf("close MQTT broker: %w", err)
	}
	return nil
}

// ingestHook queues readings synchronously, before the broker acknowledges
// the publish to the device.
type ingestHook struct {
	mochi.HookBase
	sub     Submitter
	topic   Topic
	log     *slog.Logger
	timeout time.Duration
	retry   time.Duration
	limited *logx.Limiter
	pace    *deviceLimiter
	ctx     context.Context // cancelled when the broker stops
	cancel  context.CancelFunc

	starter Starter       // nil: every publish is queued synchronously
	srv     *mochi.Server // local delivery of pipelined readings
	mu      sync.Mutex
	ackers  map[*mochi.Client]*acker
	qos2    map[string]map[uint16]*inflight               // held QoS 2 packet ids, by client id (qos2.go)
	deny    func(action, reason, who string, args ...any) // counted refusals (the access hook's)
	// generation of a device's registration (access hook): a reading is
	// delivered locally only under the one it was taken under.
	generation func(device string) uint64
	wg         sync.WaitGroup
	// held bounds the payload bytes of pipelined readings not yet settled
	// (BrokerOptions.InflightBytes, heldMax).
	held    *semaphore.Weighted
	heldMax int64
	// connMax is one connection's share of heldMax (inflightShares): each
	// acker has a semaphore of that size.
	connMax int64
}

func (h *ingestHook) ID() string { return "edgegate-ingest" }

func (h *ingestHook) Provides(b byte) bool {
	return bytes.Contains([]byte{mochi.OnPublish, mochi.OnDisconnect, mochi.OnPacketRead, mochi.OnSessionEstablish}, []byte{b})
}

// OnPublish runs on the publishing client's goroutine, before its PUBACK.
func (h *ingestHook) OnPublish(cl *mochi.Client, pk packets.Packet) (packets.Packet, error) {
	if cl.Net.Inline {
		return pk, nil // our own delivery of a reading already queued
	}
	device, ok := h.topic.Match(pk.TopicName)
	if !ok {
		return pk, nil
	}
	if err := h.pace.wait(h.ctx, device); err != nil {
		return pk, packets.ErrRejectPacket // shutting down: no PUBACK, the device resends
	}
	msg := pipeline.Message{
		Device:   device,
		Source:   reading.Source{Kind: "mqtt", Topic: pk.TopicName},
		Payload:  pk.Payload,
		Received: time.Now(),
	}
	if h.starter != nil && pk.FixedHeader.Qos > 0 {
		// Pipelined: hand it over in arrival order; the connection's acker
		// sends the PUBACK (and delivers it locally) once it is synced.
		// No copy of the payload: mochi decodes each packet from a buffer
		// of its own, never reused (ReadPacket, clients.go of
		// mochi-mqtt/server v2.7.9: "a fresh copy of the bytes"), and a
		// rejected packet is not touched again.
		it := &inflight{topic: pk.TopicName, payload: msg.Payload, retain: pk.FixedHeader.Retain,
			id: pk.PacketID, qos: pk.FixedHeader.Qos, msg: msg}
		if h.generation != nil {
			it.gen = h.generation(device)
		}
		if it.qos == 2 { // qos2.go
			it.done = make(chan struct{})
			first, full := h.qos2Receive(cl, it)
			if full {
				// Closed once the publishes before it are acknowledged.
				if a := h.ackerFor(cl); a.overflow.CompareAndSwap(false, true) {
					a.push(&inflight{overflow: device})
				}
				return pk, packets.ErrRejectPacket
			}
			if first != nil {
				h.ackerFor(cl).push(&inflight{id: it.id, qos: 2, dupOf: first})
				return pk, packets.ErrRejectPacket
			}
		}
		// Memory: wait (this connection is not read meanwhile, so the
		// device waits for its PUBACKs) until the readings held across
		// all connections leave room for this one. mochi itself holds
		// nothing more per publish: it reads the next packet only after
		// this hook returns.
		// First this connection's share, then the budget of all: a
		// connection past its share waits on its own semaphore, not in
		// the queue every connection waits in.
		a := h.ackerFor(cl)
		own := min(inflightCost(msg.Payload), h.connMax)
		cost := min(inflightCost(msg.Payload), h.heldMax)
		err := a.own.Acquire(h.ctx, own)
		if err == nil {
			if err = h.held.Acquire(h.ctx, cost); err != nil {
				a.own.Release(own)
			}
		}
		if err != nil {
			if it.qos == 2 {
				h.qos2Failed(cl, it)
			}
			it.finish(false)
			return pk, packets.ErrRejectPacket // shutting down: no PUBACK, the device resends
		}
		it.own, it.ownCost = a.own, own
		it.ctx, it.cancel = context.WithTimeout(context.WithoutCancel(h.ctx), h.timeout)
		// Released once the reading is settled (after its PUBACK) or given
		// up (settled). Not with context.AfterFunc on it.ctx: that started
		// a goroutine per reading, 4 % of the daemon's CPU at 1,500
		// readings/s (docs/bench/profiles/mochi-before-paced.top.txt).
		it.cost = cost
		it.wait = h.starter.Start(it.ctx, msg)
		if !a.push(it) {
			h.settled(it)
			if it.qos == 2 {
				h.qos2Failed(cl, it)
			}
			it.finish(false)
		}
		return pk, packets.ErrRejectPacket
	}
	out, err := h.submit(msg)
	if out, err = h.hold(cl, msg, out, err); err != nil {
		return pk, packets.ErrRejectPacket // no PUBACK: the device resends it
	}
	if out == pipeline.Refused || out == pipeline.Duplicate {
		// Acknowledged so the device does not resend it forever, but
		// not delivered to local subscribers.
		return pk, packets.CodeSuccessIgnore
	}
	return pk, nil
}

// settled ends a pipelined publish's wait and returns its bytes to the
// InflightBytes budget: once per pipelined publish, from the acker's
// settle or after a failed push. A push never races the acker's end on
// a disconnect: mochi calls OnDisconnect on the connection's own
// goroutine once its reads end (attachClient, server.go of
// mochi-mqtt/server v2.7.9), the one that runs OnPublish. Only
// stopAckers, at shutdown, may strand a publish pushed at that moment
// (unacknowledged, so the device resends it); the budget is moot then.
func (h *ingestHook) settled(it *inflight) {
	it.cancel()
	h.held.Release(it.cost)
	if it.own != nil {
		it.own.Release(it.ownCost)
	}
}

// submit makes one attempt to queue msg. An attempt in progress finishes
// even during shutdown, so that what is committed gets its PUBACK; only
// the waiting between attempts stops.
func (h *ingestHook) submit(msg pipeline.Message) (pipeline.Outcome, error) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(h.ctx), h.timeout)
	defer cancel()
	return h.sub.Submit(ctx, msg)
}

// hold takes the outcome of a first attempt to queue msg; while it was not
// queued (disk quota, shutting down), it holds the reading unacknowledged
// and tries again every retry interval, as the device cannot be told to
// slow down. It returns the first settled outcome, or the last error once
// the broker stops or the connection closes.
func (h *ingestHook) hold(cl *mochi.Client, msg pipeline.Message, out pipeline.Outcome, err error) (pipeline.Outcome, error) {
	for err != nil {
		h.limited.Log(h.ctx, slog.LevelWarn, "hold", "reading not queued; holding it unacknowledged", "device", msg.Device, "err", err)
		t := time.NewTimer(h.retry)
		select {
		case <-h.ctx.Done():
			t.Stop()
			return 0, err
		case <-t.C:
		}
		if cl.Closed() {
			return 0, err
		}
		out, err = h.submit(msg)
	}
	return out, nil
}

// minLevel drops records below a level.
type minLevel struct {
	slog.Handler
	min slog.Level
}

func (m minLevel) Enabled(ctx context.Context, l slog.Level) bool {
	return l >= m.min && m.Handler.Enabled(ctx, l)
}

func (m minLevel) WithAttrs(a []slog.Attr) slog.Handler {
	return minLevel{m.Handler.WithAttrs(a), m.min}
}
func (m minLevel) WithGroup(g string) slog.Handler { return minLevel{m.Handler.WithGroup(g), m.min} }
