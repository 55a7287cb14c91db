package command

import (
	"bytes"
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"time"

	"github.com/edgegate/edgegate/internal/reading"
)

// record is one device's commands: one store record per device
// ("command/<device>"), written whole by PutState (atomic), so a crash
// leaves the old or the new record, never a mix, and sequence numbers,
// newest values and states move together.
type record struct {
	V   int    `json:"v"`
	Seq uint64 `json:"seq"` // the highest Seq given to a command of the device
	// Attrs holds the newest command per attribute: a newer one replaces
	// an older one, which is then never sent.
	Attrs map[string]*Command `json:"attrs"`
	// Marks are, per attribute, the platform's target last learned (see
	// mark): the same target read again is not a new command.
	Marks map[string]string `json:"marks,omitempty"`
	// Held names the attributes whose command the device's link may still
	// hold (an MQTT command published retained and not yet cleared). Set
	// before the publish and removed only once a clear succeeded, so a
	// crash, a restart or a broker that was unreachable at the clear leaves
	// it set and the clear is tried again (confirm.go sweep): Mosquitto
	// keeps retained messages across its and the gateway's restarts and
	// cannot list them.
	Held map[string]bool `json:"held,omitempty"`

	// fresh: no record was stored for the device yet (not serialised);
	// its first write adds it to the index.
	fresh bool
}

const (
	recordPrefix = "command/"
	// indexRecord lists the devices that have a command record, so that
	// one whose device left the policy while the gateway was down can
	// still be found (and its retained commands cleared) at start: the
	// store's state records cannot be listed.
	indexRecord = "command-index"
	// maxIndexBytes bounds the index (about 30k device ids).
	maxIndexBytes = 1 << 20
	// maxRecordBytes bounds one device's record (a few attributes).
	maxRecordBytes = 256 << 10
)

