package admin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"time"

	"github.com/edgegate/edgegate/internal/audit"
	"github.com/edgegate/edgegate/internal/logx"
)

// ErrNotFound is for backends to wrap when a selector matches nothing; the
// server answers 404.
var ErrNotFound = errors.New("no such device or owner")

// Auditor records audit events (audit.Logger); the server records denied
// peers and every export, erasure and factory reset, with the peer's uid.
type Auditor interface {
	Record(ctx context.Context, e audit.Event)
}

// Access is who may use the socket.
type Access struct {
	UIDs []uint32 // always allowed (root, the daemon's own user)
	// GID, when HasGID, admits a peer whose primary or supplementary group
	// it is.
	GID    uint32
	HasGID bool
}

// DefaultAccess admits uid 0, the calling process's uid, and members of
// group (when the group exists).
func DefaultAccess(group string) Access {
	a := Access{UIDs: []uint32{0, uint32(os.Getuid())}}
	if g, err := user.LookupGroup(group); err == nil {
		if gid, err := strconv.ParseUint(g.Gid, 10, 32); err == nil {
			a.GID, a.HasGID = uint32(gid), true
		}
	}
	return a
}

// Allows reports whether p may use the socket.
func (a Access) Allows(p Peer) bool {
	if slices.Contains(a.UIDs, p.UID) {
		return true
	}
	return a.HasGID && (p.GID == a.GID || slices.Contains(p.Groups, a.GID))
}

// ServerOptions configures Listen.
type ServerOptions struct {
	Socket  string // default DefaultSocket
	Backend Backend
	// Access defaults to DefaultAccess(Group).
	Access *Access
	// Group owns the socket (mode 0660) when it exists; default Group.
	Group  string
	Audit  Auditor      // nil: denials are only logged
	Logger *slog.Logger // nil: discard
}

// Server serves the admin API on a unix socket.
type Server struct {
	opts   ServerOptions
	access Access
	log    *slog.Logger
	ln     *net.UnixListener
	srv    *http.Server
}

type ctxKey struct{}

type peerResult struct {
	peer Peer
	err  error
}

// Listen creates the socket: its directory (0750) if missing, a stale
// socket from a crashed daemon removed (a live one is an error), mode 0660
// and group Group. Credentials are checked per connection, so the instant
// between bind and chmod grants nothing.
func Listen(opts ServerOptions) (*Server, error) {
	if opts.Backend == nil {
		return nil, errors.New("admin: no backend")
	}
	if opts.Socket == "" {
		opts.Socket = DefaultSocket
	}
	if opts.Group == "" {
		opts.Group = Group
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	access := DefaultAccess(opts.Group)
	if opts.Access != nil {
		access = *opts.Access
	}
	if err := os.MkdirAll(filepath.Dir(opts.Socket), 0o750); err != nil {
		return nil, fmt.Errorf("admin socket %s: %w", opts.Socket, err)
	}
	if err := removeStale(opts.Socket); err != nil {
		return nil, err
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: opts.Socket, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("admin socket %s: %w", opts.Socket, err)
	}
	ln.SetUnlinkOnClose(true)
	if err := os.Chmod(opts.Socket, 0o660); err != nil {
		ln.Close()
		return nil, fmt.Errorf("admin socket %s: %w", opts.Socket, err)
	}
	if access.HasGID {
		if err := os.Chown(opts.Socket, -1, int(access.GID)); err != nil {
			log.Warn("admin socket: cannot give it to its group; only root and the daemon's user can use it",
				"socket", opts.Socket, "group", opts.Group, "err", err)
		}
	}
	s := &Server{opts: opts, access: access, log: log.With("component", "admin"), ln: ln}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/status", s.guard(s.status))
	mux.HandleFunc("POST /v1/export", s.guard(s.export))
	mux.HandleFunc("POST /v1/erase", s.guard(s.erase))
	mux.HandleFunc("POST /v1/factory-reset", s.guard(s.factoryReset))
	mux.HandleFunc("POST /v1/reload", s.guard(s.reload))
	s.deviceRoutes(mux) // devices.go
	s.appRoutes(mux)    // apps.go
	mux.HandleFunc("/", s.guard(func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, "no such endpoint: "+r.Method+" "+r.URL.Path)
	}))
	s.srv = &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       30 * time.Second,
		// Per-request deadlines are extended by export (per write) and by
		// erase and factory reset (long compactions).
		WriteTimeout:   60 * time.Second,
		IdleTimeout:    60 * time.Second,
		MaxHeaderBytes: 16 << 10,
		ErrorLog:       slog.NewLogLogger(log.Handler(), slog.LevelWarn),
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			p, err := peerOf(c)
			return context.WithValue(ctx, ctxKey{}, peerResult{p, err})
		},
	}
	return s, nil
}

