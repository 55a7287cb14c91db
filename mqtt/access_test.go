package mqtt

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jwk"
	"github.com/lestrrat-go/jwx/v2/jwt"

	"github.com/edgegate/edgegate/internal/accesstoken"
	"github.com/edgegate/edgegate/internal/envelope"
	"github.com/edgegate/edgegate/internal/metrics"
	"github.com/edgegate/edgegate/internal/pipeline"
	"github.com/edgegate/edgegate/internal/queue"
	"github.com/edgegate/edgegate/internal/testkit"
	"github.com/edgegate/edgegate/policy"
)

// sso is a minimal OIDC provider on loopback: discovery and a JWKS.
type sso struct {
	srv *httptest.Server
	key jwk.Key
}

func newSSO(t testing.TB) *sso {
	t.Helper()
	raw, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	k, _ := jwk.FromRaw(raw)
	k.Set(jwk.KeyIDKey, "sso-1")
	k.Set(jwk.AlgorithmKey, jwa.RS256)
	s := &sso{key: k}
	mux := http.NewServeMux()
	mux.HandleFunc("/.well-known/openid-configuration", func(w http.ResponseWriter, r *http.Request) {
		json.NewEncoder(w).Encode(map[string]string{"issuer": s.srv.URL, "jwks_uri": s.srv.URL + "/certs"})
	})
	mux.HandleFunc("/certs", func(w http.ResponseWriter, r *http.Request) {
		pub, _ := s.key.PublicKey()
		set := jwk.NewSet()
		set.AddKey(pub)
		json.NewEncoder(w).Encode(set)
	})
	s.srv = httptest.NewTLSServer(mux)
	t.Cleanup(s.srv.Close)
	return s
}

