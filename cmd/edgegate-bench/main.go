// Command edgegate-bench is the reproducible end-to-end benchmark of
// edgegate (issue 10): simulated MQTT devices -> a real broker (embedded or
// Mosquitto) -> the real daemon binary -> the simulated broker filter over
// HTTPS, plus the broker's own limit, a backlog with the uplink down, policy
// scale, the radio path and the package micro-benchmarks. It prints a
// table and writes docs/bench/results.json. Run it with `make bench` from the
// repository root. Everything is on loopback; every process it starts, it
// stops; every load loop is bounded in count and time.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"
)

type config struct {
	Quick     bool
	Devices   int
	Readings  int           // per sustained-rate measurement
	Paced     time.Duration // per latency measurement
	BacklogLo int
	BacklogHi int
	Window    int // unacknowledged publishes per device
	// DrainWindow bounds the backlog drain measurement.
	DrainWindow time.Duration
	Out         string
	ProfileDir  string
	Skip        map[string]bool
}

func main() {
	if len(os.Args) > 1 {
		// Subcommands: the in-process gateway and the bare mochi broker
		// run as child processes (their CPU and RSS are measured apart
		// from the load generator's); `peers` is `make bench-peers`.
		sub := map[string]func([]string) error{"gateway": runGateway, "mochi": runMochi, "peers": runPeers, "profsplit": runProfSplit}[os.Args[1]]
		if sub != nil {
			if err := sub(os.Args[2:]); err != nil {
				fmt.Fprintf(os.Stderr, "edgegate-bench %s: %v\n", os.Args[1], err)
				os.Exit(1)
			}
			return
		}
	}
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "edgegate-bench:", err)
		os.Exit(1)
	}
}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

