package mqtt

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	dto "github.com/prometheus/client_model/go"

	"github.com/edgegate/edgegate/internal/mosquittotest"

	"github.com/edgegate/edgegate/internal/envelope"
	"github.com/edgegate/edgegate/internal/metrics"
	"github.com/edgegate/edgegate/policy"
)

type dynsecEnv struct {
	m       *mosquittotest.Broker
	metrics *metrics.Metrics
	engine  *policy.Engine
	dyn     *Dynsec
	rec     *recorder
	devs    map[string]policy.Registration
	logs    *syncBuf
	client  *Client // the gateway's ingest client
}

// newDynsecEnv: a real Mosquitto with the dynamic-security plugin whose
// only account is the gateway's (a dynsec admin); the gateway manages the
// device accounts from a policy where alice owns a1 and a2, bob owns b1,
// and ingests through its own account.
func newDynsecEnv(t *testing.T) *dynsecEnv {
	return newDynsecEnvIngest(t, "", "")
}

// newDynsecEnvIngest: with ingestUser set, the gateway ingests through
// that account (created by the broker's administrator, without roles)
// instead of the dynsec administrator's.
func newDynsecEnvIngest(t *testing.T, ingestUser, ingestPW string) *dynsecEnv {
	t.Helper()
	return newDynsecEnvWith(t, ingestUser, ingestPW, nil)
}

// newDynsecEnvWith: newDynsecEnvIngest with the manager's options tuned.
func newDynsecEnvWith(t *testing.T, ingestUser, ingestPW string, tune func(*DynsecOptions)) *dynsecEnv {
	t.Helper()
	const admin = "edgegate"
	mq := mosquittotest.Start(t, admin)
	if ingestUser == "" {
		ingestUser, ingestPW = admin, mosquittotest.AdminPassword
	} else {
		host, port, _ := strings.Cut(mq.Addr, ":")
		if out, err := exec.Command("mosquitto_ctrl", "-h", host, "-p", port, "-u", admin, "-P", mosquittotest.AdminPassword,
			"dynsec", "createClient", ingestUser, "-p", ingestPW).CombinedOutput(); err != nil {
			t.Fatalf("mosquitto_ctrl createClient: %v %s", err, out)
		}
	}
	devs := map[string]policy.Registration{}
	var regs []policy.Registration
	for _, r := range []policy.Registration{reg("a1", "alice"), reg("a2", "alice"), reg("b1", "bob")} {
		devs[r.ID] = r
		regs = append(regs, r)
	}
	p, err := policy.Compile(policy.Document{Format: 1, Version: 1, IssuedAt: time.Now(), Devices: regs}, "test", "")
	if err != nil {
		t.Fatal(err)
	}
	engine := policy.NewEngine(p)
	topic, _ := ParseTopic("devices/{device}/telemetry")
	logs := &syncBuf{}
	m := metrics.New()
	opts := DynsecOptions{Metrics: m, URL: mq.URL, Username: admin, Password: mosquittotest.AdminPassword, Topic: topic,
		Policy: engine, IngestUser: ingestUser, Timeout: 5 * time.Second, Logger: slog.New(slog.NewTextHandler(logs, nil))}
	if tune != nil {
		tune(&opts)
	}
	dyn := NewDynsec(opts)
	engine.OnChange(func(policy.Change) { dyn.Nudge() })
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- dyn.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		<-done
		if s := logs.String(); strings.Contains(s, "k1-canary") || strings.Contains(s, "k2-canary") || strings.Contains(s, mosquittotest.AdminPassword) {
			t.Error("a key or password reached the log")
		}
		for id, r := range devs {
			pw, _ := envelope.DeriveMQTTPassword(id, r.K1, r.K2)
			if strings.Contains(logs.String(), pw) {
				t.Errorf("the MQTT password of %s reached the log", id)
			}
		}
	})
	select {
	case <-dyn.Synced():
	case <-time.After(20 * time.Second):
		b, _ := os.ReadFile(mq.LogFile)
		t.Fatalf("accounts never synced: %s\n%s\n%s", dyn.LastError(), logs.String(), b)
	}
	rec := &recorder{}
	cl := runClient(t, rec, ClientOptions{URL: mq.URL, ClientID: "edgegate-ingest", Username: ingestUser, Password: ingestPW, Topic: topic})
	return &dynsecEnv{m: mq, metrics: m, engine: engine, dyn: dyn, rec: rec, devs: devs, logs: logs, client: cl}
}

