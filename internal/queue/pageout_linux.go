//go:build linux

package queue

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// When the store's mapped files are paged out (pageOutStore, below).
//
// By what they hold, not by how often the process faults. The loop looks
// every pageOutBusy while the process faults, every pageOutIdle once it
// did not; if the process took no page fault since its last look, nothing
// was mapped and it does nothing else (an idle gateway does one getrusage
// call per look, ten a second). Otherwise it reads the process's
// file-backed resident size (/proc/self/statm, ~2 µs: BenchmarkFileRSS) and
// pages the store out only when that size is pageOutBudget above what it
// was right after the last page-out (the binary, the memtable logs and
// whatever the kernel could not drop), or when the process went quiet (no
// fault in the last look) with any of the store's pages resident, so an
// idle gateway holds none.
//
// How: the value logs' pages are dropped from the process but kept in the
// page cache when the store can be locked against unmapping them for a
// moment (dropLogPages); otherwise they are reclaimed as the tables' are
// (pageOutStore).
//
// Measured (docs/performance.md#memory, 50-device bursts of the embedded
// row): the previous rule, a page-out every 25 ms once the process took 16
// faults, was 11 % of the daemon's CPU in a burst (the madvise calls), and
// it dropped the value-log pages the drain was about to read, which then
// came back from disk: 9 % of the CPU flat in badger's header.Decode, on
// the page faults. Under the budget nothing the drain reads next is
// dropped; over it, the store's resident pages are bounded by the budget
// plus what one look's interval maps.
const (
	// pageOutBusy: 5 ms looks instead of 25 ms gave the same burst
	// figures and no lower peak while draining a backlog (70.6 against
	// 67.4 MB, one run each): what the drain maps comes in bigger steps
	// than a look's interval (a Peek of one lane reads across megabytes
	// of interleaved lanes, and a read fault maps a whole large folio).
	pageOutBusy = 25 * time.Millisecond
	pageOutIdle = 100 * time.Millisecond
	// pageOutBudget is the store's share of the resident size. The peak
	// RSS of the embedded row is ~33 MB anonymous + ~16 MB of binary, and
	// issue 20 asks at most 64 MB in all. Measured (50k bursts, backlog to
	// 400k): 4 MB kept the burst's peak at 51-53 MB against 56-58 with
	// 8 MB, and the page-outs at ~2 % of the CPU: with the readings the
	// uplink reads held in memory (recent.go), what a burst maps is mostly
	// the log being written, whose pages are not read again.
	pageOutBudget = 4 << 20
	// pageOutQuiet is the resident store bytes above the floor that a
	// quiet process still pages out: below it, not worth a page-out.
	pageOutQuiet = 256 << 10
)

// pageOutDue tells whether a page-out is due: faults page faults since the
// loop's previous look, fileRSS the process's file-backed resident bytes
// now, floor what they were right after the last page-out.
func pageOutDue(faults, fileRSS, floor int64) bool {
	above := fileRSS - floor
	return above >= pageOutBudget || (faults == 0 && above >= pageOutQuiet)
}

// pageOutState is the page-out's share of the Queue.
type pageOutState struct {
	mu   sync.Mutex  // one page-out at a time
	off  atomic.Bool // the kernel cannot (pageOutStore)
	once sync.Once
	dir  string // the store's resolved directory, as /proc/self/maps names it
	// maps are the store's mappings as read at mapsAt (under mu).
	maps   []mapping
	mapsAt time.Time
}

// pageOutMapsAge is how long a list of the store's mappings is used.
const pageOutMapsAge = 100 * time.Millisecond

// pageOutNow pages the store out, unless another page-out is under way
// or the kernel cannot; it reports whether it did.
func (q *Queue) pageOutNow() bool {
	po := &q.pageOut
	if po.off.Load() || !po.mu.TryLock() {
		return false
	}
	defer po.mu.Unlock()
	return q.pageOutLocked()
}

