package centralsim

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jwk"
	"github.com/lestrrat-go/jwx/v2/jws"
	mochi "github.com/mochi-mqtt/server/v2"

	"github.com/edgegate/edgegate/policy"
)

const (
	gwAlpha, gwBeta = "gw-alpha", "gw-beta"
	bobSecret       = "bob-client-secret-xxxx"
)

var radioKitchen = &policy.RadioBinding{Port: "/dev/ttyUSB0", Node: 12, Child: -1}

// syncOptions adds a second gateway account (bob's), devices with ids a
// gateway accepts, and the static gateway bindings.
func syncOptions(o *Options) {
	o.Clients = append(o.Clients, Client{ID: "gw-bob", Secret: bobSecret, Username: "bob"})
	o.Devices = append(o.Devices,
		Device{ID: "th-kitchen", Type: "Thermometer", Owner: "alice", K1: "kk1-kitchen", K2: "kk2-kitchen", Radio: radioKitchen},
		Device{ID: "th-garden", Type: "Thermometer", Owner: "alice", K1: "kk1-garden", K2: "kk2-garden"},
		Device{ID: "meter-bob", Type: "Meter", Owner: "bob", K1: "kk1-bob", K2: "kk2-bob"},
	)
	o.Delegations = append(o.Delegations,
		Delegation{Device: "th-kitchen", User: "carol", Kind: KindReadAccess},
		Delegation{Device: "meter-bob", User: "alice", Kind: KindReadAccess},
	)
	o.Gateways = map[string]string{"gw-1": gwAlpha, "gw-bob": gwBeta}
	o.Companion = true // bundles, receipts and push are the companion's
}

