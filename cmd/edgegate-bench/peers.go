package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"github.com/edgegate/edgegate/mqtt"
	"io"
	"math"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/edgegate/edgegate/internal/logx"
)

// `edgegate-bench peers` (make bench-peers, issue 20): the gateway beside
// Telegraf and beside the raw broker, on the same load generator
// (fleet.publish) and the same counting sink, in one run. Each system gets
// a fresh broker, sink and process; the table compares rates, CPU of all
// the system's processes per 1,000 readings, peak RSS, latency and what
// the sink saw of each device's sequence.

type peersConfig struct {
	Quick     bool
	Devices   int
	Readings  int           // per burst
	Paced     time.Duration // per paced run
	PacedRate float64       // the fixed paced rate (readings/s)
	Window    int           // unacknowledged publishes per device
	Only      []string      // substrings of system names to run
	Telegraf  string        // the binary `make telegraf` built
	Flush     time.Duration // Telegraf's flush_interval
	Rounds    int           // runs of every system (BENCH_PEERS_ROUNDS)
	// Phases (BENCH_PEERS_PHASES: burst,paced,half) are the phases run;
	// all when empty (half needs burst: it runs at half the burst's rate).
	Phases []string
	// ProfileDir (BENCH_PEERS_PROFILE) receives a CPU profile of the
	// daemon for each phase of each gateway row, and its `pprof -top`.
	ProfileDir string
}

// peerSystem is one row of the table.
type peerSystem struct {
	Name   string `json:"name"`
	Kind   string `json:"kind"`           // raw | telegraf | edgegate
	Broker string `json:"broker"`         // mosquitto | embedded
	Mode   string `json:"mode,omitempty"` // edgegate's uplink mode: batch | filter
}

var peerSystems = []peerSystem{
	{Name: "raw Mosquitto (ceiling)", Kind: "raw", Broker: "mosquitto"},
	{Name: "raw embedded mochi (ceiling)", Kind: "raw", Broker: "embedded"},
	{Name: "Telegraf " + telegrafVersion + " via Mosquitto", Kind: "telegraf", Broker: "mosquitto"},
	{Name: "edgegate embedded, batch", Kind: "edgegate", Broker: "embedded", Mode: "batch"},
	{Name: "edgegate via Mosquitto, batch", Kind: "edgegate", Broker: "mosquitto", Mode: "batch"},
	{Name: "edgegate via Mosquitto, filter", Kind: "edgegate", Broker: "mosquitto", Mode: "filter"},
}

// peerPhase is one load of one system: a burst, or a paced run.
type peerPhase struct {
	Name       string  `json:"name"`                  // burst | paced | half
	TargetRate float64 `json:"target_readings_per_s"` // 0: as fast as PUBACKs allow
	Rate       float64 `json:"readings_per_s"`        // distinct readings received / (last receipt - first publish)
	Seconds    float64 `json:"seconds"`
	// IngestRate is the published readings / the time until the last
	// PUBACK: what the system took in. Above Rate, readings waited in
	// the system (a queue, a broker's buffer) for their delivery.
	IngestRate  float64 `json:"ingest_readings_per_s"`
	CPUMainMS   float64 `json:"cpu_main_ms"`
	CPUBrokerMS float64 `json:"cpu_broker_ms"`   // Mosquitto, when it is a separate process of the system
	CPUPer1k    float64 `json:"cpu_ms_per_1000"` // (main + broker) per 1,000 readings received
	// MainCores is the main process's CPU / the phase's wall time: well
	// below 1 while the rate is low, it waited (fsync, the network, the
	// shared cores), it did not compute.
	MainCores float64 `json:"main_cores"`
	// BenchCPUPer1k is this process's CPU per 1,000 readings: the load
	// generator, the sink, and for the gateway rows the simulated central
	// service verifying every token and signature. It is in no row's CPU,
	// but it shares the cores.
	BenchCPUPer1k float64 `json:"bench_process_cpu_ms_per_1000"`
	P50MS         float64 `json:"p50_ms"` // publish (generator's t0) -> accepted at the sink
	P99MS         float64 `json:"p99_ms"`
	PublishFailed int     `json:"publish_failed"` // no PUBACK within 30 s
	// AcksOutOfOrder counts PUBACKs a device received before the PUBACK
	// of an earlier publish of its connection (MQTT 3.1.1 §4.6: target 0).
	AcksOutOfOrder int `json:"acks_out_of_order"`
	// SigVerified and SigInvalid are the light sink's sampled signature
	// checks (gateway rows; one reading in 100 per device).
	SigVerified int    `json:"signatures_verified,omitempty"`
	SigInvalid  int    `json:"invalid_signatures"`
	SigWhy      string `json:"invalid_signature,omitempty"` // the first one's reason
	// LoadAvg is the machine's 1-minute load average at the phase's end
	// (/proc/loadavg): above the 2 cores, other work shared the machine.
	LoadAvg float64 `json:"load_avg_1m"`
	// Syncs is how many group commits the gateway synced in the phase
	// (its metrics; 0 for the other systems).
	Syncs int64 `json:"syncs,omitempty"`
	// Requests and RequestSeconds are the gateway uplink's requests in the
	// phase and the time they took in all (its metrics).
	Requests       int64   `json:"uplink_requests,omitempty"`
	RequestSeconds float64 `json:"uplink_request_seconds,omitempty"`
	// CommitSeconds is the time the gateway's commits (write and sync)
	// took in all in the phase, SlowCommits how many took over 100 ms.
	CommitSeconds float64 `json:"commit_seconds,omitempty"`
	SlowCommits   int64   `json:"slow_commits,omitempty"`
	seqCounts
}

