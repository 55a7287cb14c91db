package queue

import (
	"bytes"
	"fmt"
	"reflect"
	"testing"
)

// TestRecentMatchesStore: what Peek serves from memory is what the store
// holds — the same items a reopened queue (nothing in memory) reads back —
// through deliveries, a dead letter in the middle and past the memory
// budget and the depth held per lane (a backlog of 10 MB of bodies against
// 8 MB held, 1,100 items per lane against recentDepth).
func TestRecentMatchesStore(t *testing.T) {
	dir := t.TempDir()
	q := start(t, Options{Dir: dir})
	ctx := tctx(t)
	const broker = "https://a.example/v2"
	big := bytes.Repeat([]byte("x"), 3000)
	const n = 3300 // 10 MB of bodies: past recentBytes and recentDepth
	if n*3000 <= recentBytes || n/3 <= recentDepth {
		t.Fatalf("%d items of 3 KB do not pass the budgets", n)
	}
	for i := range n {
		dev := fmt.Sprintf("dev%d", i%3)
		e := entry(broker, dev)
		e.Seal = func(seq uint64) ([]byte, error) { return fmt.Appendf(nil, `{"seq":%d,"pad":%q}`, seq, big), nil }
		if _, err := q.Append(ctx, e); err != nil {
			t.Fatal(err)
		}
	}
	if q.held > recentBytes {
		t.Fatalf("held %d bytes, budget %d", q.held, recentBytes)
	}
	lanes := q.Lanes(broker)
	// Deliver some of each lane and dead-letter one in the middle.
	for _, l := range lanes {
		its, err := q.Peek(l, 10)
		if err != nil || len(its) != 10 {
			t.Fatalf("Peek(%s) = %d items, %v", l.Device, len(its), err)
		}
		if err := q.Delete(its[:7]); err != nil {
			t.Fatal(err)
		}
		if err := q.DeadLetter(its[8], "test"); err != nil {
			t.Fatal(err)
		}
	}
	want := map[string][]Item{}
	for _, l := range lanes {
		its, err := q.Peek(l, 1000)
		if err != nil {
			t.Fatal(err)
		}
		want[l.Device] = its
	}
	q.stop(t)

	r := start(t, Options{Dir: dir})
	for _, l := range lanes {
		got, err := r.Peek(l, 1000)
		if err != nil {
			t.Fatal(err)
		}
		if len(got) != len(want[l.Device]) {
			t.Fatalf("%s: %d items from the store, %d before the restart", l.Device, len(got), len(want[l.Device]))
		}
		for i := range got {
			if !reflect.DeepEqual(got[i], want[l.Device][i]) {
				t.Fatalf("%s item %d: store %+v, before the restart %+v", l.Device, i, got[i].Seq, want[l.Device][i].Seq)
			}
		}
		if got[0].Seq != want[l.Device][0].Seq || got[1].Seq != got[0].Seq+2 {
			t.Fatalf("%s: head %d then %d, want the dead letter skipped", l.Device, got[0].Seq, got[1].Seq)
		}
	}
}

// TestRecentServesFreshItems: a reading read back right after its commit
// comes from memory, equal to the Item Append returned, and the lane's
// head advances from memory after a delivery.
func TestRecentServesFreshItems(t *testing.T) {
	q := start(t, Options{})
	ctx := tctx(t)
	const broker = "https://a.example/v2"
	var items []Item
	for range 5 {
		it, err := q.Append(ctx, entry(broker, "dev"))
		if err != nil {
			t.Fatal(err)
		}
		items = append(items, it)
	}
	l := Lane{Broker: broker, Device: "dev"}
	q.mu.RLock()
	held := len(q.lanes[string(lanePrefix(prefixQueue, broker, "dev"))].recent)
	q.mu.RUnlock()
	if held != 5 {
		t.Fatalf("%d items held, want 5", held)
	}
	got, err := q.Peek(l, 3)
	if err != nil || !reflect.DeepEqual(got, items[:3]) {
		t.Fatalf("Peek = %v, %v; want the appended items", got, err)
	}
	if err := q.Delete(got); err != nil {
		t.Fatal(err)
	}
	got, err = q.Peek(l, 10)
	if err != nil || !reflect.DeepEqual(got, items[3:]) {
		t.Fatalf("Peek after Delete = %d items, %v; want the last 2", len(got), err)
	}
	if st := q.Stats(); st.Depth != 2 || !st.Brokers[0].Oldest.Equal(items[3].Enqueued) {
		t.Fatalf("stats %+v, want depth 2, oldest %v", st, items[3].Enqueued)
	}
}

// TestRecentBacklogHoldsNothing: a lane whose head is recentDepth behind
// (a backlog: the uplink is down) holds nothing, so the heap a backlog
// keeps live does not grow by recentBytes for as long as it lasts; its
// items read back from the store in order.
func TestRecentBacklogHoldsNothing(t *testing.T) {
	q := start(t, Options{})
	ctx := tctx(t)
	const broker = "https://a.example/v2"
	var first Item
	for i := range recentDepth + 10 {
		it, err := q.Append(ctx, entry(broker, "dev"))
		if err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			first = it
		}
		if i == recentDepth-1 && q.held == 0 {
			t.Fatalf("nothing held at %d items, under recentDepth", i+1)
		}
	}
	q.mu.RLock()
	held, n := q.held, len(q.lanes[string(lanePrefix(prefixQueue, broker, "dev"))].recent)
	q.mu.RUnlock()
	if held != 0 || n != 0 {
		t.Fatalf("%d items (%d bytes) held %d items behind the head, want none", n, held, recentDepth+10)
	}
	got, err := q.Peek(Lane{Broker: broker, Device: "dev"}, recentDepth+10)
	if err != nil || len(got) != recentDepth+10 || !reflect.DeepEqual(got[0], first) {
		t.Fatalf("Peek = %d items, %v; want %d from the head", len(got), err, recentDepth+10)
	}
	for i := 1; i < len(got); i++ {
		if got[i].Seq != got[i-1].Seq+1 {
			t.Fatalf("item %d: seq %d after %d", i, got[i].Seq, got[i-1].Seq)
		}
	}
}
