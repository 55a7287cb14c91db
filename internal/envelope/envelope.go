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
//
// # Asymmetric keys and device-signed readings
//
// A device may instead have EdDSA (Ed25519) or ES256 (ECDSA P-256) keys
// (keys.go): GenerateKey, ParseKey/ParseKeys (JWK, JWK Set, PEM),
// PublicJWK. Their kid is the RFC 7638 thumbprint of the public key. The
// private key is held either by the gateway (in its encrypted store) or by
// the device itself. A device that signs its own readings sends, as its
// MQTT payload, a compact JWS in exactly the format Seal produces:
//
//	protected header  {"alg":"EdDSA","kid":"<RFC 7638 thumbprint>","typ":"edgegate-reading+jws"}
//	                  (alg EdDSA or ES256, the kid of a key registered for the device)
//	payload           {"v":1,"gw":"","dev":"<device id>","seq":<n>,"t":"<RFC 3339 time>",
//	                   "attrs":{"<name>":{"type":"<NGSI type>","value":<JSON value>},...}}
//
// "gw" is empty: the device, not a gateway, vouches for the content. "seq"
// starts at 1 and rises with every reading, across the device's reboots
// (keep it in flash, or start from a clock-derived value); the gateway
// refuses a seq not above the last one it accepted, and recognises an
// unchanged retransmission as a duplicate. The gateway forwards the JWS
// untouched as the signature metadata of every attribute, with the NGSI
// attributes taken from the verified claims, so a verifier needs only the
// device's public key.
//
// # Provenance in a stock Orion
//
// Body renders a reading as the PATCH /v2/entities/{id}/attrs body that
// stock Orion accepts: each attribute carries two metadata, TimeInstant
// (the observation time, DateTime) and "signature" (type Text, the compact
// JWS of the whole reading). There is no separate signature attribute:
// Orion only updates attributes the entity already has and answers 422
// PartialUpdate for the others, whereas it stores metadata with the
// attributes it updates (orion-api.md). Each attribute therefore carries
// the proof of the reading that last wrote it, and an entity read back —
// whose attributes may come from different readings — is verified
// attribute by attribute (VerifyEntity): verified, unsigned, tampered or
// wrong key, with the seq and time of the signing reading.
//
// # Verifying, for a platform-side service
//
// OpenWith verifies a compact JWS, VerifyAttrsWith one reading's NGSI
// update body and VerifyEntity an entity read back from a broker (GET
// /v2/entities/{id}, normalized), each against a device's keys: the
// key is chosen by the header's kid and the algorithm is pinned to that
// key, so "alg":"none", an HS256 signature made with a public key as the
// secret, and any other algorithm confusion are ErrWrongKey. Pass a
// device's public keys, newest first and older ones kept after a rotation,
// as ParseKeys reads them from the platform's elementDetails.publickey, a
// JWK Set or PEM; pass DeriveHS256(id, k1, k2) for a device signed with
// HS256. Verdicts: ErrMalformed, ErrWrongKey, ErrTampered (errors.Is).
// Claims.Gateway is empty for a reading the device signed itself. See
// ExampleVerifyAttrsWith and ExampleVerifyEntity.
package envelope

import (
	"crypto"
	"crypto/hkdf"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jws"

	"github.com/edgegate/edgegate/internal/reading"
)

// Version of the envelope claims format.
const Version = 1

// MaxEnvelopeBytes bounds what Open parses, before any decoding.
const MaxEnvelopeBytes = 1 << 20

// DefaultSignatureAttr is the name of the metadata, on every attribute,
// that carries the compact JWS (and of the attribute that carried it in
// the older form VerifyAttrs still reads).
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
	secret []byte           // HS256
	priv   crypto.Signer    // EdDSA, ES256: nil for a verification-only key
	pub    crypto.PublicKey // EdDSA, ES256 (see keys.go)
	hdr    string           // base64url of the protected header, rendered once per key
}

// DeriveHS256 derives the HS256 reading key of a device from its K1 and K2.
func DeriveHS256(deviceID, k1, k2 string) (Key, error) {
	if k1 == "" || k2 == "" {
		return Key{}, errors.New("derive key: k1 and k2 must both be set")
	}
	secret, err := deriveFromK1K2("edgegate/reading-key/v1", deviceID, k1, k2, 32)
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
	b, err := deriveFromK1K2("edgegate/mqtt-password/v1", deviceID, k1, k2, 24)
	if err != nil {
		return "", fmt.Errorf("derive MQTT password: %w", err)
	}
	return base64.RawURLEncoding.EncodeToString(b), nil
}

