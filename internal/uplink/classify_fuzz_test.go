package uplink

import (
	"net/http"
	"strings"
	"testing"
	"time"
	"unicode/utf8"
)

// retryReasons are the only reasons a retry verdict may carry: they are
// metric labels, so their set must stay small whatever the broker says.
var retryReasons = map[string]bool{"408": true, "429": true, "5xx": true, "401_transient": true, "1xx": true}

// FuzzClassify: any status, Retry-After, WWW-Authenticate and body yield a
// verdict; nothing panics; the wait is within [0, maxRetryAfter]; retry
// reasons and dead-letter classes come from a fixed set; dead-letter
// reasons are bounded, single-line and, once scrubbed as the callers do,
// never quote the bearer token the gateway sent.
func FuzzClassify(f *testing.F) {
	const token = "at-canary-uplink-fuzz-9f1c"
	seeds := []struct {
		status     int
		retryAfter string
		wwwAuth    string
		body       string
	}{
		{204, "", "", ""},
		{200, "", "", "{}"},
		{401, "", "", `{"result":false,"message":"The passed access token is not valid"}`},
		{401, "", "", `{"result":false,"message":"Network problems"}`},
		{401, "", "", `{"result":false,"message":"Trouble in the Ownership API"}`},
		{401, "", "", `{"result":false,"message":"You are not the owner"}`},
		{401, "", `Bearer error="invalid_token"`, ``},
		{401, "", "", `<html>nope</html>`},
		{403, "", "", `{"error":"Forbidden","description":"Bearer ` + token + ` refused"}`},
		{404, "", "", `{"error":"NotFound","description":"The requested entity has not been found. Check type and id"}`},
		{422, "", "", `{"error":"Unprocessable","description":"` + strings.Repeat("é", 300) + `"}`},
		{422, "", "", `{"description":"do not exist: E - [ C ]","error":"PartialUpdate"}`},
		{422, "", "", `{"description":"do not exist: E - [ C, D ]","error":"Unprocessable"}`},
		{401, "", "", `{"result":false,"message":"The passed credentials does not have any ownerships or delegations on the device"}`},
		{429, "3", "", ""},
		{429, "Wed, 21 Oct 2015 07:28:00 GMT", "", ""},
		{429, "-5", "", ""},
		{429, "99999999999999999999", "", ""},
		{503, "120", "", "upstream down"},
		{500, "", "", "\x00\x01\xff\xfe line\nbreak"},
		{301, "", "", ""},
		{100, "", "", ""},
		{408, "", "", ""},
		{499, "", "", "\xff\xfe\xfd"},
	}
	for _, s := range seeds {
		f.Add(s.status, s.retryAfter, s.wwwAuth, []byte(s.body))
	}
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	f.Fuzz(func(t *testing.T, status int, retryAfter, wwwAuth string, body []byte) {
		if status < 100 || status > 999 {
			return // net/http never hands out other codes
		}
		h := http.Header{}
		if retryAfter != "" {
			h.Set("Retry-After", retryAfter)
		}
		if wwwAuth != "" {
			h.Set("WWW-Authenticate", wwwAuth)
		}
		v := classify(status, h, body, now)
		switch v.kind {
		case delivered, retry, invalidToken, permanent, refused:
		default:
			t.Fatalf("classify(%d) kind %d", status, v.kind)
		}
		if status >= 200 && status < 300 && v.kind != delivered {
			t.Fatalf("classify(%d) = %+v, want delivered", status, v)
		}
		if v.kind == delivered && (status < 200 || status >= 300) && status != 422 {
			t.Fatalf("classify(%d) = delivered", status)
		}
		if len(v.missing) > 64 {
			t.Fatalf("classify(%d) names %d missing attributes", status, len(v.missing))
		}
		if v.retryAfter < 0 || v.retryAfter > maxRetryAfter {
			t.Fatalf("classify(%d, Retry-After %q) waits %v", status, retryAfter, v.retryAfter)
		}
		switch v.kind {
		case retry:
			if !retryReasons[v.reason] {
				t.Fatalf("classify(%d) retry reason %q is not a fixed label", status, v.reason)
			}
		case invalidToken:
			if v.reason != "invalid_token" {
				t.Fatalf("invalid-token reason %q", v.reason)
			}
		case refused:
			if v.class != "401" && v.class != "404" && v.class != "3xx" {
				t.Fatalf("classify(%d) refused class %q", status, v.class)
			}
			fallthrough
		case permanent:
			if v.class != "4xx" && v.class != "401" && v.class != "404" && v.class != "3xx" {
				t.Fatalf("classify(%d) permanent class %q", status, v.class)
			}
			// "%d %s" + ": " + clipped text + "…"
			if len(v.reason) > 64+maxReasonText+len("…") {
				t.Fatalf("dead-letter reason of %d bytes", len(v.reason))
			}
			if strings.ContainsAny(v.reason, "\n\r\x00") {
				t.Fatalf("dead-letter reason %q has control characters", v.reason)
			}
			if !utf8.ValidString(v.reason) {
				t.Logf("dead-letter reason is not valid UTF-8: %q", v.reason)
			}
			// The broker may echo our token; the callers (uplink.go and
			// batch.go) scrub it from the reason before it is logged or
			// stored, as here.
			if r := scrub(v.reason, token); strings.Contains(r, token) {
				t.Fatalf("dead-letter reason quotes the bearer token after scrub: %q", r)
			}
		}
	})
}
