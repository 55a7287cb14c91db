package centralsim

import (
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sort"
	"strings"
	"time"
)

// Verdicts of the signature check on an accepted update.
const (
	VerdictValid     = "valid"
	VerdictTampered  = "tampered"
	VerdictWrongKey  = "wrong key"
	VerdictMalformed = "malformed"
	VerdictUnsigned  = "unsigned"
	// VerdictNoKey: the device has no K1/K2, so nothing can be verified.
	VerdictNoKey = "no key"
)

// Update is one PATCH the broker accepted (204).
type Update struct {
	Device    string                     `json:"device"`
	User      string                     `json:"user"`
	Gateway   string                     `json:"gateway,omitempty"` // from the verified claims
	Seq       uint64                     `json:"seq,omitempty"`     // from the verified claims
	KeyID     string                     `json:"kid,omitempty"`     // the key that verified
	Alg       string                     `json:"alg,omitempty"`     // its algorithm
	Attrs     map[string]json.RawMessage `json:"attrs"`             // as received
	Verdict   string                     `json:"verdict"`
	Detail    string                     `json:"detail,omitempty"` // why the verdict is not "valid"
	Duplicate bool                       `json:"duplicate"`        // (device, seq) seen before with a valid signature
	Time      time.Time                  `json:"time"`
}

// Refusal is one request the broker filter (or an injected fault, or the
// token endpoint under a fault) answered with an error. It never holds
// tokens or keys.
type Refusal struct {
	Method  string    `json:"method"`
	Path    string    `json:"path"` // without the query, which may carry k1/k2
	Device  string    `json:"device,omitempty"`
	User    string    `json:"user,omitempty"`
	Status  int       `json:"status"` // 0: connection closed without a response
	Message string    `json:"message"`
	Fault   bool      `json:"fault"` // caused by an injected fault
	Time    time.Time `json:"time"`
}

type seenKey struct {
	device string
	seq    uint64
}

// entity is an NGSI v2 entity in normalized form (orion.go).
type entity struct {
	id, typ     string
	servicePath string // Fiware-ServicePath it was created in
	attrs       map[string]ngsiAttr
}

type ngsiAttr struct {
	Type string `json:"type"`
	// Value is kept as sent (numbers exactly as written, as Orion
	// returns them) and parsed by nobody: decoding every value cost the
	// simulator more than verifying the reading's signature.
	Value    json.RawMessage            `json:"value"`
	Metadata map[string]json.RawMessage `json:"metadata"`
}

func (e *entity) normalized() map[string]any {
	out := make(map[string]any, len(e.attrs)+2)
	for name, a := range e.attrs {
		md := a.Metadata
		if md == nil {
			md = map[string]json.RawMessage{}
		}
		out[name] = ngsiAttr{Type: a.Type, Value: a.Value, Metadata: md}
	}
	out["id"], out["type"] = e.id, e.typ
	return out
}

func validDevice(d Device) error {
	switch {
	case d.ID == "":
		return errors.New("id is empty")
	case d.Type == "":
		return errors.New("type is empty")
	case d.Owner == "":
		return errors.New("owner is empty")
	case (d.K1 == "") != (d.K2 == ""):
		return errors.New("k1 and k2 must be both set or both empty")
	}
	if _, err := deviceVerifyKeys(d); err != nil {
		return err
	}
	for _, a := range d.Attrs {
		if a == "" || a == "id" || a == "type" {
			return fmt.Errorf("attrs: invalid attribute name %q", a)
		}
	}
	if b := d.Radio; b != nil && (b.Port == "" || b.Node < -1 || b.Node > 254 || b.Child < -1 || b.Child > 254) {
		return fmt.Errorf("radio: port must be set, node and child in -1..254: %+v", *b)
	}
	return nil
}

func validDelegation(dl Delegation) error {
	switch {
	case dl.Device == "":
		return errors.New("device is empty")
	case dl.User == "" && dl.Group == "":
		return errors.New("user and group are both empty")
	case dl.User != "" && dl.Group != "":
		return errors.New("user and group are both set: a delegation has one target")
	}
	switch dl.Kind {
	case KindReadAccess, KindReadWrite, KindWriteOnly, KindModify:
		return nil
	}
	return fmt.Errorf("kind must be one of %s, %s, %s, %s: %q", KindReadAccess, KindReadWrite, KindWriteOnly, KindModify, dl.Kind)
}

// addDeviceLocked registers d and, like the IoT Directory's insert,
// creates its entity in the default tenant with latitude, longitude and
// every model attribute (createEntityLocked), unless it exists.
func (s *Server) addDeviceLocked(d Device) {
	d.Attrs = slices.Clone(d.Attrs)
	d.PublicKeys = slices.Clone(d.PublicKeys)
	if d.Radio != nil {
		r := *d.Radio
		d.Radio = &r
	}
	s.devices[d.ID] = d
	s.noteRegistrationLocked(d)
	if e, ok := s.entities[entKey("", d.ID)]; ok && e.typ == d.Type {
		// Re-registered: newly declared attributes join the entity, the
		// values written so far stay.
		for _, a := range d.Attrs {
			if _, has := e.attrs[a]; !has {
				e.attrs[a] = ngsiAttr{Type: typeText, Value: json.RawMessage(`""`)}
			}
		}
		return
	}
	attrs := make(map[string]string, len(d.Attrs))
	for _, a := range d.Attrs {
		attrs[a] = typeText
	}
	s.createEntityLocked("", d.ID, d.Type, attrs)
}

