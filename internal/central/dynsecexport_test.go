package central

import (
	"encoding/base64"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestDynsecHashFormat: the hash of a client the plugin itself wrote
// (Mosquitto 2.0.11: mosquitto_ctrl dynsec createClient u1 -p secret,
// then read from its file) is the one dynsecHash computes.
func TestDynsecHashFormat(t *testing.T) {
	salt, err := base64.StdEncoding.DecodeString("pII9yqTOCgz6l26U")
	if err != nil {
		t.Fatal(err)
	}
	got, err := dynsecHash("secret", salt, 101)
	if err != nil {
		t.Fatal(err)
	}
	const want = "8iJxi6i6wzYacEV/WG/MJkKcdCHG8/Z3ZD46zhzybOmFxea3NKlGNvwubuXjj4Ppdj4495vFW/OiV6kshK3IYw=="
	if got != want {
		t.Fatalf("hash %s, the plugin wrote %s", got, want)
	}
}

// TestExportDynsecAccounts: the accounts are added to a file made by
// mosquitto_ctrl dynsec init, the admin kept, a second export replaces
// rather than duplicates, and bad input is refused with the field named.
func TestExportDynsecAccounts(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "dynsec.json")
	if out, err := exec.Command("mosquitto_ctrl", "dynsec", "init", file, "admin", "admin-pw").CombinedOutput(); err != nil {
		t.Fatalf("mosquitto_ctrl dynsec init: %v %s", err, out)
	}
	if _, _, err := ExportDynsecAccounts(filepath.Join(dir, "store.key"), file, []string{"gw-a"}); err == nil || !strings.Contains(err.Error(), "no store key") {
		t.Fatalf("export without the companion's store key: %v", err)
	}
	if _, err := pushSecret(dir); err != nil { // the companion's first start creates it
		t.Fatal(err)
	}
	added, replaced, err := ExportDynsecAccounts(filepath.Join(dir, "store.key"), file, []string{"gw-a", "gw-b"})
	if err != nil || added != 2 || replaced != 0 {
		t.Fatalf("export: added %d replaced %d err %v", added, replaced, err)
	}
	added, replaced, err = ExportDynsecAccounts(filepath.Join(dir, "store.key"), file, []string{"gw-b", "gw-c"})
	if err != nil || added != 1 || replaced != 1 {
		t.Fatalf("second export: added %d replaced %d err %v", added, replaced, err)
	}
	raw, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	if st, _ := os.Stat(file); st.Mode().Perm() != 0o600 {
		t.Fatalf("file mode %v, want 0600", st.Mode().Perm())
	}
	var doc struct {
		Clients []map[string]any `json:"clients"`
		Roles   []map[string]any `json:"roles"`
	}
	if err := json.Unmarshal(raw, &doc); err != nil {
		t.Fatal(err)
	}
	var users, roles []string
	for _, c := range doc.Clients {
		users = append(users, c["username"].(string))
	}
	for _, r := range doc.Roles {
		roles = append(roles, r["rolename"].(string))
	}
	if strings.Join(users, ",") != "admin,edgegate-gw-gw-a,edgegate-gw-gw-b,edgegate-gw-gw-c" ||
		strings.Join(roles, ",") != "admin,edgegate-gw-gw-a,edgegate-gw-gw-b,edgegate-gw-gw-c" {
		t.Fatalf("clients %v roles %v", users, roles)
	}
	// The password itself is never in the file, only its hash.
	secret, err := pushSecret(dir)
	if err != nil {
		t.Fatal(err)
	}
	pw := (&extPush{secret: secret}).gatewayPassword("gw-a")
	if strings.Contains(string(raw), pw) {
		t.Fatal("a gateway's password is in the dynamic-security file")
	}
	c := doc.Clients[1]
	var dc dynClient
	b, _ := json.Marshal(c)
	if err := json.Unmarshal(b, &dc); err != nil || !dc.good("gw-a", pw) {
		t.Fatalf("the companion would not take the exported account as its own: %s", b)
	}

	if _, _, err := ExportDynsecAccounts(filepath.Join(dir, "store.key"), file, []string{"gw/../x"}); err == nil || !strings.Contains(err.Error(), "gateway id") {
		t.Fatalf("bad gateway id: %v", err)
	}
	if _, _, err := ExportDynsecAccounts(filepath.Join(dir, "store.key"), filepath.Join(dir, "none.json"), []string{"gw-a"}); err == nil || !strings.Contains(err.Error(), "dynsec init") {
		t.Fatalf("missing file: %v", err)
	}
	bad := filepath.Join(dir, "bad.json")
	if err := os.WriteFile(bad, []byte(`{"clients":[{"textname":"x"}]}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, _, err := ExportDynsecAccounts(filepath.Join(dir, "store.key"), bad, []string{"gw-a"}); err == nil || !strings.Contains(err.Error(), `clients[0] has no "username"`) {
		t.Fatalf("malformed file: %v", err)
	}
}
