package main

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/xml"
	"errors"
	"io"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/sim/centralsim"
)

// A request body of Telegraf 1.37.2's http output (json serializer, batch
// format), captured from the binary `make telegraf` builds, fed by
// mqtt_consumer with two of the fleet's payloads.
func TestDecodeTelegrafBatch(t *testing.T) {
	body, err := os.ReadFile("testdata/telegraf-batch.json")
	if err != nil {
		t.Fatal(err)
	}
	rs, err := decodeTelegrafBatch(body)
	if err != nil {
		t.Fatal(err)
	}
	if len(rs) != 2 {
		t.Fatalf("%d readings, want 2", len(rs))
	}
	for i, want := range []telegrafReading{
		{Device: "bench-000", N: 0, HasN: true, T0: 1764750000123456789},
		{Device: "bench-001", N: 1, HasN: true, T0: 1764750000123999999},
	} {
		got := rs[i]
		// t0 went through a float64 field: exact to the float's precision.
		if d := got.T0 - want.T0; got.Device != want.Device || got.N != want.N || !got.HasN || d < -256 || d > 256 {
			t.Errorf("reading %d = %+v, want %+v", i, got, want)
		}
	}
	for _, bad := range []string{``, `{"metrics":`, `{}`, `{"metrics":{}}`, `[1,2]`} {
		if _, err := decodeTelegrafBatch([]byte(bad)); err == nil || !strings.Contains(err.Error(), "telegraf batch") {
			t.Errorf("decode %q: err %v, want a telegraf batch error", bad, err)
		}
	}
	// A metric without the topic tag or the sequence is counted, as stray.
	rs, err = decodeTelegrafBatch([]byte(`{"metrics":[{"fields":{"humidity":1},"tags":{}}]}`))
	if err != nil || len(rs) != 1 || rs[0].HasN || rs[0].Device != "" {
		t.Fatalf("got %+v, %v", rs, err)
	}
}

// The sink counts, per device, what arrived of a phase: device i's k-th
// reading is numbered base + k*m + i.
func TestSinkTally(t *testing.T) {
	s := newSeqSink()
	s.reset(true)
	now := time.Now()
	ids := []string{"a", "b"}
	// Published: a 100, 102, 104; b 101, 103.
	for _, x := range []struct {
		dev  string
		n    int64
		hasN bool
	}{
		{"a", 100, true}, {"a", 104, true}, {"a", 102, true}, // 102 after 104: out of order
		{"a", 102, true},                   // duplicate
		{"b", 101, true}, {"b", 101, true}, // duplicate; 103 never arrives: lost
		{"b", 999, true}, // not published in this phase: stray
		{"z", 100, true}, // unknown device: stray
		{"a", 0, false},  // no sequence number: stray
		{"a", 98, true},  // before the phase (base 100): stray
	} {
		s.add(now, x.dev, x.n, x.hasN, now.Add(-3*time.Millisecond).UnixNano())
	}
	got := s.tally(100, ids, []int{3, 2})
	want := seqCounts{Published: 5, Received: 4, Duplicates: 2, Lost: 1, OutOfOrder: 1, Stray: 4}
	if got != want {
		t.Fatalf("tally = %+v, want %+v", got, want)
	}
	if st := s.stats(); st.N != 10 || st.P50 < 3*time.Millisecond {
		t.Fatalf("stats = %+v, want 10 receipts, p50 ≥ 3 ms", st)
	}
	s.reset(false)
	if got := s.tally(100, ids, []int{3, 2}); got.Received != 0 || got.Lost != 5 {
		t.Fatalf("after reset: %+v", got)
	}
}

// The gateway's readings arrive as NGSI attributes at the simulated
// broker; the raw subscriber's as the fleet's payload.
func TestSinkDecodesNGSIAndRaw(t *testing.T) {
	s := newSeqSink()
	s.reset(true)
	t0 := time.Now().Add(-5 * time.Millisecond).UnixNano()
	s.onUpdate(centralsim.Update{Device: "bench-001", Verdict: centralsim.VerdictValid, Attrs: map[string]json.RawMessage{
		"n":  json.RawMessage(`{"type":"Number","value":3}`),
		"t0": json.RawMessage(`{"type":"Number","value":` + jsonInt(t0) + `}`),
	}})
	recordRaw(s, time.Now(), "devices/bench-000/telemetry", payload(2))
	recordRaw(s, time.Now(), "devices/bench-000/telemetry", []byte(`not json`))
	got := s.tally(2, []string{"bench-000", "bench-001"}, []int{1, 1})
	if want := (seqCounts{Published: 2, Received: 2, Stray: 1}); got != want {
		t.Fatalf("tally = %+v, want %+v", got, want)
	}
	if st := s.stats(); st.P99 < 5*time.Millisecond || st.P50 > time.Second {
		t.Fatalf("latencies %v / %v: want the NGSI reading's ≥ 5 ms and the raw one's small", st.P50, st.P99)
	}
}

