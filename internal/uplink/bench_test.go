package uplink

import (
	"context"
	"strconv"
	"testing"
	"time"
)

// BenchmarkDeliver measures readings/s through the uplink to a local TLS
// broker that answers 204, across 16 devices with the default concurrency:
// filter mode (one PATCH per reading), and batch mode (op/update).
func BenchmarkDeliver(b *testing.B) {
	b.Run("filter", func(b *testing.B) { benchDeliver(b, Options{}) })
	b.Run("batch", func(b *testing.B) { benchDeliver(b, Options{Mode: ModeBatch}) })
}

func benchDeliver(b *testing.B, opts Options) {
	br := newBroker(b, nil)
	br.respond = nil
	q := newFakeQueue()
	const devices = 16
	per := b.N/devices + 1
	for d := range devices {
		q.add(br.URL, "dev-"+strconv.Itoa(d), per)
	}
	total := per * devices
	opts.HTTPClient = NewHTTPClient(br.pool(), 5*time.Second, 8)
	u := New(q, &fakeTokens{}, opts)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	b.ReportAllocs()
	b.ResetTimer()
	start := time.Now()
	go func() { u.Run(ctx); close(done) }()
	for q.depth() > 0 {
		time.Sleep(time.Millisecond)
	}
	el := time.Since(start)
	b.StopTimer()
	cancel()
	<-done
	b.ReportMetric(float64(total)/el.Seconds(), "readings/s")
}
