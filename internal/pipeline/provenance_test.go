package pipeline

import (
	"context"
	"encoding/json"
	"errors"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/envelope"
	"github.com/edgegate/edgegate/internal/metrics"
	"github.com/edgegate/edgegate/internal/queue"
	"github.com/edgegate/edgegate/internal/reading"
	"github.com/edgegate/edgegate/policy"
)

var t0 = time.Date(2026, 11, 26, 5, 0, 0, 0, time.UTC)

// keyRing is a KeyResolver over a fixed set of private keys.
type keyRing map[string]envelope.Key

func (r keyRing) SigningKey(device, kid string) (envelope.Key, bool) {
	k, ok := r[device]
	return k, ok && k.ID() == kid
}

func signedPolicy(t testing.TB, signing string, keys ...envelope.Key) *policy.Engine {
	t.Helper()
	var pubs []json.RawMessage
	for _, k := range keys {
		b, err := k.PublicJWK()
		if err != nil {
			t.Fatal(err)
		}
		pubs = append(pubs, b)
	}
	p, err := policy.New(1, "test", []policy.Registration{
		{ID: "th-1", Type: "T", Owner: "alice", Broker: "https://broker.example/f", K1: "canary-k1", K2: "canary-k2",
			Signing: signing, PublicKeys: pubs},
	})
	if err != nil {
		t.Fatal(err)
	}
	return policy.NewEngine(p)
}

func deviceJWS(t *testing.T, k envelope.Key, dev string, seq uint64, at time.Time, temp float64) []byte {
	t.Helper()
	jws, err := envelope.Seal(k, envelope.Claims{Version: envelope.Version, Device: dev, Seq: seq, Time: at,
		Attrs: map[string]envelope.Attr{"temperature": {Type: "Number", Value: temp}}})
	if err != nil {
		t.Fatal(err)
	}
	return []byte(jws)
}

