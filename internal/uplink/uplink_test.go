package uplink

import (
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/queue"
	"github.com/edgegate/edgegate/internal/testkit"
)

func TestDeliverRequestShape(t *testing.T) {
	tests := []struct {
		name   string
		suffix string // appended to the broker URI
		device string
	}{
		{"no trailing slash", "/orion-filter/orion-1", "dev-1"},
		{"trailing slash", "/orion-filter/orion-1/", "dev-1"},
		// A device id needing escapes ("room 1/temp?x&y") is never sent:
		// TestDotDotDeviceNeverSent.
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := newBroker(t, nil)
			q := newFakeQueue()
			bURI := b.URL + tt.suffix
			q.add(bURI, tt.device, 2)
			q.mu.Lock()
			l := queue.Lane{Broker: bURI, Device: tt.device}
			q.lanes[l][0].Service, q.lanes[l][0].ServicePath = "tenant", "/site/a"
			q.mu.Unlock()
			h := start(t, q, &fakeTokens{}, b.pool(), Options{})
			testkit.Eventually(t, 10*time.Second, "queue drained", func() bool { return q.depth() == 0 })
			h.stop(t)

			reqs := b.requests()
			if len(reqs) != 2 {
				t.Fatalf("requests = %d, want 2", len(reqs))
			}
			r := reqs[0]
			wantPath := strings.TrimSuffix(tt.suffix, "/") + "/v2/entities/" + tt.device + "/attrs"
			if r.method != http.MethodPatch || r.path != wantPath {
				t.Errorf("request = %s %s, want PATCH %s", r.method, r.path, wantPath)
			}
			if strings.Contains(r.rawPath, "//v2") {
				t.Errorf("raw path %q has a double slash", r.rawPath)
			}
			// elementid equal to the path (older filters need it), the
			// harmless type, and nothing else: never k1/k2.
			if len(r.query) != 2 || !slices.Equal(r.query["type"], []string{"Sensor"}) || !slices.Equal(r.query["elementid"], []string{tt.device}) {
				t.Errorf("query = %v, want elementid=%s&type=Sensor only", r.query, tt.device)
			}
			if got := r.header.Get("Authorization"); got != "Bearer "+tokenCanary+"1" {
				t.Errorf("Authorization = %q", got)
			}
			if got := r.header.Get("Content-Type"); got != "application/json" {
				t.Errorf("Content-Type = %q", got)
			}
			if got, got2 := r.header.Get("Fiware-Service"), r.header.Get("Fiware-ServicePath"); got != "tenant" || got2 != "/site/a" {
				t.Errorf("Fiware-Service, -ServicePath = %q, %q; want tenant, /site/a", got, got2)
			}
			if r := reqs[1]; r.header.Get("Fiware-Service") != "" || r.header.Values("Fiware-ServicePath") != nil {
				t.Errorf("Fiware headers sent for an item without them: %v", r.header)
			}
			if r.body != `{"seq":{"type":"Integer","value":0}}` {
				t.Errorf("body = %q", r.body)
			}
			if v := counter(t, h.m.Delivered.WithLabelValues(bURI)); v != 2 {
				t.Errorf("Delivered = %v, want 2", v)
			}
		})
	}
}

// A broker that echoes the request URL and headers in its refusal must not
// get the token into the dead-letter reason or the logs.
func TestSecretsNotEchoed(t *testing.T) {
	b := newBroker(t, func(w http.ResponseWriter, r *http.Request, n int) {
		orion(w, http.StatusBadRequest, `{"error":"BadRequest","description":"bad url `+r.URL.String()+` auth `+r.Header.Get("Authorization")+`"}`)
	})
	q := newFakeQueue()
	q.add(b.URL, "d", 1)
	h := start(t, q, &fakeTokens{}, b.pool(), Options{})
	testkit.Eventually(t, 10*time.Second, "dead letter", func() bool { return len(q.deadLetters()) == 1 })
	h.stop(t)
	if reason := q.deadLetters()[0].reason; strings.Contains(reason, tokenCanary) {
		t.Errorf("reason %q contains the token", reason)
	}
}

