package centralsim

import (
	"bytes"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"

	"github.com/edgegate/edgegate/envelope"
)

// Messages of the Orion Broker Filter (Snap4City, DISIT lab): its
// messages.properties and AccessTokenAuthenticationFilter. Every refusal is
// HTTP 401 with {"result":false,"message":...}.
const (
	MsgAccessTokenNotValid = "The passed access token is not valid" // login.ko.accesstokennotvalid
	MsgCredentialsNotValid = "The passed credentials are not valid" // login.ko.credentialsnotvalid: no ownership or delegation
	MsgMissingElementID    = "Missing parameter: elementid"         // login.ko.missingparameterelementid
	MsgElementIDNotValid   = "The passed elementid is not valid"    // login.ko.elementidnotvalid
	MsgNetworkProblems     = "Network problems"                     // login.ko.networkproblems: back-end failures
	maxUpdateBytes         = 1 << 20                                // Orion's default inbound limit is 1 MB
	orionNotFoundDesc      = "The requested entity has not been found. Check type and id"
	orionParseErrorDesc    = "Errors found in incoming JSON buffer"
	orionAttrsMissingDesc  = "one or more of the attributes in the request do not exist: "
)

type filterResult struct {
	Result  bool   `json:"result"`
	Message string `json:"message"`
}

type orionError struct {
	Error       string `json:"error"`
	Description string `json:"description"`
}

// refuseFilter answers like the filter and records the refusal.
func (s *Server) refuseFilter(w http.ResponseWriter, ref Refusal, msg string) {
	ref.Status, ref.Message = http.StatusUnauthorized, msg
	s.refuse(ref)
	s.log.Info("broker refused", "method", ref.Method, "device", ref.Device, "user", ref.User, "status", ref.Status, "message", msg)
	writeJSON(w, http.StatusUnauthorized, filterResult{Result: false, Message: msg})
}

// refuseOrion answers like Orion behind the filter and records the refusal.
func (s *Server) refuseOrion(w http.ResponseWriter, ref Refusal, status int, code, desc string) {
	ref.Status, ref.Message = status, code+": "+desc
	s.refuse(ref)
	s.log.Info("broker refused", "method", ref.Method, "device", ref.Device, "user", ref.User, "status", status, "error", code)
	writeJSON(w, status, orionError{Error: code, Description: desc})
}

// authorize runs the filter's checks common to reads and writes, and
// returns the device on success. On failure it has answered.
func (s *Server) authorize(w http.ResponseWriter, r *http.Request, ref *Refusal, write bool) (Device, bool) {
	q := r.URL.Query()
	elementID := q.Get("elementid")
	if elementID == "" {
		s.refuseFilter(w, *ref, MsgMissingElementID)
		return Device{}, false
	}
	user, err := s.verifyAccessToken(r)
	if err != nil {
		s.log.Debug("access token refused", "err", err)
		s.refuseFilter(w, *ref, MsgAccessTokenNotValid)
		return Device{}, false
	}
	ref.User = user
	if elementID != ref.Device {
		// The real filter checks ownership of elementid while Orion acts on
		// the path's id; here they must agree, so a sloppy client is caught.
		s.refuseFilter(w, *ref, MsgElementIDNotValid)
		return Device{}, false
	}
	s.mu.Lock()
	ok := s.canAccessLocked(ref.Device, user, write)
	dev := s.devices[ref.Device]
	s.mu.Unlock()
	if !ok {
		s.refuseFilter(w, *ref, MsgCredentialsNotValid)
		return Device{}, false
	}
	if s.opts.CheckKeys && !(secretEqual(q.Get("k1"), dev.K1) && secretEqual(q.Get("k2"), dev.K2)) {
		s.refuseFilter(w, *ref, MsgCredentialsNotValid)
		return Device{}, false
	}
	return dev, true
}

func secretEqual(got, want string) bool {
	a, b := sha256.Sum256([]byte(got)), sha256.Sum256([]byte(want))
	return subtle.ConstantTimeCompare(a[:], b[:]) == 1 && want != ""
}

// handlePatchAttrs is PATCH /v2/entities/{id}/attrs: update existing
// attributes (Orion's "update" semantics, no append).
func (s *Server) handlePatchAttrs(w http.ResponseWriter, r *http.Request) {
	ref := Refusal{Method: r.Method, Path: r.URL.Path, Device: r.PathValue("id")}
	dev, ok := s.authorize(w, r, &ref, true)
	if !ok {
		return
	}
	body, ok := s.readOrionBody(w, r, ref, maxUpdateBytes)
	if !ok {
		return
	}
	attrs, code, desc := parseAttrs(body)
	if code != "" {
		s.refuseOrion(w, ref, http.StatusBadRequest, code, desc)
		return
	}
	wantType := r.URL.Query().Get("type")

	// Verify outside the lock: it is the slow part.
	verdict, detail, claims := s.verdictOf(dev, attrs.raw)

	s.mu.Lock()
	e, ok := s.entities[ref.Device]
	if !ok || (wantType != "" && e.typ != wantType) {
		s.mu.Unlock()
		s.refuseOrion(w, ref, http.StatusNotFound, "NotFound", orionNotFoundDesc)
		return
	}
	if model := s.devices[ref.Device].Attrs; len(model) > 0 {
		var missing []string
		for _, name := range sortedKeys(attrs.parsed) {
			if name == s.opts.SignatureAttr {
				continue // the signature attribute is part of every model here
			}
			if _, exists := e.attrs[name]; !exists {
				missing = append(missing, name)
			}
		}
		if len(missing) > 0 {
			s.mu.Unlock()
			s.refuseOrion(w, ref, http.StatusUnprocessableEntity, "Unprocessable", orionAttrsMissingDesc+"[ "+strings.Join(missing, ", ")+" ]")
			return
		}
	}
	e.update(attrs.parsed)
	u := Update{
		Device:  ref.Device,
		User:    ref.User,
		Attrs:   attrs.raw,
		Verdict: verdict,
		Detail:  detail,
		Time:    s.now(),
	}
	if claims.Version != 0 { // signature verified: the claims can be trusted
		u.Gateway, u.Seq = claims.Gateway, claims.Seq
		u.Alg, u.KeyID = s.keyOfSignature(attrs.raw)
	}
	s.recordLocked(&u)
	s.mu.Unlock()
	s.notify(u)

	s.log.Debug("update accepted", "device", u.Device, "user", u.User, "gateway", u.Gateway, "seq", u.Seq, "verdict", u.Verdict)
	w.WriteHeader(http.StatusNoContent)
}

