package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"github.com/edgegate/edgegate/mqtt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/eclipse/paho.mqtt.golang/packets"

	"github.com/edgegate/edgegate/internal/envelope"
)

// signedAttrs is the NGSI attribute object the gateway sends for one
// reading of d (envelope.Body: every attribute carries the reading's JWS).
func signedAttrs(t testing.TB, d device, n, t0 int64) string {
	t.Helper()
	k, err := envelope.DeriveHS256(d.ID, d.K1, d.K2)
	if err != nil {
		t.Fatal(err)
	}
	c := envelope.Claims{Version: envelope.Version, Gateway: "gw-bench", Device: d.ID, Seq: uint64(n + 1),
		Time: time.Unix(0, t0).UTC(), Attrs: map[string]envelope.Attr{
			"temperature": {Type: "Number", Value: 21.5}, "n": {Type: "Number", Value: float64(n)},
			"t0": {Type: "Number", Value: float64(t0)}}}
	jws, err := envelope.Seal(k, c)
	if err != nil {
		t.Fatal(err)
	}
	b, err := envelope.Body(c, jws, "")
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// batchOf is internal/uplink's op/update body: each reading's attributes
// with "id" and "type" spliced in front.
func batchOf(ents ...string) string {
	return `{"actionType":"append","entities":[` + strings.Join(ents, ",") + `]}`
}

func entityOf(d device, attrs string) string {
	return fmt.Sprintf(`{"id":%q,"type":%q,%s`, d.ID, d.Type, strings.TrimPrefix(attrs, "{"))
}

func TestDecodeOpUpdateAndAttrs(t *testing.T) {
	devs := makeDevices(2)
	t0 := int64(1764750000123456789)
	a, b := signedAttrs(t, devs[0], 50, t0), signedAttrs(t, devs[1], 51, t0+1000)
	body := batchOf(entityOf(devs[0], a), entityOf(devs[1], b))
	rs, err := decodeOpUpdate([]byte(body))
	if err != nil {
		t.Fatal(err)
	}
	if len(rs) != 2 {
		t.Fatalf("%d readings, want 2", len(rs))
	}
	for i, want := range []lightReading{{Device: "bench-000", N: 50, HasN: true, T0: t0}, {Device: "bench-001", N: 51, HasN: true, T0: t0 + 1000}} {
		got := rs[i]
		// t0 was signed as a float64: exact to its precision.
		if d := got.T0 - want.T0; got.Device != want.Device || got.N != want.N || !got.HasN || d < -256 || d > 256 {
			t.Errorf("reading %d = %+v, want %+v", i, got, want)
		}
	}
	// Each reading's text is its entity, which verifies on its own.
	if want := entityOf(devs[1], b); string(rs[1].Raw) != want {
		t.Errorf("entity 1 text = %s, want %s", rs[1].Raw, want)
	}
	x, err := decodeAttrs([]byte(a), "bench-000")
	if err != nil || x.Device != "bench-000" || x.N != 50 || !x.HasN || string(x.Raw) != a {
		t.Fatalf("attrs: %+v, %v", x, err)
	}
	// A reading without "n" is counted, as stray; an id with escapes is
	// read as the string it is.
	rs, err = decodeOpUpdate([]byte(`{"entities":[{"id":"a\u002db","temperature":{"value":"x\"}"}}]}`))
	if err != nil || len(rs) != 1 || rs[0].Device != "a-b" || rs[0].HasN {
		t.Fatalf("got %+v, %v", rs, err)
	}
	for _, bad := range []struct{ body, want string }{
		{``, "byte 0: want an object"},
		{`[]`, "byte 0: want an object"},
		{`{"actionType":"append"}`, `no "entities" array`},
		{`{"entities":[{"type":"T"}]}`, `has no "id"`},
		{`{"entities":[{"id":"a","n":{"value":}}]}`, `attribute "n": byte 36: want a value`},
		{`{"entities":[{"id":"a","n":{"value":"3"}}]}`, `attribute "n": byte 36: want a value`},
		{`{"entities":[{"id":"a","n":{"value":3x}}]}`, `attribute "n": value "3x" is not a number`},
		{`{"entities":[{"id":"a"}`, "unterminated array"},
		{`{"entities":[{"id":"a}]}`, "unterminated string"},
		{`{"entities":[]} x`, "data after the JSON value"},
		{strings.Repeat(`{"entities":[`, 100), "nested deeper than 64"},
	} {
		if _, err := decodeOpUpdate([]byte(bad.body)); err == nil || !strings.Contains(err.Error(), bad.want) {
			t.Errorf("decode %q: err %v, want %q", logClip([]byte(bad.body)), err, bad.want)
		}
	}
	if _, err := decodeAttrs([]byte(`{"n":{"value":1},`), "a"); err == nil || !strings.Contains(err.Error(), "attrs of a: byte 17: want a string") {
		t.Errorf("truncated attrs: %v", err)
	}
	for _, p := range []string{"/orion-filter/orion-1/v2/entities/bench-001/attrs", "/v2/entities/bench-001/attrs"} {
		if id, ok := entityOfPath(p); !ok || id != "bench-001" {
			t.Errorf("entityOfPath(%q) = %q, %v", p, id, ok)
		}
	}
	for _, p := range []string{"/v2/entities//attrs", "/v2/entities/a/b/attrs", "/v2/op/update"} {
		if id, ok := entityOfPath(p); ok {
			t.Errorf("entityOfPath(%q) = %q, want refused", p, id)
		}
	}
}

// The light sink over real TLS, with tokens the simulated realm issued:
// both request shapes of the uplink are counted per reading and answered
// 204; the sampled readings' signatures are verified (a tampered one
// counted invalid); requests without a realm token are refused 401 and
// counted; a body that does not decode is answered 400 and counted.
func TestLightSinkHTTPS(t *testing.T) {
	devs := makeDevices(5)
	s := newSeqSink()
	s.reset(true)
	sim, err := newSim(devs, s)
	if err != nil {
		t.Fatal(err)
	}
	defer sim.Close()
	simClient := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: sim.CAPool()}}}
	ls, err := startLightSink(context.Background(), s, devs, sim.JWKSURL(), simClient)
	if err != nil {
		t.Fatal(err)
	}
	defer ls.close()
	tok, err := sim.IssueAccessToken("alice", time.Hour, benchClientID)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(ls.caPEM()) {
		t.Fatal("the sink's CA PEM does not parse")
	}
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	send := func(method, url, bearer, body string) int {
		t.Helper()
		req, err := http.NewRequest(method, url, strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Content-Type", "application/json")
		if bearer != "" {
			req.Header.Set("Authorization", "Bearer "+bearer)
		}
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	t0 := time.Now().Add(-5 * time.Millisecond).UnixNano()
	// Phase base 100, 5 devices: device i's k-th reading is 100 + 5k + i.
	batch := batchOf(entityOf(devs[0], signedAttrs(t, devs[0], 100, t0)), entityOf(devs[1], signedAttrs(t, devs[1], 101, t0)),
		entityOf(devs[0], signedAttrs(t, devs[0], 105, t0)))
	if code := send(http.MethodPost, ls.batchURL()+"/v2/op/update", tok, batch); code != http.StatusNoContent {
		t.Fatalf("op/update: status %d, want 204", code)
	}
	patch := func(d device, attrs string) int {
		return send(http.MethodPatch, ls.filterURL()+"/v2/entities/"+d.ID+"/attrs?elementid="+d.ID+"&type="+d.Type, tok, attrs)
	}
	if code := patch(devs[2], signedAttrs(t, devs[2], 102, t0)); code != http.StatusNoContent {
		t.Fatalf("PATCH: status %d, want 204", code)
	}
	// Tampered after signing: device 3's first reading, so sampled.
	tampered := strings.Replace(signedAttrs(t, devs[3], 103, t0), `"value":21.5`, `"value":99.5`, 1)
	if code := patch(devs[3], tampered); code != http.StatusNoContent {
		t.Fatalf("PATCH: status %d, want 204 (Orion does not verify)", code)
	}
	// Device 1's reading under device 4's entity: not device 4's key.
	if code := patch(devs[4], signedAttrs(t, devs[1], 106, t0)); code != http.StatusNoContent {
		t.Fatalf("PATCH: status %d", code)
	}
	st := s.stats()
	// Sampled: each device's first reading (bench-000's 105 is its 2nd).
	if st.Verified != 3 || st.Invalid != 2 || !strings.Contains(st.InvalidWhy, "bench-003") {
		t.Fatalf("signatures verified %d, invalid %d (%q); want 3 and 2, the first naming bench-003", st.Verified, st.Invalid, st.InvalidWhy)
	}
	if strings.Contains(st.InvalidWhy, devs[3].K1) || strings.Contains(st.InvalidWhy, devs[3].K2) {
		t.Fatalf("the reason shows a device key: %q", st.InvalidWhy)
	}
	if st.P50 < 5*time.Millisecond {
		t.Errorf("latency %v, want ≥ 5 ms from t0", st.P50)
	}
	got := s.tally(100, []string{devs[0].ID, devs[1].ID, devs[2].ID, devs[3].ID, devs[4].ID}, []int{2, 1, 1, 1, 1})
	if want := (seqCounts{Published: 6, Received: 5, Lost: 1, Stray: 1}); got != want {
		t.Fatalf("tally = %+v, want %+v", got, want)
	}

	before := s.count()
	expired, err := sim.IssueAccessToken("alice", -time.Minute, benchClientID)
	if err != nil {
		t.Fatal(err)
	}
	// (The tokens are not printed: no secret in test output.)
	for i, bearer := range []string{"", "abc.def.ghi", expired} {
		if code := send(http.MethodPost, ls.batchURL()+"/v2/op/update", bearer, batch); code != http.StatusUnauthorized {
			t.Errorf("token %d (none, not a realm token, expired): status %d, want 401", i, code)
		}
	}
	for _, bad := range []struct{ method, path, body string }{
		{http.MethodPost, "/orion/v2/op/update", `{"entities":[`},
		{http.MethodGet, "/orion/v2/entities/bench-000", ``},
		{http.MethodPatch, "/orion-filter/orion-1/v2/entities/bench-000/attrs", `{"n":`},
	} {
		if code := send(bad.method, ls.srv.URL+bad.path, tok, bad.body); code != http.StatusBadRequest {
			t.Errorf("%s %s %q: status %d, want 400", bad.method, bad.path, bad.body, code)
		}
	}
	if s.count() != before {
		t.Errorf("refused requests were counted: %d readings, want %d", s.count(), before)
	}
	if ls.requests.Load() != 4 || ls.unauthorized.Load() != 3 || ls.bad.Load() != 3 {
		t.Fatalf("requests %d, unauthorized %d, bad %d; want 4, 3, 3", ls.requests.Load(), ls.unauthorized.Load(), ls.bad.Load())
	}
}

// The sample is each device's 1st, 101st, 201st ... reading received.
func TestLightSinkSample(t *testing.T) {
	ls := &lightSink{sampleEvery: 100, received: map[string]int{}}
	var rs []lightReading
	for k := range 250 {
		rs = append(rs, lightReading{Device: "a", N: int64(k)}, lightReading{Device: "b", N: int64(k)})
	}
	var got []string
	for _, x := range ls.sample(rs) {
		got = append(got, fmt.Sprintf("%s%d", x.Device, x.N))
	}
	if want := "a0 b0 a100 b100 a200 b200"; strings.Join(got, " ") != want {
		t.Fatalf("sampled %v, want %s", got, want)
	}
	// A new phase starts the clock again.
	ls.resetSample()
	if got := ls.sample(rs[:4]); len(got) != 2 || got[0].N != 0 || got[1].N != 0 {
		t.Fatalf("after reset: sampled %+v, want each device's first", got)
	}
}

// PUBACK order at a publisher: a PUBACK for any publish but the oldest in
// flight counts once.
func TestAckOrder(t *testing.T) {
	a := newAckOrder()
	pub := func(id uint16) {
		p := packets.NewControlPacket(packets.Publish).(*packets.PublishPacket)
		p.Qos, p.MessageID = 1, id
		a.Put(fmt.Sprintf("o.%d", id), p)
	}
	for id := uint16(1); id <= 5; id++ {
		pub(id)
	}
	for _, id := range []int{1, 3, 2, 4, 5} { // 3 before 2
		a.Del(fmt.Sprintf("o.%d", id))
	}
	if got := a.outOfOrder(); got != 1 {
		t.Fatalf("out of order %d, want 1", got)
	}
	pub(6)
	pub(7)
	a.Del("o.7")
	a.Del("o.6")
	a.Del("o.99") // not a publish of this client: ignored
	if got := a.outOfOrder(); got != 2 {
		t.Fatalf("out of order %d, want 2", got)
	}
}

// Through a real broker (the bare mochi of the raw row): every PUBACK in
// publish order, counted zero.
func TestFleetAckOrderMochi(t *testing.T) {
	srv, url, err := startMochi(100000)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = mqtt.CloseServer(srv, "bench") }()
	f, err := connectFleet(url, makeDevices(3), false)
	if err != nil {
		t.Fatal(err)
	}
	defer f.close()
	pr := f.publish(context.Background(), 300, 0, 16, 30*time.Second)
	if pr.Sent != 300 || pr.Acked != 300 || pr.Failed != 0 || pr.AcksOutOfOrder != 0 {
		t.Fatalf("publish = %+v; want 300 sent and acknowledged in order", pr)
	}
	var tracked uint64
	for _, a := range f.acks {
		if a.outOfOrder() != 0 || len(a.seqOf) != 0 {
			t.Fatalf("client left %d in flight", len(a.seqOf))
		}
		tracked += a.next
	}
	if tracked != 300 {
		t.Fatalf("the stores saw %d publishes, want 300", tracked)
	}
}

