package command_test

import (
	"crypto/tls"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/edgegate/edgegate/internal/command"
	"github.com/edgegate/edgegate/internal/mosquittotest"
	"github.com/edgegate/edgegate/internal/pki"
	"github.com/edgegate/edgegate/internal/sim/centralsim"
	"github.com/edgegate/edgegate/internal/testkit"
	"github.com/edgegate/edgegate/internal/uplink"
)

// Learning through Orion subscriptions (subscribe.go), against real
// parts: the simulated filter and Orion over TLS (Orion notifying as 3.12
// does), a real Mosquitto with password authentication as the
// notification broker (Orion publishes with the subscription's user and
// passwd), the real paho client on the gateway's side.

const (
	notifyUser = "gw-notify"
	notifyPass = "gw-notify-secret-pw"
	evilUser   = "mallory-mqtt"
	evilPass   = "mallory-mqtt-pw"
	prefix     = "edgegate/notify"
	// slowPoll is far longer than any test: what arrives within wait came
	// through a notification.
	slowPoll = time.Hour
)

// notifyBroker is a real Mosquitto with two password accounts: the
// gateway's (which Orion also publishes with) and a hostile one.
func notifyBroker(t *testing.T) *mosquittotest.Broker {
	t.Helper()
	pw := filepath.Join(t.TempDir(), "passwd")
	for i, acc := range [][2]string{{notifyUser, notifyPass}, {evilUser, evilPass}} {
		args := []string{"-b", pw, acc[0], acc[1]}
		if i == 0 {
			args = append([]string{"-c"}, args...)
		}
		if out, err := exec.Command("mosquitto_passwd", args...).CombinedOutput(); err != nil {
			t.Fatalf("mosquitto_passwd: %v %s", err, out)
		}
	}
	return mosquittotest.Start(t, "", "allow_anonymous false", "password_file "+pw)
}

// startNotifying replaces the harness's service with one that learns
// through subscriptions on transport, polling every poll.
func (e *env) startNotifying(transport command.NotifyTransport, poll time.Duration, edit func(*command.NotifyOptions)) {
	e.t.Helper()
	e.stop()
	no := &command.NotifyOptions{Transport: transport, Expires: time.Hour, SafetyInterval: time.Hour,
		ReprobeMin: 100 * time.Millisecond, ReprobeMax: 400 * time.Millisecond, HintInterval: 300 * time.Millisecond}
	if edit != nil {
		edit(no)
	}
	svc, err := command.New(command.Options{
		Gateway: gwID, Store: e.q, Policy: e.engine, Tokens: simTokens{sim: e.sim, user: owner},
		HTTPClient: uplink.NewHTTPClient(e.sim.CAPool(), 5*time.Second, 2), Submit: e.pipe,
		Route:  e.routeOf,
		Logger: slog.New(slog.NewTextHandler(e.bus, nil)),
		TTL:    e.ttl, PollInterval: poll, MinBackoff: 50 * time.Millisecond, MaxBackoff: 300 * time.Millisecond,
		Notify: no,
	})
	e.runService(svc, err)
}

func mqttTransport(b *mosquittotest.Broker) *command.MQTTNotify {
	return &command.MQTTNotify{URL: b.URL, TopicPrefix: prefix, Username: notifyUser, Password: notifyPass, ClientID: "gw-notify-test"}
}

// ownedCommandable are the harness's commandable devices the account may
// read (bob's valve is refused by the filter).
var ownedCommandable = []string{coilID, light2, lightID, relayID}

func (e *env) subsFor(device string) []centralsim.Subscription {
	var out []centralsim.Subscription
	for _, s := range e.sim.Subscriptions() {
		if slices.Contains(s.Entities, device) {
			out = append(out, s)
		}
	}
	return out
}

// listen is a paho client on the notification broker recording what
// arrives on the prefix.
type listener struct {
	mu  sync.Mutex
	got [][]byte
}