func TestPerDeviceOrderUnderConcurrencyAndRetries(t *testing.T) {
	b := newBroker(t, func(w http.ResponseWriter, r *http.Request, n int) {
		switch n % 7 {
		case 3:
			w.WriteHeader(http.StatusServiceUnavailable)
		case 5:
			orion(w, http.StatusUnauthorized, `{"result":false,"message":"Network problems"}`)
		default:
			w.WriteHeader(http.StatusNoContent)
		}
	})
	q := newFakeQueue()
	const devices, per = 6, 40
	for d := range devices {
		q.add(b.URL, "dev-"+strconv.Itoa(d), per)
	}
	h := start(t, q, &fakeTokens{}, b.pool(), Options{Concurrency: 4, MinBackoff: time.Millisecond, MaxBackoff: 5 * time.Millisecond})
	testkit.Eventually(t, 10*time.Second, "queue drained", func() bool { return q.depth() == 0 })
	h.stop(t)
	// Every PATCH body went back to the pool once the transport was done
	// with it (body.go), and the bodies below were whole with the buffers
	// reused.
	sent := int64(len(b.requests()))
	testkit.Eventually(t, 10*time.Second, "every body returned", func() bool { return h.u.bodies.returned.Load() == sent })

	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.overlap) > 0 {
		t.Errorf("devices with two requests in flight: %v", b.overlap)
	}
	// The seqs each device's requests carried never go backwards, and
	// every seq was sent.
	last := map[string]int{}
	for _, r := range b.reqs {
		var seq int
		i := strings.LastIndex(r.body, ":")
		seq, _ = strconv.Atoi(strings.TrimSuffix(r.body[i+1:], "}}"))
		prev, ok := last[r.device]
		if ok && seq != prev && seq != prev+1 {
			t.Errorf("device %s: seq %d after %d", r.device, seq, prev)
		}
		if !ok && seq != 0 {
			t.Errorf("device %s: first seq %d, want 0", r.device, seq)
		}
		last[r.device] = seq
	}
	for d := range devices {
		if got := last["dev-"+strconv.Itoa(d)]; got != per-1 {
			t.Errorf("dev-%d: last seq %d, want %d", d, got, per-1)
		}
	}
	if v := counter(t, h.m.Retried.WithLabelValues("5xx")); v == 0 {
		t.Error("Retried{5xx} = 0, want > 0")
	}
}

func TestRetryThenDeliver(t *testing.T) {
	tests := []struct {
		name   string
		first  func(w http.ResponseWriter)
		reason string
	}{
		{"503", func(w http.ResponseWriter) { w.WriteHeader(http.StatusServiceUnavailable) }, "5xx"},
		{"408", func(w http.ResponseWriter) { w.WriteHeader(http.StatusRequestTimeout) }, "408"},
		{"401 Network problems", func(w http.ResponseWriter) {
			orion(w, 401, `{"result":false,"message":"Network problems"}`)
		}, "401_transient"},
		{"401 Configuration error", func(w http.ResponseWriter) {
			orion(w, 401, `{"result":false,"message":"Configuration error"}`)
		}, "401_transient"},
		{"401 Trouble in", func(w http.ResponseWriter) {
			orion(w, 401, `{"result":false,"message":"Trouble in contacting the ownership service"}`)
		}, "401_transient"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := newBroker(t, func(w http.ResponseWriter, r *http.Request, n int) {
				if n == 1 {
					tt.first(w)
					return
				}
				w.WriteHeader(http.StatusNoContent)
			})
			q := newFakeQueue()
			q.add(b.URL, "d", 1)
			h := start(t, q, &fakeTokens{}, b.pool(), Options{})
			testkit.Eventually(t, 10*time.Second, "queue drained", func() bool { return q.depth() == 0 })
			h.stop(t)
			if n := len(b.requests()); n != 2 {
				t.Errorf("requests = %d, want 2", n)
			}
			if len(q.deadLetters()) != 0 {
				t.Errorf("dead letters: %v", q.deadLetters())
			}
			if v := counter(t, h.m.Retried.WithLabelValues(tt.reason)); v != 1 {
				t.Errorf("Retried{%s} = %v, want 1", tt.reason, v)
			}
			if v := counter(t, h.m.Delivered.WithLabelValues(b.URL)); v != 1 {
				t.Errorf("Delivered = %v, want 1", v)
			}
		})
	}
}