func (f *fixture) clientToken(t *testing.T, user, client string) string {
	t.Helper()
	tok, err := f.sim.IssueAccessToken(user, time.Minute, client)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func decodeJSON[T any](t *testing.T, r response) T {
	t.Helper()
	var v T
	if err := json.Unmarshal(r.body, &v); err != nil {
		t.Fatalf("decode %s: %v", r.body, err)
	}
	return v
}

// verifyBundle checks a compact JWS against the JWKS served over HTTPS,
// with the key its kid selects and that key's algorithm pinned.
func verifyBundle(t *testing.T, f *fixture, compact string) (policy.Document, string) {
	t.Helper()
	r := f.mustDo(t, "GET", f.sim.PolicyKeysURL(), "", nil)
	if r.status != 200 {
		t.Fatalf("policy keys: %d", r.status)
	}
	set, err := jwk.Parse(r.body)
	if err != nil {
		t.Fatal(err)
	}
	msg, err := jws.Parse([]byte(compact))
	if err != nil {
		t.Fatal(err)
	}
	h := msg.Signatures()[0].ProtectedHeaders()
	if h.Type() != PolicyJWSType {
		t.Errorf("typ = %q", h.Type())
	}
	key, ok := set.LookupKeyID(h.KeyID())
	if !ok {
		t.Fatalf("kid %q not in the JWKS", h.KeyID())
	}
	if _, isPrivate := key.(jwk.ECDSAPrivateKey); isPrivate {
		t.Fatal("JWKS serves a private key")
	}
	payload, err := jws.Verify([]byte(compact), jws.WithKey(key.Algorithm(), key))
	if err != nil {
		t.Fatalf("bundle does not verify: %v", err)
	}
	var doc policy.Document
	if err := json.Unmarshal(payload, &doc); err != nil {
		t.Fatal(err)
	}
	return doc, h.KeyID()
}

func TestPolicyBundle(t *testing.T) {
	f := newFixture(t, syncOptions)
	tok := f.clientToken(t, "alice", "gw-1")
	get := func(etag string) response {
		t.Helper()
		req, _ := http.NewRequest("GET", f.sim.PolicyURL(gwAlpha), nil)
		req.Header.Set("Authorization", "Bearer "+tok)
		if etag != "" {
			req.Header.Set("If-None-Match", etag)
		}
		resp, err := f.http.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatal(err)
		}
		return response{status: resp.StatusCode, header: resp.Header, body: b}
	}

	r := get("")
	if r.status != 200 || r.header.Get("Content-Type") != "application/jose" {
		t.Fatalf("policy: %d %q %s", r.status, r.header.Get("Content-Type"), r.body)
	}
	doc, kid1 := verifyBundle(t, f, string(r.body))
	if doc.Format != 1 || doc.Gateway != gwAlpha || doc.Version == 0 || r.header.Get("ETag") != fmt.Sprintf(`"v%d"`, doc.Version) {
		t.Fatalf("doc = %+v, ETag %s", doc, r.header.Get("ETag"))
	}
	if d := time.Since(doc.IssuedAt); d < 0 || d > time.Minute || doc.ExpiresAt.Sub(doc.IssuedAt) != DefaultPolicyTTL {
		t.Errorf("issued_at %v expires_at %v", doc.IssuedAt, doc.ExpiresAt)
	}
	// alice's devices that a gateway can take: the urn id and the keyless
	// device are left out; bob's meter is not hers.
	if len(doc.Devices) != 2 || doc.Devices[0].ID != "th-garden" || doc.Devices[1].ID != "th-kitchen" {
		t.Fatalf("devices = %+v", doc.Devices)
	}
	k := doc.Devices[1]
	if k.Owner != "alice" || k.Broker != f.sim.BrokerURL() || k.K1 != "kk1-kitchen" || k.K2 != "kk2-kitchen" || k.Type != "Thermometer" || k.Radio == nil || *k.Radio != *radioKitchen {
		t.Errorf("th-kitchen = %+v", k)
	}
	if len(doc.Delegations) != 1 || doc.Delegations[0] != (policy.Delegation{Device: "th-kitchen", User: "carol", Kind: policy.ReadAccess}) {
		t.Errorf("delegations = %+v", doc.Delegations)
	}
	if p, err := policy.Compile(doc, "bundle", ""); err != nil || !p.CanRead("carol", "th-kitchen") {
		t.Fatalf("the gateway cannot use it: %v", err)
	}
	if doc.Devices[0].Radio != nil {
		t.Errorf("th-garden has no radio binding: %+v", doc.Devices[0].Radio)
	}

	// Unchanged: 304 for the ETag, and the same version again.
	etag1 := r.header.Get("ETag")
	if r := get(etag1); r.status != 304 || len(r.body) != 0 {
		t.Errorf("If-None-Match %s: %d", etag1, r.status)
	}
	if r := get(`"v1", W/` + etag1); r.status != 304 {
		t.Errorf("If-None-Match list: %d", r.status)
	}
	// A change elsewhere (bob's devices) does not touch alice's bundle.
	f.sim.AddDevice(Device{ID: "meter-bob-2", Type: "Meter", Owner: "bob", K1: "a1", K2: "a2"})
	if r := get(etag1); r.status != 304 {
		t.Errorf("after bob's change: %d", r.status)
	}

	// Every change of alice's devices or their delegations: a new version.
	versions := []uint64{doc.Version}
	changes := []func(){
		func() {
			f.sim.SetDelegations([]Delegation{{Device: "th-kitchen", User: "carol", Kind: KindReadWrite}})
		},
		func() {
			f.sim.AddDevice(Device{ID: "th-attic", Type: "Thermometer", Owner: "alice", K1: "x1", K2: "x2"})
		},
		func() { f.sim.RemoveDevice("th-garden") },
	}
	for i, change := range changes {
		change()
		r := get(etag1)
		if r.status != 200 {
			t.Fatalf("change %d: %d", i, r.status)
		}
		d, _ := verifyBundle(t, f, string(r.body))
		if d.Version <= versions[len(versions)-1] {
			t.Fatalf("change %d: version %d after %v", i, d.Version, versions)
		}
		versions = append(versions, d.Version)
		doc = d
	}
	if len(doc.Devices) != 2 || doc.Devices[0].ID != "th-attic" || doc.Devices[1].ID != "th-kitchen" || doc.Delegations[0].Kind != policy.ReadWrite {
		t.Errorf("final doc = %+v", doc)
	}

	// Rotation: the new key signs, the old stays in the JWKS, and a bundle
	// signed before still verifies.
	old, err := f.sim.SignDocument(doc)
	if err != nil {
		t.Fatal(err)
	}
	kid2, err := f.sim.RotatePolicyKey()
	if err != nil || kid2 == kid1 {
		t.Fatalf("rotate: %q %v", kid2, err)
	}
	r = get("")
	if d, kid := verifyBundle(t, f, string(r.body)); kid != kid2 || d.Version != doc.Version {
		t.Errorf("after rotation: kid %q (want %q), version %d (want %d)", kid, kid2, d.Version, doc.Version)
	}
	if _, kid := verifyBundle(t, f, old); kid != kid1 {
		t.Errorf("old bundle kid %q", kid)
	}
	if n := f.sim.PolicyKeys().Len(); n != 2 {
		t.Errorf("JWKS holds %d keys", n)
	}

	// Crafted documents are signed as they are.
	crafted := policy.Document{Format: 1, Gateway: gwAlpha, Version: 1, IssuedAt: time.Unix(1, 0).UTC(), ExpiresAt: time.Unix(2, 0).UTC()}
	compact, err := f.sim.SignDocument(crafted)
	if err != nil {
		t.Fatal(err)
	}
	if d, _ := verifyBundle(t, f, compact); d.Version != 1 || !d.ExpiresAt.Equal(crafted.ExpiresAt) {
		t.Errorf("crafted = %+v", d)
	}

	// Only the gateway's own account.
	tests := []struct {
		name, token, gw string
		want            int
	}{
		{"no token", "", gwAlpha, 401},
		{"expired", f.token(t, "alice", -time.Minute), gwAlpha, 401},
		{"not a client", f.token(t, "alice", time.Minute), gwAlpha, 403},
		{"another gateway's account", f.clientToken(t, "bob", "gw-bob"), gwAlpha, 403},
		{"own account, other gateway", tok, gwBeta, 403},
		{"unmapped gateway", tok, "gw-new", 403},
		{"bad gateway id", tok, "a%2Fb", 400},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if r := f.mustDo(t, "GET", f.sim.URL()+"/edgegate/v1/gateways/"+tt.gw+"/policy", tt.token, nil); r.status != tt.want {
				t.Errorf("status %d, want %d: %s", r.status, tt.want, r.body)
			}
		})
	}
}

