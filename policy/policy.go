// Package policy holds the ownership policy the gateway enforces — which
// devices exist, who owns them, who else may read or write their data,
// where their data goes, which radio node is which device — and the
// decisions taken on it.
//
// Who may read or write a device's data (MayRead, MayWrite), as the stock
// Snap4City filter and datamanager decide it (OrionBrokerFilter
// AccessTokenAuthenticationFilter.checkAuthorizationWithAccessToken,
// datamanager AccessServiceImpl.checkDelegationAccess):
//
//   - its owner, always;
//   - a user with a direct delegation: reads need READ_ACCESS, READ_WRITE
//     or MODIFY, writes READ_WRITE, WRITE_ONLY or MODIFY;
//   - a member of a group the device is delegated to, with the same kinds
//     (Delegation.Group: the platform's groupnameDelegated, an LDAP DN;
//     membership comes from the caller, e.g. the "groups" claim of an SSO
//     token; see groupKeys for how names are matched);
//   - anyone SIGNED IN when the device is delegated to ANONYMOUS (Public):
//     public read for a read kind, and, as stock does, public write for a
//     write kind. Nobody unauthenticated is ever allowed.
//
// A Policy is immutable once compiled; the Engine swaps the one in force
// atomically, so a decision on the hot path is a map lookup with no lock.
// A policy comes from the configuration file (version 0), from the platform's
// Ownership API, or from a signed bundle of central ops; sync/ fetches and
// verifies, this package compiles and decides.
package policy

import (
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/edgegate/edgegate/internal/envelope"
	"github.com/edgegate/edgegate/internal/logx"
	"github.com/edgegate/edgegate/internal/reading"
)

// Kind is a delegation kind, as the platform names them.
type Kind string

// The platform's delegation kinds.
const (
	ReadAccess Kind = "READ_ACCESS"
	ReadWrite  Kind = "READ_WRITE"
	WriteOnly  Kind = "WRITE_ONLY"
	Modify     Kind = "MODIFY"
)

// Valid reports whether k is one of the platform's kinds.
func (k Kind) Valid() bool {
	switch k {
	case ReadAccess, ReadWrite, WriteOnly, Modify:
		return true
	}
	return false
}

// Reads reports whether the kind grants reading the device's data.
// WRITE_ONLY grants no read.
func (k Kind) Reads() bool { return k == ReadAccess || k == ReadWrite || k == Modify }

// Writes reports whether the kind grants writing the device's data.
func (k Kind) Writes() bool { return k == ReadWrite || k == WriteOnly || k == Modify }

// Public is the user a delegation to everyone names: the platform's
// usernameDelegated "ANONYMOUS" (datamanager AccessServiceImpl.
// checkDelegationAccess answers PUBLIC for it, with the delegation's kind).
const Public = "ANONYMOUS"

// Delegation grants a user, a group or everyone access to a device's data.
// Exactly one of User and Group is set; User Public is everyone signed in.
type Delegation struct {
	Device string `json:"device"`
	// User is kept without omitempty so that documents without group
	// delegations serialise (and digest) exactly as before groups existed.
	User string `json:"user"`
	Kind Kind   `json:"kind"`
	// Group is the platform's groupnameDelegated: an LDAP DN such as
	// "cn=staff,ou=Firenze,dc=ldap,dc=org" or an organization "ou=Firenze,...".
	Group string `json:"group,omitempty"`
}

// RadioBinding ties a device to a radio source. Child -1 means any child of
// the node; Node -1 means the whole port (JSON-lines radios name the device
// in each frame).
type RadioBinding struct {
	Port  string `json:"port"`
	Node  int    `json:"node"`
	Child int    `json:"child"`
}

