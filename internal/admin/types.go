// Package admin is the local administration API of the daemon: HTTP/JSON
// over a unix socket (never a network port), with every request's peer
// checked by its kernel credentials (SO_PEERCRED, SO_PEERGROUPS). The
// daemon implements Backend and runs a Server; the edgegate CLI (status,
// doctor, data, factory-reset) uses a Client.
//
// The types here are the API's own, plain JSON structs: the daemon fills
// them from its stages, so this package imports none of them (it imports
// only audit, to record denials and data-rights actions).
//
// Endpoints (all JSON; errors are {"error": "..."} with a 4xx/5xx status):
//
//	GET  /v1/status          Status
//	POST /v1/export          body Selector; response NDJSON, one record a line;
//	                         the ExportReport (or the error) in the trailer
//	                         Edgegate-Export-Report (Edgegate-Export-Error)
//	POST /v1/erase           body Selector; EraseReport
//	POST /v1/factory-reset   {"confirm": "factory-reset"}; {}
//	POST /v1/reload          {}
//	/v1/devices...           device registration (see devices.go)
package admin

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"
)

// DefaultSocket is where the daemon listens; /run/edgegate is the unit's
// RuntimeDirectory.
const DefaultSocket = "/run/edgegate/admin.sock"

// Group is the group whose members may use the socket (besides root and
// the daemon's own user).
const Group = "edgegate"

// Backend is what the server needs from the daemon.
type Backend interface {
	Status(ctx context.Context) Status
	// Export writes every record held for the selected device(s) to w,
	// one JSON object per line (NDJSON).
	Export(ctx context.Context, sel Selector, w io.Writer) (ExportReport, error)
	Erase(ctx context.Context, sel Selector) (EraseReport, error)
	FactoryReset(ctx context.Context) error
	Reload(ctx context.Context) error
}

// Selector picks the data of one device, or of every device of one owner.
// Exactly one field is set.
type Selector struct {
	Device string `json:"device,omitempty"`
	Owner  string `json:"owner,omitempty"`
}

// ErrBadSelector: not exactly one of Device and Owner, or a malformed one.
var ErrBadSelector = errors.New("select exactly one of --device ID or --owner USER")

// Validate checks that exactly one field is set and well formed
// ([A-Za-z0-9._-] for a device, plus @ and + for an owner, 1-256 bytes).
func (s Selector) Validate() error {
	switch {
	case (s.Device == "") == (s.Owner == ""):
		return ErrBadSelector
	case s.Device != "" && !validName(s.Device, ""):
		return fmt.Errorf("device id %q: only letters, digits, '.', '_' and '-': %w", s.Device, ErrBadSelector)
	case s.Owner != "" && !validName(s.Owner, "@+"):
		return fmt.Errorf("owner %q: only letters, digits, '.', '_', '-', '@' and '+': %w", s.Owner, ErrBadSelector)
	}
	return nil
}

// String is "device ID" or "owner USER".
func (s Selector) String() string {
	if s.Device != "" {
		return "device " + s.Device
	}
	return "owner " + s.Owner
}

func validName(s, extra string) bool {
	if s == "" || len(s) > 256 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '.', c == '_', c == '-':
		case strings.IndexByte(extra, c) >= 0:
		default:
			return false
		}
	}
	return true
}

// Status is what `edgegate status` shows.
type Status struct {
	GatewayID string `json:"gateway_id"`
	Version   string `json:"version"`
	// IdentityThumbprint is the RFC 7638 thumbprint of the gateway's key.
	IdentityThumbprint string `json:"identity_thumbprint,omitempty"`
	Paired             bool   `json:"paired"`
	// Now is the daemon's clock when it answered; ages are relative to it.
	Now time.Time `json:"now"`
	// NotReady names what the daemon still waits for before it is ready
	// (an ingest subscription, the broker's accounts); empty once ready.
	NotReady     string         `json:"not_ready,omitempty"`
	Policy       PolicyStatus   `json:"policy"`
	Stages       []StageStatus  `json:"stages"`
	Queue        QueueStatus    `json:"queue"`
	Devices      []DeviceStatus `json:"devices"`
	PendingNodes []RadioNode    `json:"pending_radio_nodes"`
	// Commands is the downlink (docs/actuators.md); Enabled false when
	// commands.enabled is off.
	Commands CommandsStatus `json:"commands"`
	// Modbus lists the slaves of radio.modbus, in configuration order.
	Modbus []ModbusStatus `json:"modbus,omitempty"`
}

// CommandsStatus counts the commands held now, by state, and what the
// service did since the daemon started.
type CommandsStatus struct {
	Enabled bool `json:"enabled"`
	// The records held, by state (pending, sent, delivered, confirmed,
	// expired, dropped); the newest command of each device attribute.
	Pending   int `json:"pending"`
	Sent      int `json:"sent"`
	Delivered int `json:"delivered"`
	Confirmed int `json:"confirmed"`
	Expired   int `json:"expired"`
	Dropped   int `json:"dropped"`
	// Since the daemon started.
	Learned    uint64 `json:"learned"`
	SendErrors uint64 `json:"send_errors"`
	PollErrors uint64 `json:"poll_errors"`
	// Learning says how commands are learned: polling, or Orion
	// subscriptions live for some devices (and why not for the others).
	Learning string `json:"learning,omitempty"`
	// Error is set when the records could not be read.
	Error string `json:"error,omitempty"`
}

