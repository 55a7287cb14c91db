package reading

import "testing"

// benchPayloads are the payload shapes devices send: the two-number
// reading of the bench fleet, a six-attribute mixed one and the NGSI-like
// form with a time.
var benchPayloads = []struct{ name, payload string }{
	{"flat2", `{"temperature": 21.5, "humidity": 40}`},
	{"flat6", `{"temperature":21.5,"humidity":40,"pressure":1013.25,"on":true,"label":"kitchen","battery":3.71}`},
	{"ngsi3+time", `{"TimeInstant":"2026-11-26T05:00:00.5Z","temperature":{"value":21.5,"type":"Float"},"humidity":{"value":40,"type":"Integer"},"status":{"value":"ok"}}`},
}

// BenchmarkParse: the per-reading cost of turning a payload into
// attributes (issue 20).
func BenchmarkParse(b *testing.B) {
	for _, bp := range benchPayloads {
		payload := []byte(bp.payload)
		b.Run(bp.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, _, err := Parse(payload); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkValidate: DropOrionInvalid and Validate of a parsed reading, as
// the pipeline runs them per reading.
func BenchmarkValidate(b *testing.B) {
	for _, bp := range benchPayloads {
		attrs, _, err := Parse([]byte(bp.payload))
		if err != nil {
			b.Fatal(err)
		}
		b.Run(bp.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				r := Reading{Device: "th-1", Attrs: attrs}
				if d := r.DropOrionInvalid(); len(d) != 0 {
					b.Fatal(d)
				}
				if err := r.Validate(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
