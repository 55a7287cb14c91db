package centralsync

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/edgegate/edgegate/internal/metrics"
	"github.com/edgegate/edgegate/internal/testkit"
)

// Canary values: they must never show up in an error or a log line.
const (
	canaryID     = "edgegate-gw-7"
	canarySecret = "s3cr3t-CANARY-9f2c"
	tokenPrefix  = "at-CANARY-"
)

// tokenServer is a fake OIDC token endpoint on a real TLS listener.
type tokenServer struct {
	*httptest.Server
	fetches   atomic.Int64
	expiresIn atomic.Int64
	// status, when not 200, makes the endpoint fail with that status and a
	// body that echoes the secret (a careless provider).
	status atomic.Int64
	// gate, when set, holds each request until it is closed or the
	// request is cancelled.
	gate    chan struct{}
	arrived chan struct{} // receives one value per request, if set
}

func newTokenServer(t *testing.T) *tokenServer {
	t.Helper()
	ts := &tokenServer{}
	ts.expiresIn.Store(300)
	ts.status.Store(http.StatusOK)
	ts.Server = httptest.NewTLSServer(http.HandlerFunc(ts.serve))
	t.Cleanup(ts.Close)
	return ts
}

func (ts *tokenServer) serve(w http.ResponseWriter, r *http.Request) {
	n := ts.fetches.Add(1)
	if ts.arrived != nil {
		ts.arrived <- struct{}{}
	}
	if ts.gate != nil {
		select {
		case <-ts.gate:
		case <-r.Context().Done():
			return
		}
	}
	id, secret, ok := r.BasicAuth()
	if err := r.ParseForm(); err != nil || !ok || id != canaryID || secret != canarySecret ||
		r.PostForm.Get("grant_type") != "client_credentials" || r.PostForm.Get("scope") != "openid iot" {
		http.Error(w, `{"error":"invalid_client"}`, http.StatusUnauthorized)
		return
	}
	if st := int(ts.status.Load()); st != http.StatusOK {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(st)
		fmt.Fprintf(w, `{"error":"invalid_client","error_description":"bad credentials","echo":%q,"access_token":"%sleak"}`, canarySecret, tokenPrefix)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(map[string]any{
		"access_token": fmt.Sprintf("%s%d", tokenPrefix, n),
		"token_type":   "Bearer",
		"expires_in":   ts.expiresIn.Load(),
	})
}

// fakeClock is a settable clock.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *fakeClock) Add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

type syncBuffer = testkit.Buffer

type fixture struct {
	srv   *tokenServer
	src   *TokenSource
	clock *fakeClock
	m     *metrics.Metrics
	logs  *syncBuffer
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	f := &fixture{srv: newTokenServer(t), clock: &fakeClock{t: time.Unix(1_700_000_000, 0)}, m: metrics.New(), logs: &syncBuffer{}}
	f.src = NewTokenSource(ClientCredentials{
		TokenURL:     f.srv.URL + "/realms/iot/protocol/openid-connect/token",
		ClientID:     canaryID,
		ClientSecret: canarySecret,
		Scopes:       []string{"openid", "iot"},
		HTTPClient:   f.srv.Client(),
		Metrics:      f.m,
		Logger:       slog.New(slog.NewTextHandler(f.logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
		Now:          f.clock.Now,
	})
	t.Cleanup(func() {
		if s := f.logs.String(); strings.Contains(s, canarySecret) || strings.Contains(s, tokenPrefix) {
			t.Errorf("logs leak a secret or token:\n%s", s)
		}
	})
	return f
}

func (f *fixture) token(t *testing.T) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	tok, err := f.src.Token(ctx)
	if err != nil {
		t.Fatalf("Token: %v", err)
	}
	return tok
}

func assertNoLeak(t *testing.T, err error) {
	t.Helper()
	if s := err.Error(); strings.Contains(s, canarySecret) || strings.Contains(s, tokenPrefix) {
		t.Errorf("error leaks a secret or token: %q", s)
	}
}

func TestTokenCached(t *testing.T) {
	f := newFixture(t)
	a, b := f.token(t), f.token(t)
	if a != b || a != tokenPrefix+"1" {
		t.Errorf("tokens = %q, %q; want both %q", a, b, tokenPrefix+"1")
	}
	if n := f.srv.fetches.Load(); n != 1 {
		t.Errorf("fetches = %d, want 1", n)
	}
	if v := counterValue(t, f.m.TokenRefreshes.WithLabelValues("ok")); v != 1 {
		t.Errorf("TokenRefreshes{ok} = %v, want 1", v)
	}
}

func TestTokenEarlyRefresh(t *testing.T) {
	tests := []struct {
		name      string
		expiresIn int64
		keep      time.Duration // still cached at this age
		renew     time.Duration // refetched at this age
	}{
		{"long-lived token refreshed 60s early", 300, 239 * time.Second, 241 * time.Second},
		{"short-lived token refreshed at half-life", 60, 29 * time.Second, 31 * time.Second},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFixture(t)
			f.srv.expiresIn.Store(tt.expiresIn)
			first := f.token(t)
			f.clock.Add(tt.keep)
			if got := f.token(t); got != first {
				t.Errorf("at %v: token = %q, want cached %q", tt.keep, got, first)
			}
			f.clock.Add(tt.renew - tt.keep)
			if got := f.token(t); got == first {
				t.Errorf("at %v: token still %q, want a new one", tt.renew, got)
			}
			if n := f.srv.fetches.Load(); n != 2 {
				t.Errorf("fetches = %d, want 2", n)
			}
		})
	}
}

