package queue

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"
)

// TestGroupCommitIdleNoWait: a reading every 10 ms from one device (an
// idle-ish source) is committed at once: the committer never waits for
// company that is not coming.
func TestGroupCommitIdleNoWait(t *testing.T) {
	q := start(t, Options{})
	ctx := tctx(t)
	for range 20 {
		if _, err := q.Append(ctx, entry("https://a.example/v2", "dev")); err != nil {
			t.Fatal(err)
		}
		time.Sleep(10 * time.Millisecond) // the source's pace, not a wait for a result
	}
	if w := q.gc.waits.Load(); w != 0 {
		t.Fatalf("committer waited %d times for readings 10 ms apart, want 0", w)
	}
	if s := q.gc.syncs.Load(); s != 20 {
		t.Fatalf("%d syncs for 20 readings 10 ms apart, want 20", s)
	}
}

// TestGroupCommitClosedLoop: one producer that sends its next reading only
// once the previous one is committed cannot fill a wait; after a wait that
// gained nothing the committer stops waiting for a while, so the producer
// pays a pause now and then, not one per reading.
func TestGroupCommitClosedLoop(t *testing.T) {
	q := start(t, Options{})
	ctx := tctx(t)
	const n = 200
	for range n {
		if _, err := q.Append(ctx, entry("https://a.example/v2", "dev")); err != nil {
			t.Fatal(err)
		}
	}
	// A wait, then none for 100 ms, 200 ms, …: a few in all.
	if w, g := q.gc.waits.Load(), q.gc.gained.Load(); w > 4 || g != 0 {
		t.Fatalf("closed loop of %d: %d waits gaining %d readings, want at most 4 waits gaining 0", n, w, g)
	}
}

// TestGroupCommitSharesSyncs: 50 devices at 1,500 readings/s together
// (the moderate load where a sync carried 1.5–2 readings without waiting)
// share syncs: at least 6 readings per sync, every Append answered.
func TestGroupCommitSharesSyncs(t *testing.T) {
	q := start(t, Options{})
	ctx := tctx(t)
	const devices, rate, each = 50, 1500, 20
	period := time.Second * devices / rate
	var wg sync.WaitGroup
	for i := range devices {
		wg.Go(func() {
			next := time.Now().Add(period * time.Duration(i) / devices)
			for range each {
				time.Sleep(time.Until(next)) // the devices' pace
				if _, err := q.Append(ctx, entry("https://a.example/v2", fmt.Sprintf("dev%d", i))); err != nil {
					t.Error(err)
					return
				}
				next = next.Add(period)
			}
		})
	}
	wg.Wait()
	syncs := q.gc.syncs.Load()
	// 20 ms (the default) of arrivals at 1,500/s is 30 readings, ~15
	// here with the first ones synced at once (the source starts idle);
	// 6 leaves room for a slow machine under -race, and without the wait
	// a sync carries 1.2–2.0.
	per := float64(devices*each) / float64(syncs)
	if per < 6 {
		t.Fatalf("%d readings in %d syncs (%.1f per sync), want at least 6 per sync", devices*each, syncs, per)
	}
	t.Logf("%.1f readings per sync", per)
	if st := q.Stats(); st.Depth != devices*each {
		t.Fatalf("depth %d, want %d", st.Depth, devices*each)
	}
}

// TestReadyCounts: Ready counts each lane's synced readings up to perLane,
// across brokers, and nothing for a lane that is empty or delivered.
func TestReadyCounts(t *testing.T) {
	q := start(t, Options{})
	a, b := "https://a.example/v2", "https://b.example/v2"
	for range 5 {
		mustAppend(t, q, entry(a, "d1"))
	}
	mustAppend(t, q, entry(a, "d2"))
	its := []Item{mustAppend(t, q, entry(b, "d1")), mustAppend(t, q, entry(b, "d1"))}
	lanes := []Lane{{Broker: a, Device: "d1"}, {Broker: a, Device: "d2"}, {Broker: b, Device: "d1"}, {Broker: a, Device: "none"}}
	if n := q.Ready(lanes, 3); n != 3+1+2 {
		t.Fatalf("Ready(perLane 3) = %d, want 6", n)
	}
	if n := q.Ready(lanes, 32); n != 5+1+2 {
		t.Fatalf("Ready(perLane 32) = %d, want 8", n)
	}
	if err := q.Delete(its); err != nil {
		t.Fatal(err)
	}
	if n := q.Ready(lanes, 32); n != 6 {
		t.Fatalf("Ready after the b lane was delivered = %d, want 6", n)
	}
}

