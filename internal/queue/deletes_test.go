package queue

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// BenchmarkDeleteHeads: what the uplink pays per delivered reading to
// delete it, in filter mode's pattern: each round commits one reading per
// lane for 16 lanes, then deletes the 16 heads — one Delete per reading
// (group=1) or one for all 16 (group=16), the heads still held in memory
// as a settled reading is (held), or dropped from it first so that
// Delete reads each back (readback: what every Delete did before
// deletes.go). Only the deletes are timed; cpu-ms/1k is the process's CPU
// during them. BENCH_DELETE_PREFILL=n first delivers n readings, so that
// the deletes run against a store with tables on disk, as a gateway's
// does.
//
//	go test -run '^$' -bench DeleteHeads -benchmem ./internal/queue/
//	BENCH_DELETE_PREFILL=100000 go test -run '^$' -bench DeleteHeads -benchtime 8000x ./internal/queue/
func BenchmarkDeleteHeads(b *testing.B) {
	prefill := 0
	if v, err := strconv.Atoi(os.Getenv("BENCH_DELETE_PREFILL")); err == nil {
		prefill = v
	}
	for _, tc := range []struct {
		group int
		held  bool
	}{{1, false}, {16, false}, {1, true}, {16, true}} {
		name := fmt.Sprintf("readback/group=%d", tc.group)
		if tc.held {
			name = fmt.Sprintf("held/group=%d", tc.group)
		}
		b.Run(name, func(b *testing.B) {
			q := start(b, Options{})
			const devices = 16
			lanes := make([]Lane, devices)
			entries := make([]Entry, devices)
			for d := range devices {
				lanes[d] = Lane{Broker: "https://a.example/v2", Device: fmt.Sprintf("dev%02d", d)}
				entries[d] = Entry{Broker: lanes[d].Broker, Device: lanes[d].Device, Type: "Sensor",
					Seal: func(uint64) ([]byte, error) { return benchBody, nil }}
			}
			// A store that has delivered readings for a while: its deletes
			// flushed to tables on several levels, where a read that
			// misses the memtables goes looking.
			for r := range prefill / devices {
				appendEach(b, q, entries)
				if r%16 == 15 {
					for _, l := range lanes {
						items, err := q.Peek(l, 16)
						if err != nil {
							b.Fatal(err)
						}
						if err := q.Delete(items); err != nil {
							b.Fatal(err)
						}
					}
				}
			}
			b.ReportAllocs()
			b.ResetTimer()
			var cpu time.Duration
			heads := make([]Item, 0, devices)
			for n := 0; n < b.N; n += devices {
				b.StopTimer()
				appendEach(b, q, entries)
				heads = heads[:0]
				for _, l := range lanes {
					items, err := q.Peek(l, 1)
					if err != nil || len(items) != 1 {
						b.Fatalf("Peek = %d items, %v", len(items), err)
					}
					heads = append(heads, items[0])
				}
				if !tc.held {
					q.releaseAll()
				}
				b.StartTimer()
				cpu0 := processCPU()
				for i := 0; i < devices; i += tc.group {
					if err := q.Delete(heads[i:min(i+tc.group, devices)]); err != nil {
						b.Fatal(err)
					}
				}
				cpu += processCPU() - cpu0
			}
			b.StopTimer()
			b.ReportMetric(float64(cpu)/1e6/float64(b.N)*1000, "cpu-ms/1k")
		})
	}
}

