//go:build benchprofile

package main

// CPU profiles of the real daemon during one phase of `make bench-peers`
// (BENCH_PEERS_PROFILE, cmd/edgegate-bench). Only a binary built with
// `-tags benchprofile` has this file: the shipped daemon has no profiling
// endpoint, signal or variable. With EDGEGATE_BENCH_PROFILE_DIR set,
// SIGUSR1 starts a CPU profile and SIGUSR2 stops it and publishes it as
// DIR/<n>.pprof (n = 1, 2, ...; written as .tmp, then renamed, so that a
// reader never sees half a profile). With EDGEGATE_BENCH_TRACE=1 as well,
// the same span is also recorded as an execution trace, DIR/<n>.trace
// (`go tool trace`; its -pprof=sync|sched|syscall views show where
// goroutines waited, which a CPU profile cannot), published before the
// profile.

import (
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/pprof"
	"runtime/trace"
	"syscall"
)

func init() {
	dir := os.Getenv("EDGEGATE_BENCH_PROFILE_DIR")
	if dir == "" {
		return
	}
	traced := os.Getenv("EDGEGATE_BENCH_TRACE") == "1"
	sig := make(chan os.Signal, 4)
	signal.Notify(sig, syscall.SIGUSR1, syscall.SIGUSR2)
	go func() {
		var f, tf *os.File
		n := 0
		for s := range sig {
			switch {
			case s == syscall.SIGUSR1 && f == nil:
				n++
				var err error
				if f, err = os.Create(filepath.Join(dir, fmt.Sprintf("%d.pprof.tmp", n))); err != nil {
					fmt.Fprintln(os.Stderr, "benchprofile:", err)
					continue
				}
				if traced {
					if tf, err = os.Create(filepath.Join(dir, fmt.Sprintf("%d.trace.tmp", n))); err == nil {
						if err = trace.Start(tf); err != nil {
							tf.Close()
							tf = nil
						}
					}
					if err != nil {
						fmt.Fprintln(os.Stderr, "benchprofile:", err)
					}
				}
				writeAllocs(filepath.Join(dir, fmt.Sprintf("%d.allocs0", n)))
				if err := pprof.StartCPUProfile(f); err != nil {
					fmt.Fprintln(os.Stderr, "benchprofile:", err)
					f.Close()
					f = nil
					if tf != nil {
						trace.Stop()
						tf.Close()
						tf = nil
					}
				}
			case s == syscall.SIGUSR2 && f != nil:
				pprof.StopCPUProfile()
				writeAllocs(filepath.Join(dir, fmt.Sprintf("%d.allocs", n)))
				if tf != nil {
					trace.Stop()
					name := tf.Name()
					tf.Close()
					tf = nil
					if err := os.Rename(name, name[:len(name)-len(".tmp")]); err != nil {
						fmt.Fprintln(os.Stderr, "benchprofile:", err)
					}
				}
				name := f.Name()
				f.Close()
				f = nil
				if err := os.Rename(name, name[:len(name)-len(".tmp")]); err != nil {
					fmt.Fprintln(os.Stderr, "benchprofile:", err)
				}
			}
		}
	}()
}

// writeAllocs writes the heap profile (allocations since the start, every
// 512 KB sampled): the phase's allocations are the difference between the
// one at SIGUSR1 and the one at SIGUSR2 (`go tool pprof
// -sample_index=alloc_space -base <n>.allocs0 <n>.allocs`). Written before
// the CPU profile is published, which is what the bench waits for.
func writeAllocs(path string) {
	f, err := os.Create(path)
	if err != nil {
		fmt.Fprintln(os.Stderr, "benchprofile:", err)
		return
	}
	defer f.Close()
	if err := pprof.Lookup("allocs").WriteTo(f, 0); err != nil {
		fmt.Fprintln(os.Stderr, "benchprofile:", err)
	}
}
