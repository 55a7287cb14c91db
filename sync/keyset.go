package centralsync

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jwk"
	"github.com/lestrrat-go/jwx/v2/jws"
)

// Key rollover: how a gateway learns the companion's rotated keys without
// pairing again.
//
// The companion serves its published key set at KeySetPath as a JWS in
// the general JSON serialization (RFC 7515 §7.2.1) whose payload is a
// KeySet, with one signature by EVERY key it publishes (typ
// edgegate-keyset+jws, kid, ES256). A gateway accepts a set only when one
// of those signatures verifies with a key it pins now; then it pins
// exactly the keys of the set (dropping the ones the companion no longer
// publishes). Signing with every published key rather than with the
// previous newest one means a gateway that pins any key still inside its
// overlap follows the chain, even across two rotations within one
// overlap. A gateway whose pinned keys were all retired (offline past the
// overlap) cannot follow it: that is refused as ReasonKeysRetired and the
// operator must pair again. TLS alone never makes a set trusted.

// KeySetPath is where the companion serves its signed key set.
const KeySetPath = "/edgegate/v1/policy-keys.jws"

// KeySetType is the typ of every signature of a signed key set.
const KeySetType = "edgegate-keyset+jws"

// StateKeys is the encrypted-store record of the pinned key set after a
// rollover (pinnedKeys, JSON); before the first rollover the keys pinned
// at pairing (policy.keys_file) are in force.
const StateKeys = "policy-keys"

// Key set refusal reasons (label "reason" of metrics.PolicyRefused, via
// "keys").
const (
	// ReasonKeySetUntrusted: the set names a pinned key but no signature
	// by a pinned key verifies (a forgery, or a broken companion).
	ReasonKeySetUntrusted = "key_set_untrusted"
	// ReasonKeysRetired: no signature of the set is by a pinned key and
	// the set publishes none of them: the companion retired every key this
	// gateway knows (offline past key_overlap), or the set is forged.
	// Either way only pairing again restores trust.
	ReasonKeysRetired = "keys_retired"
)

const mediaJOSEJSON = "application/jose+json"

// KeySet is the payload of a signed key set.
type KeySet struct {
	Keys      json.RawMessage `json:"keys"` // the public JWKs, as in a JWKS
	IssuedAt  time.Time       `json:"issued_at"`
	ExpiresAt time.Time       `json:"expires_at"`
}

// GeneralJWS is the general JSON serialization of a JWS (RFC 7515 §7.2.1).
type GeneralJWS struct {
	Payload    string         `json:"payload"`
	Signatures []GeneralJWSig `json:"signatures"`
}

// GeneralJWSig is one signature of a GeneralJWS.
type GeneralJWSig struct {
	Protected string `json:"protected"`
	Signature string `json:"signature"`
}

// pinnedKeys is the StateKeys record.
type pinnedKeys struct {
	// Anchor is the kids of the keys pinned at pairing (the keys file):
	// a record from another pairing is ignored, so `pair --force` wins.
	Anchor   string          `json:"anchor"`
	IssuedAt time.Time       `json:"issued_at"` // of the set: an older one is a rollback
	Keys     json.RawMessage `json:"keys"`      // JWKS
}

// keyIDs lists the kids of set, sorted.
func keyIDs(set jwk.Set) []string {
	var ids []string
	for i := 0; i < set.Len(); i++ {
		k, _ := set.Key(i)
		ids = append(ids, k.KeyID())
	}
	slices.Sort(ids)
	return ids
}

// VerifiedKeySet is a key set signed by a pinned key.
type VerifiedKeySet struct {
	Keys     jwk.Set
	IssuedAt time.Time
	SignedBy string // the pinned kid whose signature verified
}

