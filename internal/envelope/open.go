package envelope

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"math/big"
	"strings"

	"github.com/lestrrat-go/jwx/v2/jwa"
)

// openFast verifies an envelope whose protected header is byte for byte the
// one Seal renders for one of keys: the header then names exactly that
// key's algorithm and id, and nothing else (no "crit", no "b64"), so the
// JWS reduces to one signature check over "header.payload" with the
// standard library. That is every envelope this gateway or a conforming
// device produces, and it costs a fraction of jws.Parse plus jws.Verify
// (the broker-side verifier checks one per reading). ok is false when the
// fast path does not apply; OpenWith then takes the general path, which
// also words every error.
func openFast(compact string, keys []Key) (c Claims, ok bool, err error) {
	i := strings.IndexByte(compact, '.')
	if i <= 0 {
		return Claims{}, false, nil
	}
	j := strings.IndexByte(compact[i+1:], '.')
	if j < 0 {
		return Claims{}, false, nil
	}
	j += i + 1
	if strings.IndexByte(compact[j+1:], '.') >= 0 {
		return Claims{}, false, nil
	}
	hdr := compact[:i]
	var k *Key
	for n := range keys {
		if keys[n].hdr != "" && keys[n].hdr == hdr {
			k = &keys[n]
			break
		}
	}
	if k == nil {
		return Claims{}, false, nil
	}
	enc := base64.RawURLEncoding
	sig, err := enc.DecodeString(compact[j+1:])
	if err != nil {
		return Claims{}, false, nil
	}
	input := compact[:j]
	var valid bool
	switch {
	case k.alg == jwa.HS256 && len(k.secret) > 0 && len(k.secret) <= sha256.BlockSize:
		// On pooled hash state (sealbody.go): no hmac.New per check.
		s := getScratch()
		valid = hmac.Equal(hmacSHA256(s, k.secret, []byte(input)), sig)
		putScratch(s)
	case k.alg == jwa.EdDSA:
		pub, isEd := k.pub.(ed25519.PublicKey)
		if !isEd {
			return Claims{}, false, nil
		}
		valid = ed25519.Verify(pub, []byte(input), sig)
	case k.alg == jwa.ES256:
		pub, isEC := k.pub.(*ecdsa.PublicKey)
		if !isEC {
			return Claims{}, false, nil
		}
		if len(sig) == 64 {
			sum := sha256.Sum256([]byte(input))
			r, s := new(big.Int).SetBytes(sig[:32]), new(big.Int).SetBytes(sig[32:])
			valid = ecdsa.Verify(pub, sum[:], r, s)
		}
	default:
		return Claims{}, false, nil
	}
	if !valid {
		return Claims{}, true, fmt.Errorf("%w: signature does not match the content", ErrTampered)
	}
	payload, err := enc.DecodeString(compact[i+1 : j])
	if err != nil {
		// Signed but not decodable: the general path words the error.
		return Claims{}, false, nil
	}
	c, err = decodeClaims(payload)
	return c, true, err
}

// decodeClaims decodes a verified payload strictly.
func decodeClaims(payload []byte) (Claims, error) {
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
