// Package command is the gateway's downlink: it learns the target values
// the platform sets on actuators and delivers each, signed, to its device
// on the device's bound link (a MySensors node, the device's MQTT command
// topic, a Modbus write), then writes the device's confirmation back to
// the platform as a reading.
//
// The convention (docs/actuators.md says why): an IoT App, a dashboard
// widget or any client with write rights sets a writable attribute of the
// device's entity through the Orion Broker Filter (PATCH
// /v2/entities/{id}/attrs, which the filter allows the owner and READ_WRITE,
// WRITE_ONLY and MODIFY delegates). Everything the gateway itself writes
// carries its signature metadata, which Orion keeps on an attribute until
// someone names it in an update. So a writable attribute whose value is
// NOT what the gateway signed there is a target someone set: a command.
// When the device confirms, the gateway writes the reported state into the
// same attribute, signed, and the attribute verifies again. Stock
// dashboards and IoT Apps write and read the same attribute; nothing is
// installed on the platform.
//
// Rules kept here: a command goes only to a device the policy in force
// lists as commandable (policy.Device.Writes), on its bound link; it is
// signed with the device's key (envelope, Kind "command"); it is durable
// (one record per device in the encrypted store), expires after its TTL,
// and the newest value per attribute wins: an older one is never sent
// after a newer one was learned, across restarts too.
//
// Only the daemon imports this package.
package command

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"sort"
	"sync"
	"time"

	"github.com/edgegate/edgegate/internal/backoff"
	"github.com/edgegate/edgegate/internal/envelope"
	"github.com/edgegate/edgegate/internal/logx"
	"github.com/edgegate/edgegate/internal/pipeline"
	"github.com/edgegate/edgegate/internal/reading"
	"github.com/edgegate/edgegate/policy"
)

// State is where a command is in its life.
type State string

// States of a command.
const (
	// Pending: learned, not yet delivered.
	Pending State = "pending"
	// Sent: handed to a link that cannot tell whether the device got it
	// (MQTT: published, retained, on the device's command topic); the
	// device's own state report, seen at the platform, confirms it.
	Sent State = "sent"
	// Delivered: the device acknowledged it (MySensors echo, Modbus
	// read-back); its reported state is on its way to the platform.
	Delivered State = "delivered"
	// Confirmed: the platform shows the value, signed by the gateway.
	Confirmed State = "confirmed"
	// Expired: not delivered within its TTL; never sent after.
	Expired State = "expired"
	// Dropped: its device or attribute is no longer commandable in the
	// policy in force, or its link refused the value for good.
	Dropped State = "dropped"
)

// open reports whether the command may still be (re)sent.
func (s State) open() bool { return s == Pending || s == Sent }

// Command is one target value for one attribute of one device.
type Command struct {
	Device string          `json:"device"`
	Attr   string          `json:"attr"`
	Type   string          `json:"type"`
	Value  json.RawMessage `json:"value"`
	// Seq is the device's command sequence number: strictly increasing
	// per device, across restarts (it is in the device's record). A
	// device that verifies commands keeps the highest it applied.
	Seq uint64 `json:"seq"`
	// Origin is "platform", or "local:<user>" for local control.
	Origin   string    `json:"origin"`
	Learned  time.Time `json:"learned"`
	Expires  time.Time `json:"expires"`
	State    State     `json:"state"`
	Attempts int       `json:"attempts,omitempty"`
	// Done is when it left Pending (sent, delivered, expired, ...).
	Done time.Time `json:"done,omitzero"`
	// Why says why it was dropped, or the last delivery error.
	Why string `json:"why,omitempty"`
	// Reported is the device's confirmation still to be queued for the
	// platform (a reading payload, from Source): kept with the command
	// until the pipeline took it, so a crash or a full store between the
	// device's ack and the queue does not lose it.
	Reported json.RawMessage `json:"reported,omitempty"`
	Source   reading.Source  `json:"source,omitzero"`
}

// Signed is a command as a link carries it.
type Signed struct {
	Command
	// JWS is the compact envelope: claims {v, gw, dev, seq, t (the time
	// learned), attrs {attr: {type, value}}, kind "command"}, signed with
	// the device's HS256 key derived from K1/K2 (docs/envelopes.md), so a
	// device holding its K1/K2 can check it came through its gateway.
	JWS string `json:"jws"`
}

// Wire is what the MQTT command topic carries (Signed.Message): the
// command in clear for simple devices, and its envelope for those that
// verify.
type Wire struct {
	Device  string          `json:"device"`
	Seq     uint64          `json:"seq"`
	Attr    string          `json:"attr"`
	Type    string          `json:"type"`
	Value   json.RawMessage `json:"value"`
	Expires time.Time       `json:"expires"`
	JWS     string          `json:"jws"`
}

