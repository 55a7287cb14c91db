package centralsync

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"mime"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwk"

	"github.com/edgegate/edgegate/internal/backoff"
	"github.com/edgegate/edgegate/internal/logx"
	"github.com/edgegate/edgegate/internal/metrics"
	"github.com/edgegate/edgegate/internal/reading"
	"github.com/edgegate/edgegate/policy"
)

// Wire formats (the simulated central service implements the other side):
//
//	GET  {central}/edgegate/v1/gateways/{gw}/policy
//	     Authorization: Bearer <gateway account token>; If-None-Match: <last ETag>
//	     200 Content-Type: application/jose, ETag, body: compact JWS (ES256 or
//	     EdDSA, kid of a pinned key, typ edgegate-policy+jws optional), payload:
//	     a policy.Document; 304 unchanged; 401 once: token invalidated, retried.
//	POST {central}/edgegate/v1/gateways/{gw}/receipts
//	     Authorization: Bearer; Content-Type: application/jose; body: compact
//	     JWS, EdDSA, header kid = RFC 7638 thumbprint, jwk = public key, typ
//	     edgegate-receipt+jws; payload Receipt. 2xx delivered; 401, 408, 429,
//	     5xx and network errors retried with backoff; other 4xx dropped.
//	MQTT tls://…, client id edgegate-{gw}, username = the gateway's OAuth
//	     client id, password = a fresh access token per connection, clean
//	     session, SUBSCRIBE edgegate/gateways/{gw}/policy QoS 1; a message is
//	     a compact JWS bundle or {"type":"sync"} (poll now). After every
//	     (re)connect the gateway polls once.

// Policy sources (Options.Source, Policy.Source, the receipt's "source"
// and the "source" label of metrics.PolicyApplied).
const (
	SourceBundle    = "bundle"
	SourceOwnership = "ownership-api"
)

// Names of the state records this package owns in the encrypted store.
const (
	StatePolicy  = "policy"         // cachedPolicy (JSON): the policy last put in force
	StateFloor   = "policy-floor"   // {"version":N}: no policy at or below N is accepted
	StateReceipt = "policy-receipt" // digest of the last policy central acknowledged
)

// Media types and header values on the wire.
const (
	mediaJOSE   = "application/jose"
	ReceiptType = "edgegate-receipt+jws"
)

// Defaults.
const (
	DefaultPollInterval = 5 * time.Minute
	defaultHTTPTimeout  = 30 * time.Second
	mqttWait            = 15 * time.Second // every paho wait
	tokenWait           = 15 * time.Second
	maxBackoff          = 5 * time.Minute
	pushQueue           = 4
)

// Fetch results (SyncStatus.LastFetchResult).
const (
	resultApplied     = "applied"
	resultNotModified = "not_modified"
	resultUnchanged   = "unchanged"
	resultRefused     = "refused"
)

const levelWarn = slog.LevelWarn

// StateStore is the encrypted store's named-record interface (queue.Queue).
type StateStore interface {
	GetState(name string) ([]byte, bool, error)
	PutState(name string, v []byte) error
}

// Tokens hands out the gateway account's access token (*TokenSource).
type Tokens interface {
	Token(ctx context.Context) (string, error)
	Invalidate(token string)
}

// Signer signs receipts with the gateway's identity key
// (*keys.Identity): EdDSA, protected header kid = RFC 7638 thumbprint,
// jwk = the public key, plus extra.
type Signer interface {
	Sign(payload []byte, extra map[string]any) (string, error)
}

