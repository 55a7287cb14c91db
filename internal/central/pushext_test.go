package central

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/edgegate/edgegate/internal/mosquittotest"
	"github.com/edgegate/edgegate/internal/pki"
	"github.com/edgegate/edgegate/internal/queue"
	"github.com/edgegate/edgegate/internal/sim/centralsim"
	"github.com/edgegate/edgegate/internal/testkit"
	centralsync "github.com/edgegate/edgegate/sync"
)

// The operator's dynsec administrator (mosquitto_ctrl dynsec init), and
// the companion's own account, provisioned as docs/central.md says: the
// plugin's admin role and, on the broker it publishes to, a role that may
// publish on the policy topics.
const (
	centralAdmin = "operator-admin"
	centralUser  = "edgegate-central"
	centralPW    = "central-mqtt-pw-CANARY-8a1c"
)

// extBroker is a real Mosquitto with the dynamic-security plugin, a plain
// loopback listener (mosquitto_ctrl, bridges) and a TLS one (the
// companion and the gateways).
type extBroker struct {
	*mosquittotest.Broker
	url string // ssl://127.0.0.1:port
}

func writePEMs(t testing.TB, ca *pki.CA) (certFile, keyFile string) {
	t.Helper()
	cert, err := ca.IssueServer(time.Now(), "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	var chain []byte
	for _, der := range cert.Certificate {
		chain = append(chain, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})...)
	}
	key, err := x509.MarshalPKCS8PrivateKey(cert.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile = filepath.Join(dir, "mqtt.crt"), filepath.Join(dir, "mqtt.key")
	if err := os.WriteFile(certFile, chain, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: key}), 0o600); err != nil {
		t.Fatal(err)
	}
	return certFile, keyFile
}

// startExtBroker starts a Mosquitto provisioned as docs/central.md says:
// the companion's account may publish on edgegate/gateways/+/policy
// (publish is true) and administers dynamic security.
func startExtBroker(t testing.TB, ca *pki.CA, publish bool, conf ...string) *extBroker {
	t.Helper()
	return startExtBrokerOn(t, ca, mosquittotest.FreePort(t), publish, conf...)
}

// startExtBrokerOn is startExtBroker with its TLS listener on port.
func startExtBrokerOn(t testing.TB, ca *pki.CA, port int, publish bool, conf ...string) *extBroker {
	t.Helper()
	return startExtBrokerSeeded(t, ca, port, nil, publish, conf...)
}

// startExtBrokerSeeded is startExtBrokerOn with seed called on the
// dynamic-security file before the broker starts (mosquittotest.StartSeeded).
func startExtBrokerSeeded(t testing.TB, ca *pki.CA, port int, seed func(string) error, publish bool, conf ...string) *extBroker {
	t.Helper()
	certFile, keyFile := writePEMs(t, ca)
	// set_tcp_nodelay as docs/central.md recommends: without it Nagle holds
	// a PUBLISH behind an unacknowledged segment for the peer's delayed
	// ACK (p90 push->applied ~25 ms instead of ~1.5 ms in the benchmark).
	m := mosquittotest.StartSeeded(t, centralAdmin, seed, append(append(conf, "set_tcp_nodelay true"), mosquittotest.TLSListener(port, certFile, keyFile)...)...)
	m.Ctrl(t, centralAdmin, "createClient", centralUser, "-p", centralPW)
	m.Ctrl(t, centralAdmin, "addClientRole", centralUser, "admin")
	if publish {
		m.Ctrl(t, centralAdmin, "createRole", "edgegate-central-publish")
		m.Ctrl(t, centralAdmin, "addRoleACL", "edgegate-central-publish", "publishClientSend", "edgegate/gateways/+/policy", "allow")
		m.Ctrl(t, centralAdmin, "addClientRole", centralUser, "edgegate-central-publish")
	}
	return &extBroker{Broker: m, url: fmt.Sprintf("ssl://127.0.0.1:%d", port)}
}

type extFixture struct {
	*env
	brokerCA *pki.CA
	root     *extBroker
}

