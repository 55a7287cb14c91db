package queue

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/edgegate/edgegate/internal/metrics"
	"github.com/edgegate/edgegate/internal/testkit"
)

var testKey = bytes.Repeat([]byte{0x42}, 32)

func TestMain(m *testing.M) {
	code := m.Run()
	if code == 0 && os.Getenv(crashEnv) == "" {
		// Every goroutine Run and badger start must be gone once the
		// queues are closed.
		var leaked []string
		deadline := time.Now().Add(5 * time.Second)
		for {
			leaked = leakedGoroutines()
			if len(leaked) == 0 || time.Now().After(deadline) {
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
		if len(leaked) > 0 {
			fmt.Fprintf(os.Stderr, "goroutine leak:\n%s\n", strings.Join(leaked, "\n\n"))
			code = 1
		}
	}
	os.Exit(code)
}

// leakedGoroutines lists goroutines other than the test runner's own.
// badger.Open leaks its cache monitor and allocator pool when it fails
// (TestOpenRefusesBadKey's wrong key); those are badger's, not ours.
func leakedGoroutines() []string {
	buf := make([]byte, 1<<20)
	var out []string
	for _, g := range strings.Split(string(buf[:runtime.Stack(buf, true)]), "\n\n") {
		switch {
		case strings.Contains(g, "TestMain"),
			strings.Contains(g, "(*DB).monitorCache"),
			strings.Contains(g, "(*AllocatorPool).freeupAllocators"):
			continue
		}
		out = append(out, g)
	}
	return out
}

// running is a Queue with its Run loop, stopped and closed at cleanup.
type running struct {
	*Queue
	cancel context.CancelFunc
	done   chan error
}

func (r *running) stop(t testing.TB) {
	t.Helper()
	if r.cancel == nil {
		return
	}
	r.cancel()
	select {
	case err := <-r.done:
		if err != nil {
			t.Errorf("Run = %v, want nil", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return after cancel")
	}
	r.cancel = nil
	if err := r.Close(); err != nil {
		t.Errorf("Close = %v", err)
	}
}

func start(t testing.TB, opts Options) *running {
	t.Helper()
	if opts.Dir == "" {
		opts.Dir = t.TempDir()
	}
	if opts.Key == nil {
		opts.Key = testKey
	}
	q, err := Open(opts)
	if err != nil {
		t.Fatalf("Open = %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{Queue: q, cancel: cancel, done: make(chan error, 1)}
	go func() { r.done <- q.Run(ctx) }()
	t.Cleanup(func() { r.stop(t) })
	return r
}

func entry(broker, device string) Entry {
	return Entry{Broker: broker, Device: device, Type: "Sensor",
		Seal: func(seq uint64) ([]byte, error) { return fmt.Appendf(nil, `{"device":%q,"seq":%d}`, device, seq), nil }}
}

func tctx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func mustAppend(t testing.TB, q *running, e Entry) Item {
	t.Helper()
	it, err := q.Append(tctx(t), e)
	if err != nil {
		t.Fatalf("Append(%s) = %v", e.Device, err)
	}
	return it
}

func peekAll(t testing.TB, q *Queue, l Lane) []Item {
	t.Helper()
	items, err := q.Peek(l, 1<<20)
	if err != nil {
		t.Fatalf("Peek(%v) = %v", l, err)
	}
	return items
}

func seqs(items []Item) []uint64 {
	out := make([]uint64, len(items))
	for i, it := range items {
		out[i] = it.Seq
	}
	return out
}

func upTo(n uint64) []uint64 {
	out := make([]uint64, 0, n)
	for i := uint64(1); i <= n; i++ {
		out = append(out, i)
	}
	return out
}

func TestOrderPerLane(t *testing.T) {
	tests := []struct {
		name      string
		brokers   []string
		devices   []string
		perDevice int
		maxBatch  int
	}{
		{"one lane", []string{"https://a.example/v2"}, []string{"d1"}, 50, 0},
		{"many lanes concurrent", []string{"https://a.example/v2", "https://b.example/v2"}, []string{"d1", "d2", "d.3_x-y"}, 40, 0},
		{"batch of one", []string{"https://a.example/v2"}, []string{"d1", "d2"}, 20, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			q := start(t, Options{MaxBatch: tt.maxBatch})
			var wg sync.WaitGroup
			// A device is bound to one broker; spread devices over brokers.
			broker := func(i int) string { return tt.brokers[i%len(tt.brokers)] }
			for i, d := range tt.devices {
				wg.Go(func() {
					for range tt.perDevice {
						if _, err := q.Append(tctx(t), entry(broker(i), d)); err != nil {
							t.Errorf("Append(%s) = %v", d, err)
							return
						}
					}
				})
			}
			wg.Wait()
			for i, d := range tt.devices {
				l := Lane{Broker: broker(i), Device: d}
				items := peekAll(t, q.Queue, l)
				if got, want := seqs(items), upTo(uint64(tt.perDevice)); !slices.Equal(got, want) {
					t.Fatalf("Peek(%v) seqs = %v, want %v", l, got, want)
				}
				for _, it := range items {
					want := fmt.Sprintf(`{"device":%q,"seq":%d}`, d, it.Seq)
					if string(it.Body) != want || it.Broker != l.Broker || it.Device != d || it.Type != "Sensor" {
						t.Fatalf("item = %+v, want body %s", it, want)
					}
				}
				if last, err := q.LastSeq(d); err != nil || last != uint64(tt.perDevice) {
					t.Errorf("LastSeq(%s) = %d, %v, want %d", d, last, err, tt.perDevice)
				}
			}
		})
	}
}

func TestPeekLanesIndependent(t *testing.T) {
	q := start(t, Options{})
	a := Lane{Broker: "https://a.example/v2", Device: "dev"}
	b := Lane{Broker: "https://b.example/v2", Device: "dev"} // same device, other broker
	c := Lane{Broker: "https://a.example/v2", Device: "dev2"}
	for range 5 {
		mustAppend(t, q, entry(a.Broker, a.Device))
	}
	for range 3 {
		mustAppend(t, q, entry(c.Broker, c.Device))
	}
	mustAppend(t, q, entry(b.Broker, b.Device)) // seq 6: seqs are per device
	tests := []struct {
		lane Lane
		max  int
		want []uint64
	}{
		{a, 2, []uint64{1, 2}},
		{a, 100, []uint64{1, 2, 3, 4, 5}},
		{b, 10, []uint64{6}},
		{c, 10, []uint64{1, 2, 3}},
		{c, 0, nil},
		{Lane{Broker: "https://none.example", Device: "dev"}, 10, nil},
		{Lane{Broker: a.Broker, Device: "bad/id"}, 10, nil},
	}
	for _, tt := range tests {
		items, err := q.Peek(tt.lane, tt.max)
		if err != nil || !slices.Equal(seqs(items), tt.want) {
			t.Errorf("Peek(%v, %d) = %v, %v, want %v", tt.lane, tt.max, seqs(items), err, tt.want)
		}
	}
	// Peek does not consume: the same items again.
	if got := seqs(peekAll(t, q.Queue, a)); !slices.Equal(got, upTo(5)) {
		t.Errorf("second Peek(%v) = %v", a, got)
	}
}

func TestDeleteDeadLetterStatsConsistency(t *testing.T) {
	q := start(t, Options{})
	ba, bb := "https://a.example/v2", "https://b.example/v2"
	for _, d := range []string{"d1", "d2"} {
		for range 4 {
			mustAppend(t, q, entry(ba, d))
		}
	}
	mustAppend(t, q, entry(bb, "d3"))

	if got, want := q.Brokers(), []string{ba, bb}; !slices.Equal(got, want) {
		t.Fatalf("Brokers() = %v, want %v", got, want)
	}
	if got, want := q.Lanes(ba), []Lane{{ba, "d1"}, {ba, "d2"}}; !slices.Equal(got, want) {
		t.Fatalf("Lanes(a) = %v, want %v", got, want)
	}
	check := func(wantDepth map[string]int, wantDead int) {
		t.Helper()
		st := q.Stats()
		total := 0
		for _, b := range st.Brokers {
			total += b.Depth
			if b.Depth != wantDepth[b.Broker] {
				t.Errorf("Stats broker %s depth = %d, want %d", b.Broker, b.Depth, wantDepth[b.Broker])
			}
			// bytes must equal what Peek returns, re-encoded (version 2:
			// the version 1 layout plus a nonce and a GCM tag).
			var bytes int64
			var oldest time.Time
			for _, l := range q.Lanes(b.Broker) {
				for _, it := range peekAll(t, q.Queue, l) {
					bytes += int64(len(encodeItem(&it)) + nonceSize + 16)
					if oldest.IsZero() || it.Enqueued.Before(oldest) {
						oldest = it.Enqueued
					}
				}
			}
			if b.Bytes != bytes || !b.Oldest.Equal(oldest) {
				t.Errorf("Stats broker %s bytes, oldest = %d, %v, want %d, %v", b.Broker, b.Bytes, b.Oldest, bytes, oldest)
			}
		}
		for b, d := range wantDepth {
			if d > 0 && !slices.Contains(q.Brokers(), b) {
				t.Errorf("Brokers() = %v, missing %s", q.Brokers(), b)
			}
		}
		if st.Depth != total || st.DeadLetters != wantDead {
			t.Errorf("Stats depth, dead = %d, %d, want %d, %d", st.Depth, st.DeadLetters, total, wantDead)
		}
	}
	check(map[string]int{ba: 8, bb: 1}, 0)

	d1 := peekAll(t, q.Queue, Lane{ba, "d1"})
	if err := q.Delete(d1[:2]); err != nil {
		t.Fatalf("Delete = %v", err)
	}
	if err := q.Delete(d1[:2]); err != nil { // idempotent
		t.Fatalf("second Delete = %v", err)
	}
	check(map[string]int{ba: 6, bb: 1}, 0)
	if got := seqs(peekAll(t, q.Queue, Lane{ba, "d1"})); !slices.Equal(got, []uint64{3, 4}) {
		t.Errorf("after Delete, Peek = %v, want [3 4]", got)
	}

	if err := q.DeadLetter(d1[2], "http 422: unprocessable"); err != nil {
		t.Fatalf("DeadLetter = %v", err)
	}
	if err := q.DeadLetter(d1[2], "again"); !errors.Is(err, ErrNotFound) {
		t.Errorf("second DeadLetter = %v, want ErrNotFound", err)
	}
	check(map[string]int{ba: 5, bb: 1}, 1)

	d3 := peekAll(t, q.Queue, Lane{bb, "d3"})
	if err := q.Delete(d3); err != nil {
		t.Fatal(err)
	}
	if got := q.Brokers(); !slices.Equal(got, []string{ba}) {
		t.Errorf("Brokers() after draining b = %v", got)
	}
	if got := q.Lanes(bb); len(got) != 0 {
		t.Errorf("Lanes(b) after drain = %v", got)
	}
	check(map[string]int{ba: 5}, 1)

	var dls []DeadLetter
	err := q.DeadLetters(tctx(t), func(d DeadLetter) error { dls = append(dls, d); return nil })
	if err != nil || len(dls) != 1 {
		t.Fatalf("DeadLetters = %v, %v, want 1", dls, err)
	}
	if d := dls[0]; d.Device != "d1" || d.Seq != 3 || d.Reason != "http 422: unprocessable" ||
		d.Broker != ba || !bytes.Equal(d.Body, d1[2].Body) || d.At.IsZero() || !d.Enqueued.Equal(d1[2].Enqueued) {
		t.Errorf("dead letter = %+v", d)
	}
	stopErr := errors.New("stop")
	if err := q.DeadLetters(tctx(t), func(DeadLetter) error { return stopErr }); !errors.Is(err, stopErr) {
		t.Errorf("DeadLetters with failing fn = %v, want %v", err, stopErr)
	}
}

func TestChangedWakesWaiter(t *testing.T) {
	q := start(t, Options{})
	ch := q.Changed()
	select {
	case <-ch:
		t.Fatal("Changed closed before any commit")
	default:
	}
	woke := make(chan []Lane, 1)
	go func() {
		select {
		case <-ch:
			woke <- q.Lanes("https://a.example")
		case <-time.After(10 * time.Second):
			woke <- nil
		}
	}()
	mustAppend(t, q, entry("https://a.example", "d1"))
	if got := <-woke; len(got) != 1 {
		t.Fatalf("after wake-up, Lanes = %v, want the new lane", got)
	}
	if ch2 := q.Changed(); ch2 == ch {
		t.Error("Changed returned the closed channel again")
	}
}

func TestSealErrorIsolatesEntry(t *testing.T) {
	q := start(t, Options{MaxBatch: 64})
	const broker = "https://a.example"
	sealErr := errors.New("no key for device")
	var wg sync.WaitGroup
	var mu sync.Mutex
	var failed, ok int
	for i := range 40 {
		wg.Go(func() {
			e := entry(broker, "d1")
			if i%4 == 0 {
				e.Seal = func(uint64) ([]byte, error) { return nil, sealErr }
			}
			_, err := q.Append(tctx(t), e)
			mu.Lock()
			defer mu.Unlock()
			switch {
			case i%4 == 0 && errors.Is(err, sealErr):
				failed++
			case i%4 != 0 && err == nil:
				ok++
			default:
				t.Errorf("Append #%d = %v", i, err)
			}
		})
	}
	wg.Wait()
	if failed != 10 || ok != 30 {
		t.Fatalf("failed, ok = %d, %d, want 10, 30", failed, ok)
	}
	// A refused entry does not consume a seq: the 30 are 1..30.
	if got := seqs(peekAll(t, q.Queue, Lane{broker, "d1"})); !slices.Equal(got, upTo(30)) {
		t.Errorf("seqs = %v, want 1..30", got)
	}
}

func TestAppendValidation(t *testing.T) {
	q := start(t, Options{})
	tests := []struct {
		name string
		e    Entry
	}{
		{"no seal", Entry{Broker: "b", Device: "d"}},
		{"no broker", Entry{Device: "d", Seal: entry("", "").Seal}},
		{"bad device", Entry{Broker: "b", Device: "a/b", Seal: entry("", "").Seal}},
		{"empty device", Entry{Broker: "b", Seal: entry("", "").Seal}},
		{"nul in device", Entry{Broker: "b", Device: "a\x00", Seal: entry("", "").Seal}},
	}
	for _, tt := range tests {
		if _, err := q.Append(tctx(t), tt.e); err == nil {
			t.Errorf("%s: Append = nil, want error", tt.name)
		}
	}
}

func TestQuotaRefusesAppend(t *testing.T) {
	q := start(t, Options{QuotaBytes: 1})
	_, err := q.Append(tctx(t), entry("https://a.example", "d1"))
	if !errors.Is(err, ErrQuota) {
		t.Fatalf("Append over quota = %v, want ErrQuota", err)
	}
	if st := q.Stats(); st.Depth != 0 || st.QuotaBytes != 1 || st.DiskBytes < 1 {
		t.Errorf("Stats = %+v, want depth 0, quota 1, disk > 0", st)
	}
	if last, _ := q.LastSeq("d1"); last != 0 {
		t.Errorf("LastSeq after refusal = %d, want 0", last)
	}

	// A quota above the current size admits, and the refresh catches up
	// with growth.
	big := start(t, Options{QuotaBytes: 1 << 40})
	mustAppend(t, big, entry("https://a.example", "d1"))
	if st := big.Stats(); st.DiskBytes <= 0 {
		t.Errorf("DiskBytes = %d, want > 0", st.DiskBytes)
	}
}

func TestMapDiskFull(t *testing.T) {
	tests := []struct {
		err       error
		wantQuota bool
	}{
		{nil, false},
		{errors.New("boom"), false},
		{fmt.Errorf("write vlog: %w", syscall.ENOSPC), true},
		{&fs.PathError{Op: "write", Path: "/x/000001.vlog", Err: syscall.ENOSPC}, true},
		{errors.New("sync /x/00001.mem: no space left on device"), true}, // unwrapped by a dependency
		{syscall.EIO, false},
	}
	for _, tt := range tests {
		got := mapDiskFull(tt.err)
		if errors.Is(got, ErrQuota) != tt.wantQuota {
			t.Errorf("mapDiskFull(%v) = %v, ErrQuota %v, want %v", tt.err, got, errors.Is(got, ErrQuota), tt.wantQuota)
		}
		if tt.err != nil && !errors.Is(got, tt.err) {
			t.Errorf("mapDiskFull(%v) = %v, lost the cause", tt.err, got)
		}
	}
}

func TestClosedAfterCancel(t *testing.T) {
	q := start(t, Options{})
	mustAppend(t, q, entry("https://a.example", "d1"))
	q.stop(t)
	if _, err := q.Append(tctx(t), entry("https://a.example", "d1")); !errors.Is(err, ErrClosed) {
		t.Errorf("Append after Run returned = %v, want ErrClosed", err)
	}
}

func TestPendingAppendsFailWithErrClosed(t *testing.T) {
	// Appends waiting when Run stops are answered ErrClosed, not left hanging.
	q, err := Open(Options{Dir: t.TempDir(), Key: testKey, MaxBatch: 4})
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	errs := make(chan error, 8)
	for range 8 { // 4 fit the channel, 4 block sending
		go func() {
			_, err := q.Append(tctx(t), entry("https://a.example", "d1"))
			errs <- err
		}()
	}
	// Let them queue up before Run starts with an already cancelled ctx.
	deadline := time.Now().Add(5 * time.Second)
	for len(q.reqs) < cap(q.reqs) && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := q.Run(ctx); err != nil {
		t.Fatalf("Run = %v", err)
	}
	for range 8 {
		select {
		case err := <-errs:
			if !errors.Is(err, ErrClosed) {
				t.Errorf("pending Append = %v, want ErrClosed", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("pending Append not answered")
		}
	}
}

func TestReopenRestoresIndexAndCounters(t *testing.T) {
	dir := t.TempDir()
	const ba, bb = "https://a.example", "https://b.example"
	q := start(t, Options{Dir: dir})
	for range 5 {
		mustAppend(t, q, entry(ba, "d1"))
	}
	for range 3 {
		mustAppend(t, q, entry(bb, "d2"))
	}
	first := peekAll(t, q.Queue, Lane{ba, "d1"})
	if err := q.Delete(first[:2]); err != nil {
		t.Fatal(err)
	}
	if err := q.DeadLetter(first[2], "bad"); err != nil {
		t.Fatal(err)
	}
	before := q.Stats()
	q.stop(t)

	q2 := start(t, Options{Dir: dir})
	after := q2.Stats()
	after.DiskBytes, before.DiskBytes = 0, 0
	if fmt.Sprint(after) != fmt.Sprint(before) {
		t.Errorf("Stats after reopen = %+v, want %+v", after, before)
	}
	if got := q2.Brokers(); !slices.Equal(got, []string{ba, bb}) {
		t.Errorf("Brokers after reopen = %v", got)
	}
	if got := seqs(peekAll(t, q2.Queue, Lane{ba, "d1"})); !slices.Equal(got, []uint64{4, 5}) {
		t.Errorf("Peek d1 after reopen = %v, want [4 5]", got)
	}
	if it := mustAppend(t, q2, entry(ba, "d1")); it.Seq != 6 {
		t.Errorf("first seq after reopen = %d, want 6", it.Seq)
	}
	// Seqs continue even when the lane was drained before the restart.
	all := peekAll(t, q2.Queue, Lane{bb, "d2"})
	if err := q2.Delete(all); err != nil {
		t.Fatal(err)
	}
	q2.stop(t)
	q3 := start(t, Options{Dir: dir})
	if it := mustAppend(t, q3, entry(bb, "d2")); it.Seq != 4 {
		t.Errorf("seq after drained reopen = %d, want 4", it.Seq)
	}
	if last, err := q3.LastSeq("d1"); err != nil || last != 6 {
		t.Errorf("LastSeq(d1) = %d, %v, want 6", last, err)
	}
}

func TestPurgeDevice(t *testing.T) {
	q := start(t, Options{})
	const ba, bb = "https://a.example", "https://b.example"
	for range 4 {
		mustAppend(t, q, entry(ba, "victim"))
		mustAppend(t, q, entry(bb, "victim"))
		mustAppend(t, q, entry(ba, "other"))
	}
	n, err := q.PurgeDevice("victim")
	if err != nil || n != 8 {
		t.Fatalf("PurgeDevice = %d, %v, want 8", n, err)
	}
	if got := q.Lanes(ba); !slices.Equal(got, []Lane{{ba, "other"}}) {
		t.Errorf("Lanes(a) = %v", got)
	}
	if got := q.Brokers(); !slices.Equal(got, []string{ba}) {
		t.Errorf("Brokers = %v", got)
	}
	if st := q.Stats(); st.Depth != 4 {
		t.Errorf("Depth = %d, want 4", st.Depth)
	}
	if items := peekAll(t, q.Queue, Lane{ba, "victim"}); len(items) != 0 {
		t.Errorf("Peek after purge = %v", seqs(items))
	}
	// Seqs are never reused after a purge.
	if it := mustAppend(t, q, entry(ba, "victim")); it.Seq != 9 {
		t.Errorf("seq after purge = %d, want 9", it.Seq)
	}
	if n, err := q.PurgeDevice("nobody"); err != nil || n != 0 {
		t.Errorf("PurgeDevice(nobody) = %d, %v", n, err)
	}
}

func TestLargeBatchSplitsTransaction(t *testing.T) {
	// 48 bodies of 64 KB (3 MB) exceed one badger transaction (15% of the
	// 8 MB memtable), so the committer must split.
	q := start(t, Options{MaxBatch: 64})
	body := bytes.Repeat([]byte("x"), 64<<10)
	const broker = "https://a.example"
	var wg sync.WaitGroup
	for range 48 {
		wg.Go(func() {
			e := entry(broker, "big")
			e.Seal = func(uint64) ([]byte, error) { return body, nil }
			if _, err := q.Append(tctx(t), e); err != nil {
				t.Errorf("Append = %v", err)
			}
		})
	}
	wg.Wait()
	if got := seqs(peekAll(t, q.Queue, Lane{broker, "big"})); !slices.Equal(got, upTo(48)) {
		t.Errorf("seqs = %v, want 1..48", got)
	}
	if st := q.Stats(); st.Brokers[0].Bytes < 48*64<<10 {
		t.Errorf("bytes = %d, want >= %d", st.Brokers[0].Bytes, 48*64<<10)
	}
}

func TestEncryptionAtRest(t *testing.T) {
	dir := t.TempDir()
	const canary = "CANARY-7f3e9c1d-plaintext-must-not-reach-disk"
	q := start(t, Options{Dir: dir})
	for i := range 20 {
		e := entry("https://a.example/"+canary, "d1")
		e.Type = canary
		e.Seal = func(uint64) ([]byte, error) {
			// Small and large (value-log) bodies both.
			return []byte(strings.Repeat(canary, 1+i*10)), nil
		}
		mustAppend(t, q, e)
	}
	items := peekAll(t, q.Queue, Lane{"https://a.example/" + canary, "d1"})
	if err := q.DeadLetter(items[0], canary); err != nil {
		t.Fatal(err)
	}
	q.stop(t)
	var files int
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		files++
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		if bytes.Contains(b, []byte(canary)) || bytes.Contains(b, []byte("CANARY")) {
			t.Errorf("canary found in plaintext in %s", p)
		}
		return nil
	})
	if err != nil || files == 0 {
		t.Fatalf("walk %s = %v, %d files", dir, err, files)
	}
}

func TestOpenRefusesBadKey(t *testing.T) {
	for _, n := range []int{0, 16, 31, 33} {
		if _, err := Open(Options{Dir: t.TempDir(), Key: make([]byte, n)}); err == nil {
			t.Errorf("Open with %d-byte key = nil, want error", n)
		}
	}
	// The wrong key for an existing store is refused, not silently reset.
	dir := t.TempDir()
	q := start(t, Options{Dir: dir})
	mustAppend(t, q, entry("https://a.example", "d1"))
	q.stop(t)
	other := bytes.Repeat([]byte{7}, 32)
	if q2, err := Open(Options{Dir: dir, Key: other}); err == nil {
		q2.Close()
		t.Error("Open with another key = nil, want error")
	}
}

// TestPeekAndHeadAcrossGaps: Peek reads a lane by point reads from its head
// and falls back to an iterator at a gap; the head (and the oldest time in
// Stats) follows deliveries from the head and removals in the middle.
func TestPeekAndHeadAcrossGaps(t *testing.T) {
	q := start(t, Options{})
	b := "https://a.example/v2"
	l := Lane{b, "d1"}
	var items []Item
	for range 6 {
		items = append(items, mustAppend(t, q, entry(b, "d1")))
		time.Sleep(2 * time.Millisecond) // distinct enqueue times
	}
	oldest := func() time.Time {
		t.Helper()
		st := q.Stats()
		if len(st.Brokers) != 1 {
			t.Fatalf("Stats brokers = %+v", st.Brokers)
		}
		return st.Brokers[0].Oldest
	}
	if err := q.DeadLetter(items[2], "middle"); err != nil { // seq 3
		t.Fatal(err)
	}
	if got, err := q.Peek(l, 2); err != nil || !slices.Equal(seqs(got), []uint64{1, 2}) {
		t.Fatalf("Peek(2) = %v, %v, want [1 2]", seqs(got), err)
	}
	if got := seqs(peekAll(t, q.Queue, l)); !slices.Equal(got, []uint64{1, 2, 4, 5, 6}) {
		t.Fatalf("Peek across the gap = %v, want [1 2 4 5 6]", got)
	}
	if !oldest().Equal(items[0].Enqueued) {
		t.Errorf("oldest = %v, want item 1's %v", oldest(), items[0].Enqueued)
	}
	if err := q.Delete(items[:2]); err != nil { // delivered from the head, up to the gap
		t.Fatal(err)
	}
	if got, err := q.Peek(l, 1); err != nil || !slices.Equal(seqs(got), []uint64{4}) {
		t.Fatalf("Peek(1) after delivering 1-2 = %v, %v, want [4]", seqs(got), err)
	}
	if !oldest().Equal(items[3].Enqueued) {
		t.Errorf("oldest after delivering 1-2 = %v, want item 4's %v", oldest(), items[3].Enqueued)
	}
	if err := q.Delete(items[4:5]); err != nil { // seq 5, in the middle
		t.Fatal(err)
	}
	if got := seqs(peekAll(t, q.Queue, l)); !slices.Equal(got, []uint64{4, 6}) {
		t.Fatalf("Peek after removing 5 = %v, want [4 6]", got)
	}
	if !oldest().Equal(items[3].Enqueued) {
		t.Errorf("oldest after removing 5 = %v, want item 4's", oldest())
	}
	if err := q.Delete(items[3:4]); err != nil {
		t.Fatal(err)
	}
	if got, err := q.Peek(l, 3); err != nil || !slices.Equal(seqs(got), []uint64{6}) {
		t.Fatalf("Peek after delivering 4 = %v, %v, want [6]", seqs(got), err)
	}
	if !oldest().Equal(items[5].Enqueued) {
		t.Errorf("oldest = %v, want item 6's %v", oldest(), items[5].Enqueued)
	}
}

// TestCommitMetrics: every synced commit is counted with its readings and
// its time — the time an operator watches for a failing SD card.
func TestCommitMetrics(t *testing.T) {
	m := metrics.New()
	q := start(t, Options{Metrics: m})
	for range 5 {
		mustAppend(t, q, entry("https://b.example/v2", "th-1"))
	}
	hist := func(h prometheus.Histogram) (uint64, float64) {
		var d dto.Metric
		if err := h.Write(&d); err != nil {
			t.Fatal(err)
		}
		return d.GetHistogram().GetSampleCount(), d.GetHistogram().GetSampleSum()
	}
	// The metrics are observed right after the waits are answered.
	testkit.Eventually(t, 5*time.Second, "the last commit counted and timed", func() bool {
		commits, readings := hist(m.CommitBatch)
		timed, _ := hist(m.CommitSeconds)
		return readings == 5 && timed == commits
	})
	commits, readings := hist(m.CommitBatch)
	timed, seconds := hist(m.CommitSeconds)
	if commits == 0 || readings != 5 || timed != commits || seconds <= 0 {
		t.Fatalf("%d commits of %v readings, %d timed taking %vs; want every commit timed", commits, readings, timed, seconds)
	}
}

// TestPollDoesNotWait: a wait given a context already done answers at once
// — ErrNotYet, wrapping the context's error, while the reading's commit
// runs, consuming nothing — and gives the committed item once it is synced.
func TestPollDoesNotWait(t *testing.T) {
	q := start(t, Options{})
	release := make(chan struct{})
	e := entry("https://b.example/v2", "th-1")
	seal := e.Seal
	e.Seal = func(seq uint64) ([]byte, error) { <-release; return seal(seq) }
	wait, err := q.Enqueue(tctx(t), e)
	if err != nil {
		t.Fatal(err)
	}
	poll, done := context.WithCancel(context.Background())
	done()
	for range 3 {
		if _, err := wait(poll); !errors.Is(err, ErrNotYet) || !errors.Is(err, context.Canceled) {
			close(release)
			t.Fatalf("poll during the commit = %v, want ErrNotYet and context.Canceled", err)
		}
	}
	// mqtt's acker polls every reading it acknowledges: a poll allocates
	// nothing (no error formatted per reading).
	if n := testing.AllocsPerRun(100, func() { _, _ = wait(poll) }); n != 0 {
		close(release)
		t.Fatalf("a poll during the commit allocates %v times, want 0", n)
	}
	close(release)
	var it Item
	testkit.Eventually(t, 10*time.Second, "the polled item once committed", func() bool {
		var err error
		if it, err = wait(poll); err != nil && !errors.Is(err, ErrNotYet) {
			t.Fatalf("poll after the commit = %v", err)
		}
		return err == nil
	})
	if it.Seq != 1 || it.Device != "th-1" {
		t.Fatalf("polled item %+v", it)
	}
}
