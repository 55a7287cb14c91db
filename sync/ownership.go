package centralsync

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/edgegate/edgegate/internal/reading"
	"github.com/edgegate/edgegate/policy"
)

// The Snap4City Ownership API and the personal-data service (datamanager),
// as the platform's own code uses them (public sources, github.com/disit/
// snap4city and github.com/disit/iot-directory):
//
//   - GET {ownership}/ownership-api/v1/list/?type=IOTID answers the devices
//     the token's user owns (Ownership-API/v1/list/index.php): rows with
//     username (the owner), elementId ("Organization:broker:name"),
//     elementType, elementName, elementDetails (an object, or the same
//     object JSON-encoded as a string, holding k1, k2, contextbroker,
//     sometimes edgegateway_type/_uri; never an entity type) and deleted
//     (null while live). The platform's clients skip rows with deleted set.
//   - GET {datamanager}/v2/username/{user}/delegator answers the delegations
//     {user} has GIVEN (usernameDelegator = user; usernameDelegated, or
//     groupnameDelegated for a group with usernameDelegated absent, or
//     "ANONYMOUS" for everyone; elementId; elementType; kind). v1 strips
//     the group ones (PersonalDataManager UserController.getDelegatorV1).
//   - GET {datamanager}/v2/username/{user}/delegated answers the delegations
//     {user} has RECEIVED: those naming the user AND those to every LDAP
//     group and organizational unit the user belongs to
//     (DelegationDAOImpl.getDelegationDelegatedByUsername adds
//     "groupnameDelegated IN getGroupAndOUnames(user)"); none → 204. Its
//     optional groupname=G does NOT select delegations to G: it keeps those
//     whose DELEGATOR is a member of G, so the gateway makes one call and
//     gets its group delegations with it. delegationDetails, when set, is a
//     JSON string holding the device's k1/k2 (the filter reads them there,
//     AccessTokenAuthenticationFilter.enrichDelegatedCredentials, and so
//     does the IoT Directory's get_all_device, common.php
//     getUserDelegatedDevice). The filter lets the delegate write with
//     READ_WRITE, WRITE_ONLY or MODIFY (checkAuthorizationWithAccessToken):
//     those devices are the gateway's to serve, owned by the delegator.
//   - Delegation rows of deleted delegations are not returned unless
//     deleted=true is asked (never here); a deleteTime is still honoured.

// OwnershipOptions configures the "ownership-api" source.
type OwnershipOptions struct {
	// OwnershipURL is the base of the Ownership API, e.g.
	// https://www.snap4city.org (the path /ownership-api/v1/list/ is added).
	OwnershipURL string
	// DataManagerURL is the base of the personal-data service up to its
	// /api, e.g. https://www.snap4city.org/datamanager/api (the paths
	// /v2/username/{user}/delegator and .../delegated are added). Empty:
	// no delegations, given or received.
	DataManagerURL string
	// Username is the gateway account's username: the owner whose
	// delegations are read, and the delegate of received ones.
	Username string
	// Brokers maps the platform's context broker names (elementDetails'
	// contextbroker, or the middle part of a delegated elementId) to the
	// https base URI of that broker's filter. A row naming a broker not
	// listed here is skipped.
	Brokers map[string]string
	// DefaultType is the entity type of a device for which neither the
	// registry nor elementDetails has one (stock rows carry none). Empty:
	// such devices are kept out of the policy and reported (Unusable).
	DefaultType string
	// Registry is the gateway's own device registry (filled by `edgegate
	// device add/bind`): the entity type, radio binding, signing mode and,
	// for devices delegated without keys, K1/K2 of a device by id. nil: none.
	// Its answers take precedence over elementDetails for type, binding
	// and signing; Broker and Owner always come from the platform.
	Registry interface {
		Lookup(id string) (policy.Registration, bool)
	}
	// MaxAge is how long a policy read from this source stays valid after
	// the last successful sync (its ExpiresAt); past ExpiresAt plus the
	// expiry grace the gateway holds every reading, as for an expired
	// bundle. Zero: DefaultOwnershipMaxAge.
	MaxAge time.Duration
}