// newExtEnv is newEnv (or newPGEnv) pushing through a real Mosquitto;
// leaves are further brokers bridged from it.
func newExtEnv(t *testing.T, pg bool, leaves ...*extBroker) *extFixture {
	t.Helper()
	ca, err := pki.NewCA("push broker test CA", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return newExtEnvCA(t, pg, ca, startExtBroker(t, ca, true), leaves...)
}

func newExtEnvCA(t *testing.T, pg bool, ca *pki.CA, root *extBroker, leaves ...*extBroker) *extFixture {
	t.Helper()
	dir := t.TempDir()
	caFile, pwFile := filepath.Join(dir, "ca.pem"), filepath.Join(dir, "mqtt-password")
	if err := os.WriteFile(caFile, ca.CertPEM, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(pwFile, []byte(centralPW+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	mut := func(c *Config) {
		c.Push = PushConfig{Mode: PushExternal, Brokers: []string{root.url}, CAFile: caFile, Username: centralUser, PasswordFile: pwFile}
		for _, l := range leaves {
			c.Push.LeafBrokers = append(c.Push.LeafBrokers, l.url)
		}
	}
	var e *env
	if pg {
		e = newPGEnv(t, mut)
	} else {
		e = newEnv(t, mut)
	}
	e.mqttURL, e.mqttTLS = root.url, &tls.Config{RootCAs: ca.Pool()}
	startExt(t, e.svc)
	return &extFixture{env: e, brokerCA: ca, root: root}
}

func startExt(t *testing.T, svc *Service) {
	t.Helper()
	if err := svc.StartExternalPush(context.Background()); err != nil {
		t.Fatal(err)
	}
	select {
	case <-svc.PushReady():
	case <-time.After(20 * time.Second):
		t.Fatal("the companion did not set up its session with the external broker")
	}
}

// creds asks the companion for gw's push credentials with client's token.
func (e *extFixture) creds(client, secret, gw string) (int, centralsync.PushCredentials) {
	e.t.Helper()
	resp, body := e.do("GET", centralsync.PushCredentialsPath(gw), e.gatewayToken(client, secret), nil, nil)
	var c centralsync.PushCredentials
	if resp.StatusCode == 200 {
		if err := json.Unmarshal(body, &c); err != nil {
			e.t.Fatal(err)
		}
		if resp.Header.Get("Cache-Control") != "no-store" {
			e.t.Errorf("push credentials answered with Cache-Control %q, want no-store", resp.Header.Get("Cache-Control"))
		}
	}
	return resp.StatusCode, c
}

// inbox collects what a raw MQTT client receives, in order.
type inbox struct {
	mu   sync.Mutex
	msgs []paho.Message
}

func (i *inbox) on(_ paho.Client, m paho.Message) {
	i.mu.Lock()
	i.msgs = append(i.msgs, m)
	i.mu.Unlock()
}

func (i *inbox) all() []paho.Message {
	i.mu.Lock()
	defer i.mu.Unlock()
	return append([]paho.Message(nil), i.msgs...)
}

// docOf is the gateway and version a pushed bundle carries, or "" for
// anything else.
func docOf(payload []byte) (string, uint64) {
	parts := strings.Split(string(payload), ".")
	if len(parts) != 3 {
		return "", 0
	}
	raw, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return "", 0
	}
	var d struct {
		Gateway string `json:"gateway"`
		Version uint64 `json:"version"`
	}
	if json.Unmarshal(raw, &d) != nil {
		return "", 0
	}
	return d.Gateway, d.Version
}

func dial(t *testing.T, url string, tc *tls.Config, clientID, user, pw string) (paho.Client, error) {
	t.Helper()
	c := paho.NewClient(paho.NewClientOptions().AddBroker(url).SetClientID(clientID).SetUsername(user).SetPassword(pw).
		SetTLSConfig(tc.Clone()).SetCleanSession(true).SetAutoReconnect(false).SetConnectTimeout(10 * time.Second).
		SetOrderMatters(true))
	tok := c.Connect()
	if !tok.WaitTimeout(15 * time.Second) {
		return nil, fmt.Errorf("connect: no answer")
	}
	if err := tok.Error(); err != nil {
		return nil, err
	}
	t.Cleanup(func() { c.Disconnect(100) })
	return c, nil
}

// subscribe returns the broker's SUBACK code for filter.
func subscribe(t *testing.T, c paho.Client, filter string, in *inbox) byte {
	t.Helper()
	tok := c.Subscribe(filter, 1, in.on)
	if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe %s: %v", filter, tok.Error())
	}
	return tok.(*paho.SubscribeToken).Result()[filter]
}

func (e *extFixture) dialAs(t *testing.T, url string, c centralsync.PushCredentials) paho.Client {
	t.Helper()
	cl, err := dial(t, url, e.mqttTLS, c.ClientID, c.Username, c.Password)
	if err != nil {
		t.Fatalf("connect as %s: %v", c.Username, err)
	}
	return cl
}

func (e *extFixture) version(gw string) uint64 {
	e.t.Helper()
	r, _, err := e.svc.Store().Gateway(context.Background(), gw)
	if err != nil {
		e.t.Fatal(err)
	}
	return r.Version
}

// TestExternalPushRetainedAndApplied: through a real Mosquitto (TLS,
// dynamic security), a gateway's credentials come from the companion's
// HTTPS API (its own only), its bundle is retained on its topic when it
// connects, and the real gateway Syncer applies a change pushed later.
func TestExternalPushRetainedAndApplied(t *testing.T) {
	e := newExtEnv(t, false)
	e.insert("alice", "th-1", "gw-a")
	e.insert("alice", "th-2", "gw-b")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	res, err := e.svc.Refresh(ctx, false)
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Pushed) != 2 {
		t.Fatalf("pushed %v, want gw-a and gw-b", res.Pushed)
	}
	if code, _ := e.creds("gw-a-client", gwASecret, "gw-b"); code != 403 {
		t.Fatalf("gw-a's token asked for gw-b's push credentials: HTTP %d, want 403", code)
	}
	code, ca := e.creds("gw-a-client", gwASecret, "gw-a")
	if code != 200 || ca.Username != "edgegate-gw-gw-a" || ca.ClientID != "edgegate-gw-a" || len(ca.Password) < 40 {
		t.Fatalf("gw-a's push credentials: HTTP %d %s/%s", code, ca.Username, ca.ClientID)
	}
	var in inbox
	cl := e.dialAs(t, e.root.url, ca)
	if c := subscribe(t, cl, centralsync.PushTopic("gw-a"), &in); c != 1 {
		t.Fatalf("gw-a subscribing to its own topic: SUBACK %#x", c)
	}
	want := e.version("gw-a")
	testkit.Eventually(t, 10*time.Second, "gw-a's retained bundle on connect", func() bool { return len(in.all()) > 0 })
	m := in.all()[0]
	if gw, v := docOf(m.Payload()); !m.Retained() || gw != "gw-a" || v != want {
		t.Fatalf("first message: retained %v, gateway %q version %d; want gw-a's retained version %d", m.Retained(), gw, v, want)
	}
	cl.Disconnect(100)

	q, err := queue.Open(queue.Options{Dir: t.TempDir(), Key: bytes.Repeat([]byte{7}, 32)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { q.Close() }) // after the syncer stopped (cleanups run last first)
	g := e.startGatewayOn(ctx, "gw-a", "gw-a-client", gwASecret, q)
	testkit.Eventually(t, 10*time.Second, "gw-a applies its bundle", func() bool { return g.engine.Current().Version == want })
	testkit.Eventually(t, 10*time.Second, "gw-a's push channel up", func() bool { return g.syncer.Status().PushConnected })
	// The gateway keeps its credentials in its encrypted store.
	if b, ok, err := q.GetState(centralsync.StatePushCredentials); err != nil || !ok || !strings.Contains(string(b), ca.Password) {
		t.Fatalf("gw-a's stored push credentials: %v %v", ok, err)
	}
	start := time.Now()
	e.sim.SetDelegations([]centralsim.Delegation{{Device: "th-1", User: "bob", Kind: centralsim.KindReadAccess}})
	if _, err := e.svc.Refresh(ctx, false); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, 10*time.Second, "a delegation pushed through Mosquitto applied", func() bool {
		return g.engine.Current().CanRead("bob", "th-1")
	})
	t.Logf("delegation pushed through Mosquitto and applied in %s", time.Since(start).Round(time.Millisecond))
	if strings.Contains(e.logs.String(), ca.Password) || strings.Contains(e.logs.String(), centralPW) {
		t.Fatal("a gateway's broker password appears in the companion's logs")
	}
}

// TestExternalPushIsolation: the attacker's side of the per-gateway ACLs
// on a real Mosquitto. Gateway A cannot subscribe to B's topic or to any
// wildcard, never receives B's bundles, cannot take B's session over,
// and neither A, B nor another account can publish on any policy topic:
// after their forged publishes were acknowledged, the companion's next bundles (the
// markers) arrive and nothing forged came before them.
func TestExternalPushIsolation(t *testing.T) {
	e := newExtEnv(t, false)
	e.insert("alice", "th-1", "gw-a")
	e.insert("alice", "th-2", "gw-b")
	ctx := context.Background()
	if _, err := e.svc.Refresh(ctx, false); err != nil {
		t.Fatal(err)
	}
	_, ca := e.creds("gw-a-client", gwASecret, "gw-a")
	_, cb := e.creds("gw-b-client", gwBSecret, "gw-b")

	if _, err := dial(t, e.root.url, e.mqttTLS, "edgegate-gw-b", ca.Username, ca.Password); err == nil {
		t.Fatal("gw-a's account connected with gw-b's client id (a session takeover)")
	}
	if _, err := dial(t, e.root.url, e.mqttTLS, ca.ClientID, ca.Username, cb.Password); err == nil {
		t.Fatal("gw-a's account connected with gw-b's password")
	}
	if _, err := dial(t, e.root.url, e.mqttTLS, "edgegate-gw-b", cb.Username, ""); err == nil {
		t.Fatal("gw-b's account connected without a password")
	}

	var inA, inB inbox
	a := e.dialAs(t, e.root.url, ca)
	for _, f := range []string{centralsync.PushTopic("gw-b"), "edgegate/gateways/+/policy", "edgegate/#", "#"} {
		if c := subscribe(t, a, f, &inA); c != 0x80 {
			t.Errorf("gw-a subscribing to %s: SUBACK %#x, want 0x80 (refused)", f, c)
		}
	}
	if c := subscribe(t, a, centralsync.PushTopic("gw-a"), &inA); c != 1 {
		t.Fatalf("gw-a subscribing to its own topic: SUBACK %#x", c)
	}
	b := e.dialAs(t, e.root.url, cb)
	if c := subscribe(t, b, centralsync.PushTopic("gw-b"), &inB); c != 1 {
		t.Fatalf("gw-b subscribing to its own topic: SUBACK %#x", c)
	}
	// paho hands a message to the callback of every filter it matches,
	// refused ones included: inA may hold gw-a's bundle several times; what
	// counts is that it never holds anything else.
	testkit.Eventually(t, 10*time.Second, "both retained bundles", func() bool { return len(inA.all()) > 0 && len(inB.all()) == 1 })
	if !a.IsConnectionOpen() || !b.IsConnectionOpen() {
		t.Fatal("a subscriber was disconnected")
	}

	// Another account of the operator's (an application, no role): the
	// broker's default ACL lets it publish nothing either.
	e.root.Ctrl(t, centralAdmin, "createClient", "some-app", "-p", "some-app-pw")
	other, err := dial(t, e.root.url, e.mqttTLS, "some-app-1", "some-app", "some-app-pw")
	if err != nil {
		t.Fatal(err)
	}
	for _, pub := range []struct {
		c     paho.Client
		topic string
	}{{a, centralsync.PushTopic("gw-b")}, {a, centralsync.PushTopic("gw-a")}, {b, centralsync.PushTopic("gw-b")}, {b, centralsync.PushTopic("gw-a")},
		{other, centralsync.PushTopic("gw-a")}, {other, centralsync.PushTopic("gw-b")}} {
		tok := pub.c.Publish(pub.topic, 1, true, "forged."+pub.topic+".bundle")
		// Mosquitto acknowledges a refused QoS 1 publish (MQTT 3.1.1) and
		// drops it; the acknowledgement orders it before the markers.
		if !tok.WaitTimeout(10 * time.Second) {
			t.Fatalf("forged publish on %s: no PUBACK", pub.topic)
		}
	}
	e.sim.SetDelegations([]centralsim.Delegation{{Device: "th-1", User: "bob", Kind: centralsim.KindReadAccess},
		{Device: "th-2", User: "bob", Kind: centralsim.KindReadAccess}})
	if _, err := e.svc.Refresh(ctx, false); err != nil {
		t.Fatal(err)
	}
	va, vb := e.version("gw-a"), e.version("gw-b")
	marker := func(in *inbox, gw string, v uint64) bool {
		for _, m := range in.all() {
			if g, ver := docOf(m.Payload()); g == gw && ver == v {
				return true
			}
		}
		return false
	}
	testkit.Eventually(t, 10*time.Second, "the markers (the companion's new bundles)", func() bool {
		return marker(&inA, "gw-a", va) && marker(&inB, "gw-b", vb)
	})
	for name, in := range map[string]*inbox{"gw-a": &inA, "gw-b": &inB} {
		for _, m := range in.all() {
			if gw, _ := docOf(m.Payload()); gw != name {
				t.Errorf("%s received %q on %s", name, clip(string(m.Payload())), m.Topic())
			}
		}
	}
	// A fresh session gets the companion's bundle retained, not a forgery.
	var fresh inbox
	b2 := e.dialAs(t, e.root.url, cb)
	subscribe(t, b2, centralsync.PushTopic("gw-b"), &fresh)
	testkit.Eventually(t, 10*time.Second, "gw-b's retained bundle", func() bool { return len(fresh.all()) > 0 })
	if gw, v := docOf(fresh.all()[0].Payload()); gw != "gw-b" || v != vb {
		t.Fatalf("retained on gw-b's topic: %q", clip(string(fresh.all()[0].Payload())))
	}
}

// TestExternalPushBridged: "Mosquitto with bridges". The companion
// publishes on the root broker; a leaf Mosquitto bridges the policy
// topics in from it; the companion keeps the gateways' accounts on both.
// A gateway on the leaf gets its retained bundle through the bridge, the
// real Syncer applies a change pushed through root and bridge, and the
// leaf refuses A a subscription to B's topic.
func TestExternalPushBridged(t *testing.T) {
	ca, err := pki.NewCA("push broker test CA", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	root := startExtBroker(t, ca, true)
	const bridgePW = "bridge-pw-CANARY-55e1"
	root.Ctrl(t, centralAdmin, "createRole", "edgegate-bridge")
	root.Ctrl(t, centralAdmin, "addRoleACL", "edgegate-bridge", "subscribePattern", "edgegate/gateways/+/policy", "allow")
	root.Ctrl(t, centralAdmin, "addRoleACL", "edgegate-bridge", "publishClientReceive", "edgegate/gateways/+/policy", "allow")
	root.Ctrl(t, centralAdmin, "createClient", "edgegate-bridge", "-p", bridgePW)
	root.Ctrl(t, centralAdmin, "addClientRole", "edgegate-bridge", "edgegate-bridge")
	leaf := startExtBroker(t, ca, false,
		"connection root", "address "+root.Addr, "remote_username edgegate-bridge", "remote_password "+bridgePW,
		"remote_clientid edgegate-bridge-leaf-1", "topic edgegate/gateways/+/policy in 1", "cleansession true",
		"bridge_protocol_version mqttv311", "restart_timeout 1")
	e := newExtEnvCA(t, false, ca, root, leaf)
	e.mqttURL = leaf.url // the gateways connect to the leaf

	e.insert("alice", "th-1", "gw-a")
	e.insert("alice", "th-2", "gw-b")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if _, err := e.svc.Refresh(ctx, false); err != nil {
		t.Fatal(err)
	}
	_, ca1 := e.creds("gw-a-client", gwASecret, "gw-a")
	var in inbox
	a := e.dialAs(t, leaf.url, ca1)
	if c := subscribe(t, a, centralsync.PushTopic("gw-b"), &in); c != 0x80 {
		t.Errorf("on the leaf, gw-a subscribing to gw-b's topic: SUBACK %#x, want 0x80", c)
	}
	subscribe(t, a, centralsync.PushTopic("gw-a"), &in)
	want := e.version("gw-a")
	testkit.Eventually(t, 15*time.Second, "gw-a's bundle retained on the leaf", func() bool { return len(in.all()) > 0 })
	if gw, v := docOf(in.all()[0].Payload()); gw != "gw-a" || v != want || !in.all()[0].Retained() {
		t.Fatalf("on the leaf: gateway %q version %d retained %v, want gw-a's retained %d", gw, v, in.all()[0].Retained(), want)
	}
	a.Disconnect(100)

	g := e.startGateway(ctx, "gw-a", "gw-a-client", gwASecret)
	testkit.Eventually(t, 10*time.Second, "gw-a's push channel up on the leaf", func() bool {
		return g.syncer.Status().PushConnected && g.engine.Current().Version == want
	})
	start := time.Now()
	e.sim.SetDelegations([]centralsim.Delegation{{Device: "th-1", User: "bob", Kind: centralsim.KindReadAccess}})
	if _, err := e.svc.Refresh(ctx, false); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, 10*time.Second, "a change pushed through root and bridge applied", func() bool {
		return g.engine.Current().CanRead("bob", "th-1")
	})
	t.Logf("pushed through the bridge and applied in %s", time.Since(start).Round(time.Millisecond))
	// A fresh session on the leaf gets the newest retained (the bridge
	// keeps the retain flag).
	var fresh inbox
	f := e.dialAs(t, leaf.url, ca1)
	subscribe(t, f, centralsync.PushTopic("gw-a"), &fresh)
	testkit.Eventually(t, 10*time.Second, "the newest retained on the leaf", func() bool {
		if len(fresh.all()) == 0 {
			return false
		}
		_, v := docOf(fresh.all()[0].Payload())
		return v == e.version("gw-a")
	})
}

// TestExternalPushReplicasRacing: two replicas on one PostgreSQL publish
// through one real Mosquitto while the platform changes; one replica's
// clock runs 30 s behind. A subscriber with gw-a's account sees the
// versions arrive in increasing order only, a fresh session gets the
// newest retained, and the real gateway ends on the newest version.
func TestExternalPushReplicasRacing(t *testing.T) {
	e := newExtEnv(t, true)
	e.insert("alice", "th-0", "gw-a")
	e.insert("bob", "th-b0", "gw-b")
	b := e.replica(func() time.Time { return time.Now().Add(-30 * time.Second) })
	startExt(t, b)
	// Each publish is held up to 25 ms on its way to the broker (a slow
	// network): without the publish lock, a replica holding an older
	// version would publish it after the other's newer one.
	e.svc.push = &slowPublisher{next: e.svc.push, seed: 1}
	b.push = &slowPublisher{next: b.push, seed: 2}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if _, err := e.svc.Refresh(ctx, false); err != nil {
		t.Fatal(err)
	}
	_, ca := e.creds("gw-a-client", gwASecret, "gw-a")
	var in inbox
	// The broker accepts only the client id edgegate-gw-a for gw-a's
	// account: this subscriber stands in for the gateway during the race
	// (a second session would take it over), the real one runs after.
	sub := e.dialAs(t, e.root.url, ca)
	subscribe(t, sub, centralsync.PushTopic("gw-a"), &in)

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var rounds atomic.Int64
	var pushedA, pushedB atomic.Int64
	for i, svc := range []*Service{e.svc, b} {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				res, err := svc.Refresh(ctx, false)
				if err != nil {
					t.Errorf("refresh: %v", err)
					return
				}
				if i == 0 {
					pushedA.Add(int64(len(res.Pushed)))
				} else {
					pushedB.Add(int64(len(res.Pushed)))
				}
				rounds.Add(1)
			}
		})
	}
	afterRounds := func(n int64) {
		t.Helper()
		want := rounds.Load() + n
		testkit.Eventually(t, 10*time.Second, "replica rounds", func() bool { return rounds.Load() >= want })
	}
	for i := 1; i <= 12; i++ {
		if i%4 == 0 {
			e.insert("alice", fmt.Sprintf("th-%d", i/4), "gw-a")
		}
		e.sim.SetDelegations([]centralsim.Delegation{{Device: "th-0", User: fmt.Sprintf("viewer-%d", i), Kind: centralsim.KindReadAccess}})
		afterRounds(2)
	}
	afterRounds(4)
	close(stop)
	wg.Wait()
	for _, svc := range []*Service{e.svc, b} {
		if _, err := svc.Refresh(ctx, false); err != nil {
			t.Fatal(err)
		}
	}
	newest := e.version("gw-a")
	t.Logf("%d rounds; replica A pushed %d, replica B pushed %d", rounds.Load(), pushedA.Load(), pushedB.Load())
	if pushedA.Load() == 0 || pushedB.Load() == 0 {
		t.Fatalf("no race: replica A pushed %d, B %d", pushedA.Load(), pushedB.Load())
	}
	testkit.Eventually(t, 10*time.Second, "the newest version reaches the subscriber", func() bool {
		msgs := in.all()
		if len(msgs) == 0 {
			return false
		}
		_, v := docOf(msgs[len(msgs)-1].Payload())
		return v == newest
	})
	var seq []uint64
	for _, m := range in.all() {
		_, v := docOf(m.Payload())
		seq = append(seq, v)
	}
	for i := 1; i < len(seq); i++ {
		if seq[i] < seq[i-1] {
			t.Fatalf("version %d arrived after %d: %v", seq[i], seq[i-1], seq)
		}
	}
	if !sub.IsConnectionOpen() {
		t.Fatal("the subscriber was disconnected during the race")
	}
	sub.Disconnect(100)
	var fresh inbox
	f := e.dialAs(t, e.root.url, ca)
	subscribe(t, f, centralsync.PushTopic("gw-a"), &fresh)
	testkit.Eventually(t, 10*time.Second, "a retained message", func() bool { return len(fresh.all()) > 0 })
	if _, v := docOf(fresh.all()[0].Payload()); v != newest {
		t.Fatalf("retained version %d, newest %d (arrival order %v)", v, newest, seq)
	}
	f.Disconnect(100)
	g := e.startGateway(ctx, "gw-a", "gw-a-client", gwASecret)
	testkit.Eventually(t, 10*time.Second, "gateway on the newest version", func() bool {
		return g.engine.Current().Version == newest
	})
	t.Logf("%d pushes of gw-a reached the subscriber in order: %v", len(seq), seq)
}

