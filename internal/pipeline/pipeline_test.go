package pipeline

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/edgegate/edgegate/internal/envelope"
	"github.com/edgegate/edgegate/internal/metrics"
	"github.com/edgegate/edgegate/internal/queue"
	"github.com/edgegate/edgegate/internal/reading"
	"github.com/edgegate/edgegate/policy"
)

func counter(t *testing.T, c prometheus.Collector) float64 {
	t.Helper()
	ch := make(chan prometheus.Metric, 1)
	c.Collect(ch)
	var m dto.Metric
	if err := (<-ch).Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}

// peekSent is Peek with each body as the uplink sends it: the queue
// stores it packed (envelope.SealPacked), the JWS once, and a packed body
// is never valid JSON, so a test that forgot this would fail to parse.
func peekSent(q *queue.Queue, l queue.Lane, n int) ([]queue.Item, error) {
	items, err := q.Peek(l, n)
	for i := range items {
		if err != nil {
			break
		}
		items[i].Body, err = envelope.AppendBody(nil, items[i].Body)
	}
	return items, err
}

// openQueue runs a real queue in a temp dir for the test.
func openQueue(t *testing.T, quota int64) *queue.Queue {
	t.Helper()
	q, err := queue.Open(queue.Options{Dir: t.TempDir(), Key: bytes.Repeat([]byte{7}, 32), QuotaBytes: quota})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- q.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		<-done
		q.Close()
	})
	return q
}

func testPolicy(t *testing.T) *policy.Engine {
	t.Helper()
	p, err := policy.New(1, "test", []policy.Registration{
		{ID: "th-1", Type: "T", Owner: "alice", Broker: "https://broker.example/f", K1: "canary-k1", K2: "canary-k2"},
	})
	if err != nil {
		t.Fatal(err)
	}
	return policy.NewEngine(p)
}

