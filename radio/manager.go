package radio

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/edgegate/edgegate/internal/logx"
	"github.com/edgegate/edgegate/internal/metrics"
	"github.com/edgegate/edgegate/internal/pipeline"
)

// Submitter is what a radio port needs of the pipeline.
type Submitter interface {
	Submit(ctx context.Context, msg pipeline.Message) (pipeline.Outcome, error)
}

// Binder maps a radio source to the registered device bound to it. child
// -1 asks for a binding of the whole node (any child).
type Binder interface {
	BindRadio(port string, node, child int) (device string, ok bool)
}

// DeviceBinder is an optional capability of a Binder, used by JSON-lines
// ports: the port a registered device is bound to. Without it a JSON-lines
// port accepts only the one device BindRadio(port, -1, -1) names.
type DeviceBinder interface {
	RadioPort(device string) (port string, ok bool)
}

// NodeBinder is an optional capability of a Binder (policy.Engine has it):
// the ports on which a MySensors node id is bound to a device. With it,
// I_ID_REQUEST never hands out a bound id, and a frame from a bound node
// id heard on a port it is not bound on is refused (ReasonNodeOtherPort)
// instead of being taken for another device or a new node.
type NodeBinder interface {
	RadioNodePorts(node int) []string
}

// Codec names.
const (
	CodecMySensors = "mysensors"
	CodecJSONLines = "jsonlines"
)

// Refusal reasons (metric label values) of the radio link.
const (
	ReasonUnbound  = "unbound_node"
	ReasonBadFrame = "bad_frame"
	// ReasonNodeOtherPort: a frame from a node id the policy binds to a
	// device on a different port. A node that takes (or is flashed with)
	// a bound id on another radio network must not speak as that device.
	ReasonNodeOtherPort = "node_bound_other_port"
)

// PortConfig configures one serial port.
type PortConfig struct {
	Path  string // e.g. /dev/ttyUSB0 or /dev/serial/by-id/...
	Baud  int    // default 115200 (the MySensors serial gateway's)
	Codec string // CodecMySensors or CodecJSONLines
	// ReadTimeout bounds one read (default 500ms; 100ms..25.5s, the
	// termios VTIME range), and so how long shutdown waits for a port.
	ReadTimeout time.Duration
}

// Options configures a Manager.
type Options struct {
	// StateDir holds persisted controller state (MySensors node ids),
	// written atomically. Empty keeps it in memory only.
	StateDir string
	Logger   *slog.Logger
	// Metrics may be nil. The radio counts Refused{reason=unbound_node,
	// bad_frame, node_bound_other_port}; Ingested is counted by the
	// pipeline when it queues.
	Metrics *metrics.Metrics
	// OnRefusal, when set, is told of every frame refused as an identity
	// problem (ReasonNodeOtherPort), for the audit log. node is "N" or
	// "N/C"; bound is the port the node id is bound on.
	OnRefusal func(reason, port, node, bound string)
	Now       func() time.Time
	// MinBackoff and MaxBackoff bound the jittered waits between reopen
	// attempts and between Submit retries (defaults 500ms and 30s).
	MinBackoff, MaxBackoff time.Duration
	// CloseTimeout bounds closing a port (default 2s): a tty's close may
	// wait for its output to drain.
	CloseTimeout time.Duration
}

// ChildInfo is one child sensor a MySensors node presented.
type ChildInfo struct {
	ID          int    `json:"id"`
	Type        int    `json:"type"` // S_ type number
	Description string `json:"description,omitempty"`
}

// PendingNode is a node (MySensors) or device (JSON lines) heard on a port
// but bound to no registered device: what an installer registers next.
type PendingNode struct {
	Port          string      `json:"port"`
	Node          int         `json:"node"`             // -1 for JSON lines
	Device        string      `json:"device,omitempty"` // JSON lines: the id the line named
	Children      []ChildInfo `json:"children,omitempty"`
	Sketch        string      `json:"sketch,omitempty"`
	SketchVersion string      `json:"sketch_version,omitempty"`
	Battery       int         `json:"battery"` // percent; -1 unknown
	LastSeen      time.Time   `json:"last_seen"`
}

