package centralsync

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jwk"
	"github.com/lestrrat-go/jwx/v2/jws"

	"github.com/edgegate/edgegate/internal/testkit"
)

// checkReceipt verifies a receipt as central would: the key from the
// header, bound to the kid by its RFC 7638 thumbprint, which must be the
// gateway's pinned id.
func checkReceipt(t *testing.T, e *polEnv, body []byte) Receipt {
	t.Helper()
	msg, err := jws.Parse(body, jws.WithCompact())
	if err != nil {
		t.Fatalf("receipt is not a compact JWS: %v", err)
	}
	h := msg.Signatures()[0].ProtectedHeaders()
	if h.Algorithm() != jwa.EdDSA || h.Type() != ReceiptType || h.JWK() == nil {
		t.Fatalf("receipt header alg=%v typ=%q jwk=%v", h.Algorithm(), h.Type(), h.JWK())
	}
	tp, err := h.JWK().Thumbprint(5) // crypto.SHA256
	if err != nil || base64.RawURLEncoding.EncodeToString(tp) != h.KeyID() || h.KeyID() != e.id.Thumbprint() {
		t.Fatalf("receipt kid %q is not the gateway's thumbprint %q", h.KeyID(), e.id.Thumbprint())
	}
	payload, err := jws.Verify(body, jws.WithKey(jwa.EdDSA, e.id.PublicKey()))
	if err != nil {
		t.Fatalf("receipt signature: %v", err)
	}
	var r Receipt
	dec := json.NewDecoder(strings.NewReader(string(payload)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&r); err != nil {
		t.Fatalf("receipt payload %s: %v", payload, err)
	}
	if _, err := time.Parse(time.RFC3339, r.AppliedAt); err != nil || r.Gateway != polGateway {
		t.Fatalf("receipt %+v", r)
	}
	return r
}

func TestPollAppliesBundleAndSendsReceipt(t *testing.T) {
	e := newPolEnv(t)
	bundle := e.ops.sign(t, polDoc(3, time.Now()))
	e.central.setBundle(bundle)
	s := e.syncer(nil)
	e.run(s)
	testkit.Eventually(t, 5*time.Second, "version 3 in force", func() bool { return e.engine.Current().Version == 3 })
	p := e.engine.Current()
	if p.Source != SourceBundle || p.Digest != Digest(bundle) || !p.CanRead("bob", "th-kitchen") || p.CanRead("bob", "th-garden") {
		t.Fatalf("policy in force: %s digest %s", p.Describe(), p.Digest)
	}
	testkit.Eventually(t, 5*time.Second, "a receipt", func() bool { return len(e.central.receiptBodies()) == 1 })
	r := checkReceipt(t, e, e.central.receiptBodies()[0])
	if r.PolicyVersion != 3 || r.BundleDigest != Digest(bundle) || r.Source != SourceBundle {
		t.Fatalf("receipt = %+v, want version 3, digest %s", r, Digest(bundle))
	}
	testkit.Eventually(t, 5*time.Second, "receipt recorded", func() bool { return !s.Status().ReceiptPending })
	st := s.Status()
	if st.Version != 3 || st.Digest != Digest(bundle) || st.LastFetchResult != resultApplied || st.ExpiresAt.IsZero() ||
		!strings.HasPrefix(st.LastReceiptResult, "delivered") {
		t.Fatalf("status = %+v", st)
	}
	if got := counterValue(t, e.m.PolicyApplied.WithLabelValues(SourceBundle)); got != 1 {
		t.Fatalf("applied = %v", got)
	}
	var g = e.m.PolicyVersion
	if v := gaugeValue(t, g); v != 3 {
		t.Fatalf("version gauge = %v", v)
	}
	if v := gaugeValue(t, e.m.PolicyExpiry); v != float64(p.ExpiresAt.Unix()) {
		t.Fatalf("expiry gauge = %v, want %d", v, p.ExpiresAt.Unix())
	}
	// The cache and the floor are in the store.
	if b, ok, _ := e.store.GetState(StateFloor); !ok || string(b) != `{"version":3}` {
		t.Fatalf("floor record = %s", b)
	}
	if b, ok, _ := e.store.GetState(StateReceipt); !ok || string(b) != Digest(bundle) {
		t.Fatalf("receipt record = %s", b)
	}
}

func TestETagNotModifiedDoesNotReapply(t *testing.T) {
	e := newPolEnv(t)
	e.central.setBundle(e.ops.sign(t, polDoc(3, time.Now())))
	s := e.syncer(nil)
	ctx := context.Background()
	for i := range 3 {
		if err := e.note(s.poll(ctx)); err != nil {
			t.Fatalf("poll %d: %v", i, err)
		}
	}
	if got := e.central.notMod.Load(); got != 2 {
		t.Fatalf("304 answers = %d, want 2", got)
	}
	if got := e.applied(SourceBundle); got != 1 {
		t.Fatalf("applied = %v, want 1", got)
	}
	if st := s.Status(); st.LastFetchResult != resultNotModified {
		t.Fatalf("last fetch = %q", st.LastFetchResult)
	}
	// A new bundle behind the same URL: a new ETag, applied.
	e.central.setBundle(e.ops.sign(t, polDoc(4, time.Now())))
	if err := s.poll(ctx); err != nil {
		t.Fatal(err)
	}
	if e.engine.Current().Version != 4 || e.applied(SourceBundle) != 2 {
		t.Fatalf("after new bundle: version %d, applied %v", e.engine.Current().Version, e.applied(SourceBundle))
	}
}

func TestKeyRotation(t *testing.T) {
	e := newPolEnv(t)
	now := time.Now()
	_, newKey, _ := ed25519.GenerateKey(rand.Reader)
	// Rotated JWKS: the new key added, the old ones still present.
	rotated := polSet(t, map[string]any{"ops-2027": newKey.Public(), e.ops.ecKid: &e.ops.ecKey.PublicKey})
	s := e.syncer(func(o *Options) { o.Keys = rotated })
	ctx := context.Background()
	b, _ := json.Marshal(polDoc(10, now))
	if err := s.Offer(ctx, signRaw(t, jwa.EdDSA, newKey, "ops-2027", b), "offer"); err != nil {
		t.Fatalf("bundle under the new kid: %v", err)
	}
	if err := s.Offer(ctx, e.ops.sign(t, polDoc(11, now)), "offer"); err != nil {
		t.Fatalf("bundle under the old kid, still pinned: %v", err)
	}
	// The old EdDSA key was dropped from the rotated set.
	b, _ = json.Marshal(polDoc(12, now))
	err := e.note(s.Offer(ctx, signRaw(t, jwa.EdDSA, e.ops.edKey, e.ops.edKid, b), "offer"))
	var re *RefusalError
	if !errors.As(err, &re) || re.Reason != ReasonUnknownKey {
		t.Fatalf("bundle under a retired kid = %v, want unknown_key", err)
	}
	if e.engine.Current().Version != 11 {
		t.Fatalf("version in force = %d, want 11", e.engine.Current().Version)
	}
}

func TestFloorPersistsAcrossRestart(t *testing.T) {
	e := newPolEnv(t)
	now := time.Now()
	s := e.syncer(nil)
	if err := s.LoadCached(); err != nil {
		t.Fatal(err)
	}
	if err := s.Offer(context.Background(), e.ops.sign(t, polDoc(5, now)), "offer"); err != nil {
		t.Fatal(err)
	}
	old := e.ops.sign(t, polDoc(4, now))

	e.restart()
	s2 := e.syncer(nil)
	if err := s2.LoadCached(); err != nil {
		t.Fatal(err)
	}
	err := e.note(s2.Offer(context.Background(), old, "offer"))
	var re *RefusalError
	if !errors.As(err, &re) || re.Reason != ReasonRollback {
		t.Fatalf("old version after restart = %v, want rollback", err)
	}
	// Even with the cached policy gone, the floor record alone holds.
	e.restart()
	if err := e.store.DeleteState(StatePolicy); err != nil {
		t.Fatal(err)
	}
	s3 := e.syncer(nil)
	if err := s3.LoadCached(); err != nil {
		t.Fatal(err)
	}
	if err := e.note(s3.Offer(context.Background(), old, "offer")); !errors.As(err, &re) || re.Reason != ReasonRollback {
		t.Fatalf("old version with only the floor = %v, want rollback", err)
	}
	if e.engine.Current().Version != 0 {
		t.Fatalf("version in force = %d, want the config's 0", e.engine.Current().Version)
	}
}

func TestCachedPolicyInForceBeforeNetwork(t *testing.T) {
	e := newPolEnv(t)
	s := e.syncer(nil)
	if err := s.LoadCached(); err != nil {
		t.Fatal(err)
	}
	if err := s.Offer(context.Background(), e.ops.sign(t, polDoc(6, time.Now())), "offer"); err != nil {
		t.Fatal(err)
	}
	// Central goes away; the gateway reboots.
	e.srv.Close()
	e.restart()
	s2 := e.syncer(nil)
	if err := s2.LoadCached(); err != nil {
		t.Fatalf("LoadCached: %v", err)
	}
	p := e.engine.Current()
	if p.Version != 6 || p.Source != SourceBundle || !p.CanRead("bob", "th-kitchen") {
		t.Fatalf("in force after LoadCached: %s", p.Describe())
	}
	if gaugeValue(t, e.m.PolicyVersion) != 6 {
		t.Fatal("version gauge not set from the cache")
	}
	e.run(s2)
	testkit.Eventually(t, 5*time.Second, "a failed fetch", func() bool { return strings.HasPrefix(s2.Status().LastFetchResult, "error") })
	if e.engine.Current() != p {
		t.Fatal("a failed fetch changed the policy in force")
	}
	if got := e.refused(ReasonFetch); got < 1 {
		t.Fatalf("refused{fetch} = %v", got)
	}
}

func TestReceiptRetriedUntilCentralComesBack(t *testing.T) {
	e := newPolEnv(t)
	e.central.setReceiptsOK(false)
	bundle := e.ops.sign(t, polDoc(8, time.Now()))
	e.central.setBundle(bundle)
	s := e.syncer(nil)
	e.run(s)
	// Enforcement does not wait for the receipt.
	testkit.Eventually(t, 5*time.Second, "version 8 in force", func() bool { return e.engine.Current().Version == 8 })
	testkit.Eventually(t, 5*time.Second, "two refused receipt posts", func() bool { return e.central.posts.Load() >= 2 })
	if st := s.Status(); !st.ReceiptPending || !strings.Contains(st.LastReceiptResult, "503") {
		t.Fatalf("status while central is down: %+v", st)
	}
	e.central.setReceiptsOK(true)
	testkit.Eventually(t, 10*time.Second, "the receipt delivered", func() bool { return len(e.central.receiptBodies()) == 1 })
	r := checkReceipt(t, e, e.central.receiptBodies()[0])
	if r.PolicyVersion != 8 || r.BundleDigest != Digest(bundle) {
		t.Fatalf("receipt = %+v", r)
	}
}

func TestReceiptResentAfterRestartIfNeverDelivered(t *testing.T) {
	e := newPolEnv(t)
	e.central.setReceiptsOK(false)
	s := e.syncer(func(o *Options) { o.CentralURL = "https://127.0.0.1:1" })
	if err := s.LoadCached(); err != nil {
		t.Fatal(err)
	}
	bundle := e.ops.sign(t, polDoc(2, time.Now()))
	if err := s.Offer(context.Background(), bundle, "offer"); err != nil {
		t.Fatal(err)
	}
	e.restart()
	e.central.setReceiptsOK(true)
	s2 := e.syncer(nil)
	e.run(s2)
	testkit.Eventually(t, 5*time.Second, "the receipt delivered after restart", func() bool { return len(e.central.receiptBodies()) >= 1 })
	if r := checkReceipt(t, e, e.central.receiptBodies()[0]); r.BundleDigest != Digest(bundle) {
		t.Fatalf("receipt = %+v", r)
	}
}

func TestUnauthorizedInvalidatesToken(t *testing.T) {
	e := newPolEnv(t)
	e.central.setBundle(e.ops.sign(t, polDoc(3, time.Now())))
	e.tokens.tok = "at-stale" // central refuses it
	s := e.syncer(nil)
	if err := s.poll(context.Background()); err != nil {
		t.Fatal(err)
	}
	if e.engine.Current().Version != 3 || len(e.tokens.invalidated) != 1 || e.tokens.invalidated[0] != "at-stale" {
		t.Fatalf("version %d, invalidated %v", e.engine.Current().Version, e.tokens.invalidated)
	}
}

func TestWrongContentTypeRefused(t *testing.T) {
	e := newPolEnv(t)
	srv := e.tlsServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/html")
		w.Write([]byte("<html>captive portal</html>"))
	}))
	s := e.syncer(func(o *Options) { o.CentralURL = srv.URL })
	if err := s.poll(context.Background()); err != nil {
		t.Fatal(err)
	}
	if lr := s.Status().LastRefusal; lr == nil || lr.Reason != ReasonMalformed {
		t.Fatalf("LastRefusal = %+v", lr)
	}
}