// DefaultOwnershipMaxAge is the default OwnershipOptions.MaxAge: a day
// without a successful sync, then the expiry grace.
const DefaultOwnershipMaxAge = 24 * time.Hour

// Skip reasons of ownership rows and delegation rows (SyncStatus.Skipped).
const (
	skipDeleted       = "deleted"
	skipElementType   = "element_type"
	skipDetails       = "bad_details"
	skipUnknownBroker = "unknown_broker"
	skipNoType        = "no_type"
	skipInvalid       = "invalid"
	skipDuplicate     = "duplicate"
	skipUnknownKind   = "unknown_kind"
	skipNotOwner      = "not_owner"
	skipUnknownDevice = "unknown_device"
	skipNoDelegate    = "no_delegate"            // a delegation naming neither a user nor a group
	skipReadOnly      = "read_only_delegation"   // received without a write kind: not the gateway's to write
	skipNotToAccount  = "not_delegated_to_us"    // a received row naming another user
	skipKeysMissing   = "delegated_keys_missing" // received with a write kind, K1/K2 nowhere
	skipRadioConflict = "radio_conflict"         // bound to a radio source another device already has
)

// UnusableDevice is a device the platform gives this gateway's account that
// the gateway cannot serve until someone supplies what is missing; `edgegate
// status` and `config check` list them with the command that fixes it.
// Nothing in it is secret.
type UnusableDevice struct {
	ID      string   `json:"id"`
	Element string   `json:"element"` // the platform's elementId
	Owner   string   `json:"owner"`
	Reason  string   `json:"reason"`  // no_type, delegated_keys_missing
	Missing []string `json:"missing"` // "entity type", "K1/K2", "radio binding (optional: ...)"
	Fix     string   `json:"fix"`
}

// BindCommand is the command that records what the platform lacks about a
// device in the gateway's registry.
const BindCommand = "edgegate device bind"

// OwnershipRow is a row of the Ownership API's list (Ownership-API/v1/
// list/index.php): elementDetails is an object, or the same object
// JSON-encoded as a string; deleted is null while the row is live. The
// gateway and the companion (central/) read the same shape.
type OwnershipRow struct {
	Username       string          `json:"username"`
	ElementID      string          `json:"elementId"`
	ElementType    string          `json:"elementType"`
	ElementName    string          `json:"elementName"`
	ElementDetails json.RawMessage `json:"elementDetails"`
	Deleted        json.RawMessage `json:"deleted"`
}

// DelegationRow is a row of the datamanager's v2 delegator/delegated lists
// (PersonalDataManager's Delegation entity); delegationDetails may carry
// k1/k2, as the Orion Broker Filter reads them.
type DelegationRow struct {
	UsernameDelegator  string          `json:"usernameDelegator"`
	UsernameDelegated  string          `json:"usernameDelegated"`
	GroupnameDelegated string          `json:"groupnameDelegated"`
	ElementID          string          `json:"elementId"`
	ElementType        string          `json:"elementType"`
	Kind               string          `json:"kind"`
	DelegationDetails  json.RawMessage `json:"delegationDetails"`
	DeleteTime         json.RawMessage `json:"deleteTime"`
}

// ownershipInput is what the platform answered, one slice per endpoint.
type ownershipInput struct {
	Rows     []OwnershipRow  // /ownership-api/v1/list/?type=IOTID
	Given    []DelegationRow // /v2/username/{user}/delegator
	Received []DelegationRow // /v2/username/{user}/delegated
}

// skip is one row left out of the document; Detail names the element,
// never its keys.
type skip struct {
	Reason string
	Detail string
}

// isSet reports whether a JSON value is present and not null/""/false.
func isSet(raw json.RawMessage) bool {
	switch string(bytes.TrimSpace(raw)) {
	case "", "null", `""`, "false":
		return false
	}
	return true
}