// clock is a settable Options.Now.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

func TestBundleReissuedBeforeExpiry(t *testing.T) {
	c := &clock{t: time.Now()}
	sim, err := New(Options{
		Clients:   []Client{{ID: "gw-1", Secret: gwSecret, Username: "alice"}},
		Devices:   []Device{{ID: "th-1", Type: "T", Owner: "alice", K1: "a", K2: "b"}},
		Gateways:  map[string]string{"gw-1": gwAlpha},
		PolicyTTL: time.Hour,
		Now:       c.now,
	})
	if err != nil {
		t.Fatal(err)
	}
	d1, err := sim.Bundle(gwAlpha)
	if err != nil {
		t.Fatal(err)
	}
	c.advance(29 * time.Minute)
	if d, _ := sim.Bundle(gwAlpha); d.Version != d1.Version || !d.IssuedAt.Equal(d1.IssuedAt) {
		t.Errorf("before half its life: version %d issued %v, want %d %v", d.Version, d.IssuedAt, d1.Version, d1.IssuedAt)
	}
	c.advance(2 * time.Minute)
	d2, _ := sim.Bundle(gwAlpha)
	if d2.Version <= d1.Version || !d2.ExpiresAt.Equal(c.now().UTC().Add(time.Hour)) {
		t.Errorf("past half its life: %+v after %+v", d2, d1)
	}
	if _, err := sim.Bundle("gw-unbound"); err == nil {
		t.Error("bundle of an unbound gateway")
	}
}

func TestBundleBindingOnFirstUseAndAllDevices(t *testing.T) {
	f := newFixture(t, syncOptions, func(o *Options) { o.Gateways = nil; o.BundleAllDevices = true })
	alice, bob := f.clientToken(t, "alice", "gw-1"), f.clientToken(t, "bob", "gw-bob")
	if r := f.mustDo(t, "GET", f.sim.PolicyURL("gw-x"), alice, nil); r.status != 200 {
		t.Fatalf("first use: %d %s", r.status, r.body)
	} else if d, _ := verifyBundle(t, f, string(r.body)); len(d.Devices) != 3 {
		t.Errorf("BundleAllDevices: %+v", d.Devices)
	}
	if c, ok := f.sim.GatewayAccount("gw-x"); !ok || c != "gw-1" {
		t.Errorf("GatewayAccount = %q %v", c, ok)
	}
	if r := f.mustDo(t, "GET", f.sim.PolicyURL("gw-x"), bob, nil); r.status != 403 {
		t.Errorf("another client on a bound gateway: %d", r.status)
	}
	if r := f.mustDo(t, "GET", f.sim.PolicyURL("gw-y"), alice, nil); r.status != 403 {
		t.Errorf("a bound client on a second gateway: %d", r.status)
	}
	if r := f.mustDo(t, "GET", f.sim.PolicyURL("gw-y"), bob, nil); r.status != 200 {
		t.Errorf("second client, second gateway: %d", r.status)
	}
}

