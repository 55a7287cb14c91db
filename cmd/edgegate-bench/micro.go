package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/edgegate/edgegate/internal/pipeline"
	"github.com/edgegate/edgegate/internal/queue"
	"github.com/edgegate/edgegate/internal/sim/radiosim"
	"github.com/edgegate/edgegate/policy"
	"github.com/edgegate/edgegate/radio"
)

type policyResult struct {
	Devices   int     `json:"devices"`
	CompileMS float64 `json:"compile_ms"`
	DecideNS  float64 `json:"decide_ns"`
	HeapMB    float64 `json:"heap_mb"`
	DeniedNS  float64 `json:"decide_unknown_ns"`
}

// runPolicy times policy.New (which compiles, deriving every device's keys)
// and Engine.DecideIngest for known and unknown devices.
func runPolicy(cfg config) []policyResult {
	var out []policyResult
	for _, n := range []int{100, 10000, 100000} {
		regs := make([]policy.Registration, n)
		for i := range regs {
			id := "dev-" + strconv.Itoa(i)
			regs[i] = policy.Registration{ID: id, Type: "T", Owner: "u" + strconv.Itoa(i%50), Broker: "https://broker.example/orion",
				K1: "k1-" + id, K2: "k2-" + id}
		}
		// Twice: the first run's finalizers and the previous sections'
		// garbage (servers just closed) are gone before the baseline.
		runtime.GC()
		runtime.GC()
		var m0, m1 runtime.MemStats
		runtime.ReadMemStats(&m0)
		t := time.Now()
		pol, err := policy.New(1, "bench", regs)
		compile := time.Since(t)
		if err != nil {
			fmt.Fprintln(os.Stderr, "  policy:", err)
			continue
		}
		e := policy.NewEngine(pol)
		runtime.GC()
		runtime.ReadMemStats(&m1)
		ids := make([]string, 4096)
		for i := range ids {
			ids[i] = regs[(i*7919)%n].ID
		}
		const iters = 2_000_000
		t = time.Now()
		ok := 0
		for i := range iters {
			if e.DecideIngest(ids[i&4095]).Allow {
				ok++
			}
		}
		decide := time.Since(t)
		t = time.Now()
		for i := range iters / 4 {
			_ = e.DecideIngest("rogue-" + ids[i&4095][4:])
		}
		denied := time.Since(t)
		if ok != iters {
			fmt.Fprintln(os.Stderr, "  policy: a registered device was refused")
		}
		out = append(out, policyResult{Devices: n, CompileMS: ms(compile), DecideNS: float64(decide.Nanoseconds()) / iters,
			DeniedNS: float64(denied.Nanoseconds()) / (iters / 4), HeapMB: max(0, float64(int64(m1.HeapAlloc)-int64(m0.HeapAlloc))/(1<<20))})
		runtime.KeepAlive(pol)
	}
	return out
}

type radioResult struct {
	Frames     int     `json:"frames"`
	FramesPerS float64 `json:"frames_per_s"`
	Queued     int64   `json:"queued"`
	Nodes      int     `json:"nodes"`
	Error      string  `json:"error,omitempty"`
}

// countingAppender counts what the pipeline queued.
type countingAppender struct {
	q *queue.Queue
	n atomic.Int64
}

func (c *countingAppender) Append(ctx context.Context, e queue.Entry) (queue.Item, error) {
	it, err := c.q.Append(ctx, e)
	if err == nil {
		c.n.Add(1)
	}
	return it, err
}

func (c *countingAppender) Enqueue(ctx context.Context, e queue.Entry) (func(context.Context) (queue.Item, error), error) {
	wait, err := c.q.Enqueue(ctx, e)
	if err != nil {
		return nil, err
	}
	return func(ctx context.Context) (queue.Item, error) {
		it, err := wait(ctx)
		if err == nil {
			c.n.Add(1)
		}
		return it, err
	}, nil
}

