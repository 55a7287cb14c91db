package command

import (
	"context"
	"errors"
	"log/slog"
	"sort"
	"sync"
	"time"

	"github.com/edgegate/edgegate/internal/backoff"
	"github.com/edgegate/edgegate/policy"
)

// Two things the downlink must not get wrong after the device acted:
//
// A stale confirmation. The device's confirmation (its reported state) is
// written to the same attribute an IoT App writes its targets to, and
// Orion has no conditional update: an update replaces the attribute
// whatever it holds (orion-api.md "Update Existing Entity Attributes
// PATCH /v2/entities/{entityId}/attrs" takes no precondition; no If-Match
// or ETag anywhere in the API; the update operators of "Update operators
// for attribute values" — $inc, $max, $set, … — compute from the stored
// value but none compares it). So a confirmation queued while the uplink
// is down would, when the queue drains, overwrite a newer target the
// owner wrote meanwhile, and the gateway would read back its own signed
// state: the owner's write lost. Hence a confirmation stays in the
// command's record (durable) and goes to the pipeline only right after a
// fresh read of the entity through the filter shows no newer target for
// its attribute; if one is there, it is learned as the next command (the
// older confirmation is dropped with the older command it confirmed), and
// the device ends in the newest target, whose own confirmation is checked
// the same way. With the platform unreachable the read fails and the
// confirmation waits, backing off like the poll. What remains is the time
// between that read and the uplink's write (the pipeline's queue and one
// PATCH): an App write landing exactly then is still overwritten, and is
// seen by the App as the device's state, which it can set again.
//
// A stale retained command. Mosquitto keeps retained messages across its
// and the gateway's restarts and cannot list them. Every attribute whose
// command was published retained is marked held in the device's record
// before the publish and unmarked only once its clear succeeded; a clear
// the broker could not take yet (not connected: the ingest client
// connects after the service starts) is retried every round, and at
// start every command topic the gateway knows — the held ones, the
// attributes of the device's record, the writable attributes its policy
// lists — that has no live command is cleared, for listed devices and for
// devices that left the policy while the gateway was down (the record
// index), so a command confirmed, expired or dropped before a restart is
// never delivered after it.

// confirmState is the service's state for both (its zero value is ready).
type confirmState struct {
	mu      sync.Mutex
	started bool                 // the start-up sweep was queued
	clears  map[string]clearItem // device/attr → a clear still to make
	// Reads of the platform for confirmations back off on their own.
	readBo   *backoff.Backoff
	nextRead time.Time
}

type clearItem struct {
	dev  *policy.Device
	attr string
}

// TryClearer is an optional capability of a Deliverer that is a Clearer:
// clear and report whether the link took it (the external Mosquitto may
// be unreachable; the clear is then tried again).
type TryClearer interface {
	TryClear(device, attr string) error
}