// parseDetails decodes elementDetails, which the platform stores as a JSON
// string and returns either decoded or still encoded.
func ParseDetails(raw json.RawMessage) (map[string]any, error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) > 0 && raw[0] == '"' {
		var s string
		if err := json.Unmarshal(raw, &s); err != nil {
			return nil, fmt.Errorf("elementDetails string: %v", SafeJSONError(err))
		}
		raw = []byte(s)
	}
	var m map[string]any
	if err := json.Unmarshal(raw, &m); err != nil || m == nil {
		return nil, fmt.Errorf("elementDetails is not a JSON object")
	}
	return m, nil
}

// SafeJSONError keeps the byte offset of a JSON syntax error and drops anything
// that could quote the input (keys live in these documents).
func SafeJSONError(err error) string {
	var se *json.SyntaxError
	if errors.As(err, &se) {
		return fmt.Sprintf("invalid JSON at offset %d", se.Offset)
	}
	var te *json.UnmarshalTypeError
	if errors.As(err, &te) {
		return fmt.Sprintf("field %q: unexpected %s", te.Field, te.Value)
	}
	return "invalid JSON"
}

// DetailPublicKeys reads a device's public keys from decoded
// elementDetails: publickeys (a JWK Set, newest first: the older keys of a
// rotated device stay) or publickey (a JWK or PEM); nil when neither parses.
func DetailPublicKeys(det map[string]any) []json.RawMessage {
	for _, field := range []string{"publickeys", "publickey"} {
		v, ok := det[field]
		if !ok || v == nil {
			continue
		}
		raw, err := json.Marshal(v)
		if s, isStr := v.(string); isStr {
			raw, err = []byte(s), nil
		}
		if err != nil {
			continue
		}
		if keys, err := policy.ParsePublicKeys(raw); err == nil {
			return keys
		}
	}
	return nil
}

// DetailString reads a string (or number) member of decoded elementDetails.
func DetailString(m map[string]any, key string) string {
	switch v := m[key].(type) {
	case string:
		return strings.TrimSpace(v)
	case json.Number:
		return v.String()
	case float64:
		return fmt.Sprint(v)
	}
	return ""
}

// deviceIDOf derives the gateway's device id from an IOTID elementId
// ("Organization:broker:name" → name), as the IoT Directory does.
func deviceIDOf(elementID, elementName string) string {
	if parts := strings.SplitN(elementID, ":", 3); len(parts) == 3 && parts[2] != "" {
		return parts[2]
	}
	if !strings.Contains(elementID, ":") && elementID != "" {
		return elementID
	}
	return elementName
}

// brokerOfElement is the context broker named by an IOTID elementId
// ("Organization:broker:name" → broker; device.php builds it as
// organization:contextBroker:id), "" when it names none.
func brokerOfElement(elementID string) string {
	if parts := strings.SplitN(elementID, ":", 3); len(parts) == 3 {
		return parts[1]
	}
	return ""
}

// ownEdgeBinding reads the binding an elementDetails' edgegateway_uri
// gives, edgegate://GW/radio?port=P&node=N&child=C or edgegate://GW/mqtt
// (the form DeviceSpec.EdgeURI writes at registration), when it names
// this gateway; ok is false for another gateway or another form.
func ownEdgeBinding(det map[string]any, gateway string) (rb *policy.RadioBinding, signing string, ok bool) {
	if DetailString(det, "edgegateway_type") != EdgeGatewayType {
		return nil, "", false
	}
	u, err := url.Parse(DetailString(det, "edgegateway_uri"))
	if err != nil || u.Scheme != "edgegate" || u.Host == "" || u.Host != gateway {
		return nil, "", false
	}
	q := u.Query()
	switch u.Path {
	case "/mqtt":
		return nil, q.Get("signing"), true
	case "/radio":
	default:
		return nil, "", false
	}
	rb = &policy.RadioBinding{Port: q.Get("port"), Node: -1, Child: -1}
	for name, p := range map[string]*int{"node": &rb.Node, "child": &rb.Child} {
		if v := q.Get(name); v != "" {
			n, err := strconv.Atoi(v)
			if err != nil {
				return nil, "", false
			}
			*p = n
		}
	}
	return rb, q.Get("signing"), true
}