func listen(t *testing.T, b *mosquittotest.Broker, user, pass string) (*listener, paho.Client) {
	t.Helper()
	l := &listener{}
	o := paho.NewClientOptions().AddBroker(b.URL).SetClientID(user + "-listen").SetUsername(user).SetPassword(pass).
		SetAutoReconnect(false).SetConnectTimeout(5 * time.Second)
	c := paho.NewClient(o)
	if tok := c.Connect(); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("connect %s: %v", user, tok.Error())
	}
	t.Cleanup(func() { c.Disconnect(100) })
	tok := c.Subscribe(prefix+"/#", 1, func(_ paho.Client, m paho.Message) {
		l.mu.Lock()
		l.got = append(l.got, append([]byte(nil), m.Payload()...))
		l.mu.Unlock()
	})
	if !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe: %v", tok.Error())
	}
	return l, c
}

func (l *listener) messages() [][]byte {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.got)
}

// An owner's PATCH reaches the device through a notification, long before
// the (hour-long) poll interval; the subscription is the gateway's own,
// made through the filter; the notification carries no attribute value;
// bob's valve, which the account may not read, is refused by the filter
// and stays on polling.
func TestSubscriptionNotifiesMQTT(t *testing.T) {
	e := newEnv(t, time.Minute)
	b := notifyBroker(t)
	tr := mqttTransport(b)
	watch, _ := listen(t, b, evilUser, evilPass)
	e.startNotifying(tr, slowPoll, func(o *command.NotifyOptions) { o.HintInterval = 10 * time.Millisecond })

	testkit.Eventually(t, wait, "a live subscription for each owned actuator", func() bool {
		l := e.svc.Learning()
		return l.Live == len(ownedCommandable) && l.Devices == len(ownedCommandable)+1 && e.svc.Stats().ProbeRefused > 0
	})
	l := e.svc.Learning()
	if !strings.Contains(l.Why, "refused (401)") || !strings.Contains(l.String(), "subscription (mqtt) live for 4 of 5 devices") {
		t.Errorf("Learning = %q (why %q), want 4 of 5 live and bob's valve refused by the filter", l.String(), l.Why)
	}
	if st := e.svc.Stats(); st.ProbeRefused == 0 || st.Subscribed != uint64(len(ownedCommandable)) {
		t.Errorf("stats = %+v, want the valve's probe refused and 4 subscriptions made", st)
	}
	if subs := e.subsFor(bobsID); len(subs) != 0 {
		t.Errorf("a subscription exists for bob's valve: %+v", subs)
	}
	for _, id := range ownedCommandable {
		subs := e.subsFor(id)
		if len(subs) != 1 {
			t.Fatalf("subscriptions of %s = %+v, want one", id, subs)
		}
		s := subs[0]
		if s.MQTTUser != notifyUser || s.MQTTTopic != prefix+"/"+id || s.MQTTURL != "mqtt://"+b.Addr || s.Status != "active" ||
			!slices.Equal(s.NotifyAttrs, []string{"edgegateHintOnly"}) || time.Until(s.Expires) < 50*time.Minute {
			t.Errorf("subscription of %s = %+v", id, s)
		}
	}
	// The coil declares its writable attribute: the condition names it.
	if s := e.subsFor(coilID)[0]; !slices.Equal(s.CondAttrs, []string{"on"}) {
		t.Errorf("coil's condition attrs = %q, want [on]", s.CondAttrs)
	}

	// Ten writes, each learned through its notification: the time from
	// the PATCH's answer to the command being held.
	var lat []time.Duration
	for i := range 10 {
		v := fmt.Sprintf(`"level-%d"`, i)
		start := time.Now()
		e.write(owner, lightID, `{"power":{"value":`+v+`,"type":"Text"}}`)
		testkit.Eventually(t, wait, "the command learned through the notification", func() bool {
			return string(e.command(lightID, "power").Value) == v
		})
		lat = append(lat, time.Since(start))
	}
	slices.Sort(lat)
	t.Logf("PATCH at the filter to command learned, 10 writes: median %v, max %v (poll interval %v)",
		lat[5].Round(time.Millisecond), lat[9].Round(time.Millisecond), slowPoll)
	if st := e.svc.Stats(); st.Notifications == 0 || st.Hints == 0 {
		t.Errorf("stats = %+v, want a notification and the read it caused", st)
	}
	// What travelled through the notification broker: id and type only.
	testkit.Eventually(t, wait, "the notification seen on the broker", func() bool { return len(watch.messages()) > 0 })
	for _, m := range watch.messages() {
		var n struct {
			SubscriptionID string           `json:"subscriptionId"`
			Data           []map[string]any `json:"data"`
		}
		if err := json.Unmarshal(m, &n); err != nil || n.SubscriptionID == "" || len(n.Data) != 1 {
			t.Fatalf("notification %s: %v", m, err)
		}
		for k := range n.Data[0] {
			if k != "id" && k != "type" {
				t.Errorf("the notification carries %q: %s", k, m)
			}
		}
	}
	// The broker's password is never logged.
	if strings.Contains(e.bus.String(), notifyPass) {
		t.Error("the notification broker's password is in the log")
	}
}