type peerResult struct {
	peerSystem
	Round           int         `json:"round"` // 1, 2, ... (BENCH_PEERS_ROUNDS)
	Phases          []peerPhase `json:"phases"`
	PeakRSSMainMB   float64     `json:"peak_rss_main_mb"`
	PeakRSSBrokerMB float64     `json:"peak_rss_broker_mb,omitempty"`
	Requests        int64       `json:"http_requests,omitempty"` // requests to the HTTPS sink (Telegraf's, the gateway's)
	Error           string      `json:"error,omitempty"`
}

func (r peerResult) phase(name string) (peerPhase, bool) {
	for _, p := range r.Phases {
		if p.Name == name {
			return p, true
		}
	}
	return peerPhase{}, false
}

type peersResults struct {
	Machine              machine      `json:"machine"`
	Started              time.Time    `json:"started"`
	Elapsed              string       `json:"elapsed"`
	Quick                bool         `json:"quick"`
	Rounds               int          `json:"rounds"`
	Devices              int          `json:"devices"`
	Readings             int          `json:"burst_readings"`
	PacedSeconds         float64      `json:"paced_seconds"`
	PacedRate            float64      `json:"paced_readings_per_s"`
	TelegrafVersion      string       `json:"telegraf_version"`
	TelegrafBuildSeconds float64      `json:"telegraf_build_seconds,omitempty"`
	TelegrafConf         string       `json:"telegraf_conf,omitempty"`
	Systems              []peerResult `json:"systems"`
	Rows                 []peerRow    `json:"rows"`
}

