package central

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"time"

	centralsync "github.com/edgegate/edgegate/sync"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Endpoint limits.
const (
	maxReceiptBytes = 64 << 10
	maxAdminBytes   = 64 << 10
	handlerTimeout  = 60 * time.Second
)

// API paths.
const (
	PolicyKeysPath = "/edgegate/v1/policy-keys"
	AdminPushPath  = "/edgegate/v1/admin/push"
	AdminFleetPath = "/edgegate/v1/admin/fleet"
	MetricsPath    = "/metrics"
)

// ContentTypeJOSE is the media type of bundles and receipts.
const ContentTypeJOSE = "application/jose"

// Handler is the HTTP API. adminToken guards the admin endpoints; empty:
// they answer 404.
func (s *Service) Handler(adminToken string) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+PolicyKeysPath, s.handlePolicyKeys)
	mux.HandleFunc("GET "+centralsync.KeySetPath, s.handleSignedKeySet)
	mux.HandleFunc("GET /edgegate/v1/gateways/{gw}/policy", s.handlePolicy)
	mux.HandleFunc("POST /edgegate/v1/gateways/{gw}/receipts", s.handleReceipt)
	mux.HandleFunc("GET /edgegate/v1/gateways/{gw}/push-credentials", s.handlePushCredentials) // pushext.go
	mux.Handle("GET "+MetricsPath, promhttp.HandlerFor(s.metrics.reg, promhttp.HandlerOpts{Timeout: 10 * time.Second}))
	if adminToken != "" {
		mux.Handle("POST "+AdminPushPath, s.admin(adminToken, s.handleAdminPush))
		mux.Handle("GET "+AdminFleetPath, s.admin(adminToken, s.handleAdminFleet))
	}
	return http.TimeoutHandler(mux, handlerTimeout, `{"error":"timeout"}`)
}

// NewHTTPServer is the API server with its timeouts and header limit.
func NewHTTPServer(addr string, h http.Handler) *http.Server {
	return &http.Server{Addr: addr, Handler: h, ReadHeaderTimeout: 10 * time.Second, ReadTimeout: 30 * time.Second,
		WriteTimeout: handlerTimeout + 10*time.Second, IdleTimeout: 2 * time.Minute, MaxHeaderBytes: 32 << 10}
}