// A platform that does not offer subscriptions (the 501 of a deploy
// without them): commands are still learned by polling, the status says
// why, and once the platform offers them the gateway subscribes.
func TestSubscriptionRefusedFallsBackToPolling(t *testing.T) {
	e := newEnv(t, time.Minute)
	b := notifyBroker(t)
	e.sim.SetNoSubscriptions(true)
	e.startNotifying(mqttTransport(b), 200*time.Millisecond, nil)

	testkit.Eventually(t, wait, "the probes refused", func() bool { return e.svc.Stats().ProbeRefused >= uint64(len(ownedCommandable)) })
	if l := e.svc.Learning(); l.Live != 0 || !strings.Contains(l.Why, "refused (501)") {
		t.Errorf("Learning = %q, want none live and the 501 as the reason", l.String())
	}
	e.write(owner, lightID, `{"power":{"value":"off","type":"Text"}}`)
	testkit.Eventually(t, wait, "the command learned by polling", func() bool {
		return string(e.command(lightID, "power").Value) == `"off"`
	})
	if st := e.svc.Stats(); st.Notifications != 0 {
		t.Errorf("notifications without a subscription: %+v", st)
	}
	// Re-probed after the backoff once the platform offers them.
	e.sim.SetNoSubscriptions(false)
	testkit.Eventually(t, wait, "subscriptions once the platform offers them", func() bool {
		return e.svc.Learning().Live == len(ownedCommandable)
	})
}

// A notification published by someone else on the gateway's topics never
// becomes a command: the gateway reads the entity through the filter and
// learns only what the platform shows, and a flood of them causes only a
// few rate-limited reads.
func TestForgedNotificationNeverCommands(t *testing.T) {
	e := newEnv(t, time.Minute)
	b := notifyBroker(t)
	e.startNotifying(mqttTransport(b), slowPoll, func(o *command.NotifyOptions) { o.HintInterval = 500 * time.Millisecond })
	testkit.Eventually(t, wait, "live subscriptions", func() bool { return e.svc.Learning().Live == len(ownedCommandable) })
	// Reads caused by the connection's resync are over before the flood.
	testkit.Eventually(t, wait, "the resync reads done", func() bool { return e.svc.Stats().Hints >= uint64(len(ownedCommandable)+1) })
	before := e.svc.Stats()

	_, evil := listen(t, b, evilUser, evilPass)
	forged := `{"subscriptionId":"000000000000000000000000","data":[{"id":"light-1","type":"Light","power":{"type":"Text","value":"on","metadata":{}}}]}`
	start := time.Now()
	for i := 0; i < 200; i++ {
		evil.Publish(prefix+"/"+lightID, 1, false, forged).WaitTimeout(2 * time.Second)
	}
	evil.Publish(prefix+"/"+lightID, 1, false, "not json").WaitTimeout(2 * time.Second)
	evil.Publish(prefix+"/"+lightID, 1, false, `{"data":[{"id":"no-such-device"}]}`).WaitTimeout(2 * time.Second)
	testkit.Eventually(t, wait, "the forged notifications taken in", func() bool {
		return e.svc.Stats().Notifications-before.Notifications >= 202
	})
	testkit.Eventually(t, wait, "the hinted read", func() bool { return e.svc.Stats().Hints > before.Hints })
	elapsed := time.Since(start)
	st := e.svc.Stats()
	if c := e.command(lightID, "power"); c.Seq != 0 {
		t.Fatalf("a forged notification became a command: %+v", c)
	}
	if st.NotifyIgnored-before.NotifyIgnored < 2 {
		t.Errorf("ignored notifications = %d, want the unparsable and the unknown device counted", st.NotifyIgnored-before.NotifyIgnored)
	}
	// At most one read per HintInterval (500ms) for the one device named.
	if reads, most := st.Hints-before.Hints, uint64(elapsed/(500*time.Millisecond))+2; reads > most {
		t.Errorf("%d reads for 200 forged notifications in %v, want at most %d", reads, elapsed, most)
	}
}

