//go:build linux

package queue

import (
	"bufio"
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/testkit"
)

// vlogRSS sums the resident bytes of this process's mappings of the value
// logs under dir, per file name (/proc/self/smaps).
func vlogRSS(t *testing.T, dir string) map[string]int64 {
	t.Helper()
	f, err := os.Open("/proc/self/smaps")
	if err != nil {
		t.Skipf("no /proc/self/smaps: %v", err)
	}
	defer f.Close()
	out := map[string]int64{}
	cur := ""
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		fields := strings.Fields(line)
		if len(fields) >= 5 && strings.Contains(fields[0], "-") && len(fields[1]) == 4 { // a mapping's first line
			cur = ""
			if len(fields) < 6 {
				continue // anonymous
			}
			if p := strings.Join(fields[5:], " "); filepath.Dir(p) == filepath.Clean(dir) && strings.HasSuffix(p, ".vlog") {
				cur = filepath.Base(p)
			}
			continue
		}
		if cur != "" && len(fields) == 3 && fields[0] == "Rss:" {
			kb, _ := strconv.ParseInt(fields[1], 10, 64)
			out[cur] += kb << 10
		}
	}
	return out
}

// TestPageOutOldLogs writes enough readings to fill several value-log
// files, then checks that the closed ones leave this process's RSS while
// the one being written stays, and that every reading still reads back.
func TestPageOutOldLogs(t *testing.T) {
	t.Run("absolute", func(t *testing.T) {
		dir := t.TempDir()
		testPageOut(t, dir, dir)
	})
	t.Run("through a symlink", func(t *testing.T) {
		// /proc/self/maps names the resolved path, not the one opened.
		real := t.TempDir()
		link := filepath.Join(t.TempDir(), "state")
		if err := os.Symlink(real, link); err != nil {
			t.Fatal(err)
		}
		testPageOut(t, link, real)
	})
}