func runPeers(args []string) error {
	fs := flag.NewFlagSet("peers", flag.ContinueOnError)
	out := fs.String("out", "docs/bench/peers-results.json", "results file")
	svg := fs.String("svg", "docs/bench/peers.svg", "chart")
	tg := fs.String("telegraf", filepath.Join(".cache", "telegraf-v"+telegrafVersion, "telegraf"), "the Telegraf binary `make telegraf` built")
	printConf := fs.Bool("print-telegraf-conf", false, "print Telegraf's configuration (docs/bench/telegraf.conf) and exit")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *printConf {
		fmt.Print(renderTelegrafConf(telegrafDocParams(telegrafFlush)))
		return nil
	}
	cfg := peersConfig{Quick: os.Getenv("BENCH_PEERS_QUICK") == "1", Devices: 50, PacedRate: 1500, Window: 32,
		Telegraf: *tg, Flush: telegrafFlush}
	cfg.Readings, cfg.Paced = 50000, 10*time.Second
	if cfg.Quick {
		cfg.Readings, cfg.Paced = 5000, 3*time.Second
	}
	cfg.Readings = envInt("BENCH_PEERS_READINGS", cfg.Readings)
	cfg.Rounds = envInt("BENCH_PEERS_ROUNDS", 1)
	cfg.Only = splitComma(os.Getenv("BENCH_PEERS_ONLY"))
	cfg.Phases = splitComma(os.Getenv("BENCH_PEERS_PHASES"))
	cfg.ProfileDir = os.Getenv("BENCH_PEERS_PROFILE")
	if cfg.ProfileDir != "" {
		if err := os.MkdirAll(cfg.ProfileDir, 0o755); err != nil {
			return err
		}
	}
	var systems []peerSystem
	for _, sys := range peerSystems {
		if selected(sys.Name, cfg.Only) {
			systems = append(systems, sys)
		}
	}
	if len(systems) == 0 {
		return fmt.Errorf("BENCH_PEERS_ONLY=%q selects none of the systems", os.Getenv("BENCH_PEERS_ONLY"))
	}

	res := &peersResults{
		Machine: machine{CPU: cpuModel(), Cores: runtime.NumCPU(), GoVersion: runtime.Version(), OS: runtime.GOOS + "/" + runtime.GOARCH},
		Started: time.Now().UTC(), Quick: cfg.Quick, Devices: cfg.Devices, Readings: cfg.Readings,
		PacedSeconds: cfg.Paced.Seconds(), PacedRate: cfg.PacedRate, TelegrafVersion: telegrafVersion,
	}
	step := func(msg string) {
		fmt.Fprintf(os.Stderr, "== %s (%s)\n", msg, time.Since(res.Started).Round(time.Second))
	}
	work, err := os.MkdirTemp("", "edgegate-bench-peers-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	self, err := os.Executable()
	if err != nil {
		return err
	}
	// BENCH_PEERS_EDGEGATE runs a prebuilt daemon instead of this tree's:
	// before and after a change, in the same harness.
	bin := os.Getenv("BENCH_PEERS_EDGEGATE")
	for _, sys := range systems {
		switch {
		case sys.Kind == "edgegate" && bin == "":
			step("build the daemon")
			var tags []string
			if cfg.ProfileDir != "" {
				// cmd/edgegate/benchprofile.go: profiles on SIGUSR1/2.
				tags = append(tags, "benchprofile")
			}
			if bin, err = buildDaemon(work, tags...); err != nil {
				return err
			}
		case sys.Kind == "telegraf" && res.TelegrafConf == "":
			if err := checkTelegraf(cfg.Telegraf); err != nil {
				return err
			}
			// `make telegraf` leaves the build's duration beside the binary.
			if b, err := os.ReadFile(filepath.Join(filepath.Dir(cfg.Telegraf), "build-seconds")); err == nil {
				fmt.Sscan(string(b), &res.TelegrafBuildSeconds)
			}
			res.TelegrafConf = renderTelegrafConf(telegrafDocParams(cfg.Flush))
		}
	}
	if path := os.Getenv("BENCH_SELF_PROFILE"); path != "" {
		// A CPU profile of this process: the devices, the sinks and, for
		// the gateway rows, the simulated central service.
		stop, err := startCPUProfile(path)
		if err != nil {
			return err
		}
		defer stop()
	}
	ctx := context.Background()
	var order []peerSystem
	for round := 1; round <= cfg.Rounds; round++ {
		// Even rounds run the systems in the reverse order: a change of
		// the machine's load over the run does not fall on the same rows.
		for i := range systems {
			if round%2 == 0 {
				i = len(systems) - 1 - i
			}
			order = append(order, systems[i])
		}
	}
	res.Rounds = cfg.Rounds
	for i, sys := range order {
		round := 1 + i/len(systems)
		step(fmt.Sprintf("%s (round %d of %d)", sys.Name, round, cfg.Rounds))
		r, err := runPeer(ctx, cfg, sys, bin, self, work)
		r.Round = round
		if err != nil {
			fmt.Fprintf(os.Stderr, "  %s: %v\n", sys.Name, err)
			r.Error = err.Error()
		}
		for _, p := range r.Phases {
			fmt.Fprintf(os.Stderr, "  %-5s %6.0f/s target, %6.0f/s taken in, %6.0f/s received, CPU %5.0f ms/1000 (main %.0f + broker %.0f ms; main %.2f cores; bench process %.0f ms/1000), p50/p99 %.1f/%.1f ms, published %d received %d lost %d dup %d out-of-order %d stray %d, acks out of order %d, signatures sampled %d valid %d invalid, load %.1f\n",
				p.Name, p.TargetRate, p.IngestRate, p.Rate, p.CPUPer1k, p.CPUMainMS, p.CPUBrokerMS, p.MainCores, p.BenchCPUPer1k, p.P50MS, p.P99MS, p.Published, p.Received, p.Lost, p.Duplicates, p.OutOfOrder, p.Stray,
				p.AcksOutOfOrder, p.SigVerified, p.SigInvalid, p.LoadAvg)
			if p.Syncs > 0 {
				fmt.Fprintf(os.Stderr, "        %d syncs, %.1f readings per sync, %.1f ms each on average, %d over 100 ms\n",
					p.Syncs, float64(p.Published)/float64(p.Syncs), 1000*p.CommitSeconds/float64(p.Syncs), p.SlowCommits)
			}
			if p.Requests > 0 {
				fmt.Fprintf(os.Stderr, "        %d uplink requests, %.1f readings per request, %.1f ms each on average\n",
					p.Requests, float64(p.Published)/float64(p.Requests), 1000*p.RequestSeconds/float64(p.Requests))
			}
			if p.SigWhy != "" {
				fmt.Fprintf(os.Stderr, "        first invalid signature: %s\n", logx.Clip(p.SigWhy, 200))
			}
		}
		res.Systems = append(res.Systems, r)
	}
	res.Rows = peerRows(res.Systems)
	res.Elapsed = time.Since(res.Started).Round(time.Second).String()
	printPeers(os.Stdout, res)
	b, _ := json.MarshalIndent(res, "", "  ")
	if err := os.WriteFile(*out, append(b, '\n'), 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(*svg, []byte(peersSVG(res)), 0o644); err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "wrote %s and %s (%s)\n", *out, *svg, res.Elapsed)
	return nil
}

// selected reports whether name holds one of only's substrings (all, when
// only is empty).
func selected(name string, only []string) bool {
	if len(only) == 0 {
		return true
	}
	for _, o := range only {
		if strings.Contains(strings.ToLower(name), strings.ToLower(strings.TrimSpace(o))) {
			return true
		}
	}
	return false
}

// runPeer starts one system (its broker, its process, its sink), warms it
// up, and measures a burst, a paced run at cfg.PacedRate and a paced run
// at half the burst's rate.
func runPeer(ctx context.Context, cfg peersConfig, sys peerSystem, bin, self, work string) (r peerResult, err error) {
	r.peerSystem = sys
	dir, err := os.MkdirTemp(work, "peer-")
	if err != nil {
		return r, err
	}
	// Everything started is stopped in reverse order: the devices first,
	// the broker last.
	var stops []func() error
	defer func() {
		for i := len(stops) - 1; i >= 0; i-- {
			if serr := stops[i](); serr != nil && err == nil {
				err = serr
			}
		}
	}()
	devs := makeDevices(cfg.Devices)
	s := newSeqSink()
	var mainPID, brokerPID int
	var gw *proc // the gateway's daemon, for its metrics
	var mqttURL string
	if sys.Broker == "mosquitto" {
		mq, err := startMosquitto(dir)
		if err != nil {
			return r, err
		}
		stops = append(stops, func() error { mq.stop(); return nil })
		brokerPID, mqttURL = mq.pid(), mq.URL
	}
	var ts *telegrafSink
	var ls *lightSink
	var prof phaseProfiler = noProfiler{}
	switch sys.Kind {
	case "raw":
		if sys.Broker == "embedded" {
			p, err := startProc(exec.Command(self, "mochi"), "MOCHI READY ", func(line string) string {
				_, addr, _ := strings.Cut(line, "MOCHI READY ")
				return strings.TrimSpace(addr)
			})
			if err != nil {
				return r, fmt.Errorf("bare mochi: %w", err)
			}
			stops = append(stops, p.stop)
			mainPID, mqttURL = p.pid(), p.MQTT
		} else {
			mainPID, brokerPID = brokerPID, 0 // the broker is the system
		}
		// paho calls the handler in delivery order on its reading
		// goroutine: it only stamps and queues each message, so that a
		// slow handler does not back up into the broker (mochi drops QoS 1
		// messages for a client whose pending writes overflow).
		// msgs is never closed (paho may still be in the handler while it
		// disconnects): done ends both sides.
		msgs, done, counted := make(chan rawMsg, 1<<16), make(chan struct{}), make(chan struct{})
		go func() {
			defer close(counted)
			for {
				select {
				case m := <-msgs:
					recordRaw(s, m.at, m.topic, m.payload)
				case <-done:
					return
				}
			}
		}()
		stops = append(stops, func() error { close(done); <-counted; return nil })
		sub, _, _, err := subscribe(mqttURL, "devices/+/telemetry", func(m paho.Message) {
			select {
			case msgs <- rawMsg{at: time.Now(), topic: m.Topic(), payload: m.Payload()}:
			case <-done:
			}
		})
		if err != nil {
			return r, err
		}
		stops = append(stops, func() error { sub.Disconnect(100); return nil })
	case "telegraf":
		ts = startTelegrafSink(s)
		stops = append(stops, func() error { ts.srv.Close(); return nil })
		var pprofAddr string
		if cfg.ProfileDir != "" {
			port, err := freePort()
			if err != nil {
				return r, err
			}
			pprofAddr = fmt.Sprintf("127.0.0.1:%d", port)
		}
		p, _, err := startTelegraf(cfg.Telegraf, dir, mqttURL, ts, cfg.Flush, pprofAddr)
		if err != nil {
			return r, fmt.Errorf("telegraf: %w", err)
		}
		stops = append(stops, p.stop)
		mainPID = p.pid()
		if pprofAddr != "" {
			prof = &httpProfiler{addr: pprofAddr, to: cfg.ProfileDir, slug: "telegraf", burst: telegrafBurstProfile, paced: cfg.Paced}
		}
	case "edgegate":
		// centralsim issues the gateway's token; the readings go to the
		// light sink (lightsink.go), which costs per reading what
		// Telegraf's sink does.
		sim, err := newSim(devs, s)
		if err != nil {
			return r, err
		}
		stops = append(stops, func() error { sim.Close(); return nil })
		ca := filepath.Join(dir, "ca.pem")
		if err := os.WriteFile(ca, sim.CACertPEM(), 0o600); err != nil {
			return r, err
		}
		simClient := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: sim.CAPool()}}}
		ls, err = startLightSink(ctx, s, devs, sim.JWKSURL(), simClient)
		if err != nil {
			return r, err
		}
		stops = append(stops, func() error { ls.close(); return nil })
		upCA := filepath.Join(dir, "sink-ca.pem")
		if err := os.WriteFile(upCA, ls.caPEM(), 0o600); err != nil {
			return r, err
		}
		broker := ls.filterURL()
		if sys.Mode == "batch" {
			broker = ls.batchURL()
		}
		g := gwSpec{Dir: dir, Devices: devs, BrokerURL: broker, TokenURL: sim.TokenURL(), ClientID: benchClientID,
			Secret: benchSecret, CAFile: ca, UplinkCAFile: upCA, Mode: sys.Mode, MaxBatch: 256, Concurrency: benchConcurrency(), ExternalURL: mqttURL}
		if cfg.ProfileDir != "" {
			g.ProfileDir = filepath.Join(dir, "profiles")
			if err := os.MkdirAll(g.ProfileDir, 0o755); err != nil {
				return r, err
			}
		}
		p, err := startDaemon(bin, g)
		if err != nil {
			return r, err
		}
		stops = append(stops, p.stop)
		mainPID, gw = p.pid(), p
		if g.ProfileDir != "" {
			prof = &signalProfiler{pid: mainPID, from: g.ProfileDir, to: cfg.ProfileDir, slug: profileSlug(sys)}
		}
		if mqttURL == "" {
			mqttURL = p.MQTT
		}
	default:
		return r, fmt.Errorf("unknown kind %q", sys.Kind)
	}
	f, err := connectFleet(mqttURL, devs, sys.Kind == "edgegate" && sys.Broker == "embedded")
	if err != nil {
		return r, err
	}
	stops = append(stops, func() error { f.close(); return nil })
	ids := make([]string, len(devs))
	for i, d := range devs {
		ids[i] = d.ID
	}

	// Warm up: connections, tokens, TLS, the subscriptions (readings
	// published before a subscription exists are dropped by the broker).
	warm := time.Now().Add(60 * time.Second)
	for s.count() == 0 && time.Now().Before(warm) {
		f.publish(ctx, len(devs), 0, 1, 10*time.Second)
		f.base += int64(len(devs))
		s.waitFor(1, time.Now().Add(2*time.Second))
	}
	if !s.waitFor(len(devs), warm) {
		return r, errors.New("warm-up readings did not reach the sink within 60s")
	}
	s.waitSettled(math.MaxInt, 500*time.Millisecond, 10*time.Second) // the last warm-up stragglers

	for _, pid := range []int{mainPID, brokerPID} {
		if pid > 0 {
			_ = resetHWM(pid)
		}
	}
	phase := func(name string, total int, rate float64, maxDur time.Duration) peerPhase {
		// What the previous load left (compactions, GC, deletes) is not
		// this phase's CPU.
		waitIdle(10*time.Second, mainPID, brokerPID)
		s.reset(true)
		if ls != nil {
			ls.resetSample()
		}
		prof.start(name)
		counters0 := gw.counters()
		m0, b0, self0 := cpuOf(mainPID), cpuOf(brokerPID), cpuOf(os.Getpid())
		start := time.Now()
		pr := f.publish(ctx, total, rate, cfg.Window, maxDur)
		// Until every published reading arrived, or nothing arrived for
		// 15 s (what is missing then is counted lost).
		s.waitSettled(pr.Sent, 15*time.Second, 5*time.Minute)
		m1, b1, self1 := cpuOf(mainPID), cpuOf(brokerPID), cpuOf(os.Getpid())
		c := gw.counters().sub(counters0)
		prof.stop(name)
		st := s.stats()
		p := peerPhase{Name: name, TargetRate: rate, LoadAvg: loadAvg(), CPUMainMS: ms(m1 - m0), CPUBrokerMS: ms(b1 - b0),
			P50MS: ms(st.P50), P99MS: ms(st.P99), PublishFailed: pr.Failed, AcksOutOfOrder: pr.AcksOutOfOrder,
			SigVerified: st.Verified, SigInvalid: st.Invalid, SigWhy: st.InvalidWhy, seqCounts: s.tally(f.base, ids, pr.PerDevice)}
		f.base += int64(total)
		p.Syncs, p.CommitSeconds, p.SlowCommits = c.syncs, c.commitSeconds, c.slowCommits
		p.Requests, p.RequestSeconds = c.requests, c.requestSeconds
		if pr.Acked > 0 && pr.Elapsed > 0 {
			p.IngestRate = float64(pr.Acked) / pr.Elapsed.Seconds()
		}
		if wall := st.Last.Sub(start); p.Received > 0 && wall > 0 {
			p.Rate, p.Seconds = float64(p.Received)/wall.Seconds(), wall.Seconds()
			p.MainCores = (m1 - m0).Seconds() / wall.Seconds()
		}
		p.CPUPer1k = cpuPer1k(p.CPUMainMS+p.CPUBrokerMS, p.Received)
		p.BenchCPUPer1k = cpuPer1k(ms(self1-self0), p.Received)
		return p
	}
	var burst peerPhase
	if selected("burst", cfg.Phases) {
		burst = phase("burst", cfg.Readings, 0, 5*time.Minute)
		r.Phases = append(r.Phases, burst)
	}
	if selected("paced", cfg.Phases) {
		r.Phases = append(r.Phases, phase("paced", int(cfg.PacedRate*cfg.Paced.Seconds()), cfg.PacedRate, cfg.Paced+time.Minute))
	}
	if half := burst.Rate / 2; half > 0 && selected("half", cfg.Phases) {
		r.Phases = append(r.Phases, phase("half", int(half*cfg.Paced.Seconds()), half, cfg.Paced+time.Minute))
	}
	hwm, _, _ := procMem(mainPID)
	r.PeakRSSMainMB = float64(hwm) / (1 << 20)
	if brokerPID > 0 {
		hwm, _, _ := procMem(brokerPID)
		r.PeakRSSBrokerMB = float64(hwm) / (1 << 20)
	}
	if ts != nil {
		r.Requests = ts.requests.Load()
		if n := ts.bad.Load(); n > 0 {
			return r, fmt.Errorf("%d of Telegraf's requests did not decode", n)
		}
	}
	if ls != nil {
		r.Requests = ls.requests.Load()
		if n, u := ls.bad.Load(), ls.unauthorized.Load(); n > 0 || u > 0 {
			return r, fmt.Errorf("light sink: %d requests did not decode, %d carried no token the realm issued", n, u)
		}
	}
	return r, nil
}