// delegatedKeys reads k1/k2 from a delegation's delegationDetails: a JSON
// string holding an object (the datamanager's serializer writes it with
// writeStringField), or, leniently, the object itself.
func delegatedKeys(raw json.RawMessage) (k1, k2 string) {
	if !isSet(raw) {
		return "", ""
	}
	det, err := ParseDetails(raw)
	if err != nil {
		return "", ""
	}
	return DetailString(det, "k1"), DetailString(det, "k2")
}

// bindFix is the command an installer runs to supply what is missing.
func bindFix(id string, missing []string) string {
	cmd := BindCommand + " " + id
	for _, m := range missing {
		switch m {
		case missingType:
			cmd += " --type TYPE"
		case missingKeys:
			cmd += " --k1-file FILE"
		}
	}
	return cmd + " [--mqtt | --radio-port PORT --radio-node N]"
}

const (
	missingType  = "entity type"
	missingKeys  = "K1/K2 (delegated to this account; the delegation carries none: ask the owner)"
	missingRadio = "radio binding (optional: without one the device reaches the gateway over MQTT only)"
)

// buildOwnershipDocument turns the platform's answers into a policy
// document (Version, IssuedAt and ExpiresAt left to the caller). It is
// pure: parsing and mapping here, I/O in fetchOwnership. gateway is this
// gateway's id (for edgegateway_uri bindings).
func buildOwnershipDocument(in ownershipInput, o OwnershipOptions, gateway string) (policy.Document, []skip, []UnusableDevice) {
	b := &docBuilder{o: o, gateway: gateway, elementToID: map[string]string{}, owners: map[string]string{},
		seen: map[string]bool{}, radio: map[policy.RadioBinding]string{}, dseen: map[policy.Delegation]bool{}}
	for _, r := range in.Rows {
		b.owned(r)
	}
	b.received(in.Received)
	for _, d := range in.Given {
		b.given(d)
	}
	doc := b.doc
	doc.Format = policy.DocumentFormat
	sort.Slice(doc.Devices, func(i, j int) bool { return doc.Devices[i].ID < doc.Devices[j].ID })
	sort.Slice(doc.Delegations, func(i, j int) bool {
		a, b := doc.Delegations[i], doc.Delegations[j]
		if a.Device != b.Device {
			return a.Device < b.Device
		}
		if a.User != b.User {
			return a.User < b.User
		}
		if a.Group != b.Group {
			return a.Group < b.Group
		}
		return a.Kind < b.Kind
	})
	sort.Slice(b.unusable, func(i, j int) bool { return b.unusable[i].ID < b.unusable[j].ID })
	return doc, b.skipped, b.unusable
}

type docBuilder struct {
	o           OwnershipOptions
	gateway     string
	doc         policy.Document
	skipped     []skip
	unusable    []UnusableDevice
	elementToID map[string]string // accepted owned rows only
	owners      map[string]string // device id → owner
	seen        map[string]bool   // device ids in the document
	radio       map[policy.RadioBinding]string
	dseen       map[policy.Delegation]bool
}

func (b *docBuilder) skip(reason, detail string) { b.skipped = append(b.skipped, skip{reason, detail}) }

func (b *docBuilder) lookup(id string) (policy.Registration, bool) {
	if b.o.Registry == nil || !reading.ValidDeviceID(id) {
		return policy.Registration{}, false
	}
	return b.o.Registry.Lookup(id)
}

