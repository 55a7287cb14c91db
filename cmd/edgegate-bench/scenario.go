package main

import (
	"context"
	"errors"
	"fmt"
	"github.com/edgegate/edgegate/mqtt"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/edgegate/edgegate/internal/sim/centralsim"
)

type scenario struct {
	Name    string
	Broker  string // embedded | mosquitto
	Gateway string // daemon | in-process
	Mode    string // uplink mode: filter | batch
	Profile string // CPU profile name (in-process only)
}

type e2eResult struct {
	scenario
	LimitRate      float64 `json:"limit_readings_per_s"`     // broker -> plain subscriber
	Sustained      float64 `json:"sustained_readings_per_s"` // publish -> broker 2xx
	Fraction       float64 `json:"fraction_of_limit"`
	PublishAckRate float64 `json:"publish_ack_per_s"` // PUBACKs (= durably queued) per second
	HalfRate       float64 `json:"half_rate"`
	P50Half        float64 `json:"p50_ms_at_half"`
	P99Half        float64 `json:"p99_ms_at_half"`
	FullRate       float64 `json:"full_rate"`
	P50Full        float64 `json:"p50_ms_at_full"`
	P99Full        float64 `json:"p99_ms_at_full"`
	CPUPer1000     float64 `json:"cpu_ms_per_1000"`
	// Where the rest of the machine's CPU went over the sustained run, per
	// 1,000 readings: the bench process (the simulated central service,
	// which verifies every signature, and the publishing devices) and
	// Mosquitto. Everything shares the same 2 cores.
	SimPubCPUPer1000    float64 `json:"sim_and_publishers_cpu_ms_per_1000"`
	MosquittoCPUPer1000 float64 `json:"mosquitto_cpu_ms_per_1000,omitempty"`
	// LimitClientsCPUPer1000 is this process's CPU in the limit run (the
	// 16 publishers and the plain subscriber; for the embedded limit, the
	// bare broker too) per 1,000 readings: what the devices alone cost.
	LimitClientsCPUPer1000 float64 `json:"limit_run_clients_cpu_ms_per_1000"`
	// GatewayCores is the gateway's CPU over the sustained run divided by
	// its wall time: 1.0 is one core busy.
	GatewayCores float64 `json:"gateway_cores"`
	PeakRSSMB    float64 `json:"peak_rss_mb"`
	// Peaks of the two parts of RSS, sampled every 50 ms: the daemon's own
	// memory (anonymous) and mapped page cache of the store's files.
	PeakAnonMB float64 `json:"peak_rss_anon_mb"`
	PeakFileMB float64 `json:"peak_rss_file_mb"`
	Duplicates int     `json:"duplicates"`
	Invalid    int     `json:"invalid_signatures"`
	Error      string  `json:"error,omitempty"`
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// measureLimitCPU publishes the readings from the same devices and
// payloads to a plain subscriber of the broker and returns the
// subscriber's rate, and the CPU this process (the publishers and the
// subscriber; for the embedded limit, the bare broker too) spent per 1,000
// readings.
func measureLimitCPU(ctx context.Context, cfg config, url string, devs []device) (float64, float64, error) {
	sub, n, last, err := subscribe(url, "devices/+/telemetry", nil)
	if err != nil {
		return 0, 0, err
	}
	defer sub.Disconnect(100)
	f, err := connectFleet(url, devs, false)
	if err != nil {
		return 0, 0, err
	}
	defer f.close()
	cpu0, _ := procCPU(os.Getpid())
	start := time.Now()
	f.publish(ctx, cfg.Readings, 0, cfg.Window, 2*time.Minute)
	deadline := time.Now().Add(30 * time.Second)
	for n.Load() < int64(cfg.Readings) && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	cpu1, _ := procCPU(os.Getpid())
	got := n.Load()
	el := time.Unix(0, last.Load()).Sub(start)
	if got == 0 || el <= 0 {
		return 0, 0, errors.New("subscriber received nothing")
	}
	return float64(got) / el.Seconds(), ms(cpu1-cpu0) * 1000 / float64(got), nil
}

func runScenario(ctx context.Context, cfg config, sc scenario, bin, self, work string) (r e2eResult, err error) {
	r.scenario = sc
	dir, err := os.MkdirTemp(work, "e2e-")
	if err != nil {
		return r, err
	}
	devs := makeDevices(cfg.Devices)
	s := newSink()
	sim, err := newSim(devs, s)
	if err != nil {
		return r, err
	}
	defer sim.Close()
	ca := filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(ca, sim.CACertPEM(), 0o600); err != nil {
		return r, err
	}

	// The limit: the broker alone, same clients and payloads.
	var mq *mosquittoProc
	switch sc.Broker {
	case "mosquitto":
		if mq, err = startMosquitto(dir); err != nil {
			return r, err
		}
		defer mq.stop()
		if r.LimitRate, r.LimitClientsCPUPer1000, err = measureLimitCPU(ctx, cfg, mq.URL, devs); err != nil {
			return r, fmt.Errorf("mosquitto limit: %w", err)
		}
	default:
		srv, url, err := startMochi(1024)
		if err != nil {
			return r, err
		}
		r.LimitRate, r.LimitClientsCPUPer1000, err = measureLimitCPU(ctx, cfg, url, devs)
		_ = mqtt.CloseServer(srv, "bench")
		if err != nil {
			return r, fmt.Errorf("embedded broker limit: %w", err)
		}
	}

	g := gwSpec{Dir: dir, Devices: devs, BrokerURL: brokerURLFor(sim, sc.Mode), TokenURL: sim.TokenURL(), ClientID: benchClientID,
		Secret: benchSecret, CAFile: ca, Mode: sc.Mode, MaxBatch: 256, Concurrency: benchConcurrency()}
	if mq != nil {
		g.ExternalURL = mq.URL
	}
	var p *proc
	if sc.Gateway == "daemon" {
		p, err = startDaemon(bin, g)
	} else {
		prof := ""
		if sc.Profile != "" {
			prof = filepath.Join(cfg.ProfileDir, sc.Profile+".pprof")
		}
		p, err = startInProcess(self, g, prof)
	}
	if err != nil {
		return r, err
	}
	defer func() {
		if serr := p.stop(); serr != nil && err == nil {
			err = fmt.Errorf("stop gateway: %w", serr)
		}
	}()
	mqttURL := p.MQTT
	if mq != nil {
		mqttURL = mq.URL
	}
	f, err := connectFleet(mqttURL, devs, mq == nil)
	if err != nil {
		return r, err
	}
	defer f.close()

	// Warm up: tokens, TLS, the external subscription (readings published
	// before it exists would be lost with persistence off).
	warm := time.Now().Add(60 * time.Second)
	for s.count() == 0 && time.Now().Before(warm) {
		f.publish(ctx, len(devs), 0, 1, 10*time.Second)
		s.waitFor(1, time.Now().Add(2*time.Second))
	}
	if !s.waitFor(len(devs), warm) {
		return r, errors.New("warm-up readings did not reach the broker within 60s")
	}

	pid := p.pid()
	_ = resetHWM(pid)
	sampler := sampleRSS(pid)
	defer func() {
		if sampler != nil {
			sampler.peaks()
		}
	}()
	// Sustained rate: N readings as fast as acknowledgements allow.
	s.reset(false)
	cpu0, _ := procCPU(pid)
	self0, _ := procCPU(os.Getpid())
	var mq0 time.Duration
	if mq != nil {
		mq0, _ = procCPU(mq.pid())
	}
	start := time.Now()
	pr := f.publish(ctx, cfg.Readings, 0, cfg.Window, 3*time.Minute)
	r.PublishAckRate = float64(pr.Acked) / pr.Elapsed.Seconds()
	if !s.waitFor(pr.Acked, time.Now().Add(3*time.Minute)) {
		return r, fmt.Errorf("only %d of %d acknowledged readings reached the broker", s.count(), pr.Acked)
	}
	cpu1, _ := procCPU(pid)
	self1, _ := procCPU(os.Getpid())
	st := s.stats()
	wall := st.Last.Sub(start)
	r.Sustained = float64(st.N) / wall.Seconds()
	r.CPUPer1000 = ms(cpu1-cpu0) * 1000 / float64(st.N)
	r.GatewayCores = (cpu1 - cpu0).Seconds() / wall.Seconds()
	r.SimPubCPUPer1000 = ms(self1-self0) * 1000 / float64(st.N)
	if mq != nil {
		mq1, _ := procCPU(mq.pid())
		r.MosquittoCPUPer1000 = ms(mq1-mq0) * 1000 / float64(st.N)
	}
	r.Duplicates, r.Invalid = st.Dups, st.Invalid
	if r.LimitRate > 0 {
		r.Fraction = r.Sustained / r.LimitRate
	}

	// Latency at half and full sustained rate.
	for _, frac := range []float64{0.5, 1} {
		rate := r.Sustained * frac
		total := int(rate * cfg.Paced.Seconds())
		s.reset(true)
		pr := f.publish(ctx, total, rate, cfg.Window, cfg.Paced+time.Minute)
		s.waitFor(pr.Acked, time.Now().Add(2*time.Minute))
		st := s.stats()
		r.Duplicates += st.Dups
		r.Invalid += st.Invalid
		if frac == 0.5 {
			r.HalfRate, r.P50Half, r.P99Half = rate, ms(st.P50), ms(st.P99)
		} else {
			r.FullRate, r.P50Full, r.P99Full = rate, ms(st.P50), ms(st.P99)
		}
	}
	hwm, _, _ := procMem(pid)
	r.PeakRSSMB = float64(hwm) / (1 << 20)
	r.PeakAnonMB, r.PeakFileMB = sampler.peaks()
	sampler = nil
	return r, nil
}

type backlogResult struct {
	Mode        string  `json:"uplink_mode"`
	Gateway     string  `json:"gateway"`
	Lo          int     `json:"lo"`
	Hi          int     `json:"hi"`
	IngestRate  float64 `json:"ingest_readings_per_s"` // queued (PUBACKed) with the uplink down
	RSSLoMB     float64 `json:"rss_mb_at_lo"`
	RSSHiMB     float64 `json:"rss_mb_at_hi"`
	PeakLoMB    float64 `json:"peak_rss_mb_to_lo"`
	PeakHiMB    float64 `json:"peak_rss_mb_lo_to_hi"`
	DiskPerLo   float64 `json:"disk_bytes_per_reading_at_lo"`
	DiskPerHi   float64 `json:"disk_bytes_per_reading_at_hi"`
	DrainRate   float64 `json:"drain_readings_per_s"`
	PeakDrainMB float64 `json:"peak_rss_mb_drain"`
	// Sampled peaks (every 50 ms) of the two parts of RSS while queuing
	// the first lo readings, while queuing from lo to hi (the same ingest
	// load with 10 times the backlog: flat means these match), and while
	// draining.
	PeakAnonLoMB    float64 `json:"peak_rss_anon_mb_to_lo"`
	PeakFileLoMB    float64 `json:"peak_rss_file_mb_to_lo"`
	PeakAnonHiMB    float64 `json:"peak_rss_anon_mb_lo_to_hi"`
	PeakFileHiMB    float64 `json:"peak_rss_file_mb_lo_to_hi"`
	PeakAnonDrainMB float64 `json:"peak_rss_anon_mb_drain"`
	PeakFileDrainMB float64 `json:"peak_rss_file_mb_drain"`
	DrainComplete   bool    `json:"drain_complete"`
	Drained         int     `json:"drained_in_window"`
	AnonLoMB        float64 `json:"rss_anon_mb_at_lo"`
	AnonHiMB        float64 `json:"rss_anon_mb_at_hi"`
	FileLoMB        float64 `json:"rss_file_mb_at_lo"`
	FileHiMB        float64 `json:"rss_file_mb_at_hi"`
	Error           string  `json:"error,omitempty"`
}

// runBacklog queues readings with the broker down (the sim closes every
// connection), measures memory and disk at lo and hi queued, then brings
// the broker back and measures the drain.
func runBacklog(ctx context.Context, cfg config, bin, work, mode string) (b backlogResult, err error) {
	b.Mode, b.Lo, b.Hi = mode, cfg.BacklogLo, cfg.BacklogHi
	dir, err := os.MkdirTemp(work, "backlog-")
	if err != nil {
		return b, err
	}
	defer os.RemoveAll(dir)
	devs := makeDevices(cfg.Devices)
	s := newSink()
	sim, err := newSim(devs, s)
	if err != nil {
		return b, err
	}
	defer sim.Close()
	sim.SetFault(centralsim.Fault{Mode: centralsim.FaultDown, Target: faultTarget(mode)})
	ca := filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(ca, sim.CACertPEM(), 0o600); err != nil {
		return b, err
	}
	// Readings come in through the embedded broker, whose PUBACK means
	// durably queued: with Mosquitto in between, a PUBACK is Mosquitto's,
	// and what it holds beyond max_queued_messages (persistence off) it
	// drops, so the publishers' count said more than the gateway had.
	g := gwSpec{Dir: dir, Devices: devs, BrokerURL: brokerURLFor(sim, mode), TokenURL: sim.TokenURL(), ClientID: benchClientID,
		Secret: benchSecret, CAFile: ca, Mode: mode, MaxBatch: 256, Concurrency: benchConcurrency()}
	b.Gateway = "daemon"
	p, err := startDaemon(bin, g)
	if err != nil {
		return b, err
	}
	defer func() {
		if serr := p.stop(); serr != nil && err == nil {
			err = fmt.Errorf("stop gateway: %w", serr)
		}
	}()
	f, err := connectFleet(p.MQTT, devs, true)
	if err != nil {
		return b, err
	}
	defer f.close()
	pid := p.pid()
	qdir := filepath.Join(dir, "state", "queue")

	start := time.Now()
	toLo := sampleRSS(pid)
	pr := f.publish(ctx, b.Lo, 0, cfg.Window, 10*time.Minute)
	waitQueued(qdir, pid)
	b.PeakAnonLoMB, b.PeakFileLoMB = toLo.peaks()
	hwm, rss, _ := procMem(pid)
	b.RSSLoMB, b.PeakLoMB = float64(rss)/(1<<20), float64(hwm)/(1<<20)
	anon, file := procRSSParts(pid)
	b.AnonLoMB, b.FileLoMB = float64(anon)/(1<<20), float64(file)/(1<<20)
	b.DiskPerLo = float64(diskUsage(qdir)) / float64(max(pr.Acked, 1))
	_ = resetHWM(pid)
	ingest := sampleRSS(pid)
	pr2 := f.publish(ctx, b.Hi-b.Lo, 0, cfg.Window, 20*time.Minute)
	queued := pr.Acked + pr2.Acked
	waitQueued(qdir, pid)
	b.IngestRate = float64(queued) / time.Since(start).Seconds()
	b.PeakAnonHiMB, b.PeakFileHiMB = ingest.peaks()
	hwm, rss, _ = procMem(pid)
	b.RSSHiMB, b.PeakHiMB = float64(rss)/(1<<20), float64(hwm)/(1<<20)
	anon, file = procRSSParts(pid)
	b.AnonHiMB, b.FileHiMB = float64(anon)/(1<<20), float64(file)/(1<<20)
	b.DiskPerHi = float64(diskUsage(qdir)) / float64(max(queued, 1))
	if queued < b.Hi {
		return b, fmt.Errorf("only %d of %d readings queued", queued, b.Hi)
	}
	// The gateway's own count, not only the publishers' acknowledgements.
	if n, err := p.queuedTotal(); err != nil {
		return b, fmt.Errorf("read the queued count: %w", err)
	} else if n < int64(queued) {
		return b, fmt.Errorf("the gateway queued %d readings, the devices had %d acknowledged", n, queued)
	}

	_ = resetHWM(pid)
	s.reset(false)
	drain := sampleRSS(pid)
	sim.ClearFault()
	t0 := time.Now()
	// The drain rate is measured over a bounded window (the whole backlog
	// of a slow mode would take minutes); what is left is dropped with the
	// state directory.
	b.DrainComplete = s.waitFor(queued, t0.Add(cfg.DrainWindow))
	st := s.stats()
	b.Drained = st.N
	if st.N > 0 {
		end := st.Last
		if !b.DrainComplete {
			end = time.Now()
		}
		b.DrainRate = float64(st.N) / end.Sub(t0).Seconds()
	}
	hwm, _, _ = procMem(pid)
	b.PeakDrainMB = float64(hwm) / (1 << 20)
	b.PeakAnonDrainMB, b.PeakFileDrainMB = drain.peaks()
	return b, nil
}

// waitQueued waits (30s at most) until the queue directory stops growing
// and the daemon is idle: a reading is PUBACKed once durably queued, but
// the store may still be busy (flushes, compactions) after the last one,
// and disk and memory are measured once it settles.
func waitQueued(qdir string, pid int) {
	prev := int64(-1)
	for range 60 {
		cur := diskUsage(qdir)
		c, _ := procCPU(pid)
		time.Sleep(500 * time.Millisecond)
		c2, _ := procCPU(pid)
		if cur == prev && c2-c < 50*time.Millisecond {
			return
		}
		prev = cur
	}
}

// benchConcurrency is uplink.concurrency for the runs: BENCH_CONCURRENCY,
// else 0, the daemon's default for the mode (16 filter, 4 batch).
func benchConcurrency() int {
	if n, err := strconv.Atoi(os.Getenv("BENCH_CONCURRENCY")); err == nil && n > 0 {
		return n
	}
	return 0
}

// brokerURLFor is where a gateway in uplink mode sends: through the Orion
// Broker Filter (PATCH per reading, the stock route) in filter mode; to the
// bare Orion in batch mode, since the filter has no POST /v2/op/update.
func brokerURLFor(sim *centralsim.Server, mode string) string {
	if mode == "batch" {
		return sim.DirectBrokerURL()
	}
	return sim.BrokerURL()
}

// faultTarget is the simulator's fault target in front of that broker.
func faultTarget(mode string) string {
	if mode == "batch" {
		return centralsim.TargetOrion
	}
	return centralsim.TargetBroker
}
