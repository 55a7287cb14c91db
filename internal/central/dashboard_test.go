package central

import (
	"context"
	"encoding/json"
	"os"
	"reflect"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/edgegate/edgegate/internal/metrics"
	"github.com/edgegate/edgegate/internal/testkit"
)

// dashboardPath is the Grafana dashboard the edgegate-central package
// ships (/usr/share/edgegate-central/grafana/).
const dashboardPath = "../../packaging/central/grafana/edgegate-fleet.json"

// promQL keywords, aggregation modifiers and the like: words in an
// expression that are not metric names.
var promKeywords = map[string]bool{"by": true, "without": true, "on": true, "ignoring": true, "group_left": true,
	"group_right": true, "bool": true, "and": true, "or": true, "unless": true, "offset": true, "inf": true, "nan": true}

var (
	promString   = regexp.MustCompile(`"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|` + "`[^`]*`")
	promMatchers = regexp.MustCompile(`\{[^{}]*\}`)
	promRange    = regexp.MustCompile(`\[[^\]]*\]`)
	promGrouping = regexp.MustCompile(`\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)`)
	promOffset   = regexp.MustCompile(`\boffset\s+-?[0-9][0-9a-z]*`)
	promVariable = regexp.MustCompile(`\$\{?[A-Za-z_][A-Za-z0-9_]*\}?`)
	promWord     = regexp.MustCompile(`[A-Za-z_:][A-Za-z0-9_:]*(\s*\()?`)
)

// promMetrics returns the metric names an expression selects: every word
// that is not a function call, keyword, label (in {...} or a grouping),
// duration or Grafana variable.
func promMetrics(expr string) []string {
	e := promString.ReplaceAllString(expr, `""`)
	e = promVariable.ReplaceAllString(e, "1")
	e = promMatchers.ReplaceAllString(e, "")
	e = promRange.ReplaceAllString(e, "")
	e = promOffset.ReplaceAllString(e, "")
	e = promGrouping.ReplaceAllString(e, "")
	var out []string
	for _, m := range promWord.FindAllStringSubmatch(e, -1) {
		w := strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(m[0]), "("))
		if m[1] != "" || promKeywords[strings.ToLower(w)] {
			continue // a function (rate, histogram_quantile, time, ...) or keyword
		}
		out = append(out, w)
	}
	return out
}

func TestPromMetrics(t *testing.T) {
	tests := []struct {
		expr string
		want []string
	}{
		{`sum(rate(edgegate_central_pushes_total{job=~"$central_job"}[$__rate_interval]))`, []string{"edgegate_central_pushes_total"}},
		{`histogram_quantile(0.99, sum by (le) (rate(x_seconds_bucket{a="b"}[5m])))`, []string{"x_seconds_bucket"}},
		{`(max by (gateway) (a) - max by (gateway) (b)) > 0`, []string{"a", "b"}},
		{`time() - max by (gateway) (c{job=~"$j"})`, []string{"c"}},
		{`sum without (instance) (d) / on (job) group_left (x) e offset 5m`, []string{"d", "e"}},
		{`f{job="by (le) rate("} * 2`, []string{"f"}},
	}
	for _, tt := range tests {
		if got := promMetrics(tt.expr); !reflect.DeepEqual(got, tt.want) {
			t.Errorf("promMetrics(%q) = %q, want %q", tt.expr, got, tt.want)
		}
	}
}

// describedNames are the metric names a collector describes: what a
// registry will serve, even for a vector that has no series yet.
func describedNames(cs ...prometheus.Collector) map[string]bool {
	out := map[string]bool{}
	fq := regexp.MustCompile(`fqName: "([^"]+)"`)
	for _, c := range cs {
		ch := make(chan *prometheus.Desc, 64)
		go func() { c.Describe(ch); close(ch) }()
		for d := range ch {
			if m := fq.FindStringSubmatch(d.String()); m != nil {
				out[m[1]] = true
			}
		}
	}
	return out
}

// collectorsOf are the struct's fields that are collectors.
func collectorsOf(v any) []prometheus.Collector {
	var out []prometheus.Collector
	rv := reflect.ValueOf(v).Elem()
	for i := range rv.NumField() {
		f := rv.Field(i)
		if f.Kind() != reflect.Pointer && f.Kind() != reflect.Interface || f.IsNil() {
			continue
		}
		if !f.CanInterface() {
			f = reflect.NewAt(f.Type(), f.Addr().UnsafePointer()).Elem() // unexported field of our own package
		}
		if c, ok := f.Interface().(prometheus.Collector); ok {
			out = append(out, c)
		}
	}
	return out
}

