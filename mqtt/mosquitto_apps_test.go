package mqtt

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/edgegate/edgegate/policy"
)

// appBook is the test's store of provisioned app accounts.
type appBook struct {
	mu   sync.Mutex
	apps map[string]AppAccount
}

func (b *appBook) list() ([]AppAccount, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := make([]AppAccount, 0, len(b.apps))
	for _, a := range b.apps {
		out = append(out, a)
	}
	return out, nil
}

func (b *appBook) put(a AppAccount) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.apps[a.User] = a
}

func (b *appBook) del(user string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	delete(b.apps, user)
}

// appInbox records what an app subscriber receives, per topic.
type appInbox struct {
	mu  sync.Mutex
	got []string
}

func (i *appInbox) on(_ paho.Client, m paho.Message) {
	i.mu.Lock()
	defer i.mu.Unlock()
	i.got = append(i.got, m.Topic()+" "+string(m.Payload()))
}

func (i *appInbox) has(s string) bool {
	i.mu.Lock()
	defer i.mu.Unlock()
	for _, g := range i.got {
		if g == s {
			return true
		}
	}
	return false
}

// dialApp connects an application as a user would: subscribed to every
// device's readings, resubscribing after a reconnection.
func (e *dynsecEnv) dialApp(t *testing.T, user, pw string, in *appInbox, lost func()) paho.Client {
	t.Helper()
	subscribed := make(chan struct{}, 1)
	o := paho.NewClientOptions().AddBroker(e.m.URL).SetClientID(user + "-app").SetUsername(user).SetPassword(pw).
		SetAutoReconnect(true).SetMaxReconnectInterval(200 * time.Millisecond).SetConnectTimeout(5 * time.Second).
		SetOnConnectHandler(func(c paho.Client) {
			tok := c.Subscribe("devices/+/telemetry", 1, in.on)
			go func() {
				if waitToken(tok, 10*time.Second) == nil {
					select {
					case subscribed <- struct{}{}:
					default:
					}
				}
			}()
		}).
		SetConnectionLostHandler(func(paho.Client, error) {
			if lost != nil {
				lost()
			}
		})
	cl := paho.NewClient(o)
	if err := waitToken(cl.Connect(), 10*time.Second); err != nil {
		t.Fatalf("app %s: %v", user, err)
	}
	t.Cleanup(func() { cl.Disconnect(0) })
	select {
	case <-subscribed:
	case <-time.After(10 * time.Second):
		t.Fatalf("app %s: no SUBACK for devices/+/telemetry", user)
	}
	return cl
}

func (e *dynsecEnv) applyDelegations(t *testing.T, dl ...policy.Delegation) {
	t.Helper()
	next := e.engine.Current().Document()
	next.Version++
	next.Delegations = dl
	p, err := policy.Compile(next, "test", "")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.engine.Apply(p, false); err != nil {
		t.Fatal(err)
	}
}