func TestRetryAfterHonoured(t *testing.T) {
	tests := []struct {
		name  string
		value func() string
	}{
		{"seconds", func() string { return "1" }},
		{"HTTP-date", func() string { return time.Now().Add(2 * time.Second).UTC().Format(http.TimeFormat) }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := newBroker(t, func(w http.ResponseWriter, r *http.Request, n int) {
				if n == 1 {
					w.Header().Set("Retry-After", tt.value())
					w.WriteHeader(http.StatusTooManyRequests)
					return
				}
				w.WriteHeader(http.StatusNoContent)
			})
			q := newFakeQueue()
			q.add(b.URL, "d", 1)
			q.add(b.URL, "e", 1)
			h := start(t, q, &fakeTokens{}, b.pool(), Options{Concurrency: 1})
			testkit.Eventually(t, 10*time.Second, "queue drained", func() bool { return q.depth() == 0 })
			h.stop(t)
			reqs := b.requests()
			if len(reqs) != 3 {
				t.Fatalf("requests = %d, want 3", len(reqs))
			}
			// The whole broker waited, not only the lane that got the 429.
			if gap := reqs[1].at.Sub(reqs[0].at); gap < 900*time.Millisecond {
				t.Errorf("next request %v after the 429, want ≥ ~1s (MaxBackoff is 100ms)", gap)
			}
		})
	}
}

func TestInvalidTokenRefreshed(t *testing.T) {
	tests := []struct {
		name   string
		refuse func(w http.ResponseWriter)
	}{
		{"filter message", func(w http.ResponseWriter) {
			orion(w, 401, `{"result":false,"message":"The passed access token is not valid"}`)
		}},
		{"WWW-Authenticate", func(w http.ResponseWriter) {
			w.Header().Set("WWW-Authenticate", `Bearer realm="x", error="invalid_token", error_description="expired"`)
			w.WriteHeader(401)
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := newBroker(t, func(w http.ResponseWriter, r *http.Request, n int) {
				if r.Header.Get("Authorization") == "Bearer "+tokenCanary+"1" {
					tt.refuse(w)
					return
				}
				w.WriteHeader(http.StatusNoContent)
			})
			q := newFakeQueue()
			q.add(b.URL, "d", 3)
			tok := &fakeTokens{}
			h := start(t, q, tok, b.pool(), Options{MinBackoff: 5 * time.Second, MaxBackoff: 10 * time.Second})
			testkit.Eventually(t, 10*time.Second, "queue drained", func() bool { return q.depth() == 0 })
			h.stop(t)
			if got := tok.invalidations(); !slices.Equal(got, []string{tokenCanary + "1"}) {
				t.Errorf("Invalidate calls = %q, want [%s1]", got, tokenCanary)
			}
			if n := len(b.requests()); n != 4 {
				t.Errorf("requests = %d, want 4", n)
			}
			// A 5s MinBackoff would have timed the test out: the retry was prompt.
		})
	}
}

