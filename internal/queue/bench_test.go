package queue

import (
	"bytes"
	"context"
	"fmt"
	"sync"
	"testing"
)

// body is a typical signed NGSI update: ~400 bytes.
var benchBody = bytes.Repeat([]byte("b"), 400)

func BenchmarkAppend(b *testing.B) {
	for _, appenders := range []int{1, 16, 64} {
		b.Run(fmt.Sprintf("appenders=%d", appenders), func(b *testing.B) {
			q := start(b, Options{})
			ctx := context.Background()
			var wg sync.WaitGroup
			work := make(chan struct{}, b.N)
			for range b.N {
				work <- struct{}{}
			}
			close(work)
			b.ReportAllocs()
			b.ResetTimer()
			for i := range appenders {
				wg.Go(func() {
					e := Entry{Broker: "https://a.example/v2", Device: fmt.Sprintf("dev%d", i), Type: "Sensor",
						Seal: func(uint64) ([]byte, error) { return benchBody, nil }}
					for range work {
						if _, err := q.Append(ctx, e); err != nil {
							b.Error(err)
							return
						}
					}
				})
			}
			wg.Wait()
			b.StopTimer()
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "readings/s")
		})
	}
}

func BenchmarkPeekDelete(b *testing.B) {
	q := start(b, Options{})
	ctx := context.Background()
	lane := Lane{Broker: "https://a.example/v2", Device: "dev"}
	e := Entry{Broker: lane.Broker, Device: lane.Device, Seal: func(uint64) ([]byte, error) { return benchBody, nil }}
	// Fill concurrently so the fill itself is group-committed.
	var wg sync.WaitGroup
	per := (b.N + 63) / 64
	for range 64 {
		wg.Go(func() {
			for range per {
				if _, err := q.Append(ctx, e); err != nil {
					b.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	b.ReportAllocs()
	b.ResetTimer()
	n := 0
	for n < b.N {
		items, err := q.Peek(lane, 100)
		if err != nil || len(items) == 0 {
			b.Fatalf("Peek = %d items, %v", len(items), err)
		}
		if err := q.Delete(items); err != nil {
			b.Fatal(err)
		}
		n += len(items)
	}
	b.StopTimer()
	b.ReportMetric(float64(n)/b.Elapsed().Seconds(), "readings/s")
}