// Message renders s as the MQTT command topic carries it (Wire).
func (s Signed) Message() ([]byte, error) {
	return json.Marshal(Wire{s.Device, s.Seq, s.Attr, s.Type, s.Value, s.Expires.UTC(), s.JWS})
}

// Result is what a delivery achieved.
type Result struct {
	// Acked: the device itself acknowledged the command (State
	// Delivered); false: only handed to the link (State Sent).
	Acked bool
	// Reported, when set, is a reading payload of the device's new state
	// (as its link reports readings), written back to the platform
	// through the pipeline; Source is its source.
	Reported []byte
	Source   reading.Source
}

// Deliverer sends one command to one device over one kind of link.
// Errors are retried (within the command's TTL) unless they wrap
// ErrPermanent.
type Deliverer interface {
	Deliver(ctx context.Context, dev *policy.Device, cmd Signed) (Result, error)
}

// Clearer is an optional capability of a Deliverer: forget what is held
// for the device's link (the retained MQTT command) once its command is
// confirmed, expired or dropped.
type Clearer interface {
	Clear(device, attr string)
}

// ErrPermanent marks a delivery error that sending again cannot fix.
var ErrPermanent = errors.New("the device's link cannot take this command")

// Interfaces the service needs, declared here (the consumer).
type (
	// StateStore is the encrypted store's state records (queue.Queue).
	StateStore interface {
		GetState(name string) ([]byte, bool, error)
		PutState(name string, value []byte) error
	}
	// PolicySource is the policy in force (policy.Engine).
	PolicySource interface{ Current() *policy.Policy }
	// TokenSource gives the gateway account's access token.
	TokenSource interface {
		Token(ctx context.Context) (string, error)
		Invalidate(bad string)
	}
	// Submitter takes a reading (pipeline.Pipeline): the write-back.
	Submitter interface {
		Submit(ctx context.Context, msg pipeline.Message) (pipeline.Outcome, error)
	}
)

// Options configure a Service.
type Options struct {
	Gateway string
	Store   StateStore
	Policy  PolicySource
	Tokens  TokenSource
	// HTTPClient reads entities through the filter (bounded timeout).
	HTTPClient *http.Client
	Submit     Submitter
	// Route picks the deliverer of a device; nil or a nil answer: the
	// command waits (for instance a link not running yet).
	Route func(dev *policy.Device) Deliverer
	// SignatureMeta is the metadata holding the gateway's signature
	// (uplink.signature_attribute; default "signature").
	SignatureMeta string
	TTL           time.Duration // default 10m
	PollInterval  time.Duration // default 5s
	PollBudget    int           // entity reads per round; default 32
	// MinBackoff, MaxBackoff bound the waits after a failed read of the
	// platform (defaults 1s, 1m).
	MinBackoff, MaxBackoff time.Duration
	// Notify, when set, learns through Orion subscriptions where the
	// platform offers them (subscribe.go); nil: polling only.
	Notify *NotifyOptions
	Logger *slog.Logger
	Now    func() time.Time
}

// Stats counts what the service did since it started.
type Stats struct {
	Polls, PollErrors             uint64
	Learned, Local                uint64
	Superseded                    uint64
	Sent, Delivered, Confirmed    uint64
	Expired, Dropped, SendErrors  uint64
	WriteBacks, WriteBackFailures uint64
	// Subscriptions (subscribe.go): notifications taken in, those ignored
	// (unparsable, no device of the policy), reads they caused (hints),
	// subscriptions made and deleted, probes refused or failed.
	Notifications, NotifyIgnored, Hints uint64
	Subscribed, Unsubscribed            uint64
	ProbeRefused, ProbeFailed           uint64
}

// Service learns and delivers commands. Run owns its goroutine.
type Service struct {
	o       Options
	log     *slog.Logger
	limited *logx.Limiter
	wake    chan struct{}

	mu      sync.Mutex
	recs    map[string]*record // device → its record, as stored
	cursor  int                // round-robin position of the poll
	stats   Stats
	holding map[string]bool // device/attr → its Sent command was handed to its link since start
	// retry: device/attr → when a command whose delivery failed may be
	// tried again, and the wait after the next failure (doubling from
	// PollInterval up to MaxBackoff): a node that is off the air is not
	// sent a burst of sets every round.
	retry map[string]retryAt
	// sending: device → cancels the delivery attempt in progress (Forget).
	sending map[string]context.CancelFunc
	bo      *backoff.Backoff
	cs      confirmState // confirm.go: confirmations read first, retained commands swept
	subs    *subManager  // nil unless Options.Notify
}