// mqttClient connects a paho client over TLS to the sim's push broker.
func mqttClient(t *testing.T, f *fixture, username, password string) (paho.Client, error) {
	t.Helper()
	opts := paho.NewClientOptions().
		AddBroker(f.sim.MQTTURL()).
		SetClientID(fmt.Sprintf("test-%s-%d", username, time.Now().UnixNano())).
		SetUsername(username).SetPassword(password).
		SetTLSConfig(&tls.Config{RootCAs: f.sim.CAPool(), MinVersion: tls.VersionTLS12}).
		SetConnectTimeout(5 * time.Second).
		SetAutoReconnect(false).
		SetConnectRetry(false)
	c := paho.NewClient(opts)
	tok := c.Connect()
	if !tok.WaitTimeout(10 * time.Second) {
		return nil, fmt.Errorf("connect timed out")
	}
	if err := tok.Error(); err != nil {
		return nil, err
	}
	t.Cleanup(func() { c.Disconnect(100) })
	return c, nil
}

func TestPushOverMQTT(t *testing.T) {
	f := newFixture(t, syncOptions, func(o *Options) { o.MQTT = true })
	if !strings.HasPrefix(f.sim.MQTTURL(), "tls://127.0.0.1:") {
		t.Fatalf("MQTTURL = %q", f.sim.MQTTURL())
	}
	c, err := mqttClient(t, f, "gw-1", f.clientToken(t, "alice", "gw-1"))
	if err != nil {
		t.Fatalf("connect with the account's token: %v", err)
	}
	got := make(chan []byte, 8)
	sub := c.Subscribe(PushTopic(gwAlpha), 1, func(_ paho.Client, m paho.Message) { got <- m.Payload() })
	if !sub.WaitTimeout(5*time.Second) || sub.Error() != nil || sub.(*paho.SubscribeToken).Result()[PushTopic(gwAlpha)] != 1 {
		t.Fatalf("subscribe: %v %v", sub.Error(), sub.(*paho.SubscribeToken).Result())
	}
	receive := func(what string) []byte {
		t.Helper()
		select {
		case p := <-got:
			return p
		case <-time.After(5 * time.Second):
			t.Fatalf("%s: nothing delivered", what)
			return nil
		}
	}

	if err := f.sim.Push(gwAlpha, false); err != nil {
		t.Fatal(err)
	}
	if p := receive("nudge"); string(p) != NudgePayload {
		t.Errorf("nudge = %s", p)
	}
	if err := f.sim.Push(gwAlpha, true); err != nil {
		t.Fatal(err)
	}
	if d, _ := verifyBundle(t, f, string(receive("bundle"))); d.Gateway != gwAlpha || len(d.Devices) != 2 {
		t.Errorf("pushed bundle = %+v", d)
	}
	// Through the admin API too.
	adm := f.sim.AdminToken()
	if r := f.mustDo(t, "POST", f.sim.URL()+"/_sim/gateways/"+gwAlpha+"/push", adm, []byte(`{"bundle":true}`)); r.status != 204 {
		t.Fatalf("admin push: %d %s", r.status, r.body)
	}
	verifyBundle(t, f, string(receive("admin bundle")))
	if r := f.mustDo(t, "POST", f.sim.URL()+"/_sim/gateways/"+gwAlpha+"/push", adm, nil); r.status != 204 {
		t.Fatalf("admin nudge: %d %s", r.status, r.body)
	}
	if p := receive("admin nudge"); string(p) != NudgePayload {
		t.Errorf("admin nudge = %s", p)
	}

	// Other gateways' topics and wildcards are refused at SUBSCRIBE.
	for _, topic := range []string{PushTopic(gwBeta), "edgegate/gateways/+/policy", "#", "edgegate/other"} {
		s := c.Subscribe(topic, 1, func(paho.Client, paho.Message) { t.Errorf("delivered on %s", topic) })
		if !s.WaitTimeout(5 * time.Second) {
			t.Fatalf("subscribe %s timed out", topic)
		}
		if code := s.(*paho.SubscribeToken).Result()[topic]; code != 0x80 && s.Error() == nil {
			t.Errorf("subscribe %s: granted %#x", topic, code)
		}
	}
	// Clients cannot publish to gateways.
	if (&pushAuthHook{s: f.sim}).OnACLCheck(&mochi.Client{}, PushTopic(gwAlpha), true) {
		t.Error("a client may publish on a policy topic")
	}

	refused := []struct{ name, user, pass string }{
		{"no credentials", "", ""},
		{"garbage token", "gw-1", "not-a-token"},
		{"another client's token", "gw-1", f.clientToken(t, "bob", "gw-bob")},
		{"expired token", "gw-1", func() string { s, _ := f.sim.IssueAccessToken("alice", -time.Minute, "gw-1"); return s }()},
		{"unknown client", "test", f.token(t, "alice", time.Minute)},
		{"admin token", "gw-1", adm},
	}
	for _, tt := range refused {
		t.Run(tt.name, func(t *testing.T) {
			_, err := mqttClient(t, f, tt.user, tt.pass)
			if err == nil {
				t.Fatal("CONNECT accepted")
			}
			t.Logf("refused: %v", err)
		})
	}
}