// report hands the device's confirmation of c to the pipeline once a
// fresh read of the entity shows no newer target for c.Attr (see above).
func (s *Service) report(ctx context.Context, d *policy.Device, c Command) {
	if s.o.Tokens == nil {
		// No reads of the platform configured: nothing newer can be known.
		s.writeBack(ctx, d, c)
		return
	}
	now := s.o.Now()
	s.cs.mu.Lock()
	if s.cs.readBo == nil {
		s.cs.readBo = backoff.New(s.o.MinBackoff, s.o.MaxBackoff)
	}
	wait := now.Before(s.cs.nextRead)
	s.cs.mu.Unlock()
	if wait {
		return
	}
	body, err := s.get(ctx, d)
	s.countPoll(err)
	var one errEntity
	switch {
	case err == nil:
	case errors.As(err, &one):
		// The entity itself cannot be read (refused, gone): no target can
		// be learned from it either, so none can be newer. Written back as
		// the link reported it.
		s.limited.Log(ctx, slog.LevelWarn, "entity:"+d.ID, "could not read the actuator's entity before writing its state back", "device", d.ID, "err", err)
		s.writeBack(ctx, d, c)
		return
	default:
		if ctx.Err() != nil {
			return
		}
		s.cs.mu.Lock()
		w := s.cs.readBo.Fail()
		s.cs.nextRead = now.Add(w)
		s.cs.mu.Unlock()
		s.limited.Log(ctx, slog.LevelWarn, "confirm:"+d.ID, "the device's reported state waits until the platform can be read (a newer target may be there)",
			"device", d.ID, "attr", c.Attr, "seq", c.Seq, "err", err, "retry_in", w.Round(time.Millisecond))
		return
	}
	s.cs.mu.Lock()
	s.cs.readBo.Reset()
	s.cs.nextRead = time.Time{}
	s.cs.mu.Unlock()
	found, err := readEntity(body, d, s.o.SignatureMeta)
	if err != nil {
		s.limited.Log(ctx, slog.LevelWarn, "entity:"+d.ID, "the actuator's entity read back is unusable; its state is written back", "device", d.ID, "err", err)
		s.writeBack(ctx, d, c)
		return
	}
	for _, f := range found {
		if f.attr != c.Attr || f.reported {
			continue
		}
		// An unsigned target: the one c was learned from (its mark is the
		// attribute's last) or a newer one, which learn takes.
		learned, err := s.learn(d.ID, f.attr, f.typ, f.value, f.mark, "platform", now)
		if err != nil {
			s.log.Warn("record a command learned before a write-back", "device", d.ID, "err", err)
			return // the confirmation stays; tried again next round
		}
		if learned {
			s.count(func(st *Stats) { st.Learned++; st.Superseded++ })
			s.log.Info("a newer target was set while the device's state waited to go up: that state is not written back, the new target is delivered",
				"device", d.ID, "attr", c.Attr, "seq", c.Seq)
			s.Nudge()
			return
		}
	}
	s.writeBack(ctx, d, c)
}

