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

	"github.com/edgegate/edgegate/internal/envelope"
	"github.com/edgegate/edgegate/internal/logx"
	"github.com/edgegate/edgegate/internal/metrics"
	"github.com/edgegate/edgegate/internal/queue"
	"github.com/edgegate/edgegate/internal/reading"
	"github.com/edgegate/edgegate/policy"
)

// Appender is what the pipeline needs of the queue.
type Appender interface {
	Append(ctx context.Context, e queue.Entry) (queue.Item, error)
	Enqueue(ctx context.Context, e queue.Entry) (func(context.Context) (queue.Item, error), error)
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
	// DeviceSeq is the device's own sequence number when the source frames
	// carry one (e.g. the "seq" of a radio JSON line); 0 = none. A
	// device-signed reading's seq comes from its signed claims instead.
	DeviceSeq uint64
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
	// Duplicate: a redelivery of a reading already queued (same device and
	// device seq, same content); counted, not queued again. Acknowledge it.
	Duplicate
)

func (o Outcome) String() string {
	switch o {
	case Queued:
		return "queued"
	case Refused:
		return "refused"
	case Duplicate:
		return "duplicate"
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
	// ReasonBadSignature: a reading of a device-signed device whose
	// signature does not verify with the device's registered keys (or that
	// is not signed at all).
	ReasonBadSignature = "bad_signature"
	// ReasonReplay: a device seq not above the last accepted one.
	ReasonReplay = "replay"
	// ReasonStale: an observation time outside the accepted window.
	ReasonStale = "stale"
	// ReasonDuplicate counts redeliveries recognised by (device, seq).
	ReasonDuplicate = "duplicate"
	// ReasonNoValidAttributes: every attribute of the reading was one the
	// broker would refuse (reading.DropOrionInvalid), so nothing is left
	// to send.
	ReasonNoValidAttributes = "no_valid_attributes"
	// ReasonNoSigningKey counts attempts held back because the gateway
	// does not hold the private key of a gateway-signed device; the
	// reading is not acknowledged, its source keeps it.
	ReasonNoSigningKey = "no_signing_key"
	// ReasonBadDeviceID: a device id (an MQTT topic level, a radio
	// binding) that reading.ValidateDeviceID refuses, such as "..":
	// refused before the policy is asked, so it can never become
	// PATCH /v2/entities/../attrs.
	ReasonBadDeviceID = "bad_device_id"
)

// KeyResolver gives the private keys the gateway holds for devices whose
// readings it signs with an asymmetric key (policy.SigningGateway).
type KeyResolver interface {
	SigningKey(device, kid string) (envelope.Key, bool)
}

// Options configures a Pipeline.
type Options struct {
	Gateway string // gateway id signed into every envelope
	// SignatureAttr names the metadata that carries the envelope on every
	// attribute (envelope.Body); default envelope.DefaultSignatureAttr.
	SignatureAttr string
	Logger        *slog.Logger
	Metrics       *metrics.Metrics
	Now           func() time.Time
	// Observe, when set, is told the outcome of every settled message
	// (reason is set for a refusal): status counters and the audit log.
	Observe func(device string, out Outcome, reason string)
	// SigningKeys resolves the private keys of gateway-signed devices
	// (policy.SigningGateway); nil = none held.
	SigningKeys KeyResolver
	// MaxClockSkew refuses (ReasonStale) a device-signed reading observed
	// more than this after the gateway's now; 0 = no check. Readings the
	// gateway stamps or signs are never refused for their time: a jump of
	// the gateway's clock must not cost data.
	MaxClockSkew time.Duration
	// MaxAge refuses (ReasonStale) a device-signed reading observed more than this
	// before the gateway's now; 0 = no check. Both checks are skipped
	// while the gateway's clock is implausible (before 2025: a Raspberry
	// Pi without a real-time clock before time sync), so an unsynchronised
	// gateway never refuses, and so loses, good readings.
	MaxAge time.Duration
}

// Pipeline turns messages into queued, signed readings.
type Pipeline struct {
	policy  Decider
	queue   Appender
	gw      string
	sigAttr string
	log     *slog.Logger
	limited *logx.Limiter
	m       *metrics.Metrics
	now     func() time.Time
	observe func(device string, out Outcome, reason string)
	keys    KeyResolver
	skew    time.Duration
	maxAge  time.Duration
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
		log: log, limited: logx.NewLimiter(log, 30*time.Second), m: opts.Metrics, now: now, observe: opts.Observe,
		keys: opts.SigningKeys, skew: opts.MaxClockSkew, maxAge: opts.MaxAge,
	}
}

