package centralsim

import (
	"encoding/json"
	"errors"
	"io"
	"net/http"
)

// syncRoutes adds the policy-sync surface: the platform APIs a gateway
// reads, the edgegate endpoints, and their admin operations.
func (s *Server) syncRoutes(mux *http.ServeMux, admin func(string, http.HandlerFunc)) {
	mux.HandleFunc("GET /ownership-api/v1/list/{$}", s.handleOwnershipList)
	mux.HandleFunc("GET /ownership-api/v1/list", s.handleOwnershipList)
	mux.HandleFunc("GET /datamanager/api/v2/username/{user}/delegated", s.handleDelegations(false))
	mux.HandleFunc("GET /datamanager/api/v2/username/{user}/delegator", s.handleDelegations(true))

	mux.HandleFunc("GET "+PolicyKeysPath, s.handlePolicyKeys)
	mux.HandleFunc("GET /edgegate/v1/gateways/{gw}/policy", s.handleGatewayPolicy)
	mux.HandleFunc("POST /edgegate/v1/gateways/{gw}/receipts", s.handleReceipt)

	admin("GET /_sim/gateways/{gw}/bundle", s.handleAdminBundle)
	admin("POST /_sim/gateways/{gw}/push", s.handleAdminPush)
	admin("PUT /_sim/gateways/{gw}/identity-key", s.handleAdminPinKey)
	admin("POST /_sim/policy-keys/rotate", s.handleAdminRotate)
	admin("GET /_sim/receipts", s.handleAdminReceipts)
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