// New checks the options; Run starts the work.
func New(o Options) (*Service, error) {
	if o.Store == nil || o.Policy == nil || o.Submit == nil {
		return nil, errors.New("command service: a store, a policy and a submitter are required")
	}
	if o.SignatureMeta == "" {
		o.SignatureMeta = envelope.DefaultSignatureAttr
	}
	if o.TTL <= 0 {
		o.TTL = 10 * time.Minute
	}
	if o.PollInterval <= 0 {
		o.PollInterval = 5 * time.Second
	}
	if o.PollBudget <= 0 {
		o.PollBudget = 32
	}
	if o.MinBackoff <= 0 {
		o.MinBackoff = time.Second
	}
	if o.MaxBackoff < o.MinBackoff {
		o.MaxBackoff = max(time.Minute, o.MinBackoff)
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.HTTPClient == nil {
		o.HTTPClient = &http.Client{Timeout: 15 * time.Second}
	}
	log := o.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Service{o: o, log: log, limited: logx.NewLimiter(log, 30*time.Second), wake: make(chan struct{}, 1),
		recs: map[string]*record{}, holding: map[string]bool{}, retry: map[string]retryAt{}, sending: map[string]context.CancelFunc{}, bo: backoff.New(o.MinBackoff, o.MaxBackoff)}
	if o.Notify != nil && o.Notify.Transport != nil && o.Tokens != nil {
		s.subs = newSubManager(s, *o.Notify)
	}
	return s, nil
}

type retryAt struct {
	seq  uint64
	at   time.Time
	wait time.Duration
}

// Forget drops the open commands of devices that were revoked or changed
// owner, broker, type or keys (policy.Change Revoked, Rebound): a command
// learned under one registration is never delivered under another. The
// targets already read stay marked, so they are not learned again.
func (s *Service) Forget(devices []string) {
	now := s.o.Now()
	for _, id := range devices {
		var cleared []string
		err := s.update(id, func(r *record) bool {
			changed := false
			for _, c := range r.Attrs {
				if c.State.open() {
					if c.State == Sent {
						cleared = append(cleared, c.Attr)
					}
					c.State, c.Why, c.Done = Dropped, "the device was revoked or re-registered", now.UTC()
					s.stats.Dropped++
					changed = true
				}
			}
			return changed
		})
		if err != nil {
			s.log.Warn("drop the commands of a revoked or re-registered device", "device", id, "err", err)
		}
		// After the record says dropped (deliverOne checks it when it
		// registers an attempt): no further try under the old registration.
		s.mu.Lock()
		if cancel := s.sending[id]; cancel != nil {
			cancel()
		}
		s.mu.Unlock()
		s.sweepDevice(id, cleared) // confirm.go: every topic known, not only those sent since start
	}
	if s.subs != nil {
		s.subs.forget(devices)
	}
}

// Stats is a snapshot of the counters.
func (s *Service) Stats() Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stats
}

// Nudge makes Run deliver now (a new command, a link that came back).
func (s *Service) Nudge() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// Run polls and delivers until ctx ends. Platform read failures back off
// (internal/backoff) without holding up the delivery of what is already
// learned.
func (s *Service) Run(ctx context.Context) error {
	tick := time.NewTicker(s.o.PollInterval)
	defer tick.Stop()
	if s.subs != nil {
		// Subscriptions beside the polling (subscribe.go); deleted on a
		// clean stop before Run returns.
		subCtx, cancel := context.WithCancel(ctx)
		done := make(chan struct{})
		go func() { defer close(done); s.subs.run(subCtx) }()
		defer func() { cancel(); <-done }()
	}
	var nextPoll time.Time
	for {
		if now := s.o.Now(); !now.Before(nextPoll) {
			if err := s.pollRound(ctx); err != nil {
				if ctx.Err() != nil {
					return nil
				}
				d := s.bo.Fail()
				nextPoll = now.Add(d)
				s.limited.Log(ctx, slog.LevelWarn, "poll", "reading actuators back through the broker filter failed; retrying",
					"err", err, "retry_in", d.Round(time.Millisecond))
			} else {
				s.bo.Reset()
				// A Nudge (a local command) delivers at once but does not
				// make the platform be read more often than about once per
				// interval.
				nextPoll = now.Add(s.o.PollInterval / 2)
			}
		}
		s.deliverAll(ctx)
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		case <-s.wake:
		}
	}
}

// Commands lists every command record of the devices in the policy in
// force, by device and attribute (for status and tests).
func (s *Service) Commands() ([]Command, error) {
	var out []Command
	for _, d := range s.o.Policy.Current().Devices() {
		r, err := s.record(d.ID)
		if err != nil {
			return nil, err
		}
		s.mu.Lock()
		for _, c := range r.Attrs {
			out = append(out, *c)
		}
		s.mu.Unlock()
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Device != out[j].Device {
			return out[i].Device < out[j].Device
		}
		return out[i].Attr < out[j].Attr
	})
	return out, nil
}

func (s *Service) count(f func(*Stats)) {
	s.mu.Lock()
	f(&s.stats)
	s.mu.Unlock()
}
