package centralsync

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/edgegate/edgegate/policy"
)

// The gateway's own device registry: what stock ownership rows lack. A
// stock IOTID row carries k1, k2, contextbroker and, when the insert sent
// them, edgegateway_type/edgegateway_uri (iot-directory common.php
// insert_device); it has no entity type, and a device delegated to the
// account has no row of the account at all. The registry keeps, per
// device id, the entity type, the broker name, the local binding (radio
// or MQTT), the signing mode, the model's attribute names and, for a
// delegated device, the K1/K2 the installer gave. The policy source reads
// it through Lookup on every sync.
//
// It is one record of the encrypted store (RegistryRecord, JSON), written
// whole by PutState, which is atomic: a crash leaves the old or the new
// registry, never a mix.

// RegistryRecord is the store record holding the registry.
const RegistryRecord = "device-registry"

// Bounds of the registry: it is read whole on every sync.
const (
	MaxRegistryEntries = 4096
	maxRegistryBytes   = 4 << 20
	maxRegistryAttrs   = 64
)

// RegistryEntry is one device as the gateway knows it locally.
type RegistryEntry struct {
	ID   string `json:"id"`
	Type string `json:"type"`
	// Broker is the context broker's NAME at the IoT directory (e.g.
	// orion-1), not its URL.
	Broker string `json:"broker,omitempty"`
	// Radio binds the device to a radio node; nil with MQTT.
	Radio *policy.RadioBinding `json:"radio,omitempty"`
	MQTT  bool                 `json:"mqtt,omitempty"`
	// Signing is policy.SigningHS256 (""), SigningGateway or SigningDevice.
	Signing    string            `json:"signing,omitempty"`
	PublicKeys []json.RawMessage `json:"public_keys,omitempty"`
	// Attributes are the names the model declares.
	Attributes []string `json:"attributes,omitempty"`
	// Kind is the directory's device kind, policy.KindSensor (also "") or
	// policy.KindActuator; Writable the attributes registered editable
	// (iot-directory event_values.editable). They decide which attributes
	// the gateway takes commands for (internal/command).
	Kind     string   `json:"kind,omitempty"`
	Writable []string `json:"writable,omitempty"`
	// Delegated: registered elsewhere and delegated to the account (bound
	// with device bind), not owned.
	Delegated bool `json:"delegated,omitempty"`
	// K1, K2 of a delegated device, as the installer gave them; empty for
	// owned devices (the policy has them from the ownership row).
	K1        string    `json:"k1,omitempty"`
	K2        string    `json:"k2,omitempty"`
	UpdatedAt time.Time `json:"updated_at"`
}

// String leaves the keys out.
func (e RegistryEntry) String() string {
	return fmt.Sprintf("registry entry %s (type %s, broker %s, %s)", e.ID, e.Type, e.Broker, e.Binding())
}

// GoString keeps %#v from printing keys.
func (e RegistryEntry) GoString() string { return e.String() }

// Binding describes the local source in words.
func (e RegistryEntry) Binding() string {
	if e.Radio != nil {
		return fmt.Sprintf("radio %s node %s child %s", e.Radio.Port, anyNum(e.Radio.Node), anyNum(e.Radio.Child))
	}
	if e.MQTT {
		return "mqtt"
	}
	return ""
}

func anyNum(n int) string {
	if n < 0 {
		return "any"
	}
	return fmt.Sprint(n)
}

