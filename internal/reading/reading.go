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
	"unicode/utf8"

	"github.com/edgegate/edgegate/internal/logx"
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
	Kind  string `json:"kind"`            // "mqtt", "radio" or "modbus"
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

// MaxDeviceIDLen is the IoT Directory's limit for a device id: the id
// column of its devices table is varchar(255) (iot-directory
// web/createtables.sql).
const MaxDeviceIDLen = 255

// ValidateDeviceID is THE device id rule of the gateway, applied at every
// entry point (configuration, devices file, policy bundles and ownership
// rows, MQTT topics, radio bindings, device add): the platform's id syntax,
// [A-Za-z0-9._-]{1,255}. device.php applies config.php's
// $regphp = "/[^a-zA-Z0-9:._-]/" to the id and common.php
// checkSensibleCharacters refuses ':' '/' '%' in it (the id is the last
// part of the element id org:broker:id). "." and ".." are refused too: the
// id becomes a path segment (PATCH /v2/entities/{id}/attrs), and a client
// or proxy resolves "/v2/entities/../attrs" to another resource.
func ValidateDeviceID(id string) error {
	if id == "" {
		return errors.New("device id is empty")
	}
	if len(id) > MaxDeviceIDLen {
		return fmt.Errorf("device id %q is longer than %d characters", clip(id), MaxDeviceIDLen)
	}
	if id == "." || id == ".." {
		return fmt.Errorf("device id %q is not allowed: it is a relative path segment in /v2/entities/{id}", id)
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			what := fmt.Sprintf("0x%02x", c)
			if c > 0x20 && c < 0x7f {
				what = fmt.Sprintf("%q", rune(c))
			}
			return fmt.Errorf("device id %q: byte %d (%s) is not allowed: the IoT directory accepts only letters, digits and . _ - in a device id", clip(id), i, what)
		}
	}
	return nil
}

// ValidDeviceID reports whether ValidateDeviceID accepts id.
func ValidDeviceID(id string) bool { return ValidateDeviceID(id) == nil }

// ValidSegmentID reports whether s is a valid id (ValidID) that can stand
// as one path segment of a URL or one MQTT topic level: never "." or "..",
// which a client or proxy resolves to another resource. The gateway id is
// one (/edgegate/v1/gateways/{gw}/policy); device ids have the stricter
// ValidateDeviceID.
func ValidSegmentID(s string) bool { return ValidID(s) && s != "." && s != ".." }

// ValidID reports whether s is a valid NGSI v2 id or type as the broker
// filter accepts: [A-Za-z0-9._-]{1,256}. Device ids have a stricter rule,
// ValidateDeviceID.
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
		if !nameBytes[s[i]] {
			return false
		}
	}
	return true
}

// nameBytes is validName's byte test as a table (it runs for every
// attribute's name and type, twice per reading).
var nameBytes = func() (t [256]bool) {
	for c := '!'; c < 0x7f; c++ {
		t[c] = !strings.ContainsRune(forbidden+"&?/#", c)
	}
	return t
}()

// reserved are the attribute names NGSI v2 reserves (orion-api.md,
// "Attribute names restrictions" and "Builtin Attributes"): id and type
// (Orion answers 400 "invalid input, 'id' as attribute",
// errorMessages.h ERROR_DESC_BAD_REQUEST_ID_AS_ATTR), geo:distance and *
// (query syntax), and the builtin attributes, which a device must not
// overwrite (dateExpires would make Orion delete the entity).
var reserved = map[string]bool{
	"id": true, "type": true, "geo:distance": true, "*": true,
	"dateCreated": true, "dateModified": true, "dateExpires": true,
	"alterationType": true, "servicePath": true,
}

// ReservedName reports whether name is an attribute name NGSI reserves.
func ReservedName(name string) bool { return reserved[name] }

func validAttrName(s string) bool { return !reserved[s] && validName(s) }

// numericTypes are the attribute types whose value must be a finite JSON
// number: NGSI v2's Number and the numeric value types of the IoT
// Directory (float, integer; compared ignoring case).
var numericTypes = []string{TypeNumber, "Float", "Integer", "Double"}

func numericType(t string) bool {
	for _, n := range numericTypes {
		if strings.EqualFold(t, n) {
			return true
		}
	}
	return false
}

