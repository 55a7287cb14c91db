package uplink

import (
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/testkit"
)

// TestFilterParallelReusedConnections: filter mode (one PATCH per
// reading, the stock filter's only write) sends up to Concurrency
// requests to a broker at once over kept-alive connections — never more
// connections than requests in flight, never two requests of one device
// at once, each device's readings in seq order.
func TestFilterParallelReusedConnections(t *testing.T) {
	for _, h2 := range []bool{false, true} {
		t.Run("http2="+strconv.FormatBool(h2), func(t *testing.T) {
			var mu sync.Mutex
			conns, inflight, peak := 0, 0, 0
			b := &broker{inflight: make(map[string]int), respond: func(w http.ResponseWriter, r *http.Request, n int) {
				mu.Lock()
				inflight++
				peak = max(peak, inflight)
				mu.Unlock()
				time.Sleep(2 * time.Millisecond) // the filter's round trip
				mu.Lock()
				inflight--
				mu.Unlock()
				w.WriteHeader(http.StatusNoContent)
			}}
			b.Server = httptest.NewUnstartedServer(http.HandlerFunc(b.serve))
			b.Config.ErrorLog = log.New(io.Discard, "", 0)
			b.Config.ConnState = func(_ net.Conn, s http.ConnState) {
				if s == http.StateNew {
					mu.Lock()
					conns++
					mu.Unlock()
				}
			}
			b.EnableHTTP2 = h2
			b.StartTLS()
			t.Cleanup(b.Close)

			q := newFakeQueue()
			const devices, each, concurrency = 40, 10, 16
			for d := range devices {
				q.add(b.URL, "dev-"+strconv.Itoa(d), each)
			}
			h := start(t, q, &fakeTokens{}, b.pool(), Options{Concurrency: concurrency,
				HTTPClient: NewHTTPClient(b.pool(), 5*time.Second, concurrency)})
			testkit.Eventually(t, 20*time.Second, "queue drained", func() bool { return q.depth() == 0 })
			h.stop(t)

			reqs := b.requests()
			if len(reqs) != devices*each {
				t.Fatalf("%d requests for %d readings", len(reqs), devices*each)
			}
			last := map[string]int{}
			for _, r := range reqs {
				_, ents := decodeBatch(t, `{"entities":[`+r.body+`]}`)
				if v := ents[0].Seq.Value; v != last[r.device] {
					t.Fatalf("%s: seq %d after %d: per-device order lost", r.device, v, last[r.device]-1)
				}
				last[r.device]++
			}
			b.mu.Lock()
			overlap := b.overlap
			b.mu.Unlock()
			mu.Lock()
			defer mu.Unlock()
			if len(overlap) > 0 {
				t.Fatalf("devices with two requests in flight at once: %v", overlap)
			}
			if peak < concurrency/2 {
				t.Fatalf("at most %d requests in flight, want parallel requests (up to %d)", peak, concurrency)
			}
			if conns > concurrency {
				t.Fatalf("%d connections for %d requests, at most %d in flight: connections not reused", conns, len(reqs), concurrency)
			}
			t.Logf("%d requests (HTTP/%d), peak %d in flight, %d connections", len(reqs), reqs[0].proto, peak, conns)
		})
	}
}