// testPageOut opens the store at dir (which resolves to real) and checks
// the page-out.
func testPageOut(t *testing.T, dir, real string) {
	q := start(t, Options{Dir: dir, MaxBatch: 256})
	body := []byte(strings.Repeat("x", 2000)) // above the value threshold: into the vlog
	e := Entry{Broker: "https://a.example/v2", Device: "d1", Type: "Sensor",
		Seal: func(uint64) ([]byte, error) { return body, nil }}
	const n = 12000 // ~24 MB: three 8 MB value logs
	waits := make([]func(context.Context) (Item, error), 0, 256)
	ctx := tctx(t)
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
	// The queue's housekeeping pages closed logs out four times a second: within
	// a few seconds only the log being written stays resident.
	closed := func(m map[string]int64) (sum int64, newest string) {
		for name := range m {
			if newest == "" || name > newest { // fixed-width names: 000001.vlog
				newest = name
			}
		}
		for name, b := range m {
			if name != newest {
				sum += b
			}
		}
		return sum, newest
	}
	var rss map[string]int64
	var resident int64
	var newest string
	for range 50 {
		rss = vlogRSS(t, real)
		if resident, newest = closed(rss); len(rss) >= 2 && resident < 1<<20 {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if len(rss) < 2 {
		t.Fatalf("want several value logs mapped, got %v", rss)
	}
	if resident >= 1<<20 {
		t.Fatalf("closed value logs still hold %d resident bytes after 5s: %v", resident, rss)
	}
	// The log being written is paged out as well (the uplink reads fresh
	// readings from memory): once writes stop, it is not resident either.
	testkit.Poll(5*time.Second, func() bool { return vlogRSS(t, real)[newest] < 1<<20 })
	if r := vlogRSS(t, real)[newest]; r >= 1<<20 {
		t.Errorf("the log being written (%s) still holds %d resident bytes after writes stopped", newest, r)
	}
	t.Logf("resident value-log bytes: %v", rss)
	// Paged out is not lost: every reading reads back.
	items, err := q.Peek(Lane{e.Broker, e.Device}, n)
	if err != nil || len(items) != n {
		t.Fatalf("Peek after paging out = %d items, %v; want %d", len(items), err, n)
	}
	for _, it := range items {
		if string(it.Body) != string(body) {
			t.Fatalf("item %d: body of %d bytes differs", it.Seq, len(it.Body))
		}
	}
}

// BenchmarkPageOutStore is the cost of one page-out of a store with a few
// value logs (the loop runs it up to 20 times a second under load).
func BenchmarkPageOutStore(b *testing.B) {
	dir := b.TempDir()
	q := start(b, Options{Dir: dir, MaxBatch: 256})
	body := []byte(strings.Repeat("x", 2000))
	e := Entry{Broker: "https://a.example/v2", Device: "d1", Type: "Sensor",
		Seal: func(uint64) ([]byte, error) { return body, nil }}
	ctx := context.Background()
	for i := 0; i < 12000; i++ { // three 8 MB value logs
		w, err := q.Enqueue(ctx, e)
		if err != nil {
			b.Fatal(err)
		}
		if i%256 == 255 {
			if _, err := w(ctx); err != nil {
				b.Fatal(err)
			}
		}
	}
	real, _ := filepath.EvalSymlinks(dir)
	b.Run("maps+advise", func(b *testing.B) {
		for range b.N {
			if _, ok, err := pageOutStore(real); !ok || err != nil {
				b.Fatal(ok, err)
			}
		}
	})
	b.Run("advise", func(b *testing.B) { // the mappings read within pageOutMapsAge
		maps, err := storeMappings(real)
		if err != nil || len(maps) == 0 {
			b.Fatal(len(maps), err)
		}
		for range b.N {
			if _, ok, err := adviseOut(maps); !ok || err != nil {
				b.Fatal(ok, err)
			}
		}
	})
}

// TestPageOutLoopIdle: the page-out loop works only while the process
// takes page faults (something was mapped): an idle gateway does not read
// /proc/self/maps 20 times a second.
func TestPageOutLoopIdle(t *testing.T) {
	q := start(t, Options{Dir: t.TempDir(), MaxBatch: 256})
	body := []byte(strings.Repeat("x", 2000))
	e := Entry{Broker: "https://a.example/v2", Device: "d1", Type: "Sensor",
		Seal: func(uint64) ([]byte, error) { return body, nil }}
	ctx := tctx(t)
	for range 5 {
		w, err := q.Enqueue(ctx, e)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := w(ctx); err != nil {
			t.Fatal(err)
		}
	}
	testkit.Eventually(t, 5*time.Second, "a page-out after the writes", func() bool { return q.pageOuts.Load() > 0 })
	// Busy, the loop pages out every 50 ms (20 a second); idle, at most
	// once per stray fault of the test process and never more often than
	// every 250 ms.
	before := q.pageOuts.Load()
	time.Sleep(2 * time.Second) // a span of idleness, not a wait for an event
	if n := q.pageOuts.Load() - before; n > 5 {
		t.Fatalf("%d page-outs in two idle seconds, want at most 5 (stray faults of the test process)", n)
	}
}

func TestPageOutDue(t *testing.T) {
	for _, c := range []struct {
		faults int64
		since  time.Duration
		want   bool
	}{
		{0, time.Hour, false},                       // nothing mapped since
		{1, pageOutBusy, false},                     // a stray fault: wait for the idle period
		{1, pageOutIdle, true},                      // ... then page out
		{pageOutFaults, pageOutBusy, true},          // busy: every tick
		{pageOutFaults - 1, pageOutIdle - 1, false}, // below both
	} {
		if got := pageOutDue(c.faults, c.since); got != c.want {
			t.Errorf("pageOutDue(%d, %s) = %v, want %v", c.faults, c.since, got, c.want)
		}
	}
}