// Options configures a Syncer. Zero durations take the defaults.
type Options struct {
	Gateway string // this gateway's id: URLs, MQTT topic and client id, bundle "gateway"
	Source  string // SourceBundle (default) or SourceOwnership

	Engine  *policy.Engine
	Store   StateStore
	Tokens  Tokens
	Signer  Signer           // nil: no receipts
	Metrics *metrics.Metrics // nil: none
	Logger  *slog.Logger     // nil: discard
	// FloorFile keeps the anti-rollback floor outside Store as well
	// (state_dir/FloorFileName), so that it survives a quarantined or
	// wiped store; the floor in force is the higher of the two. Empty:
	// the store only.
	FloorFile string

	// CentralURL is the central service's base, e.g. https://central.example;
	// the bundle is at {CentralURL}/edgegate/v1/gateways/{gw}/policy and
	// receipts go to {CentralURL}/edgegate/v1/gateways/{gw}/receipts.
	// Required for SourceBundle; empty with SourceOwnership: no receipts.
	CentralURL string
	// HTTPClient does every request; nil: one with a 30s timeout and the
	// system roots. Pass one with the central service's roots.
	HTTPClient *http.Client

	// Keys is central ops' pinned JWKS (required for SourceBundle).
	Keys           jwk.Set
	MaxBundleBytes int           // default DefaultMaxBundleBytes; also bounds other answers
	ClockSkew      time.Duration // default DefaultClockSkew

	Ownership OwnershipOptions // SourceOwnership only

	PollInterval time.Duration // default 5 min, jittered ±20%

	// MQTTURL is central's broker, tls://host:8883 (or ssl://, mqtts://);
	// empty: no push channel.
	MQTTURL string
	// MQTTUsername is the gateway's OAuth client id; the password is a
	// fresh access token at every connect.
	MQTTUsername string
	MQTTTLS      *tls.Config // nil: system roots

	Now func() time.Time // nil: time.Now

	// OnRefusal, when set, is told of every refused policy (the audit log).
	OnRefusal func(reason, via, detail string)
}

// Refusal is the last refused offer, for status. Detail is secret-free.
type Refusal struct {
	Reason string    `json:"reason"`
	At     time.Time `json:"at"`
	Via    string    `json:"via"` // poll, push, offer
	Detail string    `json:"detail"`
}

// SyncStatus is a snapshot for `edgegate status`.
type SyncStatus struct {
	Source            string         `json:"source"`
	Version           uint64         `json:"version"` // of the policy this syncer put in force (or loaded); 0: none
	Digest            string         `json:"digest,omitempty"`
	AppliedAt         time.Time      `json:"applied_at,omitzero"`
	ExpiresAt         time.Time      `json:"expires_at,omitzero"`
	Floor             uint64         `json:"floor"`
	LastFetch         time.Time      `json:"last_fetch,omitzero"`
	LastFetchResult   string         `json:"last_fetch_result,omitempty"`
	LastRefusal       *Refusal       `json:"last_refusal,omitempty"`
	PushConnected     bool           `json:"push_connected"`
	LastReceipt       time.Time      `json:"last_receipt,omitzero"`
	LastReceiptResult string         `json:"last_receipt_result,omitempty"`
	ReceiptPending    bool           `json:"receipt_pending"`
	Skipped           map[string]int `json:"skipped,omitempty"` // ownership rows left out, by reason
	// Unusable are the devices the platform gives the account that the
	// gateway cannot serve yet (no entity type, delegated without keys),
	// with the command that fixes each.
	Unusable []UnusableDevice `json:"unusable,omitempty"`
	// Keys is the companion key rollover (source bundle only).
	Keys *KeysStatus `json:"keys,omitempty"`
}

// cachedPolicy is the StatePolicy record. It holds K1/K2: it lives only in
// the encrypted store.
type cachedPolicy struct {
	Source    string          `json:"source"`
	Digest    string          `json:"digest"`
	AppliedAt time.Time       `json:"applied_at"`
	Document  policy.Document `json:"document"`
}

type floorRecord struct {
	Version uint64 `json:"version"`
}

// Receipt is the payload of a receipt JWS.
type Receipt struct {
	Gateway       string `json:"gateway"`
	PolicyVersion uint64 `json:"policy_version"`
	BundleDigest  string `json:"bundle_digest"`
	Source        string `json:"source"`
	AppliedAt     string `json:"applied_at"` // RFC 3339
}

type pendingReceipt struct {
	digest string
	body   []byte // the compact JWS
}

// Syncer keeps the gateway's policy in step with the central service:
// pull (poll with ETag), push (MQTT), verify, persist, apply, acknowledge.
type Syncer struct {
	o        Options
	verifier *Verifier // nil unless SourceBundle
	client   *http.Client
	maxBody  int64
	log      *slog.Logger
	limited  *logx.Limiter
	now      func() time.Time

	nudge       chan struct{} // cap 1: poll now
	pushed      chan []byte   // bundles from the push channel
	receiptWake chan struct{} // cap 1

	loadOnce sync.Once
	loadErr  error

	receiptMin time.Duration // first receipt retry delay; tests shorten it

	// applyMu serialises offers: verify against the floor, persist, apply.
	applyMu sync.Mutex

	mu          sync.Mutex // guards the fields below
	floor       uint64
	floorLoaded bool
	etag        string
	cur         cachedPolicy // what this syncer last put in force (Document unused)
	st          SyncStatus
	pending     *pendingReceipt

	// Key rollover (keyset.go). verifier is replaced under mu with
	// applyMu held, so readers holding applyMu need no mu.
	anchor       string    // kids pinned at pairing (Options.Keys)
	keysETag     string    // of the signed key set pinned
	keysIssued   time.Time // issued_at of the signed key set pinned
	lastKeyFetch time.Time // last fetch an unknown kid triggered
}

