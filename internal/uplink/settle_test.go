package uplink

import (
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/queue"
	"github.com/edgegate/edgegate/internal/testkit"
)

// TestDeleteGroupSharesDeletes: calls that arrive while a Delete runs are
// carried together by the next one; every call returns only once its own
// items were deleted, with that Delete's error, and no item is deleted
// twice or skipped.
func TestDeleteGroupSharesDeletes(t *testing.T) {
	var mu sync.Mutex
	deleted := map[string]int{}
	fail := false
	g := newDeleteGroup(func(items []queue.Item) error {
		time.Sleep(2 * time.Millisecond) // a badger transaction under load
		mu.Lock()
		defer mu.Unlock()
		if fail {
			return errors.New("store failed")
		}
		for _, it := range items {
			deleted[it.Device+"/"+strconv.FormatUint(it.Seq, 10)]++
		}
		return nil
	})
	const workers, each = 16, 50
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for i := range each {
				it := queue.Item{Device: fmt.Sprintf("dev-%d", w), Seq: uint64(i)}
				if err := g.delete([]queue.Item{it}); err != nil {
					t.Errorf("delete %s/%d = %v", it.Device, it.Seq, err)
					return
				}
				mu.Lock()
				n := deleted[it.Device+"/"+strconv.FormatUint(it.Seq, 10)]
				mu.Unlock()
				if n != 1 {
					t.Errorf("%s/%d deleted %d times when its call returned", it.Device, it.Seq, n)
					return
				}
			}
		})
	}
	wg.Wait()
	if len(deleted) != workers*each {
		t.Fatalf("%d items deleted, want %d", len(deleted), workers*each)
	}
	calls, items := g.stats()
	if items != workers*each {
		t.Fatalf("Deletes carried %d items, want %d", items, workers*each)
	}
	// 16 workers, each waiting for its Delete before the next: while one
	// runs, the others gather.
	if per := float64(items) / float64(calls); per < 4 {
		t.Fatalf("%.1f items per Delete (%d calls), want them shared", per, calls)
	}
	t.Logf("%d items in %d Deletes (%.1f per Delete)", items, calls, float64(items)/float64(calls))

	// A failed Delete fails every call it carried, and the group goes on.
	mu.Lock()
	fail = true
	mu.Unlock()
	errs := make(chan error, workers)
	for w := range workers {
		wg.Go(func() { errs <- g.delete([]queue.Item{{Device: fmt.Sprintf("dev-%d", w), Seq: each}}) })
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err == nil || err.Error() != "store failed" {
			t.Fatalf("delete during a store failure = %v, want the store's error", err)
		}
	}
	mu.Lock()
	fail = false
	mu.Unlock()
	if err := g.delete([]queue.Item{{Device: "dev-0", Seq: each}}); err != nil {
		t.Fatalf("delete after the failure = %v", err)
	}
}

// TestFilterSharesDeletes: in filter mode, readings the broker accepted
// at about the same time are deleted from the queue in shared Deletes,
// each device's readings still delivered once and in order.
func TestFilterSharesDeletes(t *testing.T) {
	b := newBroker(t, func(w http.ResponseWriter, r *http.Request, n int) {
		time.Sleep(time.Millisecond)
		w.WriteHeader(http.StatusNoContent)
	})
	q := newFakeQueue()
	q.deleteTime = time.Millisecond
	const devices, each = 32, 20
	for d := range devices {
		q.add(b.URL, "dev-"+strconv.Itoa(d), each)
	}
	h := start(t, q, &fakeTokens{}, b.pool(), Options{Concurrency: 16,
		HTTPClient: NewHTTPClient(b.pool(), 5*time.Second, 16)})
	testkit.Eventually(t, 20*time.Second, "queue drained", func() bool { return q.depth() == 0 })
	h.stop(t)
	if got := len(b.requests()); got != devices*each {
		t.Fatalf("%d requests for %d readings", got, devices*each)
	}
	// start's cleanup fails the test on any Delete of a lane's non-head.
	q.mu.Lock()
	deletes := q.deletes
	q.mu.Unlock()
	// 16 requests in flight answered every ~1 ms, a Delete of 1 ms:
	// several answers arrive during each Delete.
	if deletes > devices*each/2 {
		t.Fatalf("%d Deletes for %d readings: want them shared", deletes, devices*each)
	}
	t.Logf("%d readings deleted in %d Deletes", devices*each, deletes)
}

// TestFilterPacedNoEmptyAttempts: at a moderate pace every reading
// empties its lane; the uplink learns that when it settles the reading and
// does not send one more attempt (a job, a Peek, a result) per reading
// only to find the lane empty. Every reading is still delivered, once.
func TestFilterPacedNoEmptyAttempts(t *testing.T) {
	b := newBroker(t, nil)
	b.respond = nil
	q := newFakeQueue()
	h := start(t, q, &fakeTokens{}, b.pool(), Options{Concurrency: 16,
		HTTPClient: NewHTTPClient(b.pool(), 5*time.Second, 16)})
	const devices, rounds = 20, 10
	for r := range rounds {
		for d := range devices {
			q.add(b.URL, "dev-"+strconv.Itoa(d), 1)
		}
		testkit.Eventually(t, 10*time.Second, fmt.Sprintf("round %d delivered", r), func() bool { return q.depth() == 0 })
	}
	h.stop(t)
	if got := len(b.requests()); got != devices*rounds {
		t.Fatalf("%d requests for %d readings", got, devices*rounds)
	}
	q.mu.Lock()
	peeks, empty := q.peeks, q.emptyPeeks
	q.mu.Unlock()
	// Not once per reading (200 of 400 Peeks without the drop); a lane
	// may be looked at empty when a refresh re-adds it right before its
	// reading is settled.
	if empty > devices*rounds/10 {
		t.Fatalf("%d of %d Peeks found the lane empty, for %d readings", empty, peeks, devices*rounds)
	}
	t.Logf("%d readings, %d Peeks, %d empty", devices*rounds, peeks, empty)
}
