// Package metrics holds the daemon's Prometheus metrics. One Metrics value is
// built in main and passed to every stage; there is no global registry.
//
// Names are part of the product's interface (documented in README.md): change
// them only with a note in the changelog.
package metrics

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// Metrics is the set of metrics every stage reports to.
type Metrics struct {
	Registry *prometheus.Registry

	// Ingested counts readings accepted from a source, by source kind.
	Ingested *prometheus.CounterVec
	// Refused counts readings refused before queuing, by reason
	// (unknown_device, invalid, too_large, quota, ...).
	Refused *prometheus.CounterVec
	// Queued counts readings durably committed to the queue.
	Queued prometheus.Counter
	// CommitBatch observes how many readings one synced commit carried.
	CommitBatch prometheus.Histogram
	// CommitSeconds observes how long one commit took to write and sync:
	// on an SD card, the first sign of a failing or worn-out card.
	CommitSeconds prometheus.Histogram
	// Delivered counts readings a broker accepted, by broker.
	Delivered *prometheus.CounterVec
	// Retried counts delivery attempts that will be retried, by reason.
	Retried *prometheus.CounterVec
	// DeadLettered counts readings moved to the dead-letter area, by reason.
	DeadLettered *prometheus.CounterVec
	// DeliveryLatency observes seconds from queuing to the broker's 2xx.
	DeliveryLatency prometheus.Histogram
	// RequestLatency observes seconds of one uplink HTTP request, by outcome.
	RequestLatency *prometheus.HistogramVec
	// TokenRefreshes counts access-token fetches, by result.
	TokenRefreshes *prometheus.CounterVec
	// PolicyApplied counts policies put in force, by source.
	PolicyApplied *prometheus.CounterVec
	// PolicyRefused counts policies refused, by reason (bad_signature,
	// unknown_key, rollback, expired, malformed, oversized, fetch).
	PolicyRefused *prometheus.CounterVec
	// PolicyVersion is the version of the policy in force.
	PolicyVersion prometheus.Gauge
	// PolicyExpiry is the expiry of the policy in force, unix seconds (0: none).
	PolicyExpiry prometheus.Gauge
	// AccessDenied counts local MQTT access refusals, by action
	// (connect, publish, subscribe, deliver) and reason.
	AccessDenied *prometheus.CounterVec
	// MQTTAccountChanges counts changes made to an external Mosquitto's
	// accounts to bring them in line with the policy, by kind (create,
	// update, delete, acl, ingest); MQTTAccountSyncErrors counts failed
	// reconciliations.
	MQTTAccountChanges    *prometheus.CounterVec
	MQTTAccountSyncErrors prometheus.Counter
	// LimitHits counts limits of the embedded broker reached, by limit
	// (connections_per_device, subscriptions_per_client, retained_bytes,
	// connect_timeout, ...: mqtt/caps.go).
	LimitHits *prometheus.CounterVec
	// AttrsDropped counts attributes left out of a reading because stock
	// Orion would refuse the whole request for them, by reason
	// (forbidden_chars, bad_name, bad_type).
	AttrsDropped *prometheus.CounterVec
	// MissingAttrs counts attributes a broker did not store because the
	// device's entity lacks them (Orion 422 PartialUpdate/Unprocessable).
	// No device label: a gateway serves many devices; `edgegate status`
	// names them.
	MissingAttrs prometheus.Counter
}

// New builds the metrics on a fresh registry, with the Go and process
// collectors.
func New() *Metrics {
	r := prometheus.NewRegistry()
	m := &Metrics{
		Registry: r,
		Ingested: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "edgegate_readings_ingested_total", Help: "Readings accepted from a source.",
		}, []string{"source"}),
		Refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "edgegate_readings_refused_total", Help: "Readings refused before queuing, by reason.",
		}, []string{"reason"}),
		Queued: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "edgegate_readings_queued_total", Help: "Readings durably committed to the queue.",
		}),
		CommitBatch: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "edgegate_queue_commit_batch_size", Help: "Readings per synced queue commit.",
			Buckets: []float64{1, 2, 4, 8, 16, 32, 64, 128, 256, 512},
		}),
		CommitSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "edgegate_queue_commit_seconds", Help: "Seconds one queue commit took to write and sync (fsync) its readings.",
			Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5},
		}),
		Delivered: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "edgegate_readings_delivered_total", Help: "Readings a broker accepted.",
		}, []string{"broker"}),
		Retried: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "edgegate_delivery_retries_total", Help: "Delivery attempts that will be retried, by reason.",
		}, []string{"reason"}),
		DeadLettered: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "edgegate_readings_dead_lettered_total", Help: "Readings moved to the dead-letter area, by reason.",
		}, []string{"reason"}),
		DeliveryLatency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "edgegate_delivery_latency_seconds", Help: "Seconds from queuing to the broker's 2xx.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 16),
		}),
		RequestLatency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "edgegate_uplink_request_seconds", Help: "Seconds of one uplink HTTP request, by outcome.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 14),
		}, []string{"outcome"}),
		TokenRefreshes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "edgegate_token_fetches_total", Help: "Access-token fetches from the central service, by result.",
		}, []string{"result"}),
		PolicyApplied: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "edgegate_policy_applied_total", Help: "Policies put in force, by source.",
		}, []string{"source"}),
		PolicyRefused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "edgegate_policy_refused_total", Help: "Policies refused, by reason.",
		}, []string{"reason"}),
		PolicyVersion: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "edgegate_policy_version", Help: "Version of the policy in force.",
		}),
		PolicyExpiry: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "edgegate_policy_expiry_timestamp_seconds", Help: "Expiry of the policy in force (0: none).",
		}),
		MQTTAccountChanges: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "edgegate_mqtt_account_changes_total", Help: "Changes made to the external broker's accounts to match the policy, by kind.",
		}, []string{"kind"}),
		MQTTAccountSyncErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "edgegate_mqtt_account_sync_errors_total", Help: "Failed reconciliations of the external broker's accounts with the policy.",
		}),
		AccessDenied: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "edgegate_mqtt_access_denied_total", Help: "Local MQTT access refusals, by action and reason.",
		}, []string{"action", "reason"}),
		LimitHits: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "edgegate_mqtt_limit_hits_total", Help: "Limits of the local MQTT broker reached, by limit.",
		}, []string{"limit"}),
		AttrsDropped: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "edgegate_attributes_dropped_total", Help: "Attributes left out of readings because the broker would refuse them, by reason.",
		}, []string{"reason"}),
		MissingAttrs: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "edgegate_uplink_missing_attributes_total", Help: "Attributes the broker did not store because the device's entity lacks them.",
		}),
	}
	r.MustRegister(m.AttrsDropped, m.MissingAttrs, m.LimitHits)
	r.MustRegister(m.PolicyApplied, m.PolicyRefused, m.PolicyVersion, m.PolicyExpiry, m.AccessDenied)
	r.MustRegister(m.MQTTAccountChanges, m.MQTTAccountSyncErrors)
	r.MustRegister(m.Ingested, m.Refused, m.Queued, m.CommitBatch, m.CommitSeconds, m.Delivered, m.Retried,
		m.DeadLettered, m.DeliveryLatency, m.RequestLatency, m.TokenRefreshes,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}