func (e *dynsecEnv) password(id string) string {
	r := e.devs[id]
	pw, _ := envelope.DeriveMQTTPassword(id, r.K1, r.K2)
	return pw
}

func (e *dynsecEnv) dial(user, pw string) (paho.Client, error) {
	o := paho.NewClientOptions().AddBroker(e.m.URL).SetClientID(fmt.Sprintf("%s-%d", user, time.Now().UnixNano())).
		SetUsername(user).SetPassword(pw).SetAutoReconnect(false).SetConnectTimeout(5 * time.Second)
	cl := paho.NewClient(o)
	if err := waitToken(cl.Connect(), 10*time.Second); err != nil {
		return nil, err
	}
	return cl, nil
}

func (e *dynsecEnv) got(device, payload string) bool {
	e.rec.mu.Lock()
	defer e.rec.mu.Unlock()
	for _, p := range e.rec.got[device] {
		if p == payload {
			return true
		}
	}
	return false
}

// send publishes at QoS 1 and waits for the broker's PUBACK (Mosquitto
// acknowledges a publish it refuses by ACL too, as MQTT 3.1.1 has no way
// to say no; it just does not forward it).
func send(t *testing.T, c paho.Client, device, payload string) {
	t.Helper()
	if err := waitToken(c.Publish("devices/"+device+"/telemetry", 1, false, payload), 5*time.Second); err != nil {
		t.Fatalf("publish to %s: %v", device, err)
	}
}

