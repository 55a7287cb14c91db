package centralsim

import (
	"sync"
	"time"
)

// DefaultFilterCacheTTL is how long the filter keeps an answer of the
// ownership or delegation check: the deploy's spring.elapsingcache.minutes
// as the contract (SNAP4CITY.md) states it for the public
// platform. The repository's own defaults are longer
// (OrionBrokerFilter application-deploy.properties: 60, its
// docker-compose.yml.template: 10), so a refusal lasts at least this long.
const DefaultFilterCacheTTL = 3 * time.Minute

// filterCache holds the filter's cached checks, as
// AccessTokenAuthenticationFilter keeps cachedOwnership, cachedDelegation
// (per element, then per username and element type) and
// cachedDelegationPublic (per element). Positive AND negative answers are
// cached: CheckCredential is stored whatever its result, and dropped only
// when isElapsed() (CheckCredential/CachedCredentials: elapsing date =
// creation + minutes). A failed back-end call caches nothing (the
// exception leaves before ownerships.add).
type filterCache struct {
	mu     sync.Mutex
	own    map[cacheKey]cachedCheck
	deleg  map[cacheKey]cachedCheck
	public map[string]time.Time // element -> elapsing date
}

type cacheKey struct{ element, user string }

type cachedCheck struct {
	result   bool
	kind     string
	elapsing time.Time
}

// elapsed is CachedCredentials.isElapsed: elapsingDate.before(now).
func (c cachedCheck) elapsed(now time.Time) bool { return c.elapsing.Before(now) }

func (c *filterCache) get(m map[cacheKey]cachedCheck, k cacheKey, now time.Time) (cachedCheck, bool) {
	v, ok := m[k]
	if !ok {
		return cachedCheck{}, false
	}
	if v.elapsed(now) {
		delete(m, k)
		return cachedCheck{}, false
	}
	return v, true
}

func (c *filterCache) init() {
	if c.own == nil {
		c.own, c.deleg, c.public = map[cacheKey]cachedCheck{}, map[cacheKey]cachedCheck{}, map[string]time.Time{}
	}
}

func (c *filterCache) ownership(element, user string, now time.Time) (cachedCheck, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.init()
	return c.get(c.own, cacheKey{element, user}, now)
}

func (c *filterCache) putOwnership(element, user string, v cachedCheck) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.init()
	c.own[cacheKey{element, user}] = v
}

func (c *filterCache) delegation(element, user string, now time.Time) (cachedCheck, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.init()
	return c.get(c.deleg, cacheKey{element, user}, now)
}

func (c *filterCache) putDelegation(element, user string, v cachedCheck, public bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.init()
	c.deleg[cacheKey{element, user}] = v
	if public {
		c.public[element] = v.elapsing
	}
}

// isPublic is the read branch's cachedDelegationPublic lookup: public and
// not elapsed (an elapsed entry is removed).
func (c *filterCache) isPublic(element string, now time.Time) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.init()
	until, ok := c.public[element]
	if ok && until.Before(now) {
		delete(c.public, element)
		return false
	}
	return ok
}

// clear forgets every cached answer (a restart of the filter).
func (c *filterCache) clear() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.own, c.deleg, c.public = nil, nil, nil
}

// ClearFilterCache empties the broker filter's cache, as restarting the
// filter does. Tests use it; stock has no such call.
func (s *Server) ClearFilterCache() { s.fcache.clear() }