// VerifyKeySet checks a signed key set against the keys v pins: a
// signature by one of them (alg pinned to the key, typ KeySetType), an
// unexpired payload issued no later than now+skew and not before
// notBefore, public keys only, each usable by a Verifier. Every refusal is
// a *RefusalError; none quotes key material.
func (v *Verifier) VerifyKeySet(raw []byte, notBefore time.Time) (*VerifiedKeySet, error) {
	if len(raw) > v.max {
		return nil, refuse(ReasonOversized, "key set: %d bytes, at most %d", len(raw), v.max)
	}
	var g GeneralJWS
	dec := json.NewDecoder(bytes.NewReader(raw))
	if err := dec.Decode(&g); err != nil {
		return nil, refuse(ReasonMalformed, "key set: not a JWS JSON serialization: %s", SafeJSONError(err))
	}
	if len(g.Signatures) == 0 || len(g.Signatures) > 16 {
		return nil, refuse(ReasonMalformed, "key set: %d signatures, want 1 to 16", len(g.Signatures))
	}
	var payload []byte
	var signedBy string
	var named, unpinned []string
	for _, sig := range g.Signatures {
		hb, err := base64.RawURLEncoding.DecodeString(sig.Protected)
		if err != nil {
			return nil, refuse(ReasonMalformed, "key set: protected header is not base64url")
		}
		var h struct {
			Alg  string `json:"alg"`
			Kid  string `json:"kid"`
			Typ  string `json:"typ"`
			Crit any    `json:"crit"`
			B64  *bool  `json:"b64"`
		}
		if err := json.Unmarshal(hb, &h); err != nil {
			return nil, refuse(ReasonMalformed, "key set: protected header: %s", SafeJSONError(err))
		}
		key, ok := v.keys[h.Kid]
		if !ok {
			unpinned = append(unpinned, clip(h.Kid))
			continue
		}
		named = append(named, h.Kid)
		if h.Crit != nil || h.B64 != nil || h.Typ != KeySetType || jwa.SignatureAlgorithm(h.Alg) != key.alg {
			continue
		}
		compact := sig.Protected + "." + g.Payload + "." + sig.Signature
		p, err := jws.Verify([]byte(compact), jws.WithKey(key.alg, key.raw))
		if err != nil {
			continue
		}
		payload, signedBy = p, h.Kid
		break
	}
	if signedBy == "" {
		if len(named) > 0 {
			return nil, refuse(ReasonKeySetUntrusted, "key set: no valid signature by the pinned key(s) %s it names", strings.Join(named, ", "))
		}
		return nil, refuse(ReasonKeysRetired, "key set signed only by keys this gateway does not pin (%s)", strings.Join(unpinned, ", "))
	}
	var ks KeySet
	pd := json.NewDecoder(bytes.NewReader(payload))
	if err := pd.Decode(&ks); err != nil {
		return nil, refuse(ReasonMalformed, "key set payload: %s", SafeJSONError(err))
	}
	now := v.now()
	switch {
	case ks.IssuedAt.IsZero() || ks.ExpiresAt.IsZero():
		return nil, refuse(ReasonMalformed, "key set: issued_at and expires_at are required")
	case ks.IssuedAt.After(now.Add(v.skew)):
		return nil, refuse(ReasonNotYetValid, "key set issued at %s, our clock says %s", ks.IssuedAt.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339))
	case !ks.ExpiresAt.After(now):
		return nil, refuse(ReasonExpired, "key set expired at %s", ks.ExpiresAt.UTC().Format(time.RFC3339))
	case ks.IssuedAt.Before(notBefore):
		return nil, refuse(ReasonRollback, "key set issued at %s, older than the pinned one (%s)",
			ks.IssuedAt.UTC().Format(time.RFC3339), notBefore.UTC().Format(time.RFC3339))
	}
	set, err := ParsePublicKeySet(ks.Keys)
	if err != nil {
		return nil, refuse(ReasonMalformed, "key set: %v", err)
	}
	if _, err := NewVerifier(VerifierOptions{Keys: set, Gateway: v.gateway}); err != nil {
		return nil, refuse(ReasonMalformed, "key set: %v", err)
	}
	return &VerifiedKeySet{Keys: set, IssuedAt: ks.IssuedAt, SignedBy: signedBy}, nil
}