func TestPushWithoutBroker(t *testing.T) {
	f := newFixture(t, syncOptions)
	if f.sim.MQTTURL() != "" {
		t.Errorf("MQTTURL = %q", f.sim.MQTTURL())
	}
	if err := f.sim.Push(gwAlpha, false); err == nil {
		t.Error("Push without a broker")
	}
	if r := f.mustDo(t, "POST", f.sim.URL()+"/_sim/gateways/"+gwAlpha+"/push", f.sim.AdminToken(), nil); r.status != 409 {
		t.Errorf("admin push without broker: %d", r.status)
	}
}

type identity struct {
	priv  ed25519.PrivateKey
	pub   jwk.Key
	thumb string
}

func newIdentity(t *testing.T) identity {
	t.Helper()
	pubRaw, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	pub, err := jwk.FromRaw(pubRaw)
	if err != nil {
		t.Fatal(err)
	}
	thumb, err := Thumbprint(pub)
	if err != nil {
		t.Fatal(err)
	}
	return identity{priv, pub, thumb}
}

// receipt signs a receipt with signer, naming headerKey in jwk and kid.
func receipt(t *testing.T, signer ed25519.PrivateKey, headerKey jwk.Key, kid string, payload map[string]any) []byte {
	t.Helper()
	b, _ := json.Marshal(payload)
	hdr := jws.NewHeaders()
	_ = hdr.Set(jws.KeyIDKey, kid)
	_ = hdr.Set(jws.JWKKey, headerKey)
	out, err := jws.Sign(b, jws.WithKey(jwa.EdDSA, signer, jws.WithProtectedHeaders(hdr)))
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func TestReceipts(t *testing.T) {
	f := newFixture(t, syncOptions)
	tok := f.clientToken(t, "alice", "gw-1")
	post := func(body []byte, token string) response {
		t.Helper()
		return f.mustDo(t, "POST", f.sim.URL()+"/edgegate/v1/gateways/"+gwAlpha+"/receipts", token, body)
	}
	applied := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	payload := func(v uint64) map[string]any {
		return map[string]any{"gateway": gwAlpha, "policy_version": v, "bundle_digest": "sha256:abc", "source": "push", "applied_at": applied}
	}
	id, other := newIdentity(t), newIdentity(t)

	if r := post(receipt(t, id.priv, id.pub, id.thumb, payload(7)), tok); r.status != 202 {
		t.Fatalf("first receipt: %d %s", r.status, r.body)
	}
	if pin, _ := f.sim.GatewayKey(gwAlpha); pin != id.thumb {
		t.Errorf("pinned %q, want %q", pin, id.thumb)
	}
	if r := post(receipt(t, id.priv, id.pub, id.thumb, payload(8)), tok); r.status != 202 {
		t.Fatalf("second receipt: %d %s", r.status, r.body)
	}
	tests := []struct {
		name  string
		body  []byte
		token string
		want  int
	}{
		{"another key, validly signed", receipt(t, other.priv, other.pub, other.thumb, payload(9)), tok, 409},
		{"signed by another key than its jwk", receipt(t, other.priv, id.pub, id.thumb, payload(9)), tok, 400},
		{"kid is not the thumbprint", receipt(t, id.priv, id.pub, other.thumb, payload(9)), tok, 400},
		{"for another gateway", receipt(t, id.priv, id.pub, id.thumb, map[string]any{"gateway": gwBeta, "policy_version": 9}), tok, 400},
		{"not a JWS", []byte("hello"), tok, 400},
		{"no token", receipt(t, id.priv, id.pub, id.thumb, payload(9)), "", 401},
		{"another gateway's account", receipt(t, id.priv, id.pub, id.thumb, payload(9)), f.clientToken(t, "bob", "gw-bob"), 403},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if r := post(tt.body, tt.token); r.status != tt.want {
				t.Errorf("status %d, want %d: %s", r.status, tt.want, r.body)
			}
		})
	}
	recs := f.sim.Receipts()
	if len(recs) != 7 {
		t.Fatalf("receipts = %+v", recs)
	}
	r0 := recs[0]
	if !r0.Valid || r0.Gateway != gwAlpha || r0.Thumbprint != id.thumb || r0.PolicyVersion != 7 || r0.BundleDigest != "sha256:abc" || r0.Source != "push" || !r0.AppliedAt.Equal(applied) || r0.ReceivedAt.IsZero() {
		t.Errorf("receipt 0 = %+v", r0)
	}
	for i, r := range recs[2:] {
		if r.Valid || r.Detail == "" {
			t.Errorf("refused receipt %d = %+v", i+2, r)
		}
	}

	// Pairing registers the key: from then on, only that key.
	if err := f.sim.PinGatewayKey(gwAlpha, other.thumb); err != nil {
		t.Fatal(err)
	}
	if r := post(receipt(t, other.priv, other.pub, other.thumb, payload(10)), tok); r.status != 202 {
		t.Errorf("after pairing: %d", r.status)
	}
	if r := post(receipt(t, id.priv, id.pub, id.thumb, payload(11)), tok); r.status != 409 {
		t.Errorf("old key after pairing: %d", r.status)
	}
}