type rawMsg struct {
	at      time.Time
	topic   string
	payload []byte
}

// waitIdle waits, at most limit, until the processes used less than 5 %
// of a core over 500 ms.
func waitIdle(limit time.Duration, pids ...int) {
	end := time.Now().Add(limit)
	sum := func() (d time.Duration) {
		for _, p := range pids {
			d += cpuOf(p)
		}
		return d
	}
	for time.Now().Before(end) {
		c0 := sum()
		time.Sleep(500 * time.Millisecond)
		if sum()-c0 < 25*time.Millisecond {
			return
		}
	}
}

// loadAvg is the 1-minute load average.
func loadAvg() float64 {
	var l float64
	if b, err := os.ReadFile("/proc/loadavg"); err == nil {
		fmt.Sscan(string(b), &l)
	}
	return l
}

// cpuOf is user+system CPU of pid; 0 for no process.
func cpuOf(pid int) time.Duration {
	if pid <= 0 {
		return 0
	}
	d, _ := procCPU(pid)
	return d
}

func cpuPer1k(cpuMS float64, readings int) float64 {
	if readings <= 0 {
		return 0
	}
	return cpuMS * 1000 / float64(readings)
}

// recordRaw counts one message the raw subscriber received: the device is
// the topic's middle level (devices/<id>/telemetry), "n" and "t0" the
// payload's (fleet.go's payload).
func recordRaw(s *sink, now time.Time, topic string, payload []byte) {
	var p struct {
		N  *int64 `json:"n"`
		T0 int64  `json:"t0"`
	}
	var dev string
	if parts := strings.Split(topic, "/"); len(parts) == 3 {
		dev = parts[1]
	}
	var n int64
	if json.Unmarshal(payload, &p) == nil && p.N != nil {
		n = *p.N
	}
	s.add(now, dev, n, p.N != nil, p.T0)
}