// held reports whether attr of device is marked held.
func (s *Service) held(device, attr string) bool {
	r, err := s.record(device)
	if err != nil {
		return true // unknown: a clear too many is harmless
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return r.Held[attr]
}

// hold marks attr of device held by its link before a retained publish.
func (s *Service) hold(device, attr string) error {
	return s.update(device, func(r *record) bool {
		if r.Held[attr] {
			return false
		}
		if r.Held == nil {
			r.Held = map[string]bool{}
		}
		r.Held[attr] = true
		return true
	})
}

// clear tells the device's link to forget what it holds for attr (a
// retained MQTT command); a clear the link cannot take now is retried
// every round. A device no longer in the policy is routed as a bare id:
// only a link that holds commands (MQTT) has anything to clear.
func (s *Service) clear(device, attr string) {
	d, ok := s.o.Policy.Current().Device(device)
	if !ok {
		d = &policy.Device{ID: device}
	}
	_ = s.clearOn(d, attr)
}

func (s *Service) clearOn(d *policy.Device, attr string) error {
	key := d.ID + "/" + attr
	r, err := s.record(d.ID)
	if err != nil {
		return err
	}
	s.mu.Lock()
	live := false
	if c := r.Attrs[attr]; c != nil && c.State.open() {
		// A live command: published (the retained message is it) or about
		// to be (its publish replaces what is retained). A sweep queued
		// before it was learned must not clear it; if it expires unsent,
		// its expiry clears what is held.
		live = true
	} else {
		delete(s.holding, key)
	}
	s.mu.Unlock()
	if live || s.o.Route == nil {
		s.unqueueClear(key)
		return nil
	}
	dl := s.o.Route(d)
	cl, ok := dl.(Clearer)
	if ok {
		if tc, ok := dl.(TryClearer); ok {
			err = tc.TryClear(d.ID, attr)
		} else {
			cl.Clear(d.ID, attr)
		}
	}
	if err != nil {
		s.cs.mu.Lock()
		if s.cs.clears == nil {
			s.cs.clears = map[string]clearItem{}
		}
		s.cs.clears[key] = clearItem{dev: d, attr: attr}
		s.cs.mu.Unlock()
		s.limited.Log(context.Background(), slog.LevelWarn, "clear:"+d.ID, "a retained command could not be cleared yet; retrying",
			"device", d.ID, "attr", attr, "err", err)
		return err
	}
	s.unqueueClear(key)
	if err := s.update(d.ID, func(r *record) bool {
		if !r.Held[attr] {
			return false
		}
		delete(r.Held, attr)
		return true
	}); err != nil {
		s.log.Warn("record a retained command cleared", "device", d.ID, "err", err)
	}
	return nil
}

func (s *Service) unqueueClear(key string) {
	s.cs.mu.Lock()
	delete(s.cs.clears, key)
	s.cs.mu.Unlock()
}

// sweepDevice clears every command topic of device the gateway knows
// that carries no live command: after a revocation or a re-registration
// (Forget) nothing published under the old registration may reach the
// new one. extra are attributes the caller knows were published.
func (s *Service) sweepDevice(device string, extra []string) {
	d, listed := s.o.Policy.Current().Device(device)
	if !listed {
		d = &policy.Device{ID: device}
	}
	for _, a := range s.knownAttrs(d, listed, extra) {
		_ = s.clearOn(d, a)
	}
}

// knownAttrs are the command topics of d the gateway may have published
// on: held ones, those of its record's commands that were sent, and for a
// device the policy lists (whose link is known) every attribute its record
// or its policy names.
func (s *Service) knownAttrs(d *policy.Device, listed bool, extra []string) []string {
	set := map[string]bool{}
	for _, a := range extra {
		set[a] = true
	}
	if r, err := s.record(d.ID); err == nil {
		s.mu.Lock()
		for a := range r.Held {
			set[a] = true
		}
		for a, c := range r.Attrs {
			if listed || c.State == Sent {
				set[a] = true
			}
		}
		s.mu.Unlock()
	}
	if listed {
		for _, a := range d.Writable {
			set[a] = true
		}
	}
	out := make([]string, 0, len(set))
	for a := range set {
		out = append(out, a)
	}
	sort.Strings(out)
	return out
}

// sweepRetained runs at each delivery round: at the first, it clears the
// stale retained commands (above); then it retries the clears that
// failed.
func (s *Service) sweepRetained(ctx context.Context) {
	s.cs.mu.Lock()
	first := !s.cs.started
	s.cs.started = true
	s.cs.mu.Unlock()
	if first {
		s.startSweep(ctx)
	}
	s.cs.mu.Lock()
	items := make([]clearItem, 0, len(s.cs.clears))
	for _, it := range s.cs.clears {
		items = append(items, it)
	}
	s.cs.mu.Unlock()
	for _, it := range items {
		if ctx.Err() != nil {
			return
		}
		if s.clearOn(it.dev, it.attr) != nil {
			return // the link is still away: the rest waits for the next round
		}
	}
}

// startSweep queues a clear of every known command topic without a live
// command: of the listed devices whose link holds commands, and of the
// indexed devices the policy no longer lists.
func (s *Service) startSweep(ctx context.Context) {
	if s.o.Route == nil {
		return
	}
	pol := s.o.Policy.Current()
	listed := map[string]bool{}
	queue := func(d *policy.Device, attrs []string) {
		s.cs.mu.Lock()
		defer s.cs.mu.Unlock()
		if s.cs.clears == nil {
			s.cs.clears = map[string]clearItem{}
		}
		for _, a := range attrs {
			s.cs.clears[d.ID+"/"+a] = clearItem{dev: d, attr: a}
		}
	}
	for _, d := range pol.Devices() {
		listed[d.ID] = true
		if _, ok := s.o.Route(d).(Clearer); !ok || !d.Commandable() {
			continue
		}
		queue(d, s.knownAttrs(d, true, nil))
	}
	ids, err := s.indexed()
	if err != nil {
		s.limited.Log(ctx, slog.LevelWarn, "index", "read the command index; retained commands of devices gone from the policy are not swept", "err", err)
		return
	}
	var gone []string
	for _, id := range ids {
		if !listed[id] {
			gone = append(gone, id)
		}
	}
	// Gone from the policy while the gateway was down: as a revocation,
	// its open commands are dropped and what its link may hold cleared
	// (a clear Mosquitto cannot take yet is retried).
	s.Forget(gone)
}
