package daemon

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/edgegate/edgegate/internal/admin"
	"github.com/edgegate/edgegate/internal/config"
	"github.com/edgegate/edgegate/internal/envelope"
	"github.com/edgegate/edgegate/internal/mosquittotest"
	"github.com/edgegate/edgegate/internal/testkit"
)

// TestExternalReadyMeansLive runs the daemon in external mode against a
// real Mosquitto (dynamic-security plugin, the gateway its administrator)
// on a first start: no session, no device accounts. READY=1 comes only
// once the device accounts exist and the ingest subscription holds, so a
// device that connects and publishes right after READY is let in and its
// reading is not lost; status says ready and the accounts in line.
func TestExternalReadyMeansLive(t *testing.T) {
	t.Run("dynsec", func(t *testing.T) { testExternalReady(t, config.AccountsDynsec) })
	// Accounts kept by hand (here: an anonymous broker): READY still waits
	// for the subscription.
	t.Run("none", func(t *testing.T) { testExternalReady(t, config.AccountsNone) })
}

func testExternalReady(t *testing.T, accounts string) {
	var mq *mosquittotest.Broker
	if accounts == config.AccountsDynsec {
		mq = mosquittotest.Start(t, "edgegate")
	} else {
		mq = mosquittotest.Start(t, "", "allow_anonymous true")
	}
	// The daemon reaches the broker through a link that takes a second to
	// connect, so "ready" before the subscription shows as a lost reading.
	via := slowLink(t, mq.Addr, time.Second)
	dir := socketDir(t, "eg-ready-")
	write := func(name, text string) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(dir, name), []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("mqtt-password", mosquittotest.AdminPassword+"\n")
	write("client-secret", "secret-canary-ready\n")
	write("edgegate.yaml", fmt.Sprintf(`gateway:
  id: gw-ready
state_dir: state
mqtt:
  mode: external
  external:
    url: %s
    client_id: edgegate-ready
    username: edgegate
    password_file: mqtt-password
    accounts: %s
`, "tcp://"+via, accounts)+oneDeviceYAML(filepath.Join(dir, "admin.sock")))
	cfg, err := config.Load(filepath.Join(dir, "edgegate.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	notify, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: filepath.Join(dir, "notify"), Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer notify.Close()
	t.Setenv("NOTIFY_SOCKET", filepath.Join(dir, "notify"))
	t.Setenv("CREDENTIALS_DIRECTORY", "")

	start0 := time.Now()
	var logs testkit.Buffer
	d := New(cfg, slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug})))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()
	defer func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run = %v", err)
			}
		case <-time.After(40 * time.Second):
			t.Error("the daemon did not stop")
		}
		for _, secret := range []string{"k1-canary", "k2-canary", mosquittotest.AdminPassword, "secret-canary"} {
			if strings.Contains(logs.String(), secret) {
				t.Errorf("%q reached the log", secret)
			}
		}
	}()

	readyAt := make(chan struct{})
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := notify.Read(buf)
			if err != nil {
				return
			}
			if strings.Contains(string(buf[:n]), "READY=1") {
				close(readyAt)
				return
			}
		}
	}()
	select {
	case <-readyAt:
	case err := <-done:
		t.Fatalf("Run ended before ready: %v\n%s", err, logs.String())
	case <-time.After(30 * time.Second):
		t.Fatalf("no READY=1 within 30s\n%s", logs.String())
	}
	t.Logf("READY after %s", time.Since(start0))
	if time.Since(start0) > 5*time.Second {
		t.Log(logs.String())
	}
	// Right after READY: the device logs in (its account exists) and
	// publishes; the reading must be taken in.
	pw, _ := envelope.DeriveMQTTPassword("d1", "k1-canary-d1", "k2-canary-d1")
	o := paho.NewClientOptions().AddBroker(mq.URL).SetClientID("d1").SetUsername("d1").SetPassword(pw).
		SetAutoReconnect(false).SetConnectTimeout(5 * time.Second)
	dev := paho.NewClient(o)
	if tok := dev.Connect(); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("device d1 right after READY: %v", tok.Error())
	}
	defer dev.Disconnect(0)
	tok := dev.Publish("devices/d1/telemetry", 1, false, `{"n": 1, "temperature": {"value": 21.5, "type": "Number"}}`)
	if !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("publish: %v", tok.Error())
	}
	ac := admin.NewClient(cfg.Admin.Socket)
	defer ac.CloseIdle()
	var st admin.Status
	if !testkit.Poll(15*time.Second, func() bool {
		st, err = ac.Status(context.Background())
		return err == nil && len(st.Devices) == 1 && st.Devices[0].Ingested+st.Devices[0].Refused == 1
	}) {
		t.Fatalf("the reading published right after READY was not taken in: %+v %v\n%s", st.Devices, err, logs.String())
	}
	if st.Devices[0].Ingested != 1 {
		t.Errorf("reading refused, want queued: %+v", st.Devices[0])
	}
	t.Logf("ingested after %s", time.Since(start0))
	if st.NotReady != "" {
		t.Errorf("status says not ready (%s) after READY", st.NotReady)
	}
	var sawAccounts bool
	for _, sg := range st.Stages {
		switch sg.Name {
		case "local MQTT broker":
			if !sg.Healthy || !strings.Contains(sg.Detail, "subscribed") {
				t.Errorf("stage %q = %v %q, want subscribed", sg.Name, sg.Healthy, sg.Detail)
			}
		case AccountsStage:
			sawAccounts = true
			if managed := accounts == config.AccountsDynsec; sg.Healthy != managed {
				t.Errorf("stage %q = %v %q, want healthy only when managed", sg.Name, sg.Healthy, sg.Detail)
			}
		}
	}
	if !sawAccounts {
		t.Errorf("status has no %q stage: %+v", AccountsStage, st.Stages)
	}
}

// slowLink is a TCP proxy to upstream that waits delay before it connects
// each accepted connection.
func slowLink(t *testing.T, upstream string, delay time.Duration) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				time.Sleep(delay)
				u, err := net.Dial("tcp", upstream)
				if err != nil {
					return
				}
				defer u.Close()
				go func() { _, _ = io.Copy(u, c); u.Close() }()
				_, _ = io.Copy(c, u)
			}()
		}
	}()
	return ln.Addr().String()
}