func (s *sso) token(t testing.TB, user string, mut func(jwt.Token), key ...jwk.Key) string {
	t.Helper()
	tok := jwt.New()
	tok.Set(jwt.IssuerKey, s.srv.URL)
	tok.Set(jwt.AudienceKey, []string{"edgegate"})
	tok.Set(jwt.SubjectKey, "sub-"+user)
	tok.Set("preferred_username", user)
	tok.Set(jwt.ExpirationKey, time.Now().Add(10*time.Minute))
	if mut != nil {
		mut(tok)
	}
	k := s.key
	alg := jwa.RS256
	if len(key) > 0 {
		k = key[0]
		alg = jwa.ES256
	}
	b, err := jwt.Sign(tok, jwt.WithKey(alg, k))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

type accessEnv struct {
	t      testing.TB
	engine *policy.Engine
	broker *Broker
	url    string
	sso    *sso
	m      *metrics.Metrics
	devs   map[string]policy.Registration
}

func reg(id, owner string) policy.Registration {
	return policy.Registration{ID: id, Type: "T", Owner: owner, Broker: "https://b.example/f",
		K1: "k1-canary-" + id, K2: "k2-canary-" + id}
}

// newAccessEnv runs the embedded broker with the real pipeline and queue;
// alice owns a1 and a2, bob owns b1; carol reads a1 (READ_ACCESS), dave has
// WRITE_ONLY on a1.
func newAccessEnv(t testing.TB, tune ...func(*BrokerOptions)) *accessEnv {
	t.Helper()
	return newAccessEnvWith(t, nil, tune...)
}

// newAccessEnvWith is newAccessEnv with the pipeline wrapped by wrap.
func newAccessEnvWith(t testing.TB, wrap func(*pipeline.Pipeline) Submitter, tune ...func(*BrokerOptions)) *accessEnv {
	t.Helper()
	devs := []policy.Registration{reg("a1", "alice"), reg("a2", "alice"), reg("b1", "bob")}
	p, err := policy.Compile(policy.Document{Format: 1, Version: 1, IssuedAt: time.Now(), Devices: devs,
		Delegations: []policy.Delegation{{Device: "a1", User: "carol", Kind: policy.ReadAccess}, {Device: "a1", User: "dave", Kind: policy.WriteOnly}}},
		"test", "")
	if err != nil {
		t.Fatal(err)
	}
	engine := policy.NewEngine(p)
	q, err := queue.Open(queue.Options{Dir: t.TempDir(), Key: bytes.Repeat([]byte{1}, 32)})
	if err != nil {
		t.Fatal(err)
	}
	qctx, qcancel := context.WithCancel(context.Background())
	qdone := make(chan struct{})
	go func() { q.Run(qctx); close(qdone) }()
	m := metrics.New()
	pipe := pipeline.New(engine, q, pipeline.Options{Gateway: "gw"})
	s := newSSO(t)
	v, err := accesstoken.New(accesstoken.Options{Issuer: s.srv.URL, Audience: "edgegate", HTTPClient: s.srv.Client()})
	if err != nil {
		t.Fatal(err)
	}
	topic, _ := ParseTopic("devices/{device}/telemetry")
	var logs syncBuf
	bo := BrokerOptions{Listen: "127.0.0.1:0", Topic: topic, Policy: engine, Tokens: v, Metrics: m,
		Logger: slog.New(slog.NewTextHandler(&logs, nil))}
	for _, f := range tune {
		f(&bo)
	}
	var sub Submitter = pipe
	if wrap != nil {
		sub = wrap(pipe)
	}
	b, err := NewBroker(sub, bo)
	if err != nil {
		t.Fatal(err)
	}
	ready := make(chan struct{})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { b.Run(ctx, func() { close(ready) }); close(done) }()
	<-ready
	engine.OnChange(func(ch policy.Change) { // as the daemon does
		gone := append(append([]string(nil), ch.Revoked...), ch.Rebound...)
		b.CloseDeviceSessions(gone)
		b.PurgeRetained(gone)
	})
	t.Cleanup(func() {
		cancel()
		<-done
		qcancel()
		<-qdone
		q.Close()
		if strings.Contains(logs.String(), "k1-canary") || strings.Contains(logs.String(), "k2-canary") {
			t.Error("a device key reached the log")
		}
		for _, pw := range []string{"eyJ"} { // no token (JWTs start with eyJ) in the log
			if strings.Contains(logs.String(), pw) {
				t.Error("an access token reached the log")
			}
		}
	})
	env := &accessEnv{t: t, engine: engine, broker: b, url: "tcp://" + b.Addr(), sso: s, m: m, devs: map[string]policy.Registration{}}
	for _, d := range devs {
		env.devs[d.ID] = d
	}
	return env
}

type syncBuf = testkit.Buffer

var clientSeq sync.Map

func (e *accessEnv) dial(user, password string) (paho.Client, error) {
	n, _ := clientSeq.LoadOrStore(user, new(int))
	id := fmt.Sprintf("%s-%d-%d", user, time.Now().UnixNano(), *n.(*int))
	o := paho.NewClientOptions().AddBroker(e.url).SetClientID(id).SetUsername(user).SetPassword(password).
		SetAutoReconnect(false).SetConnectTimeout(5 * time.Second).SetWriteTimeout(5 * time.Second)
	c := paho.NewClient(o)
	tok := c.Connect()
	if !tok.WaitTimeout(10 * time.Second) {
		return nil, fmt.Errorf("connect timed out")
	}
	if err := tok.Error(); err != nil {
		return nil, err
	}
	e.t.Cleanup(func() { c.Disconnect(50) })
	return c, nil
}

func (e *accessEnv) device(id string) paho.Client {
	e.t.Helper()
	d := e.devs[id]
	pw, _ := envelope.DeriveMQTTPassword(d.ID, d.K1, d.K2)
	c, err := e.dial(id, pw)
	if err != nil {
		e.t.Fatalf("device %s login: %v", id, err)
	}
	return c
}

func (e *accessEnv) app(user string) paho.Client {
	e.t.Helper()
	c, err := e.dial(user, e.sso.token(e.t, user, nil))
	if err != nil {
		e.t.Fatalf("application of %s login: %v", user, err)
	}
	return c
}

// inbox collects what a subscription delivers.
type inbox struct {
	mu  sync.Mutex
	got map[string]int
}

func (b *inbox) add(topic string) { b.mu.Lock(); b.got[topic]++; b.mu.Unlock() }
func (b *inbox) count(topic string) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.got[topic]
}