// TestExternalPushAccountDeleted: an operator deletes a gateway's broker
// account (Mosquitto disconnects it). The gateway's stored credentials
// are refused at its next connect; it asks the companion again, which
// re-creates the account, and the next change reaches it by push.
func TestExternalPushAccountDeleted(t *testing.T) {
	e := newExtEnv(t, false)
	e.insert("alice", "th-1", "gw-a")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if _, err := e.svc.Refresh(ctx, false); err != nil {
		t.Fatal(err)
	}
	g := e.startGateway(ctx, "gw-a", "gw-a-client", gwASecret)
	testkit.Eventually(t, 10*time.Second, "gw-a's push channel up", func() bool { return g.syncer.Status().PushConnected })
	e.root.Ctrl(t, centralAdmin, "deleteClient", "edgegate-gw-gw-a")
	testkit.Eventually(t, 10*time.Second, "gw-a disconnected by the deletion", func() bool { return !g.syncer.Status().PushConnected })
	testkit.Eventually(t, 30*time.Second, "gw-a back on the push channel with a re-created account", func() bool {
		return g.syncer.Status().PushConnected
	})
	e.sim.SetDelegations([]centralsim.Delegation{{Device: "th-1", User: "bob", Kind: centralsim.KindReadAccess}})
	if _, err := e.svc.Refresh(ctx, false); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, 10*time.Second, "a change pushed after the account came back", func() bool {
		return g.engine.Current().CanRead("bob", "th-1")
	})
}

