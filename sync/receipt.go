package centralsync

import (
	"bytes"
	"crypto"
	"crypto/ed25519"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jwk"
	"github.com/lestrrat-go/jwx/v2/jws"
)

// Thumbprint is the RFC 7638 SHA-256 thumbprint of a key, base64url: the kid
// of a receipt and the pin central keeps per gateway.
func Thumbprint(key jwk.Key) (string, error) {
	tp, err := key.Thumbprint(crypto.SHA256)
	if err != nil {
		return "", err
	}
	return base64.RawURLEncoding.EncodeToString(tp), nil
}

// VerifyReceipt checks a receipt as the Syncer signs it (queueReceipt:
// compact JWS, EdDSA, protected header kid = RFC 7638 thumbprint and jwk =
// the identity public key): the signature by the embedded key, the kid its
// thumbprint. It returns the payload and the key's thumbprint, the latter
// even on failure once known. The caller checks the gateway and the pin.
// Errors never quote the receipt.
func VerifyReceipt(compact []byte) (Receipt, string, error) {
	var p Receipt
	compact = bytes.TrimSpace(compact)
	if bytes.Count(compact, []byte{'.'}) != 2 {
		return p, "", errors.New("not a compact JWS")
	}
	msg, err := jws.Parse(compact, jws.WithCompact())
	if err != nil {
		return p, "", errors.New("not a compact JWS")
	}
	sigs := msg.Signatures()
	if len(sigs) != 1 {
		return p, "", fmt.Errorf("%d signatures, want 1", len(sigs))
	}
	h := sigs[0].ProtectedHeaders()
	if h.Algorithm() != jwa.EdDSA {
		return p, "", fmt.Errorf("alg %q, want EdDSA", h.Algorithm())
	}
	key := h.JWK()
	if key == nil {
		return p, "", errors.New("no jwk header")
	}
	if _, private := key.(jwk.OKPPrivateKey); private {
		return p, "", errors.New("jwk header holds a private key")
	}
	var pub ed25519.PublicKey
	if err := key.Raw(&pub); err != nil || len(pub) != ed25519.PublicKeySize {
		return p, "", errors.New("jwk header is not an Ed25519 public key")
	}
	thumb, err := Thumbprint(key)
	if err != nil {
		return p, "", errors.New("jwk header has no thumbprint")
	}
	if h.KeyID() != thumb {
		return p, thumb, errors.New("kid is not the thumbprint of the jwk")
	}
	payload, err := jws.Verify(compact, jws.WithKey(jwa.EdDSA, pub))
	if err != nil {
		return p, thumb, errors.New("signature does not verify")
	}
	if err := json.Unmarshal(payload, &p); err != nil {
		return p, thumb, fmt.Errorf("payload: %s", SafeJSONError(err))
	}
	return p, thumb, nil
}