// Registration is one device as a policy source describes it.
type Registration struct {
	ID          string        `json:"id"`
	Type        string        `json:"type"`
	Owner       string        `json:"owner"`
	Broker      string        `json:"broker"`
	K1          string        `json:"k1"`
	K2          string        `json:"k2"`
	Service     string        `json:"fiware_service,omitempty"`
	ServicePath string        `json:"fiware_service_path,omitempty"`
	Radio       *RadioBinding `json:"radio,omitempty"`
	// Signing says who signs the device's readings: SigningHS256 (also
	// ""), SigningGateway or SigningDevice (see keys.go).
	Signing string `json:"signing,omitempty"`
	// PublicKeys are the device's public keys as JWKs, newest first: the
	// newest signs (SigningGateway), all verify (older readings stay
	// verifiable after a rotation).
	PublicKeys []json.RawMessage `json:"public_keys,omitempty"`
	// Kind is the IoT Directory's device kind: KindSensor (also "") or
	// KindActuator (iot-directory web/api/common.php canBeRegistered
	// accepts only these two).
	Kind string `json:"kind,omitempty"`
	// Writable names the attributes the platform may set (the directory's
	// per-attribute "editable" flag, event_values.editable in
	// web/createtables.sql). An actuator with none listed has every
	// attribute writable but the directory's own latitude and longitude.
	Writable []string `json:"writable,omitempty"`
}

// Device kinds, as the IoT Directory names them.
const (
	KindSensor   = "sensor"
	KindActuator = "actuator"
)

// Document is a whole policy: the payload of a signed bundle and the form
// in which the policy in force is cached.
type Document struct {
	Format      int            `json:"v"`
	Gateway     string         `json:"gateway,omitempty"`
	Version     uint64         `json:"version"`
	IssuedAt    time.Time      `json:"issued_at"`
	ExpiresAt   time.Time      `json:"expires_at,omitzero"`
	Devices     []Registration `json:"devices"`
	Delegations []Delegation   `json:"delegations,omitempty"`
}

// DocumentFormat is the Format of Documents this package understands.
const DocumentFormat = 1

// Device is a registered device as the gateway knows it.
type Device struct {
	ID          string
	Type        string
	Owner       string
	Broker      string // base URI of the broker (filter) its data goes to
	Service     string // optional Fiware-Service
	ServicePath string // optional Fiware-ServicePath
	Radio       *RadioBinding
	// Kind and Writable: see Registration. Commands (internal/command) go
	// only to attributes Writes accepts.
	Kind     string
	Writable []string

	k1, k2  string
	key     envelope.Key
	mqttPw  []byte // derived MQTT password
	signing string
	pubKeys []envelope.Key // newest first; verification only
}

// Key is the device's reading-signing key.
func (d *Device) Key() envelope.Key { return d.key }

// String never shows the device keys.
func (d *Device) String() string {
	return fmt.Sprintf("device %s (type %s, owner %s)", d.ID, d.Type, d.Owner)
}

// Commandable reports whether the platform may send the device commands:
// an actuator, or a sensor with attributes marked writable.
func (d *Device) Commandable() bool { return d.Kind == KindActuator || len(d.Writable) > 0 }

// Writes reports whether attr is one the platform may set on the device.
func (d *Device) Writes(attr string) bool {
	if len(d.Writable) > 0 {
		return slices.Contains(d.Writable, attr)
	}
	// The directory creates latitude and longitude on every entity
	// (common.php insert_ngsi): where the device is, not what it does.
	return d.Kind == KindActuator && attr != "latitude" && attr != "longitude"
}

// same reports whether two registrations describe the same device with the
// same owner, destination and keys.
func (d *Device) same(o *Device) bool {
	return d.ID == o.ID && d.Owner == o.Owner && d.Broker == o.Broker && d.Type == o.Type &&
		d.k1 == o.k1 && d.k2 == o.k2 && d.Service == o.Service && d.ServicePath == o.ServicePath
}

type radioKey struct {
	port        string
	node, child int
}

