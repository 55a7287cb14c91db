package queue

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"fmt"
	"os"
	"slices"
	"sync"
	"testing"
	"time"
)

// body is a typical signed NGSI update: ~400 bytes.
var benchBody = bytes.Repeat([]byte("b"), 400)

func BenchmarkAppend(b *testing.B) {
	delay := DefaultCommitDelay
	if os.Getenv("BENCH_COMMIT_DELAY") == "off" { // compare without waiting
		delay = -1
	}
	for _, appenders := range []int{1, 16, 64} {
		b.Run(fmt.Sprintf("appenders=%d", appenders), func(b *testing.B) {
			q := start(b, Options{CommitDelay: delay})
			ctx := context.Background()
			var wg sync.WaitGroup
			work := workItems(b.N)
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

// BenchmarkCommitPaced: 50 devices at 1,500 readings/s together (30/s
// each, open loop), the moderate load where a sync used to carry 1.5-2
// readings. It reports readings per fsync, the Append latency and the
// process's CPU per reading (the committer, badger and the 50 paced
// producers), without adaptive group commit (commit_delay off), with the
// old 5 ms and with the default.
//
//	go test -run '^$' -bench CommitPaced -benchtime 3000x ./internal/queue/
func BenchmarkCommitPaced(b *testing.B) {
	for _, tc := range []struct {
		name  string
		delay time.Duration
	}{{"delay=off", -1}, {"delay=5ms", 5 * time.Millisecond}, {"delay=default", DefaultCommitDelay}} {
		b.Run(tc.name, func(b *testing.B) {
			q := start(b, Options{CommitDelay: tc.delay})
			const devices, rate = 50, 1500
			period := time.Second * devices / rate
			per := (b.N + devices - 1) / devices
			lat := make([][]time.Duration, devices)
			b.ReportAllocs()
			b.ResetTimer()
			cpu0 := processCPU()
			var wg sync.WaitGroup
			for i := range devices {
				wg.Go(func() {
					e := Entry{Broker: "https://a.example/v2", Device: fmt.Sprintf("dev%d", i), Type: "Sensor",
						Seal: func(uint64) ([]byte, error) { return benchBody, nil }}
					// Spread the devices' phases over one period.
					next := time.Now().Add(period * time.Duration(i) / devices)
					for range per {
						time.Sleep(time.Until(next))
						t0 := time.Now()
						if _, err := q.Append(context.Background(), e); err != nil {
							b.Error(err)
							return
						}
						lat[i] = append(lat[i], time.Since(t0))
						next = next.Add(period)
					}
				})
			}
			wg.Wait()
			cpu := processCPU() - cpu0
			b.StopTimer()
			var all []time.Duration
			for _, l := range lat {
				all = append(all, l...)
			}
			slices.Sort(all)
			if len(all) == 0 {
				return
			}
			syncs := q.gc.syncs.Load()
			b.ReportMetric(float64(len(all))/float64(max(syncs, 1)), "readings/fsync")
			b.ReportMetric(float64(syncs)/float64(len(all)), "fsyncs/reading")
			b.ReportMetric(float64(all[len(all)/2].Microseconds()), "p50-µs")
			b.ReportMetric(float64(all[len(all)*99/100].Microseconds()), "p99-µs")
			b.ReportMetric(float64(cpu.Microseconds())/float64(len(all)), "cpu-µs/reading")
		})
	}
}

// BenchmarkAppendWindow is the committer under a device burst as the
// embedded broker makes it: 50 devices, each keeping 32 readings in flight
// (Enqueue, then wait in order, as mqtt's acker does), every reading
// sealed with an HMAC over a 1.5 KB body (what SealBody costs, ~4 µs).
func BenchmarkAppendWindow(b *testing.B) {
	const devices, window = 50, 32
	body := bytes.Repeat([]byte("b"), 1500)
	q := start(b, Options{})
	ctx := context.Background()
	work := workItems(b.N)
	b.ReportAllocs()
	b.ResetTimer()
	var wg sync.WaitGroup
	for i := range devices {
		wg.Go(func() {
			mac := hmac.New(sha256.New, []byte("k"))
			e := Entry{Broker: "https://a.example/v2", Device: fmt.Sprintf("dev%d", i), Type: "Sensor",
				Seal: func(uint64) ([]byte, error) {
					mac.Reset()
					mac.Write(body)
					return append(slices.Clone(body), mac.Sum(nil)...), nil
				}}
			var waits []func(context.Context) (Item, error)
			for range work {
				w, err := q.Enqueue(ctx, e)
				if err != nil {
					b.Error(err)
					return
				}
				waits = append(waits, w)
				if len(waits) == window {
					if _, err := waits[0](ctx); err != nil {
						b.Error(err)
						return
					}
					waits = waits[1:]
				}
			}
			for _, w := range waits {
				if _, err := w(ctx); err != nil {
					b.Error(err)
				}
			}
		})
	}
	wg.Wait()
	b.StopTimer()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "readings/s")
	b.ReportMetric(float64(b.N)/float64(q.gc.syncs.Load()), "readings/sync")
}

// workItems is a closed channel of n items: the appenders of a benchmark
// take from it until it is empty.
func workItems(n int) chan struct{} {
	work := make(chan struct{}, n)
	for range n {
		work <- struct{}{}
	}
	close(work)
	return work
}
