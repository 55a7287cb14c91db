package centralsync

import (
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/edgegate/edgegate/internal/testkit"
)

// polBroker is central's MQTT broker: mochi with a TLS listener that
// checks the client id, the username and the token password.
type polBroker struct {
	srv  *mochi.Server
	tcp  *listeners.TCP
	hook *polAuthHook
}

type polAuthHook struct {
	mochi.HookBase
	mu        sync.Mutex
	accept    map[string]bool // passwords (tokens) accepted
	passwords []string        // every password offered, in order
}

func (h *polAuthHook) ID() string { return "policy-test-auth" }
func (h *polAuthHook) Provides(b byte) bool {
	return b == mochi.OnConnectAuthenticate || b == mochi.OnACLCheck
}

func (h *polAuthHook) OnConnectAuthenticate(cl *mochi.Client, pk packets.Packet) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	pw := string(pk.Connect.Password)
	h.passwords = append(h.passwords, pw)
	return cl.ID == "edgegate-"+polGateway && string(pk.Connect.Username) == polClientID && h.accept[pw]
}

func (h *polAuthHook) OnACLCheck(cl *mochi.Client, topic string, write bool) bool {
	// The gateway may only read its own topic.
	return cl.ID == mochi.InlineClientId || (!write && topic == PushTopic(polGateway))
}

func (h *polAuthHook) offered() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]string(nil), h.passwords...)
}

func newPolBroker(t *testing.T, e *polEnv, accept ...string) *polBroker {
	t.Helper()
	cert, err := e.ca.IssueServer(time.Now(), "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	srv := mochi.New(&mochi.Options{InlineClient: true, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	hook := &polAuthHook{accept: map[string]bool{}}
	for _, a := range accept {
		hook.accept[a] = true
	}
	if err := srv.AddHook(hook, nil); err != nil {
		t.Fatal(err)
	}
	tcp := listeners.NewTCP(listeners.Config{ID: "central", Address: "127.0.0.1:0",
		TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}})
	if err := srv.AddListener(tcp); err != nil {
		t.Fatal(err)
	}
	if err := srv.Serve(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	return &polBroker{srv: srv, tcp: tcp, hook: hook}
}

func (b *polBroker) url() string { return "tls://" + b.tcp.Address() }

func (e *polEnv) pushSyncer(b *polBroker) *Syncer {
	return e.syncer(func(o *Options) {
		o.MQTTURL = b.url()
		o.MQTTUsername = polClientID
		o.MQTTTLS = &tls.Config{RootCAs: e.ca.Pool(), MinVersion: tls.VersionTLS12}
	})
}

func waitPushConnected(t *testing.T, s *Syncer) {
	t.Helper()
	testkit.Eventually(t, 10*time.Second, "push channel connected", func() bool { return s.Status().PushConnected })
}

func TestPushBundleAppliedWithinSeconds(t *testing.T) {
	e := newPolEnv(t)
	e.central.setBundle(e.ops.sign(t, polDoc(1, time.Now())))
	b := newPolBroker(t, e, polToken)
	s := e.pushSyncer(b)
	e.run(s)
	waitPushConnected(t, s)
	testkit.Eventually(t, 5*time.Second, "version 1 from the poll", func() bool { return e.engine.Current().Version == 1 })

	bundle := e.ops.sign(t, polDoc(2, time.Now()))
	start := time.Now()
	if err := b.srv.Publish(PushTopic(polGateway), bundle, false, 1); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, 5*time.Second, "pushed version 2 in force", func() bool { return e.engine.Current().Version == 2 })
	t.Logf("pushed bundle in force after %s", time.Since(start))
	if e.engine.Current().Digest != Digest(bundle) {
		t.Fatal("digest in force is not the pushed bundle's")
	}
	testkit.Eventually(t, 5*time.Second, "receipt for version 2", func() bool {
		for _, r := range e.central.receiptBodies() {
			if checkReceipt(t, e, r).PolicyVersion == 2 {
				return true
			}
		}
		return false
	})
	// A pushed forgery is refused and counted; the policy stays.
	before := e.refused(ReasonBadSignature)
	forgedBundle := forged(map[string]any{"alg": "none", "kid": e.ops.ecKid}, []byte(`{"v":1,"version":99}`), nil)
	if err := b.srv.Publish(PushTopic(polGateway), forgedBundle, false, 1); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, 5*time.Second, "pushed forgery refused", func() bool { return e.refused(ReasonBadSignature) == before+1 })
	if lr := s.Status().LastRefusal; lr == nil || lr.Via != "push" || e.engine.Current().Version != 2 {
		t.Fatalf("after forgery: refusal %+v, version %d", lr, e.engine.Current().Version)
	}
	if offered := b.hook.offered(); len(offered) == 0 || offered[0] != polToken {
		t.Fatalf("passwords offered = %d, want the access token", len(offered))
	}
}

