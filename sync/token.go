package centralsync

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"sync"
	"time"

	"golang.org/x/oauth2"
	"golang.org/x/oauth2/clientcredentials"

	"github.com/edgegate/edgegate/internal/logx"
	"github.com/edgegate/edgegate/internal/metrics"
)

const (
	defaultEarlyRefresh = 60 * time.Second
	// failedRefreshPause is how long a still-valid cached token is served
	// after a failed early refresh before the next attempt, so that a down
	// central service is not hit by every caller.
	failedRefreshPause = 5 * time.Second
	// maxErrText bounds how much of the provider's error text we repeat.
	maxErrText = 200
)

// ClientCredentials configures a TokenSource for the gateway's own account
// (OAuth2 client credentials grant).
type ClientCredentials struct {
	TokenURL     string
	ClientID     string
	ClientSecret string
	Scopes       []string
	// HTTPClient does the token requests; nil means http.DefaultClient
	// (callers should pass one with timeouts and the right root CAs).
	HTTPClient *http.Client
	// EarlyRefresh is how long before expiry a token is replaced; default
	// 60s. It is capped at half the token's lifetime so that short-lived
	// tokens are not refetched on every call.
	EarlyRefresh time.Duration
	Metrics      *metrics.Metrics // may be nil
	Logger       *slog.Logger     // nil: discard
	Now          func() time.Time // nil: time.Now
}

// fetchFunc obtains a fresh token from the provider. It is the seam for the
// other grants: the refresh-token flow from pairing will supply its own
// fetchFunc (which persists the rotated refresh token itself) and reuse all
// of TokenSource's caching, sharing and invalidation.
type fetchFunc func(ctx context.Context) (*oauth2.Token, error)

// TokenSource hands out a cached access token and fetches a new one when
// it is about to expire or was reported invalid. Safe for concurrent use;
// concurrent callers that find no usable token share one fetch.
type TokenSource struct {
	fetch    fetchFunc
	tokenURL string // for errors and logs; never carries credentials
	early    time.Duration
	m        *metrics.Metrics
	log      *slog.Logger
	now      func() time.Time

	mu        sync.Mutex
	tok       string    // cached access token, "" if none
	expiry    time.Time // zero: no expiry announced
	refreshAt time.Time // zero: never refresh proactively
	retryAt   time.Time // after a failed early refresh: no new attempt before
	flight    *flight   // the fetch in progress, if any
}

// flight is one fetch shared by every caller that waits for it.
type flight struct {
	done chan struct{} // closed when the fields below are set
	tok  string
	err  error
	// abandoned: the leader's own context ended, so err says nothing
	// about the provider.
	abandoned bool
}

// usable reports whether the cached token may be handed out at now.
// Callers hold t.mu.
func (t *TokenSource) usable(now time.Time) bool {
	if t.tok == "" || (!t.expiry.IsZero() && !now.Before(t.expiry)) {
		return false
	}
	return t.refreshAt.IsZero() || now.Before(t.refreshAt) || now.Before(t.retryAt)
}

// NewTokenSource returns a TokenSource that uses the client credentials
// grant. It does not contact the provider until the first Token call.
func NewTokenSource(cfg ClientCredentials) *TokenSource {
	cc := &clientcredentials.Config{
		ClientID:     cfg.ClientID,
		ClientSecret: cfg.ClientSecret,
		TokenURL:     cfg.TokenURL,
		Scopes:       cfg.Scopes,
		// Keycloak accepts both; fixing the style avoids the auto-detect
		// double request on every failure (which would double the load on
		// a struggling provider and the fetch count in metrics).
		AuthStyle: oauth2.AuthStyleInHeader,
	}
	hc := cfg.HTTPClient
	fetch := func(ctx context.Context) (*oauth2.Token, error) {
		if hc != nil {
			ctx = context.WithValue(ctx, oauth2.HTTPClient, hc)
		}
		return cc.Token(ctx)
	}
	return newTokenSource(cfg, fetch)
}

// newTokenSource builds a TokenSource around any fetchFunc; cfg supplies
// everything but the grant (TokenURL is used only to name the endpoint in
// errors).
func newTokenSource(cfg ClientCredentials, fetch fetchFunc) *TokenSource {
	t := &TokenSource{
		fetch:    fetch,
		tokenURL: redactURL(cfg.TokenURL),
		early:    cfg.EarlyRefresh,
		m:        cfg.Metrics,
		log:      cfg.Logger,
		now:      cfg.Now,
	}
	if t.early <= 0 {
		t.early = defaultEarlyRefresh
	}
	if t.log == nil {
		t.log = slog.New(slog.DiscardHandler)
	}
	if t.now == nil {
		t.now = time.Now
	}
	t.log = t.log.With("component", "centralsync", "token_url", t.tokenURL)
	return t
}