// PortStatus is the state and counters of one port.
type PortStatus struct {
	Path        string    `json:"path"`
	Codec       string    `json:"codec"`
	Open        bool      `json:"open"`
	OpenedAt    time.Time `json:"opened_at,omitzero"`
	LastError   string    `json:"last_error,omitempty"`
	LastErrorAt time.Time `json:"last_error_at,omitzero"`
	FramesOK    uint64    `json:"frames_ok"`  // well-formed frames, whatever they were
	FramesBad   uint64    `json:"frames_bad"` // counted and skipped
	Reconnects  uint64    `json:"reconnects"` // successful reopens after the first open
	Submitted   uint64    `json:"submitted"`  // readings the pipeline queued
	Refused     uint64    `json:"refused"`    // unbound, or refused by the pipeline
	Duplicates  uint64    `json:"duplicates"` // JSON lines repeating the previous seq
	Echoes      uint64    `json:"echoes"`     // MySensors ack=1 lines
	Dropped     uint64    `json:"dropped"`    // readings not queued at shutdown
	RepliesLost uint64    `json:"replies_lost"`
}

// Manager runs the radio ports.
type Manager struct {
	ports []*port
	log   *slog.Logger

	mu      sync.Mutex
	running bool
}

var bauds = []int{50, 75, 110, 134, 150, 200, 300, 600, 1200, 1800, 2400, 4800, 9600, 19200, 38400,
	57600, 115200, 230400, 460800, 500000, 576000, 921600, 1000000, 1152000, 1500000, 2000000,
	2500000, 3000000, 3500000, 4000000}

// NewManager validates the configuration and loads the persisted state. It
// opens no port: Run does, and keeps retrying the ones that are missing.
func NewManager(ports []PortConfig, sub Submitter, bind Binder, opts Options) (*Manager, error) {
	if sub == nil || bind == nil {
		return nil, errors.New("radio: a Submitter and a Binder are required")
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With("component", "radio")
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.MinBackoff <= 0 {
		opts.MinBackoff = 500 * time.Millisecond
	}
	if opts.MaxBackoff < opts.MinBackoff {
		opts.MaxBackoff = max(30*time.Second, opts.MinBackoff)
	}
	if opts.CloseTimeout <= 0 {
		opts.CloseTimeout = 2 * time.Second
	}
	ids, err := loadNodeIDs(opts.StateDir)
	if err != nil {
		return nil, err
	}
	m := &Manager{log: log}
	limited := logx.NewLimiter(log, 30*time.Second)
	seen := map[string]bool{}
	for i, pc := range ports {
		if pc.Path == "" {
			return nil, fmt.Errorf("radio.ports[%d].path is empty", i)
		}
		if seen[pc.Path] {
			return nil, fmt.Errorf("radio.ports[%d].path %q is listed twice", i, pc.Path)
		}
		seen[pc.Path] = true
		if pc.Baud == 0 {
			pc.Baud = 115200
		}
		if !slices.Contains(bauds, pc.Baud) {
			return nil, fmt.Errorf("radio.ports[%d].baud is not a supported rate: %d", i, pc.Baud)
		}
		switch pc.Codec {
		case "":
			pc.Codec = CodecMySensors
		case CodecMySensors, CodecJSONLines:
		default:
			return nil, fmt.Errorf("radio.ports[%d].codec must be %q or %q: %q", i, CodecMySensors, CodecJSONLines, pc.Codec)
		}
		if pc.ReadTimeout == 0 {
			pc.ReadTimeout = 500 * time.Millisecond
		}
		if pc.ReadTimeout < 100*time.Millisecond || pc.ReadTimeout > 25500*time.Millisecond {
			return nil, fmt.Errorf("radio.ports[%d].read_timeout must be in 100ms..25.5s: %s", i, pc.ReadTimeout)
		}
		m.ports = append(m.ports, newPort(pc, sub, bind, ids, opts, log.With("port", pc.Path), limited))
	}
	return m, nil
}

// Run serves every port, each on its own goroutine, until ctx is done. A
// port that cannot be opened or goes away is retried with backoff and never
// holds up another. Run returns nil once every port has stopped, which
// takes at most about a ReadTimeout plus twice the CloseTimeout.
func (m *Manager) Run(ctx context.Context) error {
	m.mu.Lock()
	if m.running {
		m.mu.Unlock()
		return errors.New("radio: Run called twice")
	}
	m.running = true
	m.mu.Unlock()
	var wg sync.WaitGroup
	for _, p := range m.ports {
		wg.Go(func() { p.run(ctx) })
	}
	wg.Wait()
	return nil
}

// Pending lists the nodes and devices heard on the ports but bound to no
// registered device, by port and node.
func (m *Manager) Pending() []PendingNode {
	var out []PendingNode
	for _, p := range m.ports {
		out = append(out, p.pending()...)
	}
	return out
}

// Ports reports the state of every port, in configuration order.
func (m *Manager) Ports() []PortStatus {
	out := make([]PortStatus, 0, len(m.ports))
	for _, p := range m.ports {
		out = append(out, p.status())
	}
	return out
}
