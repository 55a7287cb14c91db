package admin

import (
	"fmt"
	"io"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
)

// Thresholds for what the human status marks as a problem.
const (
	policyExpiryWarn = 24 * time.Hour
	backlogAgeWarn   = time.Hour
	quotaWarn        = 0.9
)

// problemMark starts every line that needs attention, so that
// `edgegate status | grep '!!'` lists them.
const problemMark = "!!"

// Problems lists what needs a person's attention, worst first.
func Problems(st Status) []string {
	now := st.Now
	if now.IsZero() {
		now = time.Now()
	}
	var out []string
	if !st.Paired {
		out = append(out, "not paired with the central service (run: edgegate pair)")
	}
	for _, s := range st.Stages {
		if !s.Healthy {
			p := s.Name + " unhealthy"
			if s.Detail != "" {
				p += ": " + s.Detail
			}
			out = append(out, p)
		}
	}
	if e := st.Policy.ExpiresAt; !e.IsZero() {
		switch {
		case !now.Before(e):
			out = append(out, "policy expired "+Ago(now.Sub(e)))
		case e.Sub(now) < policyExpiryWarn:
			out = append(out, "policy expires in "+Duration(e.Sub(now)))
		}
	}
	for _, u := range st.Policy.Unusable {
		out = append(out, "device "+u.ID+" not served: missing "+strings.Join(u.Missing, ", ")+" (run: "+u.Fix+")")
	}
	q := st.Queue
	if q.QuotaBytes > 0 && float64(q.DiskBytes) >= quotaWarn*float64(q.QuotaBytes) {
		out = append(out, fmt.Sprintf("store at %d%% of its quota", q.DiskBytes*100/q.QuotaBytes))
	}
	for _, b := range q.Brokers {
		if !b.Oldest.IsZero() && now.Sub(b.Oldest) > backlogAgeWarn {
			out = append(out, fmt.Sprintf("backlog for %s is %s old", b.Broker, Duration(now.Sub(b.Oldest))))
		}
	}
	if q.DeadLetters > 0 {
		out = append(out, Plural(q.DeadLetters, "dead letter", "dead letters")+" (refused by a broker for good)")
	}
	for _, d := range st.Devices {
		if len(d.MissingAttrs) > 0 {
			out = append(out, fmt.Sprintf("device %s sends attributes its entity lacks, not stored: %s (add them to the device's model)",
				d.ID, strings.Join(d.MissingAttrs, ", ")))
		}
	}
	if st.Commands.Error != "" {
		out = append(out, "commands: "+st.Commands.Error)
	}
	for _, m := range st.Modbus {
		if m.LastOK.IsZero() && m.LastError != "" {
			out = append(out, fmt.Sprintf("modbus device %s (%s unit %d) never answered: %s", m.Device, m.Line, m.Unit, m.LastError))
		}
	}
	return out
}