// runRadio writes MySensors set frames of several bound nodes into a
// simulated radio gateway's pty; radio.Manager reads them through
// tarm/serial and submits each through the pipeline into a real queue.
func runRadio(ctx context.Context, cfg config, work string) (radioResult, error) {
	var r radioResult
	dir, err := os.MkdirTemp(work, "radio-")
	if err != nil {
		return r, err
	}
	link := filepath.Join(dir, "ttyRADIO0")
	nodes := 8
	r.Nodes = nodes
	regs := make([]policy.Registration, nodes)
	for i := range regs {
		id := fmt.Sprintf("node-%d", i+1)
		regs[i] = policy.Registration{ID: id, Type: "T", Owner: "alice", Broker: "https://broker.example/orion", K1: "k1" + id, K2: "k2" + id,
			Radio: &policy.RadioBinding{Port: link, Node: i + 1, Child: -1}}
	}
	pol, err := policy.New(1, "bench", regs)
	if err != nil {
		return r, err
	}
	engine := policy.NewEngine(pol)
	key := make([]byte, 32)
	_, _ = rand.Read(key)
	q, err := queue.Open(queue.Options{Dir: filepath.Join(dir, "queue"), Key: key})
	if err != nil {
		return r, err
	}
	defer q.Close()
	qctx, qcancel := context.WithCancel(ctx)
	qdone := make(chan error, 1)
	go func() { qdone <- q.Run(qctx) }()
	defer func() { qcancel(); <-qdone }()
	app := &countingAppender{q: q}
	pipe := pipeline.New(engine, app, pipeline.Options{Gateway: "gw-bench"})

	sim, err := radiosim.New(radiosim.Options{Link: link, Silent: true})
	if err != nil {
		return r, err
	}
	defer sim.Close()
	mgr, err := radio.NewManager([]radio.PortConfig{{Path: link, Baud: 115200, Codec: radio.CodecMySensors, ReadTimeout: 100 * time.Millisecond}},
		pipe, engine, radio.Options{StateDir: filepath.Join(dir, "state")})
	if err != nil {
		return r, err
	}
	mctx, mcancel := context.WithCancel(ctx)
	mdone := make(chan error, 1)
	go func() { mdone <- mgr.Run(mctx) }()
	defer func() { mcancel(); <-mdone }()
	// Presentations, then bursts of set frames (temperature and humidity).
	var pres bytes.Buffer
	for n := 1; n <= nodes; n++ {
		fmt.Fprintf(&pres, "%d;255;0;0;17;2.3.2\n%d;0;0;0;6;\n%d;1;0;0;7;\n", n, n, n)
	}
	if err := sim.Inject(pres.Bytes()); err != nil {
		return r, err
	}
	time.Sleep(200 * time.Millisecond)
	frames := 20000
	if cfg.Quick {
		frames = 4000
	}
	r.Frames = frames
	start := time.Now()
	deadline := start.Add(2 * time.Minute)
	var buf bytes.Buffer
	for i := 0; i < frames; {
		buf.Reset()
		for k := 0; k < 100 && i < frames; k, i = k+1, i+1 {
			n := i%nodes + 1
			if i%2 == 0 {
				fmt.Fprintf(&buf, "%d;0;1;0;0;%d.5\n", n, 15+i%20)
			} else {
				fmt.Fprintf(&buf, "%d;1;1;0;1;%d\n", n, 40+i%30)
			}
		}
		// The pty holds a few KB: wait for the reader to keep up rather
		// than overrunning it (a real radio at 115200 baud sends ~500
		// frames/s at most).
		for app.n.Load() < int64(i-frames/10-400) && time.Now().Before(deadline) {
			time.Sleep(time.Millisecond)
		}
		if err := sim.Inject(buf.Bytes()); err != nil {
			return r, err
		}
	}
	for app.n.Load() < int64(frames) && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	el := time.Since(start)
	r.Queued = app.n.Load()
	r.FramesPerS = float64(r.Queued) / el.Seconds()
	if r.Queued < int64(frames) {
		return r, fmt.Errorf("%d of %d frames queued", r.Queued, frames)
	}
	return r, nil
}

type microResult struct {
	Package  string             `json:"package"`
	Name     string             `json:"name"`
	NsOp     float64            `json:"ns_per_op"`
	BytesOp  float64            `json:"bytes_per_op"`
	AllocsOp float64            `json:"allocs_per_op"`
	Extra    map[string]float64 `json:"extra,omitempty"`
}

// runMicro runs the packages' benchmarks with allocations and parses them.
func runMicro(cfg config) []microResult {
	bt := "1s"
	if cfg.Quick {
		bt = "200ms"
	}
	var out []microResult
	for _, pkg := range []string{"./envelope", "./queue", "./uplink", "./radio", "./policy"} {
		cmd := exec.Command("go", "test", "-run", "^$", "-bench", ".", "-benchmem", "-benchtime", bt, "-count", "1", pkg)
		b, err := cmd.CombinedOutput()
		if err != nil {
			fmt.Fprintf(os.Stderr, "  go test -bench %s: %v\n%s", pkg, err, b)
			continue
		}
		sc := bufio.NewScanner(bytes.NewReader(b))
		for sc.Scan() {
			f := strings.Fields(sc.Text())
			if len(f) < 4 || !strings.HasPrefix(f[0], "Benchmark") {
				continue
			}
			m := microResult{Package: strings.TrimPrefix(pkg, "./"), Name: f[0]}
			for i := 2; i+1 < len(f); i += 2 {
				v, err := strconv.ParseFloat(f[i], 64)
				if err != nil {
					continue
				}
				switch f[i+1] {
				case "ns/op":
					m.NsOp = v
				case "B/op":
					m.BytesOp = v
				case "allocs/op":
					m.AllocsOp = v
				default:
					if m.Extra == nil {
						m.Extra = map[string]float64{}
					}
					m.Extra[f[i+1]] = v
				}
			}
			out = append(out, m)
		}
	}
	return out
}

// topProfiles renders the top of each CPU profile written this run.
func topProfiles(cfg config) map[string]string {
	out := map[string]string{}
	for _, name := range []string{"batch", "filter"} {
		p := filepath.Join(cfg.ProfileDir, name+".pprof")
		if _, err := os.Stat(p); err != nil {
			continue
		}
		b, err := exec.Command("go", "tool", "pprof", "-top", "-nodecount=30", p).Output()
		if err != nil {
			continue
		}
		cum, _ := exec.Command("go", "tool", "pprof", "-top", "-cum", "-nodecount=40", p).Output()
		txt := string(b) + "\n--- cumulative ---\n" + string(cum)
		_ = os.WriteFile(filepath.Join(cfg.ProfileDir, name+".top.txt"), []byte(txt), 0o644)
		out[name] = filepath.Join(cfg.ProfileDir, name+".top.txt")
	}
	return out
}
