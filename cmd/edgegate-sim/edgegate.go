package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
)

// pairClientID is the OIDC client `edgegate pair` uses by default
// (defaultClientID in cmd/edgegate/pair.go: Snap4City's IoT Edge client);
// the demo's simulated realm enables the device grant on it.
const pairClientID = "nodered-iotedge"

// findEdgegate is the edgegate binary the demo drives: flagged, else the
// one next to this binary (`make build` puts both in bin/), else on PATH.
// The demo runs the shipped commands as a user would, not copies linked
// in here.
func findEdgegate(flagged string) (string, error) {
	if flagged != "" {
		if _, err := os.Stat(flagged); err != nil {
			return "", fmt.Errorf("--edgegate: %w", err)
		}
		return flagged, nil
	}
	if exe, err := os.Executable(); err == nil {
		next := filepath.Join(filepath.Dir(exe), "edgegate")
		if st, err := os.Stat(next); err == nil && !st.IsDir() {
			return next, nil
		} else if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return "", fmt.Errorf("edgegate next to %s: %w", exe, err)
		}
	}
	p, err := exec.LookPath("edgegate")
	if err != nil {
		return "", fmt.Errorf("no edgegate binary next to edgegate-sim or on PATH (make build, or --edgegate PATH): %w", err)
	}
	return p, nil
}

// runEdgegate runs `bin args...` with no input and waits for it; a non-zero
// exit is an *exec.ExitError (wrapped) carrying the status.
func runEdgegate(ctx context.Context, bin string, args []string, stdout, stderr io.Writer) error {
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Stdout, cmd.Stderr = stdout, stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("%s %s: %w", filepath.Base(bin), args[0], err)
	}
	return nil
}
