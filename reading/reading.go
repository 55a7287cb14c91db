// Package reading defines the Reading every source produces (MQTT, radio) and
// the NGSI v2 rules it must satisfy before it may be signed and queued.
//
// The limits live here, in the type, so that no caller can forget them: a
// Reading that passed Validate can be encoded as an NGSI v2 attribute update
// that the Orion Broker Filter and Orion accept.
package reading

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"sort"
	"strings"
	"time"

	"github.com/edgegate/edgegate/logtext"
)

// Limits that are part of the contract of a Reading.
const (
	// MaxIDLen is Orion's limit for entity ids and types.
	MaxIDLen = 256
	// MaxAttrs bounds the number of attributes in one reading.
	MaxAttrs = 64
	// MaxNameLen bounds an attribute name (Orion: 256).
	MaxNameLen = 256
	// MaxBodyBytes bounds a reading's attributes. Its NGSI body must also
	// fit Orion's 1 MiB request limit (envelope.MaxBodyBytes, 4x this)
	// with the signature metadata on every attribute, each repeating the
	// whole reading base64-encoded: a reading of n attributes fits when
	// about (n+1) x 4/3 x its size stays under 1 MiB; envelope.Body
	// refuses the others as too large.
	MaxBodyBytes = 256 << 10
	// MaxPayloadBytes bounds what a source may hand to Parse.
	MaxPayloadBytes = 256 << 10
)

// Attribute types inferred for flat payloads, NGSI v2 defaults.
const (
	TypeNumber     = "Number"
	TypeText       = "Text"
	TypeBoolean    = "Boolean"
	TypeStructured = "StructuredValue"
)

// Attribute is one named, typed value of a reading.
type Attribute struct {
	Name  string `json:"name"`
	Type  string `json:"type"`
	Value any    `json:"value"` // float64, string, bool, nil, []any or map[string]any
}

// Source says where a reading came from, for logs, status and binding checks.
type Source struct {
	Kind  string `json:"kind"`            // "mqtt" or "radio"
	Topic string `json:"topic,omitempty"` // MQTT topic
	Port  string `json:"port,omitempty"`  // radio port path
	Node  string `json:"node,omitempty"`  // radio node id (and child)
}

// Reading is one observation of one device, before signing.
type Reading struct {
	Device string      // device id (the NGSI entity id)
	Source Source      // where it came from
	Time   time.Time   // observation time; the gateway's receive time when the device gave none
	Attrs  []Attribute // sorted by name, unique
}

// Errors that callers branch on.
var (
	ErrInvalid  = errors.New("invalid reading")
	ErrTooLarge = errors.New("reading too large")
)

// ValidID reports whether s is a valid NGSI v2 id as the broker filter
// accepts: [A-Za-z0-9._-]{1,256}.
func ValidID(s string) bool {
	if len(s) == 0 || len(s) > MaxIDLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '.', c == '_', c == '-':
		default:
			return false
		}
	}
	return true
}

// forbidden are the characters Orion refuses in attribute values and types.
const forbidden = `<>"'=;()`

func checkText(field, s string) error {
	if i := strings.IndexAny(s, forbidden); i >= 0 {
		return fmt.Errorf("%w: %s contains forbidden character %q at byte %d", ErrInvalid, field, s[i], i)
	}
	return nil
}

// validName reports whether an attribute name or type is acceptable to
// Orion: 1-256 printable ASCII characters, none of the forbidden ones, no
// space & ? / # (orion-api.md, "Field syntax restrictions"). The names
// "id" and "type" are refused in an attribute update (Orion: "invalid
// input, 'id' as attribute", "entity type specified in payload";
// src/lib/common/errorMessages.h).
func validName(s string) bool {
	if len(s) == 0 || len(s) > MaxNameLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c <= ' ' || c >= 0x7f || strings.IndexByte(forbidden+"&?/#", c) >= 0 {
			return false
		}
	}
	return true
}

func validAttrName(s string) bool { return s != "id" && s != "type" && validName(s) }

// Reasons an attribute is dropped (DropOrionInvalid), metric label values.
const (
	// DropForbiddenChars: a string in the value (or a key of a structured
	// value) holds one of < > " ' = ; ( ), which Orion refuses with 400
	// "Invalid characters in attribute value" for the whole request.
	DropForbiddenChars = "forbidden_chars"
	// DropBadName: a name Orion refuses (id, type, over 256 bytes, space
	// & ? / #, forbidden or non-printable characters).
	DropBadName = "bad_name"
	// DropBadType: an attribute type Orion refuses, by the same rules.
	DropBadType = "bad_type"
)

