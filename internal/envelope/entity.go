package envelope

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"reflect"
	"slices"
	"strconv"
	"time"

	"github.com/edgegate/edgegate/internal/reading"
)

// Metadata the gateway writes on every attribute of a reading.
const (
	// TimeInstantMeta is the FIWARE convention for an attribute's
	// observation time (type DateTime).
	TimeInstantMeta = "TimeInstant"
	// SignatureMetaType is the NGSI type of the signature metadata: "Text",
	// the type NGSI v2 itself gives a string value that has none
	// (orion-api.md, "Default attribute/metadata type": Text for strings),
	// rather than the IoT Directory's lower-case data types, which describe
	// device attributes, not metadata.
	SignatureMetaType = "Text"
	// timeInstantLayout renders an observation time as Orion stores a
	// DateTime: millisecond precision (orion-api.md, "Datetime support";
	// Orion keeps a DateTime as seconds with milliseconds), UTC.
	timeInstantLayout = "2006-01-02T15:04:05.999Z07:00"
)

// ngsiAttr is an NGSI v2 attribute as sent to and read back from a broker.
type ngsiAttr struct {
	Type     string                     `json:"type"`
	Value    any                        `json:"value"`
	Metadata map[string]json.RawMessage `json:"metadata,omitempty"`
}

// ngsiMeta is one metadata item of an attribute.
type ngsiMeta struct {
	Type  string `json:"type"`
	Value any    `json:"value"`
}

// Body renders the NGSI v2 attribute update (PATCH /v2/entities/{id}/attrs)
// of a sealed reading. Every attribute of c carries, as metadata, its
// observation time (TimeInstant, DateTime) and the compact JWS of the
// whole reading (sigMeta, default "signature", type Text):
//
//	{"temperature":{"type":"Number","value":21.5,"metadata":{
//	   "TimeInstant":{"type":"DateTime","value":"2026-11-26T05:00:00Z"},
//	   "signature":{"type":"Text","value":"<compact JWS>"}}}, ...}
//
// There is no signature attribute: stock Orion updates existing attributes
// only, and one the device's model lacks makes it answer 422 PartialUpdate
// (SNAP4CITY.md), while metadata on an attribute it has is stored with the
// value (orion-api.md, "Attribute metadata"). Each attribute carries the
// proof of the reading that last wrote it: an entity read back holds
// attributes written by different readings (a MySensors node sends one
// attribute per reading), and VerifyEntity checks each on its own.
//
// To leave out attributes Orion would refuse (their JWS still signs them),
// pass claims with those attributes removed; the JWS is not re-read.
// Attributes are in name order, as json.Marshal of a map renders them.
func Body(c Claims, compact, sigMeta string) ([]byte, error) {
	return renderBody(c, compact, sigMeta, false)
}

// PackBody is Body in the packed form the queue stores (packed.go):
// AppendBody(nil, PackBody(...)) is Body(...).
func PackBody(c Claims, compact, sigMeta string) ([]byte, error) {
	return renderBody(c, compact, sigMeta, true)
}