// runMochi is the `mochi` subcommand: the bare broker of the embedded
// limit in its own process, so that its CPU and RSS are its own, until
// SIGTERM.
func runMochi([]string) error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	// As deep a queue to the one subscriber as Mosquitto's
	// max_queued_messages (brokers.go), within mochi's 65,535 packet ids:
	// the ceiling is the broker's delivery, not its drop policy (with
	// mochi's defaults a 50k burst lost ~40 % to the subscriber on the
	// shared cores).
	srv, url, err := startMochi(100000)
	if err != nil {
		return err
	}
	fmt.Println("MOCHI READY", url)
	<-ctx.Done()
	return mqtt.CloseServer(srv, "bench")
}

// peerRow is one line of the table: a system's figures, with its rate as
// ratios to Telegraf's and to its broker's raw delivery.
type peerRow struct {
	Name               string  `json:"name"`
	Rate               float64 `json:"burst_readings_per_s"`
	VsTelegraf         float64 `json:"rate_vs_telegraf,omitempty"` // 0: no Telegraf row
	VsRaw              float64 `json:"rate_vs_raw,omitempty"`      // 0: no raw row for its broker
	CPUBurst           float64 `json:"cpu_ms_per_1000_burst"`
	CPUPaced           float64 `json:"cpu_ms_per_1000_paced"`
	CPUPacedVsTelegraf float64 `json:"cpu_paced_vs_telegraf,omitempty"`
	RSSMainMB          float64 `json:"peak_rss_main_mb"`
	RSSBrokerMB        float64 `json:"peak_rss_broker_mb,omitempty"`
	P50Paced           float64 `json:"p50_ms_paced"`
	P99Paced           float64 `json:"p99_ms_paced"`
	HalfRate           float64 `json:"half_readings_per_s"`
	P50Half            float64 `json:"p50_ms_half"`
	P99Half            float64 `json:"p99_ms_half"`
	Lost               int     `json:"lost"`
	Duplicates         int     `json:"duplicates"`
	OutOfOrder         int     `json:"out_of_order"`
	Stray              int     `json:"stray"`
	AcksOutOfOrder     int     `json:"acks_out_of_order"`             // PUBACKs out of publish order, at the publishers
	SigVerified        int     `json:"signatures_verified,omitempty"` // the light sink's sample (gateway rows)
	SigInvalid         int     `json:"invalid_signatures"`
	Round              int     `json:"round"`  // the round the figures are from
	Rounds             int     `json:"rounds"` // rounds the counters add up
	Error              string  `json:"error,omitempty"`
}