func TestRepeatedInvalidTokenBacksOff(t *testing.T) {
	b := newBroker(t, func(w http.ResponseWriter, r *http.Request, n int) {
		orion(w, 401, `{"result":false,"message":"The passed access token is not valid"}`)
	})
	q := newFakeQueue()
	q.add(b.URL, "d", 1)
	tok := &fakeTokens{}
	h := start(t, q, tok, b.pool(), Options{MinBackoff: 300 * time.Millisecond, MaxBackoff: time.Second})
	testkit.Eventually(t, 10*time.Second, "two invalidations", func() bool { return len(tok.invalidations()) >= 2 })
	time.Sleep(200 * time.Millisecond) // observation window, not synchronisation
	h.stop(t)
	if n := len(b.requests()); n > 3 {
		t.Errorf("requests = %d in the first ~200ms after the second refusal, want ≤ 3 (backing off)", n)
	}
	if q.depth() != 1 || len(q.deadLetters()) != 0 {
		t.Errorf("depth %d, dead letters %d; want the reading kept", q.depth(), len(q.deadLetters()))
	}
}

func TestPermanentDeadLettered(t *testing.T) {
	tests := []struct {
		name       string
		status     int
		body       string
		wantReason string
		class      string
	}{
		{"404 not from Orion (filter route)", 404, "Not Found", "404 Not Found: Not Found", "4xx"},
		{"422 Unprocessable, none exist", 422, `{"description":"do not exist: d - [ C, D ]","error":"Unprocessable"}`,
			"422 Unprocessable: the device's entity has none of the attributes C, D (add them to the device's model)", "4xx"},
		{"400 invalid characters", 400, `{"error":"BadRequest","description":"Invalid characters in attribute value"}`,
			"400 Bad Request: Invalid characters in attribute value", "4xx"},
		{"401 elementid", 401, `{"result":false,"message":"The passed elementid is not valid"}`,
			"401: The passed elementid is not valid", "401"},
		{"400 plain", 400, "bad request", "400 Bad Request: bad request", "4xx"},
		{"413 long body clipped", 413, strings.Repeat("x", 5000), "413 Request Entity Too Large: " + strings.Repeat("x", maxReasonText) + "…", "4xx"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := newBroker(t, func(w http.ResponseWriter, r *http.Request, n int) {
				if n == 1 {
					orion(w, tt.status, tt.body)
					return
				}
				w.WriteHeader(http.StatusNoContent)
			})
			q := newFakeQueue()
			q.add(b.URL, "d", 2)
			h := start(t, q, &fakeTokens{}, b.pool(), Options{})
			testkit.Eventually(t, 10*time.Second, "queue drained", func() bool { return q.depth() == 0 })
			h.stop(t)
			dl := q.deadLetters()
			if len(dl) != 1 || dl[0].it.Seq != 0 {
				t.Fatalf("dead letters = %v, want seq 0 only", dl)
			}
			if dl[0].reason != tt.wantReason {
				t.Errorf("reason = %q, want %q", dl[0].reason, tt.wantReason)
			}
			if n := len(b.requests()); n != 2 {
				t.Errorf("requests = %d, want 2 (no retry of the refused reading)", n)
			}
			if v := counter(t, h.m.DeadLettered.WithLabelValues(tt.class)); v != 1 {
				t.Errorf("DeadLettered{%s} = %v, want 1", tt.class, v)
			}
			if !strings.Contains(h.logs.String(), "dead-lettered") {
				t.Error("no warning logged")
			}
		})
	}
}

func TestDeadLetterLogRateLimited(t *testing.T) {
	b := newBroker(t, func(w http.ResponseWriter, r *http.Request, n int) {
		orion(w, 400, `{"error":"BadRequest","description":"gone"}`)
	})
	q := newFakeQueue()
	q.add(b.URL, "d", 20)
	h := start(t, q, &fakeTokens{}, b.pool(), Options{})
	testkit.Eventually(t, 10*time.Second, "queue drained", func() bool { return q.depth() == 0 })
	h.stop(t)
	if n := strings.Count(h.logs.String(), "dead-lettered"); n != 1 {
		t.Errorf("dead-letter log lines = %d, want 1", n)
	}
}