// subscribe returns the SUBACK code and an inbox.
func subscribe(t *testing.T, c paho.Client, filter string) (byte, *inbox) {
	t.Helper()
	in := &inbox{got: map[string]int{}}
	tok := c.Subscribe(filter, 1, func(_ paho.Client, m paho.Message) { in.add(m.Topic()) })
	if !tok.WaitTimeout(5 * time.Second) {
		t.Fatalf("subscribe %s timed out", filter)
	}
	return tok.(*paho.SubscribeToken).Result()[filter], in
}

func publish(t *testing.T, c paho.Client, device string) bool {
	t.Helper()
	tok := c.Publish("devices/"+device+"/telemetry", 1, false, `{"temperature": 21}`)
	return tok.WaitTimeout(3*time.Second) && tok.Error() == nil
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	testkit.Eventually(t, 5*time.Second, what, cond)
}

// settle publishes a marker reading from a device every subscriber may
// read, so that a missing delivery is asserted after the broker has had
// the chance to deliver everything published before it.
func (e *accessEnv) settle(t *testing.T, marker paho.Client, device string, boxes ...*inbox) {
	t.Helper()
	before := make([]int, len(boxes))
	for i, b := range boxes {
		before[i] = b.count("devices/" + device + "/telemetry")
	}
	if !publish(t, marker, device) {
		t.Fatal("marker not acknowledged")
	}
	eventually(t, "the marker", func() bool {
		for i, b := range boxes {
			if b.count("devices/"+device+"/telemetry") == before[i] {
				return false
			}
		}
		return true
	})
}

func TestLoginMatrix(t *testing.T) {
	e := newAccessEnv(t)
	ecRaw, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	stranger, _ := jwk.FromRaw(ecRaw)
	stranger.Set(jwk.KeyIDKey, "sso-1")
	a1pw, _ := envelope.DeriveMQTTPassword("a1", e.devs["a1"].K1, e.devs["a1"].K2)
	tests := []struct {
		name, user, password string
		ok                   bool
		reason               string // the counted refusal reason
	}{
		{"device with its credential", "a1", a1pw, true, ""},
		{"device with another device's credential", "a2", a1pw, false, denyBadPassword},
		{"device with a wrong password", "a1", "not-the-password", false, denyBadPassword},
		{"unregistered device", "rogue", a1pw, false, denyUnknownDevice},
		{"anonymous", "", "", false, denyAnonymous},
		{"application with a valid token", "carol", e.sso.token(t, "carol", nil), true, ""},
		{"expired token", "carol", e.sso.token(t, "carol", func(tk jwt.Token) { tk.Set(jwt.ExpirationKey, time.Now().Add(-time.Minute)) }), false, denyBadToken},
		{"wrong audience", "carol", e.sso.token(t, "carol", func(tk jwt.Token) { tk.Set(jwt.AudienceKey, []string{"grafana"}) }), false, denyBadToken},
		{"token signed by an unknown key", "carol", e.sso.token(t, "carol", nil, stranger), false, denyBadToken},
		{"alg none", "carol", noneToken(e.sso.srv.URL), false, denyBadToken},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := e.dial(tt.user, tt.password)
			if tt.ok && err != nil {
				t.Fatalf("login refused: %v", err)
			}
			if !tt.ok {
				if err == nil {
					c.Disconnect(0)
					t.Fatal("login accepted, want refused")
				}
				if !strings.Contains(err.Error(), "not Authorized") && !strings.Contains(err.Error(), "bad user name or password") {
					t.Fatalf("login refused with %v, want a CONNACK refusal", err)
				}
				if n := testCounter(t, e.m, "connect", tt.reason); n < 1 {
					t.Errorf("refusal not counted as connect/%s", tt.reason)
				}
			}
		})
	}
}

