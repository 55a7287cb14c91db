// Command edgegate is the IoT gateway daemon and its tools, in one binary.
//
//	edgegate run --config FILE        run the gateway
//	edgegate config template          print a commented configuration
//	edgegate config check --config F  validate a configuration
//	edgegate verify [flags] [FILE]    verify a signed reading or entity
//	edgegate version                  print the version
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	iofs "io/fs"
	"log/slog"
	"os"
	"os/signal"
	"runtime/debug"
	"syscall"

	"github.com/edgegate/edgegate/internal/cliexit"
	"github.com/edgegate/edgegate/internal/config"
	"github.com/edgegate/edgegate/internal/daemon"
)

// exitError carries a process exit code through run.
type exitError = cliexit.Error

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdin, os.Stdout, os.Stderr)
	stop()
	cliexit.Exit("edgegate", err)
}

const usage = `usage: edgegate <command> [flags]

commands:
  run --config FILE          run the gateway daemon
  config template            print a commented example configuration
  config check --config FILE validate a configuration file
  status [--json]            show the running gateway (admin socket)
  doctor                     check the installation; exit 0 only when all is well
  data export|erase          export or erase a device's or an owner's data
  factory-reset              wipe state and credentials, back to unpaired
  pair --central URL [flags] pair with the central service (device grant, QR code)
  unpair [--config FILE]     revoke the tokens and wipe the pairing
  device add|list|remove     register devices in the central IoT directory
  app add|remove|list        app accounts on an external Mosquitto (dynsec)
  verify [flags] [FILE|-]    verify a signed reading (compact JWS) or an NGSI entity
  version                    print the version
`

func run(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return &exitError{Code: 2, Err: errors.New("")}
	}
	cmd, rest := args[0], args[1:]
	switch cmd {
	case "run":
		return runDaemon(ctx, rest, stderr)
	case "config":
		return runConfig(rest, stdout, stderr)
	case "verify":
		return runVerify(ctx, rest, stdin, stdout, stderr)
	case "status":
		return runStatus(ctx, rest, stdout, stderr)
	case "doctor":
		return runDoctor(ctx, rest, stdout, stderr)
	case "data":
		return runData(ctx, rest, stdin, stdout, stderr)
	case "factory-reset":
		return runFactoryReset(ctx, rest, stdin, stdout, stderr)
	case "pair":
		return runPair(ctx, rest, stdin, stdout, stderr)
	case "unpair":
		return runUnpair(ctx, rest, stdin, stdout, stderr)
	case "device":
		return runDevice(ctx, rest, stdin, stdout, stderr)
	case "app":
		return runApp(ctx, rest, stdout, stderr)
	case "version", "--version":
		fmt.Fprintln(stdout, "edgegate", daemon.Version)
		return nil
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return nil
	}
	fmt.Fprint(stderr, usage)
	return &exitError{Code: 2, Err: fmt.Errorf("unknown command %q", cmd)}
}

func newLogger(w io.Writer, level, format string) (*slog.Logger, *slog.LevelVar) {
	var lv slog.Level
	_ = lv.UnmarshalText([]byte(level))
	v := new(slog.LevelVar)
	v.Set(lv)
	opts := &slog.HandlerOptions{Level: v}
	if format == "json" {
		return slog.New(slog.NewJSONHandler(w, opts)), v
	}
	return slog.New(slog.NewTextHandler(w, opts)), v
}

func runDaemon(ctx context.Context, args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("run", flag.ContinueOnError)
	fs.SetOutput(stderr)
	path := fs.String("config", "/etc/edgegate/edgegate.yaml", "configuration file")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if _, err := os.Stat(*path); errors.Is(err, iofs.ErrNotExist) {
		return &exitError{Code: exitNotConfigured, Err: fmt.Errorf("no configuration at %s: %w", *path, daemon.ErrNotConfigured)}
	}
	cfg, err := config.Load(*path)
	if config.MissingCentral(err) {
		return &exitError{Code: exitNotConfigured, Err: fmt.Errorf("%w\n%w", err, daemon.ErrNotConfigured)}
	}
	if err != nil {
		return &exitError{Code: 2, Err: err}
	}
	log, levels := newLogger(stderr, cfg.Log.Level, cfg.Log.Format)
	if os.Getenv("GOMEMLIMIT") == "" && cfg.MemoryLimit > 0 {
		debug.SetMemoryLimit(int64(cfg.MemoryLimit))
	}
	d := daemon.New(cfg, log)
	d.SetLevelVar(levels)
	err = d.Run(ctx)
	if errors.Is(err, daemon.ErrNotConfigured) {
		return &exitError{Code: exitNotConfigured, Err: err}
	}
	return err
}

// exitNotConfigured is the exit status of `edgegate run` on a gateway that
// is not paired or configured: EX_CONFIG of sysexits.h. The unit's
// RestartPreventExitStatus=78 keeps systemd from restarting it in a loop
// until the installer pairs it. A bad value in the configuration keeps
// exit status 2, as before.
const exitNotConfigured = 78

func runConfig(args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		return &exitError{Code: 2, Err: errors.New("usage: edgegate config template | check --config FILE")}
	}
	switch args[0] {
	case "template":
		_, err := io.WriteString(stdout, config.Template)
		return err
	case "check":
		fs := flag.NewFlagSet("config check", flag.ContinueOnError)
		fs.SetOutput(stderr)
		path := fs.String("config", "/etc/edgegate/edgegate.yaml", "configuration file")
		socket := fs.String("socket", "", "the running daemon's admin socket (default: admin.socket of the file)")
		if err := fs.Parse(args[1:]); err != nil {
			return err
		}
		cfg, err := config.Load(*path)
		if err != nil {
			return &exitError{Code: 2, Err: err}
		}
		// The file-permission rules of `run` (issue 17): a secret file
		// run would refuse fails the check too.
		if err := cfg.CheckSecretFiles(os.Getenv); err != nil {
			return &exitError{Code: 2, Err: fmt.Errorf("check config %s: %w", *path, err)}
		}
		fmt.Fprintf(stdout, "%s: valid (%d devices, mqtt %s)\n", *path, len(cfg.Devices), cfg.MQTT.Mode)
		if cfg.Policy.Source == config.PolicyOwnership {
			if *socket == "" {
				*socket = cfg.Admin.Socket
			}
			checkPlatformDevices(*socket, stdout)
		}
		return nil
	}
	return &exitError{Code: 2, Err: fmt.Errorf("unknown config command %q (template, check)", args[0])}
}