func TestSyncAdmin(t *testing.T) {
	f := newFixture(t, syncOptions)
	base := f.sim.URL() + "/_sim"
	endpoints := []struct{ method, path, body string }{
		{"GET", "/gateways/" + gwAlpha + "/bundle", ""},
		{"POST", "/gateways/" + gwAlpha + "/push", `{"bundle":true}`},
		{"PUT", "/gateways/" + gwAlpha + "/identity-key", `{"thumbprint":"x"}`},
		{"POST", "/policy-keys/rotate", ""},
		{"GET", "/receipts", ""},
		{"PUT", "/delegations", `[]`},
		{"DELETE", "/devices/th-garden", ""},
	}
	for _, e := range endpoints {
		for _, tok := range []string{"", "wrong", f.clientToken(t, "alice", "gw-1")} {
			if r := f.mustDo(t, e.method, base+e.path, tok, []byte(e.body)); r.status != 401 {
				t.Errorf("%s %s without the admin token: %d", e.method, e.path, r.status)
			}
		}
	}
	if n := f.sim.PolicyKeys().Len(); n != 1 {
		t.Errorf("keys rotated without the admin token: %d", n)
	}

	adm := f.sim.AdminToken()
	bundleVersion := func() uint64 {
		t.Helper()
		r := f.mustDo(t, "GET", base+"/gateways/"+gwAlpha+"/bundle", adm, nil)
		if r.status != 200 || r.header.Get("Content-Type") != ContentTypeJOSE {
			t.Fatalf("admin bundle: %d %s", r.status, r.body)
		}
		d, _ := verifyBundle(t, f, string(r.body))
		return d.Version
	}
	v1 := bundleVersion()
	if r := f.mustDo(t, "DELETE", base+"/devices/th-garden", adm, nil); r.status != 204 {
		t.Fatal(r.status)
	}
	v2 := bundleVersion()
	if r := f.mustDo(t, "POST", base+"/devices", adm, []byte(`{"id":"th-new","type":"T","owner":"alice","k1":"a","k2":"b","radio":{"port":"/dev/ttyAMA0","node":3,"child":1}}`)); r.status != 204 {
		t.Fatalf("add device: %d %s", r.status, r.body)
	}
	v3 := bundleVersion()
	if r := f.mustDo(t, "PUT", base+"/delegations", adm, []byte(`[{"device":"th-new","user":"eve","kind":"READ_ACCESS"}]`)); r.status != 204 {
		t.Fatal(r.status)
	}
	v4 := bundleVersion()
	if !(v1 < v2 && v2 < v3 && v3 < v4) {
		t.Errorf("versions %d %d %d %d are not increasing", v1, v2, v3, v4)
	}
	if v := bundleVersion(); v != v4 {
		t.Errorf("version moved without a change: %d -> %d", v4, v)
	}
	if r := f.mustDo(t, "GET", base+"/gateways/gw-unknown/bundle", adm, nil); r.status != 404 {
		t.Errorf("unknown gateway bundle: %d", r.status)
	}

	r := f.mustDo(t, "POST", base+"/policy-keys/rotate", adm, nil)
	rot := decodeJSON[map[string]string](t, r)
	if r.status != 200 || rot["kid"] != f.sim.PolicyKeyID() || f.sim.PolicyKeys().Len() != 2 {
		t.Errorf("rotate: %d %v", r.status, rot)
	}
	id := newIdentity(t)
	if r := f.mustDo(t, "PUT", base+"/gateways/"+gwAlpha+"/identity-key", adm, []byte(`{"thumbprint":"`+id.thumb+`"}`)); r.status != 204 {
		t.Errorf("pin: %d %s", r.status, r.body)
	}
	if r := f.mustDo(t, "PUT", base+"/gateways/"+gwAlpha+"/identity-key", adm, []byte(`{"thumbprint":"short"}`)); r.status != 400 {
		t.Errorf("bad pin: %d", r.status)
	}
	tok := f.clientToken(t, "alice", "gw-1")
	f.mustDo(t, "POST", f.sim.URL()+"/edgegate/v1/gateways/"+gwAlpha+"/receipts", tok,
		receipt(t, id.priv, id.pub, id.thumb, map[string]any{"gateway": gwAlpha, "policy_version": v4, "source": "poll"}))
	recs := decodeJSON[[]Receipt](t, f.mustDo(t, "GET", base+"/receipts", adm, nil))
	if len(recs) != 1 || !recs[0].Valid || recs[0].PolicyVersion != v4 {
		t.Errorf("admin receipts = %+v", recs)
	}
}

