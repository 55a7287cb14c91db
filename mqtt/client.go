package mqtt

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"golang.org/x/sync/semaphore"

	"github.com/edgegate/edgegate/internal/logx"
	"github.com/edgegate/edgegate/internal/metrics"
	"github.com/edgegate/edgegate/internal/pipeline"
	"github.com/edgegate/edgegate/internal/reading"
)

// ClientOptions configures the ingest client for an external broker.
type ClientOptions struct {
	URL      string // tls://host:8883, or tcp:// on loopback
	ClientID string // fixed: the persistent session is keyed by it
	Username string
	Password string
	TLS      *tls.Config
	Topic    Topic
	// Inflight is how many readings are held unacknowledged at once
	// (default DefaultClientInflight). Match the broker's window for this
	// client (Mosquitto's max_inflight_messages).
	Inflight int
	// InflightBytes bounds the payload bytes of those readings (default
	// DefaultInflightBytes): past it paho's router waits, so the client
	// reads no more from the broker until commits free room.
	InflightBytes int64
	Keepalive     time.Duration // MQTT keepalive
	Logger        *slog.Logger
	// SubmitTimeout bounds one attempt to queue a reading (default 30s).
	SubmitTimeout time.Duration
	// RetryInterval is the wait between attempts while the queue refuses.
	RetryInterval time.Duration
	// OnConnect, when set, is called after every (re)connection and
	// subscription; tests and readiness use it.
	OnConnect func()
	// Metrics counts retained copies skipped (AccessDenied{deliver,retained}).
	Metrics *metrics.Metrics
	// OnAck, when set, is told of every PUBACK the client releases, in the
	// order it releases them (tests assert the §4.6 order with it).
	OnAck func(topic string, payload []byte)
}

// Client ingests readings from an external broker through paho, with a
// persistent session and manual acknowledgement: a reading is PUBACKed only
// once the pipeline settled it, so the broker keeps everything else.
type Client struct {
	sub     Submitter
	opts    ClientOptions
	log     *slog.Logger
	limited *logx.Limiter

	ctx    context.Context // cancelled when Run is stopping
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu    sync.Mutex
	lanes map[string]chan *ackSlot // per device, in arrival order

	seq acks // PUBACKs released in arrival order

	// Pipelined ingest, when the Submitter is a Starter (the pipeline):
	// dispatch starts each reading in arrival order and one settler
	// waits for their commits in that order (see dispatch).
	starter  Starter
	inflight chan *started
	held     *semaphore.Weighted // InflightBytes of the started readings
	settler  sync.Once

	live       atomic.Bool   // connected and subscribed right now
	conn       atomic.Value  // the paho.Client of Run, for the downlink (mosquitto_command.go)
	cmds       heldCommands  // command topics holding a retained command
	subscribed chan struct{} // closed at the first subscription
	subOnce    sync.Once
}

// NewClient builds the ingest client; Run connects it.
func NewClient(sub Submitter, opts ClientOptions) *Client {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With("component", "mqtt-ingest")
	if opts.Inflight <= 0 {
		opts.Inflight = DefaultClientInflight
	}
	if opts.InflightBytes <= 0 {
		opts.InflightBytes = DefaultInflightBytes
	}
	if opts.Keepalive <= 0 {
		opts.Keepalive = 30 * time.Second
	}
	if opts.SubmitTimeout <= 0 {
		opts.SubmitTimeout = 30 * time.Second
	}
	if opts.RetryInterval <= 0 {
		opts.RetryInterval = time.Second
	}
	c := &Client{sub: sub, opts: opts, log: log, limited: logx.NewLimiter(log, 10*time.Second),
		lanes: map[string]chan *ackSlot{}, subscribed: make(chan struct{})}
	c.seq.onAck = opts.OnAck
	c.ctx, c.cancel = context.WithCancel(context.Background())
	if st, ok := sub.(Starter); ok {
		c.starter = st
		c.inflight = make(chan *started, opts.Inflight)
		c.held = semaphore.NewWeighted(opts.InflightBytes)
	}
	return c
}