func apiError(w http.ResponseWriter, status int, code, desc string) {
	if status == http.StatusUnauthorized {
		w.Header().Set("WWW-Authenticate", `Bearer error="invalid_token"`)
	}
	writeJSON(w, status, map[string]string{"error": code, "description": desc})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func (s *Service) handlePolicyKeys(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Cache-Control", "no-cache")
	writeJSON(w, http.StatusOK, s.keys.Public(s.now()))
}

// handleSignedKeySet serves the published keys signed by each of them
// (sync/keyset.go): how a paired gateway follows a rotation. Public like
// the JWKS; ETag and If-None-Match, so a gateway checks it every round
// for a 304.
func (s *Service) handleSignedKeySet(w http.ResponseWriter, r *http.Request) {
	b, err := s.keys.SignedKeySet(s.now())
	if err != nil {
		s.log.Error("signed key set", "err", err)
		apiError(w, http.StatusInternalServerError, "internal", "the key set could not be signed")
		return
	}
	sum := sha256.Sum256(b)
	etag := `"` + hex.EncodeToString(sum[:16]) + `"`
	w.Header().Set("Cache-Control", "no-cache")
	w.Header().Set("ETag", etag)
	if r.Header.Get("If-None-Match") == etag {
		w.WriteHeader(http.StatusNotModified)
		return
	}
	w.Header().Set("Content-Type", "application/jose+json")
	_, _ = w.Write(b)
}

// gatewayRequest authenticates a gateway request and authorizes the token's
// account for the path's gateway; on failure it has answered.
func (s *Service) gatewayRequest(w http.ResponseWriter, r *http.Request) (string, bool) {
	azp, err := s.tokens.account(bearer(r))
	if err != nil {
		s.log.Info("gateway request refused", "path", r.URL.Path, "status", http.StatusUnauthorized, "err", err)
		apiError(w, http.StatusUnauthorized, "unauthorized", "access token not valid")
		return "", false
	}
	gw := r.PathValue("gw")
	if !gatewayIDRE.MatchString(gw) {
		apiError(w, http.StatusBadRequest, "bad_request", "gateway id must match "+gatewayIDRE.String())
		return "", false
	}
	if err := s.authorize(r.Context(), gw, azp); err != nil {
		s.log.Warn("gateway request refused", "path", r.URL.Path, "status", http.StatusForbidden, "err", err)
		apiError(w, http.StatusForbidden, "forbidden", "this account is not the gateway's")
		return "", false
	}
	return gw, true
}

// authorize checks that account (a token's azp) is gw's: from the
// gateways configuration, else the binding in the store, else, with
// bind_on_first_use, it binds them now if the account serves no other
// gateway.
func (s *Service) authorize(ctx context.Context, gw, account string) error {
	if want, ok := s.cfg.Gateways[gw]; ok {
		if want != account {
			return fmt.Errorf("account %q is not the account of gateway %q", account, gw)
		}
		return nil
	}
	for other, acct := range s.cfg.Gateways {
		if acct == account {
			return fmt.Errorf("account %q is configured for gateway %q, not %q", account, other, gw)
		}
	}
	rec, ok, err := s.store.Gateway(ctx, gw)
	if err != nil {
		return err
	}
	if ok && rec.Account != "" {
		if rec.Account != account {
			return fmt.Errorf("account %q is not the account of gateway %q", account, gw)
		}
		return nil
	}
	if !s.cfg.BindOnFirstUse {
		return fmt.Errorf("gateway %q has no account (gateways: in the configuration)", gw)
	}
	s.bindMu.Lock()
	defer s.bindMu.Unlock()
	recs, err := s.store.Gateways(ctx)
	if err != nil {
		return err
	}
	for _, o := range recs {
		if o.Account == account && o.ID != gw {
			return fmt.Errorf("account %q is bound to gateway %q, not %q", account, o.ID, gw)
		}
	}
	_, err = s.store.UpdateGateway(ctx, gw, func(r *GatewayRecord) error {
		if r.Account != "" && r.Account != account {
			return fmt.Errorf("gateway %q was just bound to another account", gw)
		}
		r.Account = account
		return nil
	})
	if err == nil {
		s.log.Info("gateway bound to its account on first use", "gateway", gw, "account", account)
	}
	return err
}

// handlePolicy is GET /edgegate/v1/gateways/{gw}/policy.
func (s *Service) handlePolicy(w http.ResponseWriter, r *http.Request) {
	gw, ok := s.gatewayRequest(w, r)
	if !ok {
		return
	}
	rec, found, err := s.store.Gateway(r.Context(), gw)
	if err != nil {
		s.log.Error("policy", "gateway", gw, "err", err)
		apiError(w, http.StatusInternalServerError, "server_error", "store unavailable")
		return
	}
	if !found || rec.Bundle == "" {
		apiError(w, http.StatusNotFound, "no_policy", "no policy has been published for this gateway yet")
		return
	}
	etag := fmt.Sprintf(`"v%d"`, rec.Version)
	w.Header().Set("ETag", etag)
	w.Header().Set("Cache-Control", "no-store") // it holds K1/K2
	if inm := r.Header.Get("If-None-Match"); inm != "" && centralsync.ETagMatches(inm, etag) {
		w.WriteHeader(http.StatusNotModified)
		return
	}
	w.Header().Set("Content-Type", ContentTypeJOSE)
	w.Header().Set("Content-Length", fmt.Sprint(len(rec.Bundle)))
	w.WriteHeader(http.StatusOK)
	_, _ = io.WriteString(w, rec.Bundle)
}

// Receipt errors the API answers.
var (
	errUnknownVersion = errors.New("unknown policy version")
	errKeyMismatch    = errors.New("receipt signed by a key other than the gateway's pinned identity key")
)

// handleReceipt is POST /edgegate/v1/gateways/{gw}/receipts.
func (s *Service) handleReceipt(w http.ResponseWriter, r *http.Request) {
	gw, ok := s.gatewayRequest(w, r)
	if !ok {
		return
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxReceiptBytes))
	if err != nil {
		apiError(w, http.StatusRequestEntityTooLarge, "too_large", fmt.Sprintf("a receipt is at most %d bytes", maxReceiptBytes))
		return
	}
	p, thumb, err := centralsync.VerifyReceipt(body)
	if err == nil && p.Gateway != gw {
		err = fmt.Errorf("receipt is for gateway %q, posted for %q", clip(p.Gateway), gw)
	}
	if err != nil {
		s.metrics.receipts.WithLabelValues("invalid").Inc()
		s.log.Info("receipt refused", "gateway", gw, "status", http.StatusBadRequest, "err", err)
		apiError(w, http.StatusBadRequest, "invalid_receipt", err.Error())
		return
	}
	appliedAt, _ := time.Parse(time.RFC3339, p.AppliedAt)
	now := s.now().UTC()
	_, err = s.store.UpdateGateway(r.Context(), gw, func(rec *GatewayRecord) error {
		if rec.Pin == "" {
			rec.Pin = thumb // trust on first use: the first valid receipt
		} else if rec.Pin != thumb {
			return errKeyMismatch
		}
		if d, issued := rec.Issued[p.PolicyVersion]; !issued || d != p.BundleDigest {
			return errUnknownVersion
		}
		if rec.Applied != p.PolicyVersion {
			rec.AppliedSince = now
		}
		rec.Applied, rec.AppliedDigest, rec.AppliedAt, rec.ReceiptAt = p.PolicyVersion, p.BundleDigest, appliedAt, now
		return nil
	})
	switch {
	case errors.Is(err, errKeyMismatch), errors.Is(err, errUnknownVersion):
		label := "key_mismatch"
		if errors.Is(err, errUnknownVersion) {
			label = "unknown_version"
		}
		s.metrics.receipts.WithLabelValues(label).Inc()
		_, _ = s.store.UpdateGateway(r.Context(), gw, func(rec *GatewayRecord) error {
			rec.RefusedReceipts++
			rec.LastRefusal = label
			return nil
		})
		s.log.Warn("receipt refused", "gateway", gw, "status", http.StatusConflict, "version", p.PolicyVersion, "reason", label)
		apiError(w, http.StatusConflict, label, err.Error())
	case err != nil:
		s.log.Error("receipt", "gateway", gw, "err", err)
		apiError(w, http.StatusInternalServerError, "server_error", "store unavailable")
	default:
		s.metrics.receipts.WithLabelValues("accepted").Inc()
		s.log.Info("receipt accepted", "gateway", gw, "version", p.PolicyVersion, "source", clip(p.Source))
		writeJSON(w, http.StatusAccepted, map[string]any{"accepted": true, "policy_version": p.PolicyVersion})
	}
}

