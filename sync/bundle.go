package centralsync

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jwk"
	"github.com/lestrrat-go/jwx/v2/jws"

	"github.com/edgegate/edgegate/policy"
)

// Refusal reasons: the exact values of the "reason" label of
// metrics.PolicyRefused and of Refusal.Reason.
const (
	ReasonBadSignature = "bad_signature" // signature invalid, alg none, HMAC, alg other than the key's
	ReasonUnknownKey   = "unknown_key"   // no kid, or a kid not in the pinned JWKS
	ReasonRollback     = "rollback"      // version not above the floor
	ReasonExpired      = "expired"       // expires_at not in the future
	ReasonNotYetValid  = "not_yet_valid" // issued_at too far in the future (clock skew)
	ReasonMalformed    = "malformed"     // not a compact JWS, bad JSON, or a document policy.Compile refuses
	ReasonOversized    = "oversized"     // larger than MaxBundleBytes
	ReasonWrongGateway = "wrong_gateway" // gateway set and not ours
	// ReasonNoGateway: the bundle names no gateway. A signed bundle
	// without one would be accepted by every gateway of the fleet, so one
	// gateway's devices and keys could be replayed to another.
	ReasonNoGateway = "no_gateway"
	// ReasonFetch counts failed fetches (network, HTTP status) of either
	// source; nothing was offered, so nothing was refused on its merits.
	ReasonFetch = "fetch"
)

// Defaults for bundle verification.
const (
	DefaultMaxBundleBytes = 8 << 20
	DefaultClockSkew      = 5 * time.Minute
)

// BundleType is the "typ" central ops should put in a bundle's protected
// header. It is not required (the signature by a pinned key is what counts).
const BundleType = "edgegate-policy+jws"

// RefusalError is why an offered policy was refused. Its text never carries
// the bundle's content beyond versions, times and ids.
type RefusalError struct {
	Reason string // one of the Reason* constants
	Detail string
}

func (e *RefusalError) Error() string { return "policy refused (" + e.Reason + "): " + e.Detail }

func refuse(reason, format string, args ...any) *RefusalError {
	return &RefusalError{Reason: reason, Detail: clip(fmt.Sprintf(format, args...))}
}

// VerifierOptions configures a Verifier.
type VerifierOptions struct {
	// Keys is the pinned JWKS of central ops (pinned at pairing). Every key
	// needs a kid and an alg of ES256 (P-256) or EdDSA (Ed25519); rotation
	// is several keys with different kids.
	Keys jwk.Set
	// Gateway is this gateway's id; a bundle naming another one, or none,
	// is refused.
	Gateway string
	// MaxBytes bounds a bundle before parsing; default DefaultMaxBundleBytes.
	MaxBytes int
	// Skew is how far issued_at may be ahead of our clock; default
	// DefaultClockSkew.
	Skew time.Duration
	Now  func() time.Time // nil: time.Now
}

// Verifier checks signed policy bundles against pinned keys. It is pure:
// no I/O, no state; the caller supplies the version floor.
type Verifier struct {
	keys    map[string]pinnedKey
	gateway string
	max     int
	skew    time.Duration
	now     func() time.Time
}

type pinnedKey struct {
	alg jwa.SignatureAlgorithm
	raw any // *ecdsa.PublicKey or ed25519.PublicKey
}

// Verified is a bundle that passed every check.
type Verified struct {
	Document policy.Document
	Digest   string // "sha256:<hex>" of the compact JWS bytes
	KeyID    string
	Policy   *policy.Policy // compiled, Source SourceBundle, Digest set
}

// NewVerifier validates the pinned key set: a key it cannot use safely is
// a configuration error now, not a refusal of every bundle later.
func NewVerifier(o VerifierOptions) (*Verifier, error) {
	if o.Keys == nil || o.Keys.Len() == 0 {
		return nil, errors.New("policy verifier: no pinned keys")
	}
	v := &Verifier{keys: map[string]pinnedKey{}, gateway: o.Gateway, max: o.MaxBytes, skew: o.Skew, now: o.Now}
	if v.max <= 0 {
		v.max = DefaultMaxBundleBytes
	}
	if v.skew <= 0 {
		v.skew = DefaultClockSkew
	}
	if v.now == nil {
		v.now = time.Now
	}
	for i := 0; i < o.Keys.Len(); i++ {
		k, _ := o.Keys.Key(i)
		kid := k.KeyID()
		if kid == "" {
			return nil, fmt.Errorf("policy verifier: key %d has no kid", i)
		}
		if _, dup := v.keys[kid]; dup {
			return nil, fmt.Errorf("policy verifier: kid %q appears twice", kid)
		}
		pub, err := k.PublicKey()
		if err != nil {
			return nil, fmt.Errorf("policy verifier: key %q: %w", kid, err)
		}
		var raw any
		if err := pub.Raw(&raw); err != nil {
			return nil, fmt.Errorf("policy verifier: key %q: %w", kid, err)
		}
		alg := jwa.SignatureAlgorithm(k.Algorithm().String())
		switch {
		case alg == jwa.ES256 && k.KeyType() == jwa.EC:
			if crv, ok := k.Get(jwk.ECDSACrvKey); !ok || fmt.Sprint(crv) != jwa.P256.String() {
				return nil, fmt.Errorf("policy verifier: key %q: ES256 needs curve P-256", kid)
			}
		case alg == jwa.EdDSA && k.KeyType() == jwa.OKP:
			if crv, ok := k.Get(jwk.OKPCrvKey); !ok || fmt.Sprint(crv) != jwa.Ed25519.String() {
				return nil, fmt.Errorf("policy verifier: key %q: EdDSA needs curve Ed25519", kid)
			}
		default:
			return nil, fmt.Errorf("policy verifier: key %q: alg %q with kty %q; want ES256 (EC P-256) or EdDSA (OKP Ed25519)",
				kid, k.Algorithm(), k.KeyType())
		}
		v.keys[kid] = pinnedKey{alg: alg, raw: raw}
	}
	return v, nil
}

