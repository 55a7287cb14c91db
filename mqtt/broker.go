package mqtt

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"time"

	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/hooks/auth"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/edgegate/edgegate/pipeline"
	"github.com/edgegate/edgegate/ratelog"
	"github.com/edgegate/edgegate/reading"
)

// Submitter is what the MQTT link needs of the pipeline.
type Submitter interface {
	Submit(ctx context.Context, msg pipeline.Message) (pipeline.Outcome, error)
}

// BrokerOptions configures the embedded broker.
type BrokerOptions struct {
	Listen string // loopback host:port; port 0 picks one
	Topic  Topic
	Logger *slog.Logger
	// SubmitTimeout bounds one attempt to queue a reading (default 30s).
	SubmitTimeout time.Duration
	// RetryInterval is the wait between attempts while the queue refuses
	// (disk quota) — the reading is held unacknowledged meanwhile.
	RetryInterval time.Duration
}

// Broker is the MQTT broker embedded in the daemon.
type Broker struct {
	srv  *mochi.Server
	tcp  *listeners.TCP
	hook *ingestHook
	log  *slog.Logger
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
	caps := mochi.NewDefaultServerCapabilities()
	// A reading's payload is bounded; the packet adds topic and headers.
	caps.MaximumPacketSize = uint32(reading.MaxPayloadBytes + 64<<10)
	// Bounds how many readings one client may have waiting for the disk.
	caps.ReceiveMaximum = 64
	caps.MaximumClientWritesPending = 1024
	// The broker keeps no session state across restarts; don't promise more.
	caps.MaximumSessionExpiryInterval = 24 * 60 * 60
	srv := mochi.New(&mochi.Options{
		Capabilities: caps,
		Logger:       log.With("component", "mqtt-broker"),
	})
	hook := &ingestHook{sub: sub, topic: opts.Topic, log: log, timeout: opts.SubmitTimeout, retry: opts.RetryInterval,
		limited: ratelog.New(log, 10*time.Second)}
	hook.ctx, hook.cancel = context.WithCancel(context.Background())
	// Device and application authentication arrive with the ACL work; until
	// then the broker listens on loopback only (config enforces it).
	if err := srv.AddHook(new(auth.AllowHook), nil); err != nil {
		return nil, fmt.Errorf("add auth hook: %w", err)
	}
	if err := srv.AddHook(hook, nil); err != nil {
		return nil, fmt.Errorf("add ingest hook: %w", err)
	}
	tcp := listeners.NewTCP(listeners.Config{ID: "local", Address: opts.Listen})
	if err := srv.AddListener(tcp); err != nil {
		return nil, fmt.Errorf("listen on %s: %w", opts.Listen, err)
	}
	return &Broker{srv: srv, tcp: tcp, hook: hook, log: log}, nil
}

// Addr is the address the broker listens on.
func (b *Broker) Addr() string { return b.tcp.Address() }

// Run serves until ctx is done, then stops accepting, ends the held
// publishes (unacknowledged, so their senders keep them) and closes every
// connection. ready, when set, is called once the broker accepts clients.
func (b *Broker) Run(ctx context.Context, ready func()) error {
	if err := b.srv.Serve(); err != nil {
		return fmt.Errorf("serve MQTT: %w", err)
	}
	b.log.Info("local MQTT broker listening", "addr", b.Addr())
	if ready != nil {
		ready()
	}
	<-ctx.Done()
	b.hook.cancel()
	if err := b.srv.Close(); err != nil {
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
	limited *ratelog.Limiter
	ctx     context.Context // cancelled when the broker stops
	cancel  context.CancelFunc
}

func (h *ingestHook) ID() string { return "edgegate-ingest" }

func (h *ingestHook) Provides(b byte) bool {
	return bytes.Contains([]byte{mochi.OnPublish}, []byte{b})
}

// OnPublish runs on the publishing client's goroutine, before its PUBACK.
func (h *ingestHook) OnPublish(cl *mochi.Client, pk packets.Packet) (packets.Packet, error) {
	device, ok := h.topic.Match(pk.TopicName)
	if !ok {
		return pk, nil
	}
	msg := pipeline.Message{
		Device:   device,
		Source:   reading.Source{Kind: "mqtt", Topic: pk.TopicName},
		Payload:  pk.Payload,
		Received: time.Now(),
	}
	for {
		// An attempt in progress finishes even during shutdown, so that
		// what is committed gets its PUBACK; only the waiting stops.
		ctx, cancel := context.WithTimeout(context.WithoutCancel(h.ctx), h.timeout)
		out, err := h.sub.Submit(ctx, msg)
		cancel()
		if err == nil {
			if out == pipeline.Refused {
				// Acknowledged so the device does not resend it forever, but
				// not delivered to local subscribers.
				return pk, packets.CodeSuccessIgnore
			}
			return pk, nil
		}
		h.limited.Log(h.ctx, slog.LevelWarn, "hold", "reading not queued; holding it unacknowledged", "device", device, "err", err)
		t := time.NewTimer(h.retry)
		select {
		case <-h.ctx.Done():
			t.Stop()
			return pk, packets.ErrRejectPacket // no PUBACK: the device resends it
		case <-t.C:
		}
		if cl.Closed() {
			return pk, packets.ErrRejectPacket
		}
	}
}
