// Package pipeline is the path every reading takes from a source to the
// durable queue: policy decision, parsing and NGSI validation, signing, and
// the synced append. Sources (the MQTT link, the radio ports) call Submit and
// acknowledge to their peer only what Submit reports as settled.
package pipeline

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/edgegate/edgegate/envelope"
	"github.com/edgegate/edgegate/metrics"
	"github.com/edgegate/edgegate/policy"
	"github.com/edgegate/edgegate/queue"
	"github.com/edgegate/edgegate/ratelog"
	"github.com/edgegate/edgegate/reading"
)

// Appender is what the pipeline needs of the queue.
type Appender interface {
	Append(ctx context.Context, e queue.Entry) (queue.Item, error)
}

// Decider is what the pipeline needs of the policy.
type Decider interface {
	DecideIngest(device string) policy.Decision
}

// Message is a reading as a source received it, not yet trusted.
type Message struct {
	Device   string
	Source   reading.Source
	Payload  []byte
	Received time.Time
}

// Outcome of a Submit that returned no error: either way the source must
// acknowledge the message to its peer.
type Outcome int

const (
	// Queued: durably committed; it will reach the broker.
	Queued Outcome = iota + 1
	// Refused: permanently refused (unknown device, invalid); counted and
	// logged, never forwarded. Acknowledge it so that it does not loop.
	Refused
)

func (o Outcome) String() string {
	switch o {
	case Queued:
		return "queued"
	case Refused:
		return "refused"
	}
	return "unknown"
}

// Refusal reasons (metric label values) besides the policy's.
const (
	ReasonInvalid  = "invalid"
	ReasonTooLarge = "too_large"
	// ReasonQuota counts attempts held back by the disk quota; the reading
	// is not lost, its source keeps it and retries.
	ReasonQuota = "quota"
)

// Options configures a Pipeline.
type Options struct {
	Gateway       string // gateway id signed into every envelope
	SignatureAttr string
	Logger        *slog.Logger
	Metrics       *metrics.Metrics
	Now           func() time.Time
	// Observe, when set, is told the outcome of every settled message
	// (reason is set for a refusal): status counters and the audit log.
	Observe func(device string, out Outcome, reason string)
}

// Pipeline turns messages into queued, signed readings.
type Pipeline struct {
	policy  Decider
	queue   Appender
	gw      string
	sigAttr string
	log     *slog.Logger
	limited *ratelog.Limiter
	m       *metrics.Metrics
	now     func() time.Time
	observe func(device string, out Outcome, reason string)
}

// New builds a pipeline.
func New(pol Decider, q Appender, opts Options) *Pipeline {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	now := opts.Now
	if now == nil {
		now = time.Now
	}
	sigAttr := opts.SignatureAttr
	if sigAttr == "" {
		sigAttr = envelope.DefaultSignatureAttr
	}
	return &Pipeline{
		policy: pol, queue: q, gw: opts.Gateway, sigAttr: sigAttr,
		log: log, limited: ratelog.New(log, 30*time.Second), m: opts.Metrics, now: now, observe: opts.Observe,
	}
}

// Submit takes one message through the pipeline. A nil error means the
// message is settled (Queued or Refused) and must be acknowledged; an error
// means it was not queued (quota reached, shutting down, store failure) and
// must NOT be acknowledged, so that its sender or broker keeps it.
func (p *Pipeline) Submit(ctx context.Context, msg Message) (Outcome, error) {
	dec := p.policy.DecideIngest(msg.Device)
	if !dec.Allow {
		p.refuse(ctx, dec.Reason, msg, "reading from a device that is not registered")
		return Refused, nil
	}
	dev := dec.Device
	attrs, observed, err := reading.Parse(msg.Payload)
	if err != nil {
		p.refuse(ctx, reasonOf(err), msg, err.Error())
		return Refused, nil
	}
	if observed.IsZero() {
		observed = msg.Received
		if observed.IsZero() {
			observed = p.now()
		}
	}
	r := reading.Reading{Device: dev.ID, Source: msg.Source, Time: observed.UTC(), Attrs: attrs}
	if err := r.Validate(); err != nil {
		p.refuse(ctx, reasonOf(err), msg, err.Error())
		return Refused, nil
	}

	var sealErr error
	entry := queue.Entry{
		Broker: dev.Broker, Device: dev.ID, Type: dev.Type,
		Service: dev.Service, ServicePath: dev.ServicePath,
		Seal: func(seq uint64) ([]byte, error) {
			claims := envelope.ClaimsOf(p.gw, seq, &r)
			jws, err := envelope.Seal(dev.Key(), claims)
			if err == nil {
				var body []byte
				if body, err = envelope.Body(claims, jws, p.sigAttr); err == nil {
					return body, nil
				}
			}
			sealErr = err
			return nil, err
		},
	}
	if _, err := p.queue.Append(ctx, entry); err != nil {
		if sealErr != nil {
			p.refuse(ctx, reasonOf(sealErr), msg, sealErr.Error())
			return Refused, nil
		}
		if errors.Is(err, queue.ErrQuota) && p.m != nil {
			// Counted per attempt: the source holds the reading and retries.
			p.m.Refused.WithLabelValues(ReasonQuota).Inc()
		}
		return 0, fmt.Errorf("queue reading of %s: %w", dev.ID, err)
	}
	if p.m != nil {
		p.m.Ingested.WithLabelValues(msg.Source.Kind).Inc()
	}
	if p.observe != nil {
		p.observe(dev.ID, Queued, "")
	}
	return Queued, nil
}

func reasonOf(err error) string {
	if errors.Is(err, reading.ErrTooLarge) {
		return ReasonTooLarge
	}
	return ReasonInvalid
}

func (p *Pipeline) refuse(ctx context.Context, reason string, msg Message, why string) {
	if p.m != nil {
		p.m.Refused.WithLabelValues(reason).Inc()
	}
	if p.observe != nil {
		p.observe(msg.Device, Refused, reason)
	}
	dev := msg.Device
	if len(dev) > 64 {
		dev = dev[:64] + "…"
	}
	p.limited.Log(ctx, slog.LevelWarn, reason+"/"+dev, "reading refused",
		"reason", reason, "device", dev, "source", msg.Source.Kind, "topic", msg.Source.Topic,
		"port", msg.Source.Port, "detail", why)
}