// DefaultClientInflight is the default of ClientOptions.Inflight
// (mqtt.external.inflight), and the max_inflight_messages of the
// packaged Mosquitto configuration.
//
// A reading is acknowledged once its group commit is synced, so the
// broker's window for the gateway's session bounds how many readings
// one commit can share: with 64, a burst through Mosquitto committed
// batches of at most 64 readings (a sync, a badger write and their
// wake-ups each), and the syncs alone were 12 % of the daemon's CPU
// (docs/performance.md). 512 readings of ~300 bytes are ~150 KB held; the
// InflightBytes budget bounds the worst case (large payloads).
const DefaultClientInflight = 512

// started is a reading handed to the pipeline, waiting for its commit.
type started struct {
	sl     *ackSlot
	device string
	msg    pipeline.Message
	wait   pipeline.Pending
	ctx    context.Context
	cancel context.CancelFunc
	cost   int64 // its share of InflightBytes, released once settled
}

// waitToken bounds every paho wait, then reports the token's error.
func waitToken(t paho.Token, d time.Duration) error {
	if !t.WaitTimeout(d) {
		return errors.New("timed out")
	}
	return t.Error()
}

// Run connects (retrying until it succeeds or ctx ends), ingests until ctx
// is done, lets the readings being queued finish and be acknowledged, then
// disconnects.
func (c *Client) Run(ctx context.Context) error {
	filter := c.opts.Topic.Filter()
	po := paho.NewClientOptions().
		AddBroker(c.opts.URL).
		SetClientID(c.opts.ClientID).
		SetCleanSession(false).
		SetAutoAckDisabled(true).
		// paho hands messages over in arrival order; dispatch keeps each
		// device's order through its own lane while devices proceed in
		// parallel.
		SetOrderMatters(true).
		// No ResumeSubs: we subscribe on every connection (OnConnect). With
		// it, paho's resume() resends our stored SUBSCRIBE under the same
		// packet id and completes our token before any SUBACK (claimID), so
		// "subscribed" came before the broker had the subscription, and the
		// readings published in between were lost on a first start.
		SetResumeSubs(false).
		SetAutoReconnect(true).
		SetConnectRetry(true).
		SetConnectRetryInterval(2 * time.Second).
		// paho doubles its reconnect wait and does not reset it after a
		// healthy session (the chaos suite saw 1, 1, 2, 4, 8 s across
		// Mosquitto restarts): keep the ceiling low, a local broker is
		// cheap to retry.
		SetMaxReconnectInterval(5 * time.Second).
		SetKeepAlive(c.opts.Keepalive).
		SetPingTimeout(10 * time.Second).
		SetConnectTimeout(10 * time.Second).
		SetWriteTimeout(10 * time.Second).
		SetMessageChannelDepth(uint(c.opts.Inflight)).
		// PUBACKs released together go out in one write (coalesce.go).
		SetCustomOpenConnectionFn(openCoalesced)
	if c.opts.TLS != nil {
		po.SetTLSConfig(c.opts.TLS)
	}
	if c.opts.Username != "" {
		po.SetUsername(c.opts.Username)
		po.SetPassword(c.opts.Password)
	}
	// Messages of the persistent session can arrive before Subscribe
	// returns; the default handler takes them.
	po.SetDefaultPublishHandler(c.dispatch)
	po.SetOnConnectHandler(func(cl paho.Client) {
		// Subscribe on every connection: harmless with a kept session, and
		// required on the first one or after the broker lost its state.
		go c.subscribe(cl, filter)
	})
	po.SetConnectionLostHandler(func(_ paho.Client, err error) {
		c.live.Store(false)
		c.limited.Log(c.ctx, slog.LevelWarn, "lost", "connection to the local broker lost; reconnecting", "err", err)
	})
	cl := paho.NewClient(po)
	c.conn.Store(cl)
	// With ConnectRetry, Connect returns a token that completes once
	// connected; no wait needed here: ctx decides how long we try.
	cl.Connect()
	<-ctx.Done()
	c.mu.Lock()
	c.cancel()
	c.mu.Unlock()
	done := make(chan struct{})
	go func() { c.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(c.opts.SubmitTimeout + 5*time.Second):
		c.log.Error("readings still being queued at shutdown; they stay unacknowledged")
	}
	// The quiesce lets the PUBACKs of the last readings go out.
	c.live.Store(false)
	cl.Disconnect(500)
	return nil
}

