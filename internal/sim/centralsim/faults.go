package centralsim

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"time"
)

// FaultMode names an injected failure.
type FaultMode string

// Fault modes.
const (
	// FaultDown closes the connection without a response.
	FaultDown FaultMode = "down"
	// FaultSlow delays the request by Delay, then serves it normally.
	FaultSlow FaultMode = "slow"
	// FaultStatus answers Status (default 503) with Body.
	FaultStatus FaultMode = "status"
	// FaultTooMany answers 429 with Retry-After: RetryAfter seconds.
	FaultTooMany FaultMode = "too-many"
	// FaultTransient401 answers the filter's 401 for a back-end 4xx
	// ("Trouble in getOwnerCredentials, see logs"). To provoke it the way
	// stock does, fail the back-end instead: Target TargetOwnership or
	// TargetDelegation with FaultStatus.
	FaultTransient401 FaultMode = "transient-401"
	// FaultInvalidToken answers 401 "The passed access token is not valid"
	// even for good tokens (on the token endpoint: invalid_client).
	FaultInvalidToken FaultMode = "invalid-token"
)

// Fault targets.
const (
	TargetBroker = "broker" // the broker filter (default)
	TargetToken  = "token"  // the OAuth2 token endpoint
	// TargetOwnership fails the filter's ownership check (backend.go) with
	// Status: a 4xx makes the filter answer 401 "Trouble in
	// getOwnerCredentials, see logs", a 5xx a 500. Only FaultStatus.
	TargetOwnership = "ownership-check"
	// TargetDelegation fails the filter's delegation check (access/check)
	// likewise: 401 "Trouble in getDelegatedCredentials, see logs" or 500.
	TargetDelegation = "delegation-check"
	// TargetOrion fails Orion itself: the bare Orion (DirectBrokerURL)
	// answers the fault as it is; behind the filter an Orion 4xx passes
	// through and anything else becomes a 500 (OrionController.proxyRequest).
	TargetOrion = "orion"
)

// Fault is an injected failure for the next Count requests to Target, or
// until cleared when Count is 0.
type Fault struct {
	Mode       FaultMode     `json:"mode"`
	Target     string        `json:"target,omitempty"`
	Count      int           `json:"count,omitempty"`
	Delay      time.Duration `json:"-"`
	Status     int           `json:"status,omitempty"`
	Body       string        `json:"body,omitempty"`
	RetryAfter int           `json:"retry_after,omitempty"` // seconds
}

type faultJSON struct {
	Mode       FaultMode `json:"mode"`
	Target     string    `json:"target,omitempty"`
	Count      int       `json:"count,omitempty"`
	Delay      string    `json:"delay,omitempty"` // Go duration, e.g. "2s"
	Status     int       `json:"status,omitempty"`
	Body       string    `json:"body,omitempty"`
	RetryAfter int       `json:"retry_after,omitempty"`
}

// MarshalJSON writes Delay as a Go duration string ("1.5s").
func (f Fault) MarshalJSON() ([]byte, error) {
	j := faultJSON{Mode: f.Mode, Target: f.Target, Count: f.Count, Status: f.Status, Body: f.Body, RetryAfter: f.RetryAfter}
	if f.Delay != 0 {
		j.Delay = f.Delay.String()
	}
	return json.Marshal(j)
}

// UnmarshalJSON reads Delay as a Go duration string.
func (f *Fault) UnmarshalJSON(b []byte) error {
	var j faultJSON
	if err := json.Unmarshal(b, &j); err != nil {
		return err
	}
	*f = Fault{Mode: j.Mode, Target: j.Target, Count: j.Count, Status: j.Status, Body: j.Body, RetryAfter: j.RetryAfter}
	if j.Delay != "" {
		d, err := time.ParseDuration(j.Delay)
		if err != nil {
			return fmt.Errorf("fault delay: %w", err)
		}
		f.Delay = d
	}
	return nil
}

// Validate checks the fault and fills in defaults.
func (f *Fault) validate() error {
	switch f.Target {
	case "":
		f.Target = TargetBroker
	case TargetBroker, TargetToken, TargetOrion:
	case TargetOwnership, TargetDelegation:
		if f.Mode != FaultStatus {
			return fmt.Errorf("fault target %q takes only mode %q: %q", f.Target, FaultStatus, f.Mode)
		}
	default:
		return fmt.Errorf("fault target must be one of %q, %q, %q, %q, %q: %q", TargetBroker, TargetToken, TargetOwnership, TargetDelegation, TargetOrion, f.Target)
	}
	if f.Count < 0 {
		return fmt.Errorf("fault count must be >= 0: %d", f.Count)
	}
	switch f.Mode {
	case FaultDown, FaultTransient401, FaultInvalidToken:
	case FaultSlow:
		if f.Delay <= 0 {
			return fmt.Errorf("fault delay must be positive for mode %q", f.Mode)
		}
	case FaultStatus:
		if f.Status == 0 {
			f.Status = http.StatusServiceUnavailable
		}
		if f.Status < 400 || f.Status > 599 {
			return fmt.Errorf("fault status must be 400..599: %d", f.Status)
		}
	case FaultTooMany:
		if f.RetryAfter <= 0 {
			f.RetryAfter = 1
		}
	default:
		return fmt.Errorf("fault mode must be one of down, slow, status, too-many, transient-401, invalid-token: %q", f.Mode)
	}
	return nil
}

