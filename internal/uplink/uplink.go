package uplink

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/edgegate/edgegate/internal/backoff"
	"github.com/edgegate/edgegate/internal/envelope"
	"github.com/edgegate/edgegate/internal/metrics"
	"github.com/edgegate/edgegate/internal/queue"
	"github.com/edgegate/edgegate/internal/reading"
)

// Source is what the uplink needs from the queue.
type Source interface {
	Brokers() []string
	// Lanes returns the non-empty lanes (one per device) of a broker.
	Lanes(broker string) []queue.Lane
	// Ready counts the readings of lanes, at most perLane of each (batch
	// mode: how full a batch would be; batch.go).
	Ready(lanes []queue.Lane, perLane int) int
	// Peek returns up to max items of a lane, oldest first, without
	// removing them.
	Peek(l queue.Lane, max int) ([]queue.Item, error)
	// Delete removes items the broker accepted (2xx), any number in one
	// store transaction.
	Delete(items []queue.Item) error
	// DeadLetter moves an item the broker refused for good aside.
	DeadLetter(it queue.Item, reason string) error
	// Changed returns a channel closed at the next commit that adds items.
	Changed() <-chan struct{}
}

// Tokens supplies the bearer token (centralsync.TokenSource).
type Tokens interface {
	Token(ctx context.Context) (string, error)
	// Invalidate tells the source that the broker refused this token.
	Invalidate(bad string)
}

// Options tune the uplink; zero values mean the defaults.
type Options struct {
	// Concurrency is the number of requests in flight per broker
	// (default 4).
	Concurrency int
	// RefusalWindow is how long, from a device's first refusal, the
	// filter's refusal of a device the policy lists (or Orion's "no such
	// entity") is retried before its readings are dead-lettered (default
	// 5m: longer than the filter's 3-minute cache of a negative answer);
	// negative: dead-letter at once.
	RefusalWindow time.Duration
	// MinBackoff and MaxBackoff bound the retry delay (200ms, 30s).
	MinBackoff, MaxBackoff time.Duration
	// HTTPClient defaults to NewHTTPClient(nil, 30s, Concurrency).
	HTTPClient *http.Client
	Logger     *slog.Logger     // nil: discard
	Metrics    *metrics.Metrics // may be nil
	Now        func() time.Time // nil: time.Now
	// ShutdownGrace is how long requests in flight may still run once
	// Run's context is cancelled (default 2s); after that they are cut
	// off and the readings stay queued.
	ShutdownGrace time.Duration

	// Mode is ModeFilter (default): one PATCH per reading, the only write
	// the Orion Broker Filter allows; or ModeBatch: many readings of many
	// devices per POST /v2/op/update, for brokers reached without the
	// filter (batch.go).
	Mode string
	// BatchSize bounds the readings in one batch (default 256).
	BatchSize int
	// BatchBytes bounds a batch's body (default 512 KiB; Orion refuses
	// bodies over 1 MB by default).
	BatchBytes int
	// PerDevice bounds one device's readings in one batch (default 32).
	PerDevice int
	// BatchLinger (batch mode): under load — another request of the
	// broker in flight, or one started less than BatchLinger ago —
	// fewer than BatchSize ready readings wait at most this long for more
	// before they are sent, unless the broker's backlog is a batch or
	// more (default 25ms; negative: never wait). See batch.go.
	BatchLinger time.Duration
}

// Delivery modes (Options.Mode).
const (
	ModeFilter = "filter"
	ModeBatch  = "batch"
)

// NoRefusalWindow as Options.RefusalWindow dead-letters a refused reading
// at once.
const NoRefusalWindow time.Duration = -1