func renderBody(c Claims, compact, sigMeta string, packed bool) ([]byte, error) {
	if sigMeta == "" {
		sigMeta = DefaultSignatureAttr
	}
	if err := checkBodyArgs(sigMeta, len(c.Attrs)); err != nil {
		return nil, err
	}
	// The metadata are the same on every attribute: render them once.
	meta := make([]byte, 0, 128+len(compact))
	meta = append(meta, `,"metadata":{"TimeInstant":{"type":"DateTime","value":`...)
	meta = appendString(meta, c.Time.UTC().Format(timeInstantLayout))
	meta = append(meta, `},`...)
	meta = appendString(meta, sigMeta)
	meta = append(meta, `:{"type":"`+SignatureMetaType+`","value":`...)
	meta = appendString(meta, compact)
	meta = append(meta, "}}}"...)
	if sigMeta < TimeInstantMeta {
		// Keep json.Marshal's key order (sorted) whatever the name.
		meta = meta[:0]
		meta = append(meta, `,"metadata":{`...)
		meta = appendString(meta, sigMeta)
		meta = append(meta, `:{"type":"`+SignatureMetaType+`","value":`...)
		meta = appendString(meta, compact)
		meta = append(meta, `},"TimeInstant":{"type":"DateTime","value":`...)
		meta = appendString(meta, c.Time.UTC().Format(timeInstantLayout))
		meta = append(meta, "}}}"...)
	}
	size := (len(meta) + 96) * len(c.Attrs)
	if packed {
		size = len(meta) + 128*len(c.Attrs)
	}
	w := newBodyWriter(make([]byte, 0, size), meta, packed)
	var err error
	for _, name := range sortedNames(c.Attrs, "") {
		a := c.Attrs[name]
		w.begin()
		w.b = appendAttrHead(w.b, name, a.Type)
		if w.b, err = appendValue(w.b, a.Value); err != nil {
			return nil, fmt.Errorf("render NGSI body: %w", err)
		}
		if err := w.end(); err != nil {
			return nil, err
		}
	}
	return w.finish(), nil
}

// MaxBodyBytes is the largest NGSI body Body renders: Orion refuses a
// request payload over 1 MiB by default (-inReqPayloadMaxSize).
const MaxBodyBytes = 4 * reading.MaxBodyBytes

// Verdict is what per-attribute verification found for one attribute.
type Verdict string

// Verdicts of VerifyEntity.
const (
	// Verified: the attribute's value and type are those a reading of this
	// device signed, under one of the device's keys.
	Verified Verdict = "verified"
	// Unsigned: no signature metadata, and no verified reading of the
	// entity signs the attribute (never written by the gateway, e.g. the
	// latitude/longitude the IoT Directory creates). An attribute that a
	// verified reading signs but that carries no signature is Tampered.
	Unsigned Verdict = "unsigned"
	// Tampered: signed, but the value, type, time or entity differ from
	// what was signed, or the signature does not match its content.
	Tampered Verdict = "tampered"
	// WrongKey: signed with a key other than the device's.
	WrongKey Verdict = "wrong_key"
	// Malformed: the signature metadata is not a readable envelope.
	Malformed Verdict = "malformed"
)

// Bad reports whether the verdict is a failed proof (not merely unsigned).
func (v Verdict) Bad() bool { return v == Tampered || v == WrongKey || v == Malformed }

// AttrReport is the verification of one attribute of an entity.
type AttrReport struct {
	Name    string
	Verdict Verdict
	// Seq, Time and Gateway are those of the reading that signed the
	// attribute (set when the envelope opened, whatever the verdict).
	Seq     uint64
	Time    time.Time
	Gateway string
	// Detail says why, for a verdict other than Verified and Unsigned.
	Detail string
}

// EntityReport is the verification of an entity read back from a broker.
type EntityReport struct {
	ID, Type string
	Attrs    []AttrReport // by name
}

// Bad counts the attributes whose proof failed (Verdict.Bad).
func (r EntityReport) Bad() int {
	n := 0
	for _, a := range r.Attrs {
		if a.Verdict.Bad() {
			n++
		}
	}
	return n
}

