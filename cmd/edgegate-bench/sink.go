package main

import (
	"encoding/json"
	"slices"
	"sync"
	"time"

	"github.com/edgegate/edgegate/internal/sim/centralsim"
)

// sink records, at the simulated broker (and, for `edgegate-bench peers`,
// at Telegraf's HTTPS endpoint and at a raw subscriber), every accepted
// reading: how many, when the first and last arrived, the latency publish
// -> accepted from the "t0" value (unix nanos) the publisher put in the
// payload, and, per device, which of the publisher's sequence numbers ("n")
// arrived, how often and in which order.
type sink struct {
	mu        sync.Mutex
	n, dups   int
	invalid   int
	verified  int    // signatures checked and valid (the light sink's sample)
	why       string // the first invalid signature's reason
	first     time.Time
	last      time.Time
	lat       []time.Duration
	recordLat bool
	changed   chan struct{} // closed and replaced at each update batch
	devs      map[string]*devSeq
	noSeq     int // readings without a device or a sequence number
}

// devSeq is what one device's readings looked like on arrival.
type devSeq struct {
	seen map[int64]int      // receipts per sequence number
	max  int64              // highest sequence number received so far
	ooo  map[int64]struct{} // numbers whose first receipt came after a higher one's
}

func newSink() *sink { return &sink{changed: make(chan struct{})} }

// newSeqSink is a sink that also tracks each device's sequence numbers
// (`edgegate-bench peers`); `make bench` does without, its backlog drains
// a million readings through the sink.
func newSeqSink() *sink {
	return &sink{changed: make(chan struct{}), devs: map[string]*devSeq{}}
}

type numAttr struct {
	Value float64 `json:"value"`
}

// attrNum reads an NGSI attribute's numeric value ({"value": N, ...}).
func attrNum(raw json.RawMessage) (float64, bool) {
	var a numAttr
	if raw == nil || json.Unmarshal(raw, &a) != nil {
		return 0, false
	}
	return a.Value, true
}

func (s *sink) onUpdate(u centralsim.Update) {
	now := time.Now()
	t0, _ := attrNum(u.Attrs["t0"])
	n, hasN := attrNum(u.Attrs["n"])
	s.mu.Lock()
	defer s.mu.Unlock()
	if u.Duplicate {
		s.dups++
	}
	if u.Verdict != centralsim.VerdictValid {
		s.invalid++
	}
	s.addLocked(now, u.Device, int64(n), hasN, int64(t0))
}

// addVerdict counts one sampled signature check (lightsink.go).
func (s *sink) addVerdict(ok bool, detail string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if ok {
		s.verified++
		return
	}
	s.invalid++
	if s.why == "" {
		s.why = detail
	}
}

// add records one reading of device dev with sequence number n (hasN:
// whether the reading carried one) published at t0 (unix nanos, 0: none),
// accepted at now.
func (s *sink) add(now time.Time, dev string, n int64, hasN bool, t0 int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.addLocked(now, dev, n, hasN, t0)
}

func (s *sink) addLocked(now time.Time, dev string, n int64, hasN bool, t0 int64) {
	s.n++
	if s.first.IsZero() {
		s.first = now
	}
	s.last = now
	if lat := now.Sub(time.Unix(0, t0)); s.recordLat && t0 > 0 && lat > 0 {
		s.lat = append(s.lat, lat)
	}
	switch {
	case s.devs == nil:
	case dev == "" || !hasN:
		s.noSeq++
	default:
		d := s.devs[dev]
		if d == nil {
			d = &devSeq{seen: map[int64]int{}, max: -1, ooo: map[int64]struct{}{}}
			s.devs[dev] = d
		}
		c := d.seen[n]
		d.seen[n] = c + 1
		if c == 0 && n < d.max {
			d.ooo[n] = struct{}{}
		}
		d.max = max(d.max, n)
	}
	close(s.changed)
	s.changed = make(chan struct{})
}

// reset starts a new phase.
func (s *sink) reset(recordLat bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.n, s.dups, s.invalid, s.verified, s.noSeq = 0, 0, 0, 0, 0
	s.why = ""
	s.first, s.last = time.Time{}, time.Time{}
	s.lat = nil
	s.recordLat = recordLat
	if s.devs != nil {
		s.devs = map[string]*devSeq{}
	}
}

func (s *sink) count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.n
}

// seqCounts is what arrived of a phase's published readings, from the
// sequence numbers: the publisher numbers device i's k-th reading of a
// phase base + k*m + i (m devices; fleet.publish).
type seqCounts struct {
	Published  int `json:"published"`    // sent by the devices
	Received   int `json:"received"`     // distinct published readings that arrived
	Duplicates int `json:"duplicates"`   // receipts beyond the first of a reading
	Lost       int `json:"lost"`         // published, never received
	OutOfOrder int `json:"out_of_order"` // arrived after a later reading of the same device
	Stray      int `json:"stray"`        // arrived but not published in this phase (or no device / sequence)
}

// tally counts the phase whose readings are numbered from base: sent[i]
// readings of device ids[i].
func (s *sink) tally(base int64, ids []string, sent []int) seqCounts {
	s.mu.Lock()
	defer s.mu.Unlock()
	var c seqCounts
	c.Stray = s.noSeq
	m := int64(len(ids))
	idx := make(map[string]int, len(ids))
	for i, id := range ids {
		idx[id] = i
		c.Published += sent[i]
	}
	for dev, d := range s.devs {
		i, known := idx[dev]
		for n, k := range d.seen {
			rel := n - base
			if !known || rel < 0 || rel%m != int64(i) || rel/m >= int64(sent[i]) {
				c.Stray += k
				continue
			}
			c.Received++
			c.Duplicates += k - 1
			if _, late := d.ooo[n]; late {
				c.OutOfOrder++
			}
		}
	}
	c.Lost = c.Published - c.Received
	return c
}

type sinkStats struct {
	N, Dups, Invalid int
	Verified         int    // sampled signatures that verified
	InvalidWhy       string // the first invalid one's reason
	First, Last      time.Time
	P50, P99, Max    time.Duration
}

func (s *sink) stats() sinkStats {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := sinkStats{N: s.n, Dups: s.dups, Invalid: s.invalid, Verified: s.verified, InvalidWhy: s.why, First: s.first, Last: s.last}
	if len(s.lat) > 0 {
		l := slices.Clone(s.lat)
		slices.Sort(l)
		st.P50 = l[len(l)/2]
		st.P99 = l[min(len(l)-1, len(l)*99/100)]
		st.Max = l[len(l)-1]
	}
	return st
}

// waitFor waits until at least n updates arrived or the deadline passed;
// it reports whether n was reached.
func (s *sink) waitFor(n int, deadline time.Time) bool {
	for {
		s.mu.Lock()
		got, ch := s.n, s.changed
		s.mu.Unlock()
		if got >= n {
			return true
		}
		d := time.Until(deadline)
		if d <= 0 {
			return false
		}
		t := time.NewTimer(min(d, time.Second))
		select {
		case <-ch:
		case <-t.C:
		}
		t.Stop()
	}
}

// waitSettled waits until n updates arrived, or until none arrived for
// idle, or until limit passed; it reports whether n was reached.
func (s *sink) waitSettled(n int, idle, limit time.Duration) bool {
	end := time.Now().Add(limit)
	for {
		before := s.count()
		deadline := time.Now().Add(idle)
		if deadline.After(end) {
			deadline = end
		}
		if s.waitFor(n, deadline) {
			return true
		}
		if s.count() == before || time.Now().After(end) {
			return false
		}
	}
}