// TestDeviceSigned: a device-signed reading is verified, forwarded with
// the device's own signature untouched; forged, unsigned, replayed,
// re-ordered and stale readings are refused with their reason; a
// redelivery is a Duplicate, queued once.
func TestDeviceSigned(t *testing.T) {
	devKey, _ := envelope.GenerateKey(envelope.AlgEdDSA)
	other, _ := envelope.GenerateKey(envelope.AlgEdDSA)
	q := openQueue(t, 0)
	m := metrics.New()
	type seen struct {
		out    Outcome
		reason string
	}
	var observed []seen
	p := New(signedPolicy(t, policy.SigningDevice, devKey), q, Options{Gateway: "gw-1", Metrics: m,
		Now: func() time.Time { return t0 }, MaxClockSkew: time.Minute, MaxAge: 24 * time.Hour,
		Observe: func(_ string, out Outcome, reason string) { observed = append(observed, seen{out, reason}) }})
	ctx := context.Background()
	src := reading.Source{Kind: "mqtt", Topic: "devices/th-1/telemetry"}
	hs, _ := envelope.DeriveHS256("th-1", "canary-k1", "canary-k2")
	gwForged, _ := envelope.Seal(hs, envelope.Claims{Version: envelope.Version, Device: "th-1", Seq: 50, Time: t0,
		Attrs: map[string]envelope.Attr{"temperature": {Type: "Number", Value: 99.0}}})
	first := deviceJWS(t, devKey, "th-1", 5, t0, 21.5)
	tests := []struct {
		name    string
		payload []byte
		want    Outcome
		reason  string
	}{
		{"device-signed", first, Queued, ""},
		{"QoS 1 redelivery", first, Duplicate, ReasonDuplicate},
		{"next seq", deviceJWS(t, devKey, "th-1", 6, t0, 22), Queued, ""},
		{"replayed seq, other content", deviceJWS(t, devKey, "th-1", 6, t0, 30), Refused, ReasonReplay},
		{"re-ordered", deviceJWS(t, devKey, "th-1", 4, t0, 22), Refused, ReasonReplay},
		{"signed by another key", deviceJWS(t, other, "th-1", 7, t0, 22), Refused, ReasonBadSignature},
		{"forged by the gateway (HS256 from K1/K2)", []byte(gwForged), Refused, ReasonBadSignature},
		{"unsigned JSON", []byte(`{"temperature": 1}`), Refused, ReasonBadSignature},
		{"signed for another device", deviceJWS(t, devKey, "th-2", 8, t0, 22), Refused, ReasonBadSignature},
		{"no seq", deviceJWS(t, devKey, "th-1", 0, t0, 22), Refused, ReasonInvalid},
		{"from the future", deviceJWS(t, devKey, "th-1", 9, t0.Add(time.Hour), 22), Refused, ReasonStale},
		{"too old", deviceJWS(t, devKey, "th-1", 10, t0.Add(-48*time.Hour), 22), Refused, ReasonStale},
		{"within the window", deviceJWS(t, devKey, "th-1", 11, t0.Add(-time.Hour), 22), Queued, ""},
	}
	for _, tt := range tests {
		observed = nil
		out, err := p.Submit(ctx, Message{Device: "th-1", Source: src, Payload: tt.payload, Received: t0})
		if err != nil || out != tt.want {
			t.Fatalf("%s: Submit = %v, %v, want %v", tt.name, out, err, tt.want)
		}
		if len(observed) != 1 || observed[0].reason != tt.reason {
			t.Fatalf("%s: observed %+v, want reason %q", tt.name, observed, tt.reason)
		}
	}
	for _, reason := range []string{ReasonBadSignature, ReasonReplay, ReasonDuplicate, ReasonStale} {
		if n := counter(t, m.Refused.WithLabelValues(reason)); n == 0 {
			t.Errorf("edgegate_readings_refused_total{reason=%q} = 0", reason)
		}
	}
	items, err := peekSent(q, queue.Lane{Broker: "https://broker.example/f", Device: "th-1"}, 100)
	if err != nil || len(items) != 3 {
		t.Fatalf("queued %d items (%v), want 3", len(items), err)
	}
	// The body carries the device's JWS untouched and verifies with its
	// public key only.
	c, err := envelope.VerifyAttrsWith(items[0].Body, []envelope.Key{devKey.Public()}, "")
	if err != nil || c.Seq != 5 || c.Gateway != "" {
		t.Fatalf("VerifyAttrsWith(queued body) = %+v, %v", c, err)
	}
	var body map[string]struct {
		Metadata map[string]struct{ Value any }
	}
	if err := json.Unmarshal(items[0].Body, &body); err != nil || body["temperature"].Metadata["signature"].Value != string(first) {
		t.Fatalf("signature metadata is not the device's JWS: %v (%s)", err, items[0].Body)
	}
}

// TestDeviceSignedDropsAtRender: an attribute of a device-signed reading
// that Orion would refuse is left out of the body; the device's JWS (which
// signs it) is forwarded untouched and the other attributes still verify.
func TestDeviceSignedDropsAtRender(t *testing.T) {
	devKey, _ := envelope.GenerateKey(envelope.AlgEdDSA)
	q := openQueue(t, 0)
	m := metrics.New()
	p := New(signedPolicy(t, policy.SigningDevice, devKey), q, Options{Gateway: "gw-1", Metrics: m, Now: func() time.Time { return t0 }})
	jws, err := envelope.Seal(devKey, envelope.Claims{Version: envelope.Version, Device: "th-1", Seq: 1, Time: t0,
		Attrs: map[string]envelope.Attr{"temperature": {Type: "Number", Value: 21.5}, "note": {Type: "Text", Value: "f(x)"}}})
	if err != nil {
		t.Fatal(err)
	}
	if out, err := p.Submit(context.Background(), Message{Device: "th-1", Source: reading.Source{Kind: "mqtt"}, Payload: []byte(jws)}); err != nil || out != Queued {
		t.Fatalf("Submit = %v, %v", out, err)
	}
	items, _ := peekSent(q, queue.Lane{Broker: "https://broker.example/f", Device: "th-1"}, 10)
	if len(items) != 1 {
		t.Fatalf("%d items", len(items))
	}
	entity := append([]byte(`{"id":"th-1","type":"T",`), items[0].Body[1:]...)
	rep, err := envelope.VerifyEntity(entity, []envelope.Key{devKey.Public()}, "")
	if err != nil || len(rep.Attrs) != 1 || rep.Attrs[0].Name != "temperature" || rep.Attrs[0].Verdict != envelope.Verified {
		t.Fatalf("VerifyEntity = %+v, %v; want temperature verified, note left out", rep, err)
	}
	if got := counter(t, m.AttrsDropped.WithLabelValues(reading.DropForbiddenChars)); got != 1 {
		t.Errorf("attributes_dropped{forbidden_chars} = %v, want 1", got)
	}
}

