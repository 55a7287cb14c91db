package uplink

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net/http"
	"time"

	"github.com/edgegate/edgegate/internal/envelope"
	"github.com/edgegate/edgegate/internal/queue"
)

// Batch mode: POST {broker}/v2/op/update with
//
//	{"actionType":"append","entities":[{"id":…,"type":…,<attrs of reading 1>}, …]}
//
// for brokers reached without the Orion Broker Filter (which only lets
// PATCH /v2/entities/{id}/attrs through). Each entity is one reading,
// each attribute with its own signature and TimeInstant metadata, exactly
// the body the filter mode would PATCH plus id and type.
//
// Ordering. A lane (device) is in at most one request at a time, as in
// filter mode, so a device's next batch starts only once its previous one
// was answered. Within a batch a device may appear several times (up to
// PerDevice readings), in seq order: Orion processes the entities of an
// op/update one after the other, in array order, each as its own update
// of the entity (with its own notifications), so the broker sees the same
// sequence of updates as with one PATCH per reading, and the entity ends
// with each attribute's last value and signature. ("append" adds
// attributes the entity lacks, where PATCH would refuse them with 422.)
//
// Failures. A 2xx (or a 422 PartialUpdate: Orion applied what it could)
// settles every reading of the batch. A refusal of a listed device is
// split like a permanent one, then retried per device within the refusal
// window (refusal.go). Transient failures
// back the broker off and the same lanes are retried. A permanent refusal
// (4xx) of a batch of several readings dead-letters nothing: each of its
// lanes is then sent alone, one reading per request, so that the refusal
// names one reading, which alone is dead-lettered. Orion may have applied
// the entities before a failing one: those are sent again
// (at-least-once; the (device, seq) in the signed envelope identifies the
// duplicates). One batch carries one Fiware-Service/ServicePath: readings
// of other tenants wait for another batch.

const (
	defaultBatchSize  = 256
	defaultBatchBytes = 512 << 10
	defaultPerDevice  = 32
)

// fillBatches starts batch jobs for idle lanes, round-robin from start,
// cutting them into batches of up to BatchSize readings over the free
// request slots so that requests overlap (pipelining) instead of one batch
// taking every lane, once a full batch is ready, the broker has a backlog
// or the linger is over.
func (d *dispatcher) fillBatches(start int) {
	n := len(d.lanes)
	free := d.u.opts.Concurrency - d.inflight
	var idle, busy []queue.Lane
	for i := 0; i < n; i++ {
		l := d.lanes[(start+i)%n]
		if d.busy[l] {
			if !d.solo[l] {
				busy = append(busy, l)
			}
			continue
		}
		if held, _ := d.refusalState(l, d.u.opts.Now()); held {
			continue
		}
		if d.solo[l] {
			if free > 0 {
				d.startBatch([]queue.Lane{l}, true)
				free--
			}
			continue
		}
		idle = append(idle, l)
	}
	if len(idle) == 0 || free <= 0 {
		d.lingerUntil = time.Time{}
		return
	}
	// How full a batch of the idle lanes would be. Counted in readings,
	// not lanes: at a moderate pace each device holds one or two readings,
	// and "8 devices have something" (what this counted before) still made
	// a request of ~10 readings every few milliseconds — at 1,500
	// readings/s ~100 requests/s, each with its Peek, TLS write, response
	// and Delete (the uplink was 11 % of the daemon's CPU at that pace,
	// docs/bench/profiles/pace-before-*).
	//
	// Full is BatchSize scaled by the share of the broker's lanes that are
	// idle: under a burst most lanes are in requests on their way, and the
	// few that come back must not wait for a whole batch of their own
	// (that capped a 50-device burst at ~1,600/s); at a moderate pace every
	// lane is idle between requests and the threshold is BatchSize.
	counts := make([]int, len(idle))
	ready := 0
	for i := range idle {
		counts[i] = d.ready(idle[i : i+1])
		ready += counts[i]
	}
	full := max(1, d.u.opts.BatchSize*len(idle)/max(1, len(d.lanes)))
	if linger := d.u.opts.BatchLinger; linger > 0 && ready < full && d.waiting(idle, busy) < d.u.opts.BatchSize {
		// Under load — another request on its way, or one started less
		// than linger ago — let more readings gather, up to linger, so
		// that a moderate load does not become one request per handful
		// of readings. A quiet gateway's reading goes at once.
		//
		// Only while the broker's whole backlog is less than a batch
		// (issue 20): with more waiting, in busy lanes too, the gateway
		// is behind (a burst), waiting gains nothing, and a lingering
		// lane only left request slots empty (100 ms cut a 50-device
		// burst from ~9,000 to ~5,600 readings/s in make bench-peers).
		now := time.Now()
		if d.lingerUntil.IsZero() {
			switch {
			case d.inflight > 0:
				d.lingerUntil = now.Add(linger)
			case now.Sub(d.lastBatch) < linger:
				d.lingerUntil = d.lastBatch.Add(linger)
			}
		}
		if now.Before(d.lingerUntil) {
			return
		}
	}
	d.lingerUntil = time.Time{}
	d.lastBatch = time.Now()
	if ready < d.u.opts.BatchSize {
		// What a linger gathered (or all there is) goes in one request.
		d.startBatch(idle, false)
		return
	}
	// Cut the lanes into batches of up to BatchSize readings, one per free
	// request slot, so that requests overlap (a burst). A lane no batch
	// can fill stays idle for the next free slot: before, the idle lanes
	// were spread evenly over the batches, and a batch of 13 lanes of 32
	// readings held 5 lanes busy it had no room for.
	for len(idle) > 0 && free > 0 {
		k, sum := 0, 0
		for k < len(idle) && (k == 0 || sum+counts[k] <= d.u.opts.BatchSize) {
			sum += counts[k]
			k++
		}
		if sum == 0 {
			break // the rest has nothing synced yet
		}
		d.startBatch(idle[:k:k], false)
		idle, counts = idle[k:], counts[k:]
		free--
	}
}

