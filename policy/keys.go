package policy

import (
	"encoding/json"
	"errors"
	"fmt"

	"github.com/edgegate/edgegate/internal/envelope"
)

// Who signs a device's readings (Registration.Signing).
const (
	// SigningHS256: the gateway, HS256 with the key derived from K1/K2.
	// The default (an empty Signing), and what the platform's own
	// verifiers know; anyone holding K1/K2 can also forge.
	SigningHS256 = "hs256"
	// SigningGateway: the gateway, with the device's asymmetric key (EdDSA
	// or ES256) that it generated at registration and holds in its
	// encrypted store; the public key is registered with the platform.
	// Verifiers need no secret and cannot forge; the gateway can.
	SigningGateway = "gateway"
	// SigningDevice: the device itself signs each reading (a compact JWS
	// as its MQTT payload) with a key only it holds; the gateway verifies
	// and forwards the device's signature untouched, so nobody downstream
	// has to trust the gateway.
	SigningDevice = "device"
)

// MaxPublicKeys bounds the keys kept per device (current plus older ones).
const MaxPublicKeys = 8

// compileKeys checks a registration's signing mode and public keys.
func compileKeys(r Registration) (string, []envelope.Key, error) {
	signing := r.Signing
	if signing == "" {
		signing = SigningHS256
	}
	switch signing {
	case SigningHS256:
		// Public keys, if any, are kept for verification only (a device
		// moved back to HS256 whose older readings are still verified).
	case SigningGateway, SigningDevice:
		if len(r.PublicKeys) == 0 {
			return "", nil, fmt.Errorf("signing %q needs public_keys", signing)
		}
	default:
		return "", nil, fmt.Errorf("signing %q is not one of %s, %s, %s", clip(signing), SigningHS256, SigningGateway, SigningDevice)
	}
	if len(r.PublicKeys) > MaxPublicKeys {
		return "", nil, fmt.Errorf("%d public_keys, at most %d", len(r.PublicKeys), MaxPublicKeys)
	}
	keys := make([]envelope.Key, 0, len(r.PublicKeys))
	seen := map[string]bool{}
	for i, raw := range r.PublicKeys {
		k, err := envelope.ParseKey(raw)
		if err != nil {
			return "", nil, fmt.Errorf("public_keys[%d]: %v", i, err)
		}
		if k.CanSign() {
			return "", nil, fmt.Errorf("public_keys[%d] holds a private key", i)
		}
		if seen[k.ID()] {
			return "", nil, fmt.Errorf("public_keys[%d]: key %s listed twice", i, k.ID())
		}
		seen[k.ID()] = true
		keys = append(keys, k)
	}
	return signing, keys, nil
}

// Signing is who signs the device's readings: SigningHS256, SigningGateway
// or SigningDevice.
func (d *Device) Signing() string { return d.signing }

// PublicKeys are the device's public keys, newest first (verification
// only).
func (d *Device) PublicKeys() []envelope.Key { return d.pubKeys }

// SigningKeyID is the kid the gateway signs with for SigningGateway (the
// newest public key's), "" otherwise.
func (d *Device) SigningKeyID() string {
	if d.signing != SigningGateway || len(d.pubKeys) == 0 {
		return ""
	}
	return d.pubKeys[0].ID()
}

// VerifyKeys are the keys a reading of the device may verify with: the
// public keys for SigningGateway and SigningDevice, the HS256 key (and any
// public keys kept) for SigningHS256.
func (d *Device) VerifyKeys() []envelope.Key {
	if d.signing == SigningHS256 {
		return append([]envelope.Key{d.key}, d.pubKeys...)
	}
	return d.pubKeys
}

// PublicKeysJSON renders keys as the Registration.PublicKeys form.
func PublicKeysJSON(keys []envelope.Key) ([]json.RawMessage, error) {
	out := make([]json.RawMessage, 0, len(keys))
	for _, k := range keys {
		b, err := k.PublicJWK()
		if err != nil {
			return nil, err
		}
		out = append(out, b)
	}
	return out, nil
}

// ParsePublicKeys reads public keys in any form a source may carry them
// (a JWK, a JWK Set, a JSON array of JWKs, PEM) into the
// Registration.PublicKeys form. Private keys are refused.
func ParsePublicKeys(data []byte) ([]json.RawMessage, error) {
	keys, err := envelope.ParseKeys(data)
	if err != nil {
		return nil, err
	}
	for _, k := range keys {
		if k.CanSign() {
			return nil, errors.New("public keys: a private key was given")
		}
	}
	return PublicKeysJSON(keys)
}
