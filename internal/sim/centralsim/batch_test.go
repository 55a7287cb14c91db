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
	// The bare Orion: no filter, no token.
	url := f.sim.DirectBrokerURL() + "/v2/op/update"
	b1, _ := sealed(t, devTemp, k1, k2, 1, 20.5)
	b2, _ := sealed(t, devTemp, k1, k2, 2, 21.5)
	bad, _ := sealed(t, devTemp, k1, "wrong", 3, 22.5)

	r := f.mustDo(t, "POST", url, "", batchOf(t, []string{devTemp, devTemp, devTemp}, [][]byte{b1, b2, bad}))
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
		if ups[i].User != "" {
			t.Errorf("update %d user = %q: the bare Orion knows no user", i, ups[i].User)
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
	if e, _ := f.sim.Entity(devTemp); e["temperature"].(map[string]any)["value"] != 22.5 {
		t.Errorf("temperature = %v, want the last entity's 22.5", e["temperature"])
	}

	// A second copy of seq 1 is a duplicate.
	f.mustDo(t, "POST", url, "", batchOf(t, []string{devTemp}, [][]byte{b1}))
	if ups := f.sim.Updates(); !ups[len(ups)-1].Duplicate {
		t.Error("repeated (device, seq) not marked duplicate")
	}

	// append creates a missing entity (Orion's default type when none).
	r = f.mustDo(t, "POST", url, "", []byte(`{"actionType":"append","entities":[{"id":"new-1","x":{"type":"Number","value":1}}]}`))
	if e, ok := f.sim.Entity("new-1"); r.status != 204 || !ok || e["type"] != "Thing" {
		t.Fatalf("append of a new entity: %d %s, entity %v", r.status, r.body, e)
	}

	// Orion 3.12's answers (error_responses_09b_batch_update_update.test).
	tests := []struct {
		name       string
		body       string
		status     int
		code, desc string
		recorded   int
	}{
		{"update: no entity exists", `{"actionType":"update","entities":[{"id":"F","type":"T","A":{"value":1}},{"id":"G","type":"T","A":{"value":1}}]}`,
			404, "NotFound", "do not exist: F/T - [entity itself], G/T [entity itself]", 0},
		{"update: nothing written", `{"actionType":"update","entities":[{"id":"new-1","type":"Thing","C":{"value":1},"D":{"value":1}},{"id":"G","type":"T","A":{"value":1}}]}`,
			422, "Unprocessable", "do not exist: new-1/Thing - [ C, D ], G/T [entity itself]", 0},
		{"update: partial", `{"actionType":"update","entities":[{"id":"new-1","type":"Thing","x":{"value":2},"D":{"value":1}},{"id":"G","type":"T","A":{"value":1}}]}`,
			422, "PartialUpdate", "do not exist: new-1/Thing - [ D ], G/T [entity itself]", 1},
		{"appendStrict: existing attribute", `{"actionType":"appendStrict","entities":[{"id":"new-1","x":{"value":3},"y":{"value":1}}]}`,
			422, "PartialUpdate", "one or more of the attributes in the request already exist: new-1 - [ x ]", 1},
		{"not JSON", `{`, 400, "ParseError", orionParseErrorDesc, 0},
		{"bad action", `{"actionType":"upsert","entities":[{"id":"x"}]}`, 400, "BadRequest", "invalid update action type: right ones are: append, appendStric, delete, replace, update", 0},
		{"delete is not simulated", `{"actionType":"delete","entities":[{"id":"x"}]}`, 501, "NotImplemented", "", 0},
		{"empty", `{"actionType":"append","entities":[]}`, 400, "BadRequest", "empty entities vector", 0},
		{"entity without id", `{"actionType":"append","entities":[{"type":"T"}]}`, 400, "BadRequest", "entity id length: 0, min length supported: 1", 0},
		{"forbidden value", `{"actionType":"append","entities":[{"id":"new-1","x":{"value":"a<b"}}]}`, 400, "BadRequest", OrionInvalidValueChars, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := len(f.sim.Updates())
			r := f.mustDo(t, "POST", url, "", []byte(tt.body))
			oe := orionErr(t, r)
			if r.status != tt.status || oe.Error != tt.code || (tt.desc != "" && oe.Description != tt.desc) {
				t.Errorf("got %d %+v, want %d %s %q", r.status, oe, tt.status, tt.code, tt.desc)
			}
			if got := len(f.sim.Updates()) - before; got != tt.recorded {
				t.Errorf("%d updates recorded, want %d", got, tt.recorded)
			}
		})
	}
	if e, _ := f.sim.Entity("new-1"); e["x"].(map[string]any)["value"] != 2.0 || e["y"] == nil {
		t.Errorf("after the partial update and appendStrict: %v", e)
	}

	// The filter has no op/update: Spring's 404 once the filter let the
	// request through, its 401 when no elementid names an element.
	alice := f.token(t, "alice", time.Minute)
	r = f.mustDo(t, "POST", f.sim.BrokerURL()+"/v2/op/update", alice, batchOf(t, []string{devTemp}, [][]byte{b1}))
	if r.status != 401 || r.message(t) != MsgMissingElementID {
		t.Errorf("op/update through the filter: %d %s", r.status, r.body)
	}
	r = f.mustDo(t, "POST", f.sim.BrokerURL()+"/v2/op/update?elementid="+devTemp, alice, batchOf(t, []string{devTemp}, [][]byte{b1}))
	if st, _ := springErr(t, r); r.status != 404 || st != 404 {
		t.Errorf("op/update through the filter with an elementid: %d %s", r.status, r.body)
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