// Pending waits for the outcome of a message handed to Start. Its ctx done
// before the reading was committed, it answers an error wrapping
// queue.ErrNotYet, settles nothing, and may be called again; a ctx already
// done makes it a poll.
type Pending func(ctx context.Context) (Outcome, error)

func done(out Outcome, err error) Pending {
	return func(context.Context) (Outcome, error) { return out, err }
}

// Submit takes one message through the pipeline and waits for its outcome.
// A nil error means the message is settled (Queued, Refused or Duplicate)
// and must be acknowledged; an error means it was not queued (quota
// reached, shutting down, store failure) and must NOT be acknowledged, so
// that its sender or broker keeps it.
func (p *Pipeline) Submit(ctx context.Context, msg Message) (Outcome, error) {
	return p.Start(ctx, msg)(ctx)
}

// Start takes a message as far as the queue and returns at once; the
// Pending it returns waits for the outcome, with the meaning Submit's result
// has. Messages Started one after another by one goroutine are committed in
// that order, so a source may keep several in flight and acknowledge them
// in order as their outcomes arrive. ctx must stay alive until the wait.
// The checks run in the caller's goroutine; refusals are settled at once.
func (p *Pipeline) Start(ctx context.Context, msg Message) Pending {
	if err := reading.ValidateDeviceID(msg.Device); err != nil {
		p.refuse(ctx, ReasonBadDeviceID, msg, err.Error())
		return done(Refused, nil)
	}
	dec := p.policy.DecideIngest(msg.Device)
	if !dec.Allow {
		p.refuse(ctx, dec.Reason, msg, "reading from a device that is not registered")
		return done(Refused, nil)
	}
	dev := dec.Device
	if dev.Signing() == policy.SigningDevice {
		return p.startDeviceSigned(ctx, msg, dev)
	}
	attrs, observed, err := reading.Parse(msg.Payload)
	if err != nil {
		p.refuse(ctx, reasonOf(err), msg, err.Error())
		return done(Refused, nil)
	}
	if observed.IsZero() {
		observed = msg.Received
		if observed.IsZero() {
			observed = p.now()
		}
	}
	r := reading.Reading{Device: dev.ID, Source: msg.Source, Time: observed.UTC(), Attrs: attrs}
	// Before sealing: the gateway signs only what the broker will store.
	if !p.dropInvalid(ctx, msg, &r) {
		return done(Refused, nil)
	}
	if err := r.Validate(); err != nil {
		p.refuse(ctx, reasonOf(err), msg, err.Error())
		return done(Refused, nil)
	}
	key := dev.Key()
	if dev.Signing() == policy.SigningGateway {
		var ok bool
		if p.keys != nil {
			key, ok = p.keys.SigningKey(dev.ID, dev.SigningKeyID())
		}
		if !ok {
			if p.m != nil {
				p.m.Refused.WithLabelValues(ReasonNoSigningKey).Inc()
			}
			return done(0, fmt.Errorf("queue reading of %s: %w", dev.ID, ErrNoSigningKey))
		}
	}

	var digest [8]byte
	if msg.DeviceSeq != 0 {
		// Only readings that carry their own sequence are checked for
		// redelivery: no hash on the hot path of the others.
		digest = digestOf(msg.Payload)
	}
	// One allocation holds what Seal and the Pending need (they were
	// closures capturing the reading, the seal error and the message
	// separately: five allocations per reading, now three).
	g := &gatewaySealed{p: p, msg: msg, dev: dev, r: r, key: key}
	entry := queue.Entry{
		DeviceDigest: digest,
		Broker:       dev.Broker, Device: dev.ID, Type: dev.Type,
		Service: dev.Service, ServicePath: dev.ServicePath,
		DeviceSeq: msg.DeviceSeq,
		Seal:      g.seal,
	}
	wait, err := p.queue.Enqueue(ctx, entry)
	if err != nil {
		return done(p.settle(ctx, msg, dev, &g.sealErr, err))
	}
	g.wait = wait
	return g.outcome
}