// VerifyEntity verifies an entity as read back from Orion in its
// normalized form (GET /v2/entities/{id}?type=T):
//
//	{"id":"th-1","type":"T","temperature":{"type":"Number","value":21.5,
//	  "metadata":{"TimeInstant":{...},"signature":{"type":"Text","value":"<JWS>"}}}, ...}
//
// Each attribute is checked on its own against the JWS in its sigMeta
// metadata (default "signature"): the envelope opens with one of the
// device's keys (OpenWith: key by kid, algorithm pinned), was signed for
// this entity id, and signs this attribute with the same type and value —
// numbers compared as Orion renders them (nine decimals) — and, when a
// TimeInstant metadata is present, the same observation time to the
// millisecond Orion keeps. The error is for a document that is not an
// entity at all; verdicts are per attribute.
func VerifyEntity(doc []byte, keys []Key, sigMeta string) (EntityReport, error) {
	if sigMeta == "" {
		sigMeta = DefaultSignatureAttr
	}
	if len(doc) > 4*MaxEnvelopeBytes {
		return EntityReport{}, fmt.Errorf("%w: entity of %d bytes", ErrMalformed, len(doc))
	}
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(doc, &raw); err != nil {
		return EntityReport{}, fmt.Errorf("%w: entity is not a JSON object: %v", ErrMalformed, err)
	}
	var rep EntityReport
	if json.Unmarshal(raw["id"], &rep.ID) != nil || rep.ID == "" {
		return EntityReport{}, fmt.Errorf("%w: entity has no string \"id\"", ErrMalformed)
	}
	_ = json.Unmarshal(raw["type"], &rep.Type) // optional
	names := make([]string, 0, len(raw))
	for name := range raw {
		if name != "id" && name != "type" {
			names = append(names, name)
		}
	}
	slices.Sort(names)
	opened := make(map[string]openResult) // one Open per distinct JWS
	for _, name := range names {
		rep.Attrs = append(rep.Attrs, verifyAttr(rep.ID, name, raw[name], keys, sigMeta, opened))
	}
	strippedSignatures(&rep, opened)
	return rep, nil
}

// strippedSignatures turns Unsigned into Tampered for an attribute that a
// verified reading of this entity signed: the gateway wrote it with its
// signature, and Orion keeps metadata that an update does not name, so an
// attribute without one had its proof removed (or was replaced whole).
// Without this rule, deleting an attribute's signature metadata along with
// changing its value would read as merely "unsigned".
func strippedSignatures(rep *EntityReport, opened map[string]openResult) {
	signedBy := map[string]uint64{} // attribute -> newest verified seq naming it
	for _, res := range opened {
		if res.err != nil || res.c.Device != rep.ID {
			continue
		}
		for name := range res.c.Attrs {
			if res.c.Seq >= signedBy[name] {
				signedBy[name] = res.c.Seq
			}
		}
	}
	for i := range rep.Attrs {
		a := &rep.Attrs[i]
		if seq, ok := signedBy[a.Name]; ok && a.Verdict == Unsigned {
			a.Verdict = Tampered
			a.Detail = fmt.Sprintf("signed by reading seq %d, but its signature was removed", seq)
		}
	}
}

type openResult struct {
	c   Claims
	err error
}

// verifyAttr checks one attribute of entity id against its signature
// metadata.
func verifyAttr(id, name string, raw json.RawMessage, keys []Key, sigMeta string, opened map[string]openResult) AttrReport {
	r := AttrReport{Name: name}
	var a ngsiAttr
	if err := json.Unmarshal(raw, &a); err != nil {
		r.Verdict, r.Detail = Malformed, "not an NGSI attribute object"
		return r
	}
	sigRaw, ok := a.Metadata[sigMeta]
	if !ok {
		r.Verdict = Unsigned
		return r
	}
	var sig ngsiMeta
	compact, isStr := "", false
	if json.Unmarshal(sigRaw, &sig) == nil {
		compact, isStr = sig.Value.(string)
	}
	if !isStr {
		r.Verdict, r.Detail = Malformed, fmt.Sprintf("metadata %q is not a string", sigMeta)
		return r
	}
	res, ok := opened[compact]
	if !ok {
		res.c, res.err = OpenWith(compact, keys)
		opened[compact] = res
	}
	c, err := res.c, res.err
	r.Seq, r.Time, r.Gateway = c.Seq, c.Time, c.Gateway
	switch {
	case errors.Is(err, ErrWrongKey):
		r.Verdict, r.Detail = WrongKey, err.Error()
		return r
	case errors.Is(err, ErrTampered):
		r.Verdict, r.Detail = Tampered, err.Error()
		return r
	case err != nil:
		r.Verdict, r.Detail = Malformed, err.Error()
		return r
	case c.Kind != "":
		// A command the gateway sent the device, replayed as a reading.
		r.Verdict, r.Detail = Tampered, "a "+c.Kind+" envelope, not a reading"
		return r
	}
	r.Verdict = Tampered
	want, signed := c.Attrs[name]
	switch {
	case c.Device != id:
		r.Detail = fmt.Sprintf("signed for device %q, found in entity %q", c.Device, id)
	case !signed:
		r.Detail = fmt.Sprintf("reading seq %d does not sign attribute %q", c.Seq, name)
	case a.Type != want.Type:
		r.Detail = fmt.Sprintf("type %q, signed %q", a.Type, want.Type)
	case !orionEqual(a.Value, want.Value):
		r.Detail = "value other than the signed one"
	default:
		if d := timeMismatch(a.Metadata[TimeInstantMeta], c.Time); d != "" {
			r.Detail = d
			return r
		}
		r.Verdict = Verified
	}
	return r
}

