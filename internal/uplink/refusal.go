package uplink

import (
	"maps"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/edgegate/edgegate/internal/backoff"
	"github.com/edgegate/edgegate/internal/queue"
)

// Refusals of a listed device.
//
// The Orion Broker Filter caches its answer per element and user for 3
// minutes, negative ones included (SNAP4CITY.md; AccessTokenAuthentication
// Filter.java): a device registered or delegated a moment ago is refused
// with 401 "The passed credentials does not have any ownerships or
// delegations on the device" until the cached refusal expires. Such a
// refusal holds back that device's lane only (the broker and the other
// devices keep flowing), retried with its own backoff, for
// Options.RefusalWindow from the device's first refusal; after that its
// readings are dead-lettered, each at its first refusal, until one is
// accepted again. A device quiet for longer than the window starts a new
// window at its next refusal.

// refusal is the state of one refused lane; owned by the run goroutine.
type refusal struct {
	first, last time.Time // first and latest refusal of this run
	until       time.Time // not retried before
	bo          *backoff.Backoff
}

// refusalState says whether lane l is held back now, and whether its
// refusal window is over (a refusal then dead-letters).
func (d *dispatcher) refusalState(l queue.Lane, now time.Time) (held, expired bool) {
	st := d.refusals[l]
	if st == nil {
		return false, false
	}
	w := d.u.opts.RefusalWindow
	return now.Before(st.until), w >= 0 && now.Sub(st.first) >= w
}

// holdRefused records a refusal of r's lane within its window and holds
// the lane back for the lane's next backoff delay.
func (d *dispatcher) holdRefused(r result) {
	now := d.u.opts.Now()
	st := d.refusals[r.lane]
	if st == nil || now.Sub(st.last) > d.u.opts.RefusalWindow {
		if len(d.refusals) >= maxRefusedLanes {
			// Bound the state: forget the quietest lane.
			var oldest queue.Lane
			var t time.Time
			for l, s := range d.refusals {
				if t.IsZero() || s.last.Before(t) {
					oldest, t = l, s.last
				}
			}
			delete(d.refusals, oldest)
		}
		st = &refusal{first: now, bo: d.u.newBackoff()}
		d.refusals[r.lane] = st
	}
	st.last = now
	delay := st.bo.FailAtLeast(r.v.retryAfter)
	st.until = now.Add(delay)
	if last, ok := d.laneWarn[r.lane]; ok && now.Sub(last) < logEvery {
		return
	}
	d.laneWarn[r.lane] = now
	left := d.u.opts.RefusalWindow - now.Sub(st.first)
	d.log.Warn("broker refused the device; retrying it within the refusal window (the filter caches answers for 3 minutes)",
		"device", r.lane.Device, "seq", r.item.Seq, "reason", r.v.reason,
		"retry_in", delay.Round(time.Millisecond), "window_left", max(left, 0).Round(time.Second))
}

// nextRelease is how long until the first held lane may be tried again
// (0: none is held).
func (d *dispatcher) nextRelease() time.Duration {
	if len(d.refusals) == 0 {
		return 0
	}
	now := d.u.opts.Now()
	var next time.Duration
	for _, l := range d.lanes {
		st := d.refusals[l]
		if st == nil || d.busy[l] {
			continue
		}
		w := st.until.Sub(now)
		if w <= 0 {
			return 0 // free now: fill takes it
		}
		if next == 0 || w < next {
			next = w
		}
	}
	return next
}

// noteMissing counts the attributes the broker did not store for r's
// device and remembers them for `edgegate status`.
func (d *dispatcher) noteMissing(r result) {
	u := d.u
	if m := u.opts.Metrics; m != nil {
		m.MissingAttrs.Add(float64(len(r.v.missing)))
	}
	if len(r.items) > 1 {
		return // a batch: the names are not attributed to a device
	}
	now := u.opts.Now()
	if u.missing.note(r.lane.Device, r.v.missing, now) {
		d.log.Warn("the device's entity lacks attributes; the broker did not store them (add them to the device's model)",
			"device", r.lane.Device, "attributes", r.v.missing)
	}
}

// DeviceMissing names attributes a device sends that its entity at the
// broker lacks (Orion answered 422 PartialUpdate or Unprocessable).
type DeviceMissing struct {
	Device string
	Attrs  []string // sorted
	// Count is how many attribute values were not stored since First.
	Count       uint64
	First, Last time.Time
}

const (
	maxMissingDevices = 256
	maxMissingNames   = 16
	missingForget     = 24 * time.Hour
)

// missingAttrs is a small bounded per-device record, shared by the
// dispatchers and read by the admin API.
type missingAttrs struct {
	mu sync.Mutex
	m  map[string]*DeviceMissing
}

func newMissingAttrs() *missingAttrs { return &missingAttrs{m: make(map[string]*DeviceMissing)} }

// note records names for device; it reports whether any name is new (to
// log once, not per reading).
func (s *missingAttrs) note(device string, names []string, now time.Time) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	e := s.m[device]
	if e == nil {
		if len(s.m) >= maxMissingDevices {
			s.evict(now)
		}
		e = &DeviceMissing{Device: device, First: now}
		s.m[device] = e
	}
	e.Last = now
	e.Count += uint64(len(names))
	added := false
	for _, n := range names {
		if i, found := slices.BinarySearch(e.Attrs, n); !found && len(e.Attrs) < maxMissingNames {
			e.Attrs = slices.Insert(e.Attrs, i, n)
			added = true
		}
	}
	return added
}

// evict forgets devices not seen for missingForget, or else the one seen
// longest ago.
func (s *missingAttrs) evict(now time.Time) {
	maps.DeleteFunc(s.m, func(_ string, e *DeviceMissing) bool { return now.Sub(e.Last) > missingForget })
	if len(s.m) < maxMissingDevices {
		return
	}
	var oldest *DeviceMissing
	for _, e := range s.m {
		if oldest == nil || e.Last.Before(oldest.Last) {
			oldest = e
		}
	}
	delete(s.m, oldest.Device)
}

// MissingAttributes lists, by device, the attributes the brokers did not
// store because the devices' entities lack them, seen in the last 24
// hours (at most 256 devices, 16 names each).
func (u *Uplink) MissingAttributes() []DeviceMissing {
	s := u.missing
	now := u.opts.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]DeviceMissing, 0, len(s.m))
	for _, e := range s.m {
		if now.Sub(e.Last) <= missingForget {
			c := *e
			c.Attrs = slices.Clone(e.Attrs)
			out = append(out, c)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Device < out[j].Device })
	return out
}
