package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/edgegate/edgegate/internal/mosquittotest"
	"github.com/edgegate/edgegate/internal/pki"
	"github.com/edgegate/edgegate/internal/sim/centralsim"
	"github.com/edgegate/edgegate/internal/testkit"
	centralsync "github.com/edgegate/edgegate/sync"
)

// TestServeExternalPush runs serve with push.mode: external against a
// real Mosquitto (TLS, dynamic security) provisioned as docs/central.md
// says, and the stock-faithful simulator: after `push --all`, the
// gateway's credentials come from the API and its bundle is retained on
// its topic in the broker.
func TestServeExternalPush(t *testing.T) {
	sim, err := centralsim.New(centralsim.Options{
		Users:   []centralsim.User{{Username: "ops", Role: centralsim.RoleRootAdmin}, {Username: "alice"}},
		Clients: []centralsim.Client{{ID: "central-ops", Secret: "ops-secret-CANARY", Username: "ops"}},
		Logger:  slog.New(slog.DiscardHandler),
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := sim.Start("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	defer sim.Close()
	dir := t.TempDir()
	write := func(name string, data []byte, mode os.FileMode) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, data, mode); err != nil {
			t.Fatal(err)
		}
		return p
	}
	ca, err := pki.NewCA("test", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	cert, err := ca.IssueServer(time.Now(), "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(cert.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	chain := append(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Certificate[0]}), ca.CertPEM...)
	certFile := write("cert.pem", chain, 0o644)
	keyFile := write("key.pem", pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600)

	// The operator's Mosquitto, and the companion's account on it.
	port := mosquittotest.FreePort(t)
	m := mosquittotest.Start(t, "admin", mosquittotest.TLSListener(port, certFile, keyFile)...)
	const mqttPW = "central-mqtt-CANARY-4410"
	m.Ctrl(t, "admin", "createClient", "edgegate-central", "-p", mqttPW)
	m.Ctrl(t, "admin", "addClientRole", "edgegate-central", "admin")
	m.Ctrl(t, "admin", "createRole", "edgegate-central-publish")
	m.Ctrl(t, "admin", "addRoleACL", "edgegate-central-publish", "publishClientSend", "edgegate/gateways/+/policy", "allow")
	m.Ctrl(t, "admin", "addClientRole", "edgegate-central", "edgegate-central-publish")
	brokerURL := fmt.Sprintf("ssl://127.0.0.1:%d", port)

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	cfg := fmt.Sprintf(`listen: %q
public_url: "https://%s"
tls_cert: %q
tls_key: %q
state_dir: %q
admin_token_file: %q
gateways:
  gw-a: gw-a-client
poll_interval: 1h
push:
  mode: external
  brokers: [%q]
  ca_file: %q
  username: edgegate-central
  password_file: %q
platform:
  url: %q
  issuer: %q
  ca_file: %q
  client_id: central-ops
  client_secret_file: %q
  brokers:
    orion-1: %q
`, addr, addr, certFile, keyFile, filepath.Join(dir, "state"), write("admin", []byte("admin-CANARY-77\n"), 0o600),
		brokerURL, write("mqtt-ca.pem", ca.CertPEM, 0o644), write("mqtt-password", []byte(mqttPW+"\n"), 0o600),
		sim.URL(), sim.Issuer(), write("sim-ca.pem", sim.CACertPEM(), 0o644), write("ops", []byte("ops-secret-CANARY\n"), 0o600), sim.BrokerURL())
	cfgPath := write("config.yaml", []byte(cfg), 0o644)

	// A device bound to gw-a, registered the stock way.
	simRoots := x509.NewCertPool()
	simRoots.AppendCertsFromPEM(sim.CACertPEM())
	simHTTP := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: simRoots}}}
	aliceTok, err := sim.IssueAccessToken("alice", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	dirc := centralsync.NewDirectory(sim.URL(), simHTTP, func(context.Context) (string, error) { return aliceTok, nil })
	if _, err := dirc.Insert(context.Background(), centralsync.DeviceSpec{ID: "th-1", Type: "Thermometer",
		ContextBroker: centralsim.DefaultBrokerName, Kind: "sensor", Format: "json", Model: "custom", Producer: "edgegate",
		Latitude: 43.77, Longitude: 11.25, Frequency: 600, K1: "k1-CANARY-0001", K2: "k2-CANARY-0002",
		Attributes: []centralsync.DeviceAttr{{Name: "temperature", DataType: "float", Type: "temperature", Editable: "0",
			Unit: "C", HealthinessCriteria: centralsync.HealthRefreshRate, HealthinessValue: "1200"}},
		Gateway: "gw-a", RadioNode: -1, RadioChild: -1}); err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	var serveErr bytes.Buffer
	done := make(chan error, 1)
	go func() { done <- run(ctx, []string{"serve", "--config", cfgPath}, &bytes.Buffer{}, &serveErr) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
		for _, s := range []string{"ops-secret-CANARY", "admin-CANARY-77", "k1-CANARY-0001", mqttPW} {
			if strings.Contains(serveErr.String(), s) {
				t.Errorf("serve's log holds a secret")
			}
		}
	}()
	var out string
	testkit.Eventually(t, 15*time.Second, "push --all through the external broker", func() bool {
		var o, e bytes.Buffer
		err := run(context.Background(), []string{"push", "--all", "--config", cfgPath}, &o, &e)
		out = o.String() + e.String()
		return err == nil && strings.Contains(out, "pushed 1")
	})

	// The gateway's credentials, with its own token.
	gwTok, err := sim.IssueAccessToken("alice", time.Hour, "gw-a-client")
	if err != nil {
		t.Fatal(err)
	}
	apiHTTP := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: ca.Pool()}}}
	req, _ := http.NewRequest("GET", "https://"+addr+centralsync.PushCredentialsPath("gw-a"), nil)
	req.Header.Set("Authorization", "Bearer "+gwTok)
	resp, err := apiHTTP.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	var creds centralsync.PushCredentials
	if resp.StatusCode != 200 || json.Unmarshal(body, &creds) != nil {
		t.Fatalf("push credentials: HTTP %d", resp.StatusCode)
	}
	got := make(chan paho.Message, 4)
	cl := paho.NewClient(paho.NewClientOptions().AddBroker(brokerURL).SetClientID(creds.ClientID).SetUsername(creds.Username).
		SetPassword(creds.Password).SetTLSConfig(&tls.Config{RootCAs: ca.Pool()}).SetAutoReconnect(false).SetConnectTimeout(10 * time.Second))
	if tok := cl.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("connect as gw-a: %v", tok.Error())
	}
	defer cl.Disconnect(100)
	if tok := cl.Subscribe(centralsync.PushTopic("gw-a"), 1, func(_ paho.Client, m paho.Message) { got <- m }); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe: %v", tok.Error())
	}
	select {
	case m := <-got:
		if !m.Retained() || strings.Count(string(m.Payload()), ".") != 2 {
			t.Fatalf("gw-a's topic holds %d bytes, retained %v; want its retained bundle", len(m.Payload()), m.Retained())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no retained bundle on gw-a's topic")
	}
}