// timeMismatch compares a TimeInstant metadata, when present, with the
// signed time at Orion's millisecond precision; "" when they agree.
func timeMismatch(raw json.RawMessage, signed time.Time) string {
	if raw == nil {
		return ""
	}
	var m ngsiMeta
	var s string
	if json.Unmarshal(raw, &m) == nil {
		s, _ = m.Value.(string)
	}
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		return "TimeInstant metadata is not an RFC 3339 time"
	}
	if d := t.Sub(signed); d >= time.Millisecond || d <= -time.Millisecond {
		return fmt.Sprintf("TimeInstant %s, signed %s", t.UTC().Format(time.RFC3339Nano), signed.UTC().Format(time.RFC3339Nano))
	}
	return ""
}

// orionEqual compares a value read back from Orion with the signed one.
// Orion stores numbers as doubles and renders them through double2string
// (src/lib/common/string.cpp, Orion 3.12): "%.9f" with trailing zeros
// trimmed, or an integer when the fraction is within 1e-9 of one, so a
// signed 0.1234567891 comes back as 0.123456789.
func orionEqual(got, signed any) bool {
	switch s := signed.(type) {
	case float64:
		g, ok := got.(float64)
		return ok && (g == s || g == orionNumber(s))
	case []any:
		g, ok := got.([]any)
		if !ok || len(g) != len(s) {
			return false
		}
		for i := range s {
			if !orionEqual(g[i], s[i]) {
				return false
			}
		}
		return true
	case map[string]any:
		g, ok := got.(map[string]any)
		if !ok || len(g) != len(s) {
			return false
		}
		for k, v := range s {
			gv, ok := g[k]
			if !ok || !orionEqual(gv, v) {
				return false
			}
		}
		return true
	}
	return sameValue(got, signed)
}

// orionNumber is f as Orion 3.12's double2string renders it, read back.
func orionNumber(f float64) float64 {
	if math.IsNaN(f) || math.IsInf(f, 0) || math.Abs(f) >= 1<<63 {
		return f
	}
	ip := math.Trunc(f)
	diff := math.Abs(f - ip)
	switch {
	case diff > 0.9999999998:
		// As Orion does, whatever the sign (intPart += 1).
		return ip + 1
	case diff < 0.000000001:
		return ip
	}
	g, err := strconv.ParseFloat(strconv.FormatFloat(f, 'f', 9, 64), 64)
	if err != nil {
		return f
	}
	return g
}

// sameValue compares JSON values after a round trip, so that both sides have
// the types encoding/json produces.
func sameValue(a, b any) bool {
	// Both sides usually come from encoding/json already (float64, string,
	// map[string]any...): equal as they are, no round trip needed.
	if reflect.DeepEqual(a, b) {
		return true
	}
	norm := func(v any) any {
		bs, err := json.Marshal(v)
		if err != nil {
			return v
		}
		var out any
		if json.Unmarshal(bs, &out) != nil {
			return v
		}
		return out
	}
	return reflect.DeepEqual(norm(a), norm(b))
}