const (
	defaultConcurrency   = 4
	defaultRefusalWindow = 15 * time.Minute
	// maxRefusedLanes bounds the refusal state kept per broker.
	maxRefusedLanes      = 4096
	defaultMinBackoff    = 200 * time.Millisecond
	defaultMaxBackoff    = 30 * time.Second
	defaultShutdownGrace = 2 * time.Second
	defaultBatchLinger   = 25 * time.Millisecond
	// backstop: how often dispatchers look at the queue even without a
	// Changed signal, in case one was missed.
	backstop = 5 * time.Second
	// logEvery limits repeated warnings to one per lane (dead letters) or
	// per broker (retries) per interval: an SD card wears out.
	logEvery = 30 * time.Second
	// maxBodyRead is how much of a response is read for classification;
	// maxBodyDrain how much more is discarded to keep the connection.
	maxBodyRead  = 4 << 10
	maxBodyDrain = 64 << 10
)

// Uplink delivers queued readings to their brokers.
type Uplink struct {
	src     Source
	tok     Tokens
	opts    Options
	log     *slog.Logger
	missing *missingAttrs
	bodies  bodyPool // request bodies, reused (body.go)
}

// New builds an Uplink; it does not contact anything until Run. No device
// secret is ever sent: the filter ignores k1/k2 when a bearer token is
// present (AccessTokenAuthenticationFilter.java), and a URL is logged by
// every proxy on the way.
func New(src Source, tok Tokens, opts Options) *Uplink {
	if opts.Concurrency <= 0 {
		opts.Concurrency = defaultConcurrency
	}
	if opts.RefusalWindow == 0 {
		opts.RefusalWindow = defaultRefusalWindow
	}
	if opts.MinBackoff <= 0 {
		opts.MinBackoff = defaultMinBackoff
	}
	if opts.MaxBackoff <= 0 {
		opts.MaxBackoff = defaultMaxBackoff
	}
	opts.MaxBackoff = max(opts.MaxBackoff, opts.MinBackoff)
	if opts.HTTPClient == nil {
		opts.HTTPClient = NewHTTPClient(nil, 30*time.Second, opts.Concurrency)
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.ShutdownGrace <= 0 {
		opts.ShutdownGrace = defaultShutdownGrace
	}
	if opts.Mode == "" {
		opts.Mode = ModeFilter
	}
	if opts.BatchSize <= 0 {
		opts.BatchSize = defaultBatchSize
	}
	if opts.BatchBytes <= 0 {
		opts.BatchBytes = defaultBatchBytes
	}
	if opts.PerDevice <= 0 {
		opts.PerDevice = defaultPerDevice
	}
	if opts.BatchLinger == 0 {
		opts.BatchLinger = defaultBatchLinger
	}
	return &Uplink{src: src, tok: tok, opts: opts, log: opts.Logger.With("component", "uplink"), missing: newMissingAttrs()}
}

// Run delivers until ctx is cancelled, then waits for requests in flight
// (at most ShutdownGrace, then they are cut off) and returns nil.
func (u *Uplink) Run(ctx context.Context) error {
	// Requests outlive ctx by the grace period so that a reading the
	// broker is applying right now is not needlessly sent twice.
	reqCtx, cancelReq := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelReq()
	stop := context.AfterFunc(ctx, func() { time.AfterFunc(u.opts.ShutdownGrace, cancelReq) })
	defer stop()

	// Last: drop kept-alive connections so no transport goroutine outlives Run.
	defer u.opts.HTTPClient.CloseIdleConnections()

	var wg sync.WaitGroup // owns the dispatchers
	started := make(map[string]bool)
	tick := time.NewTicker(backstop)
	defer tick.Stop()
	for {
		// Take the signal before looking, so a commit in between is seen.
		changed := u.src.Changed()
		for _, b := range u.src.Brokers() {
			if started[b] {
				continue
			}
			started[b] = true
			d, err := u.newDispatcher(b)
			if err != nil {
				// Its readings stay queued until the registration is fixed.
				u.log.Error("broker not served", "err", err)
				continue
			}
			wg.Go(func() { d.run(ctx, reqCtx) })
		}
		select {
		case <-ctx.Done():
			wg.Wait()
			return nil
		case <-changed:
		case <-tick.C:
		}
	}
}

// dispatcher serves one broker. All its fields but results are owned by
// its run goroutine; workers only read the immutable ones.
type dispatcher struct {
	u      *Uplink
	broker string // as in the queue
	base   string // broker without trailing slash
	label  string // broker for logs and metrics: no user info or query
	log    *slog.Logger
	bo     *backoff.Backoff
	// epoch counts broker-wide failures counted by bo; a failure of a
	// request started in an older epoch reports the same outage and does
	// not escalate the backoff again.
	epoch uint64
	lanes []queue.Lane // sorted by device
	busy  map[queue.Lane]bool
	// solo: lanes of a batch the broker refused for good; each is sent
	// alone, one reading at a time, until its head is settled, so that
	// only the offending reading is dead-lettered (batch mode).
	solo     map[queue.Lane]bool
	inflight int
	cursor   string // device of the lane dispatched last (round-robin)
	results  chan result
	jobs     chan job        // to the workers; buffered for Concurrency
	changed  <-chan struct{} // the queue's signal for the next commit
	gen      uint64          // counts refreshes
	// lingerUntil (batch mode): idle lanes are held for company until
	// then; zero when none are held.
	lingerUntil time.Time
	lastBatch   time.Time // when batches were last started for idle lanes

	// refusals: lanes whose device the broker refused (refused verdict),
	// held back and retried until their refusal window ends.
	refusals map[queue.Lane]*refusal

	badToken    [sha256.Size]byte // hash of the last token the broker refused
	badStreak   int               // refused tokens since the last success
	failing     bool              // in a run of failures (for the recovery log)
	lastWarn    time.Time         // broker-level retry warnings
	warnSkipped int
	laneWarn    map[queue.Lane]time.Time

	// dels groups the Deletes of readings the broker accepted (settle.go).
	dels *deleteGroup
	// auth caches the Authorization value of the current token (bearer);
	// shared by the workers.
	auth atomic.Pointer[bearerValue]
}

type job struct {
	lane queue.Lane
	// expired: the lane's refusal window is over, a refusal now
	// dead-letters the reading.
	expired bool
	epoch   uint64
	gen     uint64 // refresh generation when started
	// batch mode: every lane of the batch (lane is the first); solo: one
	// reading of one lane.
	lanes []queue.Lane
	solo  bool
}

// allLanes returns the lanes the job holds busy.
func (j job) allLanes() []queue.Lane {
	if j.lanes != nil {
		return j.lanes
	}
	return []queue.Lane{j.lane}
}

type result struct {
	job
	v     verdict
	empty bool // nothing was sent: every lane had nothing left
	// settled (filter mode): the reading left the queue (delivered or
	// dead-lettered); handle drops the lane if it has none left.
	settled bool
	aborted bool   // cut off by shutdown: not a failure
	token   string // the token refused, for invalidToken
	item    queue.Item
	err     error // for retry: what went wrong, already secret-free
	// batch mode: lanes found empty, and the readings sent.
	empties []queue.Lane
	items   []queue.Item
}

// newBackoff is a broker's or a refused lane's retry backoff: jittered,
// from MinBackoff doubling up to MaxBackoff, on the uplink's clock.
func (u *Uplink) newBackoff() *backoff.Backoff {
	b := backoff.New(u.opts.MinBackoff, u.opts.MaxBackoff)
	b.Now = u.opts.Now
	return b
}

func (u *Uplink) newDispatcher(broker string) (*dispatcher, error) {
	p, err := url.Parse(broker)
	if err != nil {
		return nil, fmt.Errorf("parse broker URI: %w", errors.Unwrap(err)) // url.Error repeats the URI
	}
	p.User, p.RawQuery, p.Fragment = nil, "", ""
	label := p.String()
	if p.Scheme != "https" || p.Host == "" {
		return nil, fmt.Errorf("broker %q: want an https:// URI", label)
	}
	return &dispatcher{
		u:        u,
		broker:   broker,
		base:     strings.TrimRight(broker, "/"),
		label:    label,
		log:      u.log.With("broker", label),
		bo:       u.newBackoff(),
		busy:     make(map[queue.Lane]bool),
		solo:     make(map[queue.Lane]bool),
		results:  make(chan result, u.opts.Concurrency),
		laneWarn: make(map[queue.Lane]time.Time),
		refusals: make(map[queue.Lane]*refusal),
		dels:     newDeleteGroup(u.src.Delete),
	}, nil
}

func (d *dispatcher) run(ctx, reqCtx context.Context) {
	// A fixed pool of Concurrency workers rather than a goroutine per
	// request: each request runs deep in net/http and TLS, and a fresh
	// goroutine grew its stack again every time (runtime.copystack was 4%
	// of the gateway's CPU in filter mode).
	d.jobs = make(chan job, d.u.opts.Concurrency)
	var workers sync.WaitGroup
	for range d.u.opts.Concurrency {
		workers.Go(func() {
			for j := range d.jobs {
				if d.u.opts.Mode == ModeBatch {
					d.results <- d.attemptBatch(reqCtx, j)
				} else {
					d.results <- d.attempt(reqCtx, j)
				}
			}
		})
	}
	defer func() {
		close(d.jobs)
		workers.Wait()
	}()
	tick := time.NewTicker(backstop)
	defer tick.Stop()
	d.refresh()
	for {
		d.fill()
		var wake <-chan time.Time
		var timer *time.Timer
		if d.inflight < d.u.opts.Concurrency && len(d.lanes) > 0 {
			r := d.bo.Remaining()
			if r <= 0 {
				r = d.nextRelease()
			}
			if !d.lingerUntil.IsZero() {
				if l := max(time.Until(d.lingerUntil), time.Microsecond); r <= 0 || l < r {
					r = l
				}
			}
			if r > 0 {
				timer = time.NewTimer(r) // only while backing off or lingering
				wake = timer.C
			}
		}
		select {
		case <-ctx.Done():
		case r := <-d.results:
			d.handle(r)
		case <-d.changed:
			d.refresh()
		case <-tick.C:
			d.refresh()
		case <-wake:
		}
		if timer != nil {
			timer.Stop()
		}
		if ctx.Err() != nil {
			// Stop starting requests; wait for those in flight, which
			// end within the shutdown grace.
			for d.inflight > 0 {
				d.handle(<-d.results)
			}
			return
		}
	}
}

// refresh reloads the broker's lanes from the queue. It takes the Changed
// signal first, so a commit that lands while it looks is not missed.
func (d *dispatcher) refresh() {
	d.changed = d.u.src.Changed()
	d.gen++
	d.lanes = append(d.lanes[:0], d.u.src.Lanes(d.broker)...)
	slices.SortFunc(d.lanes, func(a, b queue.Lane) int { return strings.Compare(a.Device, b.Device) })
}

// fill starts requests for idle lanes, round-robin from the lane after the
// one started last, until Concurrency requests are in flight.
func (d *dispatcher) fill() {
	n := len(d.lanes)
	if n == 0 || d.inflight >= d.u.opts.Concurrency || d.bo.Remaining() > 0 {
		return
	}
	start, _ := slices.BinarySearchFunc(d.lanes, d.cursor, func(l queue.Lane, dev string) int {
		return strings.Compare(l.Device, dev)
	})
	if start < n && d.lanes[start].Device == d.cursor {
		start++
	}
	if d.u.opts.Mode == ModeBatch {
		d.fillBatches(start)
		return
	}
	now := d.u.opts.Now()
	for i := 0; i < n && d.inflight < d.u.opts.Concurrency; i++ {
		l := d.lanes[(start+i)%n]
		if d.busy[l] {
			continue
		}
		held, expired := d.refusalState(l, now)
		if held {
			continue
		}
		d.busy[l] = true
		d.inflight++
		d.cursor = l.Device
		j := job{lane: l, expired: expired, epoch: d.epoch, gen: d.gen}
		d.jobs <- j // never blocks: at most Concurrency jobs are in flight
	}
}

// handle applies a finished attempt to the dispatcher's state.
func (d *dispatcher) handle(r result) {
	d.inflight--
	for _, l := range r.allLanes() {
		delete(d.busy, l)
	}
	if r.aborted {
		return
	}
	empties := r.empties
	if r.empty && r.lanes == nil {
		empties = []queue.Lane{r.lane}
	}
	// Unless the lanes were reloaded meanwhile: then trust the reload.
	if len(empties) > 0 && r.gen == d.gen {
		d.lanes = slices.DeleteFunc(d.lanes, func(l queue.Lane) bool { return slices.Contains(empties, l) })
	}
	if r.settled && d.u.src.Ready([]queue.Lane{r.lane}, 1) == 0 {
		// At a moderate pace each reading empties its lane: dropping it
		// now (a lock and a map lookup) saves one more attempt per
		// reading — a job, a Peek and a result — that would only find it
		// empty. Safe whatever was refreshed meanwhile: a commit after
		// this look closes the Changed channel the dispatcher waits on
		// (or one already closed, whose refresh is still to come), and
		// the refresh brings the lane back.
		d.lanes = slices.DeleteFunc(d.lanes, func(l queue.Lane) bool { return l == r.lane })
	}
	if r.empty {
		return
	}
	m := d.u.opts.Metrics
	if len(r.v.missing) > 0 {
		d.noteMissing(r)
	}
	switch r.v.kind {
	case refused:
		if len(r.items) > 1 {
			// A batch: find the refused reading alone, as for a permanent
			// refusal.
			for _, l := range r.lanes {
				d.solo[l] = true
			}
			break
		}
		if m != nil {
			m.Retried.WithLabelValues("refused_" + r.v.class).Inc()
		}
		d.holdRefused(r)
	case delivered, permanent:
		if r.v.kind == delivered {
			for _, l := range r.allLanes() {
				delete(d.refusals, l) // accepted again: a new refusal starts a new window
			}
		} else if st := d.refusals[r.lane]; st != nil && r.expired {
			st.last = d.u.opts.Now() // still refused: later readings go at once
		}
		if r.solo {
			delete(d.solo, r.lane) // its head is settled
		}
		if r.v.kind == permanent && len(r.items) > 1 {
			// A batch refused for good: send each of its lanes alone, so
			// that the broker's verdict names one reading.
			for _, l := range r.lanes {
				d.solo[l] = true
			}
		} else if r.v.kind == permanent {
			d.warnDeadLetter(r)
		}
		d.badStreak = 0
		if r.epoch == d.epoch {
			d.bo.Reset()
			if d.failing {
				d.failing = false
				d.log.Info("delivery recovered")
			}
		}
	case invalidToken:
		if m != nil {
			m.Retried.WithLabelValues(r.v.reason).Inc()
		}
		h := sha256.Sum256([]byte(r.token))
		if d.badStreak > 0 && h == d.badToken {
			return // concurrent requests with the same stale token
		}
		d.badToken = h
		d.badStreak++
		// The first refusal is an expired or revoked token: retry at once
		// with a new one. A new token refused too means something else is
		// wrong; stop hammering.
		if d.badStreak > 1 {
			d.failed(r, errors.New("the broker refused a freshly fetched access token"))
		}
	case retry:
		if m != nil {
			m.Retried.WithLabelValues(r.v.reason).Inc()
		}
		d.failed(r, r.err)
	}
}

// failed backs the whole broker off after a failed attempt.
func (d *dispatcher) failed(r result, cause error) {
	var delay time.Duration
	if r.epoch == d.epoch {
		delay = d.bo.FailAtLeast(r.v.retryAfter)
		d.epoch++
	} else {
		d.bo.Extend(r.v.retryAfter)
		delay = d.bo.Remaining()
	}
	d.failing = true
	now := d.u.opts.Now()
	if now.Sub(d.lastWarn) < logEvery {
		d.warnSkipped++
		return
	}
	attrs := []any{"reason", r.v.reason, "device", r.lane.Device, "retry_in", delay.Round(time.Millisecond)}
	if cause != nil {
		attrs = append(attrs, "err", cause.Error())
	}
	if d.warnSkipped > 0 {
		attrs = append(attrs, "similar_since_last", d.warnSkipped)
	}
	d.log.Warn("delivery failed; backing off", attrs...)
	d.lastWarn, d.warnSkipped = now, 0
}

// warnDeadLetter logs a dead letter, at most once per lane per logEvery.
func (d *dispatcher) warnDeadLetter(r result) {
	now := d.u.opts.Now()
	if last, ok := d.laneWarn[r.lane]; ok && now.Sub(last) < logEvery {
		return
	}
	if len(d.laneWarn) > 1024 { // bound the map: forget quiet lanes
		maps.DeleteFunc(d.laneWarn, func(_ queue.Lane, t time.Time) bool { return now.Sub(t) >= logEvery })
	}
	d.laneWarn[r.lane] = now
	d.log.Warn("reading dead-lettered", "device", r.lane.Device, "seq", r.item.Seq, "reason", r.v.reason)
}

// attempt sends the head item of a lane once and settles it with the
// queue when the broker's answer is final. It runs on its own goroutine
// and touches only immutable dispatcher fields.
func (d *dispatcher) attempt(ctx context.Context, j job) result {
	u := d.u
	r := result{job: j}
	items, err := u.src.Peek(j.lane, 1)
	if err != nil {
		r.v, r.err = verdict{kind: retry, reason: "store"}, fmt.Errorf("peek queue: %w", err)
		return r
	}
	if len(items) == 0 {
		r.empty = true
		return r
	}
	it := items[0]
	r.item = it

	tok, err := u.tok.Token(ctx)
	if err != nil {
		if ctx.Err() != nil {
			r.aborted = true
			return r
		}
		// Central is down or refuses us: keep the data, retry later.
		r.v, r.err = verdict{kind: retry, reason: "token"}, err
		return r
	}
	if err := reading.ValidateDeviceID(it.Device); err != nil {
		// Never PATCH /v2/entities/../attrs: a device id that is a path
		// segment ("." "..") or carries '/' reaches another resource.
		// Ingest refuses such ids; one that is queued anyway (an older
		// store) can never be sent: dead-letter it with the reason.
		r.v = verdict{kind: permanent, class: "bad_device_id", reason: "not sent: " + err.Error()}
		if err := d.u.deadLetter(it, r.v); err != nil {
			r.v, r.err = verdict{kind: retry, reason: "store"}, err
		}
		return r
	}
	n, err := envelope.BodyLen(it.Body)
	if err != nil {
		n = len(it.Body)
	}
	sb := u.bodies.get(n)
	defer sb.release() // the sender's reference: after exchange read the answer
	body, err := envelope.AppendBody(sb.buf, it.Body)
	if err != nil {
		// Never sendable (AEAD-checked, so a bug rather than an attack):
		// dead-letter it with the reason, as a batch does.
		r.v = verdict{kind: permanent, class: "4xx", reason: "stored body: " + err.Error()}
		if err := d.u.deadLetter(it, r.v); err != nil {
			r.v, r.err = verdict{kind: retry, reason: "store"}, err
		}
		return r
	}
	sb.buf = body
	rctx, cancel := u.requestContext(ctx)
	defer cancel()
	req, err := d.request(rctx, it, sb, tok)
	if err != nil {
		r.v, r.err = verdict{kind: retry, reason: "request"}, errors.New(scrub(err.Error(), tok))
		return r
	}

	r = d.exchange(ctx, r, req, []queue.Item{it}, tok)
	r.settled = (r.v.kind == delivered || r.v.kind == permanent) && r.err == nil
	return r
}

// exchange sends one request carrying items (one reading, or a batch) and
// settles them from the answer: delete on 2xx (and on Orion's 422
// PartialUpdate, which applied the existing attributes), dead-letter a
// single reading refused for good or refused past its refusal window (a
// refused batch is split by the caller), invalidate a refused token, or
// retry. The token is scrubbed from every reason and error (a broker may
// echo our headers).
func (d *dispatcher) exchange(ctx context.Context, r result, req *http.Request, items []queue.Item, tok string) result {
	secrets := []string{tok}
	u := d.u
	start := u.opts.Now()
	resp, err := u.roundTrip(req)
	if err != nil {
		if ctx.Err() != nil {
			r.aborted = true
			return r
		}
		reason := "network"
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			reason = "timeout"
		}
		u.observeRequest(reason, start)
		r.v, r.err = verdict{kind: retry, reason: reason}, netError(err, secrets...)
		return r
	}
	var body []byte
	if resp.ContentLength != 0 {
		// Orion's success is 204 No Content (net/http hands over NoBody):
		// nothing to read or allocate. Otherwise read what classify needs
		// and drain a little more so the connection can be reused; one
		// LimitedReader serves both.
		lr := &io.LimitedReader{R: resp.Body, N: maxBodyRead}
		body, _ = io.ReadAll(lr)
		lr.N = maxBodyDrain
		_, _ = io.Copy(io.Discard, lr)
	}
	resp.Body.Close()
	now := u.opts.Now()
	r.v = classify(resp.StatusCode, resp.Header, body, now)
	r.v.reason = scrub(r.v.reason, secrets...)
	if r.v.kind == refused && len(items) == 1 && (r.expired || u.opts.RefusalWindow < 0) {
		// Refused for longer than the filter's caches explain.
		r.v.kind = permanent
		if u.opts.RefusalWindow > 0 {
			r.v.reason += fmt.Sprintf(" (still refused after uplink.refusal_window %s)", u.opts.RefusalWindow)
		}
	}

	m := u.opts.Metrics
	switch r.v.kind {
	case delivered:
		u.observeRequest("delivered", start)
		if err := d.dels.delete(items); err != nil {
			// Sent but still queued: sent again later (a duplicate the
			// broker can recognise by seq), never lost.
			r.v, r.err = verdict{kind: retry, reason: "store"}, fmt.Errorf("delete delivered readings: %w", err)
			return r
		}
		if m != nil {
			m.Delivered.WithLabelValues(d.label).Add(float64(len(items)))
			for _, it := range items {
				m.DeliveryLatency.Observe(now.Sub(it.Enqueued).Seconds())
			}
		}
	case permanent:
		u.observeRequest("rejected", start)
		if len(items) > 1 {
			return r // the caller splits the batch to find the refused reading
		}
		if err := u.deadLetter(items[0], r.v); err != nil {
			r.v, r.err = verdict{kind: retry, reason: "store"}, err
			return r
		}
	case invalidToken:
		u.observeRequest("invalid_token", start)
		u.tok.Invalidate(tok)
		r.token = tok
	case refused:
		u.observeRequest("refused", start)
	case retry:
		u.observeRequest("retry", start)
		r.err = errors.New(scrub("broker answered "+resp.Status, secrets...))
	}
	return r
}

