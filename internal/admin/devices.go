package admin

// Device registration through the running daemon, so that `edgegate device
// add|list|update|remove|bind` work while it holds the store:
//
//	GET    /v1/devices              DeviceList
//	POST   /v1/devices              body DeviceAddRequest; DeviceResult
//	PATCH  /v1/devices/{id}         body DeviceUpdateRequest; DeviceResult
//	DELETE /v1/devices/{id}?broker= DeviceResult
//	POST   /v1/devices/{id}/bind    body DeviceBindRequest; DeviceResult
//
// K1/K2 and private keys travel only in request bodies, over the unix
// socket; no answer, error or log line carries them.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/edgegate/edgegate/internal/audit"
)

// DeviceBackend is what the device endpoints need; a Backend that lacks it
// answers them 501.
type DeviceBackend interface {
	AddDevice(ctx context.Context, req DeviceAddRequest) (DeviceResult, error)
	UpdateDevice(ctx context.Context, req DeviceUpdateRequest) (DeviceResult, error)
	RemoveDevice(ctx context.Context, id, broker string) (DeviceResult, error)
	BindDevice(ctx context.Context, req DeviceBindRequest) (DeviceResult, error)
	ListDevices(ctx context.Context) (DeviceList, error)
}

// Errors a DeviceBackend wraps so that the server picks the status.
var (
	// ErrBadRequest: the request is invalid (400); the message says why.
	ErrBadRequest = errors.New("invalid request")
	// ErrUpstream: the central service refused or failed (502).
	ErrUpstream = errors.New("the central service refused")
	// ErrNotPaired: the daemon has no paired account to register with (409).
	ErrNotPaired = errors.New("the gateway is not paired: run edgegate pair")
)

// DeviceAttr is one attribute of a device's model.
type DeviceAttr struct {
	Name      string `json:"name"`
	DataType  string `json:"data_type"`
	ValueType string `json:"value_type"`
	Unit      string `json:"unit"`
	// Healthiness is refresh_rate, different_values or within_bounds;
	// HealthinessValue its value (seconds for refresh_rate).
	Healthiness      string `json:"healthiness"`
	HealthinessValue string `json:"healthiness_value,omitempty"`
}

// DeviceBinding is a device's local source: a radio node, or MQTT.
type DeviceBinding struct {
	RadioPort  string `json:"radio_port,omitempty"`
	RadioNode  int    `json:"radio_node"`  // -1 any
	RadioChild int    `json:"radio_child"` // -1 any
	MQTT       bool   `json:"mqtt,omitempty"`
}

// String describes the binding.
func (b DeviceBinding) String() string {
	if b.RadioPort != "" {
		return fmt.Sprintf("radio port %s, node %s, child %s", b.RadioPort, anyN(b.RadioNode), anyN(b.RadioChild))
	}
	if b.MQTT {
		return "the local MQTT link"
	}
	return "none"
}

func anyN(n int) string {
	if n < 0 {
		return "any"
	}
	return fmt.Sprint(n)
}

// DeviceAddRequest registers a device in the IoT directory and the
// gateway's registry.
type DeviceAddRequest struct {
	ID         string        `json:"id"`
	Type       string        `json:"type"`
	Broker     string        `json:"broker"`
	Kind       string        `json:"kind"`
	Format     string        `json:"format"`
	Model      string        `json:"model"`
	Producer   string        `json:"producer"`
	Latitude   float64       `json:"latitude"`
	Longitude  float64       `json:"longitude"`
	Frequency  int           `json:"frequency"`
	Attributes []DeviceAttr  `json:"attributes"`
	Binding    DeviceBinding `json:"binding"`
	// Signing is hs256, gateway or device.
	Signing string `json:"signing"`
	// SigningKey is the gateway-held private key (a JWK) with Signing
	// gateway. Secret.
	SigningKey string `json:"signing_key,omitempty"`
	// PublicKey is the device's public key (a JWK) with Signing device.
	PublicKey string `json:"public_key,omitempty"`
	K1        string `json:"k1"` // secret
	K2        string `json:"k2"` // secret
}

// String leaves the secrets out (a request is never logged whole).
func (r DeviceAddRequest) String() string {
	return fmt.Sprintf("add device %s (type %s, broker %s)", r.ID, r.Type, r.Broker)
}

// GoString keeps %#v from printing secrets.
func (r DeviceAddRequest) GoString() string { return r.String() }