func noneToken(iss string) string {
	enc := base64.RawURLEncoding.EncodeToString
	return enc([]byte(`{"alg":"none","kid":"sso-1"}`)) + "." +
		enc([]byte(`{"iss":"`+iss+`","aud":"edgegate","preferred_username":"carol","exp":9999999999}`)) + "."
}

func TestTopicAccessMatrix(t *testing.T) {
	e := newAccessEnv(t)
	a1, b1 := e.device("a1"), e.device("b1")
	alice, bob, carol, dave := e.app("alice"), e.app("bob"), e.app("carol"), e.app("dave")

	// Subscriptions naming one device: granted only to readers.
	subs := []struct {
		who    string
		c      paho.Client
		filter string
		ok     bool
	}{
		{"alice → her a1", alice, "devices/a1/telemetry", true},
		{"alice → bob's b1", alice, "devices/b1/telemetry", false},
		{"carol (READ_ACCESS on a1) → a1", carol, "devices/a1/telemetry", true},
		{"carol → a2", carol, "devices/a2/telemetry", false},
		{"dave (WRITE_ONLY on a1) → a1", dave, "devices/a1/telemetry", false},
		{"alice → outside the device namespace", alice, "other/topic", false},
	}
	for _, s := range subs {
		code, _ := subscribe(t, s.c, s.filter)
		if (code != 0x80) != s.ok {
			t.Errorf("%s: SUBACK 0x%02x, want granted=%v", s.who, code, s.ok)
		}
	}

	// Wildcards are granted, and deliver only what the user may read.
	_, aliceAll := subscribe(t, alice, "devices/+/telemetry")
	_, carolAll := subscribe(t, carol, "#")
	_, daveAll := subscribe(t, dave, "devices/#")
	_, bobAll := subscribe(t, bob, "devices/+/telemetry")
	if !publish(t, b1, "b1") {
		t.Fatal("b1's own reading not acknowledged")
	}
	e.settle(t, a1, "a1", aliceAll, carolAll)
	eventually(t, "bob's own reading", func() bool { return bobAll.count("devices/b1/telemetry") == 1 })
	for _, c := range []struct {
		name string
		in   *inbox
	}{{"alice", aliceAll}, {"carol", carolAll}, {"dave", daveAll}} {
		if n := c.in.count("devices/b1/telemetry"); n != 0 {
			t.Errorf("%s's wildcard received %d readings of bob's b1", c.name, n)
		}
	}
	if n := daveAll.count("devices/a1/telemetry"); n != 0 {
		t.Errorf("WRITE_ONLY dave received %d readings of a1", n)
	}
	if n := bobAll.count("devices/a1/telemetry"); n != 0 {
		t.Errorf("bob received %d readings of alice's a1", n)
	}

	// A device may publish only as itself: a1 publishing as b1 is cut off
	// (MQTT 3.1.1 has no negative PUBACK) and nothing is delivered.
	if publish(t, a1, "b1") {
		t.Error("a1's publish to b1's topic was acknowledged")
	}
	eventually(t, "a1 disconnected", func() bool { return !a1.IsConnected() })
	// And it may not subscribe to another device's data, even by wildcard.
	a2 := e.device("a2")
	for _, f := range []string{"devices/b1/telemetry", "devices/+/telemetry", "#"} {
		if code, _ := subscribe(t, a2, f); code != 0x80 {
			t.Errorf("device a2 subscribing to %s: SUBACK 0x%02x, want 0x80", f, code)
		}
	}
	// Applications publish no device data.
	if publish(t, alice, "a2") {
		t.Error("an application's publish to a device topic was acknowledged")
	}
	if got := testCounter(t, e.m, "publish", denyNotOwnTopic); got < 1 {
		t.Errorf("denied{publish,not_own_topic} = %v", got)
	}
}

func testCounter(t *testing.T, m *metrics.Metrics, action, reason string) float64 {
	t.Helper()
	out, err := m.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range out {
		if mf.GetName() != "edgegate_mqtt_access_denied_total" {
			continue
		}
		for _, mm := range mf.GetMetric() {
			l := map[string]string{}
			for _, lp := range mm.GetLabel() {
				l[lp.GetName()] = lp.GetValue()
			}
			if l["action"] == action && l["reason"] == reason {
				return mm.GetCounter().GetValue()
			}
		}
	}
	return 0
}