func TestSubmit(t *testing.T) {
	q := openQueue(t, 0)
	m := metrics.New()
	var logs bytes.Buffer
	p := New(testPolicy(t), q, Options{Gateway: "gw-1", Metrics: m,
		Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	ctx := context.Background()
	mqttSrc := reading.Source{Kind: "mqtt", Topic: "devices/x/telemetry"}
	tests := []struct {
		name, device, payload string
		want                  Outcome
		reason                string
	}{
		{"flat reading", "th-1", `{"temperature": 21.5, "humidity": 40, "on": true}`, Queued, ""},
		{"ngsi-like reading", "th-1", `{"temperature": {"value": 22, "type": "Float"}, "TimeInstant": "2026-11-26T05:00:00Z"}`, Queued, ""},
		{"unknown device", "rogue", `{"temperature": 1}`, Refused, policy.ReasonUnknownDevice},
		{"not json", "th-1", `temperature=1`, Refused, ReasonInvalid},
		{"only a forbidden character", "th-1", `{"label": "<script>"}`, Refused, ReasonNoValidAttributes},
		{"attribute named like the signature", "th-1", `{"signature": "x"}`, Queued, ""},
		{"forbidden character beside a valid attribute", "th-1", `{"label": "a=b", "temperature": 20}`, Queued, ""},
		{"oversized", "th-1", `{"x":"` + strings.Repeat("a", reading.MaxPayloadBytes) + `"}`, Refused, ReasonTooLarge},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := 0.0
			if tt.reason != "" {
				before = counter(t, m.Refused.WithLabelValues(tt.reason))
			}
			got, err := p.Submit(ctx, Message{Device: tt.device, Source: mqttSrc, Payload: []byte(tt.payload), Received: time.Now()})
			if err != nil || got != tt.want {
				t.Fatalf("Submit(%s) = %v, %v; want %v", tt.name, got, err, tt.want)
			}
			if tt.reason != "" {
				if after := counter(t, m.Refused.WithLabelValues(tt.reason)); after != before+1 {
					t.Errorf("refused{%s} went %v → %v, want +1", tt.reason, before, after)
				}
			}
		})
	}

	// What was queued is signed, in order, and verifiable with the key.
	items, err := peekSent(q, queue.Lane{Broker: "https://broker.example/f", Device: "th-1"}, 10)
	if err != nil {
		t.Fatal(err)
	}
	if len(items) != 4 {
		t.Fatalf("queued %d items, want 4", len(items))
	}
	key, _ := envelope.DeriveHS256("th-1", "canary-k1", "canary-k2")
	for i, it := range items {
		c, err := envelope.VerifyAttrs(it.Body, key, "")
		if err != nil {
			t.Fatalf("item %d does not verify: %v", i, err)
		}
		if c.Seq != uint64(i+1) || c.Gateway != "gw-1" || it.Type != "T" {
			t.Errorf("item %d: seq %d gateway %q type %q", i, c.Seq, c.Gateway, it.Type)
		}
	}
	// Stored, the JWS is there once, however many attributes carry it
	// when sent.
	stored, err := q.Peek(queue.Lane{Broker: "https://broker.example/f", Device: "th-1"}, 10)
	if err != nil || len(stored) != len(items) {
		t.Fatalf("Peek = %d items, %v", len(stored), err)
	}
	for i, it := range stored {
		var sent map[string]struct {
			Metadata struct {
				Signature struct{ Value string } `json:"signature"`
			} `json:"metadata"`
		}
		if err := json.Unmarshal(items[i].Body, &sent); err != nil {
			t.Fatalf("item %d: %v", i, err)
		}
		for name, a := range sent {
			jws := []byte(a.Metadata.Signature.Value)
			if n, m := bytes.Count(it.Body, jws), bytes.Count(items[i].Body, jws); n != 1 || m != len(sent) {
				t.Errorf("item %d, %s: the JWS is %d times in the stored body, %d times in the %d attributes sent", i, name, n, m, len(sent))
			}
		}
	}
	if c, _ := envelope.VerifyAttrs(items[1].Body, key, ""); !c.Time.Equal(time.Date(2026, 11, 26, 5, 0, 0, 0, time.UTC)) {
		t.Errorf("observation time = %v, want the payload's TimeInstant", c.Time)
	}
	if got := counter(t, m.Ingested.WithLabelValues("mqtt")); got != 4 {
		t.Errorf("ingested{mqtt} = %v, want 4", got)
	}
	// The forbidden value was dropped, counted and logged without its
	// value; the valid attribute beside it was queued, signed alone.
	if got := counter(t, m.AttrsDropped.WithLabelValues(reading.DropForbiddenChars)); got != 2 {
		t.Errorf("attributes_dropped{forbidden_chars} = %v, want 2", got)
	}
	c, _ := envelope.VerifyAttrs(items[3].Body, key, "")
	if _, ok := c.Attrs["label"]; ok || c.Attrs["temperature"].Value != 20.0 || bytes.Contains(items[3].Body, []byte("label")) {
		t.Errorf("queued %s, signed %+v; want temperature only", items[3].Body, c.Attrs)
	}
	if strings.Contains(logs.String(), "a=b") || strings.Contains(logs.String(), "script") {
		t.Errorf("a dropped value reached the log:\n%s", logs.String())
	}
	if !strings.Contains(logs.String(), "attribute=label") {
		t.Errorf("the dropped attribute is not named in the log:\n%s", logs.String())
	}
	if strings.Contains(logs.String(), "canary") {
		t.Fatal("a device key reached the log")
	}
	if !strings.Contains(logs.String(), "rogue") {
		t.Errorf("the refusal of an unknown device is not logged:\n%s", logs.String())
	}
}

func TestSubmitQuotaIsNotARefusal(t *testing.T) {
	q := openQueue(t, 1) // one byte: every append is over quota
	m := metrics.New()
	p := New(testPolicy(t), q, Options{Gateway: "gw-1", Metrics: m})
	_, err := p.Submit(context.Background(), Message{Device: "th-1", Source: reading.Source{Kind: "mqtt"}, Payload: []byte(`{"t":1}`)})
	if !errors.Is(err, queue.ErrQuota) {
		t.Fatalf("Submit over quota = %v, want an error wrapping queue.ErrQuota (so the source keeps the reading)", err)
	}
	if got := counter(t, m.Refused.WithLabelValues(ReasonQuota)); got != 1 {
		t.Errorf("refused{quota} = %v, want 1", got)
	}
}

