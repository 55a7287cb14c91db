package centralsim

import (
	"encoding/json"
	"errors"
	"fmt"

	"github.com/edgegate/edgegate/internal/envelope"
	"github.com/edgegate/edgegate/policy"
)

// Device keys, as the filter verifies readings with them.
//
// A device registered with public keys (IoT directory insert with
// "publickey", rotation with action=update) is verified with those keys
// only when it is signed by the device itself or by the gateway with an
// asymmetric key: an HS256 signature made from K1/K2 — which the gateway,
// the platform and the owner all hold — is then "wrong key", so a gateway
// forging a device-signed device's reading is detected. A device without
// public keys (or with signing "hs256") is verified with the HS256 key
// derived from K1/K2, plus any public keys it has.

// deviceVerifyKeys returns the keys a reading of d verifies with.
func deviceVerifyKeys(d Device) ([]envelope.Key, error) {
	pubs := make([]envelope.Key, 0, len(d.PublicKeys))
	for i, raw := range d.PublicKeys {
		k, err := envelope.ParseKey(raw)
		if err != nil {
			return nil, fmt.Errorf("public_keys[%d]: %w", i, err)
		}
		if k.CanSign() {
			return nil, fmt.Errorf("public_keys[%d] holds a private key", i)
		}
		pubs = append(pubs, k)
	}
	switch d.Signing {
	case policy.SigningGateway, policy.SigningDevice:
		if len(pubs) == 0 {
			return nil, fmt.Errorf("signing %q without a public key", d.Signing)
		}
		return pubs, nil
	case "", policy.SigningHS256:
	default:
		return nil, fmt.Errorf("signing %q is not hs256, gateway or device", d.Signing)
	}
	if d.K1 == "" || d.K2 == "" {
		return pubs, nil
	}
	hs, err := envelope.DeriveHS256(d.ID, d.K1, d.K2)
	if err != nil {
		return nil, errors.New("cannot derive the device key")
	}
	return append([]envelope.Key{hs}, pubs...), nil
}

// keyOfSignature names the alg and key id of an update's signature.
func (s *Server) keyOfSignature(raw map[string]json.RawMessage) (alg, kid string) {
	var a struct {
		Value string `json:"value"`
	}
	if json.Unmarshal(raw[s.opts.SignatureAttr], &a) != nil {
		return "", ""
	}
	alg, kid, _ = envelope.KeyIDOf(a.Value)
	return alg, kid
}

// parsePublicKeyParam reads the directory's "publickey" parameter: a JWK,
// a JWK Set or PEM, public keys only.
func parsePublicKeyParam(v string) ([]json.RawMessage, error) {
	if v == "" {
		return nil, nil
	}
	return policy.ParsePublicKeys([]byte(v))
}

// RotateDeviceKey puts pub in front of the device's public keys, keeping
// the older ones (at most policy.MaxPublicKeys in all), as the IoT
// directory's update with a new "publickey" does.
func (s *Server) RotateDeviceKey(id string, pub json.RawMessage) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	d, ok := s.devices[id]
	if !ok {
		return fmt.Errorf("rotate key: unknown device %q", id)
	}
	keys := append([]json.RawMessage{pub}, d.PublicKeys...)
	if len(keys) > policy.MaxPublicKeys {
		keys = keys[:policy.MaxPublicKeys]
	}
	d.PublicKeys = keys
	if err := validDevice(d); err != nil {
		return fmt.Errorf("rotate key: %w", err)
	}
	s.addDeviceLocked(d)
	return nil
}
