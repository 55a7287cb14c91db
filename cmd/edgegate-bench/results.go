package main

import (
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/edgegate/edgegate/internal/logx"
)

type machine struct {
	CPU       string `json:"cpu"`
	Cores     int    `json:"cores"`
	GoVersion string `json:"go"`
	OS        string `json:"os"`
}

type results struct {
	Machine      machine           `json:"machine"`
	Started      time.Time         `json:"started"`
	Elapsed      string            `json:"elapsed"`
	Quick        bool              `json:"quick"`
	Devices      int               `json:"devices"`
	Readings     int               `json:"readings_per_measurement"`
	PacedSeconds float64           `json:"paced_seconds"`
	BinaryBytes  int64             `json:"binary_bytes"`
	E2E          []e2eResult       `json:"end_to_end"`
	Backlog      []backlogResult   `json:"backlog"`
	Policy       []policyResult    `json:"policy"`
	Radio        radioResult       `json:"radio"`
	Micro        []microResult     `json:"micro"`
	Profiles     map[string]string `json:"profiles,omitempty"`
}

func printE2E(w io.Writer, r e2eResult) {
	fmt.Fprintf(w, "  limit %.0f/s, sustained %.0f/s (%.0f%%), PUBACK %.0f/s, p50/p99 %.1f/%.1f ms at %.0f/s, %.1f/%.1f ms at %.0f/s, CPU %.0f ms/1000 (%.2f cores; sim+publishers %.0f, publishers alone %.0f, mosquitto %.0f ms/1000), peak RSS %.1f MB (anonymous %.1f, file-backed %.1f), dups %d, invalid %d\n",
		r.LimitRate, r.Sustained, 100*r.Fraction, r.PublishAckRate, r.P50Half, r.P99Half, r.HalfRate, r.P50Full, r.P99Full, r.FullRate, r.CPUPer1000, r.GatewayCores, r.SimPubCPUPer1000, r.LimitClientsCPUPer1000, r.MosquittoCPUPer1000, r.PeakRSSMB, r.PeakAnonMB, r.PeakFileMB, r.Duplicates, r.Invalid)
}

