package command

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"
)

// HTTPNotify takes Orion's notifications on an HTTPS endpoint of the
// gateway (commands.notify.mode http): Orion POSTs each one to PublicURL
// (notification.http.url; fiware-orion ngsiNotify/Notifier.cpp), which
// must reach Listen. Anybody who can reach it can only make the gateway
// read an entity again (subscribe.go).
type HTTPNotify struct {
	Listen    string
	PublicURL string
	// TLS holds the endpoint's certificate (commands.notify.http.cert_file,
	// key_file); Orion verifies it unless run with -insecureNotif.
	TLS    *tls.Config
	Logger *slog.Logger

	live atomic.Bool
	mu   sync.Mutex
	addr string
}

// Name implements NotifyTransport.
func (h *HTTPNotify) Name() string { return "http" }

// Live implements NotifyTransport: listening.
func (h *HTTPNotify) Live() bool { return h.live.Load() }

// Addr is the address listened on, once Run listens ("" before).
func (h *HTTPNotify) Addr() string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.addr
}

// Target implements NotifyTransport.
func (h *HTTPNotify) Target(string) map[string]any {
	return map[string]any{"http": map[string]any{"url": h.PublicURL}}
}

// Run implements NotifyTransport: serves until ctx ends. Only POST with a
// body of at most 64 KiB is taken; every timeout is bounded.
func (h *HTTPNotify) Run(ctx context.Context, hint func([]byte), resync func()) error {
	if h.TLS == nil {
		return errors.New("notify http: a TLS certificate is required")
	}
	ln, err := net.Listen("tcp", h.Listen)
	if err != nil {
		return fmt.Errorf("notify http: listen %s: %w", h.Listen, err)
	}
	h.mu.Lock()
	h.addr = ln.Addr().String()
	h.mu.Unlock()
	log := h.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Method != http.MethodPost {
				w.Header().Set("Allow", http.MethodPost)
				http.Error(w, "POST only", http.StatusMethodNotAllowed)
				return
			}
			body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxNotifyBytes))
			if err != nil {
				http.Error(w, "notification too large or unreadable", http.StatusRequestEntityTooLarge)
				return
			}
			hint(body)
			w.WriteHeader(http.StatusNoContent)
		}),
		TLSConfig:         h.TLS.Clone(),
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      10 * time.Second,
		IdleTimeout:       time.Minute,
		MaxHeaderBytes:    16 << 10,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelDebug),
	}
	served := make(chan error, 1)
	go func() { served <- srv.ServeTLS(ln, "", "") }()
	h.live.Store(true)
	resync()
	select {
	case <-ctx.Done():
	case err := <-served:
		h.live.Store(false)
		return fmt.Errorf("notify http: %w", err)
	}
	h.live.Store(false)
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		srv.Close()
	}
	<-served
	return nil
}
