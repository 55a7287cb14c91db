package main

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/pipeline"
	"github.com/edgegate/edgegate/radio"
)

type radioSimSub struct {
	mu      sync.Mutex
	devices map[string]int
}

func (s *radioSimSub) Submit(ctx context.Context, msg pipeline.Message) (pipeline.Outcome, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.devices[msg.Device]++
	return pipeline.Queued, nil
}

func (s *radioSimSub) count(dev string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.devices[dev]
}

type radioSimBinder struct{ link string }

func (b radioSimBinder) BindRadio(port string, node, child int) (string, bool) {
	if port == b.link && child == -1 && (node == 1 || node == 2) {
		return []string{"", "th-1", "th-2"}[node], true
	}
	return "", false
}

// The subcommand serves a real serial port that the radio manager reads,
// including the node that asks for its id, and cleans up on cancel.
func TestRunRadioSim(t *testing.T) {
	link := filepath.Join(t.TempDir(), "ttyRADIO")
	var stdout, stderr lockedBuffer
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() {
		done <- runRadioSim(ctx, []string{"--link", link, "--nodes", "2", "--interval", "30ms", "--garbage", "--seed", "3"}, &stdout, &stderr)
	}()
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, err := os.Lstat(link); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("link %s not created; stderr: %s", link, stderr.String())
		}
		time.Sleep(10 * time.Millisecond)
	}

	sub := &radioSimSub{devices: map[string]int{}}
	m, err := radio.NewManager([]radio.PortConfig{{Path: link, ReadTimeout: 100 * time.Millisecond}}, sub,
		radioSimBinder{link: link}, radio.Options{StateDir: t.TempDir(), MinBackoff: 20 * time.Millisecond, MaxBackoff: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	mctx, mcancel := context.WithCancel(context.Background())
	mdone := make(chan error, 1)
	go func() { mdone <- m.Run(mctx) }()
	deadline = time.Now().Add(10 * time.Second)
	for sub.count("th-1") < 3 || sub.count("th-2") < 3 {
		if time.Now().After(deadline) {
			t.Fatalf("readings th-1 %d th-2 %d; ports %+v", sub.count("th-1"), sub.count("th-2"), m.Ports())
		}
		time.Sleep(10 * time.Millisecond)
	}
	mcancel()
	if err := <-mdone; err != nil {
		t.Fatalf("manager Run = %v", err)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("runRadioSim = %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("runRadioSim did not return after cancel")
	}
	if _, err := os.Lstat(link); err == nil {
		t.Errorf("link %s left behind", link)
	}
	if out := stdout.String(); !strings.Contains(out, "ids assigned [2]") {
		t.Errorf("stdout = %q, want the id assigned to the second node", out)
	}
}

func TestRunRadioSimUsage(t *testing.T) {
	var stdout, stderr lockedBuffer
	err := runRadioSim(context.Background(), nil, &stdout, &stderr)
	if err == nil || !strings.Contains(err.Error(), "--link") {
		t.Fatalf("runRadioSim() without --link = %v", err)
	}
	// Refuses to clobber something that is not a symlink (a real tty).
	file := filepath.Join(t.TempDir(), "ttyUSB0")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	err = runRadioSim(context.Background(), []string{"--link", file}, &stdout, &stderr)
	if err == nil || errors.Is(err, context.Canceled) || !strings.Contains(err.Error(), "not a symlink") {
		t.Fatalf("runRadioSim(--link regular file) = %v", err)
	}
}
