package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"strings"
	"syscall"
	"time"

	egconfig "github.com/edgegate/edgegate/internal/config"
	"github.com/edgegate/edgegate/internal/logx"
	"github.com/edgegate/edgegate/internal/metrics"
	"github.com/edgegate/edgegate/internal/pipeline"
	"github.com/edgegate/edgegate/internal/queue"
	"github.com/edgegate/edgegate/internal/sim/centralsim"
	"github.com/edgegate/edgegate/internal/uplink"
	"github.com/edgegate/edgegate/mqtt"
	"github.com/edgegate/edgegate/policy"
	centralsync "github.com/edgegate/edgegate/sync"
)

// gwSpec is what both gateways (the real daemon and the in-process
// equivalent) are configured with.
type gwSpec struct {
	Dir         string   `json:"dir"`
	Devices     []device `json:"devices"`
	BrokerURL   string   `json:"broker_url"`
	TokenURL    string   `json:"token_url"`
	ClientID    string   `json:"client_id"`
	Secret      string   `json:"secret"`
	CAFile      string   `json:"ca_file"`
	Mode        string   `json:"mode"` // uplink mode
	ExternalURL string   `json:"external_url,omitempty"`
	MaxBatch    int      `json:"max_batch"`
	Concurrency int      `json:"concurrency"`
	// UplinkCAFile is the brokers' CA when it is not the central
	// service's (the peers run's light sink); empty: CAFile.
	UplinkCAFile string `json:"uplink_ca_file,omitempty"`
	// ProfileDir, for a daemon built with -tags benchprofile, is where it
	// writes the CPU profiles SIGUSR1/SIGUSR2 delimit.
	ProfileDir string `json:"-"`
}

const (
	benchClientID = "gw-bench"
	benchSecret   = "bench-secret-5f2b9c"
)