// pageOutLocked is pageOutNow with q.pageOut.mu held.
func (q *Queue) pageOutLocked() bool {
	po := &q.pageOut
	if po.off.Load() {
		return false
	}
	po.once.Do(func() {
		// /proc/self/maps names files by their absolute, resolved path.
		po.dir = q.dir
		if abs, err := filepath.Abs(q.dir); err == nil {
			po.dir = abs
			if real, err := filepath.EvalSymlinks(abs); err == nil {
				po.dir = real
			}
		}
	})
	var err error
	supported := true
	if q.lockForDrop() {
		// No call that can unmap a value log is under way, and none starts
		// until Unlock: the logs listed now stay what they are while their
		// pages are dropped and kept in the page cache (dropLogPages,
		// storecalls.go). The tables, which badger's compactions unmap on
		// their own, are paged out as below.
		var fresh []mapping
		if fresh, err = storeMappings(po.dir); err == nil {
			po.maps, po.mapsAt = fresh, time.Now()
			supported, err = dropLogPages(fresh)
		}
		q.mapsMu.Unlock()
		if err == nil && supported {
			q.pageOutsKept.Add(1)
			_, supported, err = adviseOut(slices.DeleteFunc(slices.Clone(fresh), func(m mapping) bool { return m.log }))
		}
	} else {
		// The store stayed in use: page everything out, logs included.
		// Reading /proc/self/maps is most of a page-out's cost: the list
		// is read again at most every pageOutMapsAge (new logs are paged
		// out from then on). A stale range is harmless: MADV_PAGEOUT never
		// changes memory (see pageOutStore), and a range unmapped meanwhile
		// is skipped.
		if po.maps == nil || time.Since(po.mapsAt) >= pageOutMapsAge {
			if po.maps, err = storeMappings(po.dir); err == nil {
				po.mapsAt = time.Now()
			}
		}
		if err == nil {
			_, supported, err = adviseOut(po.maps)
		}
	}
	if err != nil {
		q.log.Debug("page out the store's mapped files", "err", err)
	}
	if !supported {
		po.off.Store(true)
		q.log.Info("paging out the store's mapped files is not available here (MADV_PAGEOUT needs Linux 5.4); the resident size will include them")
		return false
	}
	q.pageOuts.Add(1)
	return true
}

// pageOutLoop pages the store's mapped files out until ctx is done.
func (q *Queue) pageOutLoop(ctx context.Context) {
	rss, err := openFileRSS()
	if err != nil {
		q.log.Info("no /proc/self/statm: the store's mapped files are not paged out; the resident size will include them", "err", err)
		return
	}
	defer rss.Close()
	timer := time.NewTimer(pageOutIdle)
	defer timer.Stop()
	last := pageFaults()
	// floor 0: the first look pages out what opening the store mapped
	// (badger replays the logs), and sets the floor.
	var floor int64
	// dirty: the process faulted since the last page-out, so store pages
	// may be resident.
	dirty := true
	for {
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		}
		if q.pageOut.off.Load() {
			return
		}
		q.pageOutLooks.Add(1)
		faults := pageFaults()
		if faults != last {
			dirty = true
			timer.Reset(pageOutBusy)
		} else {
			timer.Reset(pageOutIdle)
		}
		if !dirty {
			continue // nothing mapped since the last page-out
		}
		cur, err := rss.read()
		if err != nil {
			q.log.Debug("read the file-backed resident size", "err", err)
			continue
		}
		switch {
		case pageOutDue(faults-last, cur, floor):
			if q.pageOutNow() {
				if after, err := rss.read(); err == nil {
					floor = nextFloor(floor, after, faults == last)
				}
				dirty = false
			}
		case faults == last:
			dirty = false // quiet, and too little resident to be worth it
		}
		last = pageFaults()
	}
}

// nextFloor is the floor after a page-out, after the file-backed bytes
// resident right after it. While the process is busy the floor only goes
// down: pages the kernel could not drop at that moment (read or written right then) would
// otherwise raise it a little at each page-out, and the store's resident
// pages with it (filter mode, 16 lanes reading the logs: 28-33 MB of
// file-backed peak against 21-25 with the old rule, and 43-47 MB with
// looks every 5 ms). A quiet page-out sets it as measured: the binary's
// pages mapped since count from there. Until then, a busy process whose
// binary mapped the budget's worth of new pages pages out at every look,
// as the old rule did; letting a page-out that left the whole budget set
// the floor instead gave back 58-70 MB peaks in filter mode (57.7-58.9
// without, five runs each).
func nextFloor(floor, after int64, quiet bool) int64 {
	if quiet || floor == 0 {
		return after
	}
	return min(floor, after)
}

