// Package policy holds the ownership policy the gateway enforces — which
// devices exist, who owns them, where their data goes — and the decisions
// taken on it. A Policy is immutable once built; the Engine swaps the one in
// force atomically, so a decision on the hot path is one map lookup with no
// lock.
//
// Today the policy is built from the devices of the configuration file; the
// signed, versioned bundles synced from the central service replace that
// source without changing the decisions' interface.
package policy

import (
	"fmt"
	"sync/atomic"

	"github.com/edgegate/edgegate/envelope"
)

// Device is a registered device as the gateway knows it.
type Device struct {
	ID          string
	Type        string
	Owner       string
	Broker      string // base URI of the broker (filter) its data goes to
	Service     string // optional Fiware-Service
	ServicePath string // optional Fiware-ServicePath

	k1, k2 string
	key    envelope.Key
}

// Key is the device's reading-signing key.
func (d *Device) Key() envelope.Key { return d.key }

// String never shows the device keys.
func (d *Device) String() string {
	return fmt.Sprintf("device %s (type %s, owner %s)", d.ID, d.Type, d.Owner)
}

// Registration is what a source of policy provides for one device.
type Registration struct {
	ID, Type, Owner, Broker, Service, ServicePath string
	K1, K2                                        string
}

// Policy is one immutable version of the ownership policy.
type Policy struct {
	Version uint64
	Source  string // where it came from, for status and logs
	devices map[string]*Device
}

// New builds a policy and derives every device's signing key once.
func New(version uint64, source string, regs []Registration) (*Policy, error) {
	p := &Policy{Version: version, Source: source, devices: make(map[string]*Device, len(regs))}
	for _, r := range regs {
		if _, dup := p.devices[r.ID]; dup {
			return nil, fmt.Errorf("build policy: device %q registered twice", r.ID)
		}
		key, err := envelope.DeriveHS256(r.ID, r.K1, r.K2)
		if err != nil {
			return nil, fmt.Errorf("build policy: device %q: %w", r.ID, err)
		}
		p.devices[r.ID] = &Device{
			ID: r.ID, Type: r.Type, Owner: r.Owner, Broker: r.Broker,
			Service: r.Service, ServicePath: r.ServicePath,
			k1: r.K1, k2: r.K2, key: key,
		}
	}
	return p, nil
}

// Len is the number of registered devices.
func (p *Policy) Len() int { return len(p.devices) }

// Device looks a device up.
func (p *Policy) Device(id string) (*Device, bool) {
	d, ok := p.devices[id]
	return d, ok
}

// Reasons for refusal, also the values of the "reason" metric label.
const (
	ReasonUnknownDevice = "unknown_device"
)

// Decision is the answer to "may this reading be accepted?".
type Decision struct {
	Allow  bool
	Reason string  // set when !Allow
	Device *Device // set when Allow
}

// Engine holds the policy in force.
type Engine struct {
	cur atomic.Pointer[Policy]
}

// NewEngine starts with p in force.
func NewEngine(p *Policy) *Engine {
	e := &Engine{}
	e.cur.Store(p)
	return e
}

// Current is the policy in force.
func (e *Engine) Current() *Policy { return e.cur.Load() }

// Apply puts p in force.
func (e *Engine) Apply(p *Policy) { e.cur.Store(p) }

// DecideIngest decides whether a reading of the device may be accepted.
func (e *Engine) DecideIngest(device string) Decision {
	d, ok := e.cur.Load().devices[device]
	if !ok {
		return Decision{Reason: ReasonUnknownDevice}
	}
	return Decision{Allow: true, Device: d}
}

// DeviceKeys returns K1/K2 of a registered device, for brokers that still
// check them as query parameters.
func (e *Engine) DeviceKeys(device string) (k1, k2 string, ok bool) {
	d, ok := e.cur.Load().devices[device]
	if !ok {
		return "", "", false
	}
	return d.k1, d.k2, true
}