// Policy is one immutable, compiled version of the ownership policy.
type Policy struct {
	Version   uint64
	IssuedAt  time.Time
	ExpiresAt time.Time // zero: no expiry (the configuration file)
	Source    string    // "config", "ownership-api", "bundle"
	Digest    string    // sha256 of the signed bundle, when there is one

	devices map[string]*Device
	reads   map[string]map[string]bool // user → devices they may read
	writes  map[string]map[string]bool // user → devices they may write (besides owners)
	// Group grants, keyed by groupKey (the exact group name and its short
	// form), and public grants (ANONYMOUS delegations).
	groupReads, groupWrites   map[string]map[string]bool
	publicReads, publicWrites map[string]bool
	radio                     map[radioKey]string
	// radioNodes: node id → the ports it is bound on (node >= 0), for
	// the radio's id allocation and its wrong-port refusal.
	radioNodes map[int][]string
	doc        Document
}

// Errors callers branch on.
var (
	ErrInvalid  = errors.New("invalid policy")
	ErrRollback = errors.New("policy version is not newer than the one in force")
	ErrExpired  = errors.New("policy has expired")
)

// New compiles a policy from registrations only (the configuration file).
func New(version uint64, source string, regs []Registration) (*Policy, error) {
	return Compile(Document{Format: DocumentFormat, Version: version, Devices: regs}, source, "")
}

// Compile checks a document field by field and builds the policy, deriving
// every device's signing key once. Errors name the device and the field.
func Compile(doc Document, source, digest string) (*Policy, error) {
	if doc.Format != DocumentFormat {
		return nil, fmt.Errorf("%w: format %d, want %d", ErrInvalid, doc.Format, DocumentFormat)
	}
	if !doc.ExpiresAt.IsZero() && !doc.ExpiresAt.After(doc.IssuedAt) {
		return nil, fmt.Errorf("%w: expires_at %s is not after issued_at %s", ErrInvalid,
			doc.ExpiresAt.Format(time.RFC3339), doc.IssuedAt.Format(time.RFC3339))
	}
	p := &Policy{
		Version: doc.Version, IssuedAt: doc.IssuedAt, ExpiresAt: doc.ExpiresAt, Source: source, Digest: digest,
		devices: make(map[string]*Device, len(doc.Devices)),
		reads:   map[string]map[string]bool{}, writes: map[string]map[string]bool{},
		groupReads: map[string]map[string]bool{}, groupWrites: map[string]map[string]bool{},
		publicReads: map[string]bool{}, publicWrites: map[string]bool{},
		radio: map[radioKey]string{}, doc: doc,
	}
	for i, r := range doc.Devices {
		where := fmt.Sprintf("devices[%d]", i)
		if err := checkRegistration(r); err != nil {
			return nil, fmt.Errorf("%w: %s: %v", ErrInvalid, where, err)
		}
		if _, dup := p.devices[r.ID]; dup {
			return nil, fmt.Errorf("%w: %s: device %q registered twice", ErrInvalid, where, r.ID)
		}
		key, err := envelope.DeriveHS256(r.ID, r.K1, r.K2)
		if err != nil {
			return nil, fmt.Errorf("%w: %s (%s): %v", ErrInvalid, where, r.ID, err)
		}
		pw, err := envelope.DeriveMQTTPassword(r.ID, r.K1, r.K2)
		if err != nil {
			return nil, fmt.Errorf("%w: %s (%s): %v", ErrInvalid, where, r.ID, err)
		}
		signing, pubKeys, err := compileKeys(r)
		if err != nil {
			return nil, fmt.Errorf("%w: %s (%s): %v", ErrInvalid, where, r.ID, err)
		}
		d := &Device{
			ID: r.ID, Type: r.Type, Owner: r.Owner, Broker: r.Broker,
			Service: r.Service, ServicePath: r.ServicePath, Radio: r.Radio,
			k1: r.K1, k2: r.K2, key: key, mqttPw: []byte(pw),
			signing: signing, pubKeys: pubKeys,
			Kind: r.Kind, Writable: slices.Clone(r.Writable),
		}
		p.devices[r.ID] = d
		p.grant(p.reads, r.Owner, r.ID)
		if b := r.Radio; b != nil {
			k := radioKey{b.Port, b.Node, b.Child}
			if other, taken := p.radio[k]; taken {
				return nil, fmt.Errorf("%w: %s (%s): radio %s node %d child %d is already bound to %s",
					ErrInvalid, where, r.ID, b.Port, b.Node, b.Child, other)
			}
			p.radio[k] = r.ID
			if b.Node >= 0 && !slices.Contains(p.radioNodes[b.Node], b.Port) {
				if p.radioNodes == nil {
					p.radioNodes = map[int][]string{}
				}
				p.radioNodes[b.Node] = append(p.radioNodes[b.Node], b.Port)
				slices.Sort(p.radioNodes[b.Node])
			}
		}
	}
	for i, dl := range doc.Delegations {
		where := fmt.Sprintf("delegations[%d]", i)
		switch {
		case !dl.Kind.Valid():
			return nil, fmt.Errorf("%w: %s: kind %q is not one of READ_ACCESS, READ_WRITE, WRITE_ONLY, MODIFY", ErrInvalid, where, dl.Kind)
		case dl.User == "" && dl.Group == "":
			return nil, fmt.Errorf("%w: %s: user and group are both empty", ErrInvalid, where)
		case dl.User != "" && dl.Group != "":
			return nil, fmt.Errorf("%w: %s: user and group are both set", ErrInvalid, where)
		case p.devices[dl.Device] == nil:
			// A delegation of a device this gateway does not serve is
			// harmless; keep the policy usable.
			continue
		}
		switch {
		case dl.User == Public:
			if dl.Kind.Reads() {
				p.publicReads[dl.Device] = true
			}
			if dl.Kind.Writes() {
				// Stock grants it too: the filter writes for a PUBLIC
				// answer whose kind is a write kind
				// (AccessTokenAuthenticationFilter.checkAuthorizationWithAccessToken).
				p.publicWrites[dl.Device] = true
			}
		case dl.Group != "":
			for _, k := range groupKeys(dl.Group) {
				if dl.Kind.Reads() {
					p.grant(p.groupReads, k, dl.Device)
				}
				if dl.Kind.Writes() {
					p.grant(p.groupWrites, k, dl.Device)
				}
			}
		default:
			if dl.Kind.Reads() {
				p.grant(p.reads, dl.User, dl.Device)
			}
			if dl.Kind.Writes() {
				p.grant(p.writes, dl.User, dl.Device)
			}
		}
	}
	return p, nil
}

