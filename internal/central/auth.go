package central

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ed25519"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jwk"
	"github.com/lestrrat-go/jwx/v2/jws"
	"github.com/lestrrat-go/jwx/v2/jwt"
)

// maxTokenBytes bounds a bearer token or MQTT password before parsing.
const maxTokenBytes = 16 << 10

// tokenVerifier checks gateway access tokens as the stock Orion Broker
// Filter does (AccessTokenAuthenticationFilter: the realm's signature by
// kid and exp), plus the issuer; the account is the token's azp.
type tokenVerifier struct {
	issuer string
	keys   jwk.Set
}

func newTokenVerifier(ctx context.Context, issuer string, hc *http.Client) *tokenVerifier {
	certs := issuer + "/protocol/openid-connect/certs" // Keycloak's JWKS
	c := jwk.NewCache(ctx)
	_ = c.Register(certs, jwk.WithHTTPClient(hc), jwk.WithMinRefreshInterval(time.Minute))
	return &tokenVerifier{issuer: issuer, keys: jwk.NewCachedSet(c, certs)}
}

// account verifies raw and returns its azp (the OAuth client: a gateway's
// account). Errors never quote the token.
func (v *tokenVerifier) account(raw string) (string, error) {
	if raw == "" || len(raw) > maxTokenBytes {
		return "", errors.New("no bearer token, or one too large")
	}
	tok, err := jwt.ParseString(raw, jwt.WithKeySet(v.keys, jws.WithInferAlgorithmFromKey(true)),
		jwt.WithValidate(true), jwt.WithIssuer(v.issuer), jwt.WithAcceptableSkew(30*time.Second))
	if err != nil {
		return "", fmt.Errorf("access token refused: %w", errors.Unwrap(err))
	}
	azp, _ := tok.PrivateClaims()["azp"].(string)
	if azp == "" {
		return "", errors.New("access token has no azp (client)")
	}
	return azp, nil
}

func bearer(r *http.Request) string {
	h := r.Header.Get("Authorization")
	if len(h) > 7 && strings.EqualFold(h[:7], "bearer ") {
		return strings.TrimSpace(h[7:])
	}
	return ""
}

// receiptPayload is centralsync.Receipt as it arrives.
type receiptPayload struct {
	Gateway       string `json:"gateway"`
	PolicyVersion uint64 `json:"policy_version"`
	BundleDigest  string `json:"bundle_digest"`
	Source        string `json:"source"`
	AppliedAt     string `json:"applied_at"`
}

// thumbprint is the RFC 7638 SHA-256 thumbprint of a key, base64url.
func thumbprint(key jwk.Key) (string, error) {
	tp, err := key.Thumbprint(crypto.SHA256)
	if err != nil {
		return "", err
	}
	return base64.RawURLEncoding.EncodeToString(tp), nil
}

// verifyReceipt checks a receipt as the gateway signs it (sync/syncer.go:
// compact JWS, EdDSA, protected header kid = RFC 7638 thumbprint and jwk =
// the identity public key): signature by the embedded key, kid its
// thumbprint. The caller checks the pin.
func verifyReceipt(compact []byte) (receiptPayload, string, error) {
	var p receiptPayload
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
	thumb, err := thumbprint(key)
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
		return p, thumb, fmt.Errorf("payload: %s", jsonErr(err))
	}
	return p, thumb, nil
}
