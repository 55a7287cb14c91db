package uplink

import (
	"testing"

	"github.com/edgegate/edgegate/internal/queue"
)

// BenchmarkBatchBody: rendering one op/update of 256 stored readings, per
// reading (issue 20).
func BenchmarkBatchBody(b *testing.B) {
	body := []byte(`{"humidity":{"type":"Number","value":40,"metadata":{"TimeInstant":{"type":"DateTime","value":"2026-11-26T05:00:00.5Z"},"signature":{"type":"Text","value":"eyJhbGciOiJIUzI1NiJ9.eyJ2IjoxfQ.c2lnbmF0dXJl"}}},"temperature":{"type":"Number","value":21.5,"metadata":{"TimeInstant":{"type":"DateTime","value":"2026-11-26T05:00:00.5Z"},"signature":{"type":"Text","value":"eyJhbGciOiJIUzI1NiJ9.eyJ2IjoxfQ.c2lnbmF0dXJl"}}}}`)
	items := make([]queue.Item, 256)
	size := 0
	for i := range items {
		items[i] = queue.Item{Device: "th-1", Type: "Thermometer", Seq: uint64(i + 1), Body: body}
		size += len(body) + len("th-1") + len("Thermometer") + 32
	}
	// As attemptBatch does: into a buffer of the batch's size, reused
	// (the pool of body.go).
	buf := make([]byte, 0, size+64)
	b.ReportAllocs()
	for b.Loop() {
		var err error
		if buf, err = appendBatchBody(buf[:0], items); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*len(items)), "ns/reading")
}
