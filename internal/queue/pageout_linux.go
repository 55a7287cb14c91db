//go:build linux

package queue

import (
	"bufio"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// When the store's mapped files are paged out (pageOutStore, below).
//
// Measured (docs/performance.md#memory): under a 50-device burst the
// drain of a backlog maps value-log pages at up to ~45 MB/s — each read
// fault maps at least the kernel's fault-around window (64 KB) of the page
// cache, a lane's readings are ~50 readings apart in the logs, and 16
// lanes read at 16 places (filter mode).
// Paged out four times a second, the value logs still reached 20-27 MB of
// the daemon's peak RSS between two page-outs. So the loop looks every
// pageOutBusy and pages out as soon as the process took pageOutFaults page
// faults since the last page-out (a file page is only ever mapped by a
// fault), or pageOutIdle after any fault; a process that took no fault
// mapped nothing, and an idle gateway does no work at all.
const (
	pageOutBusy   = 25 * time.Millisecond
	pageOutIdle   = 250 * time.Millisecond
	pageOutFaults = 16
)

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
	// Reading /proc/self/maps is most of a page-out's cost: the list is
	// read again at most every pageOutMapsAge (new logs are paged out from
	// then on). A stale range is harmless: the advice never changes
	// memory (see pageOutStore), and a range unmapped meanwhile is skipped.
	var err error
	if po.maps == nil || time.Since(po.mapsAt) >= pageOutMapsAge {
		if po.maps, err = storeMappings(po.dir); err == nil {
			po.mapsAt = time.Now()
		}
	}
	var supported = true
	if err == nil {
		_, supported, err = adviseOut(po.maps)
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

// Not behind the drain's reads: paging out every 16 readings that Peek
// read back from the store (one Peek of 256 readings of a lane, ~50
// readings apart in the logs, mapped 16 MB at once) made BenchmarkPeekDelete
// 2x slower (85 against 41-46 µs per reading): each page-out also drops
// the pages the drain reads next, which come back from disk.

// pageOutLoop pages the store's mapped files out until ctx is done.
func (q *Queue) pageOutLoop(ctx context.Context) {
	tick := time.NewTicker(pageOutBusy)
	defer tick.Stop()
	last, lastAt := pageFaults(), time.Now()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		if q.pageOut.off.Load() {
			return
		}
		if !pageOutDue(pageFaults()-last, time.Since(lastAt)) {
			continue
		}
		if q.pageOutNow() {
			last, lastAt = pageFaults(), time.Now()
		}
	}
}

// pageOutDue tells whether a page-out is due, faults page faults and
// since after the last one.
func pageOutDue(faults int64, since time.Duration) bool {
	return faults >= pageOutFaults || (faults > 0 && since >= pageOutIdle)
}

// pageFaults is the number of page faults this process took (minor and
// major): one getrusage call.
func pageFaults() int64 {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return ru.Minflt + ru.Majflt
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
// zero anonymous memory in that race, is deliberately not used.
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

// mapping is an address range of a mapped store file.
type mapping struct {
	lo, hi uintptr
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
		maps = append(maps, mapping{lo: uintptr(l), hi: uintptr(h)})
	}
	return maps, sc.Err()
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