// record returns the device's record, loading it once.
func (s *Service) record(device string) (*record, error) {
	s.mu.Lock()
	r := s.recs[device]
	s.mu.Unlock()
	if r != nil {
		return r, nil
	}
	b, ok, err := s.o.Store.GetState(recordPrefix + device)
	if err != nil {
		return nil, fmt.Errorf("read the commands of %s: %w", device, err)
	}
	r = &record{V: 1, Attrs: map[string]*Command{}, Marks: map[string]string{}, Held: map[string]bool{}, fresh: !ok}
	if ok {
		if len(b) > maxRecordBytes {
			return nil, fmt.Errorf("the command record of %s is %d bytes, over %d", device, len(b), maxRecordBytes)
		}
		if err := json.Unmarshal(b, r); err != nil {
			return nil, fmt.Errorf("the command record of %s is not valid JSON: %w", device, err)
		}
		if r.Attrs == nil {
			r.Attrs = map[string]*Command{}
		}
		if r.Marks == nil {
			r.Marks = map[string]string{}
		}
		if r.Held == nil {
			r.Held = map[string]bool{}
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if cur := s.recs[device]; cur != nil {
		return cur, nil
	}
	s.recs[device] = r
	return r, nil
}

// update applies fn to a copy of the device's record and stores it; the
// copy becomes current only once stored. fn reports whether it changed
// anything (nothing to write otherwise).
func (s *Service) update(device string, fn func(r *record) bool) error {
	// record loads it into s.recs once; the current one is read again under
	// the lock, since another update may have replaced it meanwhile.
	if _, err := s.record(device); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	cur := s.recs[device]
	next := &record{V: 1, Seq: cur.Seq, Attrs: make(map[string]*Command, len(cur.Attrs)), Marks: maps.Clone(cur.Marks),
		Held: maps.Clone(cur.Held)}
	for k, c := range cur.Attrs {
		cc := *c
		next.Attrs[k] = &cc
	}
	if !fn(next) {
		return nil
	}
	b, err := json.Marshal(next)
	if err != nil {
		return err
	}
	if len(b) > maxRecordBytes {
		return fmt.Errorf("the command record of %s would be %d bytes, over %d", device, len(b), maxRecordBytes)
	}
	if cur.fresh {
		// Indexed before the record is: a crash in between leaves an
		// index entry without a record (harmless), never the reverse.
		if err := s.indexLocked(device); err != nil {
			return err
		}
	}
	if err := s.o.Store.PutState(recordPrefix+device, b); err != nil {
		return fmt.Errorf("write the commands of %s: %w", device, err)
	}
	s.recs[device] = next
	return nil
}

// learn records a new target for attr of device, unless mark is the one
// already learned for it (mark "" for local commands: always new). The
// newest command replaces the attribute's previous one, whatever its
// state: an older value is never sent once a newer one is known.
func (s *Service) learn(device, attr, typ string, value json.RawMessage, mark, origin string, now time.Time) (learned bool, err error) {
	err = s.update(device, func(r *record) bool {
		if mark != "" && r.Marks[attr] == mark {
			return false
		}
		if mark != "" {
			r.Marks[attr] = mark
		}
		if old := r.Attrs[attr]; old != nil && (old.State.open() || len(old.Reported) > 0) {
			// An older command not delivered, or delivered with its
			// confirmation still waiting to go up: that confirmation is
			// dropped with it (confirm.go), the newer target wins.
			s.stats.Superseded++
		}
		r.Seq++
		r.Attrs[attr] = &Command{Device: device, Attr: attr, Type: typ, Value: bytes.Clone(value), Seq: r.Seq,
			Origin: origin, Learned: now.UTC(), Expires: now.Add(s.o.TTL).UTC(), State: Pending}
		learned = true
		return true
	})
	return learned, err
}

// settle moves the command of attr with seq to state; a command replaced
// meanwhile (another seq) is left alone.
func (s *Service) settle(device, attr string, seq uint64, state State, why string, attempt bool, now time.Time) error {
	return s.update(device, func(r *record) bool {
		c := r.Attrs[attr]
		if c == nil || c.Seq != seq || c.State == Expired || c.State == Dropped {
			// Replaced, or settled for good meanwhile (a revocation
			// during a delivery attempt): left as it is.
			return false
		}
		if attempt {
			c.Attempts++
		}
		if c.State == state && c.Why == why && !attempt {
			return false
		}
		c.State, c.Why = state, why
		if state != Pending && c.Done.IsZero() {
			c.Done = now.UTC()
		}
		return true
	})
}

// delivered records the device's ack: state Delivered, with the
// confirmation to write back (if any) kept until it is queued.
func (s *Service) delivered(device, attr string, seq uint64, res Result, now time.Time) error {
	return s.update(device, func(r *record) bool {
		c := r.Attrs[attr]
		if c == nil || c.Seq != seq || c.State == Expired || c.State == Dropped {
			return false
		}
		c.Attempts++
		c.State, c.Why = Delivered, ""
		if c.Done.IsZero() {
			c.Done = now.UTC()
		}
		if len(res.Reported) > 0 {
			c.Reported, c.Source = bytes.Clone(res.Reported), res.Source
		}
		return true
	})
}

// writtenBack forgets the confirmation once the pipeline queued it.
func (s *Service) writtenBack(device, attr string, seq uint64) error {
	return s.update(device, func(r *record) bool {
		c := r.Attrs[attr]
		if c == nil || c.Seq != seq || c.Reported == nil {
			return false
		}
		c.Reported, c.Source = nil, reading.Source{}
		return true
	})
}

// indexed lists the devices the index holds (indexRecord).
func (s *Service) indexed() ([]string, error) {
	b, ok, err := s.o.Store.GetState(indexRecord)
	if err != nil || !ok {
		return nil, err
	}
	if len(b) > maxIndexBytes {
		return nil, fmt.Errorf("the command index is %d bytes, over %d", len(b), maxIndexBytes)
	}
	var ids []string
	if err := json.Unmarshal(b, &ids); err != nil {
		return nil, fmt.Errorf("the command index is not valid JSON: %w", err)
	}
	return ids, nil
}

// indexLocked adds device to the index (s.mu held: updates are serialised).
func (s *Service) indexLocked(device string) error {
	ids, err := s.indexed()
	if err != nil {
		return err
	}
	if slices.Contains(ids, device) {
		return nil
	}
	b, err := json.Marshal(append(ids, device))
	if err != nil {
		return err
	}
	if len(b) > maxIndexBytes {
		return fmt.Errorf("the command index would be %d bytes, over %d", len(b), maxIndexBytes)
	}
	if err := s.o.Store.PutState(indexRecord, b); err != nil {
		return fmt.Errorf("write the command index: %w", err)
	}
	return nil
}
