package queue

import (
	"bytes"
	"testing"
	"time"
)

// The CPU cost per reading of sealing with the device's data key, against
// the version 1 encoding, without the store's fsync (which dominates
// BenchmarkAppend and makes it too noisy to show this).
func BenchmarkEncodeValue(b *testing.B) {
	it := Item{Broker: "https://a.example/v2", Device: "dev0", Type: "Sensor", Seq: 42, Enqueued: time.Now(), Body: benchBody}
	dk, err := newDataKey(bytes.Repeat([]byte{1}, 32), true)
	if err != nil {
		b.Fatal(err)
	}
	b.Run("v1-plain", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			_ = encodeItem(&it)
		}
	})
	b.Run("v2-sealed", func(b *testing.B) {
		nonce := make([]byte, nonceSize)
		b.ReportAllocs()
		for b.Loop() {
			_ = sealItem(&it, dk.aead, nonce)
		}
	})
	b.Run("nonces-256", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := nonces(256); err != nil {
				b.Fatal(err)
			}
		}
	})
}

func BenchmarkDecodeValue(b *testing.B) {
	it := Item{Broker: "https://a.example/v2", Device: "dev0", Type: "Sensor", Seq: 42, Enqueued: time.Now(), Body: benchBody}
	q := &Queue{keys: map[string]*dataKey{}}
	dk, err := newDataKey(bytes.Repeat([]byte{1}, 32), true)
	if err != nil {
		b.Fatal(err)
	}
	q.keys["dev0"] = dk
	v1 := encodeItem(&it)
	v2 := sealItem(&it, dk.aead, make([]byte, nonceSize))
	for _, tt := range []struct {
		name string
		val  []byte
	}{{"v1-plain", v1}, {"v2-sealed", v2}} {
		b.Run(tt.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				out := Item{Device: "dev0", Seq: 42}
				if err := q.decodeItemValue(tt.val, &out); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