// fileRSS reads the process's file-backed resident size from an open
// /proc/self/statm: its third field ("shared") is RssFile + RssShmem, in
// pages (proc(5)). One pread, no allocation.
type fileRSS struct {
	f   *os.File
	buf [128]byte
}

func openFileRSS() (*fileRSS, error) {
	f, err := os.Open("/proc/self/statm")
	if err != nil {
		return nil, err
	}
	r := &fileRSS{f: f}
	if _, err := r.read(); err != nil {
		f.Close()
		return nil, err
	}
	return r, nil
}

func (r *fileRSS) Close() error { return r.f.Close() }

// read returns the file-backed resident bytes.
func (r *fileRSS) read() (int64, error) {
	n, err := r.f.ReadAt(r.buf[:], 0)
	if n == 0 && err != nil {
		return 0, err
	}
	return parseStatmShared(r.buf[:n])
}

// parseStatmShared parses statm's "size resident shared ..." line and
// returns shared in bytes.
func parseStatmShared(b []byte) (int64, error) {
	field := 0
	var v int64
	digits := false
	for _, c := range b {
		switch {
		case c >= '0' && c <= '9':
			if field == 2 {
				v, digits = v*10+int64(c-'0'), true
			}
		case c == ' ' || c == '\n':
			if field == 2 && digits {
				return v * int64(os.Getpagesize()), nil
			}
			field++
		default:
			return 0, fmt.Errorf("statm: unexpected byte %q", c)
		}
	}
	return 0, fmt.Errorf("statm: no shared field in %q", b)
}

// pageFaults is the number of page faults this process took (minor and
// major): one getrusage call.
func pageFaults() int64 {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return int64(ru.Minflt) + int64(ru.Majflt) // int32 on 32-bit ARM
}

// pageOutStore asks the kernel to reclaim this process's pages of the
// store's value-log files — every *.vlog under dir mapped shared, the one
// badger appends to included — and of its tables (*.sst).
//
// Why. badger maps each value-log file whole and keeps it mapped until
// value-log GC deletes it, so every page it wrote stays resident in the
// daemon's RSS: under full load the file-backed part grew by the volume
// written (75 MB of a 111 MB peak in edgegate-bench), and a closed log is
// read again only to drain a backlog. Tables are mapped whole too; their
// pages, touched by compaction and by reads that miss the block cache,
// grew the RSS with the backlog (19 -> 33 MB from 100k to 1M queued).
// Those pages are page cache the kernel could drop anyway; MADV_PAGEOUT
// drops them now. The memtable logs (*.mem), written all the time, stay.
//
// Safety. MADV_PAGEOUT is a hint that never changes memory contents: if a
// file is unmapped between reading /proc/self/maps and the call, and the
// range reused by another mapping, that mapping's pages are at worst
// reclaimed (written back or, for anonymous memory, swapped out if there
// is swap) and read back on the next access. MADV_DONTNEED, which would
// zero anonymous memory in that race, is used only on the value logs and
// only where the race cannot happen: under mapsMu held exclusively, with
// the mappings listed under it (pageOutNow, dropLogPages, storecalls.go).
//
// It returns the bytes of address space advised and whether the kernel
// supports the advice (EINVAL before Linux 5.4; EPERM under a seccomp
// filter without madvise).
func pageOutStore(dir string) (advised int64, supported bool, err error) {
	maps, err := storeMappings(dir)
	if err != nil {
		return 0, true, err
	}
	return adviseOut(maps)
}

// mapping is an address range of a mapped store file; log: a value log
// (else a table).
type mapping struct {
	lo, hi uintptr
	log    bool
}

