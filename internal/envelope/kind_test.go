package envelope

import (
	"errors"
	"fmt"
	"testing"
	"time"
)

// A command's envelope (Kind "command") opens with the device's key, and
// never verifies as a reading: not as an entity's signature metadata, not
// as an update body.
func TestCommandEnvelopeIsNoReading(t *testing.T) {
	k, err := DeriveHS256("relay-1", "k1-relay-0123", "k2-relay-0123")
	if err != nil {
		t.Fatal(err)
	}
	c := Claims{Version: Version, Gateway: "gw", Device: "relay-1", Seq: 3, Time: time.Unix(1700000000, 0).UTC(),
		Attrs: map[string]Attr{"status": {Type: "Boolean", Value: true}}, Kind: KindCommand}
	jws, err := Seal(k, c)
	if err != nil {
		t.Fatal(err)
	}
	got, err := Open(jws, k)
	if err != nil || got.Kind != KindCommand || got.Seq != 3 {
		t.Fatalf("Open = %+v, %v", got, err)
	}
	entity := fmt.Sprintf(`{"id":"relay-1","type":"Relay","status":{"type":"Boolean","value":true,"metadata":{"signature":{"type":"Text","value":%q}}}}`, jws)
	rep, err := VerifyEntity([]byte(entity), []Key{k}, "")
	if err != nil || len(rep.Attrs) != 1 || rep.Attrs[0].Verdict != Tampered {
		t.Fatalf("VerifyEntity of a command as a signature = %+v, %v; want tampered", rep, err)
	}
	body := fmt.Sprintf(`{"status":{"type":"Boolean","value":true,"metadata":{"signature":{"type":"Text","value":%q}}}}`, jws)
	if _, err := VerifyAttrs([]byte(body), k, ""); !errors.Is(err, ErrTampered) {
		t.Fatalf("VerifyAttrs of a command = %v, want ErrTampered", err)
	}
	// A reading's claims serialise as before: no "kind" member.
	c.Kind = ""
	b, _ := appendClaims(nil, &c)
	if want := `{"v":1,"gw":"gw","dev":"relay-1","seq":3,"t":"2023-11-14T22:13:20Z","attrs":{"status":{"type":"Boolean","value":true}}}`; string(b) != want {
		t.Fatalf("reading claims = %s, want %s", b, want)
	}
}