func TestLiveRevocation(t *testing.T) {
	e := newAccessEnv(t)
	a1, a2 := e.device("a1"), e.device("a2")
	alice, carol := e.app("alice"), e.app("carol")
	_, carolIn := subscribe(t, carol, "devices/+/telemetry")
	_, aliceIn := subscribe(t, alice, "devices/+/telemetry")
	if !publish(t, a1, "a1") {
		t.Fatal("not acknowledged")
	}
	eventually(t, "carol's delegated reading", func() bool { return carolIn.count("devices/a1/telemetry") == 1 })

	// The delegation is withdrawn: deliveries on the existing subscription
	// stop at once. a2 is revoked: its session is closed.
	cur := e.engine.Current().Document()
	next := cur
	next.Version++
	next.Delegations = nil
	next.Devices = []policy.Registration{e.devs["a1"], e.devs["b1"]}
	p, err := policy.Compile(next, "test", "")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.engine.Apply(p, false); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the revoked device's session closed", func() bool { return !a2.IsConnected() })
	if !publish(t, a1, "a1") {
		t.Fatal("not acknowledged")
	}
	eventually(t, "alice's second reading", func() bool { return aliceIn.count("devices/a1/telemetry") == 2 })
	if n := carolIn.count("devices/a1/telemetry"); n != 1 {
		t.Fatalf("carol received %d readings, want 1: deliveries did not stop with the delegation", n)
	}
	// The revoked device cannot log in again.
	pw, _ := envelope.DeriveMQTTPassword("a2", e.devs["a2"].K1, e.devs["a2"].K2)
	if _, err := e.dial("a2", pw); err == nil {
		t.Fatal("a revoked device logged in")
	}
}

func TestTokenExpiryStopsDeliveries(t *testing.T) {
	e := newAccessEnv(t)
	a1 := e.device("a1")
	c, err := e.dial("carol", e.sso.token(t, "carol", func(tk jwt.Token) { tk.Set(jwt.ExpirationKey, time.Now().Add(2*time.Second)) }))
	if err != nil {
		t.Fatal(err)
	}
	_, in := subscribe(t, c, "devices/a1/telemetry")
	publish(t, a1, "a1")
	eventually(t, "a delivery before expiry", func() bool { return in.count("devices/a1/telemetry") == 1 })
	now := time.Now().Add(3 * time.Second)
	e.broker.access.now = func() time.Time { return now }
	publish(t, a1, "a1")
	e.broker.closeExpired()
	eventually(t, "the expired session closed", func() bool { return !c.IsConnected() })
	if n := in.count("devices/a1/telemetry"); n != 1 {
		t.Fatalf("%d deliveries, want 1: a reading was delivered after the token expired", n)
	}
}

