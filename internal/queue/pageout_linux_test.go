//go:build linux

package queue

import (
	"bufio"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/testkit"
	"golang.org/x/sys/unix"
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
	const n = 12000 // ~24 MB: three 8 MB value logs
	e := fillStore(t, q, "d1", n)
	body, _ := e.Seal(0)
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
	fillStore(b, q, "d1", 12000) // three 8 MB value logs
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
// takes page faults (something was mapped): an idle gateway neither reads
// /proc/self/maps nor pages anything out.
func TestPageOutLoopIdle(t *testing.T) {
	q := start(t, Options{Dir: t.TempDir(), MaxBatch: 256})
	fillStore(t, q, "d1", 200) // 400 KB: above pageOutQuiet
	testkit.Eventually(t, 5*time.Second, "a page-out once the writes stopped", func() bool { return q.pageOuts.Load() > 0 })
	// Idle, at most one page-out per stray burst of faults of the test
	// process that mapped pageOutQuiet of the store: none is expected.
	before := q.pageOuts.Load()
	time.Sleep(2 * time.Second) // a span of idleness, not a wait for an event
	if n := q.pageOuts.Load() - before; n > 2 {
		t.Fatalf("%d page-outs in two idle seconds, want at most 2", n)
	}
}

// faultLoop takes page faults until stop is closed, as a busy daemon does
// (fresh anonymous pages, touched once), so the page-out loop never sees
// the process quiet.
func faultLoop(t *testing.T, stop <-chan struct{}) {
	t.Helper()
	for {
		select {
		case <-stop:
			return
		default:
		}
		m, err := unix.Mmap(-1, 0, 64<<10, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANON)
		if err != nil {
			t.Error(err)
			return
		}
		for i := 0; i < len(m); i += 4096 {
			m[i] = 1
		}
		if err := unix.Munmap(m); err != nil {
			t.Error(err)
			return
		}
		time.Sleep(100 * time.Microsecond) // 16 faults per pass: a busy process
	}
}

// TestPageOutKeepsUnderBudget: while the process is busy (faulting) and
// the store's resident pages are under pageOutBudget, the value-log pages
// the drain reads next stay mapped; the rule before (a page-out every
// 25 ms once the process took 16 faults) dropped them, and the drain read
// them back from disk. Over the budget, they are paged out.
func TestPageOutKeepsUnderBudget(t *testing.T) {
	dir := t.TempDir()
	real, err := filepath.EvalSymlinks(dir)
	if err != nil {
		t.Fatal(err)
	}
	q := start(t, Options{Dir: dir, MaxBatch: 256})
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() { defer close(done); faultLoop(t, stop) }()
	defer func() { close(stop); <-done }()
	body := []byte(strings.Repeat("x", 2000)) // above the value threshold: into the vlog
	e := Entry{Broker: "https://a.example/v2", Device: "d1", Type: "Sensor",
		Seal: func(uint64) ([]byte, error) { return body, nil }}
	ctx := tctx(t)
	write := func(n int) {
		t.Helper()
		for i := 0; i < n; i++ {
			w, err := q.Enqueue(ctx, e)
			if err != nil {
				t.Fatal(err)
			}
			if i%256 == 255 || i == n-1 {
				if _, err := w(ctx); err != nil {
					t.Fatal(err)
				}
			}
		}
	}
	total := func() (sum int64) {
		for _, b := range vlogRSS(t, real) {
			sum += b
		}
		return sum
	}
	// The first look pages out what opening the store mapped, and sets the
	// floor the budget counts from.
	testkit.Eventually(t, 5*time.Second, "the first page-out", func() bool { return q.pageOuts.Load() > 0 })
	const under = pageOutBudget / 2 / 2000 // half the budget of readings
	write(under)
	// The readings are on the value log's pages, mapped by the writes; a
	// few looks of the loop later they are still there.
	looks := q.pageOutLooks.Load()
	testkit.Eventually(t, 5*time.Second, "ten looks of the page-out loop (the old rule paged out at the first)", func() bool {
		return q.pageOutLooks.Load() >= looks+10
	})
	if r := total(); r < pageOutBudget/4 {
		t.Fatalf("under the budget, busy: %d bytes of value log resident, want the ~%d written", r, under*2000)
	}
	// Over the budget: paged out, whatever the load. The rule weighs all
	// the process's file-backed pages against the floor; the value logs
	// alone are within the budget and what a look's interval maps.
	write(4 * pageOutBudget / 2000)
	testkit.Eventually(t, 5*time.Second, "the store's resident pages back within the budget", func() bool {
		return total() < 2*pageOutBudget
	})
	if q.pageOuts.Load() < 2 {
		t.Fatal("no page-out over the budget")
	}
}

func TestPageOutDue(t *testing.T) {
	const floor = 20 << 20
	for _, c := range []struct {
		faults, fileRSS int64
		want            bool
	}{
		{16, floor + pageOutBudget - 1, false},    // busy, under the budget: the drain's pages stay
		{1 << 20, floor + pageOutBudget/2, false}, // however many faults (the old rule paged out at 16)
		{16, floor + pageOutBudget, true},         // over the budget
		{0, floor + pageOutQuiet, true},           // quiet: what is resident goes
		{0, floor + pageOutQuiet - 1, false},      // ... unless too little to be worth it
		{0, floor - 1<<20, false},                 // below the floor (binary pages reclaimed)
	} {
		if got := pageOutDue(c.faults, c.fileRSS, floor); got != c.want {
			t.Errorf("pageOutDue(%d, floor%+d) = %v, want %v", c.faults, c.fileRSS-floor, got, c.want)
		}
	}
}

func TestNextFloor(t *testing.T) {
	for _, c := range []struct {
		floor, after int64
		quiet        bool
		want         int64
	}{
		{0, 20 << 20, false, 20 << 20},                      // the first page-out sets it
		{20 << 20, 21 << 20, false, 20 << 20},               // busy: what could not be dropped does not raise it
		{20 << 20, 19 << 20, false, 19 << 20},               // ... and it goes down
		{20 << 20, 22 << 20, true, 22 << 20},                // quiet: as measured (the binary's pages mapped since)
		{20 << 20, 20<<20 + pageOutBudget, false, 20 << 20}, // busy: not even the whole budget left (filter mode)
	} {
		if got := nextFloor(c.floor, c.after, c.quiet); got != c.want {
			t.Errorf("nextFloor(%d, %d, quiet %v) = %d, want %d", c.floor, c.after, c.quiet, got, c.want)
		}
	}
}

func TestParseStatmShared(t *testing.T) {
	page := int64(os.Getpagesize())
	for _, c := range []struct {
		in   string
		want int64
		err  bool
	}{
		{"12345 4567 3890 4100 0 8000 0\n", 3890 * page, false},
		{"1 2 0 3 0 4 0\n", 0, false},
		{"1 2", 0, true},
		{"1 2 x 4", 0, true},
		{"", 0, true},
	} {
		got, err := parseStatmShared([]byte(c.in))
		if (err != nil) != c.err || got != c.want {
			t.Errorf("parseStatmShared(%q) = %d, %v; want %d, error %v", c.in, got, err, c.want, c.err)
		}
	}
	// The real file, read twice through one descriptor.
	r, err := openFileRSS()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	for range 2 {
		if v, err := r.read(); err != nil || v <= 0 {
			t.Fatalf("read() = %d, %v; want the binary's resident pages at least", v, err)
		}
	}
}

// BenchmarkFileRSS is the cost of one look at the file-backed resident
// size (the page-out loop's, up to 40 a second while the process faults).
func BenchmarkFileRSS(b *testing.B) {
	r, err := openFileRSS()
	if err != nil {
		b.Fatal(err)
	}
	defer r.Close()
	for range b.N {
		if _, err := r.read(); err != nil {
			b.Fatal(err)
		}
	}
}