// Validate checks an entry before it is stored.
func (e RegistryEntry) Validate() error {
	if err := ValidateDeviceID(e.ID); err != nil {
		return err
	}
	if err := ValidateName("type", e.Type); err != nil {
		return err
	}
	if e.Broker != "" {
		if err := ValidateName("broker", e.Broker); err != nil {
			return err
		}
	}
	if e.Radio != nil {
		if e.MQTT {
			return fmt.Errorf("device %s: a radio binding and mqtt exclude each other", e.ID)
		}
		if e.Radio.Port == "" {
			return fmt.Errorf("device %s: radio binding without a port", e.ID)
		}
		if e.Radio.Node < -1 || e.Radio.Node > 254 || e.Radio.Child < -1 || e.Radio.Child > 254 {
			return fmt.Errorf("device %s: radio node and child must be in 0..254 (or -1: any)", e.ID)
		}
	}
	switch e.Signing {
	case "", policy.SigningHS256, policy.SigningGateway, policy.SigningDevice:
	default:
		return fmt.Errorf("device %s: signing %q: want hs256, gateway or device", e.ID, e.Signing)
	}
	if len(e.PublicKeys) > policy.MaxPublicKeys {
		return fmt.Errorf("device %s: more than %d public keys", e.ID, policy.MaxPublicKeys)
	}
	if len(e.Attributes) > maxRegistryAttrs {
		return fmt.Errorf("device %s: more than %d attributes", e.ID, maxRegistryAttrs)
	}
	for _, a := range e.Attributes {
		if err := ValidateName("attribute", a); err != nil {
			return fmt.Errorf("device %s: %w", e.ID, err)
		}
	}
	switch e.Kind {
	case "", policy.KindSensor, policy.KindActuator:
	default:
		return fmt.Errorf("device %s: kind %q: want sensor or actuator", e.ID, e.Kind)
	}
	if len(e.Writable) > maxRegistryAttrs {
		return fmt.Errorf("device %s: more than %d writable attributes", e.ID, maxRegistryAttrs)
	}
	for _, a := range e.Writable {
		if err := ValidateName("attribute", a); err != nil {
			return fmt.Errorf("device %s: writable: %w", e.ID, err)
		}
	}
	if (e.K1 == "") != (e.K2 == "") || (e.K1 != "" && e.K1 == e.K2) {
		return fmt.Errorf("device %s: give both K1 and K2 (different), or neither", e.ID)
	}
	return nil
}

// Registry is the gateway's device registry. Safe for concurrent use.
// It caches the record: every reader and writer of one store must share
// one Registry (the daemon makes one and hands it to the policy source and
// the device endpoints).
type Registry struct {
	st StateStore
	mu sync.RWMutex
	// m is the registry as last read or written; nil until loaded.
	m map[string]RegistryEntry
}

// NewRegistry is the registry kept in st.
func NewRegistry(st StateStore) *Registry { return &Registry{st: st} }

type registryDoc struct {
	V       int             `json:"v"`
	Devices []RegistryEntry `json:"devices"`
}

// load reads the record once; the caller holds mu for writing.
func (r *Registry) loadLocked() error {
	if r.m != nil {
		return nil
	}
	b, ok, err := r.st.GetState(RegistryRecord)
	if err != nil {
		return fmt.Errorf("read the device registry: %w", err)
	}
	m := map[string]RegistryEntry{}
	if ok {
		if len(b) > maxRegistryBytes {
			return fmt.Errorf("the device registry record is %d bytes, over its %d limit", len(b), maxRegistryBytes)
		}
		var doc registryDoc
		if err := json.Unmarshal(b, &doc); err != nil {
			return fmt.Errorf("the device registry record is not valid JSON: %w", err)
		}
		for _, e := range doc.Devices {
			m[e.ID] = e
		}
	}
	r.m = m
	return nil
}