// requestContext bounds one request, its answer's body included, by the
// client's Timeout, as http.Client does.
func (u *Uplink) requestContext(ctx context.Context) (context.Context, context.CancelFunc) {
	if t := u.opts.HTTPClient.Timeout; t > 0 {
		return context.WithTimeout(ctx, t)
	}
	return ctx, func() {}
}

// roundTrip sends req on the client's transport, bounded by a context
// from requestContext. Not through Client.Do: per request it copies the
// headers for redirects (none is ever followed: a bearer token must not
// travel to another URL, NewHTTPClient) and sets up its own timeout, ~8
// allocations and ~1 KB per reading in filter mode; the transport, its
// kept-alive connections and its limits are the client's.
func (u *Uplink) roundTrip(req *http.Request) (*http.Response, error) {
	rt := u.opts.HTTPClient.Transport
	if rt == nil {
		rt = http.DefaultTransport
	}
	return rt.RoundTrip(req)
}

// request builds the filter's PATCH for one reading:
// {base}/v2/entities/{id}/attrs?elementid={id}&type={type}. The current
// filter takes the element id from the path and accepts an elementid
// query only when it equals it (AccessTokenAuthenticationFilter.java,
// extractV2DeviceId, since disit/snap4city d24945e, 2026-01-21); filters
// built before that read it from the query alone and answer 401 "Missing
// parameter: elementid" without it, so it is sent, always equal to the
// path. "type" is harmless there (dropped on forwarding) and used by a
// broker reached directly. Nothing secret ever goes into the URL: no
// k1/k2, which the filter ignores when a bearer token is sent.
func (d *dispatcher) request(ctx context.Context, it queue.Item, body *sharedBody, tok string) (*http.Request, error) {
	req, err := d.newRequest(ctx, http.MethodPatch, patchURL(d.base, it.Device, it.Type), body, tok, it.Service, it.ServicePath)
	if err != nil {
		return nil, fmt.Errorf("build request for device %q: %w", it.Device, err)
	}
	return req, nil
}

