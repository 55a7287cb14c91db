//go:build linux

package queue

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/edgegate/edgegate/internal/testkit"
)

// fillStore commits n readings of device with a 2,000-byte body (above
// the value threshold: into the value log) and returns the entry.
func fillStore(t testing.TB, q *running, device string, n int) Entry {
	t.Helper()
	body := []byte(strings.Repeat("x", 2000))
	e := Entry{Broker: "https://a.example/v2", Device: device, Type: "Sensor",
		Seal: func(uint64) ([]byte, error) { return body, nil }}
	ctx := tctx(t)
	waits := make([]func(context.Context) (Item, error), 0, 256)
	for i := 0; i < n; i++ {
		w, err := q.Enqueue(ctx, e)
		if err != nil {
			t.Fatal(err)
		}
		waits = append(waits, w)
		if len(waits) == cap(waits) || i == n-1 {
			for _, w := range waits {
				if _, err := w(ctx); err != nil {
					t.Fatal(err)
				}
			}
			waits = waits[:0]
		}
	}
	return e
}

// readBytes is what this process has had read from storage so far
// (/proc/self/io read_bytes: page faults on mapped files included).
func readBytes(t *testing.T) int64 {
	t.Helper()
	b, err := os.ReadFile("/proc/self/io")
	if err != nil {
		t.Fatalf("read /proc/self/io: %v", err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "read_bytes: "); ok {
			n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			if err != nil {
				t.Fatalf("read_bytes %q: %v", v, err)
			}
			return n
		}
	}
	t.Fatal("no read_bytes in /proc/self/io")
	return 0
}

// A page-out drops the value logs' pages from the process, not from the
// page cache: reading the store back after it reads nothing from the disk
// (with MADV_PAGEOUT, as before, the ~12 MB came back from the disk, and
// more than once for a drain of several lanes: docs/performance.md).
func TestPageOutKeepsLogsInPageCache(t *testing.T) {
	dir := t.TempDir()
	q := start(t, Options{Dir: dir, MaxBatch: 256})
	const n = 6000 // ~12 MB: two value logs, more than the held readings
	// No page-out by the loop while the store fills: one that found the
	// committer writing would evict (MADV_PAGEOUT, as it should), and the
	// read-back below would then read those pages from the disk.
	q.pageOut.mu.Lock()
	e := fillStore(t, q, "d1", n)
	q.pageOut.mu.Unlock()
	kept := q.pageOutsKept.Load()
	testkit.Eventually(t, 5*time.Second, "a page-out", q.pageOutNow)
	if q.pageOutsKept.Load() == kept {
		t.Fatal("the page-out evicted the logs with no call into the store under way")
	}
	real, err := filepath.EvalSymlinks(dir)
	if err != nil {
		t.Fatal(err)
	}
	var resident int64
	for _, b := range vlogRSS(t, real) {
		resident += b
	}
	if resident >= 1<<20 {
		t.Fatalf("value logs still hold %d resident bytes after the page-out", resident)
	}
	// The loop's own page-outs wait while this one is held (po.mu).
	q.pageOut.mu.Lock()
	defer q.pageOut.mu.Unlock()
	before := readBytes(t)
	items, err := q.Peek(Lane{e.Broker, e.Device}, n)
	if err != nil || len(items) != n {
		t.Fatalf("Peek = %d items, %v; want %d", len(items), err, n)
	}
	if read := readBytes(t) - before; read > 1<<20 {
		t.Errorf("reading the store back after the page-out read %d bytes from the disk, want the page cache", read)
	}
	for _, it := range items {
		if len(it.Body) != 2000 || it.Body[0] != 'x' {
			t.Fatalf("item %d: body of %d bytes differs", it.Seq, len(it.Body))
		}
	}
}