// Token returns a valid access token, fetching one if the cache is empty,
// expired, invalidated or within EarlyRefresh of expiry. If an early
// refresh fails while the cached token is still valid, the cached token is
// returned and the failure only logged. ctx bounds this caller's wait; a
// fetch shared with others is abandoned only when the caller that started
// it gives up, and then a waiting caller starts a new one.
func (t *TokenSource) Token(ctx context.Context) (string, error) {
	for {
		if err := ctx.Err(); err != nil {
			return "", fmt.Errorf("get access token: %w", err)
		}
		t.mu.Lock()
		now := t.now()
		if t.usable(now) {
			tok := t.tok
			t.mu.Unlock()
			return tok, nil
		}
		if f := t.flight; f != nil {
			t.mu.Unlock()
			select {
			case <-f.done:
			case <-ctx.Done():
				return "", fmt.Errorf("wait for access token: %w", ctx.Err())
			}
			if f.abandoned && ctx.Err() == nil {
				// The leader's context ended, not ours: try again,
				// possibly as the new leader.
				continue
			}
			return f.tok, f.err
		}
		f := &flight{done: make(chan struct{})}
		t.flight = f
		t.mu.Unlock()

		f.tok, f.err = t.refresh(ctx)
		f.abandoned = f.err != nil && ctx.Err() != nil
		close(f.done)
		return f.tok, f.err
	}
}

// refresh runs one fetch as the flight's leader and updates the cache.
func (t *TokenSource) refresh(ctx context.Context) (string, error) {
	start := t.now()
	ot, err := t.fetch(ctx)
	if err == nil && (ot == nil || ot.AccessToken == "") {
		err = errors.New("response has no access token")
	}

	t.mu.Lock()
	defer t.mu.Unlock()
	t.flight = nil
	if err != nil {
		ferr := t.fetchError(err)
		if ctx.Err() == nil {
			t.count("error")
		}
		// Serve the old token while it is really still valid: a central
		// outage must not stop delivery earlier than it has to.
		if t.tok != "" && (t.expiry.IsZero() || t.now().Before(t.expiry)) {
			t.retryAt = t.now().Add(failedRefreshPause)
			t.log.Warn("early token refresh failed; using cached token", "err", ferr, "expires", t.expiry)
			return t.tok, nil
		}
		return "", ferr
	}
	t.count("ok")
	t.tok = ot.AccessToken
	t.retryAt = time.Time{}
	t.expiry, t.refreshAt = time.Time{}, time.Time{}
	// Expiry is computed on our clock from expires_in, measured from when
	// the request was sent (conservative, and independent of oauth2's use
	// of the wall clock).
	var life time.Duration
	switch {
	case ot.ExpiresIn > 0:
		life = time.Duration(ot.ExpiresIn) * time.Second
	case !ot.Expiry.IsZero():
		life = time.Until(ot.Expiry)
	}
	if life > 0 || !ot.Expiry.IsZero() {
		t.expiry = start.Add(life)
		t.refreshAt = t.expiry.Add(-min(t.early, life/2))
	}
	t.log.Debug("access token fetched", "lifetime", life)
	return t.tok, nil
}

// Invalidate drops the cached token if it is still bad, so that the next
// Token call fetches a new one. A token refreshed meanwhile is kept: the
// broker's complaint was about the old one.
func (t *TokenSource) Invalidate(bad string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if bad != "" && t.tok == bad {
		t.tok = ""
		t.expiry, t.refreshAt, t.retryAt = time.Time{}, time.Time{}, time.Time{}
		t.log.Info("access token invalidated")
	}
}

func (t *TokenSource) count(result string) {
	if t.m != nil {
		t.m.TokenRefreshes.WithLabelValues(result).Inc()
	}
}

// fetchError turns a fetch failure into an error that is safe to log: it
// names the token URL and the provider's error code, and never repeats the
// response body (which a provider might fill with anything).
func (t *TokenSource) fetchError(err error) error {
	var re *oauth2.RetrieveError
	if errors.As(err, &re) {
		msg := "rejected"
		if re.Response != nil {
			msg = fmt.Sprintf("status %d", re.Response.StatusCode)
		}
		if re.ErrorCode != "" {
			msg += " " + clip(re.ErrorCode)
		}
		if re.ErrorDescription != "" {
			msg += ": " + clip(re.ErrorDescription)
		}
		// No Unwrap: the RetrieveError carries the raw body.
		return &FetchError{URL: t.tokenURL, msg: msg}
	}
	err = unwrapURL(err) // the URL is ours already; drop the duplicate
	return &FetchError{URL: t.tokenURL, msg: err.Error(), err: err}
}

// FetchError reports a failed token fetch. Its text names the token
// endpoint and never contains credentials or tokens.
type FetchError struct {
	URL string
	msg string
	err error
}

func (e *FetchError) Error() string { return "fetch access token from " + e.URL + ": " + e.msg }
func (e *FetchError) Unwrap() error { return e.err }

func clip(s string) string { return logx.Clip(s, maxErrText) }

// redactURL drops user info and query from a URL so it can be logged.
func redactURL(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return "(unparsable token URL)"
	}
	u.User = nil
	u.RawQuery = ""
	u.Fragment = ""
	return u.String()
}