// ParsePublicKeySet parses a JWKS of public keys: a private or symmetric
// key is refused (its error names the index, never the key).
func ParsePublicKeySet(raw []byte) (jwk.Set, error) {
	set, err := jwk.Parse(raw)
	if err != nil {
		return nil, errors.New("not a JWKS")
	}
	if set.Len() == 0 {
		return nil, errors.New("the set is empty")
	}
	for i := 0; i < set.Len(); i++ {
		k, _ := set.Key(i)
		if _, isPriv := k.(interface{ D() []byte }); isPriv || k.KeyType() == jwa.OctetSeq {
			return nil, fmt.Errorf("key %d is not a public key", i)
		}
	}
	return set, nil
}

// KeysStatus is the key rollover's state, for `edgegate status`.
type KeysStatus struct {
	Pinned     []string  `json:"pinned"`                // kids in force
	IssuedAt   time.Time `json:"issued_at,omitzero"`    // of the signed set pinned; zero: the pairing's
	LastCheck  time.Time `json:"last_check,omitzero"`   // last fetch of the signed set
	LastResult string    `json:"last_result,omitempty"` // pinned, not_modified, not_offered, refused: …, error: …
	// RePair is set when the companion's keys cannot be followed any more:
	// the operator must run edgegate pair --force.
	RePair bool `json:"re_pair,omitempty"`
}

// keyFetchMinGap bounds the key set fetches an unknown kid triggers: a
// flood of bundles naming invented kids costs one fetch per gap.
const keyFetchMinGap = 30 * time.Second

// loadPinnedKeys puts the key set pinned by an earlier rollover in force,
// if it belongs to the current pairing. Called with applyMu held.
func (s *Syncer) loadPinnedKeys() error {
	if s.o.Source != SourceBundle {
		return nil
	}
	b, ok, err := s.o.Store.GetState(StateKeys)
	if err != nil {
		return fmt.Errorf("load pinned policy keys: %w", err)
	}
	if !ok {
		return nil
	}
	var pk pinnedKeys
	if err := json.Unmarshal(b, &pk); err != nil {
		return fmt.Errorf("load pinned policy keys: %s", SafeJSONError(err))
	}
	if pk.Anchor != s.anchor {
		s.log.Info("pinned policy keys from another pairing ignored; the keys file is in force")
		return nil
	}
	set, err := ParsePublicKeySet(pk.Keys)
	if err != nil {
		return fmt.Errorf("load pinned policy keys: %w", err)
	}
	v, err := NewVerifier(VerifierOptions{Keys: set, Gateway: s.o.Gateway, MaxBytes: s.o.MaxBundleBytes, Skew: s.o.ClockSkew, Now: s.o.Now})
	if err != nil {
		return fmt.Errorf("load pinned policy keys: %w", err)
	}
	s.mu.Lock()
	s.verifier, s.keysIssued = v, pk.IssuedAt
	s.st.Keys.Pinned, s.st.Keys.IssuedAt = keyIDs(set), pk.IssuedAt
	s.mu.Unlock()
	return nil
}