// newRequest builds a request to the broker carrying body, lent from the
// pool (body.go): the transport closes it when done with it, possibly
// after RoundTrip returned, and may open it again (GetBody) to retry on a
// fresh connection.
func (d *dispatcher) newRequest(ctx context.Context, method, url string, body *sharedBody, tok, service, servicePath string) (*http.Request, error) {
	req, err := http.NewRequestWithContext(ctx, method, url, nil)
	if err != nil {
		return nil, err
	}
	if req.Body, err = body.open(); err != nil {
		return nil, err
	}
	req.GetBody, req.ContentLength = body.open, int64(len(body.buf))
	d.setHeaders(req, tok, service, servicePath)
	return req, nil
}

// setHeaders sets the headers of every request to a broker: the bearer
// token and the tenant of the readings carried. The keys are written in
// their canonical form (no Header.Set canonicalising them per request),
// the three fixed values share one backing array (cap-limited, so no
// append can reach the next), and the "Bearer …" value is built once per
// token: a token is ~1 KB, and it was copied for every reading in filter
// mode.
func (d *dispatcher) setHeaders(req *http.Request, tok, service, servicePath string) {
	v := [...]string{d.bearer(tok), "application/json", "edgegate-uplink"}
	h := req.Header
	h["Authorization"] = v[0:1:1]
	h["Content-Type"] = v[1:2:2]
	h["User-Agent"] = v[2:3:3]
	if service != "" {
		h["Fiware-Service"] = []string{service}
	}
	if servicePath != "" {
		h["Fiware-Servicepath"] = []string{servicePath}
	}
}

