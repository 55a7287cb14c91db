package queue

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"
)

// BenchmarkDeleteGrouped: what one transaction per delivered reading
// costs against one per group, as filter mode settles its readings (one
// per device, 16 devices in flight): group=1 is one Delete per reading,
// group=16 one Delete for the head of each of 16 lanes.
//
//	go test -run '^$' -bench DeleteGrouped -benchmem ./internal/queue/
func BenchmarkDeleteGrouped(b *testing.B) {
	for _, group := range []int{1, 4, 16} {
		b.Run(fmt.Sprintf("group=%d", group), func(b *testing.B) {
			q := start(b, Options{})
			const devices = 16
			per := (b.N + devices - 1) / devices
			lanes := make([]Lane, devices)
			var wg sync.WaitGroup
			for d := range devices {
				lanes[d] = Lane{Broker: "https://a.example/v2", Device: fmt.Sprintf("dev%02d", d)}
				e := Entry{Broker: lanes[d].Broker, Device: lanes[d].Device, Seal: func(uint64) ([]byte, error) { return benchBody, nil }}
				wg.Go(func() {
					for range per {
						if _, err := q.Append(context.Background(), e); err != nil {
							b.Error(err)
							return
						}
					}
				})
			}
			wg.Wait()
			heads := make([][]Item, devices)
			for d, l := range lanes {
				items, err := q.Peek(l, per)
				if err != nil || len(items) != per {
					b.Fatalf("Peek = %d items, %v", len(items), err)
				}
				heads[d] = items
			}
			b.ReportAllocs()
			b.ResetTimer()
			cpu0 := processCPU()
			var batch []Item
			n := 0
			for i := range per {
				for d := range lanes {
					batch = append(batch, heads[d][i])
					if len(batch) == group || d == devices-1 {
						if err := q.Delete(batch); err != nil {
							b.Fatal(err)
						}
						n += len(batch)
						batch = batch[:0]
					}
				}
			}
			b.StopTimer()
			b.ReportMetric(float64(processCPU()-cpu0)/1e6/float64(n)*1000, "cpu-ms/1k")
		})
	}
}

// TestDeleteHeadsOfManyLanes: the uplink deletes what settled together —
// the heads of many lanes in one Delete (internal/uplink/settle.go). Each
// lane then peeks its next reading, the counts follow, a repeated Delete
// is harmless, and after a restart the deleted readings stay gone and
// every undelivered one is there, in order.
func TestDeleteHeadsOfManyLanes(t *testing.T) {
	dir := t.TempDir()
	q := start(t, Options{Dir: dir})
	const broker, lanes, each = "https://a.example/v2", 16, 5
	var ls []Lane
	for d := range lanes {
		l := Lane{Broker: broker, Device: fmt.Sprintf("dev%02d", d)}
		ls = append(ls, l)
		for range each {
			mustAppend(t, q, entry(broker, l.Device))
		}
	}
	for round := 1; round <= 3; round++ {
		var heads []Item
		for _, l := range ls {
			items, err := q.Peek(l, 1)
			if err != nil || len(items) != 1 {
				t.Fatalf("round %d: Peek(%s) = %d items, %v", round, l.Device, len(items), err)
			}
			heads = append(heads, items[0])
		}
		if err := q.Delete(heads); err != nil {
			t.Fatalf("round %d: Delete of %d heads = %v", round, len(heads), err)
		}
		if err := q.Delete(heads); err != nil { // a repeated Delete is harmless
			t.Fatalf("round %d: repeated Delete = %v", round, err)
		}
		for _, l := range ls {
			if got, want := seqs(peekAll(t, q.Queue, l)), upTo(each)[round:]; !slices.Equal(got, want) {
				t.Fatalf("round %d: %s holds %v, want %v", round, l.Device, got, want)
			}
		}
		if st := q.Stats(); st.Depth != lanes*(each-round) {
			t.Fatalf("round %d: depth %d, want %d", round, st.Depth, lanes*(each-round))
		}
	}
	q.stop(t)

	q = start(t, Options{Dir: dir})
	for _, l := range ls {
		if got, want := seqs(peekAll(t, q.Queue, l)), upTo(each)[3:]; !slices.Equal(got, want) {
			t.Fatalf("after restart %s holds %v, want %v", l.Device, got, want)
		}
	}
	if st := q.Stats(); st.Depth != lanes*(each-3) {
		t.Fatalf("after restart: depth %d, want %d", st.Depth, lanes*(each-3))
	}
}
