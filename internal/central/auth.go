package central

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

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
