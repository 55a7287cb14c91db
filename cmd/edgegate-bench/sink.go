package main

import (
	"encoding/json"
	"slices"
	"sync"
	"time"

	"github.com/edgegate/edgegate/internal/sim/centralsim"
)

// sink records, at the simulated broker, every accepted update: how many,
// when the first and last arrived, and the latency publish -> broker from
// the "t0" attribute (unix nanos) the publisher put in the payload.
type sink struct {
	mu        sync.Mutex
	n, dups   int
	invalid   int
	first     time.Time
	last      time.Time
	lat       []time.Duration
	recordLat bool
	changed   chan struct{} // closed and replaced at each update batch
}

func newSink() *sink { return &sink{changed: make(chan struct{})} }

type numAttr struct {
	Value float64 `json:"value"`
}

func (s *sink) onUpdate(u centralsim.Update) {
	now := time.Now()
	var lat time.Duration
	if raw, ok := u.Attrs["t0"]; ok {
		var a numAttr
		if json.Unmarshal(raw, &a) == nil && a.Value > 0 {
			lat = now.Sub(time.Unix(0, int64(a.Value)))
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.n++
	if u.Duplicate {
		s.dups++
	}
	if u.Verdict != centralsim.VerdictValid {
		s.invalid++
	}
	if s.first.IsZero() {
		s.first = now
	}
	s.last = now
	if s.recordLat && lat > 0 {
		s.lat = append(s.lat, lat)
	}
	close(s.changed)
	s.changed = make(chan struct{})
}

// reset starts a new phase.
func (s *sink) reset(recordLat bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.n, s.dups, s.invalid = 0, 0, 0
	s.first, s.last = time.Time{}, time.Time{}
	s.lat = nil
	s.recordLat = recordLat
}

func (s *sink) count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.n
}

type sinkStats struct {
	N, Dups, Invalid int
	First, Last      time.Time
	P50, P99, Max    time.Duration
}

func (s *sink) stats() sinkStats {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := sinkStats{N: s.n, Dups: s.dups, Invalid: s.invalid, First: s.first, Last: s.last}
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