func TestServerDownThenUp(t *testing.T) {
	// Reserve a port, then leave it closed: connection refused.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()

	var served atomic.Int64
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		served.Add(1)
		w.WriteHeader(http.StatusNoContent)
	}))
	// httptest serves one fixed certificate; take the pool from a twin
	// so the client can be built before the broker is up.
	twin := newBroker(t, nil)

	q := newFakeQueue()
	bURI := "https://" + addr
	q.add(bURI, "a", 5)
	q.add(bURI, "b", 5)
	h := start(t, q, &fakeTokens{}, twin.pool(), Options{})
	testkit.Eventually(t, 10*time.Second, "network retries", func() bool { return counter(t, h.m.Retried.WithLabelValues("network")) >= 3 })
	if q.depth() != 10 {
		t.Fatalf("depth while broker down = %d, want 10", q.depth())
	}

	l, err = net.Listen("tcp", addr)
	if err != nil {
		t.Skipf("port %s taken meanwhile: %v", addr, err)
	}
	srv.Listener = l
	srv.StartTLS()
	defer srv.Close()
	testkit.Eventually(t, 10*time.Second, "queue drained", func() bool { return q.depth() == 0 })
	h.stop(t)
	if n := served.Load(); n != 10 {
		t.Errorf("broker got %d requests, want 10", n)
	}
	if len(q.deadLetters()) != 0 {
		t.Errorf("dead letters: %v", q.deadLetters())
	}
}

func TestTokenFailureRetried(t *testing.T) {
	b := newBroker(t, nil)
	q := newFakeQueue()
	q.add(b.URL, "d", 1)
	h := start(t, q, &fakeTokens{failFirst: 2}, b.pool(), Options{})
	testkit.Eventually(t, 10*time.Second, "queue drained", func() bool { return q.depth() == 0 })
	h.stop(t)
	if v := counter(t, h.m.Retried.WithLabelValues("token")); v != 2 {
		t.Errorf("Retried{token} = %v, want 2", v)
	}
	if !strings.Contains(h.logs.String(), "backing off") {
		t.Error("token failure not logged")
	}
}

func TestFairness(t *testing.T) {
	for _, conc := range []int{1, 4} {
		t.Run("Concurrency="+strconv.Itoa(conc), func(t *testing.T) {
			// With several workers, arrival order at the broker also
			// depends on connection setup, so there the backlog's
			// requests are held until the small lane's request arrives:
			// a starving scheduler would never send it.
			smallSeen := make(chan struct{})
			var once sync.Once
			b := newBroker(t, func(w http.ResponseWriter, r *http.Request, n int) {
				if deviceOf(r) == "b-single" {
					once.Do(func() { close(smallSeen) })
				} else if conc > 1 {
					select {
					case <-smallSeen:
					case <-time.After(5 * time.Second):
					}
				}
				w.WriteHeader(http.StatusNoContent)
			})
			q := newFakeQueue()
			q.add(b.URL, "a-backlog", 1000)
			q.add(b.URL, "b-single", 1)
			h := start(t, q, &fakeTokens{}, b.pool(), Options{Concurrency: conc})
			testkit.Eventually(t, 10*time.Second, "small lane delivered", func() bool {
				return !slices.ContainsFunc(q.Lanes(b.URL), func(l queue.Lane) bool { return l.Device == "b-single" })
			})
			h.stop(t)
			reqs := b.requests()
			i := slices.IndexFunc(reqs, func(r seen) bool { return r.device == "b-single" })
			if i < 0 || i > 2 {
				t.Errorf("small lane served as request #%d, want among the first 3", i+1)
			}
		})
	}
}

