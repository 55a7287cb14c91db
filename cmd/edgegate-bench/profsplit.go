package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"regexp"
	"strings"
	"time"
)

// Where a process's CPU goes, by part of the work (issue 20: "a
// profile-backed explanation of why not"). `go tool pprof -top` lists
// functions; the question a reader asks is "how much of a reading's CPU is
// the durable queue, the signature, MQTT, HTTPS, the Go runtime", for the
// gateway and for Telegraf alike. So each sample's stack goes to the first
// part whose pattern one of its frames matches, in the order below: the
// gateway's own work first (a reading sealed inside the MQTT hook is
// signing, not MQTT), the runtime's background work last. Allocation and
// GC assists count in the part that allocated.
type profPart struct {
	name string
	re   *regexp.Regexp
}

var profParts = []profPart{
	{"sign (HS256 JWS per reading)", regexp.MustCompile(`internal/envelope\.(SealPacked|Seal|sealRender|Key\.sign|appendReadingClaims)`)},
	{"queue: fsync (msync of badger's logs)", regexp.MustCompile(`badger/v4\.\(\*DB\)\.Sync|ristretto/v2/z\.Msync`)},
	{"queue: encrypt each reading (AES-GCM, device key)", regexp.MustCompile(`internal/queue\.(sealItem|sealInPlace)`)},
	{"queue: badger write (value log, memtable, WAL)", regexp.MustCompile(`badger/v4\.\(\*DB\)\.doWrites`)},
	{"queue: read back and delete", regexp.MustCompile(`internal/queue\.\(\*Queue\)\.(Peek|Delete|deleteSized)`)},
	{"queue: committer loop, memtable flush, compaction, page-out", regexp.MustCompile(`dgraph-io/badger|internal/queue\.`)},
	{"parse the reading", regexp.MustCompile(`internal/reading\.|plugins/parsers/|influxdata/telegraf/metric\.`)},
	{"uplink: render, HTTPS", regexp.MustCompile(`internal/uplink\.|plugins/outputs/|plugins/serializers/|net/http\.|crypto/tls\.`)},
	{"MQTT: receive, acknowledge", regexp.MustCompile(`mochi-mqtt/|edgegate/mqtt\.|paho|inputs/mqtt_consumer`)},
	{"pipeline, policy, other application code", regexp.MustCompile(`edgegate/(internal|policy)/|influxdata/telegraf/`)},
	{"Go runtime: GC in the background", regexp.MustCompile(`runtime\.(gcBgMarkWorker|bgsweep|bgscavenge)`)},
	{"Go runtime: scheduler, timers, netpoll", regexp.MustCompile(`runtime\.(schedule|findRunnable|mcall|park_m|sysmon|netpoll|futex|notesleep|stopm|goexit0|timer)`)},
}

const profOther = "other"

// profShare is one part's CPU in a profile.
type profShare struct {
	Name string
	CPU  time.Duration
}

// splitProfile runs `go tool pprof -traces` on a CPU profile and adds up
// its samples by part (profParts, then profOther), in the parts' order.
func splitProfile(path string) (shares []profShare, total time.Duration, err error) {
	out, err := exec.Command("go", "tool", "pprof", "-traces", path).Output()
	if err != nil {
		return nil, 0, fmt.Errorf("pprof -traces %s: %w", path, err)
	}
	return splitTraces(bytes.NewReader(out))
}

// splitTraces parses `go tool pprof -traces` text: samples separated by
// "-----------+---" lines, each a value ("10ms", "1.20s") before its leaf
// frame, then one frame per line.
func splitTraces(r io.Reader) ([]profShare, time.Duration, error) {
	by := make([]time.Duration, len(profParts)+1)
	var total time.Duration
	var cur time.Duration
	var frames []string
	flush := func() {
		if cur == 0 {
			return
		}
		i := len(profParts)
		for j, p := range profParts {
			if matchAny(p.re, frames) {
				i = j
				break
			}
		}
		by[i] += cur
		total += cur
		cur, frames = 0, frames[:0]
	}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "-----------+") {
			flush()
			continue
		}
		if cur == 0 {
			// The value line: "      10ms   runtime.memmove".
			fields := strings.Fields(line)
			if len(fields) < 2 {
				continue
			}
			d, err := parsePprofValue(fields[0])
			if err != nil {
				continue // the header (File:, Type:, ...)
			}
			cur = d
			frames = append(frames, fields[1])
			continue
		}
		if f := strings.TrimSpace(line); f != "" {
			frames = append(frames, f)
		}
	}
	flush()
	if err := sc.Err(); err != nil {
		return nil, 0, err
	}
	if total == 0 {
		return nil, 0, errors.New("no samples")
	}
	shares := make([]profShare, 0, len(by))
	for i, d := range by {
		name := profOther
		if i < len(profParts) {
			name = profParts[i].name
		}
		shares = append(shares, profShare{Name: name, CPU: d})
	}
	return shares, total, nil
}

func matchAny(re *regexp.Regexp, frames []string) bool {
	for _, f := range frames {
		if re.MatchString(f) {
			return true
		}
	}
	return false
}

// parsePprofValue parses a CPU sample's value as pprof prints it: "10ms",
// "1.20s", "500us" (time.ParseDuration's units).
func parsePprofValue(s string) (time.Duration, error) {
	d, err := time.ParseDuration(s)
	if err != nil || d <= 0 {
		return 0, fmt.Errorf("not a CPU value: %q", s)
	}
	return d, nil
}

// formatSplit prints the parts of a profile, with each part's CPU per
// 1,000 readings when readings > 0 (the profile's share of the phase's
// readings).
func formatSplit(w io.Writer, shares []profShare, total time.Duration, readings int64) {
	fmt.Fprintf(w, "%-62s %9s %6s", "part", "CPU", "share")
	if readings > 0 {
		fmt.Fprintf(w, " %12s", "ms / 1k")
	}
	fmt.Fprintln(w)
	for _, s := range shares {
		fmt.Fprintf(w, "%-62s %8.2fs %5.1f%%", s.Name, s.CPU.Seconds(), 100*s.CPU.Seconds()/total.Seconds())
		if readings > 0 {
			fmt.Fprintf(w, " %12.1f", float64(s.CPU.Milliseconds())*1000/float64(readings))
		}
		fmt.Fprintln(w)
	}
	fmt.Fprintf(w, "%-62s %8.2fs\n", "sampled in all", total.Seconds())
}