// owned maps one Ownership API row.
func (b *docBuilder) owned(r OwnershipRow) {
	name := r.ElementID
	switch {
	case isSet(r.Deleted):
		b.skip(skipDeleted, name)
		return
	case r.ElementType != "" && r.ElementType != "IOTID":
		b.skip(skipElementType, name+" ("+clip(r.ElementType)+")")
		return
	}
	det, err := ParseDetails(r.ElementDetails)
	if err != nil {
		b.skip(skipDetails, name+": "+err.Error())
		return
	}
	cb := DetailString(det, "contextbroker")
	broker, ok := b.o.Brokers[cb]
	if !ok {
		b.skip(skipUnknownBroker, name+": broker "+clip(cb))
		return
	}
	reg := policy.Registration{
		ID: deviceIDOf(r.ElementID, r.ElementName), Owner: r.Username, Broker: broker,
		K1: DetailString(det, "k1"), K2: DetailString(det, "k2"),
		Signing: DetailString(det, "signing"),
	}
	// Precedence for type, binding and signing: the gateway's registry,
	// then elementDetails, then the configured default type.
	local, inRegistry := b.lookup(reg.ID)
	reg.Type = DetailString(det, "type")
	if reg.Type == "" {
		reg.Type = DetailString(det, "entityType")
	}
	if rb, sig, ok := ownEdgeBinding(det, b.gateway); ok {
		reg.Radio = rb
		if sig != "" {
			reg.Signing = sig
		}
	}
	reg.PublicKeys = DetailPublicKeys(det)
	if inRegistry {
		overlay(&reg, local)
	}
	if reg.Type == "" {
		reg.Type = b.o.DefaultType
	}
	if b.add(reg, name, r.ElementID, false) {
		b.elementToID[r.ElementID] = reg.ID
	}
}

// overlay puts the registry's type, binding and signing over what the
// platform said; K1/K2 only where the platform gave none: the platform's
// keys are the ones its filter checks.
func overlay(reg *policy.Registration, local policy.Registration) {
	if local.Type != "" {
		reg.Type = local.Type
	}
	if local.Radio != nil {
		rb := *local.Radio
		reg.Radio = &rb
	}
	if local.Signing != "" {
		reg.Signing = local.Signing
		if len(local.PublicKeys) > 0 {
			reg.PublicKeys = local.PublicKeys
		}
	}
	if reg.K1 == "" && reg.K2 == "" {
		if local.K1 != "" && local.K2 != "" {
			reg.K1, reg.K2 = local.K1, local.K2
		}
	}
	if local.Service != "" {
		reg.Service, reg.ServicePath = local.Service, local.ServicePath
	}
	// Kind and writable attributes are not in a stock ownership row: only
	// the registry (device add --kind, --writable) has them.
	if local.Kind != "" {
		reg.Kind = local.Kind
	}
	if len(local.Writable) > 0 {
		reg.Writable = slices.Clone(local.Writable)
	}
}

// add checks one registration alone, with the same rules the whole
// document will be compiled under (one bad row must not cost the whole
// policy), and adds it; a device without a type or keys is reported.
func (b *docBuilder) add(reg policy.Registration, name, element string, delegated bool) bool {
	if !reading.ValidDeviceID(reg.ID) {
		b.skip(skipInvalid, name+": device id")
		return false
	}
	if b.seen[reg.ID] {
		b.skip(skipDuplicate, name)
		return false
	}
	var missing []string
	reason := ""
	if reg.Type == "" {
		missing, reason = append(missing, missingType), skipNoType
	}
	if delegated && (reg.K1 == "" || reg.K2 == "") {
		missing = append(missing, missingKeys)
		if reason == "" {
			reason = skipKeysMissing
		}
	}
	if reason != "" {
		if reg.Radio == nil {
			missing = append(missing, missingRadio)
		}
		b.skip(reason, name)
		b.unusable = append(b.unusable, UnusableDevice{ID: reg.ID, Element: clip(element), Owner: clip(reg.Owner),
			Reason: reason, Missing: missing, Fix: bindFix(reg.ID, missing)})
		return false
	}
	if _, err := policy.New(1, SourceOwnership, []policy.Registration{reg}); err != nil {
		b.skip(skipInvalid, name+": "+rowError(err))
		return false
	}
	if rb := reg.Radio; rb != nil {
		// Two bindings of one radio source would make the whole document
		// fail to compile: the first device keeps it.
		if other, taken := b.radio[*rb]; taken {
			b.skip(skipRadioConflict, name+": radio source already bound to "+other)
			return false
		}
		b.radio[*rb] = reg.ID
	}
	b.seen[reg.ID] = true
	b.owners[reg.ID] = reg.Owner
	b.doc.Devices = append(b.doc.Devices, reg)
	return true
}

