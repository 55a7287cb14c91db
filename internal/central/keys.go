package central

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jwk"
	"github.com/lestrrat-go/jwx/v2/jws"

	"github.com/edgegate/edgegate/internal/atomicfile"
	centralsync "github.com/edgegate/edgegate/sync"
)

// keyFile is the signing key file: private ES256 JWKs, oldest first; the
// newest signs. A key is published (policy-keys) until its RetireAt, so a
// bundle it signed before a rotation stays verifiable for the overlap.
type keyFile struct {
	Keys []keyEntry `json:"keys"`
}

type keyEntry struct {
	Key      json.RawMessage `json:"jwk"` // private JWK, kid = RFC 7638 thumbprint, alg ES256
	Created  time.Time       `json:"created"`
	RetireAt time.Time       `json:"retire_at,omitzero"` // set when a newer key takes over
}

// KeyRing holds the policy-signing keys. The private keys never leave it:
// no method returns them and no error quotes them.
type KeyRing struct {
	path string
	mu   sync.Mutex
	mod  time.Time
	keys []ringKey

	// The last signed key set, its signers' kids and when it was signed.
	setCache []byte
	setKids  string
	setAt    time.Time
}

type ringKey struct {
	priv     jwk.Key
	created  time.Time
	retireAt time.Time
}

// OpenKeyRing loads path, creating it with one new key when it does not
// exist (create false: a missing file is an error).
func OpenKeyRing(path string, create bool) (*KeyRing, error) {
	r := &KeyRing{path: path}
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) && create {
		if _, err := r.Rotate(0, time.Now()); err != nil {
			return nil, err
		}
		return r, nil
	}
	if err := r.load(); err != nil {
		return nil, err
	}
	return r, nil
}

func (r *KeyRing) load() error {
	st, err := os.Stat(r.path)
	if err != nil {
		return fmt.Errorf("signing keys: %w", err)
	}
	if st.Mode().Perm()&0o077 != 0 {
		return fmt.Errorf("signing keys %s: mode %o, want 0600 or stricter", r.path, st.Mode().Perm())
	}
	b, err := os.ReadFile(r.path)
	if err != nil {
		return fmt.Errorf("signing keys: %w", err)
	}
	var f keyFile
	if err := json.Unmarshal(b, &f); err != nil {
		return fmt.Errorf("signing keys %s: not a key file (invalid JSON)", r.path)
	}
	if len(f.Keys) == 0 {
		return fmt.Errorf("signing keys %s: no key", r.path)
	}
	keys := make([]ringKey, 0, len(f.Keys))
	for i, e := range f.Keys {
		k, err := jwk.ParseKey(e.Key)
		if err != nil {
			return fmt.Errorf("signing keys %s: key %d is not a JWK", r.path, i)
		}
		if _, ok := k.(jwk.ECDSAPrivateKey); !ok || k.KeyID() == "" {
			return fmt.Errorf("signing keys %s: key %d is not a private EC key with a kid", r.path, i)
		}
		keys = append(keys, ringKey{priv: k, created: e.Created, retireAt: e.RetireAt})
	}
	r.keys, r.mod = keys, st.ModTime()
	return nil
}

// Reload rereads the file when it changed (a `keys rotate` by the CLI);
// it keeps the keys it has when the file is unreadable.
func (r *KeyRing) Reload() error {
	st, err := os.Stat(r.path)
	if err != nil {
		return fmt.Errorf("signing keys: %w", err)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if st.ModTime().Equal(r.mod) {
		return nil
	}
	old := r.keys
	if err := r.load(); err != nil {
		r.keys = old
		return err
	}
	return nil
}

func newSigningKey() (jwk.Key, error) {
	raw, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("signing key: %w", err)
	}
	k, err := jwk.FromRaw(raw)
	if err != nil {
		return nil, fmt.Errorf("signing key: %w", err)
	}
	if err := jwk.AssignKeyID(k); err != nil { // RFC 7638 thumbprint
		return nil, fmt.Errorf("signing key id: %w", err)
	}
	if err := k.Set(jwk.AlgorithmKey, jwa.ES256); err != nil {
		return nil, fmt.Errorf("signing key: %w", err)
	}
	return k, nil
}