func jsonInt(v int64) string { b, _ := json.Marshal(v); return string(b) }

func TestPeerRowsArithmetic(t *testing.T) {
	ph := func(name string, rate, cpu float64, c seqCounts) peerPhase {
		return peerPhase{Name: name, Rate: rate, CPUPer1k: cpu, seqCounts: c}
	}
	rs := []peerResult{
		{peerSystem: peerSystem{Name: "raw m", Kind: "raw", Broker: "mosquitto"}, Phases: []peerPhase{ph("burst", 20000, 10, seqCounts{})}},
		{peerSystem: peerSystem{Name: "raw e", Kind: "raw", Broker: "embedded"}, Phases: []peerPhase{ph("burst", 10000, 20, seqCounts{})}},
		{peerSystem: peerSystem{Name: "tg", Kind: "telegraf", Broker: "mosquitto"}, PeakRSSMainMB: 40, PeakRSSBrokerMB: 9,
			Phases: []peerPhase{ph("burst", 5000, 70, seqCounts{}), ph("paced", 1500, 60, seqCounts{})}},
		{peerSystem: peerSystem{Name: "eg e", Kind: "edgegate", Broker: "embedded", Mode: "batch"},
			Phases: []peerPhase{ph("burst", 6000, 80, seqCounts{Lost: 1}), ph("paced", 1500, 90, seqCounts{OutOfOrder: 2}),
				{Name: "half", TargetRate: 3000, P50MS: 4, P99MS: 40, seqCounts: seqCounts{Duplicates: 3, Stray: 1}}}},
		{peerSystem: peerSystem{Name: "eg m", Kind: "edgegate", Broker: "mosquitto", Mode: "filter"}, Error: "boom"},
		// A second, slower round of "eg e": the row keeps the faster
		// round's figures and adds this round's counters.
		{peerSystem: peerSystem{Name: "eg e", Kind: "edgegate", Broker: "embedded", Mode: "batch"}, Round: 2,
			Phases: []peerPhase{ph("burst", 3000, 200, seqCounts{Lost: 4})}},
	}
	rs[3].Round = 1
	rs[3].Phases[0].AcksOutOfOrder, rs[3].Phases[0].SigVerified, rs[3].Phases[0].SigInvalid = 2, 100, 1
	rs[5].Phases[0].SigVerified = 50
	rows := peerRows(rs)
	if len(rows) != 5 {
		t.Fatalf("%d rows", len(rows))
	}
	eg := rows[3]
	if eg.VsTelegraf != 1.2 || eg.VsRaw != 0.6 || eg.CPUPacedVsTelegraf != 1.5 || eg.CPUBurst != 80 || eg.CPUPaced != 90 {
		t.Errorf("embedded row = %+v: want 1.2 × Telegraf, 0.6 × its raw broker, 1.5 × Telegraf's CPU at the paced rate", eg)
	}
	if eg.Round != 1 || eg.Rounds != 2 {
		t.Errorf("embedded row from round %d of %d, want 1 of 2", eg.Round, eg.Rounds)
	}
	if eg.Lost != 5 || eg.OutOfOrder != 2 || eg.Duplicates != 3 || eg.Stray != 1 || eg.HalfRate != 3000 || eg.P99Half != 40 {
		t.Errorf("embedded row counters = %+v", eg)
	}
	if eg.AcksOutOfOrder != 2 || eg.SigVerified != 150 || eg.SigInvalid != 1 {
		t.Errorf("embedded row acks / signatures = %d, %d / %d; want 2, 150 / 1 (both rounds)", eg.AcksOutOfOrder, eg.SigVerified, eg.SigInvalid)
	}
	if tg := rows[2]; tg.VsTelegraf != 1 || tg.VsRaw != 0.25 || tg.RSSBrokerMB != 9 {
		t.Errorf("telegraf row = %+v", tg)
	}
	if bad := rows[4]; bad.Error != "boom" || bad.VsTelegraf != 0 || bad.VsRaw != 0 {
		t.Errorf("failed row = %+v: want no ratios", bad)
	}
	if got := cpuPer1k(350, 5000); got != 70 {
		t.Errorf("cpuPer1k(350 ms, 5000) = %v, want 70", got)
	}
	if got := cpuPer1k(350, 0); got != 0 {
		t.Errorf("cpuPer1k over no readings = %v, want 0", got)
	}
	// Without a Telegraf row, no ratio to it (not a division by zero).
	// A faster later round replaces the row's figures.
	rs[5].Phases[0].Rate = 9000
	if rows := peerRows(rs); rows[3].Rate != 9000 || rows[3].CPUBurst != 200 || rows[3].Round != 2 || rows[3].VsTelegraf != 1.8 {
		t.Errorf("faster second round: %+v", rows[3])
	}
	if rows := peerRows(rs[3:4]); rows[0].VsTelegraf != 0 || rows[0].VsRaw != 0 {
		t.Errorf("alone: %+v", rows[0])
	}

	res := &peersResults{Machine: machine{CPU: "x & <y>", Cores: 2}, TelegrafVersion: telegrafVersion, PacedRate: 1500, Rows: rows}
	var out strings.Builder
	printPeers(&out, res)
	for _, want := range []string{"| eg e | 6000 | 1.20 | 0.60 | 80 | 90 | 1.50 |", "| 5 / 3 / 2 (+1 stray) | 2 | 150 / 1 |", "| 0 / 0 / 0 | 0 | — |", "| eg m | error: boom |"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, out.String())
		}
	}
	svg := peersSVG(res)
	d := xml.NewDecoder(strings.NewReader(svg))
	for {
		if _, err := d.Token(); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			t.Fatalf("the SVG is not well-formed XML: %v\n%s", err, svg)
		}
	}
	if !strings.Contains(svg, "x &amp; &lt;y&gt;") || !strings.Contains(svg, "1.20 × (6000 /s)") {
		t.Errorf("SVG lacks the escaped machine or the ratio label:\n%s", svg)
	}
}