// removeStale removes a socket file nobody listens on.
func removeStale(path string) error {
	st, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("admin socket %s: %w", path, err)
	}
	if st.Mode()&fs.ModeSocket == 0 {
		return fmt.Errorf("admin socket %s: exists and is not a socket; remove it", path)
	}
	c, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		c.Close()
		return fmt.Errorf("admin socket %s: another edgegate daemon is listening", path)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("admin socket %s: remove stale socket: %w", path, err)
	}
	return nil
}

// Addr is the socket path.
func (s *Server) Addr() string { return s.opts.Socket }

// Run serves until ctx is done, then shuts down (bounded: 5 s for requests
// in flight) and removes the socket. It returns nil after cancellation.
func (s *Server) Run(ctx context.Context) error {
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		<-runCtx.Done()
		sctx, scancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer scancel()
		if err := s.srv.Shutdown(sctx); err != nil {
			s.srv.Close()
		}
	}()
	err := s.srv.Serve(s.ln)
	stopped := ctx.Err() != nil
	cancel()
	<-done
	if stopped {
		return nil
	}
	return fmt.Errorf("admin server: %w", err)
}

// Close removes the socket of a server whose Run was never called.
func (s *Server) Close() error { return s.ln.Close() }

// guard admits allowed peers only; every refusal is a 403 and is audited.
func (s *Server) guard(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		pr, _ := r.Context().Value(ctxKey{}).(peerResult)
		if pr.err != nil || !s.access.Allows(pr.peer) {
			cause, user := "not_allowed", fmt.Sprintf("uid=%d", pr.peer.UID)
			if pr.err != nil {
				cause, user = "no_credentials", ""
			}
			s.record(r.Context(), audit.Event{Kind: audit.AdminDenied, Cause: cause, User: user, Port: s.opts.Socket,
				Detail: fmt.Sprintf("%s %s from pid %d gid %d", r.Method, r.URL.Path, pr.peer.PID, pr.peer.GID)})
			writeError(w, http.StatusForbidden, fmt.Sprintf(
				"permission denied: uid %d is not root, not the daemon's user and not in group %s", pr.peer.UID, s.opts.Group))
			return
		}
		h(w, r)
	}
}

func (s *Server) record(ctx context.Context, e audit.Event) {
	if s.opts.Audit != nil {
		s.opts.Audit.Record(ctx, e)
		return
	}
	s.log.Warn("admin", "kind", e.Kind, "cause", e.Cause, "user", e.User, "detail", e.Detail)
}

func peerUser(r *http.Request) string {
	pr, _ := r.Context().Value(ctxKey{}).(peerResult)
	return fmt.Sprintf("uid=%d", pr.peer.UID)
}

func (s *Server) status(w http.ResponseWriter, r *http.Request) {
	st := s.opts.Backend.Status(r.Context())
	st.fill()
	writeJSON(w, http.StatusOK, st)
}

func readSelector(w http.ResponseWriter, r *http.Request) (Selector, bool) {
	var sel Selector
	dec := json.NewDecoder(io.LimitReader(r.Body, 4<<10))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&sel); err != nil {
		writeError(w, http.StatusBadRequest, "malformed selector: "+err.Error())
		return sel, false
	}
	if err := sel.Validate(); err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return sel, false
	}
	return sel, true
}

// Trailers of an export.
const (
	TrailerReport = "Edgegate-Export-Report"
	TrailerError  = "Edgegate-Export-Error"
)

// maxTrailerError bounds the error message of an interrupted export.
const maxTrailerError = 1 << 10