// TestDeleteHeadsOfManyLanes: the uplink deletes what settled together —
// the heads of many lanes in one Delete (internal/uplink/settle.go). Each
// lane then peeks its next reading, the counts follow, a repeated Delete
// is harmless, and after a restart the deleted readings stay gone and
// every undelivered one is there, in order.
func TestDeleteHeadsOfManyLanes(t *testing.T) {
	dir := t.TempDir()
	q := start(t, Options{Dir: dir})
	const broker, lanes, each = "https://a.example/v2", 16, 5
	var ls []Lane
	for d := range lanes {
		l := Lane{Broker: broker, Device: fmt.Sprintf("dev%02d", d)}
		ls = append(ls, l)
		for range each {
			mustAppend(t, q, entry(broker, l.Device))
		}
	}
	for round := 1; round <= 3; round++ {
		var heads []Item
		for _, l := range ls {
			items, err := q.Peek(l, 1)
			if err != nil || len(items) != 1 {
				t.Fatalf("round %d: Peek(%s) = %d items, %v", round, l.Device, len(items), err)
			}
			heads = append(heads, items[0])
		}
		if err := q.Delete(heads); err != nil {
			t.Fatalf("round %d: Delete of %d heads = %v", round, len(heads), err)
		}
		if err := q.Delete(heads); err != nil { // a repeated Delete is harmless
			t.Fatalf("round %d: repeated Delete = %v", round, err)
		}
		for _, l := range ls {
			if got, want := seqs(peekAll(t, q.Queue, l)), upTo(each)[round:]; !slices.Equal(got, want) {
				t.Fatalf("round %d: %s holds %v, want %v", round, l.Device, got, want)
			}
		}
		if st := q.Stats(); st.Depth != lanes*(each-round) {
			t.Fatalf("round %d: depth %d, want %d", round, st.Depth, lanes*(each-round))
		}
	}
	q.stop(t)

	q = start(t, Options{Dir: dir})
	for _, l := range ls {
		if got, want := seqs(peekAll(t, q.Queue, l)), upTo(each)[3:]; !slices.Equal(got, want) {
			t.Fatalf("after restart %s holds %v, want %v", l.Device, got, want)
		}
	}
	if st := q.Stats(); st.Depth != lanes*(each-3) {
		t.Fatalf("after restart: depth %d, want %d", st.Depth, lanes*(each-3))
	}
}

// TestSealedSizeMatchesSealItem: Delete counts a held item's value
// as sealedSize; it must be what sealItem stored, whatever the lengths
// (one- and two-byte varint prefixes included).
func TestSealedSizeMatchesSealItem(t *testing.T) {
	dk, err := newDataKey(bytes.Repeat([]byte{7}, 32), false)
	if err != nil {
		t.Fatal(err)
	}
	nonce := make([]byte, nonceSize)
	for _, n := range []int{0, 1, 127, 128, 300, 16383, 16384, 70000} {
		it := Item{Broker: "https://a.example/" + strings.Repeat("b", n%200), Device: "dev", Seq: uint64(n),
			Type: strings.Repeat("t", n%131), Service: strings.Repeat("s", n%7), ServicePath: "/" + strings.Repeat("p", n%300),
			Enqueued: time.Now(), Body: bytes.Repeat([]byte("x"), n)}
		if got, want := sealedSize(&it), int64(len(sealItem(&it, dk.aead, nonce))); got != want {
			t.Fatalf("body %d bytes: sealedSize = %d, sealItem stored %d", n, got, want)
		}
	}
}

