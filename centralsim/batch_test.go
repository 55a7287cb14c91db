package centralsim

import (
	"bytes"
	"fmt"
	"sync"
	"testing"
	"time"
)

// batchOf wraps signed attribute bodies as entities of one op/update.
func batchOf(t *testing.T, ids []string, bodies [][]byte) []byte {
	t.Helper()
	var b bytes.Buffer
	b.WriteString(`{"actionType":"append","entities":[`)
	for i, body := range bodies {
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, `{"id":%q,"type":%q,`, ids[i], devType)
		b.Write(body[1:])
	}
	b.WriteString("]}")
	return b.Bytes()
}

func TestBatchUpdate(t *testing.T) {
	var mu sync.Mutex
	var seen []Update
	f := newFixture(t, func(o *Options) {
		o.OnUpdate = func(u Update) { mu.Lock(); seen = append(seen, u); mu.Unlock() }
	})
	url := f.sim.BrokerURL() + "/v2/op/update"
	b1, _ := sealed(t, devTemp, k1, k2, 1, 20.5)
	b2, _ := sealed(t, devTemp, k1, k2, 2, 21.5)
	bad, _ := sealed(t, devTemp, k1, "wrong", 3, 22.5)

	r := f.mustDo(t, "POST", url, f.token(t, "alice", time.Minute), batchOf(t, []string{devTemp, devTemp, devTemp}, [][]byte{b1, b2, bad}))
	if r.status != 204 {
		t.Fatalf("POST op/update = %d %s, want 204", r.status, r.body)
	}
	ups := f.sim.Updates()
	if len(ups) != 3 {
		t.Fatalf("updates = %d, want 3", len(ups))
	}
	for i, want := range []string{VerdictValid, VerdictValid, VerdictWrongKey} {
		if ups[i].Verdict != want {
			t.Errorf("update %d verdict = %q (%s), want %q", i, ups[i].Verdict, ups[i].Detail, want)
		}
	}
	if ups[0].Seq != 1 || ups[1].Seq != 2 {
		t.Errorf("seqs = %d, %d, want 1, 2 in array order", ups[0].Seq, ups[1].Seq)
	}
	mu.Lock()
	if len(seen) != 3 {
		t.Errorf("OnUpdate calls = %d, want 3", len(seen))
	}
	mu.Unlock()

	// A second copy of seq 1 is a duplicate.
	f.mustDo(t, "POST", url, f.token(t, "alice", time.Minute), batchOf(t, []string{devTemp}, [][]byte{b1}))
	if ups := f.sim.Updates(); !ups[len(ups)-1].Duplicate {
		t.Error("repeated (device, seq) not marked duplicate")
	}

	tests := []struct {
		name, user string
		body       []byte
		status     int
	}{
		{"stranger", "mallory", batchOf(t, []string{devTemp}, [][]byte{b1}), 401},
		{"read-only delegate", "reader", batchOf(t, []string{devTemp}, [][]byte{b1}), 401},
		{"one unknown entity refuses all", "alice", batchOf(t, []string{devTemp, "nope"}, [][]byte{b1, b2}), 401},
		{"not JSON", "alice", []byte("{"), 400},
		{"bad action", "alice", []byte(`{"actionType":"delete","entities":[{"id":"x"}]}`), 400},
		{"empty", "alice", []byte(`{"actionType":"append","entities":[]}`), 400},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := len(f.sim.Updates())
			r := f.mustDo(t, "POST", url, f.token(t, tt.user, time.Minute), tt.body)
			if r.status != tt.status {
				t.Errorf("status = %d %s, want %d", r.status, r.body, tt.status)
			}
			if got := len(f.sim.Updates()); got != before {
				t.Errorf("updates %d -> %d: a refused batch applied something", before, got)
			}
		})
	}
}

func TestDiscardUpdates(t *testing.T) {
	f := newFixture(t, func(o *Options) { o.DiscardUpdates = true })
	b1, _ := sealed(t, devTemp, k1, k2, 1, 20.5)
	if r := f.mustDo(t, "PATCH", f.patchURL(devTemp, nil), f.token(t, "alice", time.Minute), b1); r.status != 204 {
		t.Fatalf("PATCH = %d", r.status)
	}
	if n := len(f.sim.Updates()); n != 0 {
		t.Errorf("Updates() = %d with DiscardUpdates, want 0", n)
	}
}
