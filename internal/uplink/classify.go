package uplink

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/edgegate/edgegate/internal/logx"
)

// Outcome classes of one delivery attempt.
type verdictKind int

const (
	delivered    verdictKind = iota // 2xx, or Orion's 422 PartialUpdate: delete the item
	retry                           // transient: back off, try the same item again
	invalidToken                    // the broker refused our token: invalidate, retry
	permanent                       // the broker will never accept it: dead-letter
	// refused: the filter refused a device the policy lists, or Orion has
	// no entity for it. Both can be a platform that has not caught up yet
	// (the filter caches a refusal for 3 minutes): retry that device alone
	// for Options.RefusalWindow from its first refusal, then dead-letter.
	refused
)

// verdict is what one broker response means for the item.
type verdict struct {
	kind verdictKind
	// reason: for retry, a metric label (5xx, 429, 401_transient, ...);
	// for permanent and refused, the dead-letter reason ("422
	// Unprocessable: ...").
	reason string
	// class: for permanent and refused, the metric label ("4xx", "401",
	// "404").
	class string
	// retryAfter: the server asked us to wait at least this long.
	retryAfter time.Duration
	// missing: attributes Orion did not store because the entity lacks
	// them (422 PartialUpdate or Unprocessable), as its description names
	// them.
	missing []string
}

const (
	maxRetryAfter = 5 * time.Minute
	maxReasonText = 200
	// Messages of the Orion Broker Filter's 401s
	// (OrionBrokerFilter/src/main/resources/messages/messages.properties,
	// written by AccessTokenAuthenticationFilter.writeResponseError as
	// {"result":false,"message":...}).
	msgInvalidToken = "The passed access token is not valid" // login.ko.accesstokennotvalid
	// login.ko.credentialsnotvalid: no ownership or delegation (as the
	// filter saw it, cached for 3 minutes, positive and negative).
	msgNoOwnership = "The passed credentials does not have any ownerships or delegations on the device"
	// login.ko.ownercredentialsnotvalid: the older wording of a refusal.
	msgCredentialsNotValid = "The passed credentials are not valid"
	// Orion's error names (src/lib/common/errorMessages.h, 3.12.0).
	orionPartialUpdate = "PartialUpdate"  // ERROR_PARTIAL_UPDATE
	orionUnprocessable = "Unprocessable"  // ERROR_UNPROCESSABLE
	orionNotFound      = "NotFound"       // ERROR_NOT_FOUND
	orionDoNotExist    = "do not exist: " // ERROR_DESC_DO_NOT_EXIT
)

// classify maps a broker response to a verdict. It is pure so the whole
// contract of the Orion Broker Filter and Orion is table-tested without a
// network. body is the start of the response body (a few KB at most).
func classify(status int, h http.Header, body []byte, now time.Time) verdict {
	switch {
	case status >= 200 && status < 300:
		return verdict{kind: delivered}
	case status == http.StatusUnauthorized:
		return classify401(h, body)
	case status == http.StatusUnprocessableEntity:
		return classify422(body)
	case status == http.StatusNotFound && orionError(body) == orionNotFound:
		// Orion: no entity with that id (errorMessages.h
		// ERROR_DESC_NOT_FOUND_ENTITY). The IoT Directory creates the
		// entity when it registers the device, before the ownership row
		// the gateway learns the device from, so this is normally a
		// device deleted or moved on the platform — but an entity being
		// recreated, or a device added locally ahead of its registration,
		// would lose readings to a dead letter at once. Treated like a
		// refusal: retried for the bounded refusal window, then
		// dead-lettered. (A 404 without Orion's body is the filter's
		// routing: a wrong broker URI, permanent.)
		return verdict{kind: refused, class: "404", reason: "404 Not Found" + brokerText(body)}
	case status == http.StatusRequestTimeout:
		return verdict{kind: retry, reason: "408"}
	case status == http.StatusTooManyRequests:
		return verdict{kind: retry, reason: "429", retryAfter: parseRetryAfter(h.Get("Retry-After"), now)}
	case status >= 500:
		return verdict{kind: retry, reason: "5xx", retryAfter: parseRetryAfter(h.Get("Retry-After"), now)}
	case status >= 400:
		return verdict{kind: permanent, class: "4xx", reason: fmt.Sprintf("%d %s%s", status, http.StatusText(status), brokerText(body))}
	case status >= 300 && status < 400:
		// Redirects are not followed (the bearer token must not travel
		// elsewhere), and retrying the same URI gets the same redirect
		// forever (issue 17: a 307 retried without end). Treated like a
		// refusal: retried for the bounded refusal window (a broker being
		// moved), then dead-lettered with this reason, which names where
		// the broker pointed (credentials in it redacted).
		where := ""
		if loc := h.Get("Location"); loc != "" {
			where = " to " + logx.Clip(logx.RedactURL(loc), 128)
		}
		return verdict{kind: refused, class: "3xx", reason: fmt.Sprintf("%d %s: redirect%s not followed; fix the device's broker URI", status, http.StatusText(status), where)}
	default:
		// 1xx as a final answer: a broken proxy; keep the data and retry
		// slowly.
		return verdict{kind: retry, reason: strconv.Itoa(status/100) + "xx"}
	}
}

