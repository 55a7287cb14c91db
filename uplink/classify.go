package uplink

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/edgegate/edgegate/logtext"
)

// Outcome classes of one delivery attempt.
type verdictKind int

const (
	delivered    verdictKind = iota // 2xx: delete the item
	retry                           // transient: back off, try the same item again
	invalidToken                    // the broker refused our token: invalidate, retry
	permanent                       // the broker will never accept it: dead-letter
)

// verdict is what one broker response means for the item.
type verdict struct {
	kind verdictKind
	// reason: for retry, a metric label (5xx, 429, 401_transient, ...);
	// for permanent, the dead-letter reason ("422 Unprocessable: ...").
	reason string
	// class: for permanent, the metric label ("4xx", "401").
	class string
	// retryAfter: the server asked us to wait at least this long.
	retryAfter time.Duration
}

const (
	maxRetryAfter = 5 * time.Minute
	maxReasonText = 200
	// Messages of the Orion Broker Filter's 401s. Some are about the
	// filter's own back ends, not about us, and pass.
	msgInvalidToken = "The passed access token is not valid"
)

// classify maps a broker response to a verdict. It is pure so the whole
// contract of the Orion Broker Filter is table-tested without a network.
// body is the start of the response body (a few KB at most).
func classify(status int, h http.Header, body []byte, now time.Time) verdict {
	switch {
	case status >= 200 && status < 300:
		return verdict{kind: delivered}
	case status == http.StatusUnauthorized:
		return classify401(h, body)
	case status == http.StatusRequestTimeout:
		return verdict{kind: retry, reason: "408"}
	case status == http.StatusTooManyRequests:
		return verdict{kind: retry, reason: "429", retryAfter: parseRetryAfter(h.Get("Retry-After"), now)}
	case status >= 500:
		return verdict{kind: retry, reason: "5xx", retryAfter: parseRetryAfter(h.Get("Retry-After"), now)}
	case status >= 400:
		return verdict{kind: permanent, class: "4xx", reason: fmt.Sprintf("%d %s%s", status, http.StatusText(status), brokerText(body))}
	default:
		// 1xx/3xx: redirects are not followed (the bearer token must not
		// travel elsewhere); a misconfigured broker URI is an operator
		// problem, so keep the data and retry slowly.
		return verdict{kind: retry, reason: strconv.Itoa(status/100) + "xx"}
	}
}

func classify401(h http.Header, body []byte) verdict {
	var fb struct {
		Result  *bool  `json:"result"`
		Message string `json:"message"`
	}
	_ = json.Unmarshal(body, &fb) // a non-JSON 401 is judged by its header alone
	m := fb.Message
	switch {
	case m == "Network problems" || m == "Configuration error" || strings.HasPrefix(m, "Trouble in"):
		return verdict{kind: retry, reason: "401_transient"}
	case m == msgInvalidToken || bearerInvalidToken(h.Values("WWW-Authenticate")):
		return verdict{kind: invalidToken, reason: "invalid_token"}
	}
	reason := "401"
	if m != "" {
		reason += ": " + clipText(m)
	} else {
		reason += brokerText(body)
	}
	return verdict{kind: permanent, class: "401", reason: reason}
}

// bearerInvalidToken reports an RFC 6750 `Bearer error="invalid_token"`.
func bearerInvalidToken(vals []string) bool {
	for _, v := range vals {
		l := strings.ToLower(v)
		if strings.HasPrefix(strings.TrimSpace(l), "bearer") &&
			(strings.Contains(l, `error="invalid_token"`) || strings.Contains(l, "error=invalid_token")) {
			return true
		}
	}
	return false
}

// brokerText extracts the broker's explanation for a dead-letter reason:
// Orion's {"error","description"}, the filter's {"message"}, or the start
// of the raw text. Returns "" or ": <text>".
func brokerText(body []byte) string {
	var e struct {
		Error       string `json:"error"`
		Description string `json:"description"`
		Message     string `json:"message"`
	}
	var s string
	if json.Unmarshal(body, &e) == nil {
		switch {
		case e.Description != "":
			s = e.Description
		case e.Message != "":
			s = e.Message
		case e.Error != "":
			s = e.Error
		}
	} else {
		s = strings.TrimSpace(string(body))
	}
	if s == "" {
		return ""
	}
	return ": " + clipText(s)
}

// parseRetryAfter reads Retry-After as seconds or an HTTP-date, capped.
func parseRetryAfter(v string, now time.Time) time.Duration {
	v = strings.TrimSpace(v)
	if v == "" {
		return 0
	}
	var d time.Duration
	if n, err := strconv.ParseInt(v, 10, 64); err == nil {
		if n < 0 {
			return 0
		}
		if n > int64(maxRetryAfter/time.Second) {
			return maxRetryAfter
		}
		d = time.Duration(n) * time.Second
	} else if t, err := http.ParseTime(v); err == nil {
		d = t.Sub(now)
	}
	return min(max(d, 0), maxRetryAfter)
}

// clipText makes broker text fit a log line and a dead-letter record:
// control characters become spaces, at most maxReasonText bytes.
func clipText(s string) string { return logtext.Clip(s, maxReasonText) }
