package queue

import (
	"encoding/binary"
	"hash/fnv"
	"testing"
)

// TestBrokerHashIsFNV1a: the inline hash is hash/fnv's FNV-1a-64, so keys
// written before it was inlined still select their lanes.
func TestBrokerHashIsFNV1a(t *testing.T) {
	for _, b := range []string{"", "https://a.example/v2", "https://orion.example:8443/orion-filter/orion-1", "\x00\xff é"} {
		h := fnv.New64a()
		h.Write([]byte(b))
		got := brokerHash(b)
		if binary.BigEndian.Uint64(got[:]) != h.Sum64() {
			t.Errorf("brokerHash(%q) = %x, fnv %x", b, got, h.Sum64())
		}
	}
	if n := testing.AllocsPerRun(100, func() { _ = itemKey(prefixQueue, "https://a.example/v2", "dev0", 7) }); n > 1 {
		t.Errorf("itemKey: %.0f allocations, want 1 (the key)", n)
	}
}
