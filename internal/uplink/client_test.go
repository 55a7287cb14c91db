package uplink

import (
	"net/http"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/testkit"
)

// TestClientTimeoutBoundsRequest: the client's Timeout bounds a request
// whose broker never answers, and the read of an answer whose body never
// ends, as http.Client.Do did (the uplink sends on the client's transport
// directly, roundTrip). No answer: counted as a timeout, retried, then
// delivered. A 2xx whose body stalls: the broker applied the update
// before it answered, so the reading is delivered once the read is cut
// off, not sent again.
func TestClientTimeoutBoundsRequest(t *testing.T) {
	for _, tc := range []struct {
		name     string
		hang     func(w http.ResponseWriter, r *http.Request, release <-chan struct{})
		requests int
	}{
		{"no answer", func(w http.ResponseWriter, r *http.Request, release <-chan struct{}) {
			<-release
		}, 2},
		{"endless body", func(w http.ResponseWriter, r *http.Request, release <-chan struct{}) {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusOK)
			w.Write([]byte(`{"partial":`))
			w.(http.Flusher).Flush()
			<-release
		}, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// The hanging handler is let go at the end (cleanups run last
			// first: before the broker is closed), never by the client
			// giving up.
			release := make(chan struct{})
			b := newBroker(t, func(w http.ResponseWriter, r *http.Request, n int) {
				if n == 1 {
					tc.hang(w, r, release)
					return
				}
				w.WriteHeader(http.StatusNoContent)
			})
			t.Cleanup(func() { close(release) })
			q := newFakeQueue()
			q.add(b.URL, "dev-1", 1)
			const timeout = 300 * time.Millisecond
			t0 := time.Now()
			h := start(t, q, &fakeTokens{}, b.pool(), Options{HTTPClient: NewHTTPClient(b.pool(), timeout, 4)})
			testkit.Eventually(t, 10*time.Second, "reading delivered", func() bool { return q.depth() == 0 })
			el := time.Since(t0)
			h.stop(t)
			if n := len(b.requests()); n != tc.requests {
				for _, r := range b.requests() {
					t.Logf("request at %v", r.at.Sub(t0))
				}
				t.Logf("logs:\n%s", h.logs.String())
				t.Fatalf("%d requests, want %d", n, tc.requests)
			}
			if el < timeout || el > 5*time.Second {
				t.Fatalf("delivered after %v, want the first request cut off after ~%v", el, timeout)
			}
			if c := counter(t, h.m.Retried.WithLabelValues("timeout")); c != float64(tc.requests-1) {
				t.Fatalf("%v retries counted as timeout, want %d", c, tc.requests-1)
			}
		})
	}
}