// docs/bench/telegraf.conf is the configuration the run gives Telegraf,
// with placeholders for its ports and directory.
func TestTelegrafConfShipped(t *testing.T) {
	want := renderTelegrafConf(telegrafDocParams(telegrafFlush))
	got, err := os.ReadFile("../../docs/bench/telegraf.conf")
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != want {
		t.Fatalf("docs/bench/telegraf.conf differs from what the run uses; regenerate it:\n%s", want)
	}
	for _, s := range []string{"metric_batch_size = 1000", "use_batch_format = true", `data_format = "json"`, "qos = 1"} {
		if !strings.Contains(want, s) {
			t.Errorf("conf lacks %q", s)
		}
	}
}

// Telegraf's endpoint over real TLS, trusted through the CA file the run
// gives Telegraf: a batch is counted per reading and answered 204; a body
// that does not decode is answered 400 and counted bad (Telegraf keeps and
// retries a batch that failed).
func TestTelegrafSinkHTTPS(t *testing.T) {
	s := newSeqSink()
	s.reset(true)
	ts := startTelegrafSink(s)
	defer ts.srv.Close()
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(ts.caPEM()) {
		t.Fatal("the sink's CA PEM does not parse")
	}
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	body, err := os.ReadFile("testdata/telegraf-batch.json")
	if err != nil {
		t.Fatal(err)
	}
	post := func(b []byte) int {
		t.Helper()
		resp, err := c.Post(ts.srv.URL+"/telegraf", "application/json", bytes.NewReader(b))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if code := post(body); code != http.StatusNoContent {
		t.Fatalf("batch: status %d, want 204", code)
	}
	if code := post([]byte(`{"metrics":[`)); code != http.StatusBadRequest {
		t.Fatalf("truncated batch: status %d, want 400", code)
	}
	if got := s.tally(0, []string{"bench-000", "bench-001"}, []int{1, 1}); got != (seqCounts{Published: 2, Received: 2}) {
		t.Fatalf("tally = %+v", got)
	}
	if ts.requests.Load() != 1 || ts.bad.Load() != 1 {
		t.Fatalf("requests %d, bad %d; want 1 and 1", ts.requests.Load(), ts.bad.Load())
	}
}

// The gateway rows of the peers run trust the sim's CA for the token and
// the light sink's for the brokers; `make bench` gives one CA for both.
func TestDaemonConfigCAFiles(t *testing.T) {
	dir := t.TempDir()
	g := gwSpec{Dir: dir, Devices: makeDevices(1), BrokerURL: "https://127.0.0.1:1/orion", TokenURL: "https://127.0.0.1:2/token",
		ClientID: benchClientID, Secret: benchSecret, CAFile: "/sim-ca.pem", UplinkCAFile: "/sink-ca.pem", Mode: "batch"}
	p, err := writeDaemonConfig(g)
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	central, uplink, _ := strings.Cut(string(b), "uplink:")
	if !strings.Contains(central, "ca_file: /sim-ca.pem") || !strings.Contains(uplink, "ca_file: /sink-ca.pem") {
		t.Fatalf("config:\n%s", b)
	}
	g.UplinkCAFile = ""
	if p, err = writeDaemonConfig(g); err != nil {
		t.Fatal(err)
	}
	b, _ = os.ReadFile(p)
	if _, uplink, _ := strings.Cut(string(b), "uplink:"); !strings.Contains(uplink, "ca_file: /sim-ca.pem") {
		t.Fatalf("without an uplink CA the uplink trusts the sim's:\n%s", b)
	}
}