// TestDeleteHeldAndReadBack: deleted items never come back from Peek,
// the lane counts and byte totals stay exact whether an item was held in
// memory (deleted without a read) or not (read back: a backlog larger than
// what is held), a repeated or duplicated item is deleted once, and after
// a restart what was deleted stays gone and everything else is there.
func TestDeleteHeldAndReadBack(t *testing.T) {
	dir := t.TempDir()
	q := start(t, Options{Dir: dir})
	const broker = "https://a.example/v2"
	big := bytes.Repeat([]byte("b"), 64<<10)
	lanes := []Lane{{broker, "held"}, {broker, "backlog"}}
	for range 4 {
		mustAppend(t, q, entry(broker, "held"))
	}
	// 40 × 64 KiB: more than recentBytes, so the first are not held.
	for range 40 {
		mustAppend(t, q, Entry{Broker: broker, Device: "backlog", Type: "Sensor",
			Seal: func(uint64) ([]byte, error) { return big, nil }})
	}
	check := func(when string, want map[string][]uint64) {
		t.Helper()
		var depth int
		var size int64
		for _, l := range lanes {
			items := peekAll(t, q.Queue, l)
			if got := seqs(items); !slices.Equal(got, want[l.Device]) {
				t.Fatalf("%s: %s holds %v, want %v", when, l.Device, got, want[l.Device])
			}
			depth += len(items)
			for i := range items {
				size += sealedSize(&items[i])
			}
		}
		st := q.Stats()
		var bytes int64
		for _, b := range st.Brokers {
			bytes += b.Bytes
		}
		// Delete's read counts badger's ValueSize for values kept in the
		// value log, which can be off by a byte or so per item.
		if st.Depth != depth || bytes < size-64 || bytes > size+64 {
			t.Fatalf("%s: Stats depth %d, bytes %d; want %d, %d", when, st.Depth, bytes, depth, size)
		}
	}
	want := map[string][]uint64{"held": upTo(4), "backlog": upTo(40)}
	check("before", want)

	held := peekAll(t, q.Queue, lanes[0])
	back := peekAll(t, q.Queue, lanes[1])
	// Two heads of each lane, the held one given twice.
	if err := q.Delete([]Item{held[0], back[0], held[1], held[0], back[1]}); err != nil {
		t.Fatalf("Delete = %v", err)
	}
	want = map[string][]uint64{"held": upTo(4)[2:], "backlog": upTo(40)[2:]}
	check("after Delete", want)
	if err := q.Delete([]Item{held[0], back[0]}); err != nil { // already gone
		t.Fatalf("repeated Delete = %v", err)
	}
	check("after a repeated Delete", want)
	// The newest of the backlog are held: settle them from the tail end.
	if err := q.Delete(back[2:]); err != nil {
		t.Fatalf("Delete of the backlog = %v", err)
	}
	want["backlog"] = nil
	check("backlog drained", want)
	q.stop(t)

	q = start(t, Options{Dir: dir})
	check("after restart", want)
}

const settleCrashEnv = "EDGEGATE_QUEUE_SETTLE_CRASH_DIR"

// TestHelperSettleCrash is the child of TestCrashDuringDelete: it
// appends from several goroutines, printing "a device seq" for every
// acknowledged Append, while a settler deletes the lanes' heads in shared
// Delete calls, printing "p device seq" before each call and
// "d device seq" once it returned, until the parent kills it.
func TestHelperSettleCrash(t *testing.T) {
	dir := os.Getenv(settleCrashEnv)
	if dir == "" {
		t.Skip("helper process for TestCrashDuringDelete")
	}
	q, err := Open(Options{Dir: dir, Key: testKey})
	if err != nil {
		t.Fatal(err)
	}
	go q.Run(context.Background()) // killed, never stopped
	var mu sync.Mutex
	out := bufio.NewWriter(os.Stdout)
	print := func(kind, device string, seq uint64) {
		mu.Lock()
		defer mu.Unlock()
		// Flushed before the call goes on: a printed line happened.
		fmt.Fprintf(out, "%s %s %d\n", kind, device, seq)
		out.Flush()
	}
	for _, d := range crashDevices {
		go func() {
			for {
				it, err := q.Append(context.Background(), entry(crashBroker, d))
				if err != nil {
					fmt.Fprintln(os.Stderr, "append:", err)
					os.Exit(3)
				}
				print("a", it.Device, it.Seq)
			}
		}()
	}
	for {
		var heads []Item
		for _, d := range crashDevices {
			// Only a lane with a backlog behind its head is settled, so
			// the kill always finds undelivered readings behind the
			// heads being deleted, however fast each side runs.
			items, err := q.Peek(Lane{crashBroker, d}, 40)
			if err != nil {
				fmt.Fprintln(os.Stderr, "peek:", err)
				os.Exit(3)
			}
			if len(items) == 40 {
				heads = append(heads, items[0])
			}
		}
		for _, it := range heads {
			print("p", it.Device, it.Seq) // handed to a delete
		}
		if len(heads) == 0 {
			time.Sleep(time.Millisecond)
			continue
		}
		if err := q.Delete(heads); err != nil {
			fmt.Fprintln(os.Stderr, "delete:", err)
			os.Exit(3)
		}
		for _, it := range heads {
			print("d", it.Device, it.Seq)
		}
	}
}

