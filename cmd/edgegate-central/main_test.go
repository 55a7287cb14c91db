package main

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"github.com/edgegate/edgegate/internal/testkit"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/pki"
	"github.com/edgegate/edgegate/internal/sim/centralsim"
)

// TestServePushFleetRotate runs the real commands: serve against the
// stock-faithful simulator (no Companion), then push, fleet and keys
// rotate as an operator would.
func TestServePushFleetRotate(t *testing.T) {
	sim, err := centralsim.New(centralsim.Options{
		Users:   []centralsim.User{{Username: "ops", Role: centralsim.RoleRootAdmin}, {Username: "alice"}},
		Clients: []centralsim.Client{{ID: "central-ops", Secret: "ops-secret-CANARY", Username: "ops"}},
		Devices: []centralsim.Device{{ID: "th-1", Type: "Thermometer", Owner: "alice", K1: "k1-CANARY-0001", K2: "k2-CANARY-0002"}},
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
	write := func(name, data string, mode os.FileMode) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(data), mode); err != nil {
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
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Certificate[0]})
	// The CLI trusts tls_cert's certificates: put the CA after the leaf.
	caPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Cert.Raw})
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
bind_on_first_use: true
poll_interval: 1h
platform:
  url: %q
  issuer: %q
  ca_file: %q
  client_id: central-ops
  client_secret_file: %q
  brokers:
    orion-1: %q
`, addr, addr, write("cert.pem", string(certPEM)+string(caPEM), 0o644), write("key.pem", string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})), 0o600),
		filepath.Join(dir, "state"), write("admin", "admin-CANARY-77\n", 0o600), sim.URL(), sim.Issuer(),
		write("sim-ca.pem", string(sim.CACertPEM()), 0o644), write("ops", "ops-secret-CANARY\n", 0o600), sim.BrokerURL())
	cfgPath := write("config.yaml", cfg, 0o644)

	ctx, cancel := context.WithCancel(context.Background())
	var serveErr bytes.Buffer
	done := make(chan error, 1)
	go func() { done <- run(ctx, []string{"serve", "--config", cfgPath}, &bytes.Buffer{}, &serveErr) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
		for _, s := range []string{"ops-secret-CANARY", "admin-CANARY-77", "k1-CANARY-0001"} {
			if strings.Contains(serveErr.String(), s) {
				t.Errorf("serve's log holds a secret")
			}
		}
	}()
	cli := func(args ...string) (string, error) {
		var out, errb bytes.Buffer
		err := run(context.Background(), append(args, "--config", cfgPath), &out, &errb)
		return out.String() + errb.String(), err
	}
	// Until the service listens; a device bound to no gateway: no gateway
	// yet, an empty round.
	var out string
	testkit.Poll(10*time.Second, func() bool { out, err = cli("push", "--all"); return err == nil })
	if err != nil || !strings.Contains(out, "gateways 0") {
		t.Fatalf("push --all: %v\n%s\n%s", err, out, serveErr.String())
	}
	if out, err = cli("push", "--gateway", "gw-x"); err == nil || !strings.Contains(out, "refused gw-x: unknown gateway") {
		t.Fatalf("push of an unknown gateway: %v\n%s", err, out)
	}
	if out, err = cli("fleet"); err != nil || !strings.Contains(out, "0 gateways, 0 stale") {
		t.Fatalf("fleet: %v\n%s", err, out)
	}
	// The container's HEALTHCHECK: loopback, the certificate checked
	// against public_url's host.
	if out, err = cli("health"); err != nil || strings.TrimSpace(out) != "ok" {
		t.Fatalf("health of a running service: %v\n%s", err, out)
	}
	if out, err = cli("config", "check"); err != nil || !strings.Contains(out, "configuration ok: store badger") {
		t.Fatalf("config check: %v\n%s", err, out)
	}
	if out, err = cli("keys", "rotate", "--overlap", "1h"); err != nil || !strings.Contains(out, "new signing key") {
		t.Fatalf("keys rotate: %v\n%s", err, out)
	}
	if _, err := cli("push"); err == nil {
		t.Fatal("push without --gateway or --all succeeded")
	}
}

// TestKeysInitConfigCheckHealth: what the package's postinst and a
// container's HEALTHCHECK run, on their failure paths too.
func TestKeysInitConfigCheckHealth(t *testing.T) {
	dir := t.TempDir()
	kf := filepath.Join(dir, "credentials", "policy-signing-keys")
	if err := os.MkdirAll(filepath.Dir(kf), 0o700); err != nil {
		t.Fatal(err)
	}
	var out, errb bytes.Buffer
	if err := run(context.Background(), []string{"keys", "init", "--key-file", kf}, &out, &errb); err != nil {
		t.Fatalf("keys init: %v\n%s", err, errb.String())
	}
	st, err := os.Stat(kf)
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("key file %v, %v; want mode 0600", st, err)
	}
	first, _ := os.ReadFile(kf)
	out.Reset()
	if err := run(context.Background(), []string{"keys", "init", "--key-file", kf}, &out, &errb); err != nil || !strings.Contains(out.String(), "kept") {
		t.Fatalf("second keys init: %v\n%s", err, out.String())
	}
	if again, _ := os.ReadFile(kf); !bytes.Equal(first, again) {
		t.Error("keys init replaced an existing key file")
	}
	if err := run(context.Background(), []string{"keys", "init"}, &out, &errb); err == nil {
		t.Error("keys init without --key-file succeeded")
	}

	bad := filepath.Join(dir, "bad.yaml")
	if err := os.WriteFile(bad, []byte("state_dir: /x\nstore: mysql\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	err = run(context.Background(), []string{"config", "check", "--config", bad}, &out, &errb)
	if err == nil || !strings.Contains(err.Error(), "store") {
		t.Errorf("config check of a bad file = %v, want an error naming store", err)
	}

	// Nothing listens: health fails, bounded by its timeout.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	cfg := filepath.Join(dir, "config.yaml")
	body := fmt.Sprintf("listen: %q\npublic_url: \"https://%s\"\nstate_dir: %q\nplatform:\n  url: https://p.example\n  issuer: https://p.example/auth/realms/master\n  client_id: c\n  client_secret_file: /nonexistent\n  brokers:\n    orion-1: https://b.example\n",
		addr, addr, dir)
	if err := os.WriteFile(cfg, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := run(context.Background(), []string{"health", "--config", cfg, "--timeout", "2s"}, &out, &errb); err == nil {
		t.Error("health succeeded with nothing listening")
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("health took %s with a 2s timeout", d)
	}
}
