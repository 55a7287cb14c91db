package daemon

import (
	"context"
	"strings"
	"sync"
)

// readiness gathers what must be live before the daemon says it is ready
// (sd_notify READY=1, the "edgegate ready" log line, status): every ingest
// path listening or subscribed. In external mode the ingest subscription
// is made after the connection; until it exists, a broker without a
// session for the gateway (its first start) drops what devices publish.
type readiness struct {
	mu      sync.Mutex
	pending []readyWait
}

type readyWait struct {
	name string
	ch   <-chan struct{}
}

// add registers one condition, met when ch is closed.
func (r *readiness) add(name string, ch <-chan struct{}) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.pending = append(r.pending, readyWait{name, ch})
}

// waiting names the conditions not met yet ("" once ready).
func (r *readiness) waiting() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for _, w := range r.pending {
		select {
		case <-w.ch:
		default:
			out = append(out, w.name)
		}
	}
	return strings.Join(out, "; ")
}

// all is closed once every condition added so far is met; never, if ctx
// ends first.
func (r *readiness) all(ctx context.Context) <-chan struct{} {
	r.mu.Lock()
	ws := append([]readyWait(nil), r.pending...)
	r.mu.Unlock()
	done := make(chan struct{})
	go func() {
		for _, w := range ws {
			select {
			case <-w.ch:
			case <-ctx.Done():
				return
			}
		}
		close(done)
	}()
	return done
}
