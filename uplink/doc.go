// Package uplink delivers queued readings to the proxied NGSI v2 brokers
// (the Snap4City Orion Broker Filter in front of Orion) over HTTPS.
//
// Each reading is one PATCH /v2/entities/{device}/attrs. A reading leaves
// the queue only after the broker answered 2xx (Delete) or refused it for
// good (DeadLetter); everything else is retried with backoff, so nothing is
// lost across broker or central outages. Delivery is at-least-once: a
// request cut off by shutdown or a timeout may have been applied and will
// be sent again; the (device, seq) inside the body makes it recognisable.
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