// finiteNumber reports whether v is acceptable as the value of a numeric
// attribute: a finite JSON number, or null (NGSI's "no value", which Orion
// stores for any type). The strings "NaN", "Inf" or "21.5" are not.
func finiteNumber(v any) bool {
	switch x := v.(type) {
	case nil:
		return true
	case float64:
		return !math.IsNaN(x) && !math.IsInf(x, 0)
	}
	return false
}

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
	// DropReservedName: a name NGSI reserves (id, type, the builtin
	// attributes; see reserved).
	DropReservedName = "reserved_name"
	// DropNotFinite: a numeric attribute (type Number, Float, Integer)
	// whose value is not a finite JSON number ("NaN", "Inf", a string).
	DropNotFinite = "not_finite"
)

// Reasons a whole payload is refused by Parse, beside ErrInvalid and
// ErrTooLarge; metric label values (a bounded set).
const (
	// ReasonBadUTF8: the payload is not valid UTF-8, or a JSON string in
	// it escapes a lone surrogate; decoding would silently turn it into
	// U+FFFD, so a reading nobody sent would be signed.
	ReasonBadUTF8 = "bad_utf8"
	// ReasonNotFinite: a JSON number that does not fit a float64 (1e999):
	// it would become +Inf, which JSON cannot carry.
	ReasonNotFinite = "not_finite"
)

// reasonError is ErrInvalid with a finer reason to count.
type reasonError struct {
	reason string
	msg    string
}

func (e *reasonError) Error() string { return ErrInvalid.Error() + ": " + e.msg }
func (e *reasonError) Unwrap() error { return ErrInvalid }

// Reason returns the finer reason of an error from Parse or Validate
// (ReasonBadUTF8, ReasonNotFinite, DropReservedName), or "" when it has
// none beyond ErrInvalid or ErrTooLarge.
func Reason(err error) string {
	var re *reasonError
	if errors.As(err, &re) {
		return re.reason
	}
	return ""
}

// Dropped is an attribute DropOrionInvalid left out. Name is clipped for
// logs; the value is never kept, it may be anything a device sent.
type Dropped struct {
	Name   string
	Reason string // DropForbiddenChars, DropBadName, DropBadType
}

