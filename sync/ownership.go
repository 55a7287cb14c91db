package centralsync

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"sort"
	"strings"
	"time"

	"github.com/edgegate/edgegate/policy"
	"github.com/edgegate/edgegate/reading"
)

// The Snap4City Ownership API and the personal-data service (datamanager),
// as the platform's own code uses them (public sources, github.com/disit/
// snap4city: the IoT Directory's PHP API, functions getOwnerShipDevice,
// getDelegatorDevice and getDelegatedObject; the datamanager's Java
// DelegationController, getDelegatorV2):
//
//   - GET {ownership}/ownership-api/v1/list/?type=IOTID answers the devices
//     the token's user owns: rows with username (the owner), elementId
//     ("Organization:broker:name"), elementType, elementName, elementDetails
//     (an object, or the same object JSON-encoded as a string, holding k1,
//     k2, contextbroker, sometimes edgegateway_type/_uri) and deleted (null
//     while live). The platform's clients skip rows with deleted set.
//   - GET {datamanager}/v2/username/{user}/delegator answers the delegations
//     {user} has GIVEN (usernameDelegator = user; usernameDelegated, or
//     groupnameDelegated for a group; elementId; elementType; kind). The
//     "delegated" endpoint is the other direction (delegations {user} has
//     RECEIVED). "Who may read the devices this account owns" is therefore
//     "delegator"; v2 also returns group delegations (usernameDelegated
//     null), which v1 strips.

// OwnershipOptions configures the "ownership-api" source.
type OwnershipOptions struct {
	// OwnershipURL is the base of the Ownership API, e.g.
	// https://www.snap4city.org (the path /ownership-api/v1/list/ is added).
	OwnershipURL string
	// DataManagerURL is the base of the personal-data service up to its
	// /api, e.g. https://www.snap4city.org/datamanager/api (the path
	// /v2/username/{user}/delegator is added). Empty: no delegations.
	DataManagerURL string
	// Username is the gateway account's username: the owner whose
	// delegations are read.
	Username string
	// Brokers maps the platform's context broker names (elementDetails'
	// contextbroker) to the https base URI of that broker's filter. A row
	// naming a broker not listed here is skipped.
	Brokers map[string]string
	// DefaultType is the entity type of a device whose elementDetails has
	// none (the Ownership API usually carries none). Empty: such rows are
	// skipped.
	DefaultType string
}

// Skip reasons of ownership rows and delegation rows (SyncStatus.Skipped).
const (
	skipDeleted       = "deleted"
	skipElementType   = "element_type"
	skipDetails       = "bad_details"
	skipUnknownBroker = "unknown_broker"
	skipNoType        = "no_type"
	skipInvalid       = "invalid"
	skipDuplicate     = "duplicate"
	skipGroup         = "group_delegation"
	skipUnknownKind   = "unknown_kind"
	skipNotOwner      = "not_owner"
	skipUnknownDevice = "unknown_device"
)

type ownershipRow struct {
	Username       string          `json:"username"`
	ElementID      string          `json:"elementId"`
	ElementType    string          `json:"elementType"`
	ElementName    string          `json:"elementName"`
	ElementDetails json.RawMessage `json:"elementDetails"`
	Deleted        json.RawMessage `json:"deleted"`
}

type delegationRow struct {
	UsernameDelegator  string          `json:"usernameDelegator"`
	UsernameDelegated  string          `json:"usernameDelegated"`
	GroupnameDelegated string          `json:"groupnameDelegated"`
	ElementID          string          `json:"elementId"`
	ElementType        string          `json:"elementType"`
	Kind               string          `json:"kind"`
	DeleteTime         json.RawMessage `json:"deleteTime"`
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
func parseDetails(raw json.RawMessage) (map[string]any, error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) > 0 && raw[0] == '"' {
		var s string
		if err := json.Unmarshal(raw, &s); err != nil {
			return nil, fmt.Errorf("elementDetails string: %v", jsonErr(err))
		}
		raw = []byte(s)
	}
	var m map[string]any
	if err := json.Unmarshal(raw, &m); err != nil || m == nil {
		return nil, fmt.Errorf("elementDetails is not a JSON object")
	}
	return m, nil
}