// proc is a running gateway process.
type proc struct {
	cmd   *exec.Cmd
	done  chan struct{}
	err   error
	MQTT  string
	ready string // the line that said the gateway is ready
	logs  *strings.Builder
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

// stop sends SIGTERM and waits (40s at most, then SIGKILL).
func (p *proc) stop() error {
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		return p.err
	case <-time.After(40 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
		return errors.New("gateway did not stop within 40s of SIGTERM; killed")
	}
}

// startProc runs cmd and waits for a line on its stderr/stdout holding
// readyMark; addrOf extracts the MQTT address from that line.
func startProc(cmd *exec.Cmd, readyMark string, addrOf func(string) string) (*proc, error) {
	pr, pw := io.Pipe()
	cmd.Stdout, cmd.Stderr = pw, pw
	p := &proc{cmd: cmd, done: make(chan struct{}), logs: &strings.Builder{}}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	ready := make(chan string, 1)
	logs := make(chan string, 1024)
	go func() {
		sc := bufio.NewScanner(pr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			line := sc.Text()
			if strings.Contains(line, readyMark) {
				select {
				case ready <- line:
				default:
				}
			}
			if gcLog != nil && strings.HasPrefix(line, "gc ") {
				fmt.Fprintln(gcLog, line)
			}
			if strings.Contains(line, `"level":"ERROR"`) || strings.Contains(line, "level=ERROR") || strings.Contains(line, " E! ") || strings.Contains(line, "panic") {
				select {
				case logs <- line:
				default:
				}
			}
		}
		close(logs)
	}()
	go func() {
		p.err = cmd.Wait()
		pw.Close()
		close(p.done)
	}()
	go func() {
		for l := range logs {
			fmt.Fprintln(os.Stderr, "  gateway:", logx.Clip(l, 300))
		}
	}()
	select {
	case line := <-ready:
		p.MQTT, p.ready = addrOf(line), line
		return p, nil
	case <-p.done:
		return nil, fmt.Errorf("gateway exited before it was ready: %v", p.err)
	case <-time.After(60 * time.Second):
		_ = cmd.Process.Kill()
		<-p.done
		return nil, errors.New("gateway not ready within 60s")
	}
}

// writeDaemonConfig writes the real daemon's configuration, as e2e's
// writeGatewayConfig does.
func writeDaemonConfig(g gwSpec) (string, error) {
	if err := os.WriteFile(filepath.Join(g.Dir, "client-secret"), []byte(g.Secret+"\n"), 0o600); err != nil {
		return "", err
	}
	var b strings.Builder
	b.WriteString("devices:\n")
	for _, d := range g.Devices {
		fmt.Fprintf(&b, "  - id: %s\n    type: %s\n    owner: %s\n    k1: %s\n    k2: %s\n    broker: %s\n",
			d.ID, d.Type, d.Owner, d.K1, d.K2, g.BrokerURL)
	}
	if err := os.WriteFile(filepath.Join(g.Dir, "devices.yaml"), []byte(b.String()), 0o600); err != nil {
		return "", err
	}
	// Unpaced: the benchmark measures what the gateway can take, not the
	// per-device pacing (default 50/s per device) a real gateway keeps.
	mq := "mqtt:\n  mode: embedded\n  embedded:\n    listen: 127.0.0.1:0\n    device_rate: 0\n"
	if g.ExternalURL != "" {
		mq = fmt.Sprintf("mqtt:\n  mode: external\n  external:\n    url: %s\n    client_id: edgegate-bench\n", g.ExternalURL)
	}
	cfg := fmt.Sprintf(`gateway:
  id: gw-bench
state_dir: state
store:
  max_batch: %d
  quota: 4GiB
%s%s
central:
  token_url: %s
  client_id: %s
  client_secret_file: client-secret
  ca_file: %s
uplink:
  mode: %s
  batch_size: %d
  ca_file: %s
  concurrency: %d # 0: the default of the mode
  min_backoff: 50ms
  max_backoff: 500ms
  request_timeout: 10s
%sdevices_file: devices.yaml
metrics:
  listen: 127.0.0.1:0
log:
  format: json
  level: info
`, g.MaxBatch, knob("BENCH_COMMIT_DELAY", "commit_delay"), mq, g.TokenURL, g.ClientID, g.CAFile, uplinkMode(g.Mode), g.MaxBatch, g.uplinkCA(), g.Concurrency,
		knob("BENCH_BATCH_LINGER", "batch_linger"))
	p := filepath.Join(g.Dir, "edgegate.yaml")
	return p, os.WriteFile(p, []byte(cfg), 0o600)
}

// knob is "  key: value\n" when the environment variable env is set (a
// knob tried before it becomes a default: BENCH_COMMIT_DELAY=20ms sets
// store.commit_delay, BENCH_BATCH_LINGER uplink.batch_linger).
func knob(env, key string) string {
	v := os.Getenv(env)
	if v == "" {
		return ""
	}
	return "  " + key + ": " + v + "\n"
}

func (g gwSpec) uplinkCA() string {
	if g.UplinkCAFile != "" {
		return g.UplinkCAFile
	}
	return g.CAFile
}

func uplinkMode(m string) string {
	if m == "" {
		return "filter"
	}
	return m
}

// gcLog receives the daemon's GC trace when BENCH_DAEMON_GCTRACE names a
// file (GODEBUG=gctrace=1 for the daemon only).
var gcLog *os.File

func init() {
	if p := os.Getenv("BENCH_DAEMON_GCTRACE"); p != "" {
		gcLog, _ = os.Create(p)
	}
}

// startDaemon runs the real binary.
func startDaemon(bin string, g gwSpec) (*proc, error) {
	cfg, err := writeDaemonConfig(g)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, "run", "--config", cfg)
	cmd.Env = append(os.Environ(), "CREDENTIALS_DIRECTORY=")
	if g.ProfileDir != "" {
		cmd.Env = append(cmd.Env, "EDGEGATE_BENCH_PROFILE_DIR="+g.ProfileDir)
		if os.Getenv("BENCH_PEERS_TRACE") == "1" {
			cmd.Env = append(cmd.Env, "EDGEGATE_BENCH_TRACE=1")
		}
	}
	if gcLog != nil {
		cmd.Env = append(cmd.Env, "GODEBUG=gctrace=1")
	}
	return startProc(cmd, `"msg":"edgegate ready"`, func(line string) string {
		var rec map[string]any
		_ = json.Unmarshal([]byte(line), &rec)
		s, _ := rec["mqtt"].(string)
		if s != "" && !strings.Contains(s, "://") {
			s = "tcp://" + s
		}
		return s
	})
}

// queuedTotal reads edgegate_readings_queued_total from the daemon's
// metrics endpoint: readings durably committed.
func (p *proc) queuedTotal() (int64, error) {
	v, err := p.metricSums("edgegate_readings_queued_total")
	return int64(v[0]), err
}

// gwCounters is what the daemon's metrics say of its commits and its
// uplink so far; a phase's figures are the difference of two.
type gwCounters struct {
	// syncs: group commits synced (edgegate_queue_commit_batch_size):
	// readings per sync is the share of one fsync each reading paid.
	syncs int64
	// commitSeconds: what they took in all; slowCommits: how many took
	// over 100 ms (edgegate_queue_commit_seconds): a stall of the
	// committer shows in the tail of a phase's latency.
	commitSeconds float64
	slowCommits   int64
	// requests, requestSeconds: the uplink's requests and what they took
	// (edgegate_uplink_request_seconds): readings per request is what a
	// request's fixed cost is shared by, and a mean time that grows says
	// the broker, or the cores it shares, is the limit.
	requests       int64
	requestSeconds float64
}

