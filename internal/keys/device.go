// Device keys: the asymmetric private keys the gateway holds for
// devices whose readings it signs on their behalf (policy.SigningGateway),
// in the gateway's encrypted store, one state record per device
// ("devkey/<device id>"), and resolves them for the pipeline.
//
// The public halves are registered with the central service and come back
// in the policy; the private halves never leave the store (nor appear in
// logs, errors or command output). A record holds at most two keys, newest
// first: after a rotation the gateway keeps signing with the previous key
// until the policy in force names the new one, so no reading is ever
// signed with a key verifiers do not know yet.
//
// Imported by cmd/edgegate (device add, rotate-key, remove) and the daemon.

package keys

import (
	"encoding/json"
	"errors"
	"fmt"
	"sync"

	"github.com/edgegate/edgegate/internal/envelope"
)

// DeviceStore is what the device keys need of the encrypted store (queue.Queue).
type DeviceStore interface {
	GetState(name string) ([]byte, bool, error)
	PutState(name string, value []byte) error
	DeleteState(name string) error
}

// MaxDeviceKeys is how many private keys a record keeps (current and previous).
const MaxDeviceKeys = 2

// Name is the state record of a device's keys.
func DeviceKeyName(device string) string { return "devkey/" + device }

type record struct {
	Version int               `json:"v"`
	Keys    []json.RawMessage `json:"keys"` // private JWKs, newest first
}

// Load returns the device's private keys, newest first (none: nil, nil).
func LoadDeviceKeys(st DeviceStore, device string) ([]envelope.Key, error) {
	b, ok, err := st.GetState(DeviceKeyName(device))
	if err != nil || !ok {
		return nil, err
	}
	var rec record
	if err := json.Unmarshal(b, &rec); err != nil || rec.Version != 1 {
		return nil, fmt.Errorf("device keys of %s: malformed record", device)
	}
	keys := make([]envelope.Key, 0, len(rec.Keys))
	for i, raw := range rec.Keys {
		k, err := envelope.ParseKey(raw)
		if err != nil || !k.CanSign() {
			return nil, fmt.Errorf("device keys of %s: key %d is not a private key", device, i)
		}
		keys = append(keys, k)
	}
	return keys, nil
}

// Put replaces the device's keys (newest first; at most MaxDeviceKeys kept).
func PutDeviceKeys(st DeviceStore, device string, keys []envelope.Key) error {
	if len(keys) == 0 {
		return errors.New("device keys: none to store")
	}
	rec := record{Version: 1}
	for _, k := range keys[:min(len(keys), MaxDeviceKeys)] {
		b, err := k.PrivateJWK()
		if err != nil {
			return fmt.Errorf("device keys of %s: %w", device, err)
		}
		rec.Keys = append(rec.Keys, b)
	}
	b, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	return st.PutState(DeviceKeyName(device), b)
}

// Add puts k in front of the device's keys, keeping the previous one.
func AddDeviceKey(st DeviceStore, device string, k envelope.Key) error {
	old, err := LoadDeviceKeys(st, device)
	if err != nil {
		return err
	}
	return PutDeviceKeys(st, device, append([]envelope.Key{k}, old...))
}

// Delete forgets the device's keys.
func DeleteDeviceKeys(st DeviceStore, device string) error {
	return st.DeleteState(DeviceKeyName(device))
}

// Ring resolves signing keys for the pipeline (pipeline.KeyResolver),
// loading each device's record from the store on first use and again when
// the policy names a kid it does not hold.
type Ring struct {
	st DeviceStore

	mu    sync.Mutex
	cache map[string][]envelope.Key
}

// NewRing returns a Ring over the store.
func NewDeviceRing(st DeviceStore) *Ring { return &Ring{st: st, cache: map[string][]envelope.Key{}} }

// SigningKey returns the device's private key with id kid.
func (r *Ring) SigningKey(device, kid string) (envelope.Key, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if k, ok := find(r.cache[device], kid); ok {
		return k, true
	}
	keys, err := LoadDeviceKeys(r.st, device)
	if err != nil {
		return envelope.Key{}, false
	}
	r.cache[device] = keys
	return find(keys, kid)
}

func find(keys []envelope.Key, kid string) (envelope.Key, bool) {
	for _, k := range keys {
		if k.ID() == kid {
			return k, true
		}
	}
	return envelope.Key{}, false
}