func TestRefusalLogIsRateLimited(t *testing.T) {
	q := openQueue(t, 0)
	var logs bytes.Buffer
	p := New(testPolicy(t), q, Options{Gateway: "gw", Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	for range 100 {
		if out, err := p.Submit(context.Background(), Message{Device: "rogue", Payload: []byte(`{"t":1}`)}); err != nil || out != Refused {
			t.Fatalf("Submit = %v, %v", out, err)
		}
	}
	if n := strings.Count(logs.String(), "reading refused"); n != 1 {
		t.Fatalf("100 refusals of one device logged %d lines, want 1", n)
	}
}

// TestSubmitInputRules: each input rule of issue 17 item 8 refuses (or
// drops the attribute) with its own counted reason, before signing.
func TestSubmitInputRules(t *testing.T) {
	q := openQueue(t, 0)
	m := metrics.New()
	p := New(testPolicy(t), q, Options{Gateway: "gw-1", Metrics: m})
	ctx := context.Background()
	src := reading.Source{Kind: "mqtt", Topic: "devices/../telemetry"}
	for _, tt := range []struct {
		name, device, payload, reason string
	}{
		{"device id ..", "..", `{"t":1}`, ReasonBadDeviceID},
		{"device id .", ".", `{"t":1}`, ReasonBadDeviceID},
		{"invalid UTF-8", "th-1", "{\"label\":\"caf\xe9\"}", reading.ReasonBadUTF8},
		{"1e999", "th-1", `{"t":1e999}`, reading.ReasonNotFinite},
		{"only NaN typed Number", "th-1", `{"t":{"value":"NaN","type":"Number"}}`, ReasonNoValidAttributes},
		{"only reserved names", "th-1", `{"id":"other","type":"Other"}`, ReasonNoValidAttributes},
	} {
		t.Run(tt.name, func(t *testing.T) {
			before := counter(t, m.Refused.WithLabelValues(tt.reason))
			got, err := p.Submit(ctx, Message{Device: tt.device, Source: src, Payload: []byte(tt.payload), Received: time.Now()})
			if err != nil || got != Refused {
				t.Fatalf("Submit = %v, %v; want Refused", got, err)
			}
			if after := counter(t, m.Refused.WithLabelValues(tt.reason)); after != before+1 {
				t.Errorf("refused{%s} went %v → %v, want +1", tt.reason, before, after)
			}
		})
	}
	if got := counter(t, m.AttrsDropped.WithLabelValues(reading.DropNotFinite)); got != 1 {
		t.Errorf("attributes_dropped{not_finite} = %v, want 1", got)
	}
	if got := counter(t, m.AttrsDropped.WithLabelValues(reading.DropReservedName)); got != 2 {
		t.Errorf("attributes_dropped{reserved_name} = %v, want 2", got)
	}
	// A NaN beside a good value: the good one is queued alone.
	if got, err := p.Submit(ctx, Message{Device: "th-1", Source: src, Payload: []byte(`{"t":{"value":"Inf","type":"Float"},"h":40}`), Received: time.Now()}); err != nil || got != Queued {
		t.Fatalf("Submit(Inf beside a number) = %v, %v; want Queued", got, err)
	}
	items, err := peekSent(q, queue.Lane{Broker: "https://broker.example/f", Device: "th-1"}, 10)
	if err != nil || len(items) != 1 || bytes.Contains(items[0].Body, []byte("Inf")) {
		t.Fatalf("queued %d items (%v); want one, without the Inf value", len(items), err)
	}
}

// TestPendingPoll: polled (a context already done) while its commit waits,
// a reading's Pending answers queue.ErrNotYet and settles nothing (not counted, not refused);
// once committed it answers Queued, counted once.
func TestPendingPoll(t *testing.T) {
	q := openQueue(t, 0)
	m := metrics.New()
	p := New(testPolicy(t), q, Options{Gateway: "gw-1", Metrics: m})
	ctx := context.Background()
	// The committer is busy sealing this entry until release.
	release := make(chan struct{})
	blocker, err := q.Enqueue(ctx, queue.Entry{Broker: "https://broker.example/f", Device: "th-0", Type: "T",
		Seal: func(uint64) ([]byte, error) { <-release; return []byte(`{"t":{"type":"Number","value":1}}`), nil }})
	if err != nil {
		t.Fatal(err)
	}
	src := reading.Source{Kind: "mqtt", Topic: "devices/th-1/telemetry"}
	pend := p.Start(ctx, Message{Device: "th-1", Source: src, Payload: []byte(`{"temperature": 21.5}`), Received: time.Now()})
	poll, cancel := context.WithCancel(ctx)
	cancel()
	if out, err := pend(poll); !errors.Is(err, queue.ErrNotYet) || out != 0 {
		close(release)
		t.Fatalf("polled while the commit waits = %v, %v; want ErrNotYet", out, err)
	}
	if n := counter(t, m.Ingested.WithLabelValues("mqtt")); n != 0 {
		t.Errorf("ingested = %v after a poll, want 0", n)
	}
	close(release)
	if _, err := blocker(ctx); err != nil {
		t.Fatal(err)
	}
	if out, err := pend(ctx); err != nil || out != Queued {
		t.Fatalf("Pending = %v, %v; want Queued", out, err)
	}
	if n := counter(t, m.Ingested.WithLabelValues("mqtt")); n != 1 {
		t.Errorf("ingested = %v, want 1", n)
	}
}
