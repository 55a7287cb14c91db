package keys

import (
	"strings"
	"testing"

	"github.com/edgegate/edgegate/internal/envelope"
)

type memStore map[string][]byte

func (m memStore) GetState(n string) ([]byte, bool, error) { b, ok := m[n]; return b, ok, nil }
func (m memStore) PutState(n string, v []byte) error       { m[n] = v; return nil }
func (m memStore) DeleteState(n string) error              { delete(m, n); return nil }

func TestAddRotateRing(t *testing.T) {
	st := memStore{}
	k1, _ := envelope.GenerateKey(envelope.AlgEdDSA)
	k2, _ := envelope.GenerateKey(envelope.AlgES256)
	k3, _ := envelope.GenerateKey(envelope.AlgEdDSA)
	ring := NewDeviceRing(st)
	if _, ok := ring.SigningKey("d", k1.ID()); ok {
		t.Fatal("key found in an empty store")
	}
	for _, k := range []envelope.Key{k1, k2, k3} {
		if err := AddDeviceKey(st, "d", k); err != nil {
			t.Fatal(err)
		}
	}
	keys, err := LoadDeviceKeys(st, "d")
	if err != nil || len(keys) != MaxDeviceKeys || keys[0].ID() != k3.ID() || keys[1].ID() != k2.ID() {
		t.Fatalf("Load = %v, %v, want [k3 k2]", keys, err)
	}
	if k, ok := ring.SigningKey("d", k2.ID()); !ok || !k.CanSign() {
		t.Fatal("ring does not resolve the previous key")
	}
	if _, ok := ring.SigningKey("d", k1.ID()); ok {
		t.Fatal("ring resolves a key dropped from the record")
	}
	if strings.Contains(k3.String(), `"d"`) {
		t.Fatal("String shows the private key")
	}
	if err := DeleteDeviceKeys(st, "d"); err != nil || len(st) != 0 {
		t.Fatalf("Delete = %v, store %v", err, st)
	}
}
