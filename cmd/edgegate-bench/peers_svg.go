package main

import (
	"bytes"
	"encoding/xml"
	"fmt"
	"strings"
	"text/template"

	"github.com/edgegate/edgegate/internal/logx"
)

// The chart of `edgegate-bench peers` (docs/bench/peers.svg): a
// hand-written SVG, no plotting dependency. Two panels of horizontal bars,
// one group per system: the burst rate as a ratio to Telegraf's, and the
// CPU per 1,000 readings (all the system's processes) in the burst and at
// the paced rate.

type svgBar struct {
	X, Y, W, H float64
	Fill       string
	Label      string // the value, at the bar's end
}

type svgRow struct {
	Y     float64
	Name  string // XML-escaped
	Bars  []svgBar
	Error string
}

type svgPanel struct {
	Title  string
	Y      float64
	Rows   []svgRow
	RefX   float64 // a reference line (x of 1.0 × Telegraf), 0: none
	RefY1  float64
	RefY2  float64
	Legend []svgBar
}

type svgChart struct {
	W, H     float64
	Title    string
	Subtitle string
	Panels   []svgPanel
}

const svgTmpl = `<svg xmlns="http://www.w3.org/2000/svg" width="{{.W}}" height="{{.H}}" viewBox="0 0 {{.W}} {{.H}}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="#ffffff"/>
<text x="10" y="20" font-size="15" font-weight="bold">{{.Title}}</text>
<text x="10" y="38" fill="#555555">{{.Subtitle}}</text>
{{- range .Panels}}
<text x="10" y="{{.Y}}" font-size="13" font-weight="bold">{{.Title}}</text>
{{- range .Legend}}
<rect x="{{.X}}" y="{{.Y}}" width="10" height="10" fill="{{.Fill}}"/><text x="{{printf "%.0f" (add .X 14)}}" y="{{printf "%.0f" (add .Y 9)}}">{{.Label}}</text>
{{- end}}
{{- if .RefX}}
<line x1="{{printf "%.1f" .RefX}}" y1="{{.RefY1}}" x2="{{printf "%.1f" .RefX}}" y2="{{.RefY2}}" stroke="#333333" stroke-dasharray="4 3"/><text x="{{printf "%.1f" .RefX}}" y="{{printf "%.0f" (sub .RefY1 3)}}" text-anchor="middle" font-size="10">Telegraf = 1.0</text>
{{- end}}
{{- range .Rows}}
<text x="300" y="{{printf "%.0f" (add .Y 12)}}" text-anchor="end">{{.Name}}</text>
{{- if .Error}}<text x="310" y="{{printf "%.0f" (add .Y 12)}}" fill="{{if eq .Error "—"}}#777777{{else}}#b00000{{end}}">{{.Error}}</text>{{end}}
{{- range .Bars}}
<rect x="{{.X}}" y="{{.Y}}" width="{{printf "%.1f" .W}}" height="{{.H}}" fill="{{.Fill}}"/><text x="{{printf "%.1f" (add (add .X .W) 4)}}" y="{{printf "%.0f" (add .Y (sub .H 2))}}" font-size="11">{{.Label}}</text>
{{- end}}
{{- end}}
{{- end}}
</svg>
`

func xmlEscape(s string) string {
	var b strings.Builder
	_ = xml.EscapeText(&b, []byte(s))
	return b.String()
}

func peersSVG(res *peersResults) string {
	const left, right = 310.0, 110.0
	width := 900.0
	lo, hi := loadRange(res.Systems)
	span := width - left - right
	c := svgChart{W: width, Title: "edgegate vs Telegraf " + xmlEscape(res.TelegrafVersion) + " vs the raw broker",
		Subtitle: xmlEscape(fmt.Sprintf("%s, %d cores (load %.1f–%.1f), %d QoS 1 devices, %d-reading bursts, paced %.0f/s; best of %d round(s); %s%s",
			res.Machine.CPU, res.Machine.Cores, lo, hi, res.Devices, res.Readings, res.PacedRate, max(res.Rounds, 1), res.Started.Format("2006-01-02"),
			map[bool]string{true: " (quick run)"}[res.Quick]))}
	y := 70.0
	// Panel 1: burst rate ÷ Telegraf.
	p1 := svgPanel{Title: "burst rate ÷ Telegraf's burst rate", Y: y}
	maxR, haveTelegraf := 1.0, false
	for _, r := range res.Rows {
		maxR = max(maxR, r.VsTelegraf)
		haveTelegraf = haveTelegraf || r.VsTelegraf > 0
	}
	y += 12
	p1.RefY1 = y
	for _, r := range res.Rows {
		row := svgRow{Y: y, Name: xmlEscape(r.Name)}
		switch {
		case r.VsTelegraf > 0:
			row.Bars = []svgBar{{X: left, Y: y, W: span * r.VsTelegraf / maxR, H: 16, Fill: barColour(r.Name),
				Label: fmt.Sprintf("%.2f × (%.0f /s)", r.VsTelegraf, r.Rate)}}
		case r.Error != "":
			row.Error = "error: " + xmlEscape(logx.Clip(r.Error, 70))
		default:
			row.Error = "—" // no Telegraf row in this run
		}
		p1.Rows = append(p1.Rows, row)
		y += 22
	}
	p1.RefY2 = y
	if haveTelegraf {
		p1.RefX = left + span/maxR
	}
	y += 30
	// Panel 2: CPU per 1,000 readings, burst and paced.
	p2 := svgPanel{Title: "CPU ms per 1,000 readings (all processes of the system, broker included)", Y: y}
	p2.Legend = []svgBar{{X: left, Y: y + 6, Fill: "#4e79a7", Label: "burst"},
		{X: left + 80, Y: y + 6, Fill: "#a0cbe8", Label: xmlEscape(fmt.Sprintf("paced %.0f/s", res.PacedRate))}}
	maxC := 0.0
	for _, r := range res.Rows {
		maxC = max(maxC, r.CPUBurst, r.CPUPaced)
	}
	y += 24
	for _, r := range res.Rows {
		row := svgRow{Y: y, Name: xmlEscape(r.Name)}
		if maxC > 0 && (r.CPUBurst > 0 || r.CPUPaced > 0) {
			row.Bars = []svgBar{
				{X: left, Y: y, W: span * r.CPUBurst / maxC, H: 10, Fill: "#4e79a7", Label: fmt.Sprintf("%.0f", r.CPUBurst)},
				{X: left, Y: y + 11, W: span * r.CPUPaced / maxC, H: 10, Fill: "#a0cbe8", Label: fmt.Sprintf("%.0f", r.CPUPaced)},
			}
		} else {
			row.Error = "—"
		}
		p2.Rows = append(p2.Rows, row)
		y += 28
	}
	c.Panels = []svgPanel{p1, p2}
	c.H = y + 10
	var b bytes.Buffer
	t := template.Must(template.New("svg").Funcs(template.FuncMap{
		"add": func(a, b float64) float64 { return a + b },
		"sub": func(a, b float64) float64 { return a - b },
	}).Parse(svgTmpl))
	if err := t.Execute(&b, c); err != nil {
		return "<!-- " + xmlEscape(err.Error()) + " -->"
	}
	return b.String()
}

func barColour(name string) string {
	switch {
	case strings.HasPrefix(name, "raw"):
		return "#bab0ac"
	case strings.HasPrefix(name, "Telegraf"):
		return "#f28e2b"
	default:
		return "#4e79a7"
	}
}