// delegationKind is a row's kind; delegations made before kinds existed
// are read grants (the filter's CheckCredential defaults to READ_ACCESS).
func delegationKind(d DelegationRow) (policy.Kind, bool) {
	kind := policy.Kind(d.Kind)
	if kind == "" {
		kind = policy.ReadAccess
	}
	return kind, kind.Valid()
}

// received maps the delegations the account received: a device delegated
// with a write kind is one the gateway may write at the filter, owned by
// its delegator. Several rows for one element (a direct and a group
// delegation, say) are merged: any write kind makes it usable, and keys
// come from whichever row carries them.
func (b *docBuilder) received(rows []DelegationRow) {
	type merged struct {
		first  DelegationRow
		kind   policy.Kind
		k1, k2 string
	}
	byElement := map[string]*merged{}
	var order []string
	for _, d := range rows {
		name := "received " + d.ElementID
		switch {
		case isSet(d.DeleteTime):
			b.skip(skipDeleted, name)
			continue
		case d.ElementType != "" && d.ElementType != "IOTID":
			b.skip(skipElementType, name)
			continue
		case d.UsernameDelegated == "" && d.GroupnameDelegated == "":
			b.skip(skipNoDelegate, name)
			continue
		case d.UsernameDelegated != "" && !strings.EqualFold(d.UsernameDelegated, b.o.Username):
			// The endpoint answers the account's and its groups' only;
			// anything else (ANONYMOUS included) is not a grant to us.
			b.skip(skipNotToAccount, name+" to "+clip(d.UsernameDelegated))
			continue
		}
		kind, ok := delegationKind(d)
		if !ok {
			b.skip(skipUnknownKind, name+": kind "+clip(d.Kind))
			continue
		}
		if !kind.Writes() {
			b.skip(skipReadOnly, name+" ("+string(kind)+")")
			continue
		}
		m := byElement[d.ElementID]
		if m == nil {
			m = &merged{first: d, kind: kind}
			byElement[d.ElementID] = m
			order = append(order, d.ElementID)
		} else if m.kind == policy.WriteOnly && kind != policy.WriteOnly {
			m.kind = kind // a kind that also reads is the wider grant
		}
		if m.k1 == "" || m.k2 == "" {
			m.k1, m.k2 = delegatedKeys(d.DelegationDetails)
		}
	}
	for _, el := range order {
		m := byElement[el]
		name := "received " + el
		cbName := brokerOfElement(el)
		broker, ok := b.o.Brokers[cbName]
		if !ok {
			b.skip(skipUnknownBroker, name+": broker "+clip(cbName))
			continue
		}
		id := deviceIDOf(el, "")
		if b.seen[id] {
			// Owned (or already taken): the ownership row wins.
			if b.owners[id] != m.first.UsernameDelegator {
				b.skip(skipDuplicate, name)
			}
			continue
		}
		reg := policy.Registration{ID: id, Owner: m.first.UsernameDelegator, Broker: broker, K1: m.k1, K2: m.k2}
		if local, ok := b.lookup(id); ok {
			overlay(&reg, local)
		}
		if reg.Type == "" {
			reg.Type = b.o.DefaultType
		}
		if reg.Owner == "" {
			b.skip(skipInvalid, name+": no usernameDelegator")
			continue
		}
		if !b.add(reg, name, el, true) {
			continue
		}
		// The account's own grant, so that the policy says why the
		// gateway may write a device it does not own.
		b.delegate(policy.Delegation{Device: id, User: b.o.Username, Kind: m.kind})
	}
}

