package queue

// Recent items in memory.
//
// In a live gateway the uplink reads a reading back within milliseconds of
// its commit. Read from the store, that is a value-log read of a ~1.2 KB
// encrypted value: decrypt, decode and, once the log was paged out
// (pageout_linux.go), a page fault to read it back — Peek was 13% of the
// gateway's CPU in batch mode (docs/bench/profiles/hot-before-batch.top.txt),
// and the re-read of the next head after each Delete cost as much again.
// So the committer keeps the items it publishes, per lane, up to
// recentBytes of bodies in all; Peek and the head after a Delete are
// served from there while the lane's whole live range is held.
//
// Invariant: a lane's recent list holds live, synced items in seq order,
// and every live item of the lane above recent[0].Seq; an item that does
// not fit, or is recentDepth ahead of the lane's head, ends the list (it
// is cleared, and starts again with a later item), and a removal drops
// every held item up to the seq removed, so the list is never missing an
// item it claims to cover. Past the budget (a
// backlog) items are read from the store as before; the budget bounds the
// memory whatever the backlog.

// recentBytes bounds the bodies held for all lanes: ~6,300 readings, the
// uplink's lag in a 50-device burst of the embedded broker (p50 0.7-0.9 s
// at 8k readings/s). With 2 MB the burst overflowed it, Peek read the
// value log back (9 % of the daemon's CPU flat in page faults, 22 % in
// all) and the mapped log pages were most of the peak RSS
// (docs/performance.md#memory).
const recentBytes = 8 << 20

// recentDepth: an item this many seqs or more ahead of its lane's head
// is not held, and ends the lane's list. That lane has a backlog (the
// uplink is down or far behind): the drain reads its head from the store
// anyway, and holding its tail would keep recentBytes of heap live for as
// long as the backlog lasts — under memory_limit 40 MiB, with badger's
// compactions, that halved the backlog's ingest rate (GC). In a burst a
// lane lags by 130-650 items (50 or 16 devices).
const recentDepth = 1024

// recentCost is what one held item counts against recentBytes.
func recentCost(it *Item) int64 { return int64(len(it.Body)) + 128 }

// hold appends a just-published item to its lane's list, or clears the
// list if it does not fit. Callers hold q.mu.
func (q *Queue) hold(ls *laneState, it Item) {
	if it.Seq > ls.head && it.Seq-ls.head >= recentDepth {
		q.release(ls) // a backlog (recentDepth)
		return
	}
	n := len(ls.recent)
	if n > 0 && ls.recent[n-1].Seq >= it.Seq {
		q.release(ls) // not in order: never expected; be safe
		return
	}
	c := recentCost(&it)
	if q.held+c > recentBytes {
		q.release(ls)
		return
	}
	ls.recent = append(ls.recent, it)
	ls.recentCost += c
	q.held += c
}

// release clears a lane's list. Callers hold q.mu.
func (q *Queue) release(ls *laneState) {
	q.held -= ls.recentCost
	clear(ls.recent) // drop the bodies
	ls.recent, ls.recentCost = ls.recent[:0], 0
}

// forget drops the held items of a lane up to seq (removed). It reports
// whether the list covered the lane's live items from its head (it held
// the head) before the removal. Callers hold q.mu.
func (q *Queue) forget(ls *laneState, seq uint64) (covered bool) {
	if len(ls.recent) == 0 {
		return false
	}
	covered = ls.recent[0].Seq <= ls.head
	if seq < ls.recent[0].Seq {
		return covered
	}
	i := 0
	var c int64
	for i < len(ls.recent) && ls.recent[i].Seq <= seq {
		c += recentCost(&ls.recent[i])
		ls.recent[i] = Item{}
		i++
	}
	ls.recent = ls.recent[i:]
	if len(ls.recent) == 0 {
		ls.recent = nil // let the backing array go
	}
	ls.recentCost -= c
	q.held -= c
	return covered
}

// peekHeld returns up to max held items when the list covers the lane
// from its head; ok false sends Peek to the store. Callers hold q.mu (R).
func peekHeld(ls *laneState, max int) (out []Item, ok bool) {
	if len(ls.recent) == 0 || ls.recent[0].Seq > ls.head {
		return nil, false
	}
	n := min(max, len(ls.recent))
	return append(make([]Item, 0, n), ls.recent[:n]...), true
}

// heldAt returns the held item of seq, or nil. Callers hold q.mu (R).
func heldAt(ls *laneState, seq uint64) *Item {
	if len(ls.recent) == 0 || seq < ls.recent[0].Seq {
		return nil
	}
	// Held seqs are ascending; a lane's seqs are dense, so the item is
	// usually at its offset from the first.
	if k := seq - ls.recent[0].Seq; k < uint64(len(ls.recent)) && ls.recent[k].Seq == seq {
		return &ls.recent[k]
	}
	for j := range ls.recent {
		if ls.recent[j].Seq == seq {
			return &ls.recent[j]
		}
	}
	return nil
}

// dropLane removes a lane from the index with what it holds. Callers hold
// q.mu.
func (q *Queue) dropLane(p string, ls *laneState) {
	q.release(ls)
	delete(q.lanes, p)
}