// rowSums are a row's counters, added over phases and rounds.
type rowSums struct {
	seqCounts
	acks, sigOK, sigBad int
}

// peerRows computes the table: the counters are summed over the phases;
// the ratio to raw is to the raw row of the same broker.
func peerRows(all []peerResult) []peerRow {
	// With several rounds, a system's row is its round with the highest
	// burst rate (the one least disturbed by other work on the machine);
	// the counters add up every round: any loss counts.
	var rs []peerResult
	at := map[string]int{}
	var sums []rowSums
	rounds := map[string]int{}
	for _, r := range all {
		var c rowSums
		for _, ph := range r.Phases {
			c.Lost += ph.Lost
			c.Duplicates += ph.Duplicates
			c.OutOfOrder += ph.OutOfOrder
			c.Stray += ph.Stray
			c.acks += ph.AcksOutOfOrder
			c.sigOK += ph.SigVerified
			c.sigBad += ph.SigInvalid
		}
		rounds[r.Name]++
		i, ok := at[r.Name]
		if !ok {
			at[r.Name] = len(rs)
			rs, sums = append(rs, r), append(sums, c)
			continue
		}
		sums[i].Lost += c.Lost
		sums[i].Duplicates += c.Duplicates
		sums[i].OutOfOrder += c.OutOfOrder
		sums[i].Stray += c.Stray
		sums[i].acks += c.acks
		sums[i].sigOK += c.sigOK
		sums[i].sigBad += c.sigBad
		b, _ := r.phase("burst")
		best, _ := rs[i].phase("burst")
		if r.Error == "" && (rs[i].Error != "" || b.Rate > best.Rate) {
			rs[i] = r
		}
	}
	var tgBurst, tgPaced peerPhase
	raw := map[string]float64{}
	for _, r := range rs {
		b, _ := r.phase("burst")
		switch r.Kind {
		case "telegraf":
			tgBurst = b
			tgPaced, _ = r.phase("paced")
		case "raw":
			raw[r.Broker] = b.Rate
		}
	}
	ratio := func(a, b float64) float64 {
		if a <= 0 || b <= 0 {
			return 0
		}
		return a / b
	}
	var rows []peerRow
	for i, r := range rs {
		b, _ := r.phase("burst")
		p, _ := r.phase("paced")
		h, _ := r.phase("half")
		row := peerRow{Name: r.Name, Rate: b.Rate, CPUBurst: b.CPUPer1k, CPUPaced: p.CPUPer1k,
			RSSMainMB: r.PeakRSSMainMB, RSSBrokerMB: r.PeakRSSBrokerMB,
			P50Paced: p.P50MS, P99Paced: p.P99MS, HalfRate: h.TargetRate, P50Half: h.P50MS, P99Half: h.P99MS, Error: r.Error}
		row.VsTelegraf = ratio(b.Rate, tgBurst.Rate)
		row.VsRaw = ratio(b.Rate, raw[r.Broker])
		row.CPUPacedVsTelegraf = ratio(p.CPUPer1k, tgPaced.CPUPer1k)
		row.Lost, row.Duplicates, row.OutOfOrder, row.Stray = sums[i].Lost, sums[i].Duplicates, sums[i].OutOfOrder, sums[i].Stray
		row.AcksOutOfOrder, row.SigVerified, row.SigInvalid = sums[i].acks, sums[i].sigOK, sums[i].sigBad
		row.Round, row.Rounds = r.Round, rounds[r.Name]
		rows = append(rows, row)
	}
	return rows
}

