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
//   - commits start at most once per CommitDelay: the wait runs until that
//     long after the previous commit began, not that long from now, so a
//     commit that itself took that long (a burst) is followed by the next
//     at once — the readings that came meanwhile already share it;
//   - the wait ends when the batch is full or that moment has come, not at
//     a pause in arrivals: readings forwarded by a broker, or scheduled on
//     shared cores, come in bunches milliseconds apart, and through
//     Mosquitto a pause of 4 smoothed gaps ended 1,182 of 1,183 waits
//     early (6.6 readings per sync at 1,500/s; 29.8 without that exit);
//   - a wait that gained nothing (one closed-loop producer, waiting for
//     this very commit before it sends again) turns waiting off for a
//     while — 100 ms, doubling while it repeats, up to 1.6 s — so it pays
//     one pause now and then, not one per commit. A while, not a number
//     of commits: the end of a burst ran a count up to 1,024 commits,
//     which the moderate stream after it spent without waiting.
//   - several closed-loop producers fill a wait at once and then nothing
//     comes: each gets one reading per CommitDelay (50/s at 20 ms), which
//     is the embedded broker's default rate limit per device
//     (mqtt.embedded.device_rate). Guessing them from a silent end of a
//     wait misjudged open streams: through Mosquitto readings come in
//     clumps ~12 ms apart, just after the previous commit's PUBACKs, and
//     a wait whose last three quarters were silent turned waiting off for
//     845 of 1,504 commits at 1,500/s (11.8 readings per sync, against
//     29.8 without the guess).
//
// PostgreSQL's commit_delay/commit_siblings is the same trade, with a
// count of active transactions where this uses the arrival gap.

// DefaultCommitDelay is the shortest time between the starts of two
// commits while readings keep coming (Options.CommitDelay).
//
// 20 ms: at 1,500 readings/s from 50 devices each sync is two msyncs of
// badger's memory-mapped logs, ~0.4 ms of CPU on the 2-core bench machine
// and the largest single cost of the daemon at that pace. With the wait
// measured from the previous commit's start, 20 ms gives ~30 readings per
// sync there, embedded or through Mosquitto, and no wait in a burst (a
// commit of a full batch takes longer than that). A device's PUBACK waits
// at most this long more, well under its retry timeouts and far below the
// ~100 ms that Telegraf's flush holds a reading.
const DefaultCommitDelay = 20 * time.Millisecond

const (
	// gapShift smooths arrival gaps: each new gap weighs 1/8.
	gapShift = 3
	// skipAfterIdle is how long commits go without waiting after a wait
	// that brought no reading; it doubles with each such wait in a row,
	// up to maxSkip, so one steady closed-loop producer spends ~1 % of its
	// time waiting (20 ms per 1.6 s).
	skipAfterIdle = 100 * time.Millisecond
	maxSkip       = 1600 * time.Millisecond
)

// groupCommit is the committer's state for adaptive waiting; only the
// committer goroutine (Run) touches it.
type groupCommit struct {
	maxWait  time.Duration
	gap      time.Duration // smoothed gap between arrivals
	last     time.Time     // arrival of the newest request seen
	started  time.Time     // when the previous commit began
	skipTill time.Time     // no waiting before then
	nextSkip time.Duration // skip after the next wait that gains nothing
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

// wait returns how long, from now, to wait for more readings for a batch
// of n, at most max: until maxWait after the previous commit began.
func (g *groupCommit) wait(now time.Time, n, max int) time.Duration {
	switch {
	case g.maxWait <= 0 || n >= max:
		return 0
	case now.Before(g.skipTill):
		return 0
	case 2*g.gap > g.maxWait:
		// Fewer than two more readings expected in the window.
		return 0
	}
	return min(g.started.Add(g.maxWait).Sub(now), g.maxWait)
}

// begin notes that a commit starts now: the next one waits from here.
func (g *groupCommit) begin(now time.Time) { g.started = now }

// fill adds to batch what arrives within the wait decided for it, and
// returns the batch. It never blocks longer than maxWait.
func (q *Queue) fill(ctx context.Context, batch []*request) []*request {
	g := q.gc
	now := time.Now()
	d := g.wait(now, len(batch), q.maxBatch)
	if d <= 0 {
		return batch
	}
	g.waits.Add(1)
	start := len(batch)
	if g.timer == nil {
		g.timer = time.NewTimer(d)
	} else {
		g.timer.Reset(d)
	}
	defer g.timer.Stop()
	for len(batch) < q.maxBatch {
		select {
		case r := <-q.reqs:
			g.observe(r)
			batch = append(batch, r)
			batch = q.drain(batch)
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

// gainedFrom counts what a wait gained and judges whether it paid.
func (q *Queue) gainedFrom(batch []*request, start int) []*request {
	n := len(batch) - start
	q.gc.gained.Add(uint64(n))
	q.gc.judge(time.Now(), n > 0)
	return batch
}

// judge takes a wait's outcome at now: one that gained nothing (paid
// false) turns waiting off for a while, longer each time in a row.
func (g *groupCommit) judge(now time.Time, paid bool) {
	if paid {
		g.nextSkip = skipAfterIdle
		return
	}
	g.skipTill = now.Add(g.nextSkip)
	g.nextSkip = min(2*g.nextSkip, maxSkip)
}