// TestMosquittoDynsecAccounts: against a real Mosquitto, the accounts the
// gateway keeps let a device publish its own readings only, never another
// device's, never subscribe; a revoked device is disconnected at once and
// can neither log in nor publish again.
func TestMosquittoDynsecAccounts(t *testing.T) {
	e := newDynsecEnv(t)
	a1, err := e.dial("a1", e.password("a1"))
	if err != nil {
		t.Fatalf("a1 with its derived password: %v", err)
	}
	defer a1.Disconnect(0)
	b1, err := e.dial("b1", e.password("b1"))
	if err != nil {
		t.Fatalf("b1: %v", err)
	}
	defer b1.Disconnect(0)
	if _, err := e.dial("a1", e.password("b1")); err == nil {
		t.Fatal("a1 logged in with another device's password")
	}
	if _, err := e.dial("nobody", "x"); err == nil {
		t.Fatal("an unknown account logged in")
	}

	send(t, a1, "a1", "a1-own")
	// The attack: a1 publishes on b1's topic. b1's own reading after it
	// arrives; the forged one (sent first, on the same broker) never does.
	send(t, a1, "b1", "forged-by-a1")
	send(t, b1, "b1", "b1-own")
	eventually(t, "a1's and b1's own readings ingested", func() bool { return e.got("a1", "a1-own") && e.got("b1", "b1-own") })
	if e.got("b1", "forged-by-a1") {
		t.Fatal("a1's publish on b1's topic reached the gateway")
	}
	// A device may not read other devices' readings.
	tok := a1.Subscribe("devices/+/telemetry", 1, func(paho.Client, paho.Message) {})
	if err := waitToken(tok, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if rc := tok.(*paho.SubscribeToken).Result()["devices/+/telemetry"]; rc != 0x80 {
		t.Fatalf("a1's subscription to every device: granted %#x, want refused (0x80)", rc)
	}

	// Revocation: b1 leaves the policy.
	lost := make(chan struct{})
	var once sync.Once
	b1.Disconnect(0)
	o := paho.NewClientOptions().AddBroker(e.m.URL).SetClientID("b1-live").SetUsername("b1").SetPassword(e.password("b1")).
		SetAutoReconnect(false).SetConnectionLostHandler(func(paho.Client, error) { once.Do(func() { close(lost) }) })
	b1 = paho.NewClient(o)
	if err := waitToken(b1.Connect(), 5*time.Second); err != nil {
		t.Fatal(err)
	}
	next := e.engine.Current().Document()
	next.Version++
	next.Devices = []policy.Registration{e.devs["a1"], e.devs["a2"]}
	p, err := policy.Compile(next, "test", "")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.engine.Apply(p, false); err != nil {
		t.Fatal(err)
	}
	select {
	case <-lost:
	case <-time.After(10 * time.Second):
		t.Fatal("the revoked device's session was not closed")
	}
	if _, err := e.dial("b1", e.password("b1")); err == nil {
		t.Fatal("a revoked device logged in again")
	}
	deletions := func() float64 {
		var dm dto.Metric
		_ = e.metrics.MQTTAccountChanges.WithLabelValues("delete").Write(&dm)
		return dm.GetCounter().GetValue()
	}
	// The account and the role of b1.
	eventually(t, "two deletions counted", func() bool { return deletions() == 2 })
	// a1 still works.
	send(t, a1, "a1", "a1-after")
	eventually(t, "a1's reading after b1's revocation", func() bool { return e.got("a1", "a1-after") })

	// a2's keys change (re-registered): its old password stops working and
	// its session is closed; the new one logs in.
	a2, err := e.dial("a2", e.password("a2"))
	if err != nil {
		t.Fatal(err)
	}
	oldPW := e.password("a2")
	r := e.devs["a2"]
	r.K1, r.K2 = "k1-canary-a2-new", "k2-canary-a2-new"
	e.devs["a2"] = r
	next = e.engine.Current().Document()
	next.Version++
	next.Devices = []policy.Registration{e.devs["a1"], r}
	if p, err = policy.Compile(next, "test", ""); err != nil {
		t.Fatal(err)
	}
	if _, err := e.engine.Apply(p, false); err != nil {
		t.Fatal(err)
	}
	eventually(t, "a2's session closed after its keys changed", func() bool { return !a2.IsConnectionOpen() })
	if _, err := e.dial("a2", oldPW); err == nil {
		t.Fatal("a2 logged in with the password of its old keys")
	}
	a2n, err := e.dial("a2", e.password("a2"))
	if err != nil {
		t.Fatalf("a2 with its new keys: %v", err)
	}
	a2n.Disconnect(0)
}

// TestMosquittoDynsecDoctorDrift: an administrator widens a device's role
// by hand; Check (what doctor shows) names the drift, the next
// reconciliation removes it, and Check is clean again.
func TestMosquittoDynsecDoctorDrift(t *testing.T) {
	e := newDynsecEnv(t)
	ctx := context.Background()
	if issues, err := e.dyn.Check(ctx); err != nil || len(issues) != 0 {
		t.Fatalf("Check after sync = %q, %v; want none", issues, err)
	}
	host, port, _ := strings.Cut(e.m.Addr, ":")
	ctrl := func(args ...string) {
		t.Helper()
		base := []string{"-h", host, "-p", port, "-u", "edgegate", "-P", mosquittotest.AdminPassword, "dynsec"}
		if out, err := exec.Command("mosquitto_ctrl", append(base, args...)...).CombinedOutput(); err != nil {
			t.Fatalf("mosquitto_ctrl %v: %v %s", args, err, out)
		}
	}
	ctrl("addRoleACL", "edgegate-dev-a2", "publishClientSend", "devices/b1/telemetry", "allow", "20")
	ctrl("createClient", "stray", "-p", "stray-pw")
	issues, err := e.dyn.Check(ctx)
	if err != nil {
		t.Fatal(err)
	}
	text := strings.Join(issues, "\n")
	for _, want := range []string{"device a2: role edgegate-dev-a2 has other ACLs"} {
		if !strings.Contains(text, want) {
			t.Errorf("Check = %q, want it to name %q", issues, want)
		}
	}
	// The drift is real: a2 may now publish as b1.
	a2, err := e.dial("a2", e.password("a2"))
	if err != nil {
		t.Fatal(err)
	}
	defer a2.Disconnect(0)
	send(t, a2, "b1", "a2-as-b1-while-drifted")
	eventually(t, "the drifted ACL lets a2 publish as b1", func() bool { return e.got("b1", "a2-as-b1-while-drifted") })

	if _, err := e.dyn.Reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	if issues, err := e.dyn.Check(ctx); err != nil || len(issues) != 0 {
		t.Fatalf("Check after repair = %q, %v; want none", issues, err)
	}
	a2b, err := e.dial("a2", e.password("a2"))
	if err != nil {
		t.Fatal(err)
	}
	defer a2b.Disconnect(0)
	send(t, a2b, "b1", "a2-as-b1-after-repair")
	send(t, a2b, "a2", "a2-own-after-repair")
	eventually(t, "a2's own reading", func() bool { return e.got("a2", "a2-own-after-repair") })
	if e.got("b1", "a2-as-b1-after-repair") {
		t.Fatal("after the repair a2 still publishes as b1")
	}

	// An account the administrator gave rights in the device namespace is
	// named (and left alone: the role is the administrator's).
	ctrl("createRole", "legacy")
	ctrl("addRoleACL", "legacy", "publishClientSend", "devices/+/telemetry", "allow")
	ctrl("addClientRole", "stray", "legacy")
	issues, err = e.dyn.Check(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(issues) != 1 || !strings.Contains(issues[0], "role legacy (not the gateway's) lets stray publish readings as devices on devices/+/telemetry") {
		t.Fatalf("Check = %q, want the foreign grant to stray", issues)
	}
	// A grant on the command topics is named too.
	ctrl("addRoleACL", "legacy", "subscribePattern", "devices/+/cmd/#", "allow")
	issues, err = e.dyn.Check(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(issues) != 2 || !slices.ContainsFunc(issues, func(s string) bool {
		return strings.Contains(s, "role legacy (not the gateway's) lets stray read devices' commands on devices/+/cmd/#")
	}) {
		t.Fatalf("Check = %q, want the command grant to stray named", issues)
	}
}

// TestMosquittoDynsecSeparateIngest: an ingest account that is not the
// dynsec administrator is given the role to read every device's topic.
func TestMosquittoDynsecSeparateIngest(t *testing.T) {
	e := newDynsecEnvIngest(t, "ingest", "ingest-pw")
	a1, err := e.dial("a1", e.password("a1"))
	if err != nil {
		t.Fatal(err)
	}
	defer a1.Disconnect(0)
	send(t, a1, "a1", "via-ingest-account")
	eventually(t, "a1's reading through the ingest account", func() bool { return e.got("a1", "via-ingest-account") })
	if issues, err := e.dyn.Check(context.Background()); err != nil || len(issues) != 0 {
		t.Fatalf("Check = %q, %v; want none", issues, err)
	}
}

// TestMosquittoDynsecManyDevices: a first sync of many devices (several
// batches) leaves every account in line, and the last one can log in.
func TestMosquittoDynsecManyDevices(t *testing.T) {
	mq := mosquittotest.Start(t, "edgegate")
	var regs []policy.Registration
	for i := range 150 {
		regs = append(regs, reg(fmt.Sprintf("m%03d", i), "alice"))
	}
	p, err := policy.Compile(policy.Document{Format: 1, Version: 1, IssuedAt: time.Now(), Devices: regs}, "test", "")
	if err != nil {
		t.Fatal(err)
	}
	topic, _ := ParseTopic("devices/{device}/telemetry")
	m := metrics.New()
	dyn := NewDynsec(DynsecOptions{URL: mq.URL, Username: "edgegate", Password: mosquittotest.AdminPassword, Topic: topic,
		Policy: policy.NewEngine(p), IngestUser: "edgegate", Timeout: 10 * time.Second, Metrics: m})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- dyn.Run(ctx) }()
	defer func() { cancel(); <-done }()
	select {
	case <-dyn.Synced():
	case <-time.After(30 * time.Second):
		t.Fatalf("never synced: %s", dyn.LastError())
	}
	if issues, err := dyn.Check(context.Background()); err != nil || len(issues) != 0 {
		t.Fatalf("Check = %d issues %v, want none", len(issues), err)
	}
	var dm dto.Metric
	_ = m.MQTTAccountChanges.WithLabelValues("create").Write(&dm)
	if got := dm.GetCounter().GetValue(); got != 2*150+1 { // account and role per device, the ingest role
		t.Errorf("creations counted = %v, want %d", got, 2*150+1)
	}
	e := &dynsecEnv{m: mq, devs: map[string]policy.Registration{"m149": regs[149]}}
	c, err := e.dial("m149", e.password("m149"))
	if err != nil {
		t.Fatalf("the last device: %v", err)
	}
	c.Disconnect(0)
}

// TestMosquittoDynsecNotAdmin: an account that is not a dynsec
// administrator never counts as synced, and the error says why.
func TestMosquittoDynsecNotAdmin(t *testing.T) {
	mq := mosquittotest.Start(t, "edgegate")
	host, port, _ := strings.Cut(mq.Addr, ":")
	if out, err := exec.Command("mosquitto_ctrl", "-h", host, "-p", port, "-u", "edgegate", "-P", mosquittotest.AdminPassword,
		"dynsec", "createClient", "plain", "-p", "plain-pw").CombinedOutput(); err != nil {
		t.Fatalf("mosquitto_ctrl createClient: %v %s", err, out)
	}
	p, _ := policy.Compile(policy.Document{Format: 1, Version: 1, IssuedAt: time.Now(), Devices: []policy.Registration{reg("a1", "alice")}}, "test", "")
	topic, _ := ParseTopic("devices/{device}/telemetry")
	dyn := NewDynsec(DynsecOptions{URL: mq.URL, Username: "plain", Password: "plain-pw", Topic: topic,
		Policy: policy.NewEngine(p), Timeout: time.Second})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- dyn.Run(ctx) }()
	defer func() { cancel(); <-done }()
	eventually(t, "the error naming the missing admin rights", func() bool { return strings.Contains(dyn.LastError(), `"plain" a dynsec admin`) })
	select {
	case <-dyn.Synced():
		t.Fatal("synced as a plain account")
	default:
	}
	if strings.Contains(dyn.LastError(), "plain-pw") {
		t.Fatal("the password is in the error")
	}
}

// TestExternalSubscribeRefusedThenGranted: the broker refuses the ingest
// subscription (no read rights yet): the client is not live and does not
// say subscribed; once an administrator grants the rights it subscribes
// by itself, without a restart.
func TestExternalSubscribeRefusedThenGranted(t *testing.T) {
	mq := mosquittotest.Start(t, "edgegate")
	host, port, _ := strings.Cut(mq.Addr, ":")
	ctrl := func(args ...string) {
		t.Helper()
		base := []string{"-h", host, "-p", port, "-u", "edgegate", "-P", mosquittotest.AdminPassword, "dynsec"}
		if out, err := exec.Command("mosquitto_ctrl", append(base, args...)...).CombinedOutput(); err != nil {
			t.Fatalf("mosquitto_ctrl %v: %v %s", args, err, out)
		}
	}
	ctrl("createClient", "ingest", "-p", "ingest-pw")
	topic, _ := ParseTopic("devices/{device}/telemetry")
	c := NewClient(&recorder{}, ClientOptions{URL: mq.URL, ClientID: "edgegate-refused", Username: "ingest", Password: "ingest-pw", Topic: topic})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	defer func() { cancel(); <-done }()
	select {
	case <-c.Subscribed():
		t.Fatal("said subscribed although the broker refused the subscription")
	case <-time.After(1500 * time.Millisecond):
	}
	if c.Live() {
		t.Fatal("live although not subscribed")
	}
	ctrl("createRole", "reader")
	ctrl("addRoleACL", "reader", "subscribePattern", "devices/+/telemetry", "allow")
	ctrl("addClientRole", "ingest", "reader")
	select {
	case <-c.Subscribed():
	case <-time.After(15 * time.Second):
		t.Fatal("did not subscribe once granted")
	}
	eventually(t, "live", c.Live)
}