func TestNewBrokerWakesWithoutPolling(t *testing.T) {
	b1, b2 := newBroker(t, nil), newBroker(t, nil)
	q := newFakeQueue()
	h := start(t, q, &fakeTokens{}, b1.pool(), Options{})
	// Both brokers appear after Run started; the backstop is 5s, so a
	// delivery well within that came from Changed.
	t0 := time.Now()
	q.add(b1.URL, "d", 1)
	q.add(b2.URL, "d", 1)
	testkit.Eventually(t, 10*time.Second, "queue drained", func() bool { return q.depth() == 0 })
	if el := time.Since(t0); el > 3*time.Second {
		t.Errorf("delivery took %v; woken by the backstop, not Changed?", el)
	}
	q.add(b1.URL, "d", 1) // and again, on an idle dispatcher
	testkit.Eventually(t, 10*time.Second, "queue drained again", func() bool { return q.depth() == 0 })
	h.stop(t)
	if len(b1.requests()) != 2 || len(b2.requests()) != 1 {
		t.Errorf("requests = %d, %d; want 2, 1", len(b1.requests()), len(b2.requests()))
	}
}

func TestShutdownBoundedWhileRequestsHang(t *testing.T) {
	release := make(chan struct{})
	defer close(release)
	b := newBroker(t, func(w http.ResponseWriter, r *http.Request, n int) {
		select {
		case <-release:
		case <-r.Context().Done():
		}
	})
	q := newFakeQueue()
	for _, d := range []string{"a", "b", "c"} {
		q.add(b.URL, d, 2)
	}
	h := start(t, q, &fakeTokens{}, b.pool(), Options{ShutdownGrace: 200 * time.Millisecond})
	testkit.Eventually(t, 10*time.Second, "requests hanging", func() bool { return len(b.requests()) == 3 })
	t0 := time.Now()
	h.stop(t)
	if el := time.Since(t0); el > 2*time.Second {
		t.Errorf("Run took %v to return, want ≈ ShutdownGrace (200ms)", el)
	}
	if q.depth() != 6 {
		t.Errorf("depth = %d, want 6 (nothing deleted)", q.depth())
	}
	if counter(t, h.m.Retried.WithLabelValues("network"))+counter(t, h.m.Retried.WithLabelValues("timeout")) != 0 {
		t.Error("a cut-off request at shutdown was counted as a failure")
	}
}

func TestHTTP2(t *testing.T) {
	b := &broker{inflight: make(map[string]int)}
	b.Server = httptest.NewUnstartedServer(http.HandlerFunc(b.serve))
	b.EnableHTTP2 = true
	b.StartTLS()
	defer b.Close()
	q := newFakeQueue()
	q.add(b.URL, "d", 3)
	h := start(t, q, &fakeTokens{}, b.pool(), Options{})
	testkit.Eventually(t, 10*time.Second, "queue drained", func() bool { return q.depth() == 0 })
	h.stop(t)
	for _, r := range b.requests() {
		if r.proto != 2 {
			t.Errorf("proto = HTTP/%d, want 2", r.proto)
		}
	}
	// The HTTP/2 transport closes request bodies too (body.go).
	sent := int64(len(b.requests()))
	testkit.Eventually(t, 10*time.Second, "every body returned", func() bool { return h.u.bodies.returned.Load() == sent })
}

func TestRefusesUnverifiedAndPlainBrokers(t *testing.T) {
	b := newBroker(t, nil)
	plain := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(204) }))
	defer plain.Close()
	q := newFakeQueue()
	q.add(b.URL, "d", 1)     // TLS, but the client lacks its CA: system roots
	q.add(plain.URL, "d", 1) // http://: never served
	h := start(t, q, &fakeTokens{}, nil, Options{})
	testkit.Eventually(t, 10*time.Second, "TLS failures", func() bool { return counter(t, h.m.Retried.WithLabelValues("network")) >= 2 })
	h.stop(t)
	if q.depth() != 2 || len(b.requests()) != 0 {
		t.Errorf("depth = %d, broker requests = %d; want 2, 0", q.depth(), len(b.requests()))
	}
	if !strings.Contains(h.logs.String(), "want an https:// URI") {
		t.Error("plain broker not reported")
	}
}

