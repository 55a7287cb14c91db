package admin

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"
)

// Errors the CLI branches on.
var (
	// ErrUnavailable: nothing answers on the socket (daemon not running,
	// wrong path, or no permission on the socket file).
	ErrUnavailable = errors.New("the edgegate daemon is not reachable")
	// ErrForbidden: the daemon refused this user (403).
	ErrForbidden = errors.New("permission denied")
)

// APIError is an error answer of the daemon.
type APIError struct {
	Status  int
	Message string
}

func (e *APIError) Error() string { return e.Message }

// Is makes a 403 match ErrForbidden and a 404 ErrNotFound.
func (e *APIError) Is(target error) bool {
	switch target {
	case ErrForbidden:
		return e.Status == http.StatusForbidden
	case ErrNotFound:
		return e.Status == http.StatusNotFound
	}
	return false
}

// Client talks to the daemon over its admin socket. Every call is bounded
// by its ctx; status and reload also by a timeout of their own (10 s, 30 s).
type Client struct {
	socket string
	hc     *http.Client
}

// NewClient returns a client for the socket at path ("" = DefaultSocket).
func NewClient(path string) *Client {
	if path == "" {
		path = DefaultSocket
	}
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
		DisableCompression:    true,
		MaxIdleConns:          1,
		IdleConnTimeout:       10 * time.Second,
		ResponseHeaderTimeout: 15 * time.Minute, // erase and factory reset compact the store
	}
	return &Client{socket: path, hc: &http.Client{Transport: tr}}
}

// Socket is the path the client dials.
func (c *Client) Socket() string { return c.socket }

func (c *Client) do(ctx context.Context, method, path string, body any) (*http.Response, error) {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return nil, err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://edgegate"+path, rd)
	if err != nil {
		return nil, err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		var op *net.OpError
		if errors.As(err, &op) && op.Op == "dial" {
			return nil, fmt.Errorf("%w (socket %s): %w", ErrUnavailable, c.socket, op.Err)
		}
		return nil, fmt.Errorf("%s %s: %w", method, path, err)
	}
	if resp.StatusCode/100 != 2 {
		defer resp.Body.Close()
		var ae apiError
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		if json.Unmarshal(b, &ae) != nil || ae.Error == "" {
			ae.Error = fmt.Sprintf("%s %s: HTTP %d", method, path, resp.StatusCode)
		}
		return nil, &APIError{Status: resp.StatusCode, Message: ae.Error}
	}
	return resp, nil
}

func (c *Client) call(ctx context.Context, method, path string, body, out any) error {
	resp, err := c.do(ctx, method, path, body)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if out == nil {
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20))
		return nil
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 64<<20)).Decode(out); err != nil {
		return fmt.Errorf("%s %s: decode answer: %w", method, path, err)
	}
	return nil
}

// Status asks the daemon for its status.
func (c *Client) Status(ctx context.Context) (Status, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	var st Status
	err := c.call(ctx, http.MethodGet, "/v1/status", nil, &st)
	return st, err
}

// Export streams the NDJSON records of sel to w and returns the daemon's
// report, or the error it reported after the stream began.
func (c *Client) Export(ctx context.Context, sel Selector, w io.Writer) (ExportReport, error) {
	if err := sel.Validate(); err != nil {
		return ExportReport{}, err
	}
	resp, err := c.do(ctx, http.MethodPost, "/v1/export", sel)
	if err != nil {
		return ExportReport{}, err
	}
	defer resp.Body.Close()
	if _, err := io.Copy(w, resp.Body); err != nil {
		return ExportReport{}, fmt.Errorf("export: %w", err)
	}
	if msg := resp.Trailer.Get(TrailerError); msg != "" {
		return ExportReport{}, fmt.Errorf("export interrupted by the daemon: %s", msg)
	}
	var rep ExportReport
	if err := json.Unmarshal([]byte(resp.Trailer.Get(TrailerReport)), &rep); err != nil {
		return ExportReport{}, fmt.Errorf("export: incomplete (no report from the daemon): %w", err)
	}
	return rep, nil
}

// Erase asks the daemon to erase everything held for sel.
func (c *Client) Erase(ctx context.Context, sel Selector) (EraseReport, error) {
	if err := sel.Validate(); err != nil {
		return EraseReport{}, err
	}
	var rep EraseReport
	err := c.call(ctx, http.MethodPost, "/v1/erase", sel, &rep)
	return rep, err
}

// FactoryReset asks the daemon to forget everything.
func (c *Client) FactoryReset(ctx context.Context) error {
	return c.call(ctx, http.MethodPost, "/v1/factory-reset", map[string]string{"confirm": ConfirmFactoryReset}, nil)
}

// Reload asks the daemon to reload its configuration and devices.
func (c *Client) Reload(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	return c.call(ctx, http.MethodPost, "/v1/reload", struct{}{}, nil)
}

// CloseIdle closes idle connections (the CLI exits right after anyway).
func (c *Client) CloseIdle() { c.hc.CloseIdleConnections() }
