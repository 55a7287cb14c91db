package queue

import (
	"context"
	"fmt"
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