// storeMappings lists this process's shared mappings of the store's value
// logs and tables (/proc/self/maps).
func storeMappings(dir string) ([]mapping, error) {
	f, err := os.Open("/proc/self/maps")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var maps []mapping
	prefix := filepath.Clean(dir) + "/"
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 0, 4096), 1<<16)
	for sc.Scan() {
		// lo-hi perms offset dev inode path
		fields := strings.Fields(sc.Text())
		if len(fields) < 6 || len(fields[1]) != 4 || fields[1][3] != 's' {
			continue
		}
		path := strings.Join(fields[5:], " ")
		name, ok := strings.CutPrefix(path, prefix)
		if !ok || strings.Contains(name, "/") {
			continue
		}
		num, isLog := strings.CutSuffix(name, ".vlog")
		if !isLog && !strings.HasSuffix(name, ".sst") {
			continue
		}
		if isLog {
			if _, err := strconv.ParseUint(num, 10, 64); err != nil {
				continue // not one of badger's numbered logs
			}
		}
		lo, hi, ok := strings.Cut(fields[0], "-")
		if !ok {
			continue
		}
		l, err1 := strconv.ParseUint(lo, 16, 64)
		h, err2 := strconv.ParseUint(hi, 16, 64)
		if err1 != nil || err2 != nil || h <= l {
			continue
		}
		maps = append(maps, mapping{lo: uintptr(l), hi: uintptr(h), log: isLog})
	}
	return maps, sc.Err()
}

// lockForDrop takes mapsMu exclusively without ever making a call into
// the store wait for it: Lock would hold back every new call while it
// waited for the calls under way (a view streaming an export to a slow
// client is one), so it tries, again every pageOutLockRetry, for at most
// pageOutLockWait. Under load there are gaps: the committer holds mapsMu
// for its write, not for its sync, and the uplink's reads are short.
func (q *Queue) lockForDrop() bool {
	deadline := time.Now().Add(pageOutLockWait)
	for {
		if q.mapsMu.TryLock() {
			return true
		}
		q.pageOutLockMisses.Add(1)
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(pageOutLockRetry)
	}
}

const (
	pageOutLockWait  = 10 * time.Millisecond
	pageOutLockRetry = 500 * time.Microsecond
)

// dropLogPages drops this process's pages of the value logs among maps
// (MADV_DONTNEED) and leaves the tables alone; see pageOutNow.
//
// Why not MADV_PAGEOUT for the logs: it reclaims the pages from the page
// cache too, so a drain that reads a backlog bigger than the page-out
// budget read them back from the disk, again for each lane whose
// readings share a page: 1.2–1.3 GB read from the disk to drain a 40 MB
// backlog in a 50k-reading filter-mode burst (docs/performance.md). On a
// shared file mapping MADV_DONTNEED only unmaps: the next access maps the
// page again from the page cache, and a dirty page stays dirty there until
// the next msync writes it (the commit's sync covers the file, not the
// mapping). It is safe only on a range that is still that mapping, which
// the caller guarantees by holding mapsMu exclusively.
func dropLogPages(maps []mapping) (supported bool, err error) {
	for _, m := range maps {
		if !m.log {
			continue
		}
		_, _, errno := unix.Syscall(unix.SYS_MADVISE, m.lo, m.hi-m.lo, unix.MADV_DONTNEED)
		switch {
		case errno == 0:
		case errno == unix.EPERM:
			return false, nil // filtered by seccomp: stop trying
		default:
			return true, errors.New("madvise: " + errno.Error())
		}
	}
	return true, nil
}

// adviseOut pages the given ranges out; see pageOutStore.
func adviseOut(maps []mapping) (advised int64, supported bool, err error) {
	for _, m := range maps {
		// The log being written is paged out too: since the uplink reads
		// fresh readings from memory (recent.go), its pages are not read
		// again while the gateway keeps up, and at full rate they were up
		// to 8 MB of the peak RSS. What badger writes next faults in one
		// page (the partly written one is written back first: the advice
		// never changes contents).
		_, _, errno := unix.Syscall(unix.SYS_MADVISE, m.lo, m.hi-m.lo, unix.MADV_PAGEOUT)
		switch {
		case errno == 0:
			advised += int64(m.hi - m.lo)
		case errno == unix.EINVAL, errno == unix.EPERM:
			// Before Linux 5.4, or filtered by seccomp: stop trying.
			return advised, false, nil
		case errno == unix.ENOMEM:
			// Unmapped meanwhile (GC deleted the file): nothing to do.
		default:
			return advised, true, errors.New("madvise: " + errno.Error())
		}
	}
	return advised, true, nil
}
