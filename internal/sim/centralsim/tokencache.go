package centralsim

import (
	"crypto/sha256"
	"sync"
	"time"
)

// tokenCache remembers access tokens that verified, until they expire, as
// an authorising proxy in front of a broker does: an RS256 verification per
// request cost the simulator more CPU than the gateway spent on the whole
// reading (edgegate-bench, filter mode). Only successful verifications are
// cached, keyed by the token's SHA-256; a hit is re-checked against the
// clock, so an expired token is refused exactly as before.
type tokenCache struct {
	mu sync.Mutex
	m  map[[sha256.Size]byte]cachedToken
}

type cachedToken struct {
	user, azp string
	exp       time.Time
}

// maxCachedTokens bounds the cache; when full it is emptied (tokens live
// minutes, gateways hold one each).
const maxCachedTokens = 1024

func (c *tokenCache) get(raw string, now time.Time) (cachedToken, bool) {
	h := sha256.Sum256([]byte(raw))
	c.mu.Lock()
	defer c.mu.Unlock()
	t, ok := c.m[h]
	if !ok {
		return cachedToken{}, false
	}
	if !now.Before(t.exp) {
		delete(c.m, h)
		return cachedToken{}, false
	}
	return t, true
}

func (c *tokenCache) put(raw string, t cachedToken) {
	if t.exp.IsZero() {
		return
	}
	h := sha256.Sum256([]byte(raw))
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil || len(c.m) >= maxCachedTokens {
		c.m = make(map[[sha256.Size]byte]cachedToken)
	}
	c.m[h] = t
}
