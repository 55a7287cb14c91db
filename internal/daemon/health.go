package daemon

import (
	"context"
	"fmt"
	"net/url"
	"sync"
	"time"

	"github.com/edgegate/edgegate/internal/pipeline"
	"github.com/edgegate/edgegate/internal/queue"
	"github.com/edgegate/edgegate/internal/uplink"
)

// stallWindow is how long the queue committer may hold an Append, or an
// uplink loop go without looking at the queue, before the daemon counts as
// stuck and stops its systemd watchdog keep-alives. Far above a slow SD
// card's fsync and above the uplink's 5 s backstop tick.
const stallWindow = 2 * time.Minute

// stallMonitor tells the systemd watchdog whether the pipeline makes
// progress. It watches from outside, through the interfaces the pipeline
// and the uplink already use: the committer is stuck when Appends are
// waiting and none has returned for stallWindow; an uplink loop (the
// broker scan and each broker's dispatcher) is stuck when it has not
// looked at the queue for stallWindow. An idle gateway is healthy.
type stallMonitor struct {
	window time.Duration
	now    func() time.Time

	mu      sync.Mutex
	appends int                  // Appends in flight
	moved   time.Time            // last Append returned, or the first started after idle
	beats   map[string]time.Time // uplink loop -> last look at the queue
}

func newStallMonitor(window time.Duration, now func() time.Time) *stallMonitor {
	return &stallMonitor{window: window, now: now, beats: make(map[string]time.Time)}
}

func (m *stallMonitor) appendStarted() {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.appends == 0 {
		m.moved = m.now()
	}
	m.appends++
}

func (m *stallMonitor) appendDone() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.appends--
	m.moved = m.now()
}

func (m *stallMonitor) beat(loop string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.beats[loop] = m.now()
}

// healthy is the watchdog health function (watchdog.go).
func (m *stallMonitor) healthy() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	now := m.now()
	if m.appends > 0 && now.Sub(m.moved) > m.window {
		return fmt.Errorf("queue committer: %d readings waiting, none committed for %s",
			m.appends, now.Sub(m.moved).Round(time.Second))
	}
	for loop, t := range m.beats {
		if now.Sub(t) > m.window {
			return fmt.Errorf("uplink: %s has not looked at the queue for %s", loop, now.Sub(t).Round(time.Second))
		}
	}
	return nil
}

// watchedAppender is the queue as the pipeline sees it, timed.
type watchedAppender struct {
	pipeline.Appender
	mon *stallMonitor
}

func (w watchedAppender) Enqueue(ctx context.Context, e queue.Entry) (func(context.Context) (queue.Item, error), error) {
	w.mon.appendStarted()
	wait, err := w.Appender.Enqueue(ctx, e)
	if err != nil {
		w.mon.appendDone()
		return nil, err
	}
	var once sync.Once
	return func(ctx context.Context) (queue.Item, error) {
		defer once.Do(w.mon.appendDone)
		return wait(ctx)
	}, nil
}

func (w watchedAppender) Append(ctx context.Context, e queue.Entry) (queue.Item, error) {
	w.mon.appendStarted()
	defer w.mon.appendDone()
	return w.Appender.Append(ctx, e)
}

// watchedSource is the queue as the uplink sees it: Run calls Brokers and
// each broker's dispatcher calls Lanes at least every 5 s (uplink's
// backstop), so these calls are the loops' heartbeats.
type watchedSource struct {
	uplink.Source
	mon *stallMonitor
}

func (w watchedSource) Brokers() []string {
	w.mon.beat("broker scan")
	return w.Source.Brokers()
}

func (w watchedSource) Lanes(broker string) []queue.Lane {
	w.mon.beat("dispatcher " + brokerLabel(broker))
	return w.Source.Lanes(broker)
}

// brokerLabel drops user info and query from a broker URI for messages.
func brokerLabel(broker string) string {
	if u, err := url.Parse(broker); err == nil {
		u.User, u.RawQuery, u.Fragment = nil, "", ""
		return u.String()
	}
	return "(unparsable broker URI)"
}