// counters reads gwCounters in one scrape. Zero without a daemon or its
// metrics: the figures are then left out, not failed.
func (p *proc) counters() gwCounters {
	if p == nil {
		return gwCounters{}
	}
	v, err := p.metricSums("edgegate_queue_commit_batch_size_count", "edgegate_queue_commit_seconds_sum",
		"edgegate_queue_commit_seconds_count", `edgegate_queue_commit_seconds_bucket{le="0.1"}`,
		"edgegate_uplink_request_seconds_count", "edgegate_uplink_request_seconds_sum")
	if err != nil {
		return gwCounters{}
	}
	return gwCounters{syncs: int64(v[0]), commitSeconds: v[1], slowCommits: int64(v[2] - v[3]),
		requests: int64(v[4]), requestSeconds: v[5]}
}

func (c gwCounters) sub(o gwCounters) gwCounters {
	return gwCounters{syncs: c.syncs - o.syncs, commitSeconds: c.commitSeconds - o.commitSeconds,
		slowCommits: c.slowCommits - o.slowCommits, requests: c.requests - o.requests,
		requestSeconds: c.requestSeconds - o.requestSeconds}
}

// metricSums reads the daemon's metrics endpoint, named in its ready line,
// once, and adds up every series (all label sets) of each name: a name
// may carry a label set of its own (`name{le="0.1"}`) to pick that one.
func (p *proc) metricSums(names ...string) ([]float64, error) {
	sums := make([]float64, len(names))
	var rec map[string]any
	if err := json.Unmarshal([]byte(p.ready), &rec); err != nil {
		return sums, fmt.Errorf("ready line: %w", err)
	}
	addr, _ := rec["metrics"].(string)
	if addr == "" {
		return sums, errors.New("the daemon names no metrics address")
	}
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		return sums, err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		for i, name := range names {
			v, ok := strings.CutPrefix(line, name)
			// The name alone, or with labels: not a longer metric's prefix.
			if !ok || (v != "" && v[0] != ' ' && v[0] != '{') {
				continue
			}
			var f float64
			if _, err := fmt.Sscan(strings.TrimSpace(v[strings.LastIndexByte(v, ' ')+1:]), &f); err == nil {
				sums[i] += f
			}
		}
	}
	return sums, sc.Err()
}

// startInProcess runs this program's `gateway` subcommand: the daemon's
// wiring with the uplink in g.Mode, and a CPU profile when asked.
func startInProcess(self string, g gwSpec, cpuprofile string) (*proc, error) {
	spec := filepath.Join(g.Dir, "gw.json")
	b, _ := json.Marshal(g)
	if err := os.WriteFile(spec, b, 0o600); err != nil {
		return nil, err
	}
	args := []string{"gateway", "-spec", spec}
	if cpuprofile != "" {
		args = append(args, "-cpuprofile", cpuprofile)
	}
	cmd := exec.Command(self, args...)
	return startProc(cmd, "GATEWAY READY ", func(line string) string {
		_, addr, _ := strings.Cut(line, "GATEWAY READY ")
		return "tcp://" + strings.TrimSpace(addr)
	})
}

