package uplink

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/edgegate/edgegate/internal/metrics"
	"github.com/edgegate/edgegate/internal/queue"
	"github.com/edgegate/edgegate/internal/testkit"
)

// fakeQueue is an in-memory Source. It insists that Delete and DeadLetter
// only ever remove the head of a lane (the uplink's ordering contract).
type fakeQueue struct {
	mu         sync.Mutex
	lanes      map[queue.Lane][]queue.Item
	brokers    []string
	dead       []deadItem
	changed    chan struct{}
	violations []string
	peekErr    error
	deletes    int // Delete calls
	peeks      int // Peek calls
	emptyPeeks int // Peek calls that found the lane empty
	// deleteTime: how long a Delete takes (a badger transaction); set
	// before the uplink starts.
	deleteTime time.Duration
}

type deadItem struct {
	it     queue.Item
	reason string
}

func newFakeQueue() *fakeQueue {
	return &fakeQueue{lanes: make(map[queue.Lane][]queue.Item), changed: make(chan struct{})}
}

// add queues n readings for a device, with consecutive seqs.
func (q *fakeQueue) add(broker, device string, n int) { q.addAll(broker, []string{device}, n) }

// addAll queues n readings for each device under one lock and one change
// signal, as one group commit makes them visible.
func (q *fakeQueue) addAll(broker string, devices []string, n int) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for _, device := range devices {
		q.addLocked(broker, device, n)
	}
	close(q.changed)
	q.changed = make(chan struct{})
}

func (q *fakeQueue) addLocked(broker, device string, n int) {
	l := queue.Lane{Broker: broker, Device: device}
	seen := false
	for _, b := range q.brokers {
		seen = seen || b == broker
	}
	if !seen {
		q.brokers = append(q.brokers, broker)
	}
	next := uint64(len(q.lanes[l]))
	for _, it := range q.lanes[l] {
		next = max(next, it.Seq+1)
	}
	for i := range n {
		seq := next + uint64(i)
		q.lanes[l] = append(q.lanes[l], queue.Item{
			Broker: broker, Device: device, Type: "Sensor", Seq: seq, Enqueued: time.Now(),
			Body: fmt.Appendf(nil, `{"seq":{"type":"Integer","value":%d}}`, seq),
		})
	}
}

func (q *fakeQueue) Brokers() []string {
	q.mu.Lock()
	defer q.mu.Unlock()
	return append([]string(nil), q.brokers...)
}

func (q *fakeQueue) Lanes(broker string) []queue.Lane {
	q.mu.Lock()
	defer q.mu.Unlock()
	var out []queue.Lane
	for l, its := range q.lanes {
		if l.Broker == broker && len(its) > 0 {
			out = append(out, l)
		}
	}
	return out
}

// Ready is queue.Queue's: the readings of lanes, at most perLane each.
func (q *fakeQueue) Ready(lanes []queue.Lane, perLane int) int {
	q.mu.Lock()
	defer q.mu.Unlock()
	n := 0
	for _, l := range lanes {
		n += min(len(q.lanes[l]), perLane)
	}
	return n
}

func (q *fakeQueue) Peek(l queue.Lane, n int) ([]queue.Item, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.peekErr != nil {
		return nil, q.peekErr
	}
	its := q.lanes[l]
	q.peeks++
	if len(its) == 0 {
		q.emptyPeeks++
	}
	return append([]queue.Item(nil), its[:min(n, len(its))]...), nil
}

func (q *fakeQueue) removeHead(it queue.Item) error {
	l := queue.Lane{Broker: it.Broker, Device: it.Device}
	its := q.lanes[l]
	if len(its) == 0 || its[0].Seq != it.Seq {
		q.violations = append(q.violations, fmt.Sprintf("%s/%d is not the head", it.Device, it.Seq))
		return errors.New("not the head")
	}
	q.lanes[l] = its[1:]
	return nil
}

func (q *fakeQueue) Delete(items []queue.Item) error {
	time.Sleep(q.deleteTime)
	q.mu.Lock()
	defer q.mu.Unlock()
	q.deletes++
	for _, it := range items {
		if err := q.removeHead(it); err != nil {
			return err
		}
	}
	return nil
}

func (q *fakeQueue) DeadLetter(it queue.Item, reason string) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	if err := q.removeHead(it); err != nil {
		return err
	}
	q.dead = append(q.dead, deadItem{it, reason})
	return nil
}

func (q *fakeQueue) Changed() <-chan struct{} {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.changed
}

func (q *fakeQueue) depth() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	n := 0
	for _, its := range q.lanes {
		n += len(its)
	}
	return n
}

func (q *fakeQueue) deadLetters() []deadItem {
	q.mu.Lock()
	defer q.mu.Unlock()
	return append([]deadItem(nil), q.dead...)
}

// fakeTokens hands out tok-1, tok-2, ... : a new one after each
// Invalidate of the current one. failFirst Token calls fail.
type fakeTokens struct {
	mu          sync.Mutex
	n           int
	invalidated []string
	failFirst   int
	calls       int
}

func (f *fakeTokens) Token(ctx context.Context) (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	if f.calls <= f.failFirst {
		return "", errors.New("fetch access token from https://central.test/token: connection refused")
	}
	if f.n == 0 {
		f.n = 1
	}
	return fmt.Sprintf("%s%d", tokenCanary, f.n), nil
}