func TestNewRefusesBadOptions(t *testing.T) {
	e := newPolEnv(t)
	for _, tt := range []struct {
		name string
		mut  func(*Options)
	}{
		{"no gateway", func(o *Options) { o.Gateway = "" }},
		{"gateway with a slash", func(o *Options) { o.Gateway = "gw/1" }},
		{"unknown source", func(o *Options) { o.Source = "ldap" }},
		{"no keys", func(o *Options) { o.Keys = jwk.NewSet() }},
		{"plain http central", func(o *Options) { o.CentralURL = "http://central" }},
		{"no central", func(o *Options) { o.CentralURL = "" }},
		{"plain MQTT", func(o *Options) { o.MQTTURL = "tcp://central:1883"; o.MQTTUsername = "x" }},
		{"MQTT without username", func(o *Options) { o.MQTTURL = "tls://central:8883" }},
		{"no engine", func(o *Options) { o.Engine = nil }},
		{"ownership without brokers", func(o *Options) {
			o.Source = SourceOwnership
			o.Ownership = OwnershipOptions{OwnershipURL: "https://own"}
		}},
		{"ownership with an http broker", func(o *Options) {
			o.Source = SourceOwnership
			o.Ownership = OwnershipOptions{OwnershipURL: "https://own", Brokers: map[string]string{"orion-1": "http://b"}}
		}},
		{"delegations without username", func(o *Options) {
			o.Source = SourceOwnership
			o.Ownership = OwnershipOptions{OwnershipURL: "https://own", DataManagerURL: "https://dm/datamanager/api",
				Brokers: map[string]string{"orion-1": "https://b"}}
		}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			o := e.options()
			tt.mut(&o)
			if _, err := New(o); err == nil {
				t.Fatalf("New(%s) = nil error", tt.name)
			}
		})
	}
}