// TestGroupCommitBunchedArrivals: readings forwarded by a broker come in
// bunches a few milliseconds apart, from a source that does not wait for
// their commits (the pipelined MQTT client). A pause between bunches is
// not the end of the stream: syncs start at most once per commit delay,
// so ~33 readings share each (a pause of four gaps ending the wait made
// one sync per bunch: 10).
func TestGroupCommitBunchedArrivals(t *testing.T) {
	q := start(t, Options{CommitDelay: 20 * time.Millisecond})
	ctx := tctx(t)
	const bunches, size = 100, 10 // 10 readings every 6 ms: 1,667/s
	var waits []func(context.Context) (Item, error)
	next := time.Now()
	for b := range bunches {
		time.Sleep(time.Until(next)) // the source's pace
		next = next.Add(6 * time.Millisecond)
		for i := range size {
			w, err := q.Enqueue(ctx, entry("https://a.example/v2", fmt.Sprintf("dev%d", (b*size+i)%50)))
			if err != nil {
				t.Fatal(err)
			}
			waits = append(waits, w)
		}
	}
	for _, w := range waits {
		if _, err := w(ctx); err != nil {
			t.Fatal(err)
		}
	}
	per := float64(bunches*size) / float64(q.gc.syncs.Load())
	t.Logf("%.1f readings per sync", per)
	if per < 18 {
		t.Fatalf("%.1f readings per sync for bunches of %d every 6 ms, want at least 18 (a sync per 20 ms)", per, size)
	}
}

// TestGroupCommitManyClosedLoops: 50 producers that each send their next
// reading only once the previous one is committed fill each wait at once:
// they share every sync (one reading each per commit delay, the embedded
// broker's default rate per device), and no wait is judged to have gained
// nothing.
func TestGroupCommitManyClosedLoops(t *testing.T) {
	q := start(t, Options{CommitDelay: 20 * time.Millisecond})
	ctx := tctx(t)
	const producers, each = 50, 20
	var wg sync.WaitGroup
	for i := range producers {
		wg.Go(func() {
			for range each {
				if _, err := q.Append(ctx, entry("https://a.example/v2", fmt.Sprintf("dev%d", i))); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	per := float64(producers*each) / float64(q.gc.syncs.Load())
	t.Logf("%.1f readings per sync, %d waits", per, q.gc.waits.Load())
	// ~50 on a quiet machine; 27 under -race on a loaded one, where a
	// commit takes longer than the delay and each carries whoever came.
	// One by one it would be 1–2.
	if per < 15 {
		t.Fatalf("%d closed loops: %.1f readings per sync, want at least 15", producers, per)
	}
}

// TestGroupCommitSkipIsAWhile: waits that gained nothing, many in a row
// (a burst's tail, a closed loop), turn waiting off for at most maxSkip of
// time, however many commits run meanwhile: a moderate stream that
// follows shares syncs again within 1.6 s, where a count of commits to
// skip (up to 1,024) was spent by that stream one small commit at a time.
func TestGroupCommitSkipIsAWhile(t *testing.T) {
	g := newGroupCommit(20 * time.Millisecond)
	g.gap = time.Millisecond // readings keep coming
	now := time.Now()
	for range 20 {
		g.judge(now, false)
	}
	for i := range 5000 { // commits within the skip: none waits
		at := now.Add(time.Duration(i) * maxSkip / 5000)
		if d := g.wait(at, 1, 256); d != 0 {
			t.Fatalf("commit %d, %v after the last unpaid wait: waits %v, want none", i, at.Sub(now), d)
		}
	}
	g.begin(now.Add(maxSkip)) // the previous commit began 1 ms before
	if d := g.wait(now.Add(maxSkip+time.Millisecond), 1, 256); d <= 0 {
		t.Fatalf("after %v: no wait, want one again", maxSkip)
	}
	g.judge(now.Add(maxSkip+time.Millisecond), true)
	if g.nextSkip != skipAfterIdle {
		t.Fatalf("after a wait that paid, the next skip is %v, want %v", g.nextSkip, skipAfterIdle)
	}
}
