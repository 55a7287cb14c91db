// Package envelope seals a Reading into a signed envelope (a compact JWS) and
// verifies envelopes and the NGSI entities that carry them.
//
// The signed part carries the gateway id, the device id, the per-device
// sequence number, the observation time and every attribute, so that a
// changed value, a replay or a re-ordering is detectable downstream with only
// the device's key. Any service may import this package to verify readings;
// it depends on nothing else of edgegate but the Reading type.
//
// # Keys derived from K1/K2
//
// A device registered on the platform has two secrets, K1 and K2. The HS256
// signing key is derived, never used raw, so that the signature does not
// expose the platform credentials and each device gets an independent key:
//
//	key = HKDF-SHA256(secret = K1 || 0x00 || K2,
//	                  salt   = "edgegate/reading-key/v1",
//	                  info   = device id, length = 32 bytes)
//
// The MQTT password of a device on the gateway's local broker is derived
// the same way, with its own label, so it reveals neither K1/K2 nor the
// signing key:
//
//	password = base64url(HKDF-SHA256(secret = K1 || 0x00 || K2,
//	                     salt = "edgegate/mqtt-password/v1", info = device id, 24 bytes))
//
// The key id placed in the protected header is "hs256-" followed by the
// unpadded base64url of the first 9 bytes of SHA-256("edgegate/kid/v1" || key):
// it names the key without revealing it, so a verifier can tell "signed with
// another key" from "changed after signing".
package envelope

import (
	"bytes"
	"crypto/hkdf"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"time"

	"github.com/edgegate/edgegate/reading"
	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jws"
)

// Version of the envelope claims format.
const Version = 1

// MaxEnvelopeBytes bounds what Open parses, before any decoding.
const MaxEnvelopeBytes = 1 << 20

// DefaultSignatureAttr is the NGSI attribute that carries the compact JWS.
const DefaultSignatureAttr = "signature"

// Verdicts callers branch on (errors.Is).
var (
	// ErrMalformed: not a compact JWS of an edgegate envelope.
	ErrMalformed = errors.New("malformed envelope")
	// ErrWrongKey: signed by a key other than the one given.
	ErrWrongKey = errors.New("signed with a different key")
	// ErrTampered: the signed content or the entity was changed after signing.
	ErrTampered = errors.New("tampered")
)

// Key is a device's signing key. Its String form never shows the secret.
type Key struct {
	id     string
	alg    jwa.SignatureAlgorithm
	secret []byte
	hdr    string // base64url of the protected header, rendered once per key
}

// DeriveHS256 derives the HS256 reading key of a device from its K1 and K2.
func DeriveHS256(deviceID, k1, k2 string) (Key, error) {
	if k1 == "" || k2 == "" {
		return Key{}, errors.New("derive key: k1 and k2 must both be set")
	}
	ikm := make([]byte, 0, len(k1)+1+len(k2))
	ikm = append(append(append(ikm, k1...), 0), k2...)
	secret, err := hkdf.Key(sha256.New, ikm, []byte("edgegate/reading-key/v1"), deviceID, 32)
	if err != nil {
		return Key{}, fmt.Errorf("derive key: %w", err)
	}
	h := sha256.New()
	h.Write([]byte("edgegate/kid/v1"))
	h.Write(secret)
	kid := "hs256-" + base64.RawURLEncoding.EncodeToString(h.Sum(nil)[:9])
	return Key{id: kid, alg: jwa.HS256, secret: secret, hdr: headerB64(string(jwa.HS256), kid)}, nil
}

// DeriveMQTTPassword derives a device's password on the local MQTT broker
// from its K1 and K2 (32 base64url characters).
func DeriveMQTTPassword(deviceID, k1, k2 string) (string, error) {
	if k1 == "" || k2 == "" {
		return "", errors.New("derive MQTT password: k1 and k2 must both be set")
	}
	ikm := make([]byte, 0, len(k1)+1+len(k2))
	ikm = append(append(append(ikm, k1...), 0), k2...)
	b, err := hkdf.Key(sha256.New, ikm, []byte("edgegate/mqtt-password/v1"), deviceID, 24)
	if err != nil {
		return "", fmt.Errorf("derive MQTT password: %w", err)
	}
	return base64.RawURLEncoding.EncodeToString(b), nil
}

// ID is the key id placed in the JWS protected header.
func (k Key) ID() string { return k.id }

// String names the key without its secret.
func (k Key) String() string { return string(k.alg) + " key " + k.id }

// GoString keeps %#v from printing the secret.
func (k Key) GoString() string { return k.String() }

// Attr is one signed attribute value.
type Attr struct {
	Type  string `json:"type"`
	Value any    `json:"value"`
}

