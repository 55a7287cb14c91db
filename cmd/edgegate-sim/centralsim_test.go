package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/testkit"
)

type lockedBuffer = testkit.Buffer

const centralSimTestConfig = `
realm: edgegate
token_ttl: 2m
check_keys: true
clients:
  - id: gw-1
    secret: s3cret-client
    username: alice
devices:
  - id: th-1
    type: Thermometer
    owner: alice
    k1: key-one
    k2: key-two
    attrs: [temperature]
delegations:
  - device: th-1
    user: bob
    kind: READ_ACCESS
`

func TestRunCentralSim(t *testing.T) {
	dir := t.TempDir()
	cfg := filepath.Join(dir, "sim.yaml")
	if err := os.WriteFile(cfg, []byte(centralSimTestConfig), 0o600); err != nil {
		t.Fatal(err)
	}
	caFile, tokFile := filepath.Join(dir, "ca.pem"), filepath.Join(dir, "admin.token")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var stdout, stderr lockedBuffer
	done := make(chan error, 1)
	go func() {
		done <- runCentralSim(ctx, []string{"--listen", "127.0.0.1:0", "--config", cfg, "--ca-out", caFile, "--admin-token-out", tokFile}, &stdout, &stderr)
	}()

	// Wait for the URLs, bounded.
	vars := map[string]string{}
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	deadline := time.After(10 * time.Second)
	for vars["ADMIN_TOKEN_FILE"] == "" {
		select {
		case err := <-done:
			t.Fatalf("runCentralSim returned early: %v\n%s", err, stderr.String())
		case <-deadline:
			t.Fatalf("no URLs printed; stdout %q", stdout.String())
		case <-tick.C:
		}
		for _, line := range strings.Split(stdout.String(), "\n") {
			if k, v, ok := strings.Cut(line, "="); ok {
				vars[k] = v
			}
		}
	}

	caPEM, err := os.ReadFile(caFile)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		t.Fatal("--ca-out is not a PEM certificate")
	}
	fi, err := os.Stat(tokFile)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("admin token file: %v %v", fi, err)
	}
	adminTok, _ := os.ReadFile(tokFile)
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	defer client.CloseIdleConnections()

	resp, err := client.PostForm(vars["TOKEN_URL"], url.Values{"grant_type": {"client_credentials"}, "client_id": {"gw-1"}, "client_secret": {"s3cret-client"}})
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.Contains(string(body), "access_token") {
		t.Fatalf("token: %d %s", resp.StatusCode, body)
	}
	if !strings.HasPrefix(vars["BROKER_URL"], "https://127.0.0.1:") || !strings.HasSuffix(vars["ISSUER"], "/auth/realms/edgegate") {
		t.Fatalf("printed %v", vars)
	}

	// A stock platform: userinfo answers the client's service account, and
	// the companion's endpoints are not there.
	if vars["USERINFO_URL"] == "" || vars["POLICY_KEYS_URL"] != "" {
		t.Fatalf("printed %v", vars)
	}
	var tokResp struct {
		AccessToken string `json:"access_token"`
	}
	if err := json.Unmarshal(body, &tokResp); err != nil {
		t.Fatal(err)
	}
	uireq, _ := http.NewRequest("GET", vars["USERINFO_URL"], nil)
	uireq.Header.Set("Authorization", "Bearer "+tokResp.AccessToken)
	if resp, err = client.Do(uireq); err != nil {
		t.Fatal(err)
	}
	body, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.Contains(string(body), `"preferred_username":"alice"`) {
		t.Fatalf("userinfo: %d %s", resp.StatusCode, body)
	}
	base := strings.TrimSuffix(vars["ADMIN_URL"], "/_sim")
	if resp, err = client.Get(base + "/edgegate/v1/policy-keys"); err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 404 {
		t.Fatalf("policy keys without --companion: %d, want 404", resp.StatusCode)
	}

	req, _ := http.NewRequest("GET", vars["ADMIN_URL"]+"/summary", nil)
	req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(adminTok)))
	resp, err = client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("admin summary: %d", resp.StatusCode)
	}

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("runCentralSim: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("runCentralSim did not return after cancel")
	}
	for _, secret := range []string{"s3cret-client", "key-one", "key-two", strings.TrimSpace(string(adminTok))} {
		if strings.Contains(stderr.String(), secret) || strings.Contains(stdout.String(), secret) {
			t.Errorf("output contains the secret %q", secret)
		}
	}
}

func TestCentralSimConfigErrors(t *testing.T) {
	tests := []struct {
		name, yaml, want string
	}{
		{"unknown top-level key", "realm: x\nbroker: y\n", "broker"},
		{"unknown device key", "devices:\n  - id: d\n    colour: red\n", "colour"},
		{"bad duration", "token_ttl: soon\n", "soon"},
		{"two documents", "realm: a\n---\nrealm: b\n", "more than one"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := parseCentralSimConfig([]byte(tt.yaml))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("parseCentralSimConfig(%q) err = %v, want mention of %q", tt.yaml, err, tt.want)
			}
		})
	}
	o, err := parseCentralSimConfig([]byte(centralSimTestConfig))
	if err != nil {
		t.Fatal(err)
	}
	if o.TokenTTL != 2*time.Minute || !o.CheckKeys || len(o.Clients) != 1 || o.Devices[0].K2 != "key-two" || o.Delegations[0].Kind != "READ_ACCESS" {
		t.Fatalf("options %+v", o)
	}
	o, err = parseCentralSimConfig([]byte(`
companion: true
users:
  - {username: root, role: RootAdmin, groups: [ops], organization: Florence, password: pw}
limits:
  - {organization: any, username: any, role: any, element_type: IOTID, max_count: 1}
delegations:
  - {device: "Florence:orion-1:th-1", group: ops, kind: READ_WRITE, delegator: root}
`))
	if err != nil {
		t.Fatal(err)
	}
	if !o.Companion || len(o.Users) != 1 || o.Users[0].Role != "RootAdmin" || o.Users[0].Groups[0] != "ops" ||
		o.Limits[0].MaxCount != 1 || o.Limits[0].ElementType != "IOTID" || o.Delegations[0].Group != "ops" || o.Delegations[0].Delegator != "root" {
		t.Fatalf("platform options %+v", o)
	}
	if _, err := parseCentralSimConfig(nil); err != nil {
		t.Fatalf("empty config: %v", err)
	}

	// Semantic errors surface from runCentralSim with the key's path.
	dir := t.TempDir()
	cfg := filepath.Join(dir, "bad.yaml")
	os.WriteFile(cfg, []byte("delegations:\n  - device: d\n    user: u\n    kind: READ\n"), 0o600)
	var out, errOut bytes.Buffer
	err = runCentralSim(context.Background(), []string{"--listen", "127.0.0.1:0", "--config", cfg}, &out, &errOut)
	if err == nil || !strings.Contains(err.Error(), "delegations[0]: kind") {
		t.Fatalf("runCentralSim with a bad kind: %v", err)
	}
	if err := runCentralSim(context.Background(), []string{"extra"}, &out, &errOut); err == nil {
		t.Fatal("runCentralSim with a positional argument: no error")
	}
}