// bearerValue is an Authorization value and the token it carries.
type bearerValue struct{ tok, value string }

// bearer returns "Bearer "+tok, reusing the last one built while the
// token is the same. Workers call it concurrently: the cache is one
// atomic pointer, replaced whole when the token changes.
func (d *dispatcher) bearer(tok string) string {
	if c := d.auth.Load(); c != nil && c.tok == tok {
		return c.value
	}
	c := &bearerValue{tok: tok, value: "Bearer " + tok}
	d.auth.Store(c)
	return c.value
}

// deadLetter moves a reading the broker refused for good aside, and
// counts it.
func (u *Uplink) deadLetter(it queue.Item, v verdict) error {
	if err := u.src.DeadLetter(it, v.reason); err != nil {
		return fmt.Errorf("dead-letter reading: %w", err)
	}
	if m := u.opts.Metrics; m != nil {
		m.DeadLettered.WithLabelValues(v.class).Inc()
	}
	return nil
}

func (u *Uplink) observeRequest(outcome string, start time.Time) {
	if m := u.opts.Metrics; m != nil {
		m.RequestLatency.WithLabelValues(outcome).Observe(u.opts.Now().Sub(start).Seconds())
	}
}

// netError makes a transport error safe to log: url.Error's text carries
// the full URL.
func netError(err error, secrets ...string) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		err = ue.Err
	}
	return errors.New(scrub(err.Error(), secrets...))
}

// scrub removes secrets from a string that is about to be logged or
// stored, in case something echoed them.
func scrub(s string, secrets ...string) string {
	for _, sec := range secrets {
		if len(sec) >= 4 {
			s = strings.ReplaceAll(s, sec, "[redacted]")
			if esc := url.QueryEscape(sec); esc != sec {
				s = strings.ReplaceAll(s, esc, "[redacted]")
			}
		}
	}
	return s
}