// DropOrionInvalid removes the attributes stock Orion would refuse, so
// that the valid ones beside them are still delivered: Orion answers 400
// to the whole PATCH for one bad attribute (SNAP4CITY.md). It returns
// what it removed, in order. Validate refuses a reading holding any of
// them, by the same rules (device-signed readings cannot be trimmed).
// Values of an unsupported type are left to Validate.
func (r *Reading) DropOrionInvalid() []Dropped {
	var dropped []Dropped
	kept := r.Attrs[:0]
	for _, a := range r.Attrs {
		reason := ""
		switch {
		case reserved[a.Name]:
			reason = DropReservedName
		case !validName(a.Name):
			reason = DropBadName
		case !validName(a.Type):
			reason = DropBadType
		case numericType(a.Type) && !finiteNumber(a.Value):
			reason = DropNotFinite
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
	if err := ValidateDeviceID(r.Device); err != nil {
		return fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	if len(r.Attrs) == 0 {
		return fmt.Errorf("%w: no attributes", ErrInvalid)
	}
	if len(r.Attrs) > MaxAttrs {
		return fmt.Errorf("%w: %d attributes, at most %d", ErrTooLarge, len(r.Attrs), MaxAttrs)
	}
	for i, a := range r.Attrs {
		if reserved[a.Name] {
			return &reasonError{DropReservedName, fmt.Sprintf("attribute name %q is reserved by NGSI", a.Name)}
		}
		if !validAttrName(a.Name) {
			return fmt.Errorf("%w: attribute name %q is not a valid NGSI name", ErrInvalid, clip(a.Name))
		}
		if i > 0 && r.Attrs[i-1].Name >= a.Name {
			return fmt.Errorf("%w: attributes not sorted or duplicated at %q", ErrInvalid, a.Name)
		}
		if !validName(a.Type) {
			return fmt.Errorf("%w: attribute %s: type %q is not a valid NGSI type", ErrInvalid, a.Name, clip(a.Type))
		}
		if numericType(a.Type) && !finiteNumber(a.Value) {
			return &reasonError{DropNotFinite, fmt.Sprintf("attribute %s of type %s must be a finite JSON number", a.Name, clip(a.Type))}
		}
		// The field name of an error is built only for a bad value: no
		// allocation per attribute on the way through.
		if !valueOK(a.Value, 0) {
			if err := checkValue("attribute "+a.Name, a.Value, 0); err != nil {
				return err
			}
		}
	}
	return nil
}

const maxDepth = 8

// valueOK reports whether checkValue accepts v, without building the
// field names checkValue words its errors with.
func valueOK(v any, depth int) bool {
	if depth > maxDepth {
		return false
	}
	switch x := v.(type) {
	case nil, bool:
		return true
	case float64:
		return !math.IsNaN(x) && !math.IsInf(x, 0)
	case string:
		return !strings.ContainsAny(x, forbidden)
	case []any:
		for _, e := range x {
			if !valueOK(e, depth+1) {
				return false
			}
		}
		return true
	case map[string]any:
		for k, e := range x {
			if strings.ContainsAny(k, forbidden) || !valueOK(e, depth+1) {
				return false
			}
		}
		return true
	}
	return false
}

func checkValue(field string, v any, depth int) error {
	if depth > maxDepth {
		return fmt.Errorf("%w: %s nested deeper than %d", ErrInvalid, field, maxDepth)
	}
	switch x := v.(type) {
	case nil, bool:
		return nil
	case float64:
		if math.IsNaN(x) || math.IsInf(x, 0) {
			return &reasonError{ReasonNotFinite, field + " is not a finite number"}
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
	// encoding/json replaces invalid UTF-8 with U+FFFD without a word;
	// refuse it here instead of signing text the device never sent.
	if !utf8.Valid(payload) {
		return nil, time.Time{}, &reasonError{ReasonBadUTF8, fmt.Sprintf("payload is not valid UTF-8 at byte %d", invalidUTF8At(payload))}
	}
	if attrs, observed, ok := parseFast(payload); ok {
		return attrs, observed, nil
	}
	return parseStd(payload)
}

// parseStd is Parse through encoding/json: the reference the fast parser
// (parse.go) is fuzzed against, and the path that words every refusal.
// payload is within MaxPayloadBytes and valid UTF-8.
func parseStd(payload []byte) (attrs []Attribute, observed time.Time, err error) {
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
		if strings.ContainsRune(name, utf8.RuneError) && !sentReplacement(payload) {
			return nil, time.Time{}, &reasonError{ReasonBadUTF8, "an attribute name has a \\u escape that is not a valid UTF-16 character"}
		}
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
		var te *json.UnmarshalTypeError
		if errors.As(err, &te) && strings.HasPrefix(te.Value, "number") {
			return Attribute{}, &reasonError{ReasonNotFinite, fmt.Sprintf("attribute %q: a number out of range (not a finite float64)", clip(name))}
		}
		return Attribute{}, fmt.Errorf("%w: attribute %q: %v", ErrInvalid, clip(name), err)
	}
	// A lone surrogate escape ("\ud800") decodes to U+FFFD as well; a
	// U+FFFD the device really sent is written as itself or \ufffd.
	if hasReplacement(v, 0) && !sentReplacement(raw) {
		return Attribute{}, &reasonError{ReasonBadUTF8, fmt.Sprintf("attribute %q: a \\u escape that is not a valid UTF-16 character", clip(name))}
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

// invalidUTF8At returns the offset of the first invalid UTF-8 sequence.
func invalidUTF8At(b []byte) int {
	for i := 0; i < len(b); {
		r, n := utf8.DecodeRune(b[i:])
		if r == utf8.RuneError && n <= 1 {
			return i
		}
		i += n
	}
	return len(b)
}

// hasReplacement reports a U+FFFD in a string or key anywhere in v.
func hasReplacement(v any, depth int) bool {
	if depth > maxDepth {
		return false // Validate refuses it
	}
	switch x := v.(type) {
	case string:
		return strings.ContainsRune(x, utf8.RuneError)
	case []any:
		for _, e := range x {
			if hasReplacement(e, depth+1) {
				return true
			}
		}
	case map[string]any:
		for k, e := range x {
			if strings.ContainsRune(k, utf8.RuneError) || hasReplacement(e, depth+1) {
				return true
			}
		}
	}
	return false
}

// sentReplacement reports whether raw JSON spells U+FFFD itself, literally
// or as an escape.
func sentReplacement(raw []byte) bool {
	s := string(raw)
	return strings.ContainsRune(s, utf8.RuneError) || strings.Contains(strings.ToLower(s), `\ufffd`)
}

// clip shortens untrusted input for error messages so that one bad payload
// cannot flood a log line.
func clip(s string) string { return logx.Clip(s, 64) }