// Dropped is an attribute DropOrionInvalid left out. Name is clipped for
// logs; the value is never kept, it may be anything a device sent.
type Dropped struct {
	Name   string
	Reason string // DropForbiddenChars, DropBadName, DropBadType
}

// DropOrionInvalid removes the attributes stock Orion would refuse, so
// that the valid ones beside them are still delivered: Orion answers 400
// to the whole PATCH for one bad attribute (SNAP4CITY.md). It returns
// what it removed, in order. Values that are not finite numbers or of an
// unsupported type are left to Validate, which refuses the reading.
func (r *Reading) DropOrionInvalid() []Dropped {
	var dropped []Dropped
	kept := r.Attrs[:0]
	for _, a := range r.Attrs {
		reason := ""
		switch {
		case !validAttrName(a.Name):
			reason = DropBadName
		case !validName(a.Type):
			reason = DropBadType
		case hasForbidden(a.Value, 0):
			reason = DropForbiddenChars
		}
		if reason != "" {
			dropped = append(dropped, Dropped{Name: clip(a.Name), Reason: reason})
			continue
		}
		kept = append(kept, a)
	}
	clear(r.Attrs[len(kept):]) // let the dropped values go
	r.Attrs = kept
	return dropped
}

// hasForbidden reports a string (or object key) with a character Orion
// refuses anywhere in v.
func hasForbidden(v any, depth int) bool {
	if depth > maxDepth {
		return false // Validate refuses it
	}
	switch x := v.(type) {
	case string:
		return strings.ContainsAny(x, forbidden)
	case []any:
		for _, e := range x {
			if hasForbidden(e, depth+1) {
				return true
			}
		}
	case map[string]any:
		for k, e := range x {
			if strings.ContainsAny(k, forbidden) || hasForbidden(e, depth+1) {
				return true
			}
		}
	}
	return false
}

// Validate checks a reading against the NGSI rules: device id, attribute
// names and types, forbidden characters in values, finite numbers, limits.
// Call DropOrionInvalid first to drop the attributes Orion would refuse
// rather than refusing the whole reading for them.
func (r *Reading) Validate() error {
	if !ValidID(r.Device) {
		return fmt.Errorf("%w: device id %q must match [A-Za-z0-9._-]{1,%d}", ErrInvalid, clip(r.Device), MaxIDLen)
	}
	if len(r.Attrs) == 0 {
		return fmt.Errorf("%w: no attributes", ErrInvalid)
	}
	if len(r.Attrs) > MaxAttrs {
		return fmt.Errorf("%w: %d attributes, at most %d", ErrTooLarge, len(r.Attrs), MaxAttrs)
	}
	for i, a := range r.Attrs {
		if !validAttrName(a.Name) {
			return fmt.Errorf("%w: attribute name %q is not a valid NGSI name", ErrInvalid, clip(a.Name))
		}
		if i > 0 && r.Attrs[i-1].Name >= a.Name {
			return fmt.Errorf("%w: attributes not sorted or duplicated at %q", ErrInvalid, a.Name)
		}
		if !validName(a.Type) {
			return fmt.Errorf("%w: attribute %s: type %q is not a valid NGSI type", ErrInvalid, a.Name, clip(a.Type))
		}
		if err := checkValue("attribute "+a.Name, a.Value, 0); err != nil {
			return err
		}
	}
	return nil
}

const maxDepth = 8

func checkValue(field string, v any, depth int) error {
	if depth > maxDepth {
		return fmt.Errorf("%w: %s nested deeper than %d", ErrInvalid, field, maxDepth)
	}
	switch x := v.(type) {
	case nil, bool:
		return nil
	case float64:
		if math.IsNaN(x) || math.IsInf(x, 0) {
			return fmt.Errorf("%w: %s is not a finite number", ErrInvalid, field)
		}
		return nil
	case string:
		return checkText(field, x)
	case []any:
		for i, e := range x {
			if err := checkValue(fmt.Sprintf("%s[%d]", field, i), e, depth+1); err != nil {
				return err
			}
		}
		return nil
	case map[string]any:
		for k, e := range x {
			if err := checkText(field+" key", k); err != nil {
				return err
			}
			if err := checkValue(field+"."+k, e, depth+1); err != nil {
				return err
			}
		}
		return nil
	default:
		return fmt.Errorf("%w: %s has unsupported value type %T", ErrInvalid, field, v)
	}
}