func TestJitterWithinTwentyPercent(t *testing.T) {
	for range 1000 {
		if d := jitter(time.Minute); d < 48*time.Second || d > 72*time.Second {
			t.Fatalf("jitter(1m) = %s", d)
		}
	}
}

// Canaries: keys and tokens go through every path that logs, errs or
// reports (refusals, skipped rows, failed fetches, 401s); none comes out.
func TestNoSecretsInLogsErrorsOrStatus(t *testing.T) {
	e := newPolEnv(t)
	now := time.Now()
	ctx := context.Background()

	// Bundle source: refusals of documents full of keys.
	s := e.syncer(nil)
	sameKeys := polDoc(7, now)
	sameKeys.Devices[0].K2 = sameKeys.Devices[0].K1
	for _, raw := range [][]byte{
		e.ops.sign(t, sameKeys),
		signRaw(t, jwa.ES256, e.ops.ecKey, e.ops.ecKid, []byte(`{"v":1,"version":"`+polK1+`"}`)),
		signRaw(t, jwa.ES256, e.ops.ecKey, e.ops.ecKid, []byte(`{"v":1,"devices":[{"id":"`+polK2)),
	} {
		e.note(s.Offer(ctx, raw, "offer"))
	}
	// A stale token, then central gone.
	e.tokens.set("at-CANARY-stale")
	e.central.setBundle(e.ops.sign(t, polDoc(8, now)))
	e.note(s.poll(ctx))
	e.srv.Close()
	e.note(s.poll(ctx))

	// Ownership source: rows with broken details and refused keys.
	api := &ownershipAPI{rows: ownershipRowsJSON, dels: delegatorJSON}
	srv := e.tlsServer(api)
	e.tokens.set(polToken)
	so := e.ownershipSyncer(srv.URL)
	e.note(so.poll(ctx))
	api.set(`[{"username":"alice","elementId":"x","elementDetails":"` + polK1 + `"}, 42]`)
	e.note(so.poll(ctx))

	for _, st := range []SyncStatus{s.Status(), so.Status()} {
		b, _ := json.Marshal(st)
		for _, c := range append(polCanaries, "at-CANARY-stale") {
			if strings.Contains(string(b), c) {
				t.Fatalf("status %s shows %q", b, c)
			}
		}
	}
	logs := e.logs.String()
	for _, want := range []string{"policy refused", "ownership row skipped", polGateway} {
		if !strings.Contains(logs, want) {
			t.Errorf("logs lack %q: the canary check would be vacuous", want)
		}
	}
	if errs := strings.Join(errTexts(e.errs), "\n"); !strings.Contains(errs, "malformed") || !strings.Contains(errs, "connect") {
		t.Errorf("errors %q lack the refusal and the failed fetch", errs)
	}
	if strings.Contains(logs, "at-CANARY-stale") {
		t.Fatal("stale token in the logs")
	}
	// e's cleanup checks the logs and every noted error for the canaries.
}