// SetFault injects f, replacing any fault in force. An invalid fault is
// logged and ignored; use SetFaultChecked to get the error.
func (s *Server) SetFault(f Fault) {
	if err := s.SetFaultChecked(f); err != nil {
		s.log.Warn("fault refused", "err", err)
	}
}

// SetFaultChecked is SetFault that reports an invalid fault.
func (s *Server) SetFaultChecked(f Fault) error {
	if err := f.validate(); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.fault, s.faultLeft = &f, f.Count
	s.log.Info("fault injected", "mode", f.Mode, "target", f.Target, "count", f.Count)
	return nil
}

// ClearFault removes the fault in force, if any.
func (s *Server) ClearFault() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.fault != nil {
		s.log.Info("fault cleared", "mode", s.fault.Mode)
	}
	s.fault = nil
}

// takeFault returns the fault that applies to this request to target, and
// counts it against the fault's budget.
func (s *Server) takeFault(target string) (Fault, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.fault == nil || s.fault.Target != target {
		return Fault{}, false
	}
	f := *s.fault
	if f.Count > 0 {
		s.faultLeft--
		if s.faultLeft <= 0 {
			s.fault = nil
		}
	}
	return f, true
}

// withFaults wraps a handler of target with fault injection.
func (s *Server) withFaults(target string, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		f, ok := s.takeFault(target)
		if !ok {
			next.ServeHTTP(w, r)
			return
		}
		ref := Refusal{Method: r.Method, Path: r.URL.Path, Device: r.PathValue("id"), Fault: true}
		if ref.Device == "" {
			ref.Device = v2DeviceID(r.URL.Path) // the filter's routes have no pattern
		}
		switch f.Mode {
		case FaultSlow:
			t := time.NewTimer(f.Delay)
			defer t.Stop()
			select {
			case <-t.C:
				next.ServeHTTP(w, r)
			case <-r.Context().Done(): // the client gave up
			case <-s.closing:
			}
			return
		case FaultDown:
			ref.Message = "connection closed (fault down)"
			s.refuse(ref)
			if conn, _, err := http.NewResponseController(w).Hijack(); err == nil {
				conn.Close()
				return
			}
			// HTTP/2 cannot hijack: reset the stream instead.
			panic(http.ErrAbortHandler)
		case FaultStatus:
			ref.Status, ref.Message = f.Status, "fault status"
			s.refuse(ref)
			writeFaultBody(w, f.Status, f.Body)
		case FaultTooMany:
			ref.Status, ref.Message = http.StatusTooManyRequests, "fault too-many"
			s.refuse(ref)
			w.Header().Set("Retry-After", strconv.Itoa(f.RetryAfter))
			writeFaultBody(w, http.StatusTooManyRequests, f.Body)
		case FaultTransient401:
			ref.Status, ref.Message = http.StatusUnauthorized, MsgTroubleOwner
			s.refuse(ref)
			writeJSON(w, http.StatusUnauthorized, filterResult{Result: false, Message: MsgTroubleOwner})
		case FaultInvalidToken:
			ref.Status = http.StatusUnauthorized
			if target == TargetToken {
				ref.Message = "invalid_client"
				s.refuse(ref)
				oauthError(w, http.StatusUnauthorized, "invalid_client", "Invalid client or Invalid client credentials")
				return
			}
			ref.Message = MsgAccessTokenNotValid
			s.refuse(ref)
			writeJSON(w, http.StatusUnauthorized, filterResult{Result: false, Message: MsgAccessTokenNotValid})
		}
	})
}

// writeFaultBody answers status with body, or the status text when empty.
func writeFaultBody(w http.ResponseWriter, status int, body string) {
	if body == "" {
		body = http.StatusText(status)
	}
	w.Header().Set("Content-Type", contentTypeOf(body))
	w.WriteHeader(status)
	w.Write([]byte(body))
}

func contentTypeOf(body string) string {
	if json.Valid([]byte(body)) {
		return "application/json"
	}
	return "text/plain; charset=utf-8"
}
