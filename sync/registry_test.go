package centralsync

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/edgegate/edgegate/policy"
)

// memState is a StateStore in memory, counting writes; failPut makes
// PutState fail.
type memState struct {
	mu      sync.Mutex
	m       map[string][]byte
	puts    int
	failPut error
}

func newMemState() *memState { return &memState{m: map[string][]byte{}} }

func (s *memState) GetState(name string) ([]byte, bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	b, ok := s.m[name]
	return append([]byte(nil), b...), ok, nil
}

func (s *memState) PutState(name string, v []byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.failPut != nil {
		return s.failPut
	}
	s.puts++
	s.m[name] = append([]byte(nil), v...)
	return nil
}

func TestRegistryPutLookupPersist(t *testing.T) {
	ctx := context.Background()
	st := newMemState()
	r := NewRegistry(st)
	if _, ok := r.Lookup("th-1"); ok {
		t.Fatal("empty registry found a device")
	}
	radio := &policy.RadioBinding{Port: "/dev/ttyUSB0", Node: 12, Child: -1}
	if err := r.Put(ctx, RegistryEntry{ID: "th-1", Type: "Thermometer", Broker: "orion-1", Radio: radio,
		Signing: policy.SigningDevice, PublicKeys: []json.RawMessage{json.RawMessage(`{"kty":"OKP"}`)}, Attributes: []string{"temperature"}}); err != nil {
		t.Fatal(err)
	}
	if err := r.Put(ctx, RegistryEntry{ID: "del-1", Type: "Meter", MQTT: true, Delegated: true, K1: "k1-canary", K2: "k2-canary"}); err != nil {
		t.Fatal(err)
	}
	radio.Node = 99 // the registry keeps its own copy
	reg, ok := r.Lookup("th-1")
	if !ok || reg.ID != "th-1" || reg.Type != "Thermometer" || reg.Radio == nil || reg.Radio.Node != 12 ||
		reg.Signing != policy.SigningDevice || len(reg.PublicKeys) != 1 || reg.Broker != "" {
		t.Errorf("Lookup(th-1) = %+v, %v", reg, ok)
	}
	reg.Radio.Node = 7 // nor does a caller's edit reach it
	if again, _ := r.Lookup("th-1"); again.Radio.Node != 12 {
		t.Error("Lookup shares its binding with the caller")
	}
	if d, ok := r.Lookup("del-1"); !ok || d.K1 != "k1-canary" || d.K2 != "k2-canary" || d.Radio != nil {
		t.Errorf("Lookup(del-1) = %v", ok)
	}

	// A new Registry over the same store sees the same.
	r2 := NewRegistry(st)
	l, err := r2.List()
	if err != nil || len(l) != 2 || l[0].ID != "del-1" || l[1].ID != "th-1" || l[1].Broker != "orion-1" {
		t.Fatalf("List after reopen = %v, %v", l, err)
	}
	if s := fmt.Sprintf("%v %#v %s", l[0], l[0], l[0].String()); strings.Contains(s, "canary") {
		t.Errorf("an entry prints its keys: %s", s)
	}
	found, err := r2.Delete("th-1")
	if err != nil || !found {
		t.Fatalf("Delete = %v, %v", found, err)
	}
	if found, err := r2.Delete("th-1"); err != nil || found {
		t.Errorf("second Delete = %v, %v", found, err)
	}
	if _, ok := NewRegistry(st).Lookup("th-1"); ok {
		t.Error("deleted entry still stored")
	}
}

func TestRegistryRefusesBadEntries(t *testing.T) {
	r := NewRegistry(newMemState())
	for _, tt := range []struct {
		name string
		e    RegistryEntry
		want string
	}{
		{"bad id", RegistryEntry{ID: "a/b", Type: "T"}, "device id"},
		{"no type", RegistryEntry{ID: "a", Type: ""}, "type"},
		{"radio and mqtt", RegistryEntry{ID: "a", Type: "T", MQTT: true, Radio: &policy.RadioBinding{Port: "/dev/x", Node: 1, Child: -1}}, "exclude"},
		{"node range", RegistryEntry{ID: "a", Type: "T", Radio: &policy.RadioBinding{Port: "/dev/x", Node: 300, Child: -1}}, "0..254"},
		{"signing", RegistryEntry{ID: "a", Type: "T", Signing: "rsa"}, "signing"},
		{"one key", RegistryEntry{ID: "a", Type: "T", K1: "x"}, "K1 and K2"},
		{"attribute", RegistryEntry{ID: "a", Type: "T", Attributes: []string{"bad name"}}, "attribute"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if err := r.Put(context.Background(), tt.e); err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("Put = %v, want an error mentioning %q", err, tt.want)
			}
		})
	}
	if l, _ := r.List(); len(l) != 0 {
		t.Errorf("refused entries stored: %v", l)
	}
}

// TestRegistryFailedWriteKeepsOld: a failed PutState leaves the registry
// as it was, in memory too.
func TestRegistryFailedWriteKeepsOld(t *testing.T) {
	st := newMemState()
	r := NewRegistry(st)
	ctx := context.Background()
	if err := r.Put(ctx, RegistryEntry{ID: "a", Type: "T", MQTT: true}); err != nil {
		t.Fatal(err)
	}
	st.failPut = errors.New("disk full")
	if err := r.Put(ctx, RegistryEntry{ID: "b", Type: "T", MQTT: true}); err == nil || !strings.Contains(err.Error(), "disk full") {
		t.Errorf("Put with a failing store = %v", err)
	}
	if _, err := r.Delete("a"); err == nil {
		t.Error("Delete with a failing store succeeded")
	}
	if l, _ := r.List(); len(l) != 1 || l[0].ID != "a" {
		t.Errorf("after failed writes: %v", l)
	}
}

func TestRegistryCorruptRecord(t *testing.T) {
	st := newMemState()
	st.m[RegistryRecord] = []byte("{not json")
	r := NewRegistry(st)
	if _, err := r.List(); err == nil || !strings.Contains(err.Error(), "device registry") {
		t.Errorf("List of a corrupt record = %v", err)
	}
	if _, ok := r.Lookup("a"); ok {
		t.Error("Lookup found a device in a corrupt registry")
	}
	if err := r.Put(context.Background(), RegistryEntry{ID: "a", Type: "T"}); err == nil {
		t.Error("Put over a corrupt record silently replaced it")
	}
}

// TestRegistryConcurrent: the daemon looks devices up on every sync while
// the admin socket writes (run with -race).
func TestRegistryConcurrent(t *testing.T) {
	r := NewRegistry(newMemState())
	ctx := context.Background()
	var wg sync.WaitGroup
	for w := 0; w < 4; w++ {
		wg.Add(2)
		go func() {
			defer wg.Done()
			for i := 0; i < 50; i++ {
				if err := r.Put(ctx, RegistryEntry{ID: fmt.Sprintf("d-%d-%d", w, i), Type: "T", MQTT: true}); err != nil {
					t.Error(err)
					return
				}
			}
		}()
		go func() {
			defer wg.Done()
			for i := 0; i < 200; i++ {
				r.Lookup(fmt.Sprintf("d-%d-%d", w, i%50))
				if _, err := r.List(); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	if l, _ := r.List(); len(l) != 200 {
		t.Errorf("%d entries, want 200", len(l))
	}
}