// TestMosquittoClients drives the embedded broker with Mosquitto's own
// command-line clients.
func TestMosquittoClients(t *testing.T) {
	if _, err := exec.LookPath("mosquitto_sub"); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("mosquitto_sub missing; .ci/run installs mosquitto-clients")
		}
		t.Skip("mosquitto-clients not installed (CI installs them)")
	}
	e := newAccessEnv(t)
	host, port, _ := strings.Cut(strings.TrimPrefix(e.url, "tcp://"), ":")
	sub := func(user, pass, filter string) *exec.Cmd {
		return exec.Command("mosquitto_sub", "-h", host, "-p", port, "-u", user, "-P", pass,
			"-t", filter, "-q", "1", "-C", "1", "-W", "5", "-v")
	}
	pub := func(dev, topicDev string) ([]byte, error) {
		d := e.devs[dev]
		pw, _ := envelope.DeriveMQTTPassword(d.ID, d.K1, d.K2)
		return exec.Command("mosquitto_pub", "-h", host, "-p", port, "-u", dev, "-P", pw,
			"-t", "devices/"+topicDev+"/telemetry", "-q", "1", "-m", `{"temperature": 5}`).CombinedOutput()
	}
	// carol's wildcard subscription receives a1 but not b1.
	c := sub("carol", e.sso.token(t, "carol", nil), "devices/+/telemetry")
	var out bytes.Buffer
	c.Stdout = &out
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- c.Wait() }()
	// mosquitto_sub says nothing when it is subscribed: publish b1 then a1
	// until it has received one message (-C 1), bounded by its -W 5.
	var subErr error
	for i, done := 0, false; !done && i < 50; i++ {
		if o, err := pub("b1", "b1"); err != nil {
			t.Fatalf("mosquitto_pub b1: %v %s", err, o)
		}
		if o, err := pub("a1", "a1"); err != nil {
			t.Fatalf("mosquitto_pub a1: %v %s", err, o)
		}
		select {
		case subErr = <-exited:
			done = true
		case <-time.After(100 * time.Millisecond):
		}
	}
	if subErr != nil {
		t.Fatalf("mosquitto_sub: %v", subErr)
	}
	if got := strings.TrimSpace(out.String()); !strings.HasPrefix(got, "devices/a1/telemetry ") {
		t.Fatalf("carol's first delivery = %q, want a1's reading (never b1's)", got)
	}
	// A device publishing to another device's topic is refused.
	if o, err := pub("a2", "a1"); err == nil {
		t.Fatalf("mosquitto_pub as a2 to a1's topic succeeded: %s", o)
	}
	// Expired token: mosquitto_sub is refused at CONNECT.
	expired := e.sso.token(t, "carol", func(tk jwt.Token) { tk.Set(jwt.ExpirationKey, time.Now().Add(-time.Minute)) })
	o, err := sub("carol", expired, "devices/a1/telemetry").CombinedOutput()
	if err == nil || !strings.Contains(strings.ToLower(string(o)), "not authori") {
		t.Fatalf("mosquitto_sub with an expired token: %v %s, want a refusal", err, o)
	}
}

// TestFloodDoesNotStarveOthers: a device flooding the broker is paced to
// its rate (its PUBACKs wait, nothing is dropped) while another device's
// readings go through at once.
func TestFloodDoesNotStarveOthers(t *testing.T) {
	e := newAccessEnv(t, func(o *BrokerOptions) { o.DeviceRate = 20; o.DeviceBurst = 5 })
	flood, quiet := e.device("a1"), e.device("a2")
	const floodN = 40
	start := time.Now()
	toks := make([]paho.Token, floodN)
	for i := range toks {
		toks[i] = flood.Publish("devices/a1/telemetry", 1, false, `{"temperature": 1}`)
	}
	// While the flood is being paced, the quiet device is served at once.
	var worst time.Duration
	for range 5 {
		t0 := time.Now()
		if !publish(t, quiet, "a2") {
			t.Fatal("quiet device's reading not acknowledged")
		}
		worst = max(worst, time.Since(t0))
	}
	for i, tok := range toks {
		if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
			t.Fatalf("flood reading %d not acknowledged: nothing may be dropped", i)
		}
	}
	// 40 readings at 20/s after a burst of 5 take at least (40-5)/20 s.
	took := time.Since(start)
	if took < 1500*time.Millisecond {
		t.Errorf("flood of %d acknowledged in %v: not paced to 20/s", floodN, took)
	}
	// Not starved: each of the quiet device's readings waited a small part
	// of the flood's own pacing, measured in the same run (an absolute
	// bound failed under a loaded -race run: both slow down together).
	if worst > took/3 {
		t.Errorf("quiet device waited up to %v behind a flood paced over %v", worst, took)
	}
}

// appWithGroups logs an application in with a token carrying a Keycloak
// "groups" claim (group paths, as the Group Membership mapper writes them).
func (e *accessEnv) appWithGroups(user string, groups ...string) paho.Client {
	e.t.Helper()
	c, err := e.dial(user, e.sso.token(e.t, user, func(tk jwt.Token) { tk.Set("groups", groups) }))
	if err != nil {
		e.t.Fatalf("application of %s login: %v", user, err)
	}
	return c
}