// jsonErr keeps the byte offset of a JSON syntax error and drops anything
// that could quote the input (keys live in these documents).
func jsonErr(err error) string {
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

func detailString(m map[string]any, key string) string {
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

// buildOwnershipDocument turns the two APIs' rows into a policy document
// (Version and IssuedAt left to the caller). It is pure: parsing and
// mapping here, I/O in ownershipSource.
func buildOwnershipDocument(rows []ownershipRow, dels []delegationRow, o OwnershipOptions) (policy.Document, []skip) {
	doc := policy.Document{Format: policy.DocumentFormat}
	var skipped []skip
	elementToID := map[string]string{} // accepted rows only
	owners := map[string]string{}      // device id → owner
	seen := map[string]bool{}
	for _, r := range rows {
		name := r.ElementID
		switch {
		case isSet(r.Deleted):
			skipped = append(skipped, skip{skipDeleted, name})
			continue
		case r.ElementType != "" && r.ElementType != "IOTID":
			skipped = append(skipped, skip{skipElementType, name + " (" + clip(r.ElementType) + ")"})
			continue
		}
		det, err := parseDetails(r.ElementDetails)
		if err != nil {
			skipped = append(skipped, skip{skipDetails, name + ": " + err.Error()})
			continue
		}
		cb := detailString(det, "contextbroker")
		broker, ok := o.Brokers[cb]
		if !ok {
			skipped = append(skipped, skip{skipUnknownBroker, name + ": broker " + clip(cb)})
			continue
		}
		typ := detailString(det, "type")
		if typ == "" {
			typ = detailString(det, "entityType")
		}
		if typ == "" {
			typ = o.DefaultType
		}
		if typ == "" {
			skipped = append(skipped, skip{skipNoType, name})
			continue
		}
		reg := policy.Registration{
			ID: deviceIDOf(r.ElementID, r.ElementName), Type: typ, Owner: r.Username, Broker: broker,
			K1: detailString(det, "k1"), K2: detailString(det, "k2"),
			Signing: detailString(det, "signing"),
		}
		// The platform keeps a device's public key as elementDetails.publickey
		// (a JWK or PEM); publickeys (a JWK Set, newest first) keeps the
		// older ones of a rotated device.
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
				reg.PublicKeys = keys
				break
			}
		}
		if seen[reg.ID] {
			skipped = append(skipped, skip{skipDuplicate, name})
			continue
		}
		// One bad row must not cost the whole policy: check it alone,
		// with the same rules the whole document will be compiled under.
		if !reading.ValidID(reg.ID) {
			skipped = append(skipped, skip{skipInvalid, name + ": device id"})
			continue
		}
		if _, err := policy.New(1, SourceOwnership, []policy.Registration{reg}); err != nil {
			skipped = append(skipped, skip{skipInvalid, name + ": " + rowError(err)})
			continue
		}
		seen[reg.ID] = true
		doc.Devices = append(doc.Devices, reg)
		elementToID[r.ElementID] = reg.ID
		owners[reg.ID] = reg.Owner
	}
	dseen := map[policy.Delegation]bool{}
	for _, d := range dels {
		name := d.ElementID
		switch {
		case isSet(d.DeleteTime):
			skipped = append(skipped, skip{skipDeleted, "delegation " + name})
			continue
		case d.ElementType != "" && d.ElementType != "IOTID":
			skipped = append(skipped, skip{skipElementType, "delegation " + name})
			continue
		case d.UsernameDelegated == "":
			// A group delegation: the gateway knows users, not groups.
			skipped = append(skipped, skip{skipGroup, "delegation " + name + " to group " + clip(d.GroupnameDelegated)})
			continue
		}
		kind := policy.Kind(d.Kind)
		if kind == "" {
			// Delegations made before kinds existed are read grants.
			kind = policy.ReadAccess
		}
		if !kind.Valid() {
			skipped = append(skipped, skip{skipUnknownKind, "delegation " + name + ": kind " + clip(d.Kind)})
			continue
		}
		id, ok := elementToID[d.ElementID]
		if !ok {
			skipped = append(skipped, skip{skipUnknownDevice, "delegation " + name})
			continue
		}
		if !strings.EqualFold(d.UsernameDelegator, owners[id]) {
			skipped = append(skipped, skip{skipNotOwner, "delegation " + name + " by " + clip(d.UsernameDelegator)})
			continue
		}
		dl := policy.Delegation{Device: id, User: d.UsernameDelegated, Kind: kind}
		if dseen[dl] {
			continue
		}
		dseen[dl] = true
		doc.Delegations = append(doc.Delegations, dl)
	}
	sort.Slice(doc.Devices, func(i, j int) bool { return doc.Devices[i].ID < doc.Devices[j].ID })
	sort.Slice(doc.Delegations, func(i, j int) bool {
		a, b := doc.Delegations[i], doc.Delegations[j]
		if a.Device != b.Device {
			return a.Device < b.Device
		}
		if a.User != b.User {
			return a.User < b.User
		}
		return a.Kind < b.Kind
	})
	return doc, skipped
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

// fetchOwnership reads both APIs and builds the document.
func (s *Syncer) fetchOwnership(ctx context.Context) (policy.Document, []skip, error) {
	o := s.o.Ownership
	listURL := strings.TrimRight(o.OwnershipURL, "/") + "/ownership-api/v1/list/?type=IOTID"
	var rows []ownershipRow
	if err := s.getJSON(ctx, listURL, &rows); err != nil {
		return policy.Document{}, nil, fmt.Errorf("ownership list: %w", err)
	}
	var dels []delegationRow
	if o.DataManagerURL != "" {
		q := url.Values{"sourceRequest": {"edgegate"}, "elementType": {"IOTID"}}
		delURL := strings.TrimRight(o.DataManagerURL, "/") + "/v2/username/" + url.PathEscape(o.Username) +
			"/delegator?" + q.Encode()
		if err := s.getJSON(ctx, delURL, &dels); err != nil {
			return policy.Document{}, nil, fmt.Errorf("delegations: %w", err)
		}
	}
	doc, skipped := buildOwnershipDocument(rows, dels, o)
	return doc, skipped, nil
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
		return fmt.Errorf("GET %s: %s", redactURL(target), jsonErr(err))
	}
	return nil
}

// ownershipOffer fetches, and applies a new version when the content
// changed. It is called with s.applyMu held.
func (s *Syncer) ownershipOffer(ctx context.Context) (string, error) {
	doc, skipped, err := s.fetchOwnership(ctx)
	if err != nil {
		return "", err
	}
	counts := map[string]int{}
	for _, sk := range skipped {
		counts[sk.Reason]++
		s.limited.Log(ctx, levelWarn, "ownership-skip-"+sk.Reason, "ownership row skipped",
			"reason", sk.Reason, "element", sk.Detail)
	}
	digest := contentDigest(doc)
	s.mu.Lock()
	s.st.Skipped = counts
	unchanged := s.cur.Source == SourceOwnership && s.cur.Digest == digest
	floor := s.floor
	s.mu.Unlock()
	if unchanged {
		return resultUnchanged, nil
	}
	doc.Version = floor + 1
	doc.IssuedAt = s.now().UTC().Truncate(time.Second)
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
