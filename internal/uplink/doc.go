// Package uplink delivers queued readings to the proxied NGSI v2 brokers
// (the Snap4City Orion Broker Filter in front of Orion) over HTTPS.
//
// Each reading is one PATCH /v2/entities/{device}/attrs?elementid={device}&type=T
// (elementid for filters built before 2026, which read the id from it;
// no secret ever goes into a URL). A reading leaves the queue only after the
// broker accepted it (Delete) or refused it for good (DeadLetter);
// everything else is retried with backoff, so nothing is lost across
// broker or central outages. Delivery is at-least-once: a request cut off
// by shutdown or a timeout may have been applied and will be sent again;
// the (device, seq) inside the body makes it recognisable.
//
// The stock answers (classify.go, with their sources): Orion's 422
// PartialUpdate applied the attributes the entity has and is a delivery
// (the missing ones are counted, edgegate_uplink_missing_attributes_total,
// and listed per device for `edgegate status`); 422 Unprocessable (none
// exists) and 400 are permanent; the filter's "no ownerships or
// delegations" 401, cached by the filter for 3 minutes, and Orion's 404
// (no entity) hold back that device alone, retried for
// Options.RefusalWindow from its first refusal, then dead-lettered
// (refusal.go); "Trouble in ...", "Network problems", "Configuration
// error" 401s and 5xx are transient; "The passed access token is not
// valid" gets a fresh token.
//
// Scheduling: one dispatcher per broker serves the broker's lanes (one per
// device) round-robin with up to Options.Concurrency requests in flight,
// at most one per lane, so each device's readings arrive in order and one
// device's backlog cannot starve the others. Failures that concern the
// whole broker (network, 5xx, 429, token) back off the whole dispatcher.
//
// The package depends on the queue only through the consumer-side Source
// interface; cmd/ wires the real queue and centralsync.TokenSource in.
package uplink