// TestCrashDuringDelete: SIGKILL while readings are appended and
// settled. After a restart every acknowledged reading that was never
// handed to a delete is there, and each lane is gap-free from its head (a
// delete is not synced: one lost in a crash would only bring its reading
// back, to be delivered again; a process kill loses none, it counts them).
func TestCrashDuringDelete(t *testing.T) {
	dir := t.TempDir()
	cmd, stdout := startChild(t, "TestHelperSettleCrash", settleCrashEnv+"="+dir)
	// handed: given to a Delete that may have returned before the
	// kill; deleted: one that returned.
	acked := map[string]map[uint64]bool{}
	handed := map[string]map[uint64]bool{}
	deleted := map[string]map[uint64]bool{}
	for _, d := range crashDevices {
		acked[d], handed[d], deleted[d] = map[uint64]bool{}, map[uint64]bool{}, map[uint64]bool{}
	}
	sc := bufio.NewScanner(stdout)
	lines, dels, killed := 0, 0, false
	timer := time.AfterFunc(60*time.Second, func() { cmd.Process.Kill() })
	for sc.Scan() {
		var kind, dev string
		var seq uint64
		if _, err := fmt.Sscanf(sc.Text(), "%s %s %d", &kind, &dev, &seq); err != nil || acked[dev] == nil {
			continue
		}
		switch kind {
		case "a":
			acked[dev][seq] = true
		case "p":
			handed[dev][seq] = true
		case "d":
			deleted[dev][seq] = true
			dels++
		}
		lines++
		if lines == 3000 && !killed {
			cmd.Process.Signal(syscall.SIGKILL)
			killed = true
		}
	}
	timer.Stop()
	cmd.Wait()
	if !killed || dels == 0 {
		t.Fatalf("child stopped after %d lines (%d deletes) without being killed", lines, dels)
	}
	backlog := 0
	for _, d := range crashDevices {
		backlog += len(acked[d]) - len(deleted[d])
	}
	if backlog < 100 {
		t.Fatalf("%d readings acknowledged and not deleted at the kill: the test needs a backlog", backlog)
	}

	q := start(t, Options{Dir: dir})
	for _, d := range crashDevices {
		got := seqs(peekAll(t, q.Queue, Lane{crashBroker, d}))
		present := map[uint64]bool{}
		for i, s := range got {
			present[s] = true
			if i > 0 && s != got[i-1]+1 {
				t.Fatalf("%s: seqs not gap-free after the crash: %v", d, got)
			}
		}
		var lost []uint64
		for s := range acked[d] {
			if !handed[d][s] && !present[s] {
				lost = append(lost, s)
			}
		}
		if len(lost) > 0 {
			slices.Sort(lost)
			t.Fatalf("%s: acknowledged, never handed to a delete, gone after the crash: %v", d, lost)
		}
		back := 0
		for _, s := range got {
			if deleted[d][s] {
				back++
			}
		}
		t.Logf("%s: %d acked, %d deleted, %d present after the crash (%d deleted ones back)", d, len(acked[d]), len(deleted[d]), len(got), back)
	}
}

// appendEach appends one reading of each entry, concurrently, so that
// they share a group commit.
func appendEach(b *testing.B, q *running, entries []Entry) {
	var wg sync.WaitGroup
	for _, e := range entries {
		wg.Go(func() {
			if _, err := q.Append(context.Background(), e); err != nil {
				b.Error(err)
			}
		})
	}
	wg.Wait()
}

// releaseAll drops every lane's held items, as if none were settled soon
// after its commit: Delete then reads each back.
func (q *Queue) releaseAll() {
	q.mu.Lock()
	defer q.mu.Unlock()
	for _, ls := range q.lanes {
		q.release(ls)
	}
}