// A subscription is renewed before it expires (a new one, then the old one
// deleted: the filter routes no PATCH of a subscription), and commands
// keep arriving through the renewed one.
func TestSubscriptionRenewed(t *testing.T) {
	e := newEnv(t, time.Minute)
	b := notifyBroker(t)
	e.startNotifying(mqttTransport(b), slowPoll, func(o *command.NotifyOptions) { o.Expires = 4 * time.Second })
	testkit.Eventually(t, wait, "a live subscription of the light", func() bool { return len(e.subsFor(lightID)) == 1 })
	first := e.subsFor(lightID)[0]
	testkit.Eventually(t, wait, "the subscription renewed", func() bool {
		s := e.subsFor(lightID)
		return len(s) == 1 && s[0].ID != first.ID
	})
	if s := e.subsFor(lightID)[0]; !s.Expires.After(first.Expires) || s.Status != "active" {
		t.Errorf("renewed subscription = %+v, first %+v", s, first)
	}
	// Past the first one's expiry: only the renewed one can notify.
	testkit.Eventually(t, wait, "the first subscription's expiry passed", func() bool { return time.Now().After(first.Expires) })
	e.write(owner, lightID, `{"power":{"value":"dim","type":"Text"}}`)
	testkit.Eventually(t, wait, "the command learned through the renewed subscription", func() bool {
		return string(e.command(lightID, "power").Value) == `"dim"`
	})
}

// A device that leaves the policy has its subscription deleted; a clean
// stop deletes the rest.
func TestSubscriptionDeletedOnRevocationAndStop(t *testing.T) {
	e := newEnv(t, time.Minute)
	b := notifyBroker(t)
	e.startNotifying(mqttTransport(b), slowPoll, nil)
	testkit.Eventually(t, wait, "live subscriptions", func() bool { return e.svc.Learning().Live == len(ownedCommandable) })

	pol := e.policyWithout(t, light2)
	ch, err := e.engine.Apply(pol, true)
	if err != nil || !slices.Contains(ch.Revoked, light2) {
		t.Fatalf("Apply = %+v, %v", ch, err)
	}
	e.svc.Resubscribe() // as the daemon does on every policy change
	testkit.Eventually(t, wait, "the revoked device's subscription deleted", func() bool {
		return len(e.subsFor(light2)) == 0 && e.svc.Stats().Unsubscribed == 1
	})
	if n := len(e.sim.Subscriptions()); n != len(ownedCommandable)-1 {
		t.Errorf("%d subscriptions left, want %d", n, len(ownedCommandable)-1)
	}
	e.stop()
	if subs := e.sim.Subscriptions(); len(subs) != 0 {
		t.Errorf("subscriptions left after a clean stop: %+v", subs)
	}
	if st := e.svc.Stats(); st.Unsubscribed != uint64(len(ownedCommandable)) {
		t.Errorf("unsubscribed = %d, want %d", st.Unsubscribed, len(ownedCommandable))
	}
}