// Claims is the signed content of an envelope.
type Claims struct {
	Version int             `json:"v"`
	Gateway string          `json:"gw"`
	Device  string          `json:"dev"`
	Seq     uint64          `json:"seq"`
	Time    time.Time       `json:"t"`
	Attrs   map[string]Attr `json:"attrs"`
}

// ClaimsOf builds the claims of a validated reading.
func ClaimsOf(gateway string, seq uint64, r *reading.Reading) Claims {
	attrs := make(map[string]Attr, len(r.Attrs))
	for _, a := range r.Attrs {
		attrs[a.Name] = Attr{Type: a.Type, Value: a.Value}
	}
	return Claims{Version: Version, Gateway: gateway, Device: r.Device, Seq: seq, Time: r.Time.UTC(), Attrs: attrs}
}

// Seal signs the claims and returns the compact JWS.
//
// The compact serialization is assembled here, in one buffer, around jwx's
// HMAC signer (jws.NewSigner): the protected header is rendered once per
// key and the claims by hand (encode.go). The result is exactly what
// jws.Sign produces for the same header and payload; Open verifies it
// through jwx.
func Seal(k Key, c Claims) (string, error) {
	if len(k.secret) == 0 {
		return "", errors.New("seal envelope: no key")
	}
	hdr := k.hdr
	if hdr == "" {
		hdr = headerB64(string(k.alg), k.id)
	}
	signer, err := jws.NewSigner(k.alg)
	if err != nil {
		return "", fmt.Errorf("seal envelope: %w", err)
	}
	payload, err := appendClaims(make([]byte, 0, 256+64*len(c.Attrs)), &c)
	if err != nil {
		return "", fmt.Errorf("seal envelope: %w", err)
	}
	enc := base64.RawURLEncoding
	const sigLen = 64 // base64url of a SHA-512 HMAC, the longest HS* signature
	out := make([]byte, 0, len(hdr)+1+enc.EncodedLen(len(payload))+1+sigLen)
	out = append(out, hdr...)
	out = append(out, '.')
	out = enc.AppendEncode(out, payload)
	sig, err := signer.Sign(out, k.secret)
	if err != nil {
		return "", fmt.Errorf("seal envelope: %w", err)
	}
	out = append(out, '.')
	out = enc.AppendEncode(out, sig)
	return string(out), nil
}

// Open verifies a compact JWS with the given key, the algorithm pinned to the
// key, and returns its claims. The verdict is ErrMalformed, ErrWrongKey or
// ErrTampered.
func Open(compact string, k Key) (Claims, error) {
	if len(compact) > MaxEnvelopeBytes {
		return Claims{}, fmt.Errorf("%w: %d bytes, at most %d", ErrMalformed, len(compact), MaxEnvelopeBytes)
	}
	msg, err := jws.Parse([]byte(compact), jws.WithCompact())
	if err != nil {
		return Claims{}, fmt.Errorf("%w: %v", ErrMalformed, err)
	}
	sigs := msg.Signatures()
	if len(sigs) != 1 {
		return Claims{}, fmt.Errorf("%w: %d signatures, want 1", ErrMalformed, len(sigs))
	}
	hdr := sigs[0].ProtectedHeaders()
	if hdr.Algorithm() != k.alg {
		// Covers "none" and algorithm confusion: the key decides the algorithm.
		return Claims{}, fmt.Errorf("%w: algorithm %q, key is %s", ErrWrongKey, hdr.Algorithm(), k.alg)
	}
	if hdr.KeyID() != k.id {
		return Claims{}, fmt.Errorf("%w: key id %q, given key is %q", ErrWrongKey, hdr.KeyID(), k.id)
	}
	payload, err := jws.Verify([]byte(compact), jws.WithKey(k.alg, k.secret))
	if err != nil {
		return Claims{}, fmt.Errorf("%w: signature does not match the content", ErrTampered)
	}
	var c Claims
	dec := json.NewDecoder(bytes.NewReader(payload))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&c); err != nil {
		return Claims{}, fmt.Errorf("%w: claims: %v", ErrMalformed, err)
	}
	if c.Version != Version {
		return Claims{}, fmt.Errorf("%w: claims version %d, want %d", ErrMalformed, c.Version, Version)
	}
	return c, nil
}

// Peek decodes the claims of an envelope WITHOUT verifying it, for display
// and routing only. Never trust its result.
func Peek(compact string) (Claims, error) {
	if len(compact) > MaxEnvelopeBytes {
		return Claims{}, fmt.Errorf("%w: %d bytes", ErrMalformed, len(compact))
	}
	msg, err := jws.Parse([]byte(compact), jws.WithCompact())
	if err != nil {
		return Claims{}, fmt.Errorf("%w: %v", ErrMalformed, err)
	}
	var c Claims
	if err := json.Unmarshal(msg.Payload(), &c); err != nil {
		return Claims{}, fmt.Errorf("%w: claims: %v", ErrMalformed, err)
	}
	return c, nil
}

