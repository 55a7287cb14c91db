package main

import (
	"strings"
	"testing"
	"time"
)

// pprof -traces output as `go tool pprof` prints it (go 1.26): a header,
// then one block per stack, the value on the leaf's line.
const tracesSample = `File: edgegate
Type: cpu
Duration: 2.46s, Total samples = 2.39s (97.18%)
-----------+-------------------------------------------------------
      10ms   runtime.memmove
             github.com/edgegate/edgegate/internal/envelope.sealRender
             github.com/edgegate/edgegate/internal/envelope.SealPacked
             github.com/edgegate/edgegate/internal/pipeline.(*gatewaySealed).seal
             github.com/mochi-mqtt/server/v2.(*Hooks).OnPublish
-----------+-------------------------------------------------------
     1.20s   internal/runtime/syscall/linux.Syscall6
             golang.org/x/sys/unix.Msync
             github.com/dgraph-io/ristretto/v2/z.Msync
             github.com/dgraph-io/badger/v4.(*DB).Sync
             github.com/edgegate/edgegate/internal/queue.(*Queue).commit
-----------+-------------------------------------------------------
      30ms   github.com/mochi-mqtt/server/v2.(*Client).Read
-----------+-------------------------------------------------------
      20ms   runtime.scanObject
             runtime.gcBgMarkWorker
-----------+-------------------------------------------------------
     500us   runtime.nanotime1
-----------+-------------------------------------------------------
`

func TestSplitTracesFirstPartWins(t *testing.T) {
	shares, total, err := splitTraces(strings.NewReader(tracesSample))
	if err != nil {
		t.Fatal(err)
	}
	if want := 1260*time.Millisecond + 500*time.Microsecond; total != want {
		t.Fatalf("total %v, want %v", total, want)
	}
	got := map[string]time.Duration{}
	for _, s := range shares {
		got[s.Name] = s.CPU
	}
	for name, want := range map[string]time.Duration{
		// Sealed inside the MQTT hook: signing, not MQTT.
		"sign (HS256 JWS per reading)": 10 * time.Millisecond,
		// The commit's msync: fsync, not the badger write around it.
		"queue: fsync (msync of badger's logs)": 1200 * time.Millisecond,
		"MQTT: receive, acknowledge":            30 * time.Millisecond,
		"Go runtime: GC in the background":      20 * time.Millisecond,
		profOther:                               500 * time.Microsecond,
	} {
		if got[name] != want {
			t.Errorf("%s: %v, want %v (all: %v)", name, got[name], want, got)
		}
	}
	if len(shares) != len(profParts)+1 || shares[len(shares)-1].Name != profOther {
		t.Errorf("shares %v: want every part in order, then %q", shares, profOther)
	}
}

func TestSplitTracesEmpty(t *testing.T) {
	if _, _, err := splitTraces(strings.NewReader("File: x\nType: cpu\n")); err == nil {
		t.Fatal("a profile without samples split without error")
	}
}
