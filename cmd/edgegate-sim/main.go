// Command edgegate-sim holds the simulators and the demo, kept out of the
// shipped edgegate binary (and out of the .deb): a gateway has no use for
// a simulated platform or a pseudo-terminal radio, and creack/pty leaves
// the binary with them.
//
//	edgegate-sim central-sim [flags]     run the simulated stock Snap4City platform
//	edgegate-sim radio-sim --link PATH   run a simulated MySensors radio gateway
//	edgegate-sim demo [--edgegate PATH]  run the demo (sim central, real daemon, devices)
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/edgegate/edgegate/internal/cliexit"
)

// exitError carries a process exit code through run.
type exitError = cliexit.Error

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	cliexit.Exit("edgegate-sim", err)
}

const usage = `usage: edgegate-sim <command> [flags]

commands:
  central-sim [flags]        run the simulated central service (OIDC + broker filter)
  radio-sim --link PATH      run a simulated MySensors serial gateway on a pseudo-terminal
  demo [--edgegate PATH]     run the demo: simulated central, real daemon, simulated devices
`

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return &exitError{Code: 2, Err: errors.New("")}
	}
	cmd, rest := args[0], args[1:]
	switch cmd {
	case "central-sim":
		return runCentralSim(ctx, rest, stdout, stderr)
	case "radio-sim":
		return runRadioSim(ctx, rest, stdout, stderr)
	case "demo":
		return runDemo(ctx, rest, stdout, stderr)
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return nil
	}
	fmt.Fprint(stderr, usage)
	return &exitError{Code: 2, Err: fmt.Errorf("unknown command %q", cmd)}
}

// toolLogger is the text logger of the simulator commands, at a level given
// on their command line (an unknown level is an error, not a silent info).
func toolLogger(w io.Writer, level string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level: %w", err)
	}
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: lv})), nil
}