// Reserved top-level keys of an MQTT or JSON-lines payload that carry the
// observation time instead of an attribute. TimeInstant is the FIWARE
// convention; observedAt the NGSI-LD one.
var timeKeys = []string{"TimeInstant", "observedAt"}

// Parse decodes a JSON payload into the attributes and optional observation
// time of a reading. Two forms are accepted, also mixed per attribute:
//
//	{"temperature": 21.5, "on": true}                         flat: types inferred
//	{"temperature": {"value": 21.5, "type": "Float"}}          NGSI-like
//
// An object value is taken as NGSI-like only when it has a "value" key and no
// keys other than "value", "type" and "metadata" (metadata is dropped);
// any other object is a StructuredValue. A top-level "TimeInstant" or
// "observedAt" string (RFC 3339) is the observation time.
func Parse(payload []byte) (attrs []Attribute, observed time.Time, err error) {
	if len(payload) > MaxPayloadBytes {
		return nil, time.Time{}, fmt.Errorf("%w: payload of %d bytes, at most %d", ErrTooLarge, len(payload), MaxPayloadBytes)
	}
	var top map[string]json.RawMessage
	if err := json.Unmarshal(payload, &top); err != nil {
		return nil, time.Time{}, fmt.Errorf("%w: payload is not a JSON object: %v", ErrInvalid, err)
	}
	for _, k := range timeKeys {
		raw, ok := top[k]
		if !ok {
			continue
		}
		delete(top, k)
		t, err := parseTime(raw)
		if err != nil {
			return nil, time.Time{}, fmt.Errorf("%w: %s: %v", ErrInvalid, k, err)
		}
		observed = t
	}
	if len(top) > MaxAttrs {
		return nil, time.Time{}, fmt.Errorf("%w: %d attributes, at most %d", ErrTooLarge, len(top), MaxAttrs)
	}
	attrs = make([]Attribute, 0, len(top))
	for name, raw := range top {
		a, err := parseAttr(name, raw)
		if err != nil {
			return nil, time.Time{}, err
		}
		attrs = append(attrs, a)
	}
	sort.Slice(attrs, func(i, j int) bool { return attrs[i].Name < attrs[j].Name })
	return attrs, observed, nil
}

func parseTime(raw json.RawMessage) (time.Time, error) {
	var s string
	if err := json.Unmarshal(raw, &s); err != nil {
		return time.Time{}, errors.New("must be an RFC 3339 string")
	}
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		return time.Time{}, fmt.Errorf("must be RFC 3339: %q", clip(s))
	}
	return t.UTC(), nil
}

func parseAttr(name string, raw json.RawMessage) (Attribute, error) {
	var v any
	if err := json.Unmarshal(raw, &v); err != nil {
		return Attribute{}, fmt.Errorf("%w: attribute %q: %v", ErrInvalid, clip(name), err)
	}
	if obj, ok := v.(map[string]any); ok {
		if val, ok := obj["value"]; ok && ngsiShaped(obj) {
			typ, _ := obj["type"].(string)
			if _, present := obj["type"]; present && typ == "" {
				return Attribute{}, fmt.Errorf("%w: attribute %q: type must be a non-empty string", ErrInvalid, clip(name))
			}
			if typ == "" {
				typ = inferType(val)
			}
			return Attribute{Name: name, Type: typ, Value: val}, nil
		}
	}
	return Attribute{Name: name, Type: inferType(v), Value: v}, nil
}

func ngsiShaped(obj map[string]any) bool {
	for k := range obj {
		if k != "value" && k != "type" && k != "metadata" {
			return false
		}
	}
	return true
}

func inferType(v any) string {
	switch v.(type) {
	case float64:
		return TypeNumber
	case bool:
		return TypeBoolean
	case string:
		return TypeText
	case nil:
		return "None"
	default:
		return TypeStructured
	}
}

// clip shortens untrusted input for error messages so that one bad payload
// cannot flood a log line.
func clip(s string) string { return logtext.Clip(s, 64) }