// DeviceUpdateRequest changes an owned device; nil fields stay.
type DeviceUpdateRequest struct {
	ID               string         `json:"id"`
	Broker           string         `json:"broker"`
	Type             *string        `json:"type,omitempty"`
	Latitude         *float64       `json:"latitude,omitempty"`
	Longitude        *float64       `json:"longitude,omitempty"`
	Frequency        *int           `json:"frequency,omitempty"`
	Binding          *DeviceBinding `json:"binding,omitempty"`
	AddAttributes    []DeviceAttr   `json:"add_attributes,omitempty"`
	RemoveAttributes []string       `json:"remove_attributes,omitempty"`
}

// DeviceBindRequest records in the registry a device registered elsewhere
// (e.g. delegated to the account), without calling the directory.
type DeviceBindRequest struct {
	ID         string        `json:"id"`
	Type       string        `json:"type"`
	Broker     string        `json:"broker,omitempty"`
	Binding    DeviceBinding `json:"binding"`
	Signing    string        `json:"signing,omitempty"`
	PublicKey  string        `json:"public_key,omitempty"`
	Attributes []string      `json:"attributes,omitempty"`
	K1         string        `json:"k1,omitempty"` // secret
	K2         string        `json:"k2,omitempty"` // secret
	// Kind (sensor, actuator) and Writable attributes: which commands the
	// device takes (internal/command).
	Kind     string   `json:"kind,omitempty"`
	Writable []string `json:"writable,omitempty"`
}

// String leaves the secrets out.
func (r DeviceBindRequest) String() string {
	return fmt.Sprintf("bind device %s (type %s)", r.ID, r.Type)
}

// GoString keeps %#v from printing secrets.
func (r DeviceBindRequest) GoString() string { return r.String() }

// DeviceResult reports a change. It never carries keys.
type DeviceResult struct {
	ID      string `json:"id"`
	Action  string `json:"action"` // added, updated, removed, bound
	Type    string `json:"type,omitempty"`
	Broker  string `json:"broker,omitempty"`
	Binding string `json:"binding,omitempty"`
	Signing string `json:"signing,omitempty"` // in words
	User    string `json:"user,omitempty"`    // the paired account
	Gateway string `json:"gateway,omitempty"`
	// OwnershipChecked/OwnershipMissing: after an insert the Ownership API
	// was asked for the device's row; missing = the platform refused it.
	OwnershipChecked bool   `json:"ownership_checked,omitempty"`
	OwnershipMissing bool   `json:"ownership_missing,omitempty"`
	ElementID        string `json:"element_id,omitempty"`
	// Warnings the directory sent with an "ok", and local ones.
	Warnings []string `json:"warnings,omitempty"`
	// Registry: the gateway's registry was written.
	Registry bool `json:"registry"`
	// SyncNudged: the running daemon's policy sync was asked to run now.
	SyncNudged bool `json:"sync_nudged,omitempty"`
	// Delegated: a bound device the account does not own.
	Delegated bool `json:"delegated,omitempty"`
}

// DeviceInfo is a device of DeviceList: the directory's view joined with
// the registry's.
type DeviceInfo struct {
	ID     string `json:"id"`
	Type   string `json:"type,omitempty"`
	Broker string `json:"broker,omitempty"`
	// Relation is owned, delegated, public, or local (only in the registry).
	Relation string `json:"relation"`
	Binding  string `json:"binding,omitempty"`
	Signing  string `json:"signing,omitempty"`
	// InDirectory, InRegistry: where the device was found.
	InDirectory bool `json:"in_directory"`
	InRegistry  bool `json:"in_registry"`
	// Problems: what keeps the device out of the gateway's policy, and the
	// fix.
	Problems []string `json:"problems,omitempty"`
}

// DeviceList is the answer of GET /v1/devices.
type DeviceList struct {
	Devices []DeviceInfo `json:"devices"`
	// Warning: the directory could not be read; the registry is shown.
	Warning string `json:"warning,omitempty"`
}

// maxDeviceBody bounds a device request (keys, a model of a few dozen
// attributes).
const maxDeviceBody = 64 << 10

// deviceTimeout bounds a device call through the daemon: the daemon makes
// a few calls to the central service.
const deviceTimeout = 2 * time.Minute

