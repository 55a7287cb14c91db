package uplink

import (
	"net/http"
	"reflect"
	"testing"
	"time"
)

func TestClassify(t *testing.T) {
	now := time.Date(2025, 1, 1, 12, 0, 0, 0, time.UTC)
	h := func(kv ...string) http.Header {
		hd := http.Header{}
		for i := 0; i < len(kv); i += 2 {
			hd.Add(kv[i], kv[i+1])
		}
		return hd
	}
	tests := []struct {
		name   string
		status int
		header http.Header
		body   string
		want   verdict
	}{
		{"204", 204, nil, "", verdict{kind: delivered}},
		{"200", 200, nil, "{}", verdict{kind: delivered}},
		{"500", 500, nil, "", verdict{kind: retry, reason: "5xx"}},
		{"503 Retry-After", 503, h("Retry-After", "7"), "", verdict{kind: retry, reason: "5xx", retryAfter: 7 * time.Second}},
		{"408", 408, nil, "", verdict{kind: retry, reason: "408"}},
		{"429 seconds", 429, h("Retry-After", "3"), "", verdict{kind: retry, reason: "429", retryAfter: 3 * time.Second}},
		{"429 date", 429, h("Retry-After", "Wed, 01 Jan 2025 12:00:10 GMT"), "", verdict{kind: retry, reason: "429", retryAfter: 10 * time.Second}},
		{"429 huge capped", 429, h("Retry-After", "999999"), "", verdict{kind: retry, reason: "429", retryAfter: maxRetryAfter}},
		// The Orion Broker Filter's 401s, {"result":false,"message":...}
		// (OrionBrokerFilter/src/main/resources/messages/messages.properties;
		// literal "Trouble in ..." texts in AccessTokenAuthenticationFilter.java).
		{"401 network", 401, nil, `{"result":false,"message":"Network problems"}`, verdict{kind: retry, reason: "401_transient"}},
		{"401 config", 401, nil, `{"result":false,"message":"Configuration error"}`, verdict{kind: retry, reason: "401_transient"}},
		{"401 trouble owner", 401, nil, `{"result":false,"message":"Trouble in getOwnerCredentials, see logs"}`, verdict{kind: retry, reason: "401_transient"}},
		{"401 trouble delegated", 401, nil, `{"result":false,"message":"Trouble in getDelegatedCredentials, see logs"}`, verdict{kind: retry, reason: "401_transient"}},
		{"401 trouble access token", 401, nil, `{"result":false,"message":"Trouble in getAccessToken, see logs"}`, verdict{kind: retry, reason: "401_transient"}},
		{"401 invalid token", 401, nil, `{"result":false,"message":"The passed access token is not valid"}`, verdict{kind: invalidToken, reason: "invalid_token"}},
		{"401 bearer header", 401, h("WWW-Authenticate", `Bearer error="invalid_token"`), "", verdict{kind: invalidToken, reason: "invalid_token"}},
		{"401 no ownership (cached refusal)", 401, nil, `{"result":false,"message":"The passed credentials does not have any ownerships or delegations on the device"}`,
			verdict{kind: refused, class: "401", reason: "401: The passed credentials does not have any ownerships or delegations on the device"}},
		{"401 credentials not valid (older wording)", 401, nil, `{"result":false,"message":"The passed credentials are not valid"}`,
			verdict{kind: refused, class: "401", reason: "401: The passed credentials are not valid"}},
		{"401 elementid", 401, nil, `{"result":false,"message":"The passed elementid is not valid"}`, verdict{kind: permanent, class: "401", reason: "401: The passed elementid is not valid"}},
		{"401 malformed URL", 401, nil, `{"result":false,"message":"The request URL is malformed"}`, verdict{kind: permanent, class: "401", reason: "401: The request URL is malformed"}},
		{"401 bare", 401, nil, "", verdict{kind: permanent, class: "401", reason: "401"}},
		// Orion 3.12's own answers, passed through by the filter
		// (test/functionalTest/cases/0000_update_error_responses/
		// error_responses_02_update_existing_entity_attributes.test).
		{"422 PartialUpdate", 422, nil, `{"description":"do not exist: E - [ C ]","error":"PartialUpdate"}`,
			verdict{kind: delivered, missing: []string{"C"}}},
		{"422 PartialUpdate with type", 422, nil, `{"description":"do not exist: E/T - [ voltage, rssi ]","error":"PartialUpdate"}`,
			verdict{kind: delivered, missing: []string{"voltage", "rssi"}}},
		{"422 Unprocessable", 422, nil, `{"description":"do not exist: E - [ C, D ]","error":"Unprocessable"}`,
			verdict{kind: permanent, class: "4xx", missing: []string{"C", "D"}, reason: "422 Unprocessable: the device's entity has none of the attributes C, D (add them to the device's model)"}},
		{"422 error only", 422, nil, `{"error":"Unprocessable"}`, verdict{kind: permanent, class: "4xx", reason: "422 Unprocessable Entity: Unprocessable"}},
		{"404 no entity", 404, nil, `{"description":"The requested entity has not been found. Check type and id","error":"NotFound"}`,
			verdict{kind: refused, class: "404", reason: "404 Not Found: The requested entity has not been found. Check type and id"}},
		{"404 not Orion's", 404, nil, "no route", verdict{kind: permanent, class: "4xx", reason: "404 Not Found: no route"}},
		{"400 invalid chars", 400, nil, `{"error":"BadRequest","description":"Invalid characters in attribute value"}`,
			verdict{kind: permanent, class: "4xx", reason: "400 Bad Request: Invalid characters in attribute value"}},
		{"400 control chars", 400, nil, "a\nb", verdict{kind: permanent, class: "4xx", reason: "400 Bad Request: a b"}},
		{"302 not followed", 302, nil, "", verdict{kind: refused, class: "3xx", reason: "302 Found: redirect not followed; fix the device's broker URI"}},
		{"307 names where, without credentials", 307, http.Header{"Location": {"https://u:canary-pw@elsewhere.example/v2/entities/x/attrs?token=canary-tok"}}, "",
			verdict{kind: refused, class: "3xx", reason: `307 Temporary Redirect: redirect to https://REDACTED@elsewhere.example/v2/entities/x/attrs?token=REDACTED not followed; fix the device's broker URI`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			hd := tt.header
			if hd == nil {
				hd = http.Header{}
			}
			if got := classify(tt.status, hd, []byte(tt.body), now); !reflect.DeepEqual(got, tt.want) {
				t.Errorf("classify(%d, %q) = %+v, want %+v", tt.status, tt.body, got, tt.want)
			}
		})
	}
}