// subscribe holds the ingest subscription on this connection, retrying
// while the broker refuses it (SUBACK 0x80: an ACL, a dynsec role not
// granted yet) or does not answer. It never disconnects: paho does not
// reconnect after Disconnect, which would end ingest for good.
func (c *Client) subscribe(cl paho.Client, filter string) {
	for cl.IsConnectionOpen() && c.ctx.Err() == nil {
		tok := cl.Subscribe(filter, 1, c.dispatch)
		err := waitToken(tok, 10*time.Second)
		if st, ok := tok.(*paho.SubscribeToken); ok && err == nil {
			if code, acked := st.Result()[filter]; !acked {
				err = errors.New("no SUBACK for the filter")
			} else if code >= 0x80 {
				err = errors.New("refused by the broker (SUBACK 0x80): the account may not read the device topics")
			}
		}
		if err == nil {
			c.log.Info("subscribed to the local broker", "url", c.opts.URL, "filter", filter)
			c.live.Store(true)
			c.subOnce.Do(func() { close(c.subscribed) })
			if c.opts.OnConnect != nil {
				c.opts.OnConnect()
			}
			return
		}
		c.limited.Log(c.ctx, slog.LevelError, "subscribe", "subscribe failed; readings are not taken in; retrying", "filter", filter, "err", err)
		select {
		case <-c.ctx.Done():
		case <-time.After(2 * time.Second):
		}
	}
}

// Subscribed is closed once the client first holds its subscription: from
// then on the broker keeps every reading for it (persistent session), so
// the daemon may say it is ready. Before it, on a first start, a broker
// has no session for us and drops what devices publish (MQTT 3.1.1 §3.1.2.4).
func (c *Client) Subscribed() <-chan struct{} { return c.subscribed }

// Live reports whether the client is connected and subscribed now.
func (c *Client) Live() bool { return c.live.Load() }

// dispatch runs on paho's router, in arrival order: it hands the message to
// its device's lane and returns at once. How many messages wait in lanes is
// bounded by the broker's in-flight window for this client (Mosquitto's
// max_inflight_messages): the broker sends no more until we acknowledge.
func (c *Client) dispatch(_ paho.Client, m paho.Message) {
	if c.ctx.Err() != nil {
		return // shutting down: not acknowledged, the broker redelivers
	}
	device, ok := c.opts.Topic.Match(m.Topic())
	if ok && m.Retained() {
		// A broker sets RETAIN only on the stored copy it sends for a new
		// subscription (MQTT 3.1.1 §3.3.1.3); live forwards carry RETAIN=0.
		// With our persistent session the live copy was taken in when it was
		// published, and the stored one may date from another owner or a
		// revoked registration (issue 17): it is acknowledged, not ingested.
		if c.opts.Metrics != nil {
			c.opts.Metrics.AccessDenied.WithLabelValues("deliver", "retained").Inc()
		}
		c.limited.Log(c.ctx, slog.LevelInfo, "retained", "retained copy from the broker not ingested", "device", clipName(device))
		c.seq.done(c.seq.add(m), true)
		return
	}
	if !ok {
		// Not a reading topic (a broad subscription elsewhere): nothing to
		// keep, but its PUBACK still takes its turn.
		c.seq.done(c.seq.add(m), true)
		return
	}
	if c.starter != nil {
		c.start(device, m)
		return
	}
	c.mu.Lock()
	if c.ctx.Err() != nil { // checked under mu: Run cancels under mu before it waits
		c.mu.Unlock()
		return
	}
	lane, ok := c.lanes[device]
	if !ok {
		lane = make(chan *ackSlot, 4096)
		c.lanes[device] = lane
		c.wg.Add(1)
		go c.drainLane(device, lane)
	}
	c.mu.Unlock()
	sl := c.seq.add(m) // here, on paho's router: the arrival order
	select {
	case lane <- sl:
	case <-c.ctx.Done():
		c.seq.done(sl, false)
	}
}

