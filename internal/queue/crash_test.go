package queue

import (
	"bufio"
	"context"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"
)

const crashEnv = "EDGEGATE_QUEUE_CRASH_DIR"

var crashDevices = []string{"d0", "d1", "d2", "d3"}

const crashBroker = "https://crash.example/v2"

// TestHelperCrash is the child of TestCrashKeepsAckedItems: it appends
// forever from several goroutines and prints "device seq" for every
// acknowledged Append, until the parent kills it.
func TestHelperCrash(t *testing.T) {
	dir := os.Getenv(crashEnv)
	if dir == "" {
		t.Skip("helper process for TestCrashKeepsAckedItems")
	}
	key, err := hex.DecodeString(os.Getenv(crashEnv + "_KEY"))
	if err != nil {
		t.Fatal(err)
	}
	q, err := Open(Options{Dir: dir, Key: key})
	if err != nil {
		t.Fatal(err)
	}
	go q.Run(context.Background()) // killed, never stopped
	out := bufio.NewWriter(os.Stdout)
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, d := range crashDevices {
		wg.Go(func() {
			for {
				it, err := q.Append(context.Background(), entry(crashBroker, d))
				if err != nil {
					fmt.Fprintln(os.Stderr, "append:", err)
					os.Exit(3)
				}
				mu.Lock()
				// Flushed before the next Append: a printed line is an ack.
				fmt.Fprintf(out, "%s %d\n", it.Device, it.Seq)
				out.Flush()
				mu.Unlock()
			}
		})
	}
	wg.Wait()
}

func TestCrashKeepsAckedItems(t *testing.T) {
	if testing.Short() {
		t.Skip("subprocess test")
	}
	dir := t.TempDir()
	acked := make(map[string]uint64)
	for round := range 2 { // the second round also proves seqs continue after a crash
		cmd, stdout := startChild(t, "TestHelperCrash", crashEnv+"="+dir, crashEnv+"_KEY="+hex.EncodeToString(testKey))
		sc := bufio.NewScanner(stdout)
		lines := 0
		killAt := 1500 + round*700
		killed := false
		timer := time.AfterFunc(60*time.Second, func() { cmd.Process.Kill() })
		for sc.Scan() {
			var dev string
			var seq uint64
			if _, err := fmt.Sscanf(sc.Text(), "%s %d", &dev, &seq); err != nil {
				continue // e.g. "PASS" never comes: the child is killed
			}
			if seq <= acked[dev] && round == 0 {
				t.Errorf("round %d: seq %s/%d acked out of order (last %d)", round, dev, seq, acked[dev])
			}
			acked[dev] = max(acked[dev], seq)
			lines++
			if lines == killAt && !killed {
				// Mid-stream: appends are in flight in every goroutine.
				cmd.Process.Signal(syscall.SIGKILL)
				killed = true
			}
		}
		timer.Stop()
		cmd.Wait()
		if !killed {
			t.Fatalf("round %d: child exited after %d acks without being killed", round, lines)
		}
		t.Logf("round %d: %d acks read, last acked %v", round, lines, acked)

		q := start(t, Options{Dir: dir})
		for _, d := range crashDevices {
			got := seqs(peekAll(t, q.Queue, Lane{crashBroker, d}))
			if len(got) < int(acked[d]) {
				t.Fatalf("round %d: device %s has %d items after crash, acked up to %d", round, d, len(got), acked[d])
			}
			// No acked item lost and no gap: exactly 1..n with n >= acked.
			if want := upTo(uint64(len(got))); !slices.Equal(got, want) {
				t.Fatalf("round %d: device %s seqs not gap-free: %v", round, d, got)
			}
			if last, err := q.LastSeq(d); err != nil || last != uint64(len(got)) {
				t.Errorf("round %d: LastSeq(%s) = %d, %v, want %d", round, d, last, err, len(got))
			}
			acked[d] = uint64(len(got)) // unacked-but-committed items count as seen
		}
		q.stop(t)
	}
}

// startChild runs this test binary's test helper (a test that does its
// work only with env set, then waits to be killed) and returns it with
// its standard output.
func startChild(t *testing.T, helper string, env ...string) (*exec.Cmd, io.ReadCloser) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^"+helper+"$", "-test.count=1")
	cmd.Env = append(os.Environ(), env...)
	cmd.Stderr = os.Stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	return cmd, stdout
}
