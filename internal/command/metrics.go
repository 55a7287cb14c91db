package command

import "github.com/prometheus/client_golang/prometheus"

// Collector exports the service's counters (Stats) at scrape time as
// edgegate_commands_total{event}, so the service keeps one set of counters
// and /metrics can never disagree with what Stats says.
func (s *Service) Collector() prometheus.Collector {
	return statsCollector{s: s, desc: prometheus.NewDesc("edgegate_commands_total",
		"Commands to actuators by event: polls and poll errors of the platform, commands learned (platform, local), superseded, sent, delivered, confirmed, expired, dropped, send errors, write-backs and their failures; Orion subscriptions: notifications (and those ignored), reads they caused, subscriptions made and deleted, probes refused or failed.",
		[]string{"event"}, nil)}
}

type statsCollector struct {
	s    *Service
	desc *prometheus.Desc
}

func (c statsCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

func (c statsCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.s.Stats()
	for _, e := range []struct {
		name string
		v    uint64
	}{
		{"poll", st.Polls}, {"poll_error", st.PollErrors},
		{"learned", st.Learned}, {"local", st.Local}, {"superseded", st.Superseded},
		{"sent", st.Sent}, {"delivered", st.Delivered}, {"confirmed", st.Confirmed},
		{"expired", st.Expired}, {"dropped", st.Dropped}, {"send_error", st.SendErrors},
		{"write_back", st.WriteBacks}, {"write_back_failure", st.WriteBackFailures},
		{"notification", st.Notifications}, {"notification_ignored", st.NotifyIgnored}, {"hint_read", st.Hints},
		{"subscribed", st.Subscribed}, {"unsubscribed", st.Unsubscribed},
		{"probe_refused", st.ProbeRefused}, {"probe_failed", st.ProbeFailed},
	} {
		ch <- prometheus.MustNewConstMetric(c.desc, prometheus.CounterValue, float64(e.v), e.name)
	}
}