// start hands a reading to the pipeline on paho's router, in arrival
// order, without waiting for its commit: readings of every device of the
// connection are committed in the order they arrived (so each device's
// stay in order), many share one group commit, and the settler
// acknowledges them in that same order once each is synced — MQTT 3.1.1
// §4.6 by construction, where per-device lanes needed the sequencer to put
// the acknowledgements back in order. How many wait is bounded by the
// broker's in-flight window for this client (and by inflight's capacity:
// the router blocks, so paho reads no more from the broker).
func (c *Client) start(device string, m paho.Message) {
	c.mu.Lock()
	if c.ctx.Err() != nil { // checked under mu: Run cancels under mu before it waits
		c.mu.Unlock()
		return
	}
	c.settler.Do(func() {
		c.wg.Add(1)
		go c.settle()
	})
	c.mu.Unlock()
	s := &started{sl: c.seq.add(m), device: device, msg: pipeline.Message{
		Device:   device,
		Source:   reading.Source{Kind: "mqtt", Topic: m.Topic()},
		Payload:  m.Payload(),
		Received: time.Now(),
	}}
	// Memory: on paho's router, so while the budget is spent paho reads no
	// more from the broker, which keeps the rest.
	s.cost = min(inflightCost(m.Payload()), c.opts.InflightBytes)
	if err := c.held.Acquire(c.ctx, s.cost); err != nil {
		c.seq.done(s.sl, false) // shutting down: the broker redelivers it
		return
	}
	// An attempt in progress finishes even during shutdown, so that what
	// is committed gets its PUBACK.
	s.ctx, s.cancel = context.WithTimeout(context.WithoutCancel(c.ctx), c.opts.SubmitTimeout)
	s.wait = c.starter.Start(s.ctx, s.msg)
	select {
	case c.inflight <- s:
	case <-c.ctx.Done():
		s.cancel()
		c.held.Release(s.cost)
		c.seq.done(s.sl, false)
	}
}

// settle waits for the started readings' outcomes in arrival order and
// releases their PUBACKs; it ends with Run, after resolving what was
// handed over: what commits is acknowledged, the rest stays
// unacknowledged and the broker redelivers it.
func (c *Client) settle() {
	defer c.wg.Done()
	for {
		select {
		case s := <-c.inflight:
			c.seq.done(s.sl, c.outcome(s))
			c.held.Release(s.cost)
		case <-c.ctx.Done():
			for {
				select {
				case s := <-c.inflight:
					c.seq.done(s.sl, c.outcome(s))
					c.held.Release(s.cost)
				default:
					return
				}
			}
		}
	}
}

// outcome waits for one started reading; true once it is settled. A
// reading that was not queued (disk quota, store failure) is held
// unacknowledged and submitted again — at once, then every retry interval
// — while the readings behind it wait for their acknowledgement.
func (c *Client) outcome(s *started) bool {
	_, err := s.wait(s.ctx)
	s.cancel()
	if err == nil {
		return true
	}
	first := true
	for {
		if !first {
			c.limited.Log(c.ctx, slog.LevelWarn, "hold", "reading not queued; holding it unacknowledged", "device", s.device, "err", err)
			t := time.NewTimer(c.opts.RetryInterval)
			select {
			case <-c.ctx.Done():
				t.Stop()
				return false
			case <-t.C:
			}
		} else if c.ctx.Err() != nil {
			return false
		}
		first = false
		ctx, cancel := context.WithTimeout(context.WithoutCancel(c.ctx), c.opts.SubmitTimeout)
		_, err = c.sub.Submit(ctx, s.msg)
		cancel()
		if err == nil {
			return true
		}
	}
}

