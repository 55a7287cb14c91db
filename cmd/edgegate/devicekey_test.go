package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/edgegate/edgegate/internal/envelope"
	"github.com/edgegate/edgegate/internal/keys"
	"github.com/edgegate/edgegate/internal/sim/centralsim"
	"github.com/edgegate/edgegate/policy"
)

// TestDeviceSigningKeys: device add --signing ed25519 keeps the private key
// in the store and registers the public one; rotate-key adds a key and
// keeps the old; --signing device registers the device's key and hands
// out the private one only through --keys-out. The companion is the one
// that reads the publickey parameter (stock device.php ignores it) and
// puts the keys in the gateway's bundle.
func TestDeviceSigningKeys(t *testing.T) {
	f := newPairFixture(t, withCompanion, centralsim.PairingOptions{})
	ctx := context.Background()
	if res := f.runPair(t, ctx, func(code string) { _ = f.sim.ApproveDevice(code, "alice") }); res.err != nil {
		t.Fatalf("pair: %v\n%s", res.err, res.out)
	}
	run := func(args ...string) string {
		t.Helper()
		var out, errOut lockedBuffer
		if err := deviceWith(ctx, f.env, append([]string{args[0], "--config", f.cfgPath}, args[1:]...), &out, &errOut); err != nil {
			t.Fatalf("device %v: %v\n%s", args, err, errOut.String())
		}
		return out.String()
	}
	held := func(id string) []envelope.Key {
		t.Helper()
		q, err := openStore(f.env, storeFlags{stateDir: f.stateDir, credential: "store-key"})
		if err != nil {
			t.Fatal(err)
		}
		defer q.Close()
		keys, err := keys.LoadDeviceKeys(q, id)
		if err != nil {
			t.Fatal(err)
		}
		return keys
	}
	bundled := func(id string) policy.Registration {
		t.Helper()
		doc, err := f.sim.Bundle("gw-test-01")
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range doc.Devices {
			if r.ID == id {
				return r
			}
		}
		t.Fatalf("%s not in the bundle", id)
		return policy.Registration{}
	}

	out := run("add", "--type", "Thermometer", "--signing", "ed25519", "gk-1")
	keys := held("gk-1")
	r := bundled("gk-1")
	if len(keys) != 1 || r.Signing != policy.SigningGateway || len(r.PublicKeys) != 1 {
		t.Fatalf("after add: %d keys held, bundle %+v", len(keys), r)
	}
	if pub, _ := envelope.ParseKey(r.PublicKeys[0]); pub.ID() != keys[0].ID() || pub.CanSign() {
		t.Fatalf("registered key %s is not the public half of the held one %s", pub, keys[0])
	}
	if !strings.Contains(out, "EdDSA, by the gateway") || strings.Contains(out, `"d":`) {
		t.Errorf("device add output:\n%s", out)
	}

	run("rotate-key", "--alg", "es256", "gk-1")
	keys2 := held("gk-1")
	r = bundled("gk-1")
	if len(keys2) != 2 || keys2[1].ID() != keys[0].ID() || keys2[0].Alg() != envelope.AlgES256 || len(r.PublicKeys) != 2 {
		t.Fatalf("after rotate: held %v, bundle keys %d", keys2, len(r.PublicKeys))
	}

	keysOut := filepath.Join(f.dir, "dk-1.keys")
	run("add", "--type", "Thermometer", "--signing", "device", "--keys-out", keysOut, "dk-1")
	b, err := os.ReadFile(keysOut)
	if err != nil || !strings.Contains(string(b), "private_key: '{") {
		t.Fatalf("keys-out: %v\n%s", err, b)
	}
	if len(held("dk-1")) != 0 || bundled("dk-1").Signing != policy.SigningDevice {
		t.Fatalf("device-signed device: the gateway holds its key, or bundle %+v", bundled("dk-1"))
	}
	run("remove", "gk-1")
	if len(held("gk-1")) != 0 {
		t.Fatal("remove kept the device key")
	}
}