func TestStoreFailureKeepsReading(t *testing.T) {
	b := newBroker(t, nil)
	q := newFakeQueue()
	q.add(b.URL, "d", 1)
	q.peekErr = context.DeadlineExceeded
	h := start(t, q, &fakeTokens{}, b.pool(), Options{})
	testkit.Eventually(t, 10*time.Second, "store retries", func() bool { return counter(t, h.m.Retried.WithLabelValues("store")) >= 2 })
	q.mu.Lock()
	q.peekErr = nil
	q.mu.Unlock()
	testkit.Eventually(t, 10*time.Second, "queue drained", func() bool { return q.depth() == 0 })
	h.stop(t)
}

func TestNoGoroutineLeak(t *testing.T) {
	before := runtime.NumGoroutine()
	func() {
		b := newBroker(t, func(w http.ResponseWriter, r *http.Request, n int) {
			if n%3 == 0 {
				w.WriteHeader(http.StatusServiceUnavailable)
				return
			}
			w.WriteHeader(http.StatusNoContent)
		})
		q := newFakeQueue()
		for _, d := range []string{"a", "b", "c", "d", "e"} {
			q.add(b.URL, d, 10)
		}
		h := start(t, q, &fakeTokens{}, b.pool(), Options{MinBackoff: time.Millisecond, MaxBackoff: 2 * time.Millisecond})
		testkit.Eventually(t, 10*time.Second, "queue drained", func() bool { return q.depth() == 0 })
		h.stop(t)
		b.Close()
	}()
	testkit.Eventually(t, 10*time.Second, "goroutines to exit", func() bool { return runtime.NumGoroutine() <= before })
}

func TestFairnessManyLanes(t *testing.T) {
	b := newBroker(t, nil)
	q := newFakeQueue()
	for i := range 8 {
		q.add(b.URL, "a-backlog-"+strconv.Itoa(i), 100)
	}
	q.add(b.URL, "z-single", 1)
	h := start(t, q, &fakeTokens{}, b.pool(), Options{Concurrency: 2})
	testkit.Eventually(t, 10*time.Second, "small lane delivered", func() bool {
		return !slices.ContainsFunc(q.Lanes(b.URL), func(l queue.Lane) bool { return l.Device == "z-single" })
	})
	h.stop(t)
	// The exact order is TestFillRoundRobin's (the ninth start); here,
	// over real HTTPS with two workers whose requests can be retried or
	// overtake each other, the user-visible property: the one-reading
	// device is served long before the 800 backlogged readings drain.
	i := slices.IndexFunc(b.requests(), func(r seen) bool { return r.device == "z-single" })
	if i < 0 || i >= 80 {
		t.Errorf("small lane served as request #%d of 801, want within the first tenth", i+1)
	}
}

// TestFillRoundRobin proves the dispatcher's scheduling without a network
// or a clock: requests start round-robin over the lanes in device order, so
// every lane with readings starts once before any starts twice, whatever
// the length of the others' backlogs (a one-reading device behind eight
// backlogged ones is the ninth start, never later). Attempts are completed
// one at a time, in the order they started, as two workers would.
func TestFillRoundRobin(t *testing.T) {
	q := newFakeQueue()
	const broker = "https://broker.test"
	for i := range 8 {
		q.add(broker, "a-backlog-"+strconv.Itoa(i), 100)
	}
	q.add(broker, "z-single", 1)
	u := New(q, &fakeTokens{}, Options{Concurrency: 2})
	d, err := u.newDispatcher(broker)
	if err != nil {
		t.Fatal(err)
	}
	d.jobs = make(chan job, u.opts.Concurrency)
	d.refresh()
	var started []string
	var pending []job
	for len(started) < 27 {
		d.fill()
		for drained := false; !drained; {
			select {
			case j := <-d.jobs:
				started = append(started, j.lane.Device)
				pending = append(pending, j)
			default:
				drained = true
			}
		}
		if len(pending) == 0 {
			t.Fatalf("nothing in flight after %d starts", len(started))
		}
		if d.inflight > u.opts.Concurrency {
			t.Fatalf("%d requests in flight, at most %d", d.inflight, u.opts.Concurrency)
		}
		// The oldest attempt finishes; its lane keeps its readings (aborted:
		// nothing was settled), so the backlogs never run out.
		d.handle(result{job: pending[0], aborted: true})
		pending = pending[1:]
	}
	for round := range 3 {
		seen := map[string]bool{}
		for _, dev := range started[round*9 : round*9+9] {
			if seen[dev] {
				t.Fatalf("round %d started %s twice before every lane once: %v", round, dev, started)
			}
			seen[dev] = true
		}
	}
	if started[8] != "z-single" {
		t.Errorf("the one-reading lane was start #%d, want #9: %v", slices.Index(started, "z-single")+1, started)
	}
}