// readOrionBody reads a request body of at most limit bytes; on failure it
// has answered as Orion does.
func (s *Server) readOrionBody(w http.ResponseWriter, r *http.Request, ref Refusal, limit int64) ([]byte, bool) {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, limit))
	if err == nil {
		return body, true
	}
	var tooBig *http.MaxBytesError
	if errors.As(err, &tooBig) {
		s.refuseOrion(w, ref, http.StatusRequestEntityTooLarge, "RequestEntityTooLarge", fmt.Sprintf("payload size: %d, max size supported: %d", tooBig.Limit+1, limit))
	} else {
		s.refuseOrion(w, ref, http.StatusBadRequest, "ParseError", orionParseErrorDesc)
	}
	return nil, false
}

type parsedAttrs struct {
	raw    map[string]json.RawMessage
	parsed map[string]ngsiAttr
}

// parseAttrs parses an NGSI v2 attribute map as Orion does, returning an
// Orion error code and description on failure.
func parseAttrs(body []byte) (parsedAttrs, string, string) {
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(body, &raw); err != nil || raw == nil {
		return parsedAttrs{}, "ParseError", orionParseErrorDesc
	}
	return parseAttrMap(raw)
}

// parseAttrMap is parseAttrs on an already split object.
func parseAttrMap(raw map[string]json.RawMessage) (parsedAttrs, string, string) {
	if len(raw) == 0 {
		return parsedAttrs{}, "BadRequest", "empty payload"
	}
	out := parsedAttrs{raw: raw, parsed: make(map[string]ngsiAttr, len(raw))}
	for name, v := range raw {
		if name == "id" || name == "type" {
			return parsedAttrs{}, "BadRequest", "entity id and type cannot be updated"
		}
		v = bytes.TrimSpace(v)
		if len(v) == 0 || v[0] != '{' {
			return parsedAttrs{}, "BadRequest", "attribute must be a JSON object, unless keyValues option is used"
		}
		var a ngsiAttr
		if err := json.Unmarshal(v, &a); err != nil {
			return parsedAttrs{}, "BadRequest", "attribute " + name + ": invalid JSON type"
		}
		out.parsed[name] = a
	}
	return out, "", ""
}

// verdictOf checks the signature attribute of an update with the device's
// key. claims.Version is non-zero only when the signature verified.
func (s *Server) verdictOf(dev Device, raw map[string]json.RawMessage) (string, string, envelope.Claims) {
	if _, signed := raw[s.opts.SignatureAttr]; !signed {
		return VerdictUnsigned, "", envelope.Claims{}
	}
	keys, err := deviceVerifyKeys(dev)
	if err != nil {
		return VerdictNoKey, err.Error(), envelope.Claims{}
	}
	if len(keys) == 0 {
		return VerdictNoKey, "device has no K1/K2 and no public key", envelope.Claims{}
	}
	c, err := envelope.VerifyAttrMap(raw, keys, s.opts.SignatureAttr)
	switch {
	case err == nil && c.Device != dev.ID:
		return VerdictTampered, fmt.Sprintf("entity %q carries a reading of device %q", dev.ID, c.Device), c
	case err == nil:
		return VerdictValid, "", c
	case errors.Is(err, envelope.ErrTampered):
		return VerdictTampered, err.Error(), c
	case errors.Is(err, envelope.ErrWrongKey):
		return VerdictWrongKey, err.Error(), envelope.Claims{}
	default:
		return VerdictMalformed, err.Error(), envelope.Claims{}
	}
}

// handleGetEntity is GET /v2/entities/{id}[?type=T]: normalized form.
func (s *Server) handleGetEntity(w http.ResponseWriter, r *http.Request) {
	ref := Refusal{Method: r.Method, Path: r.URL.Path, Device: r.PathValue("id")}
	if _, ok := s.authorize(w, r, &ref, false); !ok {
		return
	}
	wantType := r.URL.Query().Get("type")
	s.mu.Lock()
	e, ok := s.entities[ref.Device]
	var doc map[string]any
	if ok && (wantType == "" || e.typ == wantType) {
		doc = e.normalized()
	}
	s.mu.Unlock()
	if doc == nil {
		s.refuseOrion(w, ref, http.StatusNotFound, "NotFound", orionNotFoundDesc)
		return
	}
	writeJSON(w, http.StatusOK, doc)
}