func (p *Policy) grant(m map[string]map[string]bool, user, device string) {
	if m[user] == nil {
		m[user] = map[string]bool{}
	}
	m[user][device] = true
}

func checkRegistration(r Registration) error {
	if err := reading.ValidateDeviceID(r.ID); err != nil {
		return err
	}
	switch {
	case !reading.ValidID(r.Type):
		return fmt.Errorf("device %s: type %q must match [A-Za-z0-9._-]{1,256}", r.ID, clip(r.Type))
	case r.Owner == "":
		return fmt.Errorf("device %s: owner is empty", r.ID)
	case r.K1 == "" || r.K2 == "":
		return fmt.Errorf("device %s: k1 and k2 must both be set", r.ID)
	case r.K1 == r.K2:
		return fmt.Errorf("device %s: k1 and k2 must differ", r.ID)
	}
	u, err := url.Parse(r.Broker)
	if err != nil || u.Scheme != "https" || u.Host == "" || logx.URLCredential(u) != "" {
		// No credentials in it: the uplink puts the broker URL in every
		// request line, and tokens come from the token source only.
		return fmt.Errorf("device %s: broker %q must be an https:// URL without credentials", r.ID, clip(logx.RedactURL(r.Broker)))
	}
	switch r.Kind {
	case "", KindSensor, KindActuator:
	default:
		return fmt.Errorf("device %s: kind %q: want sensor or actuator", r.ID, clip(r.Kind))
	}
	if len(r.Writable) > 64 {
		return fmt.Errorf("device %s: more than 64 writable attributes", r.ID)
	}
	for _, a := range r.Writable {
		if !reading.ValidID(a) {
			return fmt.Errorf("device %s: writable attribute %q must match [A-Za-z0-9._-]{1,256}", r.ID, clip(a))
		}
	}
	if b := r.Radio; b != nil {
		if b.Port == "" || b.Node < -1 || b.Node > 254 || b.Child < -1 || b.Child > 254 {
			return fmt.Errorf("device %s: radio binding %+v: port must be set, node and child in -1..254", r.ID, *b)
		}
	}
	return nil
}