func (r *Registry) ensureLoaded() error {
	r.mu.RLock()
	loaded := r.m != nil
	r.mu.RUnlock()
	if loaded {
		return nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.loadLocked()
}

// saveLocked writes m as the new registry and makes it current only once
// stored.
func (r *Registry) saveLocked(m map[string]RegistryEntry) error {
	doc := registryDoc{V: 1, Devices: make([]RegistryEntry, 0, len(m))}
	for _, e := range m {
		doc.Devices = append(doc.Devices, e)
	}
	slices.SortFunc(doc.Devices, func(a, b RegistryEntry) int { return strings.Compare(a.ID, b.ID) })
	b, err := json.Marshal(doc)
	if err != nil {
		return err
	}
	if len(b) > maxRegistryBytes {
		return fmt.Errorf("the device registry would be %d bytes, over its %d limit", len(b), maxRegistryBytes)
	}
	if err := r.st.PutState(RegistryRecord, b); err != nil {
		return fmt.Errorf("write the device registry: %w", err)
	}
	r.m = m
	return nil
}

// Put adds or replaces the entry of e.ID.
func (r *Registry) Put(ctx context.Context, e RegistryEntry) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := e.Validate(); err != nil {
		return err
	}
	e = cloneEntry(e) // the caller keeps its own copy
	if e.UpdatedAt.IsZero() {
		e.UpdatedAt = time.Now().UTC()
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if err := r.loadLocked(); err != nil {
		return err
	}
	if _, ok := r.m[e.ID]; !ok && len(r.m) >= MaxRegistryEntries {
		return fmt.Errorf("the device registry is full (%d devices)", MaxRegistryEntries)
	}
	m := make(map[string]RegistryEntry, len(r.m)+1)
	for k, v := range r.m {
		m[k] = v
	}
	m[e.ID] = e
	return r.saveLocked(m)
}

// Delete forgets a device; found says whether it was there.
func (r *Registry) Delete(id string) (found bool, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if err := r.loadLocked(); err != nil {
		return false, err
	}
	if _, ok := r.m[id]; !ok {
		return false, nil
	}
	m := make(map[string]RegistryEntry, len(r.m))
	for k, v := range r.m {
		if k != id {
			m[k] = v
		}
	}
	return true, r.saveLocked(m)
}

// Get is the entry of id.
func (r *Registry) Get(id string) (RegistryEntry, bool, error) {
	if err := r.ensureLoaded(); err != nil {
		return RegistryEntry{}, false, err
	}
	r.mu.RLock()
	defer r.mu.RUnlock()
	e, ok := r.m[id]
	return cloneEntry(e), ok, nil
}

// List is every entry, by id.
func (r *Registry) List() ([]RegistryEntry, error) {
	if err := r.ensureLoaded(); err != nil {
		return nil, err
	}
	r.mu.RLock()
	defer r.mu.RUnlock()
	out := make([]RegistryEntry, 0, len(r.m))
	for _, e := range r.m {
		out = append(out, cloneEntry(e))
	}
	slices.SortFunc(out, func(a, b RegistryEntry) int { return strings.Compare(a.ID, b.ID) })
	return out, nil
}

// Lookup is what the policy source needs of a device: ID, Type, Radio,
// Signing, PublicKeys, K1, K2, Kind, Writable. Broker is left empty (the entry's broker
// is a directory name, not the URL Registration.Broker holds). A registry
// that cannot be read answers false: the policy then treats the device as
// it would without a registry.
func (r *Registry) Lookup(id string) (policy.Registration, bool) {
	e, ok, err := r.Get(id)
	if err != nil || !ok {
		return policy.Registration{}, false
	}
	reg := policy.Registration{ID: e.ID, Type: e.Type, Signing: e.Signing, K1: e.K1, K2: e.K2, PublicKeys: e.PublicKeys,
		Kind: e.Kind, Writable: slices.Clone(e.Writable)}
	if e.Radio != nil {
		rb := *e.Radio
		reg.Radio = &rb
	}
	return reg, true
}

func cloneEntry(e RegistryEntry) RegistryEntry {
	if e.Radio != nil {
		rb := *e.Radio
		e.Radio = &rb
	}
	e.Attributes = slices.Clone(e.Attributes)
	e.Writable = slices.Clone(e.Writable)
	if e.PublicKeys != nil {
		keys := make([]json.RawMessage, len(e.PublicKeys))
		for i, k := range e.PublicKeys {
			keys[i] = slices.Clone(k)
		}
		e.PublicKeys = keys
	}
	return e
}