func TestParseMissing(t *testing.T) {
	for _, tt := range []struct {
		in   string
		want []string
	}{
		{"do not exist: E - [ C ]", []string{"C"}},
		{"do not exist: th-1 - [ a, b.c, d_e ]", []string{"a", "b.c", "d_e"}},
		// op/update appends further entities (MongoCommonUpdate.cpp fillOrAppend).
		{"do not exist: E1 - [ a ], E2 - [ b ]", []string{"a", "b"}},
		{"do not exist: E - [entity itself]", nil},
		{"The requested entity has not been found", nil},
		{"do not exist: E - [ a", nil},
		{"", nil},
	} {
		if got := parseMissing(tt.in); !reflect.DeepEqual(got, tt.want) {
			t.Errorf("parseMissing(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}

func TestParseRetryAfter(t *testing.T) {
	now := time.Date(2025, 1, 1, 12, 0, 0, 0, time.UTC)
	tests := []struct {
		in   string
		want time.Duration
	}{
		{"", 0}, {"0", 0}, {"-5", 0}, {"12", 12 * time.Second}, {"junk", 0},
		{"Wed, 01 Jan 2025 11:59:00 GMT", 0}, // in the past
		{"Wed, 01 Jan 2025 12:01:00 GMT", time.Minute},
		{"Wed, 01 Jan 2025 18:00:00 GMT", maxRetryAfter},
	}
	for _, tt := range tests {
		if got := parseRetryAfter(tt.in, now); got != tt.want {
			t.Errorf("parseRetryAfter(%q) = %v, want %v", tt.in, got, tt.want)
		}
	}
}

func TestBackoff(t *testing.T) {
	clock := time.Unix(1000, 0)
	now := func() time.Time { return clock }
	for _, r := range []float64{0, 0.999} {
		u := &Uplink{opts: Options{MinBackoff: 200 * time.Millisecond, MaxBackoff: 30 * time.Second, Now: now}}
		b := u.newBackoff()
		b.Rand = func() float64 { return r }
		prevHi := time.Duration(0)
		for i := range 12 {
			d := b.Fail()
			hi := min(200*time.Millisecond<<i, 30*time.Second)
			if d < hi/2 || d > hi {
				t.Errorf("rand=%v failure %d: delay %v, want in [%v, %v]", r, i+1, d, hi/2, hi)
			}
			if hi < prevHi {
				t.Errorf("delay bound shrank at failure %d", i+1)
			}
			prevHi = hi
			if got := b.Remaining(); got != d {
				t.Errorf("remaining = %v, want %v", got, d)
			}
			clock = clock.Add(d)
			if got := b.Remaining(); got != 0 {
				t.Errorf("remaining after waiting = %v, want 0", got)
			}
		}
		b.Reset()
		if d := b.Fail(); d > 200*time.Millisecond {
			t.Errorf("after success: delay %v, want ≤ 200ms", d)
		}
		// A server's Retry-After wins over a shorter backoff.
		clock = clock.Add(time.Hour)
		if d := b.FailAtLeast(5 * time.Second); d != 5*time.Second {
			t.Errorf("fail(5s) = %v, want 5s", d)
		}
		// extend never shortens.
		b.Extend(time.Second)
		if got := b.Remaining(); got != 5*time.Second {
			t.Errorf("after extend(1s): remaining %v, want 5s", got)
		}
	}
}