func orDash(v float64, format string) string {
	if v <= 0 {
		return "—"
	}
	return fmt.Sprintf(format, v)
}

func printPeers(w io.Writer, res *peersResults) {
	rounds := ""
	if res.Rounds > 1 {
		rounds = fmt.Sprintf("; each row: its round with the best burst of %d (counters: all rounds)", res.Rounds)
	}
	fmt.Fprintf(w, "\nedgegate-bench peers — %s, %d cores, %s, %d QoS 1 devices, bursts of %d readings, paced %.0f/s and half the burst rate for %.0f s each%s%s\n\n",
		res.Machine.CPU, res.Machine.Cores, res.Machine.GoVersion, res.Devices, res.Readings, res.PacedRate, res.PacedSeconds,
		map[bool]string{true: " (BENCH_PEERS_QUICK)"}[res.Quick], rounds)
	tw := tabwriter.NewWriter(w, 0, 0, 1, ' ', 0)
	fmt.Fprintf(tw, "| system | burst /s | × Telegraf | × raw | CPU ms / 1k burst | CPU ms / 1k @ %.0f/s | × Telegraf @ %.0f/s | peak RSS MB (broker) | p50 / p99 ms @ %.0f/s | p50 / p99 ms @ half | lost / dup / out-of-order | acks out of order | signatures sampled: valid / invalid |\n",
		res.PacedRate, res.PacedRate, res.PacedRate)
	fmt.Fprintln(tw, "|---|---|---|---|---|---|---|---|---|---|---|---|---|")
	for _, r := range res.Rows {
		if r.Error != "" && r.Rate == 0 {
			fmt.Fprintf(tw, "| %s | error: %s |\n", r.Name, logx.Clip(r.Error, 100))
			continue
		}
		rss := fmt.Sprintf("%.1f", r.RSSMainMB)
		if r.RSSBrokerMB > 0 {
			rss += fmt.Sprintf(" (%.1f)", r.RSSBrokerMB)
		}
		counts := fmt.Sprintf("%d / %d / %d", r.Lost, r.Duplicates, r.OutOfOrder)
		if r.Stray > 0 {
			counts += fmt.Sprintf(" (+%d stray)", r.Stray)
		}
		if r.Error != "" {
			counts += " (error: " + logx.Clip(r.Error, 60) + ")"
		}
		sigs := "—"
		if r.SigVerified+r.SigInvalid > 0 {
			sigs = fmt.Sprintf("%d / %d", r.SigVerified, r.SigInvalid)
		}
		fmt.Fprintf(tw, "| %s | %.0f | %s | %s | %.0f | %.0f | %s | %s | %.1f / %.1f | %.1f / %.1f | %s | %d | %s |\n",
			r.Name, r.Rate, orDash(r.VsTelegraf, "%.2f"), orDash(r.VsRaw, "%.2f"), r.CPUBurst, r.CPUPaced, orDash(r.CPUPacedVsTelegraf, "%.2f"),
			rss, r.P50Paced, r.P99Paced, r.P50Half, r.P99Half, counts, r.AcksOutOfOrder, sigs)
	}
	tw.Flush()
	lo, hi := loadRange(res.Systems)
	fmt.Fprintf(w, "\nCPU: user+system of every process of the system (Mosquitto included where it is one); raw rows: the broker alone. Machine load (1-minute average at the phases' ends): %.1f–%.1f on %d cores. Elapsed %s.\n",
		lo, hi, res.Machine.Cores, res.Elapsed)
}

// loadRange is the lowest and highest load average seen at the phases'
// ends: above the core count, other work shared the machine.
func loadRange(rs []peerResult) (lo, hi float64) {
	lo = math.Inf(1)
	for _, r := range rs {
		for _, p := range r.Phases {
			lo, hi = min(lo, p.LoadAvg), max(hi, p.LoadAvg)
		}
	}
	if math.IsInf(lo, 1) {
		lo = 0
	}
	return lo, hi
}

// phaseProfiler takes a CPU profile of a row's main process over each
// phase (BENCH_PEERS_PROFILE): start before the phase, stop after it. The
// profile lands in the profile directory as <slug>-<phase>.pprof, beside
// its `go tool pprof -top` text (publishProfile).
type phaseProfiler interface {
	start(phase string)
	stop(phase string)
}