// New checks the options and builds a Syncer. It does no I/O: call
// LoadCached before the stages that enforce the policy start, then Run.
func New(o Options) (*Syncer, error) {
	if !reading.ValidSegmentID(o.Gateway) {
		//lint:ignore ST1005 ".." is the path name refused, not punctuation
		return nil, fmt.Errorf("policy sync: gateway id %q must match [A-Za-z0-9._-]{1,256} and not be . or ..", clip(o.Gateway))
	}
	if o.Engine == nil || o.Store == nil || o.Tokens == nil {
		return nil, errors.New("policy sync: engine, store and tokens are required")
	}
	if o.Source == "" {
		o.Source = SourceBundle
	}
	if o.MaxBundleBytes <= 0 {
		o.MaxBundleBytes = DefaultMaxBundleBytes
	}
	if o.PollInterval <= 0 {
		o.PollInterval = DefaultPollInterval
	}
	if o.CentralURL != "" {
		if err := checkHTTPS("central URL", o.CentralURL); err != nil {
			return nil, err
		}
	}
	s := &Syncer{
		o: o, client: o.HTTPClient, maxBody: int64(o.MaxBundleBytes), log: o.Logger, now: o.Now,
		nudge: make(chan struct{}, 1), pushed: make(chan []byte, pushQueue), receiptWake: make(chan struct{}, 1),
		receiptMin: time.Second,
	}
	switch o.Source {
	case SourceBundle:
		if o.CentralURL == "" {
			return nil, errors.New("policy sync: source bundle needs the central URL")
		}
		v, err := NewVerifier(VerifierOptions{Keys: o.Keys, Gateway: o.Gateway, MaxBytes: o.MaxBundleBytes, Skew: o.ClockSkew, Now: o.Now})
		if err != nil {
			return nil, fmt.Errorf("policy sync: %w", err)
		}
		s.verifier = v
		s.anchor = strings.Join(keyIDs(o.Keys), ",")
		s.st.Keys = &KeysStatus{Pinned: keyIDs(o.Keys)}
	case SourceOwnership:
		ow := o.Ownership
		if err := checkHTTPS("ownership URL", ow.OwnershipURL); err != nil {
			return nil, err
		}
		if ow.DataManagerURL != "" {
			if err := checkHTTPS("datamanager URL", ow.DataManagerURL); err != nil {
				return nil, err
			}
			if ow.Username == "" {
				return nil, errors.New("policy sync: ownership.username is required to read delegations")
			}
		}
		if len(ow.Brokers) == 0 {
			return nil, errors.New("policy sync: ownership.brokers maps no context broker")
		}
		for name, u := range ow.Brokers {
			if err := checkHTTPS("broker "+strconv.Quote(name), u); err != nil {
				return nil, err
			}
		}
		switch {
		case ow.MaxAge == 0:
			s.o.Ownership.MaxAge = DefaultOwnershipMaxAge
		case ow.MaxAge < time.Minute:
			return nil, fmt.Errorf("policy sync: ownership max age %s must be at least 1m", ow.MaxAge)
		}
		if ow.DefaultType != "" && !reading.ValidID(ow.DefaultType) {
			return nil, fmt.Errorf("policy sync: ownership.default_type %q must match [A-Za-z0-9._-]{1,256}", clip(ow.DefaultType))
		}
	default:
		return nil, fmt.Errorf("policy sync: source must be %q or %q: %q", SourceBundle, SourceOwnership, clip(o.Source))
	}
	if o.MQTTURL != "" {
		u, err := url.Parse(o.MQTTURL)
		if err != nil || (u.Scheme != "tls" && u.Scheme != "ssl" && u.Scheme != "mqtts") || u.Host == "" || u.User != nil {
			return nil, fmt.Errorf("policy sync: MQTT URL %q must be tls://host:port (the password is an access token)", redactURL(o.MQTTURL))
		}
		if o.MQTTUsername == "" {
			return nil, errors.New("policy sync: MQTT username (the gateway's client id) is required")
		}
	}
	if s.client == nil {
		s.client = &http.Client{Timeout: defaultHTTPTimeout}
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	s.log = s.log.With("component", "policy-sync", "source", o.Source, "gateway", o.Gateway)
	s.limited = logx.NewLimiter(s.log, 30*time.Second)
	if s.now == nil {
		s.now = time.Now
	}
	s.st.Source = o.Source
	return s, nil
}

func checkHTTPS(what, raw string) error {
	u, err := url.Parse(raw)
	if err != nil || u.Scheme != "https" || u.Host == "" || u.User != nil || u.RawQuery != "" {
		return fmt.Errorf("policy sync: %s %q must be an https:// URL without credentials or query", what, redactURL(raw))
	}
	return nil
}

// loadFloor reads the persisted version floor. Until it has been read, no
// offer is considered: a floor of 0 would let an old, unexpired bundle
// roll the policy back. Called with applyMu held.
func (s *Syncer) loadFloor() error {
	s.mu.Lock()
	loaded := s.floorLoaded
	s.mu.Unlock()
	if loaded {
		return nil
	}
	var floor floorRecord
	if b, ok, err := s.o.Store.GetState(StateFloor); err != nil {
		return fmt.Errorf("load policy floor: %w", err)
	} else if ok {
		if err := json.Unmarshal(b, &floor); err != nil {
			return fmt.Errorf("load policy floor: %s", SafeJSONError(err))
		}
	}
	v := floor.Version
	if s.o.FloorFile != "" {
		fv, err := readFloorFile(s.o.FloorFile)
		if err != nil {
			return err
		}
		if fv > v {
			s.log.Warn("policy floor kept outside the store is above the store's (a quarantined or reset store): the floor stays", "floor", fv, "store_floor", v)
			v = fv
		} else if fv < v {
			// A store from before the file existed: keep the file in step.
			if err := writeFloorFile(s.o.FloorFile, v); err != nil {
				return err
			}
		}
	}
	s.mu.Lock()
	s.floor = max(s.floor, v)
	s.floorLoaded = true
	s.mu.Unlock()
	return nil
}

// LoadCached reads the version floor and the cached policy from the store
// and puts the policy in force, before any network. Call it before the
// stages that enforce the policy start; Run calls it if it was not. It is
// safe to call more than once (only the first call does anything).
func (s *Syncer) LoadCached() error {
	s.loadOnce.Do(func() { s.loadErr = s.loadCached() })
	return s.loadErr
}

func (s *Syncer) loadCached() error {
	s.applyMu.Lock()
	defer s.applyMu.Unlock()
	if err := s.loadFloor(); err != nil {
		return err
	}
	if err := s.loadPinnedKeys(); err != nil {
		return err
	}
	b, ok, err := s.o.Store.GetState(StatePolicy)
	if err != nil {
		return fmt.Errorf("load cached policy: %w", err)
	}
	if !ok {
		return nil
	}
	var c cachedPolicy
	if err := json.Unmarshal(b, &c); err != nil {
		return fmt.Errorf("load cached policy: %s", SafeJSONError(err))
	}
	p, err := policy.Compile(c.Document, c.Source, c.Digest)
	if err != nil {
		return fmt.Errorf("load cached policy: %w", err)
	}
	// The floor is written after the policy: a crash in between leaves
	// the floor behind the cached version, never ahead of it.
	s.mu.Lock()
	s.floor = max(s.floor, p.Version)
	s.mu.Unlock()
	if _, err := s.o.Engine.Apply(p, false); err != nil {
		return fmt.Errorf("apply cached policy: %w", err)
	}
	s.setCurrent(c, p)
	s.log.Info("cached policy in force", "policy", p.Describe(), "digest", c.Digest)

	if acked, ok, err := s.o.Store.GetState(StateReceipt); err == nil && (!ok || string(acked) != c.Digest) {
		s.queueReceipt(p, c.Source, c.Digest, c.AppliedAt)
	}
	return nil
}

func (s *Syncer) setCurrent(c cachedPolicy, p *policy.Policy) {
	s.mu.Lock()
	s.cur = cachedPolicy{Source: c.Source, Digest: c.Digest, AppliedAt: c.AppliedAt}
	s.st.Version, s.st.Digest, s.st.AppliedAt, s.st.ExpiresAt = p.Version, c.Digest, c.AppliedAt, p.ExpiresAt
	s.mu.Unlock()
	if m := s.o.Metrics; m != nil {
		m.PolicyVersion.Set(float64(p.Version))
		exp := 0.0
		if !p.ExpiresAt.IsZero() {
			exp = float64(p.ExpiresAt.Unix())
		}
		m.PolicyExpiry.Set(exp)
	}
}

// Offer verifies a compact JWS bundle and, if it passes, puts it in force.
// The same bundle as the one in force is a no-op. A refusal leaves the
// policy in force unchanged and is returned as a *RefusalError (also
// logged, counted and kept for status). via names the channel for status.
func (s *Syncer) Offer(ctx context.Context, raw []byte, via string) error {
	if s.o.Source != SourceBundle {
		return fmt.Errorf("policy sync: source %s takes no bundles", s.o.Source)
	}
	s.applyMu.Lock()
	defer s.applyMu.Unlock()
	if err := s.loadFloor(); err != nil {
		return err
	}
	_, err := s.offer(ctx, raw, via)
	return err
}

func (s *Syncer) offer(ctx context.Context, raw []byte, via string) (string, error) {
	if len(raw) <= s.o.MaxBundleBytes {
		s.mu.Lock()
		same := s.cur.Source == SourceBundle && s.cur.Digest == Digest(raw)
		s.mu.Unlock()
		if same {
			return resultUnchanged, nil
		}
	}
	s.mu.Lock()
	floor, cur := s.floor, s.cur
	s.mu.Unlock()
	vf, err := s.verifier.Verify(raw, floor)
	var re *RefusalError
	if errors.As(err, &re) && re.Reason == ReasonUnknownKey {
		// A kid we do not pin: the companion may have rotated. Follow its
		// signed key set (at most once per keyFetchMinGap) and try again.
		s.mu.Lock()
		due := s.lastKeyFetch.IsZero() || s.now().Sub(s.lastKeyFetch) >= keyFetchMinGap
		if due {
			s.lastKeyFetch = s.now()
		}
		s.mu.Unlock()
		if due {
			if changed, kerr := s.refreshKeys(ctx); changed {
				vf, err = s.verifier.Verify(raw, floor)
				re = nil
			} else if kerr != nil && !errors.As(kerr, new(*RefusalError)) {
				s.limited.Log(ctx, levelWarn, "keys-fetch", "companion key set not fetched", "err", kerr)
			}
		}
		s.mu.Lock()
		rePair := s.st.Keys != nil && s.st.Keys.RePair
		s.mu.Unlock()
		if errors.As(err, &re) && re.Reason == ReasonUnknownKey && rePair {
			re = refuse(ReasonUnknownKey, "%s; the companion retired every key this gateway pins: pair again (edgegate pair --force)", re.Detail)
			err = re
		}
	}
	if errors.As(err, &re) && re.Reason == ReasonRollback && floor > 0 && cur.Source == SourceBundle {
		// ES256 signatures are randomised: central serving the policy in
		// force again gives other bytes with the same version. Same
		// version and same content is no change; anything else at or
		// below the floor stays a rollback.
		if again, err2 := s.verifier.Verify(raw, floor-1); err2 == nil &&
			again.Document.Version == floor && sameDocument(again.Document, s.o.Engine.Current().Document()) {
			return resultUnchanged, nil
		}
	}
	if errors.As(err, &re) && re.Reason == ReasonRollback && floor > 0 && cur.Source == "" {
		// No policy in force but a floor: the store was quarantined or
		// reset while the floor file kept the version. The bundle AT the
		// floor is the one that was in force then, not a rollback; accept
		// it so that the gateway is not left without a policy until
		// central publishes the next version. Below the floor stays
		// refused.
		if again, err2 := s.verifier.Verify(raw, floor-1); err2 == nil && again.Document.Version == floor {
			vf, err, re = again, nil, nil
		}
	}
	if err != nil {
		if re != nil {
			return resultRefused, s.refused(ctx, via, re)
		}
		return "", err
	}
	if err := s.apply(ctx, vf.Policy, vf.Document, SourceBundle, vf.Digest); err != nil {
		return "", err
	}
	return resultApplied, nil
}

// refused logs (rate-limited), counts and records a refusal; it returns re.
func (s *Syncer) refused(ctx context.Context, via string, re *RefusalError) error {
	if m := s.o.Metrics; m != nil {
		m.PolicyRefused.WithLabelValues(re.Reason).Inc()
	}
	s.mu.Lock()
	s.st.LastRefusal = &Refusal{Reason: re.Reason, At: s.now(), Via: via, Detail: re.Detail}
	s.mu.Unlock()
	s.limited.Log(ctx, levelWarn, "refused-"+re.Reason, "policy refused; the policy in force stays",
		"reason", re.Reason, "via", via, "detail", re.Detail)
	if s.o.OnRefusal != nil {
		s.o.OnRefusal(re.Reason, via, re.Detail)
	}
	return re
}

// apply persists (policy, then floor), puts the policy in force, updates
// metrics and status, and queues the receipt. Called with applyMu held.
func (s *Syncer) apply(ctx context.Context, p *policy.Policy, doc policy.Document, source, digest string) error {
	if cur := s.o.Engine.Current(); cur != nil && cur.Version > 0 && p.Version <= cur.Version {
		return s.refused(ctx, "apply", refuse(ReasonRollback, "version %d, in force %d", p.Version, cur.Version))
	}
	c := cachedPolicy{Source: source, Digest: digest, AppliedAt: s.now().UTC().Truncate(time.Second), Document: doc}
	b, err := json.Marshal(c)
	if err != nil {
		return fmt.Errorf("persist policy: %w", err)
	}
	if err := s.o.Store.PutState(StatePolicy, b); err != nil {
		return fmt.Errorf("persist policy version %d: %w", p.Version, err)
	}
	s.mu.Lock()
	floor := max(s.floor, p.Version)
	s.mu.Unlock()
	fb, _ := json.Marshal(floorRecord{Version: floor})
	if err := s.o.Store.PutState(StateFloor, fb); err != nil {
		return fmt.Errorf("persist policy floor %d: %w", floor, err)
	}
	// Then outside the store; a crash before this leaves the file behind,
	// and loadFloor takes the higher of the two.
	if s.o.FloorFile != "" {
		if err := writeFloorFile(s.o.FloorFile, floor); err != nil {
			return fmt.Errorf("persist policy floor %d: %w", floor, err)
		}
	}
	s.mu.Lock()
	s.floor = floor
	s.mu.Unlock()
	ch, err := s.o.Engine.Apply(p, false)
	if err != nil {
		if errors.Is(err, policy.ErrRollback) {
			return s.refused(ctx, "apply", refuse(ReasonRollback, "%v", err))
		}
		return fmt.Errorf("apply policy version %d: %w", p.Version, err)
	}
	if m := s.o.Metrics; m != nil {
		m.PolicyApplied.WithLabelValues(source).Inc()
	}
	s.setCurrent(c, p)
	s.log.Info("policy applied", "policy", p.Describe(), "digest", digest,
		"revoked", len(ch.Revoked), "rebound", len(ch.Rebound))
	s.queueReceipt(p, source, digest, c.AppliedAt)
	return nil
}

// queueReceipt signs a receipt for the policy now in force and hands it to
// the receipt loop; it replaces any receipt not yet delivered (central
// only needs to know the latest).
func (s *Syncer) queueReceipt(p *policy.Policy, source, digest string, appliedAt time.Time) {
	if s.o.Signer == nil || s.o.CentralURL == "" {
		return
	}
	payload, _ := json.Marshal(Receipt{
		Gateway: s.o.Gateway, PolicyVersion: p.Version, BundleDigest: digest, Source: source,
		AppliedAt: appliedAt.UTC().Format(time.RFC3339),
	})
	compact, err := s.o.Signer.Sign(payload, map[string]any{"typ": ReceiptType})
	if err != nil {
		s.log.Error("sign policy receipt", "err", err)
		return
	}
	s.mu.Lock()
	s.pending = &pendingReceipt{digest: digest, body: []byte(compact)}
	s.st.ReceiptPending = true
	s.mu.Unlock()
	select {
	case s.receiptWake <- struct{}{}:
	default:
	}
}

// Nudge asks Run to poll now (the push channel's {"type":"sync"}).
func (s *Syncer) Nudge() {
	select {
	case s.nudge <- struct{}{}:
	default:
	}
}

// Status is a snapshot of the syncer's state.
func (s *Syncer) Status() SyncStatus {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.st
	st.Floor = s.floor
	if st.LastRefusal != nil {
		r := *st.LastRefusal
		st.LastRefusal = &r
	}
	st.Unusable = append([]UnusableDevice(nil), st.Unusable...)
	if st.Keys != nil {
		k := *st.Keys
		k.Pinned = slices.Clone(k.Pinned)
		st.Keys = &k
	}
	if st.Skipped != nil {
		m := make(map[string]int, len(st.Skipped))
		for k, v := range st.Skipped {
			m[k] = v
		}
		st.Skipped = m
	}
	return st
}

// Run polls, listens to the push channel and delivers receipts until ctx
// ends. Cancellation is not an error.
func (s *Syncer) Run(ctx context.Context) error {
	if err := s.LoadCached(); err != nil {
		s.log.Error("cached policy not loaded; the policy in force stays", "err", err)
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	wg.Go(func() { s.receiptLoop(ctx) })
	if s.o.MQTTURL != "" {
		wg.Go(func() { s.pushLoop(ctx) })
	}
	timer := time.NewTimer(0)
	defer timer.Stop()
	retry := backoff.New(5*time.Second, s.o.PollInterval)
	for {
		select {
		case <-ctx.Done():
			return nil
		case raw := <-s.pushed:
			err := s.Offer(ctx, raw, "push")
			var re *RefusalError
			if err != nil && !errors.As(err, &re) {
				s.limited.Log(ctx, slog.LevelError, "push-apply", "pushed policy not applied", "err", err)
			}
			continue
		case <-timer.C:
		case <-s.nudge:
		}
		next := jitter(s.o.PollInterval)
		if err := s.poll(ctx); err != nil && ctx.Err() == nil {
			s.limited.Log(ctx, levelWarn, "poll", "policy fetch failed; the policy in force stays", "err", err)
			next = min(next, retry.Fail())
		} else {
			retry.Reset()
		}
		timer.Reset(next)
	}
}

// poll fetches from the configured source once.
func (s *Syncer) poll(ctx context.Context) error {
	s.applyMu.Lock()
	defer s.applyMu.Unlock()
	if err := s.loadFloor(); err != nil {
		s.mu.Lock()
		s.st.LastFetch, s.st.LastFetchResult = s.now(), "error: "+clip(err.Error())
		s.mu.Unlock()
		return err
	}
	var result string
	var err error
	if s.o.Source == SourceOwnership {
		result, err = s.ownershipOffer(ctx)
	} else {
		result, err = s.pollBundle(ctx)
	}
	var re *RefusalError
	switch {
	case errors.As(err, &re):
		result, err = resultRefused+": "+re.Reason, nil
	case err != nil:
		if ctx.Err() != nil {
			return nil
		}
		if m := s.o.Metrics; m != nil {
			m.PolicyRefused.WithLabelValues(ReasonFetch).Inc()
		}
		result = "error: " + clip(err.Error())
	}
	s.mu.Lock()
	s.st.LastFetch, s.st.LastFetchResult = s.now(), result
	s.mu.Unlock()
	return err
}

// gatewayURL is {central}/edgegate/v1/gateways/{gw}/{resource}.
func (s *Syncer) gatewayURL(resource string) string {
	return strings.TrimRight(s.o.CentralURL, "/") + "/edgegate/v1/gateways/" + url.PathEscape(s.o.Gateway) + "/" + resource
}

func (s *Syncer) pollBundle(ctx context.Context) (string, error) {
	// The key set first (a 304 mostly), so that a bundle by a new key
	// verifies at once; a failure here leaves the pinned keys in force.
	if _, err := s.refreshKeys(ctx); err != nil && !errors.As(err, new(*RefusalError)) && ctx.Err() == nil {
		s.limited.Log(ctx, levelWarn, "keys-fetch", "companion key set not fetched; the pinned keys stay", "err", err)
	}
	hdr := http.Header{"Accept": {mediaJOSE}}
	s.mu.Lock()
	if s.etag != "" {
		hdr.Set("If-None-Match", s.etag)
	}
	s.mu.Unlock()
	target := s.gatewayURL("policy")
	resp, body, err := s.do(ctx, http.MethodGet, target, nil, hdr)
	if err != nil {
		return "", err
	}
	switch resp.StatusCode {
	case http.StatusNotModified:
		return resultNotModified, nil
	case http.StatusOK:
	default:
		return "", fmt.Errorf("GET %s: status %d", redactURL(target), resp.StatusCode)
	}
	if mt, _, err := mime.ParseMediaType(resp.Header.Get("Content-Type")); err != nil || mt != mediaJOSE {
		return "", s.refused(ctx, "poll", refuse(ReasonMalformed, "content type %q, want %s", clip(resp.Header.Get("Content-Type")), mediaJOSE))
	}
	result, err := s.offer(ctx, body, "poll")
	if err == nil {
		// Remember the ETag only for a bundle now in force: a refused one
		// is fetched (and refused) again rather than hidden behind a 304.
		s.mu.Lock()
		s.etag = resp.Header.Get("ETag")
		s.mu.Unlock()
	}
	return result, err
}

// do sends one request with the gateway's token; on a 401 it invalidates
// the token and tries once more. The body is read up to maxBody+1 bytes.
// Errors name the URL (which never carries credentials), not the token.
func (s *Syncer) do(ctx context.Context, method, target string, body []byte, hdr http.Header) (*http.Response, []byte, error) {
	for attempt := 0; ; attempt++ {
		tok, err := s.o.Tokens.Token(ctx)
		if err != nil {
			return nil, nil, err
		}
		var rd io.Reader
		if body != nil {
			rd = bytes.NewReader(body)
		}
		req, err := http.NewRequestWithContext(ctx, method, target, rd)
		if err != nil {
			return nil, nil, fmt.Errorf("%s %s: %w", method, redactURL(target), err)
		}
		for k, v := range hdr {
			req.Header[k] = v
		}
		req.Header.Set("Authorization", "Bearer "+tok)
		resp, err := s.client.Do(req)
		if err != nil {
			return nil, nil, fmt.Errorf("%s %s: %w", method, redactURL(target), unwrapURL(err))
		}
		b, err := io.ReadAll(io.LimitReader(resp.Body, s.maxBody+1))
		resp.Body.Close()
		if err != nil {
			return nil, nil, fmt.Errorf("%s %s: read answer: %w", method, redactURL(target), err)
		}
		if resp.StatusCode == http.StatusUnauthorized && attempt == 0 {
			s.o.Tokens.Invalidate(tok)
			continue
		}
		return resp, b, nil
	}
}

// receiptLoop delivers the pending receipt, retrying with backoff while
// central is unreachable. Enforcement never waits for it.
func (s *Syncer) receiptLoop(ctx context.Context) {
	bo := backoff.New(s.receiptMin, maxBackoff)
	var retry <-chan time.Time
	var timer *time.Timer
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.receiptWake:
			bo.Reset()
		case <-retry:
		}
		retry = nil
		s.mu.Lock()
		pr := s.pending
		s.mu.Unlock()
		if pr == nil {
			continue
		}
		result, err := s.postReceipt(ctx, pr)
		if ctx.Err() != nil {
			return
		}
		s.mu.Lock()
		s.st.LastReceipt, s.st.LastReceiptResult = s.now(), result
		done := err == nil || errors.Is(err, errPermanent)
		if done && s.pending == pr {
			s.pending = nil
			s.st.ReceiptPending = false
		}
		s.mu.Unlock()
		switch {
		case err == nil:
			if perr := s.o.Store.PutState(StateReceipt, []byte(pr.digest)); perr != nil {
				s.log.Warn("record policy receipt", "err", perr)
			}
			bo.Reset()
		case done:
			s.limited.Log(ctx, levelWarn, "receipt-permanent", "policy receipt refused by central; not retried", "err", err)
		default:
			// A newer receipt wakes the loop itself; this one is retried.
			s.limited.Log(ctx, levelWarn, "receipt", "policy receipt not delivered; will retry", "err", err)
			if timer == nil {
				timer = time.NewTimer(bo.Fail())
			} else {
				timer.Reset(bo.Fail())
			}
			retry = timer.C
		}
	}
}