func TestTokenFailedEarlyRefreshServesCached(t *testing.T) {
	f := newFixture(t)
	first := f.token(t)
	f.srv.status.Store(http.StatusInternalServerError)
	f.clock.Add(250 * time.Second) // in the early-refresh window, still valid
	if got := f.token(t); got != first {
		t.Fatalf("token = %q, want cached %q while central is down", got, first)
	}
	// Within the pause no new attempt is made.
	n := f.srv.fetches.Load()
	f.token(t)
	if got := f.srv.fetches.Load(); got != n {
		t.Errorf("fetches = %d, want %d (no retry within the pause)", got, n)
	}
	f.clock.Add(60 * time.Second) // expired
	_, err := f.src.Token(context.Background())
	if err == nil {
		t.Fatal("Token after expiry with central down: want error")
	}
	assertNoLeak(t, err)
}

func TestTokenInvalidate(t *testing.T) {
	f := newFixture(t)
	first := f.token(t)
	f.src.Invalidate("some-other-token")
	if got := f.token(t); got != first {
		t.Errorf("after Invalidate(other): token = %q, want %q", got, first)
	}
	f.src.Invalidate(first)
	second := f.token(t)
	if second == first {
		t.Errorf("after Invalidate(current): token still %q", second)
	}
	// A late complaint about the old token must not drop the new one.
	f.src.Invalidate(first)
	if got := f.token(t); got != second {
		t.Errorf("after stale Invalidate: token = %q, want %q", got, second)
	}
	if n := f.srv.fetches.Load(); n != 2 {
		t.Errorf("fetches = %d, want 2", n)
	}
}

func TestTokenConcurrentCallersShareOneFetch(t *testing.T) {
	f := newFixture(t)
	f.srv.gate = make(chan struct{})
	f.srv.arrived = make(chan struct{}, 100)
	const callers = 32
	var wg sync.WaitGroup
	toks := make([]string, callers)
	errs := make([]error, callers)
	for i := range callers {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			toks[i], errs[i] = f.src.Token(ctx)
		})
	}
	select {
	case <-f.srv.arrived:
	case <-time.After(10 * time.Second):
		t.Fatal("no fetch reached the server")
	}
	close(f.srv.gate)
	wg.Wait()
	for i := range callers {
		if errs[i] != nil || toks[i] != toks[0] {
			t.Errorf("caller %d: %q, %v; want %q", i, toks[i], errs[i], toks[0])
		}
	}
	if n := f.srv.fetches.Load(); n != 1 {
		t.Errorf("fetches = %d, want 1", n)
	}
}

