package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"time"

	"github.com/edgegate/edgegate/internal/sim/radiosim"
)

// runRadioSim runs a simulated MySensors serial gateway on a
// pseudo-terminal whose gateway side appears at --link, until ctx ends:
//
//	edgegate-sim radio-sim --link /tmp/ttyRADIO --nodes 2 --interval 1s [--garbage]
//
// Point a radio port of the daemon at the link (codec mysensors).
func runRadioSim(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("radio-sim", flag.ContinueOnError)
	fs.SetOutput(stderr)
	link := fs.String("link", "", "`path` of the symlink to the gateway side of the pty (required)")
	nodes := fs.Int("nodes", 1, "sensor nodes behind the gateway (temperature and humidity each)")
	interval := fs.Duration("interval", time.Second, "time between readings")
	firstID := fs.Int("first-id", 1, "node id of the first node")
	autoID := fs.Int("auto-id", 0, "nodes that start without an id and ask the controller (default 1 when --nodes > 1; -1: none)")
	garbage := fs.Bool("garbage", false, "mix in hostile traffic (random bytes, over-long lines, bad fields)")
	seed := fs.Uint64("seed", 0, "random seed for values and garbage (0: random)")
	logLevel := fs.String("log-level", "info", "debug, info, warn or error")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: edgegate-sim radio-sim --link PATH [flags]\n\nSimulate a MySensors serial gateway with nodes behind it, on a pseudo-terminal.\n\nflags:")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("radio-sim: unexpected arguments: %q", fs.Args())
	}
	if *link == "" {
		fs.Usage()
		return errors.New("radio-sim: --link is required")
	}
	if *interval <= 0 {
		return fmt.Errorf("radio-sim: --interval must be positive: %s", *interval)
	}
	logger, err := toolLogger(stderr, *logLevel)
	if err != nil {
		return fmt.Errorf("radio-sim: %w", err)
	}
	sim, err := radiosim.New(radiosim.Options{Link: *link, Nodes: *nodes, FirstID: *firstID, AutoID: *autoID,
		Interval: *interval, Garbage: *garbage, Seed: *seed, Logger: logger})
	if err != nil {
		return fmt.Errorf("radio-sim: %w", err)
	}
	fmt.Fprintf(stdout, "radio-sim: MySensors serial gateway with %d node(s) at %s (115200 baud, codec mysensors)\n", *nodes, sim.Link())
	err = sim.Run(ctx)
	st := sim.Stats()
	fmt.Fprintf(stdout, "radio-sim: sent %d lines (%d garbage, %d dropped); ids assigned %v; answers: time %d, config %d, req %d\n",
		st.Lines, st.Garbage, st.WritesDropped, st.AssignedIDs, st.TimeAnswers, st.ConfigAnswers, st.ReqAnswers)
	return err
}