var errPermanent = errors.New("permanent")

func (s *Syncer) postReceipt(ctx context.Context, pr *pendingReceipt) (string, error) {
	target := s.gatewayURL("receipts")
	resp, _, err := s.do(ctx, http.MethodPost, target, pr.body, http.Header{"Content-Type": {mediaJOSE}})
	if err != nil {
		return "error: " + clip(err.Error()), err
	}
	switch c := resp.StatusCode; {
	case c >= 200 && c < 300:
		return "delivered " + pr.digest, nil
	case c == http.StatusRequestTimeout || c == http.StatusTooManyRequests || c == http.StatusUnauthorized || c >= 500:
		return "status " + strconv.Itoa(c), fmt.Errorf("POST %s: status %d", redactURL(target), c)
	default:
		return "refused: status " + strconv.Itoa(c), fmt.Errorf("POST %s: status %d: %w", redactURL(target), c, errPermanent)
	}
}

// jitter spreads a poll interval over ±20% so that a fleet does not poll
// in step.
func jitter(d time.Duration) time.Duration { return backoff.Spread(d, rand.Float64()) }

// sameDocument compares two policy documents by their JSON form.
func sameDocument(a, b policy.Document) bool {
	ja, errA := json.Marshal(a)
	jb, errB := json.Marshal(b)
	return errA == nil && errB == nil && bytes.Equal(ja, jb)
}
