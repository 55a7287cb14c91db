package centralsync

import (
	"context"
	"slices"
	"strings"
	"testing"

	"github.com/edgegate/edgegate/policy"
)

// Kind and writable attributes go from the registry into the policy.
func TestRegistryKindWritable(t *testing.T) {
	r := NewRegistry(newMemState())
	if err := r.Put(context.Background(), RegistryEntry{ID: "relay-1", Type: "Relay", Kind: policy.KindActuator, Writable: []string{"status"}}); err != nil {
		t.Fatal(err)
	}
	reg, ok := r.Lookup("relay-1")
	if !ok || reg.Kind != policy.KindActuator || !slices.Equal(reg.Writable, []string{"status"}) {
		t.Fatalf("Lookup = %+v, %v", reg, ok)
	}
	for _, tt := range []struct {
		name string
		e    RegistryEntry
		want string
	}{
		{"kind", RegistryEntry{ID: "a", Type: "T", Kind: "switch"}, "kind"},
		{"writable", RegistryEntry{ID: "a", Type: "T", Writable: []string{"a b"}}, "writable"},
	} {
		if err := r.Put(context.Background(), tt.e); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: Put = %v, want an error mentioning %q", tt.name, err, tt.want)
		}
	}
}

// The ownership source takes kind and writable from the registry: a stock
// ownership row has neither.
func TestOverlayKindWritable(t *testing.T) {
	reg := policy.Registration{ID: "relay-1", Type: "Relay"}
	overlay(&reg, policy.Registration{Kind: policy.KindActuator, Writable: []string{"status"}})
	if reg.Kind != policy.KindActuator || !slices.Equal(reg.Writable, []string{"status"}) {
		t.Fatalf("overlay = %+v", reg)
	}
}