// AddDevice registers a device (replacing one with the same id) and creates
// its entity if missing. An invalid device is logged and ignored; use
// AddDeviceChecked to get the error.
func (s *Server) AddDevice(d Device) {
	if err := s.AddDeviceChecked(d); err != nil {
		s.log.Warn("add device refused", "device", d.ID, "err", err)
	}
}

// AddDeviceChecked is AddDevice that reports an invalid device.
func (s *Server) AddDeviceChecked(d Device) error {
	if err := validDevice(d); err != nil {
		return fmt.Errorf("add device: %w", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.addDeviceLocked(d)
	return nil
}

// RemoveDevice deletes the device's registration, its entity and its
// delegations, as the IoT Directory does on deletion.
func (s *Server) RemoveDevice(id string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.devices[id]; ok {
		s.noteRemovalLocked(id)
	}
	delete(s.devices, id)
	delete(s.entities, entKey("", id))
	s.delegs = slices.DeleteFunc(s.delegs, func(d Delegation) bool { return d.Device == id })
	s.noteDelegationsLocked()
}

// RemoveEntity deletes only the entity in the broker (default tenant),
// keeping ownership: the filter then lets requests through and Orion
// answers 404.
func (s *Server) RemoveEntity(id string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.entities, entKey("", id))
}

// CreateEntity creates (or replaces) an entity in tenant service ("" =
// default) as the IoT Directory's insert does: latitude, longitude and
// attrs (name to type), every value "".
func (s *Server) CreateEntity(service, id, typ string, attrs map[string]string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.createEntityLocked(strings.ToLower(service), id, typ, attrs)
}

// SetDelegations replaces every delegation. Invalid ones are logged and
// dropped.
func (s *Server) SetDelegations(ds []Delegation) {
	keep := make([]Delegation, 0, len(ds))
	for i, d := range ds {
		if err := validDelegation(d); err != nil {
			s.log.Warn("delegation refused", "index", i, "err", err)
			continue
		}
		keep = append(keep, d)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.delegs = keep
	s.noteDelegationsLocked()
}

// Entity returns the entity of the default tenant in NGSI v2 normalized
// form (a copy).
func (s *Server) Entity(id string) (map[string]any, bool) {
	return s.TenantEntity("", id)
}

// TenantEntity is Entity in tenant service (Fiware-Service).
func (s *Server) TenantEntity(service, id string) (map[string]any, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	e, ok := s.entities[entKey(strings.ToLower(service), id)]
	if !ok {
		return nil, false
	}
	// Round-trip so the caller gets plain JSON values, shared with nothing.
	b, err := json.Marshal(e.normalized())
	if err != nil {
		return nil, false
	}
	var out map[string]any
	if json.Unmarshal(b, &out) != nil {
		return nil, false
	}
	return out, true
}

// Updates returns a copy of the accepted updates, oldest first.
func (s *Server) Updates() []Update {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]Update, len(s.updates))
	for i, u := range s.updates {
		u.Attrs = maps.Clone(u.Attrs)
		out[i] = u
	}
	return out
}

// Refusals returns a copy of the refused requests, oldest first.
func (s *Server) Refusals() []Refusal {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.refusals)
}

// Summary counts updates per device and verdict, and refusals per status.
type Summary struct {
	Updates  int                       `json:"updates"`
	Devices  map[string]map[string]int `json:"devices"`
	Refusals map[string]int            `json:"refusals"` // by status code; "0" = connection closed
	Fault    *Fault                    `json:"fault,omitempty"`
}

// Summary reports counts for ops and tests.
func (s *Server) Summary() Summary {
	s.mu.Lock()
	defer s.mu.Unlock()
	sum := Summary{Updates: len(s.updates), Devices: map[string]map[string]int{}, Refusals: map[string]int{}}
	for _, u := range s.updates {
		if sum.Devices[u.Device] == nil {
			sum.Devices[u.Device] = map[string]int{}
		}
		sum.Devices[u.Device][u.Verdict]++
	}
	for _, r := range s.refusals {
		sum.Refusals[fmt.Sprint(r.Status)]++
	}
	if s.fault != nil {
		f := *s.fault
		sum.Fault = &f
	}
	return sum
}

func (s *Server) refuse(r Refusal) {
	r.Time = s.now()
	s.mu.Lock()
	defer s.mu.Unlock()
	s.refusals = append(s.refusals, r)
}

func sortedKeys[V any](m map[string]V) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}