// waiting estimates the broker's readings not in a request: all those of
// the idle lanes, and those of the busy lanes less what their requests
// took (at most PerDevice each). Lanes held by a refusal or sent one
// reading at a time (solo) are left out: their backlog cannot go in a
// batch now, and a refused device's must not end the linger of all the
// others. One lock and a map lookup per lane, as ready.
func (d *dispatcher) waiting(idle, busy []queue.Lane) int {
	n := d.u.src.Ready(idle, math.MaxInt)
	if len(busy) > 0 {
		n += d.u.src.Ready(busy, math.MaxInt) - d.ready(busy)
	}
	return n
}

// ready counts the readings of lanes a batch could take now.
func (d *dispatcher) ready(lanes []queue.Lane) int {
	return d.u.src.Ready(lanes, d.u.opts.PerDevice)
}

func (d *dispatcher) startBatch(lanes []queue.Lane, solo bool) {
	for _, l := range lanes {
		d.busy[l] = true
	}
	d.inflight++
	d.cursor = lanes[len(lanes)-1].Device
	j := job{lane: lanes[0], lanes: lanes, solo: solo, epoch: d.epoch, gen: d.gen}
	if solo {
		_, j.expired = d.refusalState(lanes[0], d.u.opts.Now())
	}
	d.jobs <- j // never blocks: at most Concurrency jobs are in flight
}

// attemptBatch sends the head readings of the job's lanes in one op/update
// and settles them with the queue when the broker's answer is final.
func (d *dispatcher) attemptBatch(ctx context.Context, j job) result {
	u := d.u
	r := result{job: j}
	perDevice := u.opts.PerDevice
	if j.solo {
		perDevice = 1
	}
	var items []queue.Item
	var size int
	var svc, svcPath string
	var first = true
	for _, l := range j.lanes {
		if len(items) >= u.opts.BatchSize {
			break
		}
		got, err := u.src.Peek(l, min(perDevice, u.opts.BatchSize-len(items)))
		if err != nil {
			r.v, r.err = verdict{kind: retry, reason: "store"}, fmt.Errorf("peek queue: %w", err)
			return r
		}
		if len(got) == 0 {
			r.empties = append(r.empties, l)
			continue
		}
		if first {
			svc, svcPath, first = got[0].Service, got[0].ServicePath, false
		}
		for _, it := range got {
			if it.Service != svc || it.ServicePath != svcPath {
				break // another tenant: a later batch
			}
			// The request carries the body rendered, not as stored
			// (packed): its size is what counts against BatchBytes. A
			// malformed one counts as stored; appendBatchBody refuses it.
			n, err := envelope.BodyLen(it.Body)
			if err != nil {
				n = len(it.Body)
			}
			add := n + len(it.Device) + len(it.Type) + 32
			if len(items) > 0 && size+add > u.opts.BatchBytes {
				break
			}
			size += add
			items = append(items, it)
		}
	}
	if len(items) == 0 {
		r.empty = true
		return r
	}
	r.items, r.item = items, items[0]

	tok, err := u.tok.Token(ctx)
	if err != nil {
		if ctx.Err() != nil {
			r.aborted = true
			return r
		}
		r.v, r.err = verdict{kind: retry, reason: "token"}, err
		return r
	}
	sb := u.bodies.get(size + 64)
	defer sb.release() // the sender's reference: after exchange read the answer
	body, err := appendBatchBody(sb.buf, items)
	if err != nil {
		// A stored body that is not a JSON object: it will never be
		// accepted; send it alone so that it is dead-lettered.
		r.v = verdict{kind: permanent, class: "4xx", reason: "stored body: " + err.Error()}
		if len(items) == 1 {
			if err := u.deadLetter(items[0], r.v); err != nil {
				r.v, r.err = verdict{kind: retry, reason: "store"}, err
			}
		}
		return r
	}
	rctx, cancel := u.requestContext(ctx)
	defer cancel()
	sb.buf = body // grown while rendering: the bigger one goes back
	req, err := d.newRequest(rctx, http.MethodPost, d.base+"/v2/op/update", sb, tok, svc, svcPath)
	if err != nil {
		r.v, r.err = verdict{kind: retry, reason: "request"}, errors.New(scrub(err.Error(), tok))
		return r
	}
	return d.exchange(ctx, r, req, items, tok)
}