func printTable(w io.Writer, res *results) {
	fmt.Fprintf(w, "\nedgegate bench — %s, %d cores, %s, %d devices, %d readings per measurement, %.0fs paced%s\n\n",
		res.Machine.CPU, res.Machine.Cores, res.Machine.GoVersion, res.Devices, res.Readings, res.PacedSeconds, map[bool]string{true: " (BENCH_QUICK)"}[res.Quick])
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "| end to end (QoS 1, durable) | broker limit /s | sustained /s | % of limit | p50 / p99 ms @ 50% | p50 / p99 ms @ 100% | CPU ms / 1000 | peak RSS MB |")
	fmt.Fprintln(tw, "|---|---|---|---|---|---|---|---|")
	for _, r := range res.E2E {
		if r.Error != "" {
			fmt.Fprintf(tw, "| %s | error: %s |\n", r.Name, logx.Clip(r.Error, 80))
			continue
		}
		fmt.Fprintf(tw, "| %s | %.0f | %.0f | %.0f%% | %.1f / %.1f | %.1f / %.1f | %.0f | %.1f |\n",
			r.Name, r.LimitRate, r.Sustained, 100*r.Fraction, r.P50Half, r.P99Half, r.P50Full, r.P99Full, r.CPUPer1000, r.PeakRSSMB)
	}
	tw.Flush()
	fmt.Fprintln(w)
	// Where the 2 cores went: everything runs on the same machine.
	fmt.Fprintln(tw, "| CPU per 1,000 readings, sustained run | gateway ms | gateway cores | simulated central + devices ms | devices alone (limit run) ms | Mosquitto ms | peak RSS anonymous / file-backed MB |")
	fmt.Fprintln(tw, "|---|---|---|---|---|---|---|")
	for _, r := range res.E2E {
		if r.Error != "" {
			continue
		}
		fmt.Fprintf(tw, "| %s | %.0f | %.2f | %.0f | %.0f | %.0f | %.1f / %.1f |\n",
			r.Name, r.CPUPer1000, r.GatewayCores, r.SimPubCPUPer1000, r.LimitClientsCPUPer1000, r.MosquittoCPUPer1000, r.PeakAnonMB, r.PeakFileMB)
	}
	tw.Flush()
	fmt.Fprintln(w)
	fmt.Fprintln(tw, "| backlog (uplink down) | queued | ingest /s | RSS MB lo → hi | peak MB lo / hi | disk B/reading lo / hi | drain /s (drained) | peak MB drain |")
	fmt.Fprintln(tw, "|---|---|---|---|---|---|---|---|")
	for _, b := range res.Backlog {
		fmt.Fprintf(tw, "| %s, %s | %d → %d | %.0f | %.1f → %.1f | %.1f / %.1f | %.0f / %.0f | %.0f (%d) | %.1f |%s\n",
			b.Mode, b.Gateway, b.Lo, b.Hi, b.IngestRate, b.RSSLoMB, b.RSSHiMB, b.PeakLoMB, b.PeakHiMB, b.DiskPerLo, b.DiskPerHi, b.DrainRate, b.Drained, b.PeakDrainMB, errNote(b.Error))
	}
	tw.Flush()
	for _, b := range res.Backlog {
		fmt.Fprintf(w, "  %s: RSS = anonymous %.1f → %.1f MB + file-backed (binary, mapped store files) %.1f → %.1f MB; sampled peaks anonymous / file-backed: %.1f / %.1f MB queuing to %d, %.1f / %.1f MB queuing on to %d, %.1f / %.1f MB draining\n",
			b.Mode, b.AnonLoMB, b.AnonHiMB, b.FileLoMB, b.FileHiMB, b.PeakAnonLoMB, b.PeakFileLoMB, b.Lo, b.PeakAnonHiMB, b.PeakFileHiMB, b.Hi, b.PeakAnonDrainMB, b.PeakFileDrainMB)
	}
	fmt.Fprintln(w)
	fmt.Fprintln(tw, "| policy devices | compile (policy.New) ms | DecideIngest ns | unknown device ns | heap MB |")
	fmt.Fprintln(tw, "|---|---|---|---|---|")
	for _, p := range res.Policy {
		fmt.Fprintf(tw, "| %d | %.1f | %.0f | %.0f | %.1f |\n", p.Devices, p.CompileMS, p.DecideNS, p.DeniedNS, p.HeapMB)
	}
	tw.Flush()
	fmt.Fprintln(w)
	fmt.Fprintf(w, "radio: %d MySensors frames from %d nodes through a pty into the queue: %.0f frames/s%s\n",
		res.Radio.Frames, res.Radio.Nodes, res.Radio.FramesPerS, errNote(res.Radio.Error))
	fmt.Fprintf(w, "binary (linux/amd64, -s -w): %.1f MB\n\n", float64(res.BinaryBytes)/(1<<20))
	fmt.Fprintln(tw, "| go test -bench | ns/op | B/op | allocs/op | other |")
	fmt.Fprintln(tw, "|---|---|---|---|---|")
	for _, m := range res.Micro {
		var extra []string
		for k, v := range m.Extra {
			extra = append(extra, fmt.Sprintf("%.0f %s", v, k))
		}
		fmt.Fprintf(tw, "| %s.%s | %.0f | %.0f | %.0f | %s |\n", m.Package, strings.TrimPrefix(m.Name, "Benchmark"), m.NsOp, m.BytesOp, m.AllocsOp, strings.Join(extra, ", "))
	}
	tw.Flush()
}

func errNote(e string) string {
	if e == "" {
		return ""
	}
	return " (error: " + logx.Clip(e, 100) + ")"
}
