package envelope

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"strings"

	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jwk"
)

// # Asymmetric device keys
//
// Besides HS256 from K1/K2, a device may have an asymmetric key: EdDSA
// (Ed25519, the default) or ES256 (ECDSA P-256). Its public half is
// registered with the central service as a JWK; anyone holding it can verify
// the device's readings and nobody holding it can forge one. The private
// half lives either on the device (a device-signed reading) or in the
// gateway's encrypted store (the gateway signs on the device's behalf).
//
// The key id of an asymmetric key is its RFC 7638 JWK thumbprint (SHA-256,
// unpadded base64url): anyone can recompute it from the public key, so a
// kid names exactly one key and cannot be chosen to collide with another.

// Algorithm names, as in the JWS "alg" header.
const (
	AlgHS256 = "HS256"
	AlgEdDSA = "EdDSA"
	AlgES256 = "ES256"
)

// MaxKeyBytes bounds a key or key set before parsing.
const MaxKeyBytes = 64 << 10

// GenerateKey creates a new asymmetric signing key: alg is AlgEdDSA or
// AlgES256.
func GenerateKey(alg string) (Key, error) {
	switch alg {
	case AlgEdDSA:
		_, priv, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			return Key{}, fmt.Errorf("generate key: %w", err)
		}
		return keyOf(priv, priv.Public())
	case AlgES256:
		priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return Key{}, fmt.Errorf("generate key: %w", err)
		}
		return keyOf(priv, &priv.PublicKey)
	}
	return Key{}, fmt.Errorf("generate key: algorithm %q is not %s or %s", alg, AlgEdDSA, AlgES256)
}

// keyOf builds a Key from a public key and, when the key signs, its private
// key (ed25519.PrivateKey or *ecdsa.PrivateKey on P-256).
func keyOf(priv crypto.Signer, pub crypto.PublicKey) (Key, error) {
	var alg jwa.SignatureAlgorithm
	switch p := pub.(type) {
	case ed25519.PublicKey:
		if len(p) != ed25519.PublicKeySize {
			return Key{}, errors.New("ed25519 public key of the wrong size")
		}
		alg = jwa.EdDSA
	case *ecdsa.PublicKey:
		if p.Curve != elliptic.P256() {
			return Key{}, errors.New("ECDSA key is not on P-256 (ES256)")
		}
		alg = jwa.ES256
	default:
		return Key{}, fmt.Errorf("unsupported public key type %T (want Ed25519 or ECDSA P-256)", pub)
	}
	jk, err := jwk.FromRaw(pub)
	if err != nil {
		return Key{}, fmt.Errorf("public key: %w", err)
	}
	tp, err := jk.Thumbprint(crypto.SHA256)
	if err != nil {
		return Key{}, fmt.Errorf("public key thumbprint: %w", err)
	}
	kid := base64.RawURLEncoding.EncodeToString(tp)
	return Key{id: kid, alg: alg, priv: priv, pub: pub, hdr: headerB64(string(alg), kid)}, nil
}

// Alg is the key's JWS algorithm (HS256, EdDSA or ES256).
func (k Key) Alg() string { return string(k.alg) }

// CanSign reports whether the key can seal (a secret or a private key).
func (k Key) CanSign() bool { return len(k.secret) > 0 || k.priv != nil }

// Asymmetric reports whether the key is an EdDSA or ES256 key.
func (k Key) Asymmetric() bool { return k.pub != nil }

// Public returns the verification-only half of an asymmetric key (the key
// itself for an HS256 key, which has no public half).
func (k Key) Public() Key {
	if k.pub == nil {
		return k
	}
	k.priv = nil
	return k
}

// signingKey is what jwx's signer takes: the HMAC secret or the private key.
func (k Key) signingKey() any {
	if k.priv != nil {
		return k.priv
	}
	if len(k.secret) > 0 {
		return k.secret
	}
	return nil
}

// verifyKey is what jwx's verifier takes: the HMAC secret or the public key.
func (k Key) verifyKey() any {
	if k.pub != nil {
		return k.pub
	}
	return k.secret
}