func run() error {
	var cfg config
	out := flag.String("out", "docs/bench/results.json", "results file")
	skip := flag.String("skip", "", "comma-separated sections to skip: e2e,backlog,policy,radio,micro")
	flag.Parse()
	cfg.Quick = os.Getenv("BENCH_QUICK") == "1"
	cfg.Devices = envInt("BENCH_DEVICES", 16)
	cfg.Window = 32
	if cfg.Quick {
		cfg.Readings, cfg.Paced, cfg.BacklogLo, cfg.BacklogHi = 2000, 2*time.Second, 5000, 15000
		cfg.DrainWindow = 15 * time.Second
	} else {
		cfg.Readings, cfg.Paced, cfg.BacklogLo, cfg.BacklogHi = 15000, 8*time.Second, 100000, 1000000
		cfg.DrainWindow = 60 * time.Second
	}
	cfg.Readings = envInt("BENCH_READINGS", cfg.Readings)
	cfg.BacklogHi = envInt("BENCH_BACKLOG", cfg.BacklogHi)
	cfg.BacklogLo = min(cfg.BacklogLo, cfg.BacklogHi)
	cfg.Out = *out
	cfg.ProfileDir = filepath.Join(filepath.Dir(cfg.Out), "profiles")
	cfg.Skip = map[string]bool{}
	for _, s := range splitComma(*skip) {
		cfg.Skip[s] = true
	}

	work, err := os.MkdirTemp("", "edgegate-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	if err := os.MkdirAll(cfg.ProfileDir, 0o755); err != nil {
		return err
	}

	res := &results{
		Machine: machine{CPU: cpuModel(), Cores: runtime.NumCPU(), GoVersion: runtime.Version(), OS: runtime.GOOS + "/" + runtime.GOARCH},
		Started: time.Now().UTC(), Quick: cfg.Quick, Devices: cfg.Devices, Readings: cfg.Readings,
		PacedSeconds: cfg.Paced.Seconds(),
	}
	step := func(name string) {
		fmt.Fprintf(os.Stderr, "== %s (%s)\n", name, time.Since(res.Started).Round(time.Second))
	}

	step("build the daemon")
	bin, err := buildDaemon(work)
	if err != nil {
		return err
	}
	if fi, err := os.Stat(bin); err == nil {
		res.BinaryBytes = fi.Size()
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	ctx := context.Background()

	if path := os.Getenv("BENCH_SELF_PROFILE"); path != "" {
		// A CPU profile of this process: the simulated central service
		// and the publishing devices.
		stop, err := startCPUProfile(path)
		if err != nil {
			return err
		}
		defer stop()
	}
	if !cfg.Skip["e2e"] {
		scenarios := []scenario{
			{Name: "embedded, daemon, filter", Broker: "embedded", Gateway: "daemon", Mode: "filter"},
			{Name: "embedded, daemon, batch", Broker: "embedded", Gateway: "daemon", Mode: "batch"},
			{Name: "mosquitto, daemon, batch", Broker: "mosquitto", Gateway: "daemon", Mode: "batch"},
		}
		if !cfg.Quick {
			// The in-process gateway is the daemon's wiring in a process
			// that writes a CPU profile (docs/bench/profiles).
			scenarios = append(scenarios,
				scenario{Name: "mosquitto, daemon, filter", Broker: "mosquitto", Gateway: "daemon", Mode: "filter"},
				scenario{Name: "embedded, in-process, batch (profiled)", Broker: "embedded", Gateway: "in-process", Mode: "batch", Profile: "batch"},
				scenario{Name: "embedded, in-process, filter (profiled)", Broker: "embedded", Gateway: "in-process", Mode: "filter", Profile: "filter"})
		}
		only := os.Getenv("BENCH_ONLY") // a substring of the scenario names to run
		for _, sc := range scenarios {
			if only != "" && !strings.Contains(sc.Name, only) {
				continue
			}
			step("end to end: " + sc.Name)
			r, err := runScenario(ctx, cfg, sc, bin, self, work)
			if err != nil {
				fmt.Fprintf(os.Stderr, "  %s: %v\n", sc.Name, err)
				r.Error = err.Error()
			}
			res.E2E = append(res.E2E, r)
			printE2E(os.Stderr, r)
		}
	}
	if !cfg.Skip["backlog"] {
		step(fmt.Sprintf("backlog %d vs %d with the uplink down, then drain", cfg.BacklogLo, cfg.BacklogHi))
		for _, mode := range []string{"filter", "batch"} {
			b, err := runBacklog(ctx, cfg, bin, work, mode)
			if err != nil {
				fmt.Fprintln(os.Stderr, "  backlog:", err)
				b.Error = err.Error()
			}
			res.Backlog = append(res.Backlog, b)
			if cfg.Quick {
				break
			}
		}
	}
	if !cfg.Skip["policy"] {
		step("policy scale")
		res.Policy = runPolicy(cfg)
	}
	if !cfg.Skip["radio"] {
		step("radio: MySensors frames through a pty into the queue")
		r, err := runRadio(ctx, cfg, work)
		if err != nil {
			fmt.Fprintln(os.Stderr, "  radio:", err)
			r.Error = err.Error()
		}
		res.Radio = r
	}
	if !cfg.Skip["micro"] {
		step("go test -bench (codecs, signing, queue, uplink)")
		res.Micro = runMicro(cfg)
	}
	res.Profiles = topProfiles(cfg)
	res.Elapsed = time.Since(res.Started).Round(time.Second).String()
	b, _ := json.MarshalIndent(res, "", "  ")
	if err := os.WriteFile(cfg.Out, append(b, '\n'), 0o644); err != nil {
		return err
	}
	printTable(os.Stdout, res)
	fmt.Fprintf(os.Stderr, "wrote %s (%s)\n", cfg.Out, res.Elapsed)
	return nil
}

// buildDaemon builds cmd/edgegate as it ships (static, stripped) into dir,
// with the build tags given (benchprofile: BENCH_PEERS_PROFILE).
func buildDaemon(dir string, tags ...string) (string, error) {
	bin := filepath.Join(dir, "edgegate")
	args := []string{"build", "-trimpath", "-ldflags", "-s -w -buildid=", "-o", bin}
	if len(tags) > 0 {
		args = append(args, "-tags", strings.Join(tags, ","))
	}
	build := exec.Command("go", append(args, "./cmd/edgegate")...)
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		return "", fmt.Errorf("build edgegate: %w", err)
	}
	return bin, nil
}

func splitComma(s string) []string {
	var out []string
	start := 0
	for i := 0; i <= len(s); i++ {
		if i == len(s) || s[i] == ',' {
			if i > start {
				out = append(out, s[start:i])
			}
			start = i + 1
		}
	}
	return out
}

// runProfSplit is `edgegate-bench profsplit [-readings N] profile...`:
// each profile's CPU by part (profParts).
func runProfSplit(args []string) error {
	fs := flag.NewFlagSet("profsplit", flag.ContinueOnError)
	readings := fs.Int64("readings", 0, "readings the profiled span handled: adds CPU ms per 1,000 readings")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() == 0 {
		return errors.New("usage: edgegate-bench profsplit [-readings N] profile.pprof [more profiles]")
	}
	for _, path := range fs.Args() {
		shares, total, err := splitProfile(path)
		if err != nil {
			return err
		}
		fmt.Printf("== %s\n", path)
		formatSplit(os.Stdout, shares, total, *readings)
	}
	return nil
}
