package central

import (
	"crypto/pbkdf2"
	"crypto/rand"
	"crypto/sha512"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"

	"github.com/edgegate/edgegate/internal/atomicfile"
	"github.com/edgegate/edgegate/internal/keys"
)

// Bulk provisioning of the push accounts (edgegate-central push
// accounts-export): the gateways' roles and clients written straight into
// a Mosquitto dynamic-security file while the broker is stopped, the
// same accounts ensureAccount creates over $CONTROL/dynamic-security/v1.
// Over the control topic the plugin rewrites its whole JSON file after
// every command, so creating n accounts costs O(n²) (~25 min for 10,000
// on an empty broker); the plugin reads the file once at start, so a
// file written beforehand costs one PBKDF2 per gateway. The companion's
// next session lists the accounts (readAccounts), finds each one good
// (its textname fingerprints the derived password) and sends no command.
//
// The file format is the one the plugin itself writes (Mosquitto 2.0.11,
// plugins/dynamic-security/config.c and clients.c): a client's password
// is base64 PBKDF2-HMAC-SHA512 of the password over the raw salt bytes
// (base64 in "salt", 12 bytes) with "iterations" rounds, 64 bytes; a
// role's "acls" are acltype/topic/priority/allow. TestDynsecHashFormat
// checks the hash against one the plugin wrote, and the push benchmark
// connects its gateways with accounts written here.
const (
	dynsecIterations = 101 // what the 2.0 plugin's createClient writes
	dynsecSaltLen    = 12
	dynsecHashLen    = 64
)

// dynsecHash is the plugin's password hash of pw with salt.
func dynsecHash(pw string, salt []byte, iterations int) (string, error) {
	h, err := pbkdf2.Key(sha512.New, pw, salt, iterations, dynsecHashLen)
	if err != nil {
		return "", fmt.Errorf("hash a push password: %w", err)
	}
	return base64.StdEncoding.EncodeToString(h), nil
}

// ExportDynsecAccounts writes the push account of every gateway in gws
// (role and client, with the password the companion derives from its
// store key, read from storeKeyFile, which must exist) into the
// dynamic-security file, keeping every other client, group and role in
// it (an operator's admin, the companion's own account, the bridges) and
// replacing a gateway's account already there. The broker must be
// stopped: a running plugin overwrites the file on its next command. It
// returns how many accounts were added and replaced.
func ExportDynsecAccounts(storeKeyFile, file string, gws []string) (added, replaced int, err error) {
	// The passwords must be the companion's: LoadStoreKey would generate
	// a missing key, and with it other passwords.
	if _, err := os.Stat(storeKeyFile); err != nil {
		return 0, 0, fmt.Errorf("no store key: export with the companion's own, or the passwords are not the ones it hands out: %w", err)
	}
	key, _, err := keys.LoadStoreKey("", storeKeyFile, func(string) string { return "" })
	if err != nil {
		return 0, 0, err
	}
	secret, err := pushSecretOf(key)
	if err != nil {
		return 0, 0, err
	}
	p := &extPush{secret: secret}
	return exportDynsec(file, gws, p.gatewayPassword)
}

func exportDynsec(file string, gws []string, password func(gw string) string) (added, replaced int, err error) {
	raw, err := os.ReadFile(file)
	if errors.Is(err, fs.ErrNotExist) {
		return 0, 0, fmt.Errorf("dynamic-security file %s does not exist: create it with mosquitto_ctrl dynsec init %s ADMIN first", file, file)
	}
	if err != nil {
		return 0, 0, fmt.Errorf("read the dynamic-security file: %w", err)
	}
	// Generic JSON: every field this code does not write is kept as is.
	var doc map[string]any
	if err := json.Unmarshal(raw, &doc); err != nil {
		return 0, 0, fmt.Errorf("dynamic-security file %s: %w", file, err)
	}
	clients, err := dynsecList(doc, "clients", "username")
	if err != nil {
		return 0, 0, fmt.Errorf("dynamic-security file %s: %w", file, err)
	}
	roles, err := dynsecList(doc, "roles", "rolename")
	if err != nil {
		return 0, 0, fmt.Errorf("dynamic-security file %s: %w", file, err)
	}
	for _, gw := range gws {
		if !gatewayIDRE.MatchString(gw) {
			return 0, 0, fmt.Errorf("gateway id %q cannot be an MQTT username or topic level", clip(gw))
		}
		pw := password(gw)
		salt := make([]byte, dynsecSaltLen)
		_, _ = rand.Read(salt)
		hash, err := dynsecHash(pw, salt, dynsecIterations)
		if err != nil {
			return 0, 0, err
		}
		user, role := gwUserPrefix+gw, gwRolePrefix+gw
		acls := []any{}
		for _, a := range gatewayACLs(gw) {
			acls = append(acls, a)
		}
		roles.put(role, map[string]any{"rolename": role, "textname": pushMark, "acls": acls})
		if clients.put(user, map[string]any{"username": user, "textname": gwTextname(pw), "clientid": "edgegate-" + gw,
			"roles": []any{map[string]any{"rolename": role}}, "password": hash,
			"salt": base64.StdEncoding.EncodeToString(salt), "iterations": dynsecIterations}) {
			replaced++
		} else {
			added++
		}
	}
	doc["clients"], doc["roles"] = clients.items, roles.items
	out, err := json.MarshalIndent(doc, "", "\t")
	if err != nil {
		return 0, 0, fmt.Errorf("encode the dynamic-security file: %w", err)
	}
	// 0600: the hashes are the gateways' broker credentials.
	if err := atomicfile.Write(file, out, 0o600); err != nil {
		return 0, 0, fmt.Errorf("write the dynamic-security file: %w", err)
	}
	return added, replaced, nil
}

// dynsecEntries is one of the file's lists (clients, roles) indexed by
// name, in file order.
type dynsecEntries struct {
	items []any
	at    map[string]int
}

func dynsecList(doc map[string]any, field, key string) (*dynsecEntries, error) {
	l := &dynsecEntries{at: map[string]int{}}
	v, ok := doc[field]
	if !ok || v == nil {
		return l, nil
	}
	items, ok := v.([]any)
	if !ok {
		return nil, fmt.Errorf("%q is not a list", field)
	}
	for i, it := range items {
		m, ok := it.(map[string]any)
		name, _ := m[key].(string)
		if !ok || name == "" {
			return nil, fmt.Errorf("%s[%d] has no %q", field, i, key)
		}
		l.at[name] = i
	}
	l.items = items
	return l, nil
}

// put adds or replaces the entry name; true when it replaced one.
func (l *dynsecEntries) put(name string, v map[string]any) bool {
	if i, ok := l.at[name]; ok {
		l.items[i] = v
		return true
	}
	l.at[name] = len(l.items)
	l.items = append(l.items, v)
	return false
}