// drainLane submits one device's readings in order; it ends with Run.
func (c *Client) drainLane(device string, lane chan *ackSlot) {
	defer c.wg.Done()
	for {
		select {
		case <-c.ctx.Done():
			// What is left stays unacknowledged: the broker redelivers.
			for {
				select {
				case sl := <-lane:
					c.seq.done(sl, false)
				default:
					return
				}
			}
		case sl := <-lane:
			c.seq.done(sl, c.handle(device, sl.m))
		}
	}
}

// handle queues one reading; true once it is settled (queued, or refused
// for good) and may be acknowledged.
func (c *Client) handle(device string, m paho.Message) bool {
	if c.ctx.Err() != nil {
		return false
	}
	msg := pipeline.Message{
		Device:   device,
		Source:   reading.Source{Kind: "mqtt", Topic: m.Topic()},
		Payload:  m.Payload(),
		Received: time.Now(),
	}
	for {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(c.ctx), c.opts.SubmitTimeout)
		_, err := c.sub.Submit(ctx, msg)
		cancel()
		if err == nil {
			return true
		}
		c.limited.Log(c.ctx, slog.LevelWarn, "hold", "reading not queued; holding it unacknowledged", "device", device, "err", err)
		t := time.NewTimer(c.opts.RetryInterval)
		select {
		case <-c.ctx.Done():
			t.Stop()
			return false
		case <-t.C:
		}
	}
}

// acks releases PUBACKs in the order the publishes arrived on the
// connection (MQTT 3.1.1 §4.6: a receiver of QoS 1 messages must send its
// PUBACKs in the order it received the PUBLISH packets; Mosquitto re-orders
// its deliveries otherwise). Readings are queued per device lane, in
// parallel, so a fast device's reading settles before a slow one's; its
// acknowledgement waits until every earlier reading is settled. The queue
// keeps per-device order by itself; only the acknowledgements are serialized.
type acks struct {
	mu      sync.Mutex
	send    sync.Mutex // held while one batch of PUBACKs is handed to paho
	pending []*ackSlot // arrival order; the head is the oldest unacknowledged
	stuck   bool       // an earlier reading will not be acknowledged: neither will later ones
	onAck   func(topic string, payload []byte)
}

type ackSlot struct {
	m       paho.Message
	settled bool
	ack     bool
}

// add takes the next place in the arrival order; call it on paho's router.
func (a *acks) add(m paho.Message) *ackSlot {
	sl := &ackSlot{m: m}
	a.mu.Lock()
	a.pending = append(a.pending, sl)
	a.mu.Unlock()
	return sl
}

// done settles one reading (ack false: it stays unacknowledged, as at
// shutdown) and sends every PUBACK that no longer waits for an earlier one.
// How many wait is bounded by the broker's in-flight window for this client.
func (a *acks) done(sl *ackSlot, ack bool) {
	a.mu.Lock()
	sl.settled, sl.ack = true, ack
	n := 0
	var out []paho.Message
	for ; n < len(a.pending) && a.pending[n].settled; n++ {
		h := a.pending[n]
		if !h.ack {
			// Acknowledging what follows would reorder: the broker
			// redelivers from here after a reconnect.
			a.stuck = true
		}
		if !a.stuck {
			out = append(out, h.m)
		}
	}
	clear(a.pending[:n])
	a.pending = a.pending[n:]
	// Batches go out in the order they were taken: send is locked before
	// mu is released. Ack may block while paho reconnects, so it runs
	// outside mu, which paho's router needs (add) to hand over messages.
	a.send.Lock()
	a.mu.Unlock()
	defer a.send.Unlock()
	for _, m := range out {
		m.Ack()
		if a.onAck != nil {
			a.onAck(m.Topic(), m.Payload())
		}
	}
}

// String describes the client without credentials.
func (c *Client) String() string {
	return fmt.Sprintf("MQTT ingest %s as %s", c.opts.URL, c.opts.ClientID)
}