func clip(s string) string { return logx.Clip(s, 64) }

// Len is the number of registered devices.
func (p *Policy) Len() int { return len(p.devices) }

// Device looks a device up.
func (p *Policy) Device(id string) (*Device, bool) {
	d, ok := p.devices[id]
	return d, ok
}

// Devices lists the devices, sorted by id.
func (p *Policy) Devices() []*Device {
	out := make([]*Device, 0, len(p.devices))
	for _, d := range p.devices {
		out = append(out, d)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// Document returns the document the policy was compiled from (it holds
// K1/K2: only for the encrypted cache).
func (p *Policy) Document() Document { return p.doc }

// CanRead reports whether the signed-in user may read the device's data,
// not counting group delegations (MayRead with no groups).
func (p *Policy) CanRead(user, device string) bool { return p.MayRead(user, nil, device) }

// CanWrite reports whether the signed-in user may write the device's data,
// not counting group delegations (MayWrite with no groups).
func (p *Policy) CanWrite(user, device string) bool { return p.MayWrite(user, nil, device) }

// MayRead reports whether a signed-in user, member of groups, may read the
// device's data: the owner, a direct delegation with a read kind
// (READ_ACCESS, READ_WRITE, MODIFY), a group delegation with a read kind to
// one of groups, or a public (ANONYMOUS) delegation with a read kind. An
// empty user (nobody signed in) may read nothing, public devices included.
// Each test is a map lookup: O(1 + len(groups)).
func (p *Policy) MayRead(user string, groups []string, device string) bool {
	if user == "" {
		return false
	}
	if p.reads[user][device] || p.publicReads[device] {
		return true
	}
	return p.groupGrant(p.groupReads, groups, device)
}

// MayWrite is MayRead for writes: the owner, or a direct, group or public
// delegation with a write kind (READ_WRITE, WRITE_ONLY, MODIFY).
func (p *Policy) MayWrite(user string, groups []string, device string) bool {
	if user == "" {
		return false
	}
	if d, ok := p.devices[device]; ok && d.Owner == user {
		return true
	}
	if p.writes[user][device] || p.publicWrites[device] {
		return true
	}
	return p.groupGrant(p.groupWrites, groups, device)
}

func (p *Policy) groupGrant(m map[string]map[string]bool, groups []string, device string) bool {
	if len(m) == 0 {
		return false
	}
	for _, g := range groups {
		for _, k := range tokenGroupKeys(g) {
			if m[k][device] {
				return true
			}
		}
	}
	return false
}

// groupKeys are the keys a delegation's group is indexed under: the exact
// name (as the platform stores it, lower-cased: LDAP names are
// case-insensitive) and, for an LDAP DN, the value of its first RDN
// ("cn=staff,ou=Firenze,dc=ldap,dc=org" → "staff"), which is what a Keycloak
// group-membership mapper puts in a token ("/staff", or "staff" without
// full path). A DN's short name can match a same-named group of another
// organization: Keycloak's LDAP group mapper carries no OU either, so the
// gateway cannot tell them apart from a token.
func groupKeys(group string) []string {
	g := strings.ToLower(strings.TrimSpace(group))
	keys := []string{"=" + g}
	short := dnShortName(g)
	if short == "" && !strings.Contains(g, "=") {
		short = g[strings.LastIndexByte(g, '/')+1:]
	}
	if short != "" {
		keys = append(keys, short)
	}
	return keys
}

// tokenGroupKeys are the keys a group from a token is looked up under: an
// exact DN, or a Keycloak group path ("/parent/staff" → "staff").
func tokenGroupKeys(group string) []string {
	g := strings.ToLower(strings.TrimSpace(group))
	if g == "" {
		return nil
	}
	if strings.Contains(g, "=") {
		return []string{"=" + g}
	}
	if i := strings.LastIndexByte(g, '/'); i >= 0 {
		g = g[i+1:]
	}
	if g == "" {
		return nil
	}
	return []string{g}
}

// dnShortName is the value of a DN's first RDN, "" when s is not a DN.
func dnShortName(s string) string {
	first, _, _ := strings.Cut(s, ",")
	k, v, ok := strings.Cut(first, "=")
	if !ok || (k != "cn" && k != "ou") {
		return ""
	}
	return strings.TrimSpace(v)
}

// Readable lists the devices user may read through ownership or a direct
// delegation (not groups, not public), sorted.
func (p *Policy) Readable(user string) []string {
	out := make([]string, 0, len(p.reads[user]))
	for d := range p.reads[user] {
		out = append(out, d)
	}
	sort.Strings(out)
	return out
}

// RadioDevice resolves a radio source to its device: first the exact child,
// then the node (child -1), then the port (node -1).
func (p *Policy) RadioDevice(port string, node, child int) (string, bool) {
	for _, k := range []radioKey{{port, node, child}, {port, node, -1}, {port, -1, -1}} {
		if d, ok := p.radio[k]; ok {
			return d, true
		}
	}
	return "", false
}

// RadioNodePorts returns the ports on which a radio node id is bound to a
// device, sorted; nil when none. The slice must not be modified.
func (p *Policy) RadioNodePorts(node int) []string { return p.radioNodes[node] }

// Expired reports whether the policy is past its expiry plus grace at now.
func (p *Policy) Expired(now time.Time, grace time.Duration) bool {
	return !p.ExpiresAt.IsZero() && now.After(p.ExpiresAt.Add(grace))
}

// Describe is a one-line, secret-free summary for logs and status.
func (p *Policy) Describe() string {
	s := "version " + strconv.FormatUint(p.Version, 10) + " from " + p.Source + ", " + strconv.Itoa(len(p.devices)) + " devices"
	if !p.ExpiresAt.IsZero() {
		s += ", expires " + p.ExpiresAt.UTC().Format(time.RFC3339)
	}
	return s
}

// Reasons for refusal, also the values of the "reason" metric label.
const (
	ReasonUnknownDevice = "unknown_device"
	ReasonUnboundNode   = "unbound_node"
)

// Decision is the answer to "may this reading be accepted?".
type Decision struct {
	Allow  bool
	Reason string  // set when !Allow
	Device *Device // set when Allow
}

// Change describes what changed between two policies, for the stages that
// must act at once (purge a revoked device's queue, close its sessions,
// re-check subscriptions).
type Change struct {
	Old, New *Policy
	// Revoked devices are gone from the new policy.
	Revoked []string
	// Rebound devices changed owner, broker, type or keys: data collected
	// under the old registration must not be delivered under the new one.
	Rebound []string
}

// Engine holds the policy in force.
type Engine struct {
	cur atomic.Pointer[Policy]

	mu        sync.Mutex // serialises Apply and the listeners
	listeners []func(Change)
}

// NewEngine starts with p in force.
func NewEngine(p *Policy) *Engine {
	e := &Engine{}
	e.cur.Store(p)
	return e
}

// Current is the policy in force.
func (e *Engine) Current() *Policy { return e.cur.Load() }

// OnChange registers fn to be called, in order, after every change of the
// policy in force. fn runs with the engine's apply lock held: keep it short
// and never call Apply from it.
func (e *Engine) OnChange(fn func(Change)) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.listeners = append(e.listeners, fn)
}

// Apply puts p in force. A policy with a version not above the one in force
// is refused with ErrRollback, except that any versioned policy replaces
// the configuration file's (version 0) and force skips the check (the local
// configuration reloaded by the operator).
func (e *Engine) Apply(p *Policy, force bool) (Change, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	old := e.cur.Load()
	if !force && old != nil && old.Version > 0 && p.Version <= old.Version {
		return Change{}, fmt.Errorf("%w: offered %d, in force %d", ErrRollback, p.Version, old.Version)
	}
	ch := Change{Old: old, New: p}
	if old != nil {
		for id, d := range old.devices {
			nd, ok := p.devices[id]
			switch {
			case !ok:
				ch.Revoked = append(ch.Revoked, id)
			case !d.same(nd):
				ch.Rebound = append(ch.Rebound, id)
			}
		}
		sort.Strings(ch.Revoked)
		sort.Strings(ch.Rebound)
	}
	e.cur.Store(p)
	for _, fn := range e.listeners {
		fn(ch)
	}
	return ch, nil
}

// Renew puts in force a copy of the policy in force with expiresAt as its
// expiry, provided the policy in force is still version with digest: a
// source that re-read the same content (no new version) extends the
// lifetime of what it last confirmed. It returns the renewed policy, or
// false when another policy is in force or expiresAt would not be after
// its IssuedAt. Listeners are not called: nothing a listener acts on
// (devices, owners, keys, delegations) changed.
func (e *Engine) Renew(version uint64, digest string, expiresAt time.Time) (*Policy, bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	cur := e.cur.Load()
	if cur == nil || cur.Version != version || cur.Digest != digest || !expiresAt.After(cur.IssuedAt) {
		return nil, false
	}
	np := *cur // the maps are immutable once compiled: sharing them is safe
	np.ExpiresAt = expiresAt
	np.doc.ExpiresAt = expiresAt
	e.cur.Store(&np)
	return &np, true
}

// DecideIngest decides whether a reading of the device may be accepted.
func (e *Engine) DecideIngest(device string) Decision {
	d, ok := e.cur.Load().devices[device]
	if !ok {
		return Decision{Reason: ReasonUnknownDevice}
	}
	return Decision{Allow: true, Device: d}
}

// BindRadio resolves a radio source to its device (child -1: any).
func (e *Engine) BindRadio(port string, node, child int) (string, bool) {
	return e.cur.Load().RadioDevice(port, node, child)
}

// RadioNodePorts returns the ports on which a radio node id is bound
// (MySensors): the radio never hands such an id to a new node, and
// refuses a frame claiming it on another port.
func (e *Engine) RadioNodePorts(node int) []string {
	return e.cur.Load().RadioNodePorts(node)
}

// CheckDevicePassword reports, in constant time with respect to the
// password, whether pw is the registered device's MQTT password.
func (e *Engine) CheckDevicePassword(device string, pw []byte) bool {
	d, ok := e.cur.Load().devices[device]
	if !ok {
		// Compare anyway so that timing does not tell registered ids apart.
		subtle.ConstantTimeCompare(pw, dummyPassword[:])
		return false
	}
	return subtle.ConstantTimeCompare(pw, d.mqttPw) == 1
}

var dummyPassword [32]byte

// DeviceKeys returns K1/K2 of a registered device, for brokers that still
// check them as query parameters.
func (e *Engine) DeviceKeys(device string) (k1, k2 string, ok bool) {
	d, ok := e.cur.Load().devices[device]
	if !ok {
		return "", "", false
	}
	return d.k1, d.k2, true
}

// RadioPort returns the port a device is bound to, for radios whose frames
// name the device (JSON lines).
func (e *Engine) RadioPort(device string) (string, bool) {
	d, ok := e.cur.Load().devices[device]
	if !ok || d.Radio == nil {
		return "", false
	}
	return d.Radio.Port, true
}
