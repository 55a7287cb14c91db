package centralsim

import (
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"slices"
)

// syncRoutes adds the platform APIs a gateway reads (always: they are
// stock), the edgegate companion's endpoints (only with Options.Companion:
// stock Snap4City has none of them), and their admin operations.
func (s *Server) syncRoutes(mux *http.ServeMux, admin func(string, http.HandlerFunc)) {
	// Ownership-API/v1/*/index.php answer with or without the final slash
	// (the web server's directory index).
	for _, p := range []string{"/ownership-api/v1/list", "/ownership-api/v1/list/{$}"} {
		mux.HandleFunc("GET "+p, s.handleOwnershipList)
	}
	for _, p := range []string{"/ownership-api/v1/register", "/ownership-api/v1/register/{$}"} {
		mux.HandleFunc("POST "+p, s.handleOwnershipRegister)
	}
	for _, p := range []string{"/ownership-api/v1/limits", "/ownership-api/v1/limits/{$}"} {
		mux.HandleFunc("GET "+p, s.handleOwnershipLimits)
	}
	for _, p := range []string{"/ownership-api/v1/delete", "/ownership-api/v1/delete/{$}"} {
		mux.HandleFunc(p, s.handleOwnershipDelete) // the IoT Directory POSTs, a browser GETs
	}
	mux.HandleFunc("GET /datamanager/api/v2/username/{user}/delegated", s.handleDelegations(false))
	mux.HandleFunc("GET /datamanager/api/v2/username/{user}/delegator", s.handleDelegations(true))
	mux.HandleFunc("GET /datamanager/api/v3/apps/{element}/access/check", s.handleAccessCheck)
	admin("POST /_sim/delegations", s.handleAdminAddDelegation)
	admin("DELETE /_sim/delegations", s.handleAdminDeleteDelegation)

	if !s.opts.Companion {
		return
	}
	mux.HandleFunc("GET "+PolicyKeysPath, s.handlePolicyKeys)
	mux.HandleFunc("GET /edgegate/v1/gateways/{gw}/policy", s.handleGatewayPolicy)
	mux.HandleFunc("POST /edgegate/v1/gateways/{gw}/receipts", s.handleReceipt)

	admin("GET /_sim/gateways/{gw}/bundle", s.handleAdminBundle)
	admin("POST /_sim/gateways/{gw}/push", s.handleAdminPush)
	admin("PUT /_sim/gateways/{gw}/identity-key", s.handleAdminPinKey)
	admin("POST /_sim/policy-keys/rotate", s.handleAdminRotate)
	admin("GET /_sim/receipts", s.handleAdminReceipts)
}

// handleAdminAddDelegation is POST /_sim/delegations with one Delegation:
// what a user does in the datamanager's delegation page.
func (s *Server) handleAdminAddDelegation(w http.ResponseWriter, r *http.Request) {
	var d Delegation
	if !decodeAdmin(w, r, &d) {
		return
	}
	if err := validDelegation(d); err != nil {
		adminError(w, http.StatusBadRequest, err)
		return
	}
	s.mu.Lock()
	s.delegs = append(s.delegs, d)
	s.noteDelegationsLocked()
	s.mu.Unlock()
	w.WriteHeader(http.StatusNoContent)
}

// handleAdminDeleteDelegation is DELETE /_sim/delegations with one
// Delegation: every equal delegation in force ends (404 when none).
func (s *Server) handleAdminDeleteDelegation(w http.ResponseWriter, r *http.Request) {
	var d Delegation
	if !decodeAdmin(w, r, &d) {
		return
	}
	s.mu.Lock()
	n := len(s.delegs)
	s.delegs = slices.DeleteFunc(s.delegs, func(x Delegation) bool { return x == d })
	gone := n - len(s.delegs)
	s.noteDelegationsLocked()
	s.mu.Unlock()
	if gone == 0 {
		adminError(w, http.StatusNotFound, errors.New("no such delegation"))
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func adminError(w http.ResponseWriter, status int, err error) {
	writeJSON(w, status, map[string]string{"error": http.StatusText(status), "description": err.Error()})
}

// handleAdminPush is POST /_sim/gateways/{gw}/push, body {"bundle":true}
// to push the bundle, {} or empty to nudge.
func (s *Server) handleAdminPush(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Bundle bool `json:"bundle"`
	}
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxAdminBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil && !errors.Is(err, io.EOF) {
		adminError(w, http.StatusBadRequest, err)
		return
	}
	switch err := s.Push(r.PathValue("gw"), req.Bundle); {
	case errors.Is(err, ErrPushDisabled):
		adminError(w, http.StatusConflict, err)
	case errors.Is(err, ErrUnknownGateway):
		adminError(w, http.StatusNotFound, err)
	case err != nil:
		adminError(w, http.StatusBadRequest, err)
	default:
		w.WriteHeader(http.StatusNoContent)
	}
}

// handleAdminPinKey is PUT /_sim/gateways/{gw}/identity-key,
// body {"thumbprint":"..."}: what pairing registers.
func (s *Server) handleAdminPinKey(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Thumbprint string `json:"thumbprint"`
	}
	if !decodeAdmin(w, r, &req) {
		return
	}
	if err := s.PinGatewayKey(r.PathValue("gw"), req.Thumbprint); err != nil {
		adminError(w, http.StatusBadRequest, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) handleAdminReceipts(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, s.Receipts())
}