// TestMosquittoDynsecApps: against a real Mosquitto, an app user with a
// local credential reads the readings of a device delegated to it, and
// only those; after the delegation is removed from the policy it receives
// no more (live, on the subscription it had); it can never publish as a
// device; app remove disconnects it and its password stops working.
func TestMosquittoDynsecApps(t *testing.T) {
	book := &appBook{apps: map[string]AppAccount{}}
	e := newDynsecEnvWith(t, "", "", func(o *DynsecOptions) { o.Apps = book.list })
	ctx := context.Background()
	const carolPW, erinPW = "carol-app-pw-canary", "erin-app-pw-canary"
	for user, pw := range map[string]string{"carol": carolPW, "erin": erinPW} {
		a := AppAccount{User: user, Fingerprint: AppFingerprint(user, pw)}
		if user == "erin" {
			a.Groups = []string{"/staff"}
		}
		book.put(a)
		if err := e.dyn.AddApp(ctx, a, pw); err != nil {
			t.Fatalf("AddApp %s: %v", user, err)
		}
	}
	if err := e.dyn.AddApp(ctx, AppAccount{User: "a1", Fingerprint: AppFingerprint("a1", "x")}, "x"); err == nil {
		t.Fatal("an app account took a device's name")
	}
	// carol reads a1 by a direct delegation, erin reads b1 through her
	// group (given at app add), everyone reads a2 (public).
	e.applyDelegations(t,
		policy.Delegation{Device: "a1", User: "carol", Kind: policy.ReadAccess},
		policy.Delegation{Device: "b1", Group: "cn=staff,ou=Firenze,dc=ldap,dc=org", Kind: policy.ReadAccess},
		policy.Delegation{Device: "a2", User: policy.Public, Kind: policy.ReadAccess})
	eventually(t, "the app roles follow the policy", func() bool {
		issues, err := e.dyn.Check(ctx)
		return err == nil && len(issues) == 0
	})

	carol, erin := &appInbox{}, &appInbox{}
	carolLost := make(chan struct{}, 16)
	carolCl := e.dialApp(t, "carol", carolPW, carol, func() {
		select {
		case carolLost <- struct{}{}:
		default:
		}
	})
	erinDone := make(chan struct{})
	var erinOnce sync.Once
	e.dialApp(t, "erin", erinPW, erin, func() { erinOnce.Do(func() { close(erinDone) }) })
	if _, err := e.dial("carol", erinPW); err == nil {
		t.Fatal("carol logged in with erin's password")
	}
	devs := map[string]paho.Client{}
	for _, id := range []string{"a1", "a2", "b1"} {
		c, err := e.dial(id, e.password(id))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Disconnect(0)
		devs[id] = c
	}
	for id, c := range devs {
		send(t, c, id, id+"-1")
	}
	eventually(t, "carol reads a1 (delegated) and a2 (public)", func() bool {
		return carol.has("devices/a1/telemetry a1-1") && carol.has("devices/a2/telemetry a2-1")
	})
	eventually(t, "erin reads b1 (group) and a2 (public)", func() bool {
		return erin.has("devices/b1/telemetry b1-1") && erin.has("devices/a2/telemetry a2-1")
	})
	eventually(t, "ingest got all", func() bool { return e.got("a1", "a1-1") && e.got("b1", "b1-1") && e.got("a2", "a2-1") })
	if carol.has("devices/b1/telemetry b1-1") || erin.has("devices/a1/telemetry a1-1") {
		t.Fatalf("an app read a device not delegated to it: carol %q erin %q", carol.got, erin.got)
	}

	// An app cannot publish as a device, on any device topic.
	send(t, carolCl, "a1", "forged-by-carol")
	send(t, devs["a1"], "a1", "a1-2")
	eventually(t, "a1-2 ingested", func() bool { return e.got("a1", "a1-2") })
	if e.got("a1", "forged-by-carol") {
		t.Fatal("an app's publish on a device topic reached the gateway")
	}

	// The delegation to carol is removed: no more a1 readings for her, on
	// the subscription she already holds.
	e.applyDelegations(t,
		policy.Delegation{Device: "b1", Group: "cn=staff,ou=Firenze,dc=ldap,dc=org", Kind: policy.ReadAccess},
		policy.Delegation{Device: "a2", User: policy.Public, Kind: policy.ReadAccess})
	eventually(t, "carol's role without a1", func() bool {
		issues, err := e.dyn.Check(ctx)
		return err == nil && len(issues) == 0
	})
	// mosquitto 2.0.11 keeps her connected (removeRoleACL kicks nobody):
	// the cut below is the receive ACL, checked on every delivery, on the
	// subscription she made before.
	if n := len(carolLost); n != 0 || !carolCl.IsConnectionOpen() {
		t.Fatalf("carol was disconnected %d times by the role change; the test means her existing subscription", n)
	}
	send(t, devs["a1"], "a1", "a1-3")
	send(t, devs["a2"], "a2", "a2-3")
	eventually(t, "carol still reads a2", func() bool { return carol.has("devices/a2/telemetry a2-3") })
	eventually(t, "a1-3 ingested", func() bool { return e.got("a1", "a1-3") })
	if carol.has("devices/a1/telemetry a1-3") {
		t.Fatal("carol received a1's reading after her delegation was removed")
	}

	// Drift: an administrator widens erin's role by hand; Check names it,
	// the next reconciliation removes it.
	if _, err := e.dyn.do(ctx, []dynCmd{{"command": "addRoleACL", "rolename": "edgegate-app-erin", "acltype": "publishClientReceive",
		"topic": "devices/a1/telemetry", "priority": 20, "allow": true}}); err != nil {
		t.Fatal(err)
	}
	issues, err := e.dyn.Check(ctx)
	if err != nil || len(issues) != 1 || !strings.Contains(issues[0], "app erin: role edgegate-app-erin grants other devices") {
		t.Fatalf("Check after widening erin's role = %q, %v", issues, err)
	}
	if _, err := e.dyn.Reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	if issues, err := e.dyn.Check(ctx); err != nil || len(issues) != 0 {
		t.Fatalf("Check after reconcile = %q, %v", issues, err)
	}

	// app remove: erin is disconnected and cannot log in again.
	book.del("erin")
	if err := e.dyn.RemoveApp(ctx, "erin"); err != nil {
		t.Fatal(err)
	}
	select {
	case <-erinDone:
	case <-time.After(10 * time.Second):
		t.Fatal("the removed app's session was not closed")
	}
	if _, err := e.dial("erin", erinPW); err == nil {
		t.Fatal("a removed app logged in again")
	}
	if issues, err := e.dyn.Check(ctx); err != nil || len(issues) != 0 {
		t.Fatalf("Check after app remove = %q, %v", issues, err)
	}
	// An account removed from the store while the daemon was down is
	// deleted by the reconciliation.
	book.del("carol")
	e.dyn.Nudge()
	eventually(t, "carol's account deleted", func() bool { _, err := e.dial("carol", carolPW); return err != nil })
	for _, pw := range []string{carolPW, erinPW} {
		if strings.Contains(e.logs.String(), pw) {
			t.Error("an app password reached the log")
		}
	}
}
