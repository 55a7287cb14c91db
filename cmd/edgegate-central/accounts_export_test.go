package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/edgegate/edgegate/internal/central"
	"github.com/edgegate/edgegate/internal/keys"
)

// TestPushAccountsExport: the command adds the configured and listed
// gateways' accounts to a file made by mosquitto_ctrl dynsec init, once
// each, and refuses to run without the companion's store key.
func TestPushAccountsExport(t *testing.T) {
	dir := t.TempDir()
	ds := filepath.Join(dir, "dynamic-security.json")
	if out, err := exec.Command("mosquitto_ctrl", "dynsec", "init", ds, "admin", "admin-pw").CombinedOutput(); err != nil {
		t.Fatalf("mosquitto_ctrl dynsec init: %v %s", err, out)
	}
	cfg := filepath.Join(dir, "config.yaml")
	body := fmt.Sprintf("listen: \"127.0.0.1:8443\"\npublic_url: \"https://127.0.0.1:8443\"\nstate_dir: %q\n"+
		"gateways:\n  gw-1: gw-1-client\n  gw-2: gw-2-client\n"+
		"platform:\n  url: https://p.example\n  issuer: https://p.example/auth/realms/master\n  client_id: c\n  client_secret_file: /nonexistent\n  brokers:\n    orion-1: https://b.example\n", dir)
	if err := os.WriteFile(cfg, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	list := filepath.Join(dir, "gateways.txt")
	if err := os.WriteFile(list, []byte("# fleet\ngw-2\ngw-3\n\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	cli := func(args ...string) (string, error) {
		var out, errb bytes.Buffer
		err := run(context.Background(), append([]string{"push", "accounts-export", "--config", cfg}, args...), &out, &errb)
		return out.String() + errb.String(), err
	}
	if _, err := cli("--dynsec-file", ds, "--all"); err == nil || !strings.Contains(err.Error(), "no store key") {
		t.Fatalf("export without the store key: %v", err)
	}
	if _, _, err := keys.LoadStoreKey(central.StoreKeyCredential, filepath.Join(dir, "store.key"), func(string) string { return "" }); err != nil {
		t.Fatal(err)
	}
	if _, err := cli("--all"); err == nil || !strings.Contains(err.Error(), "--dynsec-file") {
		t.Fatalf("no --dynsec-file: %v", err)
	}
	if _, err := cli("--dynsec-file", ds); err == nil || !strings.Contains(err.Error(), "--gateway ID") {
		t.Fatalf("no gateways: %v", err)
	}
	out, err := cli("--dynsec-file", ds, "--all", "--gateways-file", list, "--gateway", "gw-1")
	if err != nil || !strings.Contains(out, "3 gateway accounts added, 0 replaced") {
		t.Fatalf("export: %v\n%s", err, out)
	}
	raw, err := os.ReadFile(ds)
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		Clients []struct {
			Username string `json:"username"`
			ClientID string `json:"clientid"`
		} `json:"clients"`
	}
	if err := json.Unmarshal(raw, &doc); err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, c := range doc.Clients {
		got = append(got, c.Username+"/"+c.ClientID)
	}
	if want := "admin/,edgegate-gw-gw-1/edgegate-gw-1,edgegate-gw-gw-2/edgegate-gw-2,edgegate-gw-gw-3/edgegate-gw-3"; strings.Join(got, ",") != want {
		t.Fatalf("clients %v, want %s", got, want)
	}
	// A packaged install's key is the credential file, given explicitly.
	kf := filepath.Join(dir, "credentials-store-key")
	if err := os.Rename(filepath.Join(dir, "store.key"), kf); err != nil {
		t.Fatal(err)
	}
	if _, err := cli("--dynsec-file", ds, "--gateway", "gw-3"); err == nil || !strings.Contains(err.Error(), "no store key") {
		t.Fatalf("export without the store key: %v", err)
	}
	if out, err := cli("--dynsec-file", ds, "--gateway", "gw-3", "--store-key-file", kf); err != nil || !strings.Contains(out, "0 gateway accounts added, 1 replaced") {
		t.Fatalf("export again: %v\n%s", err, out)
	}
	if _, err := os.Stat(filepath.Join(dir, "store.key")); err == nil {
		t.Fatal("the export generated a store key")
	}
}