// PublicJWK renders the public half of an asymmetric key as a JWK (with
// "kid", "alg" and "use":"sig"), the form registered with the central
// service.
func (k Key) PublicJWK() ([]byte, error) {
	if k.pub == nil {
		return nil, errors.New("public JWK: not an asymmetric key")
	}
	return k.jwkJSON(k.pub)
}

// PrivateJWK renders the whole key as a JWK, for the encrypted store or
// for provisioning a device. It holds the private key: never log it.
func (k Key) PrivateJWK() ([]byte, error) {
	if k.priv == nil {
		return nil, errors.New("private JWK: no private key")
	}
	return k.jwkJSON(k.priv)
}

func (k Key) jwkJSON(raw any) ([]byte, error) {
	jk, err := jwk.FromRaw(raw)
	if err != nil {
		return nil, err
	}
	for name, v := range map[string]any{jwk.KeyIDKey: k.id, jwk.AlgorithmKey: k.alg, jwk.KeyUsageKey: "sig"} {
		if err := jk.Set(name, v); err != nil {
			return nil, err
		}
	}
	return json.Marshal(jk)
}

// ParseKey reads one asymmetric key: a JWK (public or private; OKP Ed25519
// or EC P-256) or PEM ("PUBLIC KEY" PKIX, "PRIVATE KEY" PKCS #8, "EC PRIVATE
// KEY"). A "kid" in a JWK must be the key's thumbprint; an "alg" must match
// the key type. HMAC ("oct") keys are refused: an HS256 key comes from
// K1/K2 (DeriveHS256), never from a key file, so a public key can never be
// turned into an HMAC secret.
func ParseKey(data []byte) (Key, error) {
	keys, err := ParseKeys(data)
	if err != nil {
		return Key{}, err
	}
	if len(keys) != 1 {
		return Key{}, fmt.Errorf("parse key: %d keys, want 1", len(keys))
	}
	return keys[0], nil
}

// ParseKeys reads asymmetric keys: a JWK Set ({"keys":[...]}), a single
// JWK, a JSON array of JWKs, or one or more PEM blocks. Order is kept
// (newest first, by convention).
func ParseKeys(data []byte) ([]Key, error) {
	if len(data) > MaxKeyBytes {
		return nil, fmt.Errorf("parse keys: %d bytes, at most %d", len(data), MaxKeyBytes)
	}
	data = bytes.TrimSpace(data)
	if len(data) == 0 {
		return nil, errors.New("parse keys: empty")
	}
	if data[0] == '-' {
		return parsePEMKeys(data)
	}
	var raws []json.RawMessage
	switch data[0] {
	case '[':
		if err := json.Unmarshal(data, &raws); err != nil {
			return nil, fmt.Errorf("parse keys: %w", err)
		}
	case '{':
		var set struct {
			Keys []json.RawMessage `json:"keys"`
		}
		if err := json.Unmarshal(data, &set); err != nil {
			return nil, fmt.Errorf("parse keys: %w", err)
		}
		if set.Keys != nil {
			raws = set.Keys
		} else {
			raws = []json.RawMessage{data}
		}
	default:
		return nil, errors.New("parse keys: neither JWK, JWK Set nor PEM")
	}
	out := make([]Key, 0, len(raws))
	for i, raw := range raws {
		k, err := parseJWK(raw)
		if err != nil {
			return nil, fmt.Errorf("parse keys: key %d: %w", i, err)
		}
		out = append(out, k)
	}
	if len(out) == 0 {
		return nil, errors.New("parse keys: no key")
	}
	return out, nil
}