func TestSyncOptionsRejected(t *testing.T) {
	tests := []struct {
		name string
		opts Options
	}{
		{"gateway of an unknown client", Options{Gateways: map[string]string{"ghost": "gw"}}},
		{"bad gateway id", Options{Clients: []Client{{ID: "c", Secret: "s", Username: "u"}}, Gateways: map[string]string{"c": "a/b"}}},
		{"two accounts for a gateway", Options{Clients: []Client{{ID: "c", Secret: "s", Username: "u"}, {ID: "d", Secret: "s", Username: "u"}}, Gateways: map[string]string{"c": "gw", "d": "gw"}}},
		{"bad alg", Options{PolicyKeyAlg: "HS256"}},
		{"negative ttl", Options{PolicyTTL: -time.Second}},
		{"bad radio", Options{Devices: []Device{{ID: "d", Type: "T", Owner: "o", Radio: &policy.RadioBinding{Node: 1}}}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := New(tt.opts); err == nil {
				t.Error("New accepted it")
			}
		})
	}
	for _, alg := range []string{"EdDSA", "RS256"} {
		sim, err := New(Options{PolicyKeyAlg: alg, BundleAllDevices: true, Devices: []Device{{ID: "d", Type: "T", Owner: "o", K1: "a", K2: "b"}}})
		if err != nil {
			t.Fatal(err)
		}
		compact, err := sim.PublishBundle("gw")
		if err != nil {
			t.Fatal(err)
		}
		key, _ := sim.PolicyKeys().Key(0)
		if _, err := jws.Verify([]byte(compact), jws.WithKey(key.Algorithm(), key)); err != nil || key.Algorithm().String() != alg {
			t.Errorf("%s: %v (alg %v)", alg, err, key.Algorithm())
		}
	}
}
