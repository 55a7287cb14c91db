package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/edgegate/edgegate/internal/admin"
	"github.com/edgegate/edgegate/internal/daemon"
	"github.com/edgegate/edgegate/internal/mosquittotest"
	"github.com/edgegate/edgegate/internal/testkit"
	"github.com/edgegate/edgegate/mqtt"
	"github.com/edgegate/edgegate/policy"
)

// appSocketBackend serves AppAdmin on an admin socket, as the daemon does.
type appSocketBackend struct{ *daemon.AppAdmin }

func (appSocketBackend) Status(context.Context) admin.Status { return admin.Status{} }
func (appSocketBackend) Export(context.Context, admin.Selector, io.Writer) (admin.ExportReport, error) {
	return admin.ExportReport{}, nil
}
func (appSocketBackend) Erase(context.Context, admin.Selector) (admin.EraseReport, error) {
	return admin.EraseReport{}, nil
}
func (appSocketBackend) FactoryReset(context.Context) error { return nil }
func (appSocketBackend) Reload(context.Context) error       { return nil }

func dialMosquitto(url, user, pw string) (paho.Client, error) {
	o := paho.NewClientOptions().AddBroker(url).SetClientID(fmt.Sprintf("%s-%d", user, time.Now().UnixNano())).
		SetUsername(user).SetPassword(pw).SetAutoReconnect(false).SetConnectTimeout(5 * time.Second)
	c := paho.NewClient(o)
	tok := c.Connect()
	if !tok.WaitTimeout(10 * time.Second) {
		return nil, fmt.Errorf("connect timed out")
	}
	return c, tok.Error()
}