// ModbusStatus is one Modbus slave: its polls and errors since start.
type ModbusStatus struct {
	Device string `json:"device"`
	Line   string `json:"line"`
	Unit   int    `json:"unit"`
	Polls  uint64 `json:"polls"`
	Writes uint64 `json:"writes"`
	// Errors by cause: timeout, crc, exception, frame, io, dropped.
	Errors    map[string]uint64 `json:"errors,omitempty"`
	LastOK    time.Time         `json:"last_ok,omitzero"`
	LastError string            `json:"last_error,omitempty"`
}

// PolicyStatus describes the ownership policy in force.
type PolicyStatus struct {
	Version   uint64    `json:"version"`
	Source    string    `json:"source"` // config, pull, push, cache
	AppliedAt time.Time `json:"applied_at,omitzero"`
	ExpiresAt time.Time `json:"expires_at,omitzero"`
	// AgeSeconds is Now - AppliedAt (filled by the server when zero).
	AgeSeconds  float64  `json:"age_seconds"`
	LastRefusal *Refusal `json:"last_refusal,omitempty"`
	// Unusable are devices the platform gives the gateway's account that
	// are not served until the gateway's registry completes them.
	Unusable []UnusableDevice `json:"unusable,omitempty"`
}

// UnusableDevice is a device left out of the policy for want of something
// only the installer can supply (an entity type, delegated K1/K2).
type UnusableDevice struct {
	ID      string   `json:"id"`
	Missing []string `json:"missing"`
	Fix     string   `json:"fix"` // the command that supplies it
}

// Refusal is a policy bundle that was refused.
type Refusal struct {
	At      time.Time `json:"at"`
	Reason  string    `json:"reason"` // bad_signature, rollback, expired, ...
	Version uint64    `json:"version,omitempty"`
}

// StageStatus is one part of the daemon: radio ports, the local broker,
// the central connection, the access token, the uplink.
type StageStatus struct {
	Name    string `json:"name"`
	Healthy bool   `json:"healthy"`
	Detail  string `json:"detail,omitempty"`
	// Expires is set for things that expire (the access token).
	Expires time.Time `json:"expires,omitzero"`
}

// QueueStatus describes the durable queue.
type QueueStatus struct {
	Depth       int           `json:"depth"`
	Brokers     []BrokerQueue `json:"brokers"`
	DeadLetters int           `json:"dead_letters"`
	DiskBytes   int64         `json:"disk_bytes"`
	QuotaBytes  int64         `json:"quota_bytes"`
}

// BrokerQueue is the backlog for one broker.
type BrokerQueue struct {
	Broker string    `json:"broker"`
	Depth  int       `json:"depth"`
	Bytes  int64     `json:"bytes"`
	Oldest time.Time `json:"oldest,omitzero"`
	// OldestAgeSeconds is Now - Oldest (filled by the server when zero).
	OldestAgeSeconds float64 `json:"oldest_age_seconds"`
}

// DeviceStatus is one registered device.
type DeviceStatus struct {
	ID       string    `json:"id"`
	Owner    string    `json:"owner"`
	LastSeen time.Time `json:"last_seen,omitzero"`
	Ingested uint64    `json:"ingested"`
	Refused  uint64    `json:"refused"`
	// MissingAttrs: attributes the device sends that its entity at the
	// broker lacks (Orion 422 PartialUpdate/Unprocessable): not stored
	// until they are added to the device's model.
	MissingAttrs []string `json:"missing_attributes,omitempty"`
}

// RadioNode is a radio node heard on a port but bound to no device yet.
type RadioNode struct {
	Port     string    `json:"port"`
	Node     int       `json:"node"`
	Children []int     `json:"children,omitempty"`
	Sketch   string    `json:"sketch,omitempty"`
	LastSeen time.Time `json:"last_seen,omitzero"`
}

// ExportReport says what an export wrote.
type ExportReport struct {
	Selector Selector `json:"selector"`
	Devices  []string `json:"devices"`
	Records  int      `json:"records"`
}

// EraseReport says what an erasure removed.
type EraseReport struct {
	Selector Selector        `json:"selector"`
	Devices  []DeviceErasure `json:"devices"`
}

// DeviceErasure is what was erased for one device.
type DeviceErasure struct {
	Device      string `json:"device"`
	Queued      int    `json:"queued"`
	DeadLetters int    `json:"dead_letters"`
	// Unsealed: records written before per-device keys, deleted without
	// the shredding guarantee.
	Unsealed     int  `json:"unsealed,omitempty"`
	KeyDestroyed bool `json:"key_destroyed"`
	Compacted    bool `json:"compacted"`
}

// fill computes the derived fields from Now.
func (s *Status) fill() {
	if s.Now.IsZero() {
		s.Now = time.Now()
	}
	if s.Policy.AgeSeconds == 0 && !s.Policy.AppliedAt.IsZero() {
		s.Policy.AgeSeconds = s.Now.Sub(s.Policy.AppliedAt).Seconds()
	}
	for i := range s.Queue.Brokers {
		b := &s.Queue.Brokers[i]
		if b.OldestAgeSeconds == 0 && !b.Oldest.IsZero() {
			b.OldestAgeSeconds = s.Now.Sub(b.Oldest).Seconds()
		}
	}
}