// noProfiler is the profiler of a run without BENCH_PEERS_PROFILE, and of
// the raw rows.
type noProfiler struct{}

func (noProfiler) start(string) {}
func (noProfiler) stop(string)  {}

// signalProfiler profiles the daemon (built with -tags benchprofile:
// cmd/edgegate/benchprofile.go): SIGUSR1 before the phase, SIGUSR2 after
// it; the daemon writes from/<n>.pprof (and <n>.trace with
// BENCH_PEERS_TRACE).
type signalProfiler struct {
	pid      int
	from, to string
	slug     string
	n        int
}

func profileSlug(sys peerSystem) string {
	return sys.Broker + "-" + sys.Mode
}

func (p *signalProfiler) start(string) {
	p.n++
	if err := syscall.Kill(p.pid, syscall.SIGUSR1); err != nil {
		fmt.Fprintln(os.Stderr, "  profile:", err)
	}
}

func (p *signalProfiler) stop(phase string) {
	if err := syscall.Kill(p.pid, syscall.SIGUSR2); err != nil {
		fmt.Fprintln(os.Stderr, "  profile:", err)
		return
	}
	src := filepath.Join(p.from, fmt.Sprintf("%d.pprof", p.n))
	end := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(src); err == nil {
			break
		}
		if time.Now().After(end) {
			fmt.Fprintf(os.Stderr, "  profile: %s not written within 10s\n", src)
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	dst := filepath.Join(p.to, p.slug+"-"+phase+".pprof")
	// The trace (BENCH_PEERS_TRACE) is published before the profile.
	if b, err := os.ReadFile(filepath.Join(p.from, fmt.Sprintf("%d.trace", p.n))); err == nil {
		tr := strings.TrimSuffix(dst, ".pprof") + ".trace"
		if err := os.WriteFile(tr, b, 0o644); err != nil {
			fmt.Fprintln(os.Stderr, "  trace:", err)
		} else {
			fmt.Fprintf(os.Stderr, "  trace: %s\n", tr)
		}
	}
	// The allocations over the phase (benchprofile.go's writeAllocs):
	// `go tool pprof -sample_index=alloc_space -base <x>.allocs0 <x>.allocs`.
	for _, ext := range []string{".allocs0", ".allocs"} {
		if b, err := os.ReadFile(filepath.Join(p.from, fmt.Sprintf("%d%s", p.n, ext))); err == nil {
			_ = os.WriteFile(strings.TrimSuffix(dst, ".pprof")+ext, b, 0o644)
		}
	}
	b, err := os.ReadFile(src)
	if err != nil {
		fmt.Fprintln(os.Stderr, "  profile:", err)
		return
	}
	publishProfile(dst, b)
}

// telegrafBurstProfile is how much of a burst Telegraf is profiled for:
// its endpoint takes a length up front, and a 50k burst lasts ~3 s here,
// so the profile covers its first, steady, 2 s.
const telegrafBurstProfile = 2 * time.Second

// httpProfiler profiles Telegraf through its own pprof endpoint
// (--pprof-addr: Go's net/http/pprof), which profiles for a length given
// up front: a burst for its first part (burst), a paced or half phase for
// its whole length (paced).
type httpProfiler struct {
	addr         string
	to, slug     string
	burst, paced time.Duration
	got          chan []byte
}

func (p *httpProfiler) start(phase string) {
	d := p.paced
	if phase == "burst" {
		d = p.burst
	}
	p.got = make(chan []byte, 1)
	go func(got chan<- []byte) {
		url := fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", p.addr, int(d.Seconds()))
		c := &http.Client{Timeout: d + 30*time.Second}
		resp, err := c.Get(url)
		if err != nil {
			fmt.Fprintln(os.Stderr, "  profile:", err)
			got <- nil
			return
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err != nil || resp.StatusCode != http.StatusOK {
			fmt.Fprintln(os.Stderr, "  profile: telegraf answered", resp.Status, err)
			b = nil
		}
		got <- b
	}(p.got)
}

func (p *httpProfiler) stop(phase string) {
	if b := <-p.got; b != nil {
		publishProfile(filepath.Join(p.to, p.slug+"-"+phase+".pprof"), b)
	}
}

// publishProfile writes a CPU profile to dst, and its `go tool pprof -top`
// (flat, then cumulative) beside it as .top.txt.
func publishProfile(dst string, b []byte) {
	if err := os.WriteFile(dst, b, 0o644); err != nil {
		fmt.Fprintln(os.Stderr, "  profile:", err)
		return
	}
	top, err := exec.Command("go", "tool", "pprof", "-top", "-nodecount=35", dst).Output()
	if err != nil {
		fmt.Fprintln(os.Stderr, "  profile: pprof -top:", err)
		return
	}
	cum, _ := exec.Command("go", "tool", "pprof", "-top", "-cum", "-nodecount=60", dst).Output()
	var split bytes.Buffer
	if shares, total, err := splitProfile(dst); err == nil {
		split.WriteString("--- by part (edgegate-bench profsplit) ---\n")
		formatSplit(&split, shares, total, 0)
		split.WriteString("\n")
	}
	text := append(split.Bytes(), top...)
	text = append(append(text, "\n--- cumulative ---\n"...), cum...)
	_ = os.WriteFile(strings.TrimSuffix(dst, ".pprof")+".top.txt", text, 0o644)
	fmt.Fprintf(os.Stderr, "  profile: %s\n", dst)
}
