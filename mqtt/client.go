package mqtt

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/edgegate/edgegate/pipeline"
	"github.com/edgegate/edgegate/ratelog"
	"github.com/edgegate/edgegate/reading"
)

// ClientOptions configures the ingest client for an external broker.
type ClientOptions struct {
	URL       string // tls://host:8883, or tcp:// on loopback
	ClientID  string // fixed: the persistent session is keyed by it
	Username  string
	Password  string
	TLS       *tls.Config
	Topic     Topic
	Inflight  int           // readings held unacknowledged at once
	Keepalive time.Duration // MQTT keepalive
	Logger    *slog.Logger
	// SubmitTimeout bounds one attempt to queue a reading (default 30s).
	SubmitTimeout time.Duration
	// RetryInterval is the wait between attempts while the queue refuses.
	RetryInterval time.Duration
	// OnConnect, when set, is called after every (re)connection and
	// subscription; tests and readiness use it.
	OnConnect func()
}

// Client ingests readings from an external broker through paho, with a
// persistent session and manual acknowledgement: a reading is PUBACKed only
// once the pipeline settled it, so the broker keeps everything else.
type Client struct {
	sub     Submitter
	opts    ClientOptions
	log     *slog.Logger
	limited *ratelog.Limiter

	ctx    context.Context // cancelled when Run is stopping
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu    sync.Mutex
	lanes map[string]chan paho.Message // per device, in arrival order
}

// NewClient builds the ingest client; Run connects it.
func NewClient(sub Submitter, opts ClientOptions) *Client {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With("component", "mqtt-ingest")
	if opts.Inflight <= 0 {
		opts.Inflight = 64
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
	c := &Client{sub: sub, opts: opts, log: log, limited: ratelog.New(log, 10*time.Second),
		lanes: map[string]chan paho.Message{}}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	return c
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
		SetResumeSubs(true).
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
		SetMessageChannelDepth(uint(c.opts.Inflight))
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
		go func() {
			if err := waitToken(cl.Subscribe(filter, 1, c.dispatch), 10*time.Second); err != nil {
				c.log.Error("subscribe failed; reconnecting", "filter", filter, "err", err)
				cl.Disconnect(0) // auto-reconnect tries again
				return
			}
			c.log.Info("subscribed to the local broker", "url", c.opts.URL, "filter", filter)
			if c.opts.OnConnect != nil {
				c.opts.OnConnect()
			}
		}()
	})
	po.SetConnectionLostHandler(func(_ paho.Client, err error) {
		c.limited.Log(c.ctx, slog.LevelWarn, "lost", "connection to the local broker lost; reconnecting", "err", err)
	})
	cl := paho.NewClient(po)
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
	cl.Disconnect(500)
	return nil
}

// dispatch runs on paho's router, in arrival order: it hands the message to
// its device's lane and returns at once. How many messages wait in lanes is
// bounded by the broker's in-flight window for this client (Mosquitto's
// max_inflight_messages): the broker sends no more until we acknowledge.
func (c *Client) dispatch(_ paho.Client, m paho.Message) {
	if c.ctx.Err() != nil {
		return // shutting down: not acknowledged, the broker redelivers
	}
	device, ok := c.opts.Topic.Match(m.Topic())
	if !ok {
		m.Ack() // not a reading topic (a broad subscription elsewhere); nothing to keep
		return
	}
	c.mu.Lock()
	if c.ctx.Err() != nil { // checked under mu: Run cancels under mu before it waits
		c.mu.Unlock()
		return
	}
	lane, ok := c.lanes[device]
	if !ok {
		lane = make(chan paho.Message, 4096)
		c.lanes[device] = lane
		c.wg.Add(1)
		go c.drainLane(device, lane)
	}
	c.mu.Unlock()
	select {
	case lane <- m:
	case <-c.ctx.Done():
	}
}

// drainLane submits one device's readings in order; it ends with Run.
func (c *Client) drainLane(device string, lane chan paho.Message) {
	defer c.wg.Done()
	for {
		select {
		case <-c.ctx.Done():
			return // what is left stays unacknowledged: the broker redelivers
		case m := <-lane:
			c.handle(device, m)
		}
	}
}

func (c *Client) handle(device string, m paho.Message) {
	if c.ctx.Err() != nil {
		return
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
			m.Ack()
			return
		}
		c.limited.Log(c.ctx, slog.LevelWarn, "hold", "reading not queued; holding it unacknowledged", "device", device, "err", err)
		t := time.NewTimer(c.opts.RetryInterval)
		select {
		case <-c.ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

// String describes the client without credentials.
func (c *Client) String() string {
	return fmt.Sprintf("MQTT ingest %s as %s", c.opts.URL, c.opts.ClientID)
}