func (b *docBuilder) delegate(dl policy.Delegation) {
	if b.dseen[dl] {
		return
	}
	b.dseen[dl] = true
	b.doc.Delegations = append(b.doc.Delegations, dl)
}

// given maps one delegation the account gave of a device it owns: to a
// user, to a group (groupnameDelegated, usernameDelegated absent) or to
// everyone (ANONYMOUS). They decide who may read (or write) on the
// gateway's local broker.
func (b *docBuilder) given(d DelegationRow) {
	name := "delegation " + d.ElementID
	switch {
	case isSet(d.DeleteTime):
		b.skip(skipDeleted, name)
		return
	case d.ElementType != "" && d.ElementType != "IOTID":
		b.skip(skipElementType, name)
		return
	case d.UsernameDelegated == "" && d.GroupnameDelegated == "":
		b.skip(skipNoDelegate, name)
		return
	}
	kind, ok := delegationKind(d)
	if !ok {
		b.skip(skipUnknownKind, name+": kind "+clip(d.Kind))
		return
	}
	id, ok := b.elementToID[d.ElementID]
	if !ok {
		b.skip(skipUnknownDevice, name)
		return
	}
	if !strings.EqualFold(d.UsernameDelegator, b.owners[id]) {
		b.skip(skipNotOwner, name+" by "+clip(d.UsernameDelegator))
		return
	}
	dl := policy.Delegation{Device: id, User: d.UsernameDelegated, Kind: kind}
	if d.UsernameDelegated == "" {
		dl = policy.Delegation{Device: id, Group: d.GroupnameDelegated, Kind: kind}
	}
	b.delegate(dl)
}

// rowError is the part of a compile error that names the field, without
// the policy package's prefix.
func rowError(err error) string {
	s := err.Error()
	if i := strings.LastIndex(s, ": "); i >= 0 {
		s = s[i+2:]
	}
	return clip(s)
}

// contentDigest identifies an ownership-api document by its content only
// (devices and delegations, in their sorted order), so that a refetch of
// the same rows is recognised and gets no new version.
func contentDigest(doc policy.Document) string {
	b, _ := json.Marshal(struct {
		Devices     []policy.Registration `json:"devices"`
		Delegations []policy.Delegation   `json:"delegations"`
	}{doc.Devices, doc.Delegations})
	sum := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(sum[:])
}

// fetchOwnership reads the Ownership API and, with a datamanager, the
// delegations the account gave and received, and builds the document.
func (s *Syncer) fetchOwnership(ctx context.Context) (policy.Document, []skip, []UnusableDevice, error) {
	o := s.o.Ownership
	var in ownershipInput
	// onlyMine: a RootAdmin account gets every user's rows without it
	// (Ownership-API/v1/list/index.php); ordinary users get theirs anyway.
	listURL := strings.TrimRight(o.OwnershipURL, "/") + "/ownership-api/v1/list/?type=IOTID&onlyMine=true"
	if err := s.getJSON(ctx, listURL, &in.Rows); err != nil {
		return policy.Document{}, nil, nil, fmt.Errorf("ownership list: %w", err)
	}
	if o.DataManagerURL != "" {
		q := url.Values{"sourceRequest": {"edgegate"}, "elementType": {"IOTID"}}
		base := strings.TrimRight(o.DataManagerURL, "/") + "/v2/username/" + url.PathEscape(o.Username)
		if err := s.getJSON(ctx, base+"/delegator?"+q.Encode(), &in.Given); err != nil {
			return policy.Document{}, nil, nil, fmt.Errorf("delegations given: %w", err)
		}
		// One call: the datamanager adds the delegations to the
		// account's groups itself (see the comment at the top).
		if err := s.getJSON(ctx, base+"/delegated?"+q.Encode(), &in.Received); err != nil {
			return policy.Document{}, nil, nil, fmt.Errorf("delegations received: %w", err)
		}
	}
	doc, skipped, unusable := buildOwnershipDocument(in, o, s.o.Gateway)
	return doc, skipped, unusable, nil
}