func (s *Server) deviceRoutes(mux *http.ServeMux) {
	mux.HandleFunc("GET /v1/devices", guarded(s, "devices", s.devicesList))
	mux.HandleFunc("POST /v1/devices", guarded(s, "devices", s.deviceAdd))
	mux.HandleFunc("PATCH /v1/devices/{id}", guarded(s, "devices", s.deviceUpdate))
	mux.HandleFunc("DELETE /v1/devices/{id}", guarded(s, "devices", s.deviceRemove))
	mux.HandleFunc("POST /v1/devices/{id}/bind", guarded(s, "devices", s.deviceBind))
}

// guarded is s.guard(h) with the server's Backend as T; a Backend that is
// no T answers 501 "this daemon does not manage <what>".
func guarded[T any](s *Server, what string, h func(T, http.ResponseWriter, *http.Request)) http.HandlerFunc {
	return s.guard(func(w http.ResponseWriter, r *http.Request) {
		b, ok := s.opts.Backend.(T)
		if !ok {
			writeError(w, http.StatusNotImplemented, "this daemon does not manage "+what)
			return
		}
		h(b, w, r)
	})
}

// readBody decodes a request body of at most maxDeviceBody bytes into v,
// or answers 400 "malformed <what> request".
func readBody(w http.ResponseWriter, r *http.Request, what string, v any) bool {
	dec := json.NewDecoder(io.LimitReader(r.Body, maxDeviceBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		// The decoder's message names the field, never the values.
		writeError(w, http.StatusBadRequest, "malformed "+what+" request: "+err.Error())
		return false
	}
	return true
}

// pathID fills an empty body id from the path's {id}, and answers 400 when
// they differ.
func pathID(w http.ResponseWriter, r *http.Request, id *string) bool {
	if *id == "" {
		*id = r.PathValue("id")
	}
	if *id != r.PathValue("id") {
		writeError(w, http.StatusBadRequest, "the device id of the path and of the body differ")
		return false
	}
	return true
}

// answer writes res, or err with deviceStatus.
func answer[T any](w http.ResponseWriter, res T, err error) {
	if err != nil {
		writeError(w, deviceStatus(err), err.Error())
		return
	}
	writeJSON(w, http.StatusOK, res)
}

func deviceStatus(err error) int {
	switch {
	case errors.Is(err, ErrBadRequest):
		return http.StatusBadRequest
	case errors.Is(err, ErrNotPaired):
		return http.StatusConflict
	case errors.Is(err, ErrUpstream):
		return http.StatusBadGateway
	}
	return errorStatus(err)
}

func (s *Server) deviceDone(w http.ResponseWriter, r *http.Request, what, id string, res DeviceResult, err error) {
	ev := audit.Event{Kind: audit.Kind("device_" + what), Device: id, User: peerUser(r), Port: s.opts.Socket, Detail: "done"}
	if err != nil {
		ev.Cause, ev.Detail = "failed", err.Error()
	}
	s.record(r.Context(), ev)
	answer(w, res, err)
}

func (s *Server) devicesList(db DeviceBackend, w http.ResponseWriter, r *http.Request) {
	l, err := db.ListDevices(r.Context())
	answer(w, l, err)
}

func (s *Server) deviceAdd(db DeviceBackend, w http.ResponseWriter, r *http.Request) {
	var req DeviceAddRequest
	if !readBody(w, r, "device", &req) {
		return
	}
	res, err := db.AddDevice(r.Context(), req)
	s.deviceDone(w, r, "add", req.ID, res, err)
}

func (s *Server) deviceUpdate(db DeviceBackend, w http.ResponseWriter, r *http.Request) {
	var req DeviceUpdateRequest
	if !readBody(w, r, "device", &req) {
		return
	}
	if !pathID(w, r, &req.ID) {
		return
	}
	res, err := db.UpdateDevice(r.Context(), req)
	s.deviceDone(w, r, "update", req.ID, res, err)
}

func (s *Server) deviceRemove(db DeviceBackend, w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	res, err := db.RemoveDevice(r.Context(), id, r.URL.Query().Get("broker"))
	s.deviceDone(w, r, "remove", id, res, err)
}

func (s *Server) deviceBind(db DeviceBackend, w http.ResponseWriter, r *http.Request) {
	var req DeviceBindRequest
	if !readBody(w, r, "device", &req) {
		return
	}
	if !pathID(w, r, &req.ID) {
		return
	}
	res, err := db.BindDevice(r.Context(), req)
	s.deviceDone(w, r, "bind", req.ID, res, err)
}

// deviceCall is call bounded by deviceTimeout, decoding the answer as T.
func deviceCall[T any](ctx context.Context, c *Client, method, path string, body any) (T, error) {
	ctx, cancel := context.WithTimeout(ctx, deviceTimeout)
	defer cancel()
	var res T
	err := c.call(ctx, method, path, body, &res)
	return res, err
}

// AddDevice asks the daemon to register a device.
func (c *Client) AddDevice(ctx context.Context, req DeviceAddRequest) (DeviceResult, error) {
	return deviceCall[DeviceResult](ctx, c, http.MethodPost, "/v1/devices", req)
}

// UpdateDevice asks the daemon to change a device.
func (c *Client) UpdateDevice(ctx context.Context, req DeviceUpdateRequest) (DeviceResult, error) {
	return deviceCall[DeviceResult](ctx, c, http.MethodPatch, "/v1/devices/"+url.PathEscape(req.ID), req)
}

// RemoveDevice asks the daemon to remove a device.
func (c *Client) RemoveDevice(ctx context.Context, id, broker string) (DeviceResult, error) {
	return deviceCall[DeviceResult](ctx, c, http.MethodDelete, "/v1/devices/"+url.PathEscape(id)+"?broker="+url.QueryEscape(broker), nil)
}

// BindDevice asks the daemon to record a device registered elsewhere.
func (c *Client) BindDevice(ctx context.Context, req DeviceBindRequest) (DeviceResult, error) {
	return deviceCall[DeviceResult](ctx, c, http.MethodPost, "/v1/devices/"+url.PathEscape(req.ID)+"/bind", req)
}

// ListDevices asks the daemon for the devices.
func (c *Client) ListDevices(ctx context.Context) (DeviceList, error) {
	return deviceCall[DeviceList](ctx, c, http.MethodGet, "/v1/devices", nil)
}

// WriteDeviceResult prints a DeviceResult for people.
func WriteDeviceResult(w io.Writer, res DeviceResult) {
	switch res.Action {
	case "added":
		fmt.Fprintf(w, "Registered device %s (type %s) at %s", res.ID, res.Type, res.Broker)
		if res.User != "" {
			fmt.Fprintf(w, " for %s", res.User)
		}
		fmt.Fprintln(w, ".")
	case "removed":
		fmt.Fprintf(w, "Removed device %s; the gateway stops accepting it with its next policy.\n", res.ID)
	case "bound":
		fmt.Fprintf(w, "Bound device %s (type %s) in the gateway's registry", res.ID, res.Type)
		if res.Delegated {
			fmt.Fprint(w, " (delegated to the account, not owned)")
		}
		fmt.Fprintln(w, "; the IoT directory was not changed.")
	default:
		fmt.Fprintf(w, "Updated device %s.\n", res.ID)
	}
	if res.Binding != "" {
		fmt.Fprintf(w, "  bound to     %s", res.Binding)
		if res.Gateway != "" {
			fmt.Fprintf(w, " on gateway %s", res.Gateway)
		}
		fmt.Fprintln(w)
	}
	if res.Action == "added" {
		fmt.Fprintln(w, "  keys         K1/K2 generated or taken from the environment; not shown")
	}
	if res.Signing != "" {
		fmt.Fprintf(w, "  signing      %s\n", res.Signing)
	}
	switch {
	case res.OwnershipMissing:
		fmt.Fprintf(w, "  %s ownership  %s\n", problemMark, "registered in the directory, but the platform refused its ownership row (IOTID limit?): the broker filter refuses its data until the row exists")
	case res.OwnershipChecked:
		fmt.Fprintf(w, "  ownership    row %s confirmed\n", res.ElementID)
	}
	for _, wn := range res.Warnings {
		fmt.Fprintf(w, "  %s warning   %s\n", problemMark, wn)
	}
	switch {
	case res.SyncNudged:
		fmt.Fprintln(w, "  policy       the running gateway synced its policy now")
	case res.Action != "removed":
		fmt.Fprintln(w, "  policy       in force from the gateway's next policy sync")
	}
}

// WriteDeviceList prints a DeviceList as a table.
func WriteDeviceList(w io.Writer, l DeviceList) error {
	if l.Warning != "" {
		fmt.Fprintf(w, "%s %s\n", problemMark, l.Warning)
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tTYPE\tBROKER\tRELATION\tBINDING\tPROBLEMS")
	for _, d := range l.Devices {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", d.ID, orDash(d.Type), orDash(d.Broker), d.Relation, orDash(d.Binding),
			orDash(strings.Join(d.Problems, "; ")))
	}
	return tw.Flush()
}
