package envelope

import (
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/reading"
)

func benchReading() *reading.Reading {
	return &reading.Reading{Device: "th-1", Time: time.Date(2026, 11, 26, 5, 0, 0, 5e8, time.UTC), Attrs: []reading.Attribute{
		{Name: "humidity", Type: "Number", Value: 40.0},
		{Name: "temperature", Type: "Number", Value: 21.5},
	}}
}

// BenchmarkSealBodyPath: what the pipeline's seal does per reading: claims,
// JWS and the NGSI body, per algorithm (issue 20).
func BenchmarkSealBodyPath(b *testing.B) {
	hs := testKey(b, "th-1", "k1-aaa", "k2-bbb")
	ed, _ := GenerateKey(AlgEdDSA)
	es, _ := GenerateKey(AlgES256)
	r := benchReading()
	for _, k := range []Key{hs, ed, es} {
		b.Run("SealBody-"+k.Alg(), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := SealBody(k, "gw-1", 7, r, ""); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(k.Alg(), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				c := ClaimsOf("gw-1", 7, r)
				jws, err := Seal(k, c)
				if err != nil {
					b.Fatal(err)
				}
				if _, err := Body(c, jws, ""); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkVerifyAttrs: the broker-side check of one reading's body
// (centralsim verifies every update with it).
func BenchmarkVerifyAttrs(b *testing.B) {
	k := testKey(b, "th-1", "k1-aaa", "k2-bbb")
	r := benchReading()
	c := ClaimsOf("gw-1", 7, r)
	compact, err := Seal(k, c)
	if err != nil {
		b.Fatal(err)
	}
	body, err := Body(c, compact, "")
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := VerifyAttrs(body, k, ""); err != nil {
			b.Fatal(err)
		}
	}
}