// TestAppGroupAndPublicAccess: a2 is delegated READ_ACCESS to the LDAP
// group cn=staff (as the platform stores groupnameDelegated), b1 to
// ANONYMOUS. Members read a2, non-members do not; every signed-in
// application reads b1; a client without a token reads nothing.
func TestAppGroupAndPublicAccess(t *testing.T) {
	e := newAccessEnv(t)
	next := e.engine.Current().Document()
	next.Version++
	next.Delegations = append(next.Delegations,
		policy.Delegation{Device: "a2", Group: "cn=staff,ou=Firenze,dc=ldap,dc=disit,dc=org", Kind: policy.ReadAccess},
		policy.Delegation{Device: "b1", User: policy.Public, Kind: policy.ReadAccess})
	p, err := policy.Compile(next, "test", "")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.engine.Apply(p, false); err != nil {
		t.Fatal(err)
	}
	a1, a2, b1 := e.device("a1"), e.device("a2"), e.device("b1")
	alice, carol := e.app("alice"), e.app("carol")
	erin := e.appWithGroups("erin", "/staff")
	frank := e.appWithGroups("frank", "/visitors")
	subs := []struct {
		who    string
		c      paho.Client
		filter string
		ok     bool
	}{
		{"owner alice → a2", alice, "devices/a2/telemetry", true},
		{"direct delegate carol → a1", carol, "devices/a1/telemetry", true},
		{"group member erin → a2", erin, "devices/a2/telemetry", true},
		{"non-member frank → a2", frank, "devices/a2/telemetry", false},
		{"no groups carol → a2", carol, "devices/a2/telemetry", false},
		{"member erin → a1 (not delegated to the group)", erin, "devices/a1/telemetry", false},
		{"any signed-in frank → public b1", frank, "devices/b1/telemetry", true},
		{"any signed-in erin → public b1", erin, "devices/b1/telemetry", true},
	}
	for _, s := range subs {
		code, _ := subscribe(t, s.c, s.filter)
		if (code != 0x80) != s.ok {
			t.Errorf("%s: SUBACK 0x%02x, want granted=%v", s.who, code, s.ok)
		}
	}
	// Wildcards deliver by the same rules.
	_, erinAll := subscribe(t, erin, "devices/+/telemetry")
	_, frankAll := subscribe(t, frank, "devices/+/telemetry")
	_, aliceAll := subscribe(t, alice, "devices/+/telemetry")
	for _, d := range []struct {
		c  paho.Client
		id string
	}{{a1, "a1"}, {a2, "a2"}} {
		if !publish(t, d.c, d.id) {
			t.Fatalf("%s's reading not acknowledged", d.id)
		}
	}
	e.settle(t, b1, "b1", erinAll, frankAll, aliceAll)
	for _, c := range []struct {
		name, topic string
		in          *inbox
		want        int
	}{
		{"erin a2 (group)", "devices/a2/telemetry", erinAll, 1},
		{"erin a1", "devices/a1/telemetry", erinAll, 0},
		{"frank a2 (not a member)", "devices/a2/telemetry", frankAll, 0},
		{"frank a1", "devices/a1/telemetry", frankAll, 0},
		{"alice a1 (owner)", "devices/a1/telemetry", aliceAll, 1},
	} {
		if n := c.in.count(c.topic); n != c.want {
			t.Errorf("%s: %d readings, want %d", c.name, n, c.want)
		}
	}
	if got := testCounter(t, e.m, "deliver", denyNotReadable) + testCounter(t, e.m, "read", denyNotReadable); got < 1 {
		t.Errorf("denied{read,not_readable} = %v", got)
	}
	// Public means signed in: a client that is neither a device nor holds
	// a token cannot log in, so it reads nothing.
	for _, pw := range []string{"", "not-a-token"} {
		if c, err := e.dial("guest", pw); err == nil {
			c.Disconnect(0)
			t.Errorf("a client without a token (password %q) logged in", pw)
		}
	}
	if c, err := e.dial("", ""); err == nil {
		c.Disconnect(0)
		t.Error("an anonymous client logged in")
	}
}