// ngsiAttr is an NGSI v2 attribute as sent to and read back from a broker.
type ngsiAttr struct {
	Type     string                     `json:"type"`
	Value    any                        `json:"value"`
	Metadata map[string]json.RawMessage `json:"metadata,omitempty"`
}

// Body renders the NGSI v2 attribute update for a sealed reading: every
// attribute with its observation time as TimeInstant metadata, plus the
// signature attribute (type "string", value the compact JWS). Attributes
// are in name order, as json.Marshal of a map renders them.
func Body(c Claims, compact, sigAttr string) ([]byte, error) {
	if sigAttr == "" {
		sigAttr = DefaultSignatureAttr
	}
	if _, clash := c.Attrs[sigAttr]; clash {
		return nil, fmt.Errorf("render NGSI body: %w: attribute %q is reserved for the signature", reading.ErrInvalid, sigAttr)
	}
	meta := make([]byte, 0, 96)
	meta = append(meta, `,"metadata":{"TimeInstant":{"type":"DateTime","value":`...)
	meta = appendString(meta, c.Time.UTC().Format(time.RFC3339Nano))
	meta = append(meta, "}}}"...)
	b := make([]byte, 0, len(compact)+64+(len(meta)+64)*len(c.Attrs))
	b = append(b, '{')
	var err error
	for i, name := range sortedNames(c.Attrs, sigAttr) {
		if i > 0 {
			b = append(b, ',')
		}
		b = appendString(b, name)
		if name == sigAttr {
			b = append(b, `:{"type":"string","value":`...)
			b = appendString(b, compact)
			b = append(b, '}')
			continue
		}
		a := c.Attrs[name]
		b = append(b, `:{"type":`...)
		b = appendString(b, a.Type)
		b = append(b, `,"value":`...)
		if b, err = appendValue(b, a.Value); err != nil {
			return nil, fmt.Errorf("render NGSI body: %w", err)
		}
		b = append(b, meta...)
	}
	b = append(b, '}')
	if len(b) > reading.MaxBodyBytes*4 {
		return nil, fmt.Errorf("render NGSI body: %w: %d bytes", reading.ErrTooLarge, len(b))
	}
	return b, nil
}

// VerifyAttrs checks NGSI attributes — an update body or an entity read back
// from a broker (key-values other than attributes, such as "id" and "type",
// are ignored) — against the envelope in its signature attribute. Every
// signed attribute must be present with the signed type and value.
func VerifyAttrs(doc []byte, k Key, sigAttr string) (Claims, error) {
	if sigAttr == "" {
		sigAttr = DefaultSignatureAttr
	}
	if len(doc) > 4*MaxEnvelopeBytes {
		return Claims{}, fmt.Errorf("%w: document of %d bytes", ErrMalformed, len(doc))
	}
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(doc, &raw); err != nil {
		return Claims{}, fmt.Errorf("%w: not a JSON object: %v", ErrMalformed, err)
	}
	sigRaw, ok := raw[sigAttr]
	if !ok {
		return Claims{}, fmt.Errorf("%w: no %q attribute", ErrMalformed, sigAttr)
	}
	var sig ngsiAttr
	if err := json.Unmarshal(sigRaw, &sig); err != nil {
		return Claims{}, fmt.Errorf("%w: attribute %q: %v", ErrMalformed, sigAttr, err)
	}
	compact, ok := sig.Value.(string)
	if !ok {
		return Claims{}, fmt.Errorf("%w: attribute %q is not a string", ErrMalformed, sigAttr)
	}
	c, err := Open(compact, k)
	if err != nil {
		return Claims{}, err
	}
	if id, ok := raw["id"]; ok {
		var s string
		if json.Unmarshal(id, &s) == nil && s != c.Device {
			return c, fmt.Errorf("%w: entity %q carries a reading of device %q", ErrTampered, s, c.Device)
		}
	}
	for name, want := range c.Attrs {
		got, ok := raw[name]
		if !ok {
			return c, fmt.Errorf("%w: attribute %q is signed but missing", ErrTampered, name)
		}
		var a ngsiAttr
		if err := json.Unmarshal(got, &a); err != nil {
			return c, fmt.Errorf("%w: attribute %q: %v", ErrTampered, name, err)
		}
		if a.Type != want.Type {
			return c, fmt.Errorf("%w: attribute %q has type %q, signed %q", ErrTampered, name, a.Type, want.Type)
		}
		if !sameValue(a.Value, want.Value) {
			return c, fmt.Errorf("%w: attribute %q has a value other than the signed one", ErrTampered, name)
		}
	}
	return c, nil
}

// sameValue compares JSON values after a round trip, so that both sides have
// the types encoding/json produces.
func sameValue(a, b any) bool {
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