// Digest is the digest of a bundle as the gateway reports it: "sha256:" and
// the hex SHA-256 of the compact JWS bytes (surrounding whitespace removed).
func Digest(compact []byte) string {
	sum := sha256.Sum256(bytes.TrimSpace(compact))
	return "sha256:" + hex.EncodeToString(sum[:])
}

// Verify checks a compact JWS bundle: size, structure, key (by kid), the
// algorithm pinned to that key, signature, payload, gateway, version above
// floor, issue time, expiry; and that policy.Compile accepts the document.
// Every refusal is a *RefusalError.
func (v *Verifier) Verify(raw []byte, floor uint64) (*Verified, error) {
	if len(raw) > v.max {
		return nil, refuse(ReasonOversized, "%d bytes, at most %d", len(raw), v.max)
	}
	raw = bytes.TrimSpace(raw)
	if bytes.Count(raw, []byte{'.'}) != 2 || bytes.ContainsAny(raw, " \t\r\n{") {
		return nil, refuse(ReasonMalformed, "not a compact JWS")
	}
	msg, err := jws.Parse(raw, jws.WithCompact())
	if err != nil {
		return nil, refuse(ReasonMalformed, "parse JWS: %v", err)
	}
	sigs := msg.Signatures()
	if len(sigs) != 1 {
		return nil, refuse(ReasonMalformed, "%d signatures, want 1", len(sigs))
	}
	h := sigs[0].ProtectedHeaders()
	for _, name := range []string{"crit", "b64"} {
		if _, set := h.Get(name); set {
			return nil, refuse(ReasonMalformed, "%s header not supported", name)
		}
	}
	kid := h.KeyID()
	if kid == "" {
		return nil, refuse(ReasonUnknownKey, "no kid in the protected header")
	}
	key, ok := v.keys[kid]
	if !ok {
		return nil, refuse(ReasonUnknownKey, "kid %q is not pinned", kid)
	}
	if alg := h.Algorithm(); alg != key.alg {
		return nil, refuse(ReasonBadSignature, "alg %q, key %q is pinned to %s", alg, kid, key.alg)
	}
	payload, err := jws.Verify(raw, jws.WithKey(key.alg, key.raw))
	if err != nil {
		return nil, refuse(ReasonBadSignature, "signature does not verify with key %q", kid)
	}
	var doc policy.Document
	dec := json.NewDecoder(bytes.NewReader(payload))
	if err := dec.Decode(&doc); err != nil {
		return nil, refuse(ReasonMalformed, "payload: %s", SafeJSONError(err))
	}
	if dec.More() {
		return nil, refuse(ReasonMalformed, "payload: trailing data after the document")
	}
	if doc.Gateway == "" {
		return nil, refuse(ReasonNoGateway, "version %d names no gateway; a bundle must name the gateway it is for (%q)", doc.Version, v.gateway)
	}
	if doc.Gateway != v.gateway {
		return nil, refuse(ReasonWrongGateway, "bundle for gateway %q, this is %q", doc.Gateway, v.gateway)
	}
	if doc.Version <= floor {
		return nil, refuse(ReasonRollback, "version %d, floor %d", doc.Version, floor)
	}
	now := v.now()
	if doc.IssuedAt.IsZero() || doc.ExpiresAt.IsZero() {
		return nil, refuse(ReasonMalformed, "version %d: issued_at and expires_at are required", doc.Version)
	}
	if doc.IssuedAt.After(now.Add(v.skew)) {
		return nil, refuse(ReasonNotYetValid, "version %d issued at %s, our clock says %s",
			doc.Version, doc.IssuedAt.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339))
	}
	if !doc.ExpiresAt.After(now) {
		return nil, refuse(ReasonExpired, "version %d expired at %s", doc.Version, doc.ExpiresAt.UTC().Format(time.RFC3339))
	}
	digest := Digest(raw)
	p, err := policy.Compile(doc, SourceBundle, digest)
	if err != nil {
		return nil, refuse(ReasonMalformed, "version %d: %v", doc.Version, err)
	}
	return &Verified{Document: doc, Digest: digest, KeyID: kid, Policy: p}, nil
}