// The sinks' decode per reading: the gateway's op/update entities (each
// carrying its JWS on every attribute) through the light sink, Telegraf's
// batch metrics through its sink. `go test ./cmd/edgegate-bench -run X
// -bench SinkDecode`.
func BenchmarkSinkDecode(b *testing.B) {
	const n = 256
	devs := makeDevices(50)
	var ents, metrics []string
	for i := range n {
		d := devs[i%len(devs)]
		ents = append(ents, entityOf(d, signedAttrs(b, d, int64(i), 1764750000123456789)))
		metrics = append(metrics, fmt.Sprintf(`{"fields":{"humidity":40,"n":%d,"t0":1764750000123456800,"temperature_value":20.5},"name":"mqtt_consumer","tags":{"topic":"devices/%s/telemetry"},"timestamp":1796287182982613577}`, i, d.ID))
	}
	gw := []byte(batchOf(ents...))
	tg := []byte(`{"metrics":[` + strings.Join(metrics, ",") + `]}`)
	b.Run("light-op-update", func(b *testing.B) {
		b.SetBytes(int64(len(gw)))
		for b.Loop() {
			if rs, err := decodeOpUpdate(gw); err != nil || len(rs) != n {
				b.Fatal(err)
			}
		}
		b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*n), "ns/reading")
	})
	b.Run("telegraf-batch", func(b *testing.B) {
		b.SetBytes(int64(len(tg)))
		for b.Loop() {
			if rs, err := decodeTelegrafBatch(tg); err != nil || len(rs) != n {
				b.Fatal(err)
			}
		}
		b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*n), "ns/reading")
	})
}