func errTexts(errs []error) []string {
	var out []string
	for _, err := range errs {
		if err != nil {
			out = append(out, err.Error())
		}
	}
	return out
}

// flakyFloorStore fails reading the floor until healed.
type flakyFloorStore struct {
	StateStore
	mu     sync.Mutex
	broken bool
}

func (f *flakyFloorStore) GetState(name string) ([]byte, bool, error) {
	f.mu.Lock()
	broken := f.broken
	f.mu.Unlock()
	if broken && name == StateFloor {
		return nil, false, errors.New("disk on fire")
	}
	return f.StateStore.GetState(name)
}

// Without the floor, no offer is considered: an old, unexpired bundle
// must not get in while the store cannot say what the floor is.
func TestUnreadableFloorBlocksOffers(t *testing.T) {
	e := newPolEnv(t)
	now := time.Now()
	s := e.syncer(nil)
	if err := s.Offer(context.Background(), e.ops.sign(t, polDoc(5, now)), "offer"); err != nil {
		t.Fatal(err)
	}
	e.restart()
	fs := &flakyFloorStore{StateStore: e.store, broken: true}
	s2 := e.syncer(func(o *Options) { o.Store = fs })
	if err := s2.LoadCached(); err == nil {
		t.Fatal("LoadCached with an unreadable floor = nil error")
	}
	old := e.ops.sign(t, polDoc(4, now))
	if err := e.note(s2.Offer(context.Background(), old, "offer")); err == nil || e.engine.Current().Version != 0 {
		t.Fatalf("Offer without a floor = %v, version %d", err, e.engine.Current().Version)
	}
	fs.mu.Lock()
	fs.broken = false
	fs.mu.Unlock()
	var re *RefusalError
	if err := e.note(s2.Offer(context.Background(), old, "offer")); !errors.As(err, &re) || re.Reason != ReasonRollback {
		t.Fatalf("Offer once the floor is readable = %v, want rollback", err)
	}
}