func TestPushNudgeTriggersFetch(t *testing.T) {
	e := newPolEnv(t)
	e.central.setBundle(e.ops.sign(t, polDoc(1, time.Now())))
	b := newPolBroker(t, e, polToken)
	s := e.pushSyncer(b)
	e.run(s)
	waitPushConnected(t, s)
	// The first poll at start, and one on connecting (to catch up).
	testkit.Eventually(t, 5*time.Second, "two polls", func() bool { return e.central.gets.Load() >= 2 })
	n := e.central.gets.Load()
	e.central.setBundle(e.ops.sign(t, polDoc(3, time.Now())))
	if err := b.srv.Publish(PushTopic(polGateway), []byte(`{"type":"sync"}`), false, 1); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, 5*time.Second, "version 3 after the nudge", func() bool { return e.engine.Current().Version == 3 })
	if got := e.central.gets.Load(); got != n+1 {
		t.Fatalf("GETs after nudge = %d, want %d", got, n+1)
	}
}

func TestPushReconnectsWithFreshToken(t *testing.T) {
	e := newPolEnv(t)
	b := newPolBroker(t, e, polToken, polOtherToken)
	s := e.pushSyncer(b)
	e.run(s)
	waitPushConnected(t, s)
	// The token expires (the source now hands out a new one) and the
	// broker drops the session.
	e.tokens.set(polOtherToken)
	cl, ok := b.srv.Clients.Get("edgegate-" + polGateway)
	if !ok {
		t.Fatal("gateway not connected at the broker")
	}
	cl.Stop(errors.New("session expired"))
	testkit.Eventually(t, 10*time.Second, "reconnect with the new token", func() bool {
		o := b.hook.offered()
		return len(o) >= 2 && o[len(o)-1] == polOtherToken && s.Status().PushConnected
	})
}

func TestPushRefusedCredentialsInvalidateToken(t *testing.T) {
	e := newPolEnv(t)
	b := newPolBroker(t, e, polOtherToken) // the first token is no longer accepted
	s := e.pushSyncer(b)
	e.run(s)
	waitPushConnected(t, s)
	o := b.hook.offered()
	if len(o) < 2 || o[0] != polToken || o[len(o)-1] != polOtherToken {
		t.Fatalf("passwords offered: %d, first stale, last fresh expected", len(o))
	}
	e.tokens.mu.Lock()
	inv := append([]string(nil), e.tokens.invalidated...)
	e.tokens.mu.Unlock()
	if len(inv) == 0 || inv[0] != polToken {
		t.Fatalf("invalidated %d tokens, want the refused one", len(inv))
	}
}

// After Run returns, none of the syncer's goroutines (poll loop, push
// session, paho handlers it owns, receipt loop) is left.
func TestRunLeavesNoGoroutines(t *testing.T) {
	e := newPolEnv(t)
	e.central.setBundle(e.ops.sign(t, polDoc(1, time.Now())))
	b := newPolBroker(t, e, polToken)
	s := e.pushSyncer(b)
	stop := e.run(s)
	waitPushConnected(t, s)
	testkit.Eventually(t, 5*time.Second, "a receipt", func() bool { return len(e.central.receiptBodies()) == 1 })
	stop()
	testkit.Eventually(t, 5*time.Second, "syncer and paho goroutines gone", func() bool {
		buf := make([]byte, 1<<20)
		stacks := string(buf[:runtime.Stack(buf, true)])
		return !strings.Contains(stacks, "centralsync.(*Syncer)") && !strings.Contains(stacks, "paho%2emqtt%2egolang") &&
			!strings.Contains(stacks, "eclipse/paho.mqtt.golang.(*client)")
	})
	if s.Status().PushConnected {
		t.Fatal("status still says connected")
	}
}