// While a call into the store is under way for longer than the page-out
// tries to lock, the page-out evicts as before (it never advises a range
// it has not listed under the lock), and calls into the store started
// meanwhile are not held back behind it.
func TestPageOutNeverHoldsBackTheStore(t *testing.T) {
	q := start(t, Options{Dir: t.TempDir(), MaxBatch: 256})
	fillStore(t, q, "d1", 3000)
	inView, release := make(chan struct{}), make(chan struct{})
	var released sync.Once
	end := func() { released.Do(func() { close(release) }) }
	defer end() // on a failure too: the store cannot close under an open view
	viewDone := make(chan error, 1)
	go func() {
		viewDone <- q.view(func(*badger.Txn) error {
			close(inView)
			<-release // an export streaming to a slow client
			return nil
		})
	}()
	<-inView
	kept, outs, misses := q.pageOutsKept.Load(), q.pageOuts.Load(), q.pageOutLockMisses.Load()
	// The loop's own page-outs wait while this test's runs (po.mu).
	q.pageOut.mu.Lock()
	paged := make(chan bool, 1)
	go func() {
		defer q.pageOut.mu.Unlock()
		paged <- q.pageOutLocked()
	}()
	// A write while the page-out tries to lock: done without waiting for
	// the view. With a plain Lock the page-out would be pending, and hold
	// every new call back until the view ended.
	testkit.Eventually(t, 5*time.Second, "the page-out trying to lock", func() bool { return q.pageOutLockMisses.Load() > misses })
	wrote := make(chan error, 1)
	go func() { wrote <- q.PutState("probe", []byte("1")) }()
	select {
	case err := <-wrote:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a write waited behind the page-out while a view was open")
	}
	select {
	case ok := <-paged:
		if !ok {
			t.Fatal("the page-out was not done")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the page-out did not give up waiting for the view")
	}
	if q.pageOuts.Load() == outs {
		t.Error("no page-out counted")
	}
	if q.pageOutsKept.Load() != kept {
		t.Error("the logs' pages were dropped (MADV_DONTNEED) while a view was open")
	}
	end()
	if err := <-viewDone; err != nil {
		t.Fatal(err)
	}
}

// Page-outs run without pause while the value log rotates (writes past
// 8 MB), value-log GC rewrites and deletes logs, and readers hold views:
// every reading left reads back whole.
func TestPageOutDuringRotationAndGC(t *testing.T) {
	q := start(t, Options{Dir: t.TempDir(), MaxBatch: 256})
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	defer func() { cancel(); wg.Wait() }()
	var kept int64
	wg.Go(func() {
		for ctx.Err() == nil {
			q.pageOutNow()
			time.Sleep(time.Millisecond) // the pace of the page-outs, not a wait for anything
		}
		kept = q.pageOutsKept.Load()
	})
	const n = 10000 // ~20 MB: the log rotates twice
	lane := Lane{"https://a.example/v2", "d1"}
	wg.Go(func() {
		for ctx.Err() == nil {
			if _, err := q.Peek(lane, 64); err != nil {
				t.Errorf("Peek: %v", err)
				return
			}
		}
	})
	fillStore(t, q, "d1", n)
	items, err := q.Peek(lane, n/2)
	if err != nil || len(items) != n/2 {
		t.Fatalf("Peek = %d items, %v", len(items), err)
	}
	if err := q.Delete(items); err != nil {
		t.Fatal(err)
	}
	q.runGC(tctx(t)) // rewrites and deletes value logs while page-outs go on
	left, err := q.Peek(lane, n)
	if err != nil || len(left) != n-n/2 {
		t.Fatalf("Peek after GC = %d items, %v; want %d", len(left), err, n-n/2)
	}
	want := bytes.Repeat([]byte("x"), 2000)
	for _, it := range left {
		if !bytes.Equal(it.Body, want) {
			t.Fatalf("item %d: body differs after page-outs during rotation and GC", it.Seq)
		}
	}
	cancel()
	wg.Wait()
	if kept == 0 {
		t.Error("no page-out dropped the logs' pages (MADV_DONTNEED) in all that time")
	}
	t.Logf("page-outs: %d, of which kept the page cache: %d", q.pageOuts.Load(), kept)
}