// deriveFromK1K2 is HKDF-SHA256 over K1 || 0x00 || K2 with salt label and
// info the device id (see the package documentation).
func deriveFromK1K2(label, deviceID, k1, k2 string, n int) ([]byte, error) {
	ikm := make([]byte, 0, len(k1)+1+len(k2))
	ikm = append(append(append(ikm, k1...), 0), k2...)
	return hkdf.Key(sha256.New, ikm, []byte(label), deviceID, n)
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
	// Kind is empty for a reading and KindCommand for a command the
	// gateway sends down to a device (internal/command): a device that
	// verifies what it receives refuses a reading's envelope replayed as
	// a command, and a reading is never taken for a command. Last, and
	// omitted when empty, so that readings serialise exactly as before.
	Kind string `json:"kind,omitempty"`
}

// KindCommand is the Kind of a command's envelope.
const KindCommand = "command"

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
// The compact serialization is assembled here, in pooled scratch memory:
// the protected header is rendered once per key, the claims by hand
// (encode.go), and the signature computed with the standard library
// (sealbody.go: HMAC-SHA256 on pooled hash state, EdDSA, ES256).
// The result is exactly what jws.Sign produces for the same header and
// payload (TestSealVerifiesBothWays); Open verifies it through jwx too.
// The gateway's per-reading path uses SealPacked, which also renders the
// NGSI body in the packed form the queue stores (packed.go).
func Seal(k Key, c Claims) (string, error) {
	if !k.CanSign() {
		return "", errors.New("seal envelope: no key")
	}
	s := getScratch()
	defer putScratch(s)
	var err error
	if s.claims, err = appendClaims(s.claims[:0], &c); err != nil {
		return "", fmt.Errorf("seal envelope: %w", err)
	}
	if s.jws, err = k.sign(s.jws[:0], s.claims, s); err != nil {
		return "", fmt.Errorf("seal envelope: %w", err)
	}
	return string(s.jws), nil
}

// Open verifies a compact JWS with the given key, the algorithm pinned to the
// key, and returns its claims. The verdict is ErrMalformed, ErrWrongKey or
// ErrTampered.
func Open(compact string, k Key) (Claims, error) {
	return OpenWith(compact, []Key{k})
}

