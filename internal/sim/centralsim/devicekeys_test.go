package centralsim

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/envelope"
	"github.com/edgegate/edgegate/policy"
)

// TestDeviceSignedVerdicts: a device registered with a public key and
// signing "device" is verified with that key only: its own signature is
// valid, an HS256 signature from K1/K2 (what a gateway could forge) is
// "wrong key"; after a rotation old and new readings both verify.
func TestDeviceSignedVerdicts(t *testing.T) {
	f := newFixture(t)
	oldKey, _ := envelope.GenerateKey(envelope.AlgEdDSA)
	newKey, _ := envelope.GenerateKey(envelope.AlgES256)
	pub, _ := oldKey.PublicJWK()
	if err := f.sim.AddDeviceChecked(Device{ID: devFree, Type: devType, Owner: "alice", K1: "a", K2: "b", Attrs: []string{"t"},
		Signing: policy.SigningDevice, PublicKeys: []json.RawMessage{pub}}); err != nil {
		t.Fatal(err)
	}
	tok := f.token(t, "alice", time.Minute)
	body := func(k envelope.Key, seq uint64) []byte {
		c := envelope.Claims{Version: envelope.Version, Device: devFree, Seq: seq, Time: time.Now().UTC(),
			Attrs: map[string]envelope.Attr{"t": {Type: "Number", Value: 1.0}}}
		compact, err := envelope.Seal(k, c)
		if err != nil {
			t.Fatal(err)
		}
		return signedBody(t, c, compact)
	}
	hs, _ := envelope.DeriveHS256(devFree, "a", "b")
	oldReading := body(oldKey, 1)
	newPub, _ := newKey.PublicJWK()
	steps := []struct {
		name    string
		rotate  bool
		body    []byte
		verdict string
		kid     string
	}{
		{"device's own signature", false, oldReading, VerdictValid, oldKey.ID()},
		{"forged by the gateway with K1/K2", false, body(hs, 2), VerdictWrongKey, ""},
		{"new key before it is registered", false, body(newKey, 3), VerdictWrongKey, ""},
		{"new key after rotation", true, body(newKey, 4), VerdictValid, newKey.ID()},
		{"old reading after rotation", false, oldReading, VerdictValid, oldKey.ID()},
	}
	for i, st := range steps {
		if st.rotate {
			if err := f.sim.RotateDeviceKey(devFree, newPub); err != nil {
				t.Fatal(err)
			}
		}
		if r := f.mustDo(t, "PATCH", f.patchURL(devFree, nil), tok, st.body); r.status != 204 {
			t.Fatalf("%s: status %d %s", st.name, r.status, r.body)
		}
		u := f.sim.Updates()[i]
		if u.Verdict != st.verdict || u.KeyID != st.kid {
			t.Fatalf("%s: verdict %q kid %q (%s), want %q %q", st.name, u.Verdict, u.KeyID, u.Detail, st.verdict, st.kid)
		}
	}
	rows := f.sim.OwnershipRows("alice")
	var det ElementDetails
	for _, r := range rows {
		if r.ElementName != devFree {
			continue
		}
		raw := r.ElementDetails
		var s string
		if json.Unmarshal(raw, &s) == nil {
			raw = []byte(s)
		}
		if err := json.Unmarshal(raw, &det); err != nil {
			t.Fatal(err)
		}
	}
	if k, err := envelope.ParseKey([]byte(det.PublicKey)); err != nil || k.ID() != newKey.ID() {
		t.Fatalf("elementDetails.publickey = %q (%v), want the newest key", det.PublicKey, err)
	}
	if keys, err := envelope.ParseKeys([]byte(det.PublicKeys)); err != nil || len(keys) != 2 {
		t.Fatalf("elementDetails.publickeys = %q (%v)", det.PublicKeys, err)
	}
}