// runGateway is the `gateway` subcommand: daemon.Run's wiring (policy,
// queue, pipeline, embedded broker, uplink) with the uplink's Mode set,
// which the daemon's configuration does not expose yet (uplink.mode).
func runGateway(args []string) error {
	fs := flag.NewFlagSet("gateway", flag.ContinueOnError)
	specPath := fs.String("spec", "", "gateway spec (JSON)")
	cpuprofile := fs.String("cpuprofile", "", "write a CPU profile of the whole run")
	if err := fs.Parse(args); err != nil {
		return err
	}
	b, err := os.ReadFile(*specPath)
	if err != nil {
		return err
	}
	var g gwSpec
	if err := json.Unmarshal(b, &g); err != nil {
		return err
	}
	if *cpuprofile != "" {
		stop, err := startCPUProfile(*cpuprofile)
		if err != nil {
			return err
		}
		defer stop()
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	if os.Getenv("GOMEMLIMIT") == "" {
		// The daemon's default memory_limit.
		debug.SetMemoryLimit(int64(egconfig.Default().MemoryLimit))
	}
	m := metrics.New()
	regs := make([]policy.Registration, 0, len(g.Devices))
	for _, d := range g.Devices {
		regs = append(regs, policy.Registration{ID: d.ID, Type: d.Type, Owner: d.Owner, Broker: g.BrokerURL, K1: d.K1, K2: d.K2})
	}
	pol, err := policy.New(0, "bench", regs)
	if err != nil {
		return err
	}
	engine := policy.NewEngine(pol)
	caPEM, err := os.ReadFile(g.CAFile)
	if err != nil {
		return err
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	key := make([]byte, 32)
	_, _ = rand.Read(key)
	q, err := queue.Open(queue.Options{Dir: filepath.Join(g.Dir, "state", "queue"), Key: key, MaxBatch: g.MaxBatch,
		QuotaBytes: 4 << 30, Logger: log, Metrics: m})
	if err != nil {
		return err
	}
	defer q.Close()
	tokens := centralsync.NewTokenSource(centralsync.ClientCredentials{TokenURL: g.TokenURL, ClientID: g.ClientID,
		ClientSecret: g.Secret, HTTPClient: uplink.NewHTTPClient(pool, 10*time.Second, 2), Metrics: m, Logger: log})
	conc := egconfig.Uplink{Mode: g.Mode, Concurrency: g.Concurrency}.EffectiveConcurrency()
	up := uplink.New(q, tokens, uplink.Options{Mode: g.Mode, Concurrency: conc,
		MinBackoff: 50 * time.Millisecond, MaxBackoff: 500 * time.Millisecond,
		HTTPClient: uplink.NewHTTPClient(pool, 10*time.Second, conc), Logger: log, Metrics: m})
	pipe := pipeline.New(engine, q, pipeline.Options{Gateway: "gw-bench", Logger: log, Metrics: m})
	topic, err := mqtt.ParseTopic("devices/{device}/telemetry")
	if err != nil {
		return err
	}
	qctx, qcancel := context.WithCancel(context.Background())
	uctx, ucancel := context.WithCancel(context.Background())
	qdone, udone := make(chan error, 1), make(chan error, 1)
	go func() { qdone <- q.Run(qctx) }()
	go func() { udone <- up.Run(uctx) }()
	stopRest := func() {
		qcancel()
		<-qdone
		ucancel()
		<-udone
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	if g.ExternalURL != "" {
		// External mode: the daemon's paho ingest client.
		ready := make(chan struct{}, 1)
		cctx, ccancel := context.WithCancel(context.Background())
		cdone := make(chan error, 1)
		c := mqtt.NewClient(pipe, mqtt.ClientOptions{URL: g.ExternalURL, ClientID: "edgegate-bench", Topic: topic, Logger: log,
			OnConnect: func() {
				select {
				case ready <- struct{}{}:
				default:
				}
			}})
		go func() { cdone <- c.Run(cctx) }()
		select {
		case <-ready:
		case <-time.After(30 * time.Second):
			ccancel()
			<-cdone
			stopRest()
			return errors.New("not subscribed to the external broker within 30s")
		}
		fmt.Println("GATEWAY READY " + strings.TrimPrefix(g.ExternalURL, "tcp://"))
		<-sig
		ccancel()
		<-cdone
		stopRest()
		return nil
	}
	br, err := mqtt.NewBroker(pipe, mqtt.BrokerOptions{Listen: "127.0.0.1:0", Topic: topic, Policy: engine, Metrics: m, Logger: log})
	if err != nil {
		stopRest()
		return err
	}
	bctx, bcancel := context.WithCancel(context.Background())
	bdone := make(chan error, 1)
	ready := make(chan struct{})
	go func() { bdone <- br.Run(bctx, func() { close(ready) }) }()
	select {
	case <-ready:
	case err := <-bdone:
		bcancel()
		stopRest()
		return err
	}
	fmt.Println("GATEWAY READY " + br.Addr())
	<-sig
	// The daemon's order: producers, queue, uplink; the store last.
	bcancel()
	<-bdone
	stopRest()
	return nil
}

// newSim starts a simulated central service with the devices registered,
// recording into s.
func newSim(devs []device, s *sink) (*centralsim.Server, error) {
	var ds []centralsim.Device
	for _, d := range devs {
		// The attributes the fleet's payload carries (fleet.go): stock Orion
		// updates only attributes the device's entity declares.
		ds = append(ds, centralsim.Device{ID: d.ID, Type: d.Type, Owner: d.Owner, K1: d.K1, K2: d.K2,
			Attrs: []string{"temperature", "humidity", "n", "t0"}})
	}
	sim, err := centralsim.New(centralsim.Options{
		Clients:        []centralsim.Client{{ID: benchClientID, Secret: benchSecret, Username: "alice"}},
		Devices:        ds,
		TokenTTL:       30 * time.Minute,
		OnUpdate:       s.onUpdate,
		DiscardUpdates: true,
	})
	if err != nil {
		return nil, err
	}
	if err := sim.Start("127.0.0.1:0"); err != nil {
		return nil, err
	}
	return sim, nil
}