// OpenWith verifies a compact JWS with the one of keys whose id is the
// header's "kid" (a device's keys, newest first, old ones kept for older
// readings), the algorithm pinned to that key. No key with that id, or an
// "alg" other than the key's, is ErrWrongKey.
func OpenWith(compact string, keys []Key) (Claims, error) {
	if len(compact) > MaxEnvelopeBytes {
		return Claims{}, fmt.Errorf("%w: %d bytes, at most %d", ErrMalformed, len(compact), MaxEnvelopeBytes)
	}
	if c, ok, err := openFast(compact, keys); ok {
		return c, err
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
	k, found := Key{}, false
	for _, c := range keys {
		if c.id == hdr.KeyID() {
			k, found = c, true
			break
		}
	}
	if !found {
		ids := make([]string, len(keys))
		for i, c := range keys {
			ids[i] = c.id
		}
		return Claims{}, fmt.Errorf("%w: key id %q, given keys %q", ErrWrongKey, hdr.KeyID(), ids)
	}
	if hdr.Algorithm() != k.alg {
		// Covers "none" and algorithm confusion: the key decides the algorithm.
		return Claims{}, fmt.Errorf("%w: algorithm %q, key is %s", ErrWrongKey, hdr.Algorithm(), k.alg)
	}
	payload, err := jws.Verify([]byte(compact), jws.WithKey(k.alg, k.verifyKey()))
	if err != nil {
		return Claims{}, fmt.Errorf("%w: signature does not match the content", ErrTampered)
	}
	return decodeClaims(payload)
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

// VerifyAttrs checks one reading's NGSI update body against its envelope.
// Two forms are read: the current one, where every attribute carries the
// compact JWS in its sigAttr metadata (Body), and the older one, where a
// top-level sigAttr attribute carried it. Key-values other than attributes,
// such as "id" and "type", are ignored, except that an "id" must be the
// signed device. For an entity read back from a broker, whose attributes
// may come from different readings, use VerifyEntity.
func VerifyAttrs(doc []byte, k Key, sigAttr string) (Claims, error) {
	return VerifyAttrsWith(doc, []Key{k}, sigAttr)
}

// VerifyAttrsWith is VerifyAttrs with the key chosen among keys by "kid"
// (see OpenWith).
func VerifyAttrsWith(doc []byte, keys []Key, sigAttr string) (Claims, error) {
	if len(doc) > 4*MaxEnvelopeBytes {
		return Claims{}, fmt.Errorf("%w: document of %d bytes", ErrMalformed, len(doc))
	}
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(doc, &raw); err != nil {
		return Claims{}, fmt.Errorf("%w: not a JSON object: %v", ErrMalformed, err)
	}
	return VerifyAttrMap(raw, keys, sigAttr)
}

// VerifyAttrMap is VerifyAttrsWith on a document already split into its
// members, for a verifier that has parsed it anyway (a broker checking
// every update): the document is not parsed a second time.
//
// In the current form every attribute must carry the same JWS and match
// what it signs; signed attributes absent from the body are allowed (the
// gateway leaves out values Orion would refuse). In the older form every
// signed attribute must be present.
func VerifyAttrMap(raw map[string]json.RawMessage, keys []Key, sigAttr string) (Claims, error) {
	if sigAttr == "" {
		sigAttr = DefaultSignatureAttr
	}
	sigRaw, ok := raw[sigAttr]
	if !ok {
		return verifyUpdate(raw, keys, sigAttr)
	}
	var sig ngsiAttr
	if err := json.Unmarshal(sigRaw, &sig); err != nil {
		return Claims{}, fmt.Errorf("%w: attribute %q: %v", ErrMalformed, sigAttr, err)
	}
	if _, signed := sig.Metadata[sigAttr]; signed {
		// A reading's own attribute that happens to share the name.
		return verifyUpdate(raw, keys, sigAttr)
	}
	compact, ok := sig.Value.(string)
	if !ok {
		return Claims{}, fmt.Errorf("%w: attribute %q is not a string", ErrMalformed, sigAttr)
	}
	c, err := OpenWith(compact, keys)
	if err != nil {
		return Claims{}, err
	}
	if err := checkID(raw, c); err != nil {
		return c, err
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

// checkID refuses a document whose "id" is not the signed device.
func checkID(raw map[string]json.RawMessage, c Claims) error {
	if c.Kind != "" {
		// A command the gateway sent the device is never a reading.
		return fmt.Errorf("%w: a %s envelope, not a reading", ErrTampered, c.Kind)
	}
	if id, ok := raw["id"]; ok {
		var s string
		if json.Unmarshal(id, &s) == nil && s != c.Device {
			return fmt.Errorf("%w: entity %q carries a reading of device %q", ErrTampered, s, c.Device)
		}
	}
	return nil
}

// verifyUpdate checks an update body of the current form (Body): one
// reading, so one JWS, on every attribute.
func verifyUpdate(raw map[string]json.RawMessage, keys []Key, sigMeta string) (Claims, error) {
	var compact, unsigned string
	names := make([]string, 0, len(raw))
	attrs := make([]ngsiAttr, 0, len(raw)) // parsed once, checked below
	for name, v := range raw {
		if name == "id" || name == "type" {
			continue
		}
		var a ngsiAttr
		if err := json.Unmarshal(v, &a); err != nil {
			return Claims{}, fmt.Errorf("%w: attribute %q: %v", ErrMalformed, name, err)
		}
		names = append(names, name)
		attrs = append(attrs, a)
		sig, ok := a.Metadata[sigMeta]
		if !ok {
			unsigned = name
			continue
		}
		var m ngsiMeta
		_ = json.Unmarshal(sig, &m)
		s, ok := m.Value.(string)
		if !ok || s == "" {
			return Claims{}, fmt.Errorf("%w: attribute %q: metadata %q is not a string", ErrMalformed, name, sigMeta)
		}
		if compact != "" && s != compact {
			return Claims{}, fmt.Errorf("%w: attributes of one update carry different signatures", ErrTampered)
		}
		compact = s
	}
	if compact == "" {
		return Claims{}, fmt.Errorf("%w: no attribute carries a %q metadata", ErrMalformed, sigMeta)
	}
	if unsigned != "" {
		// Beside signed ones: added or replaced after signing.
		return Claims{}, fmt.Errorf("%w: attribute %q carries no signature", ErrTampered, unsigned)
	}
	c, err := OpenWith(compact, keys)
	if err != nil {
		return Claims{}, err
	}
	if err := checkID(raw, c); err != nil {
		return c, err
	}
	for i, name := range names {
		a := attrs[i]
		want, ok := c.Attrs[name]
		switch {
		case !ok:
			return c, fmt.Errorf("%w: attribute %q is not signed by reading seq %d", ErrTampered, name, c.Seq)
		case a.Type != want.Type:
			return c, fmt.Errorf("%w: attribute %q has type %q, signed %q", ErrTampered, name, a.Type, want.Type)
		case !sameValue(a.Value, want.Value):
			return c, fmt.Errorf("%w: attribute %q has a value other than the signed one", ErrTampered, name)
		}
		if d := timeMismatch(a.Metadata[TimeInstantMeta], c.Time); d != "" {
			return c, fmt.Errorf("%w: attribute %q: %s", ErrTampered, name, d)
		}
	}
	return c, nil
}