type slowPublisher struct {
	next publisher
	mu   sync.Mutex
	seed uint64
}

func (p *slowPublisher) publish(gw, bundle string) error {
	p.mu.Lock()
	p.seed = p.seed*6364136223846793005 + 1442695040888963407
	d := time.Duration(p.seed>>33%25) * time.Millisecond
	p.mu.Unlock()
	time.Sleep(d) // the network's delay, not a wait for an outcome
	return p.next.publish(gw, bundle)
}

func (p *slowPublisher) close() { p.next.close() }

// TestExternalPushBrokerOutage: the broker goes down; a change signed
// meanwhile cannot be pushed. A new, empty broker comes up on the same
// address (a reset: no gateway accounts, no retained messages). The
// companion reconnects, re-creates the gateway's account and pushes the
// newest bundle again; the gateway reconnects with its stored credentials
// and applies it, its poll interval being hours.
func TestExternalPushBrokerOutage(t *testing.T) {
	ca, err := pki.NewCA("push broker test CA", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	port := mosquittotest.FreePort(t)
	root := startExtBrokerOn(t, ca, port, true)
	e := newExtEnvCA(t, false, ca, root)
	e.insert("alice", "th-1", "gw-a")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if _, err := e.svc.Refresh(ctx, false); err != nil {
		t.Fatal(err)
	}
	g := e.startGateway(ctx, "gw-a", "gw-a-client", gwASecret)
	testkit.Eventually(t, 10*time.Second, "gw-a's push channel up", func() bool {
		return g.syncer.Status().PushConnected && g.engine.Current().Version == e.version("gw-a")
	})

	root.Stop()
	testkit.Eventually(t, 10*time.Second, "gw-a sees the broker gone", func() bool { return !g.syncer.Status().PushConnected })
	e.sim.SetDelegations([]centralsim.Delegation{{Device: "th-1", User: "bob", Kind: centralsim.KindReadAccess}})
	res, err := e.svc.Refresh(ctx, false)
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Signed) != 1 || len(res.Pushed) != 0 {
		t.Fatalf("while the broker is down: signed %v, pushed %v", res.Signed, res.Pushed)
	}
	if g.engine.Current().CanRead("bob", "th-1") {
		t.Fatal("the change reached the gateway without a broker")
	}

	startExtBrokerOn(t, ca, port, true) // empty: no accounts, nothing retained
	testkit.Eventually(t, 60*time.Second, "the change applied after the broker came back", func() bool {
		return g.engine.Current().CanRead("bob", "th-1")
	})
	// The gateway polls once after it reconnects, so the apply alone does
	// not prove the push: the new broker must hold the newest bundle,
	// retained, pushed again by the companion (read with the companion's
	// own account, which may read every topic).
	var in inbox
	obs, err := dial(t, root.url, e.mqttTLS, "test-observer", centralUser, centralPW)
	if err != nil {
		t.Fatal(err)
	}
	subscribe(t, obs, centralsync.PushTopic("gw-a"), &in)
	want := e.version("gw-a")
	testkit.Eventually(t, 30*time.Second, "the newest bundle retained on the new broker", func() bool {
		msgs := in.all()
		if len(msgs) == 0 {
			return false
		}
		_, v := docOf(msgs[0].Payload())
		return msgs[0].Retained() && v == want
	})
	testkit.Eventually(t, 30*time.Second, "gw-a back on the push channel", func() bool { return g.syncer.Status().PushConnected })
}