// TestSameVersionResignedIsNoChange: central serving the policy in force
// again, signed anew (ES256 signatures are randomised), is no change and
// no refusal; the same version with other content is a rollback.
func TestSameVersionResignedIsNoChange(t *testing.T) {
	e := newPolEnv(t)
	now := time.Now()
	s := e.syncer(nil)
	if err := s.LoadCached(); err != nil {
		t.Fatal(err)
	}
	doc := polDoc(7, now)
	first := e.ops.sign(t, doc)
	if err := s.Offer(context.Background(), first, "offer"); err != nil {
		t.Fatal(err)
	}
	again := e.ops.sign(t, doc)
	if bytes.Equal(first, again) {
		t.Fatal("the test needs two different signatures of one document")
	}
	if err := s.Offer(context.Background(), again, "poll"); err != nil {
		t.Fatalf("the policy in force, signed anew = %v, want no change", err)
	}
	if r := s.Status().LastRefusal; r != nil {
		t.Fatalf("refusal recorded: %+v", r)
	}
	changed := doc
	changed.Delegations = nil
	var re *RefusalError
	if err := s.Offer(context.Background(), e.ops.sign(t, changed), "poll"); !errors.As(err, &re) || re.Reason != ReasonRollback {
		t.Fatalf("same version, other content = %v, want rollback", err)
	}
}
