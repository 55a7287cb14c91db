package main

import (
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"runtime/pprof"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// clockTicks is USER_HZ: 100 on every Linux the daemon runs on.
const clockTicks = 100

// procCPU returns the user+system CPU time of pid (/proc/<pid>/stat fields
// 14 and 15).
func procCPU(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name (field 2) may hold spaces: split after its ')'.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, fmt.Errorf("parse /proc/%d/stat", pid)
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 13 {
		return 0, fmt.Errorf("parse /proc/%d/stat: %d fields", pid, len(f))
	}
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(ut+st) * time.Second / clockTicks, nil
}

// procStatus returns the sizes in /proc/<pid>/status (the "NNN kB"
// fields: VmHWM, RssAnon, ...) in bytes, by name.
func procStatus(pid int) (map[string]int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return nil, err
	}
	out := map[string]int64{}
	for _, line := range strings.Split(string(b), "\n") {
		k, v, _ := strings.Cut(line, ":")
		if kb, ok := strings.CutSuffix(strings.TrimSpace(v), " kB"); ok {
			if n, err := strconv.ParseInt(kb, 10, 64); err == nil {
				out[k] = n << 10
			}
		}
	}
	return out, nil
}

// procMem returns VmHWM (peak RSS) and VmRSS of pid, in bytes.
func procMem(pid int) (hwm, rss int64, err error) {
	st, err := procStatus(pid)
	return st["VmHWM"], st["VmRSS"], err
}

// resetHWM resets VmHWM to the current RSS (clear_refs 5, Linux >= 4.0).
func resetHWM(pid int) error {
	return os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", pid), []byte("5"), 0)
}

// diskUsage is the allocated size of every file under dir.
func diskUsage(dir string) int64 {
	var total int64
	_ = filepath.WalkDir(dir, func(_ string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return nil
		}
		if fi, err := d.Info(); err == nil {
			if st, ok := fi.Sys().(*syscall.Stat_t); ok {
				total += st.Blocks * 512
			}
		}
		return nil
	})
	return total
}

func cpuModel() string {
	b, _ := os.ReadFile("/proc/cpuinfo")
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "model name"); ok {
			return strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(v), ":"))
		}
	}
	return "unknown"
}

// procRSSParts returns RssAnon and RssFile (+RssShmem) of pid, in bytes:
// anonymous memory is what the process holds; file-backed pages (mmapped
// badger tables and logs) are page cache the kernel can drop under pressure.
func procRSSParts(pid int) (anon, file int64) {
	st, _ := procStatus(pid)
	return st["RssAnon"], st["RssFile"] + st["RssShmem"]
}

// rssSampler polls RssAnon and RssFile of pid every 50 ms and keeps their
// peaks: VmHWM alone cannot tell the daemon's own memory from the page
// cache of its mmapped store files.
type rssSampler struct {
	stop               chan struct{}
	done               chan struct{}
	peakAnon, peakFile int64
}

func sampleRSS(pid int) *rssSampler {
	s := &rssSampler{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(s.done)
		t := time.NewTicker(50 * time.Millisecond)
		defer t.Stop()
		for {
			a, f := procRSSParts(pid)
			s.peakAnon, s.peakFile = max(s.peakAnon, a), max(s.peakFile, f)
			select {
			case <-s.stop:
				return
			case <-t.C:
			}
		}
	}()
	return s
}

// peaks stops the sampler and returns the peak anonymous and file-backed
// RSS in MB.
func (s *rssSampler) peaks() (anonMB, fileMB float64) {
	close(s.stop)
	<-s.done
	return float64(s.peakAnon) / (1 << 20), float64(s.peakFile) / (1 << 20)
}

// startCPUProfile writes a CPU profile of this process to path until stop.
func startCPUProfile(path string) (stop func(), err error) {
	f, err := os.Create(path)
	if err != nil {
		return nil, err
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		return nil, err
	}
	return func() {
		pprof.StopCPUProfile()
		f.Close()
	}, nil
}