func TestTokenHonoursContext(t *testing.T) {
	f := newFixture(t)
	f.srv.gate = make(chan struct{})
	f.srv.arrived = make(chan struct{}, 100)
	leaderCtx, cancelLeader := context.WithCancel(context.Background())
	leaderErr := make(chan error, 1)
	go func() {
		_, err := f.src.Token(leaderCtx)
		leaderErr <- err
	}()
	<-f.srv.arrived

	// A waiter with a short deadline gives up on its own.
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, err := f.src.Token(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("waiter with expired ctx: err = %v, want DeadlineExceeded", err)
	}

	// A patient waiter survives the leader giving up: it fetches anew.
	waiter := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_, err := f.src.Token(ctx)
		waiter <- err
	}()
	cancelLeader()
	if err := <-leaderErr; !errors.Is(err, context.Canceled) {
		t.Errorf("leader: err = %v, want Canceled", err)
	}
	<-f.srv.arrived // the waiter's own fetch
	close(f.srv.gate)
	if err := <-waiter; err != nil {
		t.Errorf("waiter after leader cancelled: %v", err)
	}
	if v := counterValue(t, f.m.TokenRefreshes.WithLabelValues("error")); v != 0 {
		t.Errorf("TokenRefreshes{error} = %v, want 0 (a cancelled caller is not a provider error)", v)
	}
}

func TestTokenErrors(t *testing.T) {
	t.Run("server down names the URL", func(t *testing.T) {
		f := newFixture(t)
		f.srv.Close()
		_, err := f.src.Token(context.Background())
		if err == nil {
			t.Fatal("want error")
		}
		if !strings.Contains(err.Error(), f.srv.URL+"/realms/iot/protocol/openid-connect/token") {
			t.Errorf("error %q does not name the token URL", err)
		}
		var fe *FetchError
		if !errors.As(err, &fe) {
			t.Errorf("error %T is not a *FetchError", err)
		}
		assertNoLeak(t, err)
		if v := counterValue(t, f.m.TokenRefreshes.WithLabelValues("error")); v != 1 {
			t.Errorf("TokenRefreshes{error} = %v, want 1", v)
		}
	})
	t.Run("rejected, body echoing the secret", func(t *testing.T) {
		f := newFixture(t)
		f.srv.status.Store(http.StatusUnauthorized)
		_, err := f.src.Token(context.Background())
		if err == nil {
			t.Fatal("want error")
		}
		if !strings.Contains(err.Error(), "401") || !strings.Contains(err.Error(), "invalid_client") {
			t.Errorf("error %q lacks status and error code", err)
		}
		assertNoLeak(t, err)
	})
	t.Run("wrong secret", func(t *testing.T) {
		f := newFixture(t)
		src := NewTokenSource(ClientCredentials{TokenURL: f.srv.URL, ClientID: canaryID, ClientSecret: canarySecret + "x",
			Scopes: []string{"openid", "iot"}, HTTPClient: f.srv.Client()})
		_, err := src.Token(context.Background())
		if err == nil {
			t.Fatal("want error")
		}
		assertNoLeak(t, err)
	})
}

func TestClip(t *testing.T) {
	long := strings.Repeat("é", 300)
	if got := clip(long); len(got) > maxErrText+len("…") || !strings.HasSuffix(got, "…") {
		t.Errorf("clip(long) = %d bytes, want ≤ %d and an ellipsis", len(got), maxErrText+len("…"))
	}
	if got := clip("a\nb"); got != "a b" {
		t.Errorf("clip(%q) = %q, want %q", "a\nb", got, "a b")
	}
}

// counterValue reads a counter (prometheus/testutil needs a module that is
// not in go.sum).
func counterValue(t *testing.T, c interface{ Write(*dto.Metric) error }) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatalf("read counter: %v", err)
	}
	return m.GetCounter().GetValue()
}