func (f *fakeTokens) Invalidate(bad string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.invalidated = append(f.invalidated, bad)
	if bad == fmt.Sprintf("%s%d", tokenCanary, f.n) {
		f.n++
	}
}

func (f *fakeTokens) invalidations() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.invalidated...)
}

// Canary that must never appear in logs or dead-letter reasons.
const tokenCanary = "TOKCANARY-"

// seen is one request as the broker saw it.
type seen struct {
	method, path, rawPath, device string
	query                         map[string][]string
	header                        http.Header
	body                          string
	proto                         int
	at                            time.Time
}

// broker is a fake proxied broker on a real TLS listener. respond decides
// each answer; n counts requests from 1.
type broker struct {
	*httptest.Server
	mu       sync.Mutex
	reqs     []seen
	inflight map[string]int
	overlap  []string // devices that had two requests in flight at once
	respond  func(w http.ResponseWriter, r *http.Request, n int)
}

func newBroker(t testing.TB, respond func(w http.ResponseWriter, r *http.Request, n int)) *broker {
	t.Helper()
	b := &broker{respond: respond, inflight: make(map[string]int)}
	b.Server = httptest.NewUnstartedServer(http.HandlerFunc(b.serve))
	b.Config.ErrorLog = log.New(io.Discard, "", 0) // handshake noise from refused clients
	b.StartTLS()
	t.Cleanup(b.Close)
	return b
}

func (b *broker) serve(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	dev := deviceOf(r)
	b.mu.Lock()
	b.reqs = append(b.reqs, seen{method: r.Method, path: r.URL.Path, rawPath: r.URL.EscapedPath(), device: dev,
		query: r.URL.Query(), header: r.Header.Clone(), body: string(body), proto: r.ProtoMajor, at: time.Now()})
	n := len(b.reqs)
	b.inflight[dev]++
	if b.inflight[dev] > 1 {
		b.overlap = append(b.overlap, dev)
	}
	b.mu.Unlock()
	defer func() {
		b.mu.Lock()
		b.inflight[dev]--
		b.mu.Unlock()
	}()
	if b.respond == nil {
		w.WriteHeader(http.StatusNoContent)
		return
	}
	b.respond(w, r, n)
}

// deviceOf is the entity id of a PATCH /v2/entities/{id}/attrs, as the
// filter takes it from the path ("" for other requests).
func deviceOf(r *http.Request) string {
	p := r.URL.Path
	i := strings.Index(p, "/v2/entities/")
	if i < 0 || !strings.HasSuffix(p, "/attrs") {
		return ""
	}
	return strings.TrimSuffix(p[i+len("/v2/entities/"):], "/attrs")
}

func (b *broker) requests() []seen {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]seen(nil), b.reqs...)
}

func (b *broker) pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(b.Certificate())
	return p
}

// harness runs an Uplink against a fake queue and tokens.
type harness struct {
	u      *Uplink
	q      *fakeQueue
	tok    *fakeTokens
	m      *metrics.Metrics
	logs   *syncBuffer
	cancel context.CancelFunc
	done   chan struct{} // closed when Run returned
	runErr error
}

func (h *harness) stop(t testing.TB) {
	t.Helper()
	h.cancel()
	select {
	case <-h.done:
		if h.runErr != nil {
			t.Errorf("Run = %v, want nil", h.runErr)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return after cancel")
	}
}

// start runs the uplink; opts gets test defaults where zero.
func start(t testing.TB, q *fakeQueue, tok *fakeTokens, pool *x509.CertPool, opts Options) *harness {
	t.Helper()
	h := &harness{q: q, tok: tok, m: metrics.New(), logs: &syncBuffer{}, done: make(chan struct{})}
	if opts.HTTPClient == nil {
		opts.HTTPClient = NewHTTPClient(pool, 5*time.Second, 8)
	}
	if opts.MinBackoff == 0 {
		opts.MinBackoff = 10 * time.Millisecond
	}
	if opts.MaxBackoff == 0 {
		opts.MaxBackoff = 100 * time.Millisecond
	}
	opts.Metrics = h.m
	opts.Logger = slog.New(slog.NewTextHandler(h.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	u := New(q, tok, opts)
	h.u = u
	ctx, cancel := context.WithCancel(context.Background())
	h.cancel = cancel
	go func() { h.runErr = u.Run(ctx); close(h.done) }()
	t.Cleanup(func() {
		cancel()
		<-h.done
		if strings.Contains(h.logs.String(), tokenCanary) {
			t.Errorf("logs contain the token:\n%s", h.logs.String())
		}
		q.mu.Lock()
		defer q.mu.Unlock()
		for _, v := range q.violations {
			t.Errorf("queue contract: %s", v)
		}
	})
	return h
}

type syncBuffer = testkit.Buffer

func counter(t testing.TB, c interface{ Write(*dto.Metric) error }) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatalf("read metric: %v", err)
	}
	return m.GetCounter().GetValue()
}

// orion writes a JSON error answer.
func orion(w http.ResponseWriter, status int, body string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	io.WriteString(w, body)
}
