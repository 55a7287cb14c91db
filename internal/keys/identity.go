// Package keys holds the gateway's keys, each in its own file: the store
// key that encrypts the queue at rest (store.go), the gateway's identity
// (identity.go) and the private keys of devices it signs for (device.go).
// None of them ever appears in a log, an error or command output.
//
// The identity is the gateway's own Ed25519 key: generated on
// first use, kept in the encrypted store, never shown. Its RFC 7638
// thumbprint is the gateway's stable id (what `edgegate status` shows and
// what the central service pins at pairing); the key signs what the gateway
// attests to, such as policy receipts.
//
// Any stage that signs on the gateway's behalf may import it; cmd/ loads the
// identity once and passes it in.
package keys

import (
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"log/slog"

	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jwk"
	"github.com/lestrrat-go/jwx/v2/jws"
)

// IdentityStateName is the name of the state record holding the key's 32-byte seed.
const IdentityStateName = "identity"

// IdentityStore is the encrypted store's named-record interface.
type IdentityStore interface {
	GetState(name string) ([]byte, bool, error)
	PutState(name string, v []byte) error
}

// Identity is the gateway's signing identity. Safe for concurrent use.
type Identity struct {
	priv       ed25519.PrivateKey
	pub        jwk.Key // public JWK with kid and alg set; callers get clones
	thumbprint string
}

// Load reads the identity from the store, or generates one and persists it
// (synced) before returning it, so that the id never changes once shown.
func LoadIdentity(st IdentityStore) (*Identity, error) {
	seed, ok, err := st.GetState(IdentityStateName)
	if err != nil {
		return nil, fmt.Errorf("load gateway identity: %w", err)
	}
	if ok {
		if len(seed) != ed25519.SeedSize {
			return nil, fmt.Errorf("load gateway identity: stored seed has %d bytes, want %d", len(seed), ed25519.SeedSize)
		}
		return fromSeed(seed)
	}
	seed = make([]byte, ed25519.SeedSize)
	if _, err := rand.Read(seed); err != nil {
		return nil, fmt.Errorf("generate gateway identity: %w", err)
	}
	id, err := fromSeed(seed)
	if err != nil {
		return nil, err
	}
	if err := st.PutState(IdentityStateName, seed); err != nil {
		return nil, fmt.Errorf("store gateway identity: %w", err)
	}
	return id, nil
}

func fromSeed(seed []byte) (*Identity, error) {
	priv := ed25519.NewKeyFromSeed(seed)
	pub, err := jwk.FromRaw(priv.Public())
	if err != nil {
		return nil, fmt.Errorf("gateway identity: public JWK: %w", err)
	}
	tp, err := pub.Thumbprint(crypto.SHA256)
	if err != nil {
		return nil, fmt.Errorf("gateway identity: thumbprint: %w", err)
	}
	id := &Identity{priv: priv, pub: pub, thumbprint: base64.RawURLEncoding.EncodeToString(tp)}
	if err := pub.Set(jwk.KeyIDKey, id.thumbprint); err != nil {
		return nil, fmt.Errorf("gateway identity: %w", err)
	}
	if err := pub.Set(jwk.AlgorithmKey, jwa.EdDSA); err != nil {
		return nil, fmt.Errorf("gateway identity: %w", err)
	}
	return id, nil
}

// Thumbprint is the RFC 7638 SHA-256 thumbprint of the public key,
// base64url without padding: the gateway's stable id.
func (id *Identity) Thumbprint() string { return id.thumbprint }

// PublicJWK returns a copy of the public key as a JWK (kty OKP, crv Ed25519,
// kid the thumbprint, alg EdDSA).
func (id *Identity) PublicJWK() jwk.Key {
	k, err := id.pub.Clone()
	if err != nil {
		// Clone of a key we built ourselves cannot fail; if it does, the
		// shared key is still correct to hand out read-only.
		return id.pub
	}
	return k
}

// PublicKey is the raw Ed25519 public key.
func (id *Identity) PublicKey() ed25519.PublicKey {
	return id.priv.Public().(ed25519.PublicKey)
}

// reserved headers are set by Sign and may not be overridden.
var reserved = map[string]bool{jws.AlgorithmKey: true, jws.KeyIDKey: true, jws.JWKKey: true, "crit": true, "b64": true}

// Sign signs payload as a compact JWS with EdDSA. The protected header
// carries kid (the thumbprint), jwk (the public key) and extra, which may
// not set alg, kid, jwk, crit or b64.
func (id *Identity) Sign(payload []byte, extra map[string]any) (string, error) {
	hdr := jws.NewHeaders()
	for k, v := range extra {
		if reserved[k] {
			return "", fmt.Errorf("sign with gateway identity: header %q is set by the signer", k)
		}
		if err := hdr.Set(k, v); err != nil {
			return "", fmt.Errorf("sign with gateway identity: header %q: %w", k, err)
		}
	}
	if err := hdr.Set(jws.KeyIDKey, id.thumbprint); err != nil {
		return "", fmt.Errorf("sign with gateway identity: %w", err)
	}
	if err := hdr.Set(jws.JWKKey, id.PublicJWK()); err != nil {
		return "", fmt.Errorf("sign with gateway identity: %w", err)
	}
	out, err := jws.Sign(payload, jws.WithKey(jwa.EdDSA, id.priv, jws.WithProtectedHeaders(hdr)))
	if err != nil {
		return "", fmt.Errorf("sign with gateway identity: %w", err)
	}
	return string(out), nil
}

// ErrNotSigned is returned by Verify for a JWS not signed by the key.
var ErrNotSigned = errors.New("not signed by this identity")

// Verify checks a compact JWS made by Sign and returns its payload.
func (id *Identity) Verify(compact []byte) ([]byte, error) {
	payload, err := jws.Verify(compact, jws.WithKey(jwa.EdDSA, id.PublicKey()))
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNotSigned, err)
	}
	return payload, nil
}

// String names the identity by its thumbprint; the private key is never
// shown, whatever the verb. The formatting methods have value receivers so
// that a dereferenced Identity is just as safe to print.
func (id Identity) String() string { return "gateway identity " + id.thumbprint }

// GoString keeps %#v from printing the private key.
func (id Identity) GoString() string { return id.String() }

// Format keeps every fmt verb (%v, %+v, %#v, %x, %s ...) on the safe text.
func (id Identity) Format(f fmt.State, _ rune) { fmt.Fprint(f, id.String()) }

// LogValue keeps slog from walking the struct.
func (id Identity) LogValue() slog.Value { return slog.StringValue(id.String()) }