// TestAppCommands: edgegate app add|list|remove against the daemon's real
// app admin on its socket, a real Mosquitto with the dynamic-security
// plugin and a real encrypted store: the generated password is printed
// once and logs in; the app is counted with what the policy lets it read;
// the store keeps no password; remove disconnects it and its password
// stops working; with the daemon stopped, list reads the store and add
// says the daemon is needed.
func TestAppCommands(t *testing.T) {
	ctx := context.Background()
	mq := mosquittotest.Start(t, "edgegate")
	dir := t.TempDir()
	cfgFile := filepath.Join(dir, "edgegate.yaml")
	if err := os.WriteFile(cfgFile, []byte("state_dir: "+filepath.Join(dir, "state")+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	env := pairEnv{getenv: func(string) string { return "" }, hostname: os.Hostname, now: time.Now}
	q, err := openStore(env, storeFlags{stateDir: filepath.Join(dir, "state"), credential: "store-key"})
	if err != nil {
		t.Fatal(err)
	}
	qOpen := true
	defer func() {
		if qOpen {
			q.Close()
		}
	}()
	regs := []policy.Registration{{ID: "a1", Type: "T", Owner: "alice", Broker: "https://b.example/f", K1: "k1-canary-a1", K2: "k2-canary-a1"},
		{ID: "b1", Type: "T", Owner: "bob", Broker: "https://b.example/f", K1: "k1-canary-b1", K2: "k2-canary-b1"}}
	p, err := policy.Compile(policy.Document{Format: 1, Version: 1, IssuedAt: time.Now(), Devices: regs,
		Delegations: []policy.Delegation{{Device: "a1", User: "carol", Kind: policy.ReadAccess}}}, "test", "")
	if err != nil {
		t.Fatal(err)
	}
	engine := policy.NewEngine(p)
	topic, _ := mqtt.ParseTopic("devices/{device}/telemetry")
	var logs testkit.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	dyn := mqtt.NewDynsec(mqtt.DynsecOptions{URL: mq.URL, Username: "edgegate", Password: mosquittotest.AdminPassword, Topic: topic,
		Policy: engine, IngestUser: "edgegate", Timeout: 5 * time.Second, Logger: log,
		Apps: func() ([]mqtt.AppAccount, error) { return daemon.LoadApps(q) }})
	dctx, dcancel := context.WithCancel(ctx)
	ddone := make(chan error, 1)
	go func() { ddone <- dyn.Run(dctx) }()
	defer func() { dcancel(); <-ddone }()
	select {
	case <-dyn.Synced():
	case <-time.After(20 * time.Second):
		t.Fatalf("accounts never synced: %s", dyn.LastError())
	}
	sockDir, err := os.MkdirTemp("", "eg-app-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(sockDir)
	sock := filepath.Join(sockDir, "admin.sock")
	adm, err := admin.Listen(admin.ServerOptions{Socket: sock, Backend: appSocketBackend{&daemon.AppAdmin{Store: q, Accounts: dyn, Policy: engine.Current, Logger: log}}})
	if err != nil {
		t.Fatal(err)
	}
	actx, acancel := context.WithCancel(ctx)
	adone := make(chan error, 1)
	go func() { adone <- adm.Run(actx) }()
	admOpen := true
	stopAdmin := func() {
		if admOpen {
			acancel()
			<-adone
			admOpen = false
		}
	}
	defer stopAdmin()

	app := func(args ...string) (string, error) {
		var out, errOut bytes.Buffer
		err := appWith(ctx, env, args, &out, &errOut)
		return out.String() + errOut.String(), err
	}
	out, err := app("add", "--config", cfgFile, "--socket", sock, "carol")
	if err != nil {
		t.Fatalf("app add: %v\n%s", err, out)
	}
	m := regexp.MustCompile(`password \(shown once[^)]*\): (\S+)`).FindStringSubmatch(out)
	if m == nil || !strings.Contains(out, "reads 1 devices") {
		t.Fatalf("app add printed %q; want the password once and 1 readable device", out)
	}
	pw := m[1]
	c, err := dialMosquitto(mq.URL, "carol", pw)
	if err != nil {
		t.Fatalf("carol with the printed password: %v", err)
	}
	lost := make(chan struct{})
	c.Disconnect(0)
	o := paho.NewClientOptions().AddBroker(mq.URL).SetClientID("carol-live").SetUsername("carol").SetPassword(pw).
		SetAutoReconnect(false).SetConnectionLostHandler(func(paho.Client, error) { close(lost) })
	c = paho.NewClient(o)
	if tok := c.Connect(); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("carol: %v", tok.Error())
	}
	if _, err := dialMosquitto(mq.URL, "carol", pw+"x"); err == nil {
		t.Fatal("carol logged in with a wrong password")
	}
	if out, err := app("list", "--config", cfgFile, "--socket", sock); err != nil || !strings.Contains(out, "carol  reads 1 devices") {
		t.Fatalf("app list = %q, %v", out, err)
	}
	if out, err := app("add", "--config", cfgFile, "--socket", sock, "a/b"); err == nil || !strings.Contains(out+err.Error(), "contains one of") {
		t.Fatalf("app add a/b = %q, %v; want refused naming the character", out, err)
	}
	if out, err := app("add", "--config", cfgFile, "--socket", sock, "a1"); err == nil || !strings.Contains(err.Error(), "a device of the policy") {
		t.Fatalf("app add a1 (a device id) = %q, %v", out, err)
	}
	b, ok, err := q.GetState("mqtt-apps")
	if err != nil || !ok || bytes.Contains(b, []byte(pw)) || !bytes.Contains(b, []byte(mqtt.AppFingerprint("carol", pw))) {
		t.Fatalf("store record %q (%v, %v): want the fingerprint and no password", b, ok, err)
	}

	if out, err := app("remove", "--config", cfgFile, "--socket", sock, "carol"); err != nil {
		t.Fatalf("app remove: %v\n%s", err, out)
	}
	select {
	case <-lost:
	case <-time.After(10 * time.Second):
		t.Fatal("the removed app's session was not closed")
	}
	if _, err := dialMosquitto(mq.URL, "carol", pw); err == nil {
		t.Fatal("a removed app logged in again")
	}
	if out, err := app("remove", "--config", cfgFile, "--socket", sock, "carol"); err == nil || !strings.Contains(out+err.Error(), "no app account") {
		t.Fatalf("app remove twice = %q, %v", out, err)
	}

	// With a password file, then the daemon stopped.
	pwf := filepath.Join(dir, "erin.pw")
	if err := os.WriteFile(pwf, []byte("erin-pw-canary-123456\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := app("add", "--config", cfgFile, "--socket", sock, "--password-file", pwf, "--group", "/staff", "erin"); err != nil || strings.Contains(out, "erin-pw-canary") {
		t.Fatalf("app add --password-file = %q, %v (the password must not be printed)", out, err)
	}
	if c, err := dialMosquitto(mq.URL, "erin", "erin-pw-canary-123456"); err != nil {
		t.Fatalf("erin with the file's password: %v", err)
	} else {
		c.Disconnect(0)
	}
	stopAdmin()
	q.Close()
	qOpen = false
	if out, err := app("list", "--config", cfgFile, "--socket", sock); err != nil || !strings.Contains(out, "erin  groups /staff") {
		t.Fatalf("app list, daemon stopped = %q, %v", out, err)
	}
	if out, err := app("add", "--config", cfgFile, "--socket", sock, "dave"); err == nil || !strings.Contains(err.Error(), "the daemon is not running") {
		t.Fatalf("app add, daemon stopped = %q, %v", out, err)
	}
	if s := logs.String(); strings.Contains(s, pw) || strings.Contains(s, "erin-pw-canary") {
		t.Error("an app password reached the log")
	}
}