// TestRedirectNotRetriedForever: a broker answering 307 (issue 17: retried
// without end) has the reading dead-lettered once the refusal window is
// over (here: none, NoRefusalWindow) with a reason naming the redirect;
// the redirect is never followed.
func TestRedirectNotRetriedForever(t *testing.T) {
	var followed atomic.Int32
	elsewhere := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { followed.Add(1) }))
	defer elsewhere.Close()
	b := newBroker(t, func(w http.ResponseWriter, r *http.Request, n int) {
		w.Header().Set("Location", elsewhere.URL+"/v2/entities/d/attrs")
		w.WriteHeader(http.StatusTemporaryRedirect)
	})
	q := newFakeQueue()
	q.add(b.URL, "d", 1)
	h := start(t, q, &fakeTokens{}, b.pool(), Options{RefusalWindow: NoRefusalWindow})
	testkit.Eventually(t, 10*time.Second, "the redirected reading dead-lettered", func() bool { return len(q.deadLetters()) == 1 })
	h.stop(t)
	dl := q.deadLetters()[0]
	if !strings.Contains(dl.reason, "307 Temporary Redirect: redirect to "+elsewhere.URL) || !strings.Contains(dl.reason, "not followed") {
		t.Errorf("reason = %q", dl.reason)
	}
	if followed.Load() != 0 {
		t.Errorf("the redirect was followed %d times", followed.Load())
	}
	if v := counter(t, h.m.DeadLettered.WithLabelValues("3xx")); v != 1 {
		t.Errorf("DeadLettered{3xx} = %v, want 1", v)
	}
}

// TestDotDotDeviceNeverSent: a queued reading whose device id is ".."
// (from a store written before ingest refused such ids) is dead-lettered
// without a request: PATCH /v2/entities/../attrs is impossible.
func TestDotDotDeviceNeverSent(t *testing.T) {
	b := newBroker(t, func(w http.ResponseWriter, r *http.Request, n int) { w.WriteHeader(http.StatusNoContent) })
	q := newFakeQueue()
	q.add(b.URL, "..", 1)
	q.add(b.URL, "room 1/temp?x&y", 1)
	q.add(b.URL, "d", 1)
	h := start(t, q, &fakeTokens{}, b.pool(), Options{})
	testkit.Eventually(t, 10*time.Second, "queue drained", func() bool { return q.depth() == 0 })
	h.stop(t)
	dl := q.deadLetters()
	slices.SortFunc(dl, func(a, b deadItem) int { return strings.Compare(a.it.Device, b.it.Device) })
	if len(dl) != 2 || dl[0].it.Device != ".." || !strings.Contains(dl[0].reason, "relative path segment") ||
		dl[1].it.Device != "room 1/temp?x&y" || !strings.Contains(dl[1].reason, "byte 4 (0x20)") {
		t.Fatalf("dead letters = %+v, want the two bad ids with their reasons", dl)
	}
	for _, r := range b.requests() {
		if strings.Contains(r.rawPath, "..") || r.device != "d" {
			t.Fatalf("request to %s", r.rawPath)
		}
	}
	if v := counter(t, h.m.DeadLettered.WithLabelValues("bad_device_id")); v != 2 {
		t.Errorf("DeadLettered{bad_device_id} = %v, want 1", v)
	}
}