// TestGatewaySignedAsymmetric: a gateway-signed device is sealed with the
// private key the resolver gives for the newest public key; without it the
// reading is held (not acknowledged), never signed with another key.
func TestGatewaySignedAsymmetric(t *testing.T) {
	cur, _ := envelope.GenerateKey(envelope.AlgES256)
	old, _ := envelope.GenerateKey(envelope.AlgEdDSA)
	eng := signedPolicy(t, policy.SigningGateway, cur, old)
	q := openQueue(t, 0)
	ctx := context.Background()
	msg := Message{Device: "th-1", Source: reading.Source{Kind: "mqtt"}, Payload: []byte(`{"temperature": 20}`), Received: t0}

	held := New(eng, q, Options{Gateway: "gw-1", SigningKeys: keyRing{"th-1": old}})
	if _, err := held.Submit(ctx, msg); !errors.Is(err, ErrNoSigningKey) {
		t.Fatalf("Submit with only the old key held = %v, want ErrNoSigningKey", err)
	}
	p := New(eng, q, Options{Gateway: "gw-1", SigningKeys: keyRing{"th-1": cur}})
	if out, err := p.Submit(ctx, msg); err != nil || out != Queued {
		t.Fatalf("Submit = %v, %v", out, err)
	}
	items, _ := peekSent(q, queue.Lane{Broker: "https://broker.example/f", Device: "th-1"}, 10)
	if len(items) != 1 {
		t.Fatalf("%d items", len(items))
	}
	d, _ := eng.Current().Device("th-1")
	c, err := envelope.VerifyAttrsWith(items[0].Body, d.VerifyKeys(), "")
	if err != nil || c.Gateway != "gw-1" {
		t.Fatalf("VerifyAttrsWith = %+v, %v", c, err)
	}
}

// TestRadioDeviceSeq: a source-given device seq (radio JSON lines) is
// checked the same way.
func TestRadioDeviceSeq(t *testing.T) {
	p := New(testPolicy(t), openQueue(t, 0), Options{Gateway: "gw-1"})
	ctx := context.Background()
	msg := func(seq uint64, v string) Message {
		return Message{Device: "th-1", Source: reading.Source{Kind: "radio"}, Payload: []byte(`{"t": ` + v + `}`), DeviceSeq: seq}
	}
	for _, tt := range []struct {
		m    Message
		want Outcome
	}{{msg(3, "1"), Queued}, {msg(3, "1"), Duplicate}, {msg(2, "1"), Refused}, {msg(4, "2"), Queued}, {msg(0, "3"), Queued}} {
		if out, err := p.Submit(ctx, tt.m); err != nil || out != tt.want {
			t.Fatalf("Submit(seq %d) = %v, %v, want %v", tt.m.DeviceSeq, out, err, tt.want)
		}
	}
}

// TestWindowSkippedWithoutClock: an unsynchronised gateway clock (before
// 2025) never makes readings stale.
func TestWindowSkippedWithoutClock(t *testing.T) {
	p := New(testPolicy(t), openQueue(t, 0), Options{Gateway: "gw-1", MaxAge: time.Minute, MaxClockSkew: time.Minute,
		Now: func() time.Time { return time.Unix(0, 0) }})
	out, err := p.Submit(context.Background(), Message{Device: "th-1", Payload: []byte(`{"t": 1, "TimeInstant": "2026-01-01T00:00:00Z"}`)})
	if err != nil || out != Queued {
		t.Fatalf("Submit = %v, %v, want Queued", out, err)
	}
}