// classify422 reads Orion's 422 answers to PATCH /v2/entities/{id}/attrs
// (test/functionalTest/cases/0000_update_error_responses/
// error_responses_02_update_existing_entity_attributes.test, 3.12.0):
//
//	{"description":"do not exist: E - [ C ]","error":"PartialUpdate"}     some attributes exist: those WERE updated
//	{"description":"do not exist: E - [ C, D ]","error":"Unprocessable"} none exists: nothing was updated
//
// A PartialUpdate is a delivery: resending would only write the same
// values again and get the same answer.
func classify422(body []byte) verdict {
	var e struct {
		Error       string `json:"error"`
		Description string `json:"description"`
	}
	_ = json.Unmarshal(body, &e)
	missing := parseMissing(e.Description)
	switch e.Error {
	case orionPartialUpdate:
		return verdict{kind: delivered, missing: missing}
	case orionUnprocessable:
		if len(missing) > 0 {
			return verdict{kind: permanent, class: "4xx", missing: missing,
				reason: clipText("422 Unprocessable: the device's entity has none of the attributes " + strings.Join(missing, ", ") +
					" (add them to the device's model)")}
		}
	}
	return verdict{kind: permanent, class: "4xx", reason: "422 Unprocessable Entity" + brokerText(body)}
}

// parseMissing reads the attribute names out of Orion's "do not exist: "
// description: "do not exist: ID - [ a, b ]" (MongoCommonUpdate.cpp:
// ERROR_DESC_DO_NOT_EXIT + enStr + " - " + "[ a, b ]", where enStr is the
// id, or "id/type" when the request named a type; op/update appends ", "
// + enStr + " - [ ... ]" per further entity). Names cannot hold spaces or
// commas-with-space (Orion's name rules), so the split is exact. At most
// 64 names, each clipped.
func parseMissing(desc string) []string {
	i := strings.Index(desc, orionDoNotExist)
	if i < 0 {
		return nil
	}
	rest := desc[i+len(orionDoNotExist):]
	var names []string
	for {
		open := strings.Index(rest, " - [ ")
		if open < 0 {
			break
		}
		rest = rest[open+len(" - [ "):]
		end := strings.Index(rest, " ]")
		if end < 0 {
			break
		}
		for n := range strings.SplitSeq(rest[:end], ", ") {
			if n = strings.TrimSpace(n); n != "" && len(names) < 64 {
				names = append(names, clipName(n))
			}
		}
		rest = rest[end:]
	}
	return names
}

func clipName(s string) string { return logx.Clip(s, 64) }

// orionError returns the "error" of an Orion error body, or "".
func orionError(body []byte) string {
	var e struct {
		Error string `json:"error"`
	}
	_ = json.Unmarshal(body, &e)
	return e.Error
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
		// login.ko.networkproblems, login.ko.configurationerror, and the
		// literal "Trouble in getOwnerCredentials/getDelegatedCredentials/
		// getAccessToken/getRefreshToken, see logs": the filter's own back
		// ends failed (AccessTokenAuthenticationFilter.java).
		return verdict{kind: retry, reason: "401_transient"}
	case m == msgInvalidToken || bearerInvalidToken(h.Values("WWW-Authenticate")):
		return verdict{kind: invalidToken, reason: "invalid_token"}
	case m == msgNoOwnership || m == msgCredentialsNotValid:
		// Only lanes of devices the policy lists for this broker are
		// served (daemon's gatedSource), so this is the filter's view
		// lagging behind the platform's: a registration or delegation
		// younger than its 3-minute cache.
		return verdict{kind: refused, class: "401", reason: "401: " + m}
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
func clipText(s string) string { return logx.Clip(s, maxReasonText) }
