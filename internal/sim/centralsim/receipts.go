package centralsim

import (
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"time"

	centralsync "github.com/edgegate/edgegate/sync"
	"github.com/lestrrat-go/jwx/v2/jwk"
)

// Apply receipts: after applying a policy, a gateway reports it.
//
//	POST /edgegate/v1/gateways/{gw}/receipts   (Bearer: the gateway account)
//	body: compact JWS, alg EdDSA, signed by the gateway identity key, with
//	      protected header kid = RFC 7638 thumbprint (SHA-256, base64url) of
//	      that key and jwk = the public key;
//	payload: {"gateway","policy_version","bundle_digest","source","applied_at"}
//
// The signature is verified with the embedded jwk, the kid must be its
// thumbprint, and payload.gateway must be the path's gateway. The first
// valid receipt pins the key's thumbprint to the gateway (trust on first
// use) until pairing registers it (PinGatewayKey); a receipt signed by
// another key is refused with 409 thereafter. 202 on success, 400 for a
// receipt that does not verify; every receipt is recorded, Valid or not.

const maxReceiptBytes = 64 << 10

// Receipt is one receipt the sim received.
type Receipt struct {
	Gateway       string    `json:"gateway"`
	Thumbprint    string    `json:"thumbprint"` // of the signing key (claimed, when not Valid)
	PolicyVersion uint64    `json:"policy_version"`
	BundleDigest  string    `json:"bundle_digest"`
	Source        string    `json:"source"`
	AppliedAt     time.Time `json:"applied_at"`
	ReceivedAt    time.Time `json:"received_at"`
	Valid         bool      `json:"valid"`
	Detail        string    `json:"detail,omitempty"` // why not Valid
}

// Thumbprint is centralsync.Thumbprint, kept for the sim's callers.
func Thumbprint(key jwk.Key) (string, error) { return centralsync.Thumbprint(key) }

// verifyReceipt is centralsync.VerifyReceipt with applied_at read as a time:
// one that is not RFC 3339 fails the receipt.
func verifyReceipt(compact []byte) (p centralsync.Receipt, applied time.Time, thumb string, err error) {
	p, thumb, err = centralsync.VerifyReceipt(compact)
	if err == nil && p.AppliedAt != "" {
		if applied, err = time.Parse(time.RFC3339, p.AppliedAt); err != nil {
			err = errors.New("payload: applied_at is not an RFC 3339 time")
		}
	}
	return p, applied, thumb, err
}

// handleReceipt is POST /edgegate/v1/gateways/{gw}/receipts.
func (s *Server) handleReceipt(w http.ResponseWriter, r *http.Request) {
	gw, ok := s.gatewayRequest(w, r)
	if !ok {
		return
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxReceiptBytes))
	if err != nil {
		apiError(w, http.StatusRequestEntityTooLarge, "too_large", fmt.Sprintf("a receipt is at most %d bytes", maxReceiptBytes))
		return
	}
	p, applied, thumb, err := verifyReceipt(body)
	if err == nil && p.Gateway != gw {
		err = fmt.Errorf("receipt is for gateway %q, posted for %q", p.Gateway, gw)
	}
	rec := Receipt{
		Gateway: gw, Thumbprint: thumb, PolicyVersion: p.PolicyVersion, BundleDigest: p.BundleDigest,
		Source: p.Source, AppliedAt: applied, ReceivedAt: s.now(),
	}
	if err != nil {
		rec.Detail = err.Error()
		s.recordReceipt(rec)
		s.log.Info("receipt refused", "gateway", gw, "status", http.StatusBadRequest, "err", err)
		apiError(w, http.StatusBadRequest, "invalid_receipt", err.Error())
		return
	}
	s.mu.Lock()
	st := s.ps.gateways[gw] // exists: gatewayRequest bound it
	pinned := st.pin
	if pinned == "" {
		st.pin = thumb
	}
	s.mu.Unlock()
	if pinned == "" {
		s.log.Info("gateway identity key pinned on first receipt", "gateway", gw, "thumbprint", thumb)
	} else if pinned != thumb {
		rec.Detail = "signed by key " + thumb + ", gateway is pinned to " + pinned
		s.recordReceipt(rec)
		s.log.Warn("receipt refused", "gateway", gw, "status", http.StatusConflict, "thumbprint", thumb, "pinned", pinned)
		apiError(w, http.StatusConflict, "key_mismatch", "receipt signed by a key other than the gateway's pinned identity key")
		return
	}
	rec.Valid = true
	s.recordReceipt(rec)
	s.log.Info("receipt accepted", "gateway", gw, "version", p.PolicyVersion, "source", p.Source)
	writeJSON(w, http.StatusAccepted, map[string]any{"accepted": true, "policy_version": p.PolicyVersion})
}

func (s *Server) recordReceipt(rec Receipt) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.ps.receipts = append(s.ps.receipts, rec)
}

// Receipts returns every receipt received, oldest first.
func (s *Server) Receipts() []Receipt {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.ps.receipts)
}

// PinGatewayKey registers gw's identity key thumbprint (what pairing
// does), replacing a pin taken on first use.
func (s *Server) PinGatewayKey(gw, thumbprint string) error {
	if !gatewayIDRE.MatchString(gw) {
		return fmt.Errorf("centralsim: gateway id must match %s: %q", gatewayIDRE, gw)
	}
	if b, err := base64.RawURLEncoding.DecodeString(thumbprint); err != nil || len(b) != 32 {
		return fmt.Errorf("centralsim: thumbprint must be a base64url SHA-256: %q", thumbprint)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.ps.gateways[gw]
	if st == nil {
		st = &gatewayState{}
		s.ps.gateways[gw] = st
	}
	st.pin = thumbprint
	return nil
}

// GatewayKey returns the thumbprint pinned for gw, if any.
func (s *Server) GatewayKey(gw string) (string, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.ps.gateways[gw]
	if st == nil || st.pin == "" {
		return "", false
	}
	return st.pin, true
}