func (s *Server) export(w http.ResponseWriter, r *http.Request) {
	sel, ok := readSelector(w, r)
	if !ok {
		return
	}
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.Header().Set("Trailer", TrailerReport+", "+TrailerError)
	dw := &deadlineWriter{w: w, rc: http.NewResponseController(w)}
	rep, err := s.opts.Backend.Export(r.Context(), sel, dw)
	if rep.Selector == (Selector{}) {
		rep.Selector = sel
	}
	ev := audit.Event{Kind: audit.Export, Device: sel.Device, User: peerUser(r), Port: s.opts.Socket}
	if sel.Owner != "" {
		ev.Detail = "owner " + sel.Owner + ": "
	}
	if err != nil {
		ev.Cause = "failed"
		ev.Detail += fmt.Sprintf("%d records before: %v", rep.Records, err)
		s.record(r.Context(), ev)
		if !dw.wrote {
			writeError(w, errorStatus(err), err.Error())
			return
		}
		// One header line, and short enough to stay under the client's
		// header limits.
		w.Header().Set(TrailerError, logx.Clip(err.Error(), maxTrailerError))
		return
	}
	ev.Detail += fmt.Sprintf("%d records of %d devices", rep.Records, len(rep.Devices))
	s.record(r.Context(), ev)
	if !dw.wrote {
		w.WriteHeader(http.StatusOK)
	}
	b, _ := json.Marshal(rep)
	w.Header().Set(TrailerReport, string(b))
}

func (s *Server) erase(w http.ResponseWriter, r *http.Request) {
	sel, ok := readSelector(w, r)
	if !ok {
		return
	}
	_ = http.NewResponseController(w).SetWriteDeadline(time.Now().Add(10 * time.Minute))
	rep, err := s.opts.Backend.Erase(r.Context(), sel)
	if rep.Selector == (Selector{}) {
		rep.Selector = sel
	}
	ev := audit.Event{Kind: audit.Erase, Device: sel.Device, User: peerUser(r), Port: s.opts.Socket}
	if sel.Owner != "" {
		ev.Detail = "owner " + sel.Owner + ": "
	}
	var queued, dead int
	for _, d := range rep.Devices {
		queued += d.Queued
		dead += d.DeadLetters
	}
	ev.Detail += fmt.Sprintf("%d devices, %d queued, %d dead letters", len(rep.Devices), queued, dead)
	if err != nil {
		ev.Cause = "failed"
		ev.Detail += ": " + err.Error()
		s.record(r.Context(), ev)
		writeError(w, errorStatus(err), err.Error())
		return
	}
	s.record(r.Context(), ev)
	writeJSON(w, http.StatusOK, rep)
}

// ConfirmFactoryReset is the body a factory reset must carry, so that no
// stray POST (or a replayed status request) can wipe the gateway.
const ConfirmFactoryReset = "factory-reset"

func (s *Server) factoryReset(w http.ResponseWriter, r *http.Request) {
	var body struct {
		Confirm string `json:"confirm"`
	}
	if err := json.NewDecoder(io.LimitReader(r.Body, 1<<10)).Decode(&body); err != nil || body.Confirm != ConfirmFactoryReset {
		writeError(w, http.StatusBadRequest, `a factory reset needs {"confirm": "factory-reset"}`)
		return
	}
	_ = http.NewResponseController(w).SetWriteDeadline(time.Now().Add(10 * time.Minute))
	err := s.opts.Backend.FactoryReset(r.Context())
	ev := audit.Event{Kind: audit.FactoryReset, User: peerUser(r), Port: s.opts.Socket, Detail: "done"}
	if err != nil {
		ev.Cause, ev.Detail = "failed", err.Error()
	}
	s.record(r.Context(), ev)
	if err != nil {
		writeError(w, errorStatus(err), err.Error())
		return
	}
	writeJSON(w, http.StatusOK, struct{}{})
}

func (s *Server) reload(w http.ResponseWriter, r *http.Request) {
	if err := s.opts.Backend.Reload(r.Context()); err != nil {
		writeError(w, errorStatus(err), err.Error())
		return
	}
	writeJSON(w, http.StatusOK, struct{}{})
}

func errorStatus(err error) int {
	switch {
	case errors.Is(err, ErrNotFound):
		return http.StatusNotFound
	case errors.Is(err, ErrBadSelector):
		return http.StatusBadRequest
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return http.StatusServiceUnavailable
	}
	return http.StatusInternalServerError
}

type apiError struct {
	Error string `json:"error"`
}

func writeError(w http.ResponseWriter, code int, msg string) {
	writeJSON(w, code, apiError{Error: msg})
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

// deadlineWriter pushes the write deadline 30 s ahead of each write, so a
// long export is bounded by progress, not by total time.
type deadlineWriter struct {
	w     http.ResponseWriter
	rc    *http.ResponseController
	wrote bool
	last  time.Time
}

func (d *deadlineWriter) Write(p []byte) (int, error) {
	if now := time.Now(); now.Sub(d.last) > time.Second {
		d.last = now
		_ = d.rc.SetWriteDeadline(now.Add(30 * time.Second))
	}
	d.wrote = true
	return d.w.Write(p)
}
