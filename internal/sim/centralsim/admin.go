package centralsim

import (
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"net/http"
	"strings"
	"time"
)

const maxAdminBody = 1 << 20

// routes builds the whole HTTP surface.
func (s *Server) routes() http.Handler {
	mux := http.NewServeMux()
	realm := s.realmPath()
	mux.HandleFunc("GET "+realm+"/.well-known/openid-configuration", s.handleDiscoveryPairing)
	mux.HandleFunc("GET "+realm+"/protocol/openid-connect/certs", s.handleJWKS)
	mux.HandleFunc("GET "+realm+"/protocol/openid-connect/userinfo", s.handleUserinfo)
	mux.HandleFunc("POST "+realm+"/protocol/openid-connect/userinfo", s.handleUserinfo)
	mux.Handle(realm+"/protocol/openid-connect/token", s.withFaults(TargetToken, http.HandlerFunc(s.handleTokenPairing)))

	s.brokerRoutes(mux) // filter.go: the Orion Broker Filter and the bare Orion

	admin := func(pattern string, h http.HandlerFunc) { mux.Handle(pattern, s.adminOnly(h)) }
	admin("GET /_sim/updates", s.handleAdminUpdates)
	admin("GET /_sim/refusals", s.handleAdminRefusals)
	admin("GET /_sim/summary", s.handleAdminSummary)
	admin("GET /_sim/entities/{id}", s.handleAdminEntity)
	admin("POST /_sim/fault", s.handleAdminSetFault)
	admin("DELETE /_sim/fault", s.handleAdminClearFault)
	admin("POST /_sim/devices", s.handleAdminAddDevice)
	admin("DELETE /_sim/devices/{id}", s.handleAdminRemoveDevice)
	admin("PUT /_sim/delegations", s.handleAdminSetDelegations)
	admin("DELETE /_sim/filter-cache", s.handleAdminClearFilterCache)
	s.syncRoutes(mux, admin)
	s.pairingRoutes(mux, admin) // pairing.go, iotdirectory.go
	return s.logRequests(mux)
}

// adminOnly requires "Authorization: Bearer <admin token>".
func (s *Server) adminOnly(next http.Handler) http.Handler {
	want := sha256.Sum256([]byte(s.adminToken))
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := r.Header.Get("Authorization")
		tok, ok := strings.CutPrefix(h, "Bearer ")
		got := sha256.Sum256([]byte(tok))
		if !ok || subtle.ConstantTimeCompare(got[:], want[:]) != 1 {
			w.Header().Set("WWW-Authenticate", `Bearer realm="central-sim admin"`)
			writeJSON(w, http.StatusUnauthorized, map[string]string{"error": "unauthorized", "description": "admin token required"})
			return
		}
		w.Header().Set("Cache-Control", "no-store")
		next.ServeHTTP(w, r)
	})
}

func (s *Server) handleAdminUpdates(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, s.Updates())
}

func (s *Server) handleAdminRefusals(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, s.Refusals())
}

func (s *Server) handleAdminSummary(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, s.Summary())
}

func (s *Server) handleAdminEntity(w http.ResponseWriter, r *http.Request) {
	e, ok := s.Entity(r.PathValue("id"))
	if !ok {
		writeJSON(w, http.StatusNotFound, orionError{Error: "NotFound", Description: orionNotFoundDesc})
		return
	}
	writeJSON(w, http.StatusOK, e)
}

func decodeAdmin(w http.ResponseWriter, r *http.Request, v any) bool {
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxAdminBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		apiError(w, http.StatusBadRequest, "bad_request", err.Error())
		return false
	}
	return true
}

func (s *Server) handleAdminSetFault(w http.ResponseWriter, r *http.Request) {
	var f Fault
	if !decodeAdmin(w, r, &f) {
		return
	}
	if err := s.SetFaultChecked(f); err != nil {
		apiError(w, http.StatusBadRequest, "bad_request", err.Error())
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) handleAdminClearFault(w http.ResponseWriter, r *http.Request) {
	s.ClearFault()
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) handleAdminAddDevice(w http.ResponseWriter, r *http.Request) {
	var d Device
	if !decodeAdmin(w, r, &d) {
		return
	}
	if err := s.AddDeviceChecked(d); err != nil {
		apiError(w, http.StatusBadRequest, "bad_request", err.Error())
		return
	}
	s.log.Info("device added", "device", d.ID, "owner", d.Owner)
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) handleAdminRemoveDevice(w http.ResponseWriter, r *http.Request) {
	s.RemoveDevice(r.PathValue("id"))
	s.log.Info("device removed", "device", r.PathValue("id"))
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) handleAdminSetDelegations(w http.ResponseWriter, r *http.Request) {
	var ds []Delegation
	if !decodeAdmin(w, r, &ds) {
		return
	}
	for _, d := range ds {
		if err := validDelegation(d); err != nil {
			apiError(w, http.StatusBadRequest, "bad_request", err.Error())
			return
		}
	}
	s.SetDelegations(ds)
	w.WriteHeader(http.StatusNoContent)
}

// handleAdminClearFilterCache empties the filter's cache (a filter restart).
func (s *Server) handleAdminClearFilterCache(w http.ResponseWriter, r *http.Request) {
	s.ClearFilterCache()
	w.WriteHeader(http.StatusNoContent)
}

// statusRecorder remembers the status for the request log; Unwrap keeps
// http.ResponseController (Hijack, Flush) working through it.
type statusRecorder struct {
	http.ResponseWriter
	status int
}

func (r *statusRecorder) WriteHeader(code int) {
	if r.status == 0 {
		r.status = code
	}
	r.ResponseWriter.WriteHeader(code)
}

func (r *statusRecorder) Write(b []byte) (int, error) {
	if r.status == 0 {
		r.status = http.StatusOK
	}
	return r.ResponseWriter.Write(b)
}

func (r *statusRecorder) Unwrap() http.ResponseWriter { return r.ResponseWriter }

// logRequests logs method, path (never the query: it may carry k1/k2),
// status and duration at debug level. Headers are never logged.
func (s *Server) logRequests(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		s.inflight.Add(1)
		defer s.inflight.Add(-1)
		rec := &statusRecorder{ResponseWriter: w}
		defer func() {
			s.log.Debug("request", "method", r.Method, "path", r.URL.Path, "status", rec.status, "dur", time.Since(start))
		}()
		next.ServeHTTP(rec, r)
	})
}