// WriteStatus renders st for a person on a small terminal: aligned
// sections, relative ages, binary sizes, and problems marked with "!!" and
// summed up at the end.
func WriteStatus(w io.Writer, st Status) error {
	now := st.Now
	if now.IsZero() {
		now = time.Now()
	}
	var b strings.Builder
	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
	mark := func(bad bool) string {
		if bad {
			return problemMark
		}
		return "  "
	}

	fmt.Fprintf(tw, "Gateway\t%s (edgegate %s)\n", orDash(st.GatewayID), orDash(st.Version))
	if st.NotReady != "" {
		fmt.Fprintf(tw, "Ready\t%s NO: waiting for %s\n", problemMark, st.NotReady)
	}
	pairing := "paired"
	if !st.Paired {
		pairing = problemMark + " NOT PAIRED"
	}
	fmt.Fprintf(tw, "Identity\t%s, %s\n", orDash(shortThumb(st.IdentityThumbprint)), pairing)
	p := st.Policy
	pol := fmt.Sprintf("v%d", p.Version)
	if p.Source != "" {
		pol += " from " + p.Source
	}
	if !p.AppliedAt.IsZero() {
		pol += ", applied " + Ago(now.Sub(p.AppliedAt))
	}
	switch {
	case p.ExpiresAt.IsZero():
		pol += ", no expiry"
	case !now.Before(p.ExpiresAt):
		pol += ", " + problemMark + " EXPIRED " + Ago(now.Sub(p.ExpiresAt))
	case p.ExpiresAt.Sub(now) < policyExpiryWarn:
		pol += ", " + problemMark + " expires in " + Duration(p.ExpiresAt.Sub(now))
	default:
		pol += ", expires in " + Duration(p.ExpiresAt.Sub(now))
	}
	fmt.Fprintf(tw, "Policy\t%s\n", pol)
	if r := p.LastRefusal; r != nil {
		fmt.Fprintf(tw, "\tlast refused %s: %s (v%d)\n", Ago(now.Sub(r.At)), r.Reason, r.Version)
	}
	for _, u := range p.Unusable {
		fmt.Fprintf(tw, "\t%s device %s not served: missing %s\n", problemMark, u.ID, strings.Join(u.Missing, ", "))
		fmt.Fprintf(tw, "\t   fix: %s\n", u.Fix)
	}
	tw.Flush()

	b.WriteString("\nStages\n")
	tw = tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
	for _, s := range st.Stages {
		state := "ok"
		if !s.Healthy {
			state = "FAIL"
		}
		detail := s.Detail
		if !s.Expires.IsZero() {
			if detail != "" {
				detail += ", "
			}
			if now.Before(s.Expires) {
				detail += "expires in " + Duration(s.Expires.Sub(now))
			} else {
				detail += "expired " + Ago(now.Sub(s.Expires))
			}
		}
		fmt.Fprintf(tw, "%s %s\t%s\t%s\n", mark(!s.Healthy), state, s.Name, detail)
	}
	if len(st.Stages) == 0 {
		fmt.Fprintln(tw, "   (none reported)")
	}
	tw.Flush()

	q := st.Queue
	fmt.Fprintf(&b, "\nQueue  %s, %s on disk", Plural(q.Depth, "reading", "readings"), Bytes(q.DiskBytes))
	if q.QuotaBytes > 0 {
		fmt.Fprintf(&b, " of %s (%d%%)", Bytes(q.QuotaBytes), q.DiskBytes*100/q.QuotaBytes)
	}
	b.WriteString("\n")
	tw = tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
	for _, br := range q.Brokers {
		age := "-"
		bad := false
		if !br.Oldest.IsZero() {
			age = "oldest " + Ago(now.Sub(br.Oldest))
			bad = now.Sub(br.Oldest) > backlogAgeWarn
		}
		fmt.Fprintf(tw, "%s %s\t%s\t%s\t%s\n", mark(bad), br.Broker, Count(br.Depth), Bytes(br.Bytes), age)
	}
	if q.DeadLetters > 0 {
		fmt.Fprintf(tw, "%s dead letters\t%s\t\trefused for good\n", problemMark, Count(q.DeadLetters))
	}
	tw.Flush()

	fmt.Fprintf(&b, "\nDevices (%d)\n", len(st.Devices))
	if len(st.Devices) > 0 {
		tw = tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "   ID\tOWNER\tLAST SEEN\tINGESTED\tREFUSED")
		for _, d := range st.Devices {
			seen := "never"
			if !d.LastSeen.IsZero() {
				seen = Ago(now.Sub(d.LastSeen))
			}
			fmt.Fprintf(tw, "   %s\t%s\t%s\t%s\t%s\n", d.ID, orDash(d.Owner), seen, Count(int(d.Ingested)), Count(int(d.Refused)))
		}
		tw.Flush()
		for _, d := range st.Devices {
			if len(d.MissingAttrs) > 0 {
				fmt.Fprintf(&b, "%s %s: not in its entity at the broker (not stored): %s\n", problemMark, d.ID, strings.Join(d.MissingAttrs, ", "))
			}
		}
	}

	writeCommands(&b, st.Commands)
	writeModbus(&b, st.Modbus, now, mark)

	if len(st.PendingNodes) > 0 {
		fmt.Fprintf(&b, "\nRadio nodes waiting to be registered (%d)\n", len(st.PendingNodes))
		tw = tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "   PORT\tNODE\tCHILDREN\tSKETCH\tLAST SEEN")
		for _, n := range st.PendingNodes {
			kids := make([]string, len(n.Children))
			for i, c := range n.Children {
				kids[i] = strconv.Itoa(c)
			}
			seen := "never"
			if !n.LastSeen.IsZero() {
				seen = Ago(now.Sub(n.LastSeen))
			}
			fmt.Fprintf(tw, "   %s\t%d\t%s\t%s\t%s\n", n.Port, n.Node, orDash(strings.Join(kids, ",")), orDash(n.Sketch), seen)
		}
		tw.Flush()
	}

	probs := Problems(st)
	if len(probs) == 0 {
		b.WriteString("\nNo problems.\n")
	} else {
		fmt.Fprintf(&b, "\n%s %s:\n", problemMark, Plural(len(probs), "problem", "problems"))
		for _, p := range probs {
			fmt.Fprintf(&b, "%s   %s\n", problemMark, p)
		}
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// writeCommands is the downlink's line: the records held by state, and
// what the service counted since start.
func writeCommands(b *strings.Builder, c CommandsStatus) {
	if !c.Enabled {
		b.WriteString("\nCommands  off (commands.enabled)\n")
		return
	}
	fmt.Fprintf(b, "\nCommands  on: %d pending, %d sent, %d delivered, %d confirmed, %d expired, %d dropped\n",
		c.Pending, c.Sent, c.Delivered, c.Confirmed, c.Expired, c.Dropped)
	fmt.Fprintf(b, "   since start: %s learned, %s, %s\n", Count(int(c.Learned)),
		Plural(int(c.SendErrors), "send error", "send errors"), Plural(int(c.PollErrors), "platform read error", "platform read errors"))
	if c.Learning != "" {
		fmt.Fprintf(b, "   learning: %s\n", c.Learning)
	}
	if c.Error != "" {
		fmt.Fprintf(b, "%s commands: %s\n", problemMark, c.Error)
	}
}

// writeModbus is one line per Modbus slave: polls, writes, errors by
// cause, last success; a slave that never answered is marked.
func writeModbus(b *strings.Builder, ms []ModbusStatus, now time.Time, mark func(bool) string) {
	if len(ms) == 0 {
		return
	}
	fmt.Fprintf(b, "\nModbus (%d)\n", len(ms))
	tw := tabwriter.NewWriter(b, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "   DEVICE\tLINE/UNIT\tPOLLS\tWRITES\tERRORS\tLAST OK")
	for _, m := range ms {
		causes := make([]string, 0, len(m.Errors))
		for c, n := range m.Errors {
			if n > 0 {
				causes = append(causes, fmt.Sprintf("%s %s", c, Count(int(n))))
			}
		}
		sort.Strings(causes)
		seen := "never"
		if !m.LastOK.IsZero() {
			seen = Ago(now.Sub(m.LastOK))
		}
		fmt.Fprintf(tw, "%s %s\t%s/%d\t%s\t%s\t%s\t%s\n", mark(m.LastOK.IsZero() && m.LastError != ""),
			m.Device, m.Line, m.Unit, Count(int(m.Polls)), Count(int(m.Writes)), orDash(strings.Join(causes, ", ")), seen)
	}
	tw.Flush()
}

// Ago renders a past duration: "just now", "42s ago", "3m ago", "5h ago",
// "2d 4h ago".
func Ago(d time.Duration) string {
	if d < time.Second {
		return "just now"
	}
	return Duration(d) + " ago"
}

// Duration renders d coarsely, two units at most: "42s", "3m", "1h 5m",
// "2d 4h".
func Duration(d time.Duration) string {
	if d < 0 {
		d = -d
	}
	switch {
	case d < time.Minute:
		return fmt.Sprintf("%ds", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm", int(d.Minutes()))
	case d < 24*time.Hour:
		h, m := int(d.Hours()), int(d.Minutes())%60
		if m == 0 {
			return fmt.Sprintf("%dh", h)
		}
		return fmt.Sprintf("%dh %dm", h, m)
	}
	days, h := int(d.Hours())/24, int(d.Hours())%24
	if h == 0 {
		return fmt.Sprintf("%dd", days)
	}
	return fmt.Sprintf("%dd %dh", days, h)
}

// Bytes renders n in binary units: "512 B", "12.3 MiB".
func Bytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit && exp < 5; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

// Count renders n with thousands separators: "12,345".
func Count(n int) string {
	s := strconv.Itoa(n)
	neg := strings.HasPrefix(s, "-")
	s = strings.TrimPrefix(s, "-")
	var b strings.Builder
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	if neg {
		return "-" + b.String()
	}
	return b.String()
}

// Plural renders a count with its noun: "1 device", "12,345 devices".
func Plural(n int, one, many string) string {
	if n == 1 {
		return "1 " + one
	}
	return Count(n) + " " + many
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// shortThumb keeps a thumbprint readable on a small screen: the first 16
// characters identify it well enough to compare with the central service.
func shortThumb(t string) string {
	if len(t) > 19 {
		return t[:16] + "..."
	}
	return t
}