// getJSON GETs a JSON array with the gateway's token into v.
func (s *Syncer) getJSON(ctx context.Context, target string, v any) error {
	resp, body, err := s.do(ctx, http.MethodGet, target, nil, http.Header{"Accept": {"application/json"}})
	if err != nil {
		return err
	}
	switch {
	case resp.StatusCode == http.StatusNoContent:
		body = []byte("[]")
	case resp.StatusCode != http.StatusOK:
		return fmt.Errorf("GET %s: status %d", redactURL(target), resp.StatusCode)
	case int64(len(body)) > s.maxBody:
		return fmt.Errorf("GET %s: answer larger than %d bytes", redactURL(target), s.maxBody)
	}
	if err := json.Unmarshal(body, v); err != nil {
		return fmt.Errorf("GET %s: %s", redactURL(target), SafeJSONError(err))
	}
	return nil
}

// ownershipOffer fetches, and applies a new version when the content
// changed. It is called with s.applyMu held.
func (s *Syncer) ownershipOffer(ctx context.Context) (string, error) {
	doc, skipped, unusable, err := s.fetchOwnership(ctx)
	if err != nil {
		return "", err
	}
	counts := map[string]int{}
	for _, sk := range skipped {
		counts[sk.Reason]++
		level := levelWarn
		if sk.Reason == skipReadOnly {
			// Routine: a device shared with the account to look at.
			level = slog.LevelDebug
		}
		s.limited.Log(ctx, level, "ownership-skip-"+sk.Reason, "ownership row skipped",
			"reason", sk.Reason, "element", sk.Detail)
	}
	for _, u := range unusable {
		s.limited.Log(ctx, levelWarn, "ownership-unusable-"+u.ID, "device not served until the gateway's registry completes it",
			"device", u.ID, "missing", strings.Join(u.Missing, ", "), "fix", u.Fix)
	}
	// The lifetime runs from this successful read of the platform.
	now := s.now().UTC().Truncate(time.Second)
	expires := now.Add(s.o.Ownership.MaxAge)
	digest := contentDigest(doc)
	s.mu.Lock()
	s.st.Skipped = counts
	s.st.Unusable = unusable
	unchanged := s.cur.Source == SourceOwnership && s.cur.Digest == digest
	floor := s.floor
	s.mu.Unlock()
	if unchanged {
		renewed, err := s.renewOwnership(digest, expires)
		if err != nil {
			return "", err
		}
		if renewed {
			return resultUnchanged, nil
		}
		// Another policy is in force (the configuration was reloaded):
		// put this content in force again, as a new version.
	}
	doc.Version = floor + 1
	doc.IssuedAt = now
	doc.ExpiresAt = expires
	p, err := policy.Compile(doc, SourceOwnership, digest)
	if err != nil {
		// Rows were checked one by one; only a cross-row conflict gets here.
		return "", s.refused(ctx, "poll", refuse(ReasonMalformed, "ownership document: %s", rowError(err)))
	}
	if err := s.apply(ctx, p, doc, SourceOwnership, digest); err != nil {
		return "", err
	}
	return resultApplied, nil
}

// renewOwnership extends the policy in force, when it is the one with this
// content, to expire at expires: same version, same content, a new
// lifetime, persisted so that a restart keeps it. Called with applyMu held.
func (s *Syncer) renewOwnership(digest string, expires time.Time) (bool, error) {
	np, ok := s.o.Engine.Renew(s.o.Engine.Current().Version, digest, expires)
	if !ok {
		return false, nil
	}
	s.mu.Lock()
	c := s.cur
	s.mu.Unlock()
	c.Document = np.Document()
	s.setCurrent(c, np)
	b, err := json.Marshal(c)
	if err != nil {
		return true, fmt.Errorf("persist renewed policy: %w", err)
	}
	if err := s.o.Store.PutState(StatePolicy, b); err != nil {
		return true, fmt.Errorf("persist renewed policy version %d: %w", np.Version, err)
	}
	return true, nil
}