// HTTP notifications: Orion posts to the gateway's HTTPS endpoint
// (verifying its certificate); the command arrives through it.
func TestSubscriptionNotifiesHTTP(t *testing.T) {
	e := newEnv(t, time.Minute)
	ca, err := pki.NewCA("notify test CA", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	cert, err := ca.IssueServer(time.Now(), "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	e.sim.SetNotifyHTTPClient(&http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: ca.Pool()}}})
	// The listener's port is known only once it listens: Orion is told
	// the URL after, so listen first on a fixed free port.
	port := mosquittotest.FreePort(t)
	addr := "127.0.0.1:" + strconv.Itoa(port)
	tr := &command.HTTPNotify{Listen: addr, PublicURL: "https://" + addr + "/notify", TLS: &tls.Config{Certificates: []tls.Certificate{cert}}}
	e.startNotifying(tr, slowPoll, nil)
	testkit.Eventually(t, wait, "live subscriptions", func() bool { return e.svc.Learning().Live == len(ownedCommandable) })
	if s := e.subsFor(lightID)[0]; s.HTTPURL != "https://"+addr+"/notify" {
		t.Errorf("subscription's http url = %q", s.HTTPURL)
	}
	e.write(owner, lightID, `{"power":{"value":"blink","type":"Text"}}`)
	testkit.Eventually(t, wait, "the command learned through the HTTP notification", func() bool {
		return string(e.command(lightID, "power").Value) == `"blink"`
	})
	// Only POST is taken.
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: ca.Pool()}}}
	resp, err := c.Get("https://" + addr + "/notify")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("GET on the endpoint = %d, want 405", resp.StatusCode)
	}
	// A body over 64 KiB is refused unread.
	before := e.svc.Stats().Notifications
	resp, err = c.Post("https://"+addr+"/notify", "application/json", strings.NewReader(`{"id":"`+strings.Repeat("x", 70<<10)+`"}`))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusRequestEntityTooLarge || e.svc.Stats().Notifications != before {
		t.Errorf("an oversized POST = %d (notifications %d → %d), want 413 and not taken in", resp.StatusCode, before, e.svc.Stats().Notifications)
	}
}

// A failing platform (Orion answering 5xx behind the filter, which makes
// them 500) is a failed probe, not a refusal: tried again after the
// backoff, and live once the platform is back.
func TestSubscriptionFailingPlatformRetried(t *testing.T) {
	e := newEnv(t, time.Minute)
	b := notifyBroker(t)
	e.sim.SetFault(centralsim.Fault{Mode: centralsim.FaultStatus, Target: centralsim.TargetOrion, Status: 503})
	e.startNotifying(mqttTransport(b), 200*time.Millisecond, nil)
	testkit.Eventually(t, wait, "the probes failed", func() bool { return e.svc.Stats().ProbeFailed >= uint64(len(ownedCommandable)) })
	if l := e.svc.Learning(); l.Live != 0 || !strings.Contains(l.Why, "failed (500)") {
		t.Errorf("Learning = %q, want none live, the 500 as the reason", l.String())
	}
	e.sim.ClearFault()
	testkit.Eventually(t, wait, "subscriptions once the platform is back", func() bool {
		return e.svc.Learning().Live == len(ownedCommandable)
	})
	e.write(owner, relayID, `{"status":{"value":true,"type":"Boolean"}}`)
	testkit.Eventually(t, wait, "the relay switched", func() bool { return slices.Contains(e.relaySets(), "1/2=1") })
}

// Subscriptions a previous run could not delete (a crash, or here the
// platform failing the DELETEs at stop) are kept in the store and
// deleted at the next start, so they do not notify until they expire.
func TestSubscriptionLeftoversDeletedAtStart(t *testing.T) {
	e := newEnv(t, time.Minute)
	b := notifyBroker(t)
	e.startNotifying(mqttTransport(b), slowPoll, nil)
	testkit.Eventually(t, wait, "live subscriptions", func() bool { return e.svc.Learning().Live == len(ownedCommandable) })
	var old []string
	for _, s := range e.sim.Subscriptions() {
		old = append(old, s.ID)
	}
	e.sim.SetFault(centralsim.Fault{Mode: centralsim.FaultStatus, Target: centralsim.TargetBroker, Status: 503})
	e.stop()
	if n := len(e.sim.Subscriptions()); n != len(ownedCommandable) {
		t.Fatalf("%d subscriptions after a stop whose DELETEs failed, want %d left", n, len(ownedCommandable))
	}
	e.sim.ClearFault()

	e.startNotifying(mqttTransport(b), slowPoll, nil)
	testkit.Eventually(t, wait, "the leftovers deleted and new subscriptions live", func() bool {
		subs := e.sim.Subscriptions()
		if len(subs) != len(ownedCommandable) || e.svc.Learning().Live != len(ownedCommandable) {
			return false
		}
		for _, s := range subs {
			if slices.Contains(old, s.ID) {
				return false
			}
		}
		return true
	})
}