// Rotate adds a new signing key, which signs from now on; the keys before
// it stay published until now+overlap. It writes the file (0600,
// atomically) and returns the new kid.
func (r *KeyRing) Rotate(overlap time.Duration, now time.Time) (string, error) {
	k, err := newSigningKey()
	if err != nil {
		return "", err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	keys := append([]ringKey(nil), r.keys...)
	for i := range keys {
		if keys[i].retireAt.IsZero() {
			keys[i].retireAt = now.Add(overlap)
		}
	}
	keys = append(keys, ringKey{priv: k, created: now})
	// Keys retired long ago are dropped from the file: nothing verifies
	// with them any more.
	kept := keys[:0]
	for _, rk := range keys {
		if rk.retireAt.IsZero() || rk.retireAt.After(now) {
			kept = append(kept, rk)
		}
	}
	if err := r.write(kept); err != nil {
		return "", err
	}
	r.keys = kept
	return k.KeyID(), nil
}

func (r *KeyRing) write(keys []ringKey) error {
	var f keyFile
	for _, rk := range keys {
		b, err := json.Marshal(rk.priv)
		if err != nil {
			return fmt.Errorf("signing keys: %w", err)
		}
		f.Keys = append(f.Keys, keyEntry{Key: b, Created: rk.created, RetireAt: rk.retireAt})
	}
	b, err := json.MarshalIndent(f, "", "  ")
	if err != nil {
		return fmt.Errorf("signing keys: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(r.path), 0o700); err != nil {
		return fmt.Errorf("signing keys: %w", err)
	}
	if err := atomicfile.Write(r.path, b, 0o600); err != nil {
		return fmt.Errorf("signing keys: %w", err)
	}
	if st, err := os.Stat(r.path); err == nil {
		r.mod = st.ModTime()
	}
	return nil
}

// Public is the JWKS gateways pin: every key not yet retired at now.
func (r *KeyRing) Public(now time.Time) jwk.Set {
	r.mu.Lock()
	defer r.mu.Unlock()
	set := jwk.NewSet()
	for _, rk := range r.keys {
		if !rk.retireAt.IsZero() && !rk.retireAt.After(now) {
			continue
		}
		pub, err := jwk.PublicKeyOf(rk.priv)
		if err != nil {
			continue
		}
		_ = pub.Set(jwk.KeyUsageKey, "sig")
		_ = set.AddKey(pub)
	}
	return set
}

// ActiveKID is the kid of the key that signs now.
func (r *KeyRing) ActiveKID() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.keys[len(r.keys)-1].priv.KeyID()
}

// Sign signs payload with the newest key: compact JWS, ES256, kid and typ
// edgegate-policy+jws in the protected header, as sync/bundle.go verifies.
func (r *KeyRing) Sign(payload []byte) (string, error) {
	r.mu.Lock()
	key := r.keys[len(r.keys)-1].priv
	r.mu.Unlock()
	hdr := jws.NewHeaders()
	for k, v := range map[string]any{jws.KeyIDKey: key.KeyID(), jws.TypeKey: centralsync.BundleType} {
		if err := hdr.Set(k, v); err != nil {
			return "", fmt.Errorf("sign: %w", err)
		}
	}
	b, err := jws.Sign(payload, jws.WithKey(jwa.ES256, key, jws.WithProtectedHeaders(hdr)))
	if err != nil {
		return "", errors.New("sign: the signing key refused to sign")
	}
	return string(b), nil
}

// KeySetTTL is how long a signed key set is valid; it is re-signed at
// half of it, so a gateway polling every few minutes always gets a live
// one, and a captured old set cannot be replayed for long.
const KeySetTTL = 24 * time.Hour

// SignedKeySet is the published key set (Public at now) as a JWS in the
// general JSON serialization, signed by every published key
// (centralsync.KeySetPath, sync/keyset.go verifies it): a gateway that
// pins any key still inside its overlap can follow a rotation without
// pairing again. The answer is cached until the published keys change or
// half of KeySetTTL passed, so its bytes (and ETag) are stable between.
func (r *KeyRing) SignedKeySet(now time.Time) ([]byte, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	var signers []jwk.Key
	var kids []string
	for _, rk := range r.keys {
		if !rk.retireAt.IsZero() && !rk.retireAt.After(now) {
			continue
		}
		signers = append(signers, rk.priv)
		kids = append(kids, rk.priv.KeyID())
	}
	id := strings.Join(kids, ",")
	if r.setCache != nil && r.setKids == id && now.Before(r.setAt.Add(KeySetTTL/2)) && !now.Before(r.setAt) {
		return r.setCache, nil
	}
	if len(signers) == 0 {
		return nil, errors.New("signed key set: no published key")
	}
	pubs := jwk.NewSet()
	for _, k := range signers {
		pub, err := jwk.PublicKeyOf(k)
		if err != nil {
			return nil, fmt.Errorf("signed key set: %w", err)
		}
		_ = pub.Set(jwk.KeyUsageKey, "sig")
		_ = pubs.AddKey(pub)
	}
	keysJSON, err := json.Marshal(pubs)
	if err != nil {
		return nil, fmt.Errorf("signed key set: %w", err)
	}
	issued := now.UTC().Truncate(time.Second)
	payload, err := json.Marshal(centralsync.KeySet{Keys: keysJSON, IssuedAt: issued, ExpiresAt: issued.Add(KeySetTTL)})
	if err != nil {
		return nil, fmt.Errorf("signed key set: %w", err)
	}
	var g centralsync.GeneralJWS
	for _, k := range signers {
		hdr := jws.NewHeaders()
		for name, v := range map[string]any{jws.KeyIDKey: k.KeyID(), jws.TypeKey: centralsync.KeySetType} {
			if err := hdr.Set(name, v); err != nil {
				return nil, fmt.Errorf("signed key set: %w", err)
			}
		}
		compact, err := jws.Sign(payload, jws.WithKey(jwa.ES256, k, jws.WithProtectedHeaders(hdr)))
		if err != nil {
			return nil, errors.New("signed key set: a signing key refused to sign")
		}
		parts := strings.Split(string(compact), ".")
		if len(parts) != 3 {
			return nil, errors.New("signed key set: unexpected JWS form")
		}
		g.Payload = parts[1] // the same payload bytes for every signature
		g.Signatures = append(g.Signatures, centralsync.GeneralJWSig{Protected: parts[0], Signature: parts[2]})
	}
	out, err := json.Marshal(g)
	if err != nil {
		return nil, fmt.Errorf("signed key set: %w", err)
	}
	r.setCache, r.setKids, r.setAt = out, id, now
	return out, nil
}
