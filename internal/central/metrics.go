package central

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// serviceMetrics are the companion's metrics, on its own registry.
type serviceMetrics struct {
	reg          *prometheus.Registry
	rounds       *prometheus.CounterVec
	buildRefused prometheus.Counter
	refusedNow   prometheus.Gauge
	signed       prometheus.Counter
	pushes       prometheus.Counter
	receipts     *prometheus.CounterVec
	// roundSeconds is how long one platform round takes (read, build,
	// sign, push): the dashboard's build duration, and the floor of a
	// change's push latency.
	roundSeconds prometheus.Histogram
}

func newServiceMetrics(s *Service) *serviceMetrics {
	m := &serviceMetrics{
		reg: prometheus.NewRegistry(),
		rounds: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "edgegate_central_platform_rounds_total",
			Help: "Platform rounds by result: ok, partial (some gateways refused), refused (nothing published)."}, []string{"result"}),
		buildRefused: prometheus.NewCounter(prometheus.CounterOpts{Name: "edgegate_central_policy_refused_total",
			Help: "Gateway policies not published because the platform's answer for them was incomplete."}),
		refusedNow: prometheus.NewGauge(prometheus.GaugeOpts{Name: "edgegate_central_gateways_refused",
			Help: "Gateways whose policy the last round refused to publish (alert when > 0)."}),
		signed: prometheus.NewCounter(prometheus.CounterOpts{Name: "edgegate_central_bundles_signed_total",
			Help: "Policy bundles signed."}),
		pushes: prometheus.NewCounter(prometheus.CounterOpts{Name: "edgegate_central_pushes_total",
			Help: "Bundles published on the push broker."}),
		receipts: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "edgegate_central_receipts_total",
			Help: "Receipts by result: accepted, invalid, key_mismatch, unknown_version."}, []string{"result"}),
		// 10 ms .. 4 min (+Inf above): a round of a handful of gateways
		// to one of 100,000 (docs/central.md, Scale).
		roundSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "edgegate_central_round_duration_seconds",
			Help:    "Seconds of one platform round: read the platform, build, sign and push.",
			Buckets: prometheus.ExponentialBuckets(0.01, 2.5, 12)}),
	}
	m.reg.MustRegister(m.rounds, m.buildRefused, m.refusedNow, m.signed, m.pushes, m.receipts, m.roundSeconds, &fleetCollector{s: s})
	return m
}

var (
	descVersion = prometheus.NewDesc("edgegate_central_gateway_policy_version",
		"Newest policy version issued to the gateway.", []string{"gateway"}, nil)
	descApplied = prometheus.NewDesc("edgegate_central_gateway_applied_version",
		"Policy version the gateway's last receipt reports applied.", []string{"gateway"}, nil)
	descSince = prometheus.NewDesc("edgegate_central_gateway_applied_since_seconds",
		"Unix time of the first receipt for the applied version.", []string{"gateway"}, nil)
	descStale = prometheus.NewDesc("edgegate_central_gateways_stale",
		"Gateways whose receipts lag behind a bundle issued more than stale_after ago.", nil, nil)
	descGateways = prometheus.NewDesc("edgegate_central_gateways",
		"Gateways known to the companion.", nil, nil)
)

// fleetCollector reads the store at scrape time.
type fleetCollector struct{ s *Service }

func (c *fleetCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descVersion, descApplied, descSince, descStale, descGateways} {
		ch <- d
	}
}

func (c *fleetCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	fleet, err := c.s.Fleet(ctx)
	if err != nil {
		return
	}
	stale := 0
	for _, e := range fleet {
		ch <- prometheus.MustNewConstMetric(descVersion, prometheus.GaugeValue, float64(e.Version), e.Gateway)
		ch <- prometheus.MustNewConstMetric(descApplied, prometheus.GaugeValue, float64(e.Applied), e.Gateway)
		if !e.AppliedSince.IsZero() {
			ch <- prometheus.MustNewConstMetric(descSince, prometheus.GaugeValue, float64(e.AppliedSince.Unix()), e.Gateway)
		}
		if e.Stale {
			stale++
		}
	}
	ch <- prometheus.MustNewConstMetric(descStale, prometheus.GaugeValue, float64(stale))
	ch <- prometheus.MustNewConstMetric(descGateways, prometheus.GaugeValue, float64(len(fleet)))
}