// refreshKeys fetches the signed key set (with ETag) and pins it when a
// pinned key signed it. It reports whether the pinned keys changed.
// Called with applyMu held.
func (s *Syncer) refreshKeys(ctx context.Context) (bool, error) {
	target := strings.TrimRight(s.o.CentralURL, "/") + KeySetPath
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, target, nil)
	if err != nil {
		return false, fmt.Errorf("GET %s: %w", redactURL(target), err)
	}
	req.Header.Set("Accept", mediaJOSEJSON)
	s.mu.Lock()
	if s.keysETag != "" {
		req.Header.Set("If-None-Match", s.keysETag)
	}
	s.mu.Unlock()
	result := func(r string) {
		s.mu.Lock()
		s.st.Keys.LastCheck, s.st.Keys.LastResult = s.now(), r
		s.mu.Unlock()
	}
	resp, err := s.client.Do(req)
	if err != nil {
		err = fmt.Errorf("GET %s: %w", redactURL(target), unwrapURL(err))
		result("error: " + clip(err.Error()))
		return false, err
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, s.maxBody+1))
	resp.Body.Close()
	if err != nil {
		err = fmt.Errorf("GET %s: read answer: %w", redactURL(target), err)
		result("error: " + clip(err.Error()))
		return false, err
	}
	switch resp.StatusCode {
	case http.StatusNotModified:
		result("not_modified")
		return false, nil
	case http.StatusNotFound:
		// A companion (or simulator) without signed key sets: the keys
		// pinned at pairing stay; nothing to count.
		result("not_offered")
		return false, nil
	case http.StatusOK:
	default:
		err := fmt.Errorf("GET %s: status %d", redactURL(target), resp.StatusCode)
		result("error: " + clip(err.Error()))
		return false, err
	}
	if mt, _, err := mime.ParseMediaType(resp.Header.Get("Content-Type")); err != nil || mt != mediaJOSEJSON {
		return false, s.keysRefused(ctx, refuse(ReasonMalformed, "key set: content type %q, want %s", clip(resp.Header.Get("Content-Type")), mediaJOSEJSON))
	}
	s.mu.Lock()
	v, notBefore := s.verifier, s.keysIssued
	s.mu.Unlock()
	vk, err := v.VerifyKeySet(body, notBefore)
	if err != nil {
		var re *RefusalError
		if errors.As(err, &re) {
			return false, s.keysRefused(ctx, re)
		}
		return false, err
	}
	nv, err := NewVerifier(VerifierOptions{Keys: vk.Keys, Gateway: s.o.Gateway, MaxBytes: s.o.MaxBundleBytes, Skew: s.o.ClockSkew, Now: s.o.Now})
	if err != nil {
		return false, s.keysRefused(ctx, refuse(ReasonMalformed, "key set: %v", err))
	}
	jb, err := json.Marshal(vk.Keys)
	if err != nil {
		return false, fmt.Errorf("pin policy keys: %w", err)
	}
	rec, _ := json.Marshal(pinnedKeys{Anchor: s.anchor, IssuedAt: vk.IssuedAt, Keys: jb})
	// Persist before use: after a crash the gateway pins what it used.
	if err := s.o.Store.PutState(StateKeys, rec); err != nil {
		result("error: " + clip(err.Error()))
		return false, fmt.Errorf("pin policy keys: %w", err)
	}
	ids := keyIDs(vk.Keys)
	s.mu.Lock()
	old := s.st.Keys.Pinned
	s.verifier, s.keysIssued, s.keysETag = nv, vk.IssuedAt, resp.Header.Get("ETag")
	s.st.Keys.Pinned, s.st.Keys.IssuedAt, s.st.Keys.RePair = ids, vk.IssuedAt, false
	s.mu.Unlock()
	result("pinned")
	changed := !slices.Equal(old, ids)
	if changed {
		s.log.Info("policy keys rolled over", "pinned", ids, "previous", old, "signed_by", vk.SignedBy)
	}
	return changed, nil
}

// keysRefused counts, logs (rate-limited) and records a refused key set.
func (s *Syncer) keysRefused(ctx context.Context, re *RefusalError) error {
	if m := s.o.Metrics; m != nil {
		m.PolicyRefused.WithLabelValues(re.Reason).Inc()
	}
	s.mu.Lock()
	s.st.Keys.LastCheck, s.st.Keys.LastResult = s.now(), "refused: "+re.Reason
	s.st.LastRefusal = &Refusal{Reason: re.Reason, At: s.now(), Via: "keys", Detail: re.Detail}
	if re.Reason == ReasonKeysRetired {
		s.st.Keys.RePair = true
	}
	s.mu.Unlock()
	if re.Reason == ReasonKeysRetired {
		s.limited.Log(ctx, levelWarn, "keys-retired",
			"the companion no longer publishes any policy key this gateway pins (offline past key_overlap, or a forged key set): bundles signed by its new keys are refused; pair again: edgegate pair --force",
			"reason", re.Reason, "detail", re.Detail)
	} else {
		s.limited.Log(ctx, levelWarn, "keys-"+re.Reason, "companion key set refused; the pinned keys stay", "reason", re.Reason, "detail", re.Detail)
	}
	if s.o.OnRefusal != nil {
		s.o.OnRefusal(re.Reason, "keys", re.Detail)
	}
	return re
}