// TestExternalPushBrokerReset: the broker restarts empty (no persistence:
// accounts and retained messages gone) while nothing changed. The
// companion re-creates the accounts and pushes the bundles again, so a
// gateway that connects later still gets its bundle retained.
func TestExternalPushBrokerReset(t *testing.T) {
	ca, err := pki.NewCA("push broker test CA", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	port := mosquittotest.FreePort(t)
	root := startExtBrokerOn(t, ca, port, true)
	e := newExtEnvCA(t, false, ca, root)
	e.insert("alice", "th-1", "gw-a")
	e.insert("alice", "th-2", "gw-b")
	if _, err := e.svc.Refresh(context.Background(), false); err != nil {
		t.Fatal(err)
	}
	_, cb := e.creds("gw-b-client", gwBSecret, "gw-b")
	root.Stop()
	startExtBrokerOn(t, ca, port, true)
	var got paho.Message
	t.Cleanup(func() {
		if t.Failed() {
			t.Log(e.logs.String())
		}
	})
	testkit.Eventually(t, 30*time.Second, "gw-b's bundle retained again on the reset broker", func() bool {
		c, err := dial(t, root.url, e.mqttTLS, cb.ClientID, cb.Username, cb.Password)
		if err != nil {
			return false // the companion has not re-created the account yet
		}
		defer c.Disconnect(50)
		var in inbox // a fresh session: only a retained message arrives at once
		subscribe(t, c, centralsync.PushTopic("gw-b"), &in)
		return testkit.Poll(2*time.Second, func() bool {
			for _, m := range in.all() {
				if m.Retained() {
					got = m
					return true
				}
			}
			return false
		})
	})
	if gw, v := docOf(got.Payload()); gw != "gw-b" || v != e.version("gw-b") {
		t.Fatalf("after the reset: gateway %q version %d, want gw-b's %d", gw, v, e.version("gw-b"))
	}
}
