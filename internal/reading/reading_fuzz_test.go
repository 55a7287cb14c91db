package reading_test

import (
	"encoding/json"
	"errors"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/edgegate/edgegate/internal/envelope"
	"github.com/edgegate/edgegate/internal/reading"
)

// FuzzParseSealBody drives an MQTT payload through the whole gateway path
// that touches it: Parse, Validate, envelope.Seal and envelope.Body. For any
// payload: either it is refused with ErrInvalid or ErrTooLarge (and the
// message is bounded), or it becomes a reading that validates, whose NGSI
// body is valid JSON under 1 MiB and verifies against its own envelope.
func FuzzParseSealBody(f *testing.F) {
	for _, s := range []string{
		`{"n": 1, "temperature": {"value": 21.5, "type": "Number"}}`,
		`{"t":{"value":1,"type":"Float"},"TimeInstant":"2026-01-01T00:00:00Z"}`,
		`{"observedAt":"2026-01-01T00:00:00.123456789+02:00","on":true,"label":"kitchen"}`,
		`{"a":{"b":{"c":{"d":{"e":{"f":{"g":{"h":{"i":1}}}}}}}}}`,
		`{"signature":"x"}`,
		`{"x":"<script>"}`,
		`{"x":1e400}`,
		`{"x":"\ud800"}`,
		`{"x":{"value":null}}`,
		`{"x":{"value":1,"type":""}}`,
		`{"":1}`,
		`{"x":1,"x":2}`,
		`[]`, `null`, ``, `{`, `"str"`,
		`{"a":{"value":{"b":[1,"<"]}}}`,
		`{"TimeInstant":"not a time"}`,
		`{"TimeInstant":"2026-01-01T00:00:00Z"}`,
	} {
		f.Add([]byte(s))
	}
	key, err := envelope.DeriveHS256("fuzz-dev", "k1-canary-fuzz", "k2-canary-fuzz")
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, payload []byte) {
		attrs, observed, err := reading.Parse(payload)
		if err != nil {
			if !errors.Is(err, reading.ErrInvalid) && !errors.Is(err, reading.ErrTooLarge) {
				t.Fatalf("Parse refusal %v is neither ErrInvalid nor ErrTooLarge", err)
			}
			if n := len(err.Error()); n > 1024 {
				t.Fatalf("Parse refusal message is %d bytes; a payload can flood the log", n)
			}
			return
		}
		if observed.IsZero() {
			observed = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
		}
		r := reading.Reading{Device: "fuzz-dev", Time: observed, Attrs: attrs}
		r.DropOrionInvalid() // as the pipeline does
		if err := r.Validate(); err != nil {
			if !errors.Is(err, reading.ErrInvalid) && !errors.Is(err, reading.ErrTooLarge) {
				t.Fatalf("Validate refusal %v is neither ErrInvalid nor ErrTooLarge", err)
			}
			return
		}
		c := envelope.ClaimsOf("gw-fuzz", 7, &r)
		compact, err := envelope.Seal(key, c)
		if err != nil {
			// A validated reading that cannot be sealed would be refused
			// after the device's PUBACK: name it.
			t.Fatalf("Seal of a validated reading: %v (payload %q)", err, clipQ(payload))
		}
		body, err := envelope.Body(c, compact, "")
		if err != nil {
			if errors.Is(err, reading.ErrTooLarge) {
				return
			}
			t.Fatalf("Body of a validated reading: %v", err)
		}
		if len(body) > 1<<20 {
			t.Fatalf("Body is %d bytes, over Orion's 1 MiB", len(body))
		}
		if !json.Valid(body) {
			t.Fatalf("Body is not valid JSON: %q", clipQ(body))
		}
		if !utf8.Valid(body) {
			t.Fatalf("Body is not valid UTF-8")
		}
		got, err := envelope.VerifyAttrs(body, key, "")
		if err != nil {
			t.Fatalf("VerifyAttrs of the gateway's own body: %v (payload %q)", err, clipQ(payload))
		}
		if got.Device != "fuzz-dev" || got.Seq != 7 || got.Gateway != "gw-fuzz" {
			t.Fatalf("round trip changed the claims: %+v", got)
		}
		if len(got.Attrs) != len(r.Attrs) {
			t.Fatalf("round trip: %d attributes, sent %d", len(got.Attrs), len(r.Attrs))
		}
	})
}

func clipQ(b []byte) string {
	if len(b) > 200 {
		return string(b[:200]) + "…"
	}
	return string(b)
}