// TestDashboardMetricsExist: every metric every panel of the shipped
// Grafana dashboard queries is served, by the real companion (its
// /metrics over HTTPS after a round, a push and a receipt, plus what its
// collectors describe) or by the gateway's registry (internal/metrics,
// with its Go and process collectors). A histogram is used through its
// _bucket, _sum and _count series.
func TestDashboardMetricsExist(t *testing.T) {
	b, err := os.ReadFile(dashboardPath)
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		SchemaVersion int `json:"schemaVersion"`
		Templating    struct {
			List []struct{ Name, Type, Query any }
		} `json:"templating"`
		Panels []dashPanel `json:"panels"`
	}
	if err := json.Unmarshal(b, &dash); err != nil {
		t.Fatalf("%s: %v", dashboardPath, err)
	}
	if dash.SchemaVersion < 36 {
		t.Errorf("schemaVersion %d, want >= 36", dash.SchemaVersion)
	}
	hasDS := false
	for _, v := range dash.Templating.List {
		hasDS = hasDS || (v.Type == "datasource" && v.Query == "prometheus")
	}
	if !hasDS {
		t.Error("no Prometheus datasource variable in templating")
	}

	// The companion, really running: a gateway with a device, a round, a
	// push and an accepted receipt, so its vectors have series.
	e := newEnv(t, nil)
	e.insert("alice", "th-1", "gw-a")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	g := e.startGateway(ctx, "gw-a", "gw-a-client", gwASecret)
	if _, err := e.svc.Refresh(ctx, true); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, 10*time.Second, "the gateway's receipt for its first bundle", func() bool {
		f, err := e.svc.Fleet(ctx)
		return g.engine.Current().Version > 0 && err == nil && len(f) > 0 && f[0].Applied > 0
	})
	resp, body := e.do("GET", MetricsPath, "", nil, nil)
	if resp.StatusCode != 200 {
		t.Fatalf("GET /metrics: %d", resp.StatusCode)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	scraped, err := parser.TextToMetricFamilies(strings.NewReader(string(body)))
	if err != nil {
		t.Fatalf("parse /metrics: %v", err)
	}
	served := map[string]prometheus.Collector{} // name -> nil; kinds below
	kinds := map[string]string{}
	for name, mf := range scraped {
		served[name], kinds[name] = nil, mf.GetType().String()
	}
	for name := range describedNames(append(collectorsOf(e.svc.metrics), &fleetCollector{s: e.svc})...) {
		if _, ok := kinds[name]; !ok {
			served[name], kinds[name] = nil, "described"
		}
	}
	gwm := metrics.New()
	for name := range describedNames(collectorsOf(gwm)...) {
		served[name], kinds[name] = nil, "described"
	}
	gathered, err := gwm.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range gathered {
		served[mf.GetName()], kinds[mf.GetName()] = nil, mf.GetType().String()
	}
	// Histograms (and summaries): their series names.
	for _, c := range append(collectorsOf(e.svc.metrics), collectorsOf(gwm)...) {
		for name := range describedNames(c) {
			switch c.(type) {
			case prometheus.Histogram, *prometheus.HistogramVec:
				for _, s := range []string{"_bucket", "_sum", "_count"} {
					served[name+s], kinds[name+s] = nil, "histogram series"
				}
			}
		}
	}
	for name, mf := range scraped {
		if mf.GetType().String() == "HISTOGRAM" {
			for _, s := range []string{"_bucket", "_sum", "_count"} {
				served[name+s], kinds[name+s] = nil, "histogram series"
			}
		}
	}

	used := 0
	ids := map[int]string{}
	for _, p := range flattenPanels(dash.Panels) {
		if other, dup := ids[p.ID]; dup {
			t.Errorf("panels %q and %q share id %d (Grafana keeps one)", other, p.Title, p.ID)
		}
		ids[p.ID] = p.Title
		if len(p.Targets) == 0 && p.Type != "row" {
			t.Errorf("panel %q has no query", p.Title)
		}
		if p.Type != "row" && (p.Datasource.Type != "prometheus" || p.Datasource.UID != "${datasource}") {
			t.Errorf("panel %q: datasource %+v, want the ${datasource} variable", p.Title, p.Datasource)
		}
		for _, tg := range p.Targets {
			names := promMetrics(tg.Expr)
			if len(names) == 0 {
				t.Errorf("panel %q: query %s %q uses no metric", p.Title, tg.RefID, tg.Expr)
			}
			for _, n := range names {
				used++
				if _, ok := served[n]; !ok {
					t.Errorf("panel %q: query %s uses metric %s, which neither the companion nor the gateway serves", p.Title, tg.RefID, n)
				}
			}
		}
	}
	if used < 20 {
		t.Errorf("only %d metric uses found in the dashboard: the parser or the file is wrong", used)
	}
	var names []string
	for n := range served {
		names = append(names, n)
	}
	sort.Strings(names)
	t.Logf("%d metric uses checked against %d served names", used, len(names))
}

type dashPanel struct {
	ID         int `json:"id"`
	Datasource struct {
		Type string `json:"type"`
		UID  string `json:"uid"`
	} `json:"datasource"`
	Type    string      `json:"type"`
	Title   string      `json:"title"`
	Panels  []dashPanel `json:"panels"`
	Targets []struct {
		RefID string `json:"refId"`
		Expr  string `json:"expr"`
	} `json:"targets"`
}

func flattenPanels(ps []dashPanel) []dashPanel {
	var out []dashPanel
	for _, p := range ps {
		out = append(out, p)
		out = append(out, flattenPanels(p.Panels)...)
	}
	return out
}