func parseJWK(raw []byte) (Key, error) {
	jk, err := jwk.ParseKey(raw)
	if err != nil {
		return Key{}, err
	}
	var k Key
	switch jk.KeyType() {
	case "OKP", "EC":
	default:
		return Key{}, fmt.Errorf("key type %q: only OKP (Ed25519) and EC (P-256) keys", jk.KeyType())
	}
	var rawKey any
	if err := jk.Raw(&rawKey); err != nil {
		return Key{}, err
	}
	switch r := rawKey.(type) {
	case ed25519.PrivateKey:
		k, err = keyOf(r, r.Public())
	case ed25519.PublicKey:
		k, err = keyOf(nil, r)
	case *ecdsa.PrivateKey:
		k, err = keyOf(r, &r.PublicKey)
	case *ecdsa.PublicKey:
		k, err = keyOf(nil, r)
	default:
		err = fmt.Errorf("unsupported key %T", rawKey)
	}
	if err != nil {
		return Key{}, err
	}
	if kid := jk.KeyID(); kid != "" && kid != k.id {
		return Key{}, fmt.Errorf("kid %q is not the key's RFC 7638 thumbprint %q", kid, k.id)
	}
	if alg := jk.Algorithm().String(); alg != "" && alg != string(k.alg) {
		return Key{}, fmt.Errorf("alg %q does not fit a %s key", alg, k.alg)
	}
	return k, nil
}

func parsePEMKeys(data []byte) ([]Key, error) {
	var out []Key
	for {
		var b *pem.Block
		b, data = pem.Decode(data)
		if b == nil {
			break
		}
		var (
			k   Key
			err error
		)
		switch b.Type {
		case "PUBLIC KEY":
			var pub any
			if pub, err = x509.ParsePKIXPublicKey(b.Bytes); err == nil {
				k, err = keyOf(nil, pub)
			}
		case "PRIVATE KEY":
			var priv any
			if priv, err = x509.ParsePKCS8PrivateKey(b.Bytes); err == nil {
				k, err = privateKeyOf(priv)
			}
		case "EC PRIVATE KEY":
			var priv *ecdsa.PrivateKey
			if priv, err = x509.ParseECPrivateKey(b.Bytes); err == nil {
				k, err = keyOf(priv, &priv.PublicKey)
			}
		default:
			err = fmt.Errorf("PEM block %q is not a key", b.Type)
		}
		if err != nil {
			return nil, fmt.Errorf("parse keys: PEM: %w", err)
		}
		out = append(out, k)
	}
	if len(out) == 0 {
		return nil, errors.New("parse keys: no PEM key")
	}
	return out, nil
}

func privateKeyOf(priv any) (Key, error) {
	switch p := priv.(type) {
	case ed25519.PrivateKey:
		return keyOf(p, p.Public())
	case *ecdsa.PrivateKey:
		return keyOf(p, &p.PublicKey)
	}
	return Key{}, fmt.Errorf("unsupported private key %T", priv)
}

// PublicPEM renders the public half of an asymmetric key as a PEM "PUBLIC
// KEY" block.
func (k Key) PublicPEM() ([]byte, error) {
	if k.pub == nil {
		return nil, errors.New("public PEM: not an asymmetric key")
	}
	der, err := x509.MarshalPKIXPublicKey(k.pub)
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), nil
}

// KeySetJSON renders the public halves of keys as a JWK Set, in order.
func KeySetJSON(keys []Key) ([]byte, error) {
	set := struct {
		Keys []json.RawMessage `json:"keys"`
	}{Keys: []json.RawMessage{}}
	for _, k := range keys {
		b, err := k.PublicJWK()
		if err != nil {
			return nil, err
		}
		set.Keys = append(set.Keys, b)
	}
	return json.Marshal(set)
}

// KeyIDOf returns the alg and kid of a compact JWS's protected header
// without verifying anything.
func KeyIDOf(compact string) (alg, kid string, err error) {
	hdr, _, ok := strings.Cut(compact, ".")
	if !ok || len(hdr) > 4096 {
		return "", "", fmt.Errorf("%w: not a compact JWS", ErrMalformed)
	}
	b, err := base64.RawURLEncoding.DecodeString(hdr)
	if err != nil {
		return "", "", fmt.Errorf("%w: header: %v", ErrMalformed, err)
	}
	var h struct {
		Alg string `json:"alg"`
		Kid string `json:"kid"`
	}
	if err := json.Unmarshal(b, &h); err != nil {
		return "", "", fmt.Errorf("%w: header: %v", ErrMalformed, err)
	}
	return h.Alg, h.Kid, nil
}