func (s *Service) admin(token string, next http.HandlerFunc) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if subtle.ConstantTimeCompare([]byte(bearer(r)), []byte(token)) != 1 {
			apiError(w, http.StatusUnauthorized, "unauthorized", "admin token required")
			return
		}
		next(w, r)
	})
}

// PushRequest is the body of POST /edgegate/v1/admin/push.
type PushRequest struct {
	Gateways []string `json:"gateways,omitempty"`
	All      bool     `json:"all,omitempty"`
}

func (s *Service) handleAdminPush(w http.ResponseWriter, r *http.Request) {
	var req PushRequest
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxAdminBytes))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		apiError(w, http.StatusBadRequest, "bad_request", "body: "+jsonErr(err))
		return
	}
	if req.All == (len(req.Gateways) > 0) {
		apiError(w, http.StatusBadRequest, "bad_request", `give either "all": true or "gateways"`)
		return
	}
	for _, gw := range req.Gateways {
		if !gatewayIDRE.MatchString(gw) {
			apiError(w, http.StatusBadRequest, "bad_request", "gateway id must match "+gatewayIDRE.String())
			return
		}
	}
	res, err := s.Refresh(r.Context(), true, slices.Clone(req.Gateways)...)
	if err != nil {
		apiError(w, http.StatusBadGateway, "platform", err.Error())
		return
	}
	writeJSON(w, http.StatusOK, res)
}

func (s *Service) handleAdminFleet(w http.ResponseWriter, r *http.Request) {
	f, err := s.Fleet(r.Context())
	if err != nil {
		apiError(w, http.StatusInternalServerError, "server_error", "store unavailable")
		return
	}
	writeJSON(w, http.StatusOK, f)
}
