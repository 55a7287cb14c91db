package queue

import (
	"context"
	"sync/atomic"
	"time"
)

// Adaptive group commit.
//
// The committer syncs once per batch, and a batch is whatever waited while
// the previous sync ran. Under a burst that is many readings; at moderate
// load (1.5k readings/s from 50 devices) it was 1.5–2, so the gateway paid
// one fsync per one or two readings. Waiting a bounded moment before the
// write lets several readings share one sync, at the cost of that moment
// of latency — but only when more readings are actually coming:
//
//   - the gap between arrivals (stamped in Enqueue, smoothed) must be well
//     under the longest wait, else the source is idle-ish and a reading is
//     committed at once (latency at low load stays what it was);
//   - the wait ends as soon as the batch is full, the longest wait is over,
//     or no reading came for a few expected gaps (the stream paused);
//   - a wait that gained nothing (closed-loop producers, each waiting for
//     this very commit before it sends again: nothing can arrive) turns
//     waiting off for the next skipAfterIdle commits, so such a producer
//     pays one short pause now and then, not one per reading.
//
// PostgreSQL's commit_delay/commit_siblings is the same trade, with a
// count of active transactions where this uses the arrival gap.

// DefaultCommitDelay is the longest the committer waits for more readings
// before a sync (Options.CommitDelay).
//
// 10 ms: at 1,500 readings/s from 50 devices, 5 ms made ~200 syncs a
// second, each two msyncs of badger's memory-mapped logs, and the syncs
// were the largest single cost of the daemon at that pace (11 % of its CPU
// in docs/bench/profiles/pace-before-embedded-batch-paced.top.txt). 20 ms
// made ~50 but cost ~10 % of the burst rate in `make bench-peers`
// (7,934 against 8,767 readings/s with the same linger, 2026-12-03); 10 ms
// kept the burst rate (9,034/s) at 241 CPU ms per 1,000 paced readings,
// against 273 with 5 ms. A device's PUBACK waits at most this long more,
// well under its retry timeouts.
const DefaultCommitDelay = 10 * time.Millisecond

const (
	// gapShift smooths arrival gaps: each new gap weighs 1/8.
	gapShift = 3
	// idleGaps: the wait ends when no reading came for this many
	// smoothed gaps.
	idleGaps = 4
	// minIdle bounds that pause from below: timer granularity.
	minIdle = 200 * time.Microsecond
	// skipAfterIdle is how many commits go without waiting after a wait
	// that brought no reading; it doubles with each such wait in a row,
	// up to maxSkip, so a steady closed loop almost never waits.
	skipAfterIdle = 32
	maxSkip       = 1024
)

// groupCommit is the committer's state for adaptive waiting; only the
// committer goroutine (Run) touches it.
type groupCommit struct {
	maxWait  time.Duration
	gap      time.Duration // smoothed gap between arrivals
	last     time.Time     // arrival of the newest request seen
	skip     int           // commits left without waiting
	nextSkip int           // skip after the next wait that gains nothing
	timer    *time.Timer   // reused across waits

	// Counted for tests and benchmarks (read from other goroutines):
	// syncs done, waits begun, and readings that arrived during waits.
	syncs, waits, gained atomic.Uint64
}

func newGroupCommit(maxWait time.Duration) *groupCommit {
	// Start as idle: the first readings after a start are not delayed.
	return &groupCommit{maxWait: maxWait, gap: time.Second, nextSkip: skipAfterIdle}
}

// observe folds one request's arrival into the smoothed gap.
func (g *groupCommit) observe(r *request) {
	if g.last.IsZero() {
		g.last = r.at
		return
	}
	gap := r.at.Sub(g.last)
	if gap < 0 {
		gap = 0 // stamped by concurrent producers: near enough together
	} else {
		g.last = r.at
	}
	g.gap += (gap - g.gap) >> gapShift
}

// wait returns how long to wait for more readings for a batch of n, at
// most max.
func (g *groupCommit) wait(n, max int) time.Duration {
	switch {
	case g.maxWait <= 0 || n >= max:
		return 0
	case g.skip > 0:
		g.skip--
		return 0
	case 2*g.gap > g.maxWait:
		// Fewer than two more readings expected in the window.
		return 0
	}
	return g.maxWait
}

// idle is how long a pause in arrivals ends a wait.
func (g *groupCommit) idle() time.Duration {
	return min(max(idleGaps*g.gap, minIdle), g.maxWait)
}

// fill adds to batch what arrives within the wait decided for it, and
// returns the batch. It never blocks longer than maxWait.
func (q *Queue) fill(ctx context.Context, batch []*request) []*request {
	g := q.gc
	d := g.wait(len(batch), q.maxBatch)
	if d <= 0 {
		return batch
	}
	g.waits.Add(1)
	start := len(batch)
	deadline := time.Now().Add(d)
	if g.timer == nil {
		g.timer = time.NewTimer(min(g.idle(), d))
	} else {
		g.timer.Reset(min(g.idle(), d))
	}
	defer g.timer.Stop()
	for len(batch) < q.maxBatch {
		select {
		case r := <-q.reqs:
			g.observe(r)
			batch = append(batch, r)
			batch = q.drain(batch)
			left := time.Until(deadline)
			if left <= 0 {
				return q.gainedFrom(batch, start)
			}
			g.timer.Reset(min(g.idle(), left))
		case <-g.timer.C:
			return q.gainedFrom(batch, start)
		case <-ctx.Done():
			return q.gainedFrom(batch, start)
		}
	}
	return q.gainedFrom(batch, start)
}

// drain adds the requests already waiting, without blocking.
func (q *Queue) drain(batch []*request) []*request {
	for len(batch) < q.maxBatch {
		select {
		case r := <-q.reqs:
			q.gc.observe(r)
			batch = append(batch, r)
		default:
			return batch
		}
	}
	return batch
}

func (q *Queue) gainedFrom(batch []*request, start int) []*request {
	n := len(batch) - start
	q.gc.gained.Add(uint64(n))
	if n == 0 {
		q.gc.skip = q.gc.nextSkip
		q.gc.nextSkip = min(2*q.gc.nextSkip, maxSkip)
	} else {
		q.gc.nextSkip = skipAfterIdle
	}
	return batch
}