// gatewaySealed is a reading the gateway signs, on its way through the
// queue.
type gatewaySealed struct {
	p       *Pipeline
	msg     Message
	dev     *policy.Device
	r       reading.Reading
	key     envelope.Key
	sealErr error // written by the committer in seal, before it answers wait
	wait    func(context.Context) (queue.Item, error)
}

// seal is the entry's Seal: the committer calls it with the reading's seq.
func (g *gatewaySealed) seal(seq uint64) ([]byte, error) {
	// ClaimsOf + Seal + PackBody in one pass (issue 20). The queue stores
	// the packed body: the JWS once, not once per attribute; the uplink
	// renders it in full (envelope.AppendBody).
	body, err := envelope.SealPacked(g.key, g.p.gw, seq, &g.r, g.p.sigAttr)
	if err == nil {
		return body, nil
	}
	g.sealErr = err
	return nil, err
}

// outcome is the Pending of Start.
func (g *gatewaySealed) outcome(ctx context.Context) (Outcome, error) {
	_, err := g.wait(ctx)
	return g.p.settle(ctx, g.msg, g.dev, &g.sealErr, err)
}

// enqueue hands the entry to the queue and returns what waits for it.
func (p *Pipeline) enqueue(ctx context.Context, msg Message, dev *policy.Device, entry queue.Entry, sealErr *error) Pending {
	wait, err := p.queue.Enqueue(ctx, entry)
	if err != nil {
		return done(p.settle(ctx, msg, dev, sealErr, err))
	}
	return func(ctx context.Context) (Outcome, error) {
		_, err := wait(ctx)
		return p.settle(ctx, msg, dev, sealErr, err)
	}
}

func (p *Pipeline) settle(ctx context.Context, msg Message, dev *policy.Device, sealErr *error, err error) (Outcome, error) {
	if errors.Is(err, queue.ErrNotYet) {
		// The committer has not answered: nothing to settle, and sealErr
		// is its to write still (it is read only after an answer). The
		// queue's error as it is: a poll asks this of every reading, and
		// its caller only tells "not yet" from an outcome.
		return 0, err
	}
	if err != nil {
		if *sealErr != nil {
			p.refuse(ctx, reasonOf(*sealErr), msg, (*sealErr).Error())
			return Refused, nil
		}
		if errors.Is(err, queue.ErrDuplicate) {
			if p.m != nil {
				p.m.Refused.WithLabelValues(ReasonDuplicate).Inc()
			}
			if p.observe != nil {
				p.observe(dev.ID, Duplicate, ReasonDuplicate)
			}
			return Duplicate, nil
		}
		if errors.Is(err, queue.ErrReplay) {
			p.refuse(ctx, ReasonReplay, msg, err.Error())
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

// dropInvalid leaves out the attributes stock Orion would refuse the whole
// request for (reading.DropOrionInvalid), counting and logging each
// without its value. It reports false, having refused the message, when
// no attribute is left.
func (p *Pipeline) dropInvalid(ctx context.Context, msg Message, r *reading.Reading) bool {
	had := len(r.Attrs)
	dropped := r.DropOrionInvalid()
	if len(dropped) == 0 {
		return true
	}
	dev := logx.Clip(r.Device, 64)
	for _, d := range dropped {
		if p.m != nil {
			p.m.AttrsDropped.WithLabelValues(d.Reason).Inc()
		}
		p.limited.Log(ctx, slog.LevelWarn, "drop/"+d.Reason+"/"+dev, "attribute dropped: the broker would refuse the whole reading for it",
			"device", dev, "attribute", d.Name, "reason", d.Reason)
	}
	if len(r.Attrs) == 0 && had > 0 {
		p.refuse(ctx, ReasonNoValidAttributes, msg, fmt.Sprintf("all %d attributes dropped (%s)", had, dropped[0].Reason))
		return false
	}
	return true
}

func reasonOf(err error) string {
	// The finer input reasons (bad_utf8, not_finite, reserved_name) are
	// counted as themselves.
	if r := reading.Reason(err); r != "" {
		return r
	}
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
	dev := logx.Clip(msg.Device, 64)
	p.limited.Log(ctx, slog.LevelWarn, reason+"/"+dev, "reading refused",
		"reason", reason, "device", dev, "source", msg.Source.Kind, "topic", msg.Source.Topic,
		"port", msg.Source.Port, "detail", why)
}
