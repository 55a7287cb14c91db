package envelope_test

import (
	"bytes"
	"errors"
	"fmt"
	"time"

	"github.com/edgegate/edgegate/internal/envelope"
)

// A platform-side service verifies an NGSI update with the device's
// registered public keys, as it finds them in elementDetails.publickey: no
// secret, and nobody on the way — the gateway included — can have changed
// the reading.
func ExampleVerifyAttrsWith() {
	// The device's side (normally on the device): sign a reading.
	deviceKey, _ := envelope.GenerateKey(envelope.AlgEdDSA)
	claims := envelope.Claims{Version: envelope.Version, Device: "th-kitchen", Seq: 8,
		Time:  time.Date(2026, 11, 26, 5, 40, 11, 0, time.UTC),
		Attrs: map[string]envelope.Attr{"temperature": {Type: "Number", Value: 22.5}}}
	jws, _ := envelope.Seal(deviceKey, claims)
	body, _ := envelope.Body(claims, jws, "signature") // what the gateway forwards

	// The verifier's side: the registered public key(s), newest first.
	registered, _ := deviceKey.PublicJWK()
	keys, err := envelope.ParseKeys(registered)
	if err != nil {
		panic(err)
	}
	c, err := envelope.VerifyAttrsWith(body, keys, "signature")
	fmt.Println(err, c.Device, c.Seq, c.Gateway == "")

	// The same body with a value changed after signing.
	tampered := bytes.Replace(body, []byte(`"value":22.5`), []byte(`"value":30`), 1)
	_, err = envelope.VerifyAttrsWith(tampered, keys, "signature")
	fmt.Println(errors.Is(err, envelope.ErrTampered))
	// Output:
	// <nil> th-kitchen 8 true
	// true
}

// An entity read back from Orion (GET /v2/entities/{id}?type=T) is checked
// attribute by attribute: each carries the proof of the reading that last
// wrote it; the location the IoT Directory created is unsigned.
func ExampleVerifyEntity() {
	key, _ := envelope.DeriveHS256("th-kitchen", "k1-secret", "k2-secret")
	claims := envelope.Claims{Version: envelope.Version, Gateway: "gw-1", Device: "th-kitchen", Seq: 8,
		Time:  time.Date(2026, 11, 26, 5, 40, 11, 0, time.UTC),
		Attrs: map[string]envelope.Attr{"temperature": {Type: "Number", Value: 22.5}}}
	jws, _ := envelope.Seal(key, claims)
	body, _ := envelope.Body(claims, jws, "")
	// What Orion answers once it applied the PATCH to the entity.
	entity := append([]byte(`{"id":"th-kitchen","type":"Thermometer",`+
		`"latitude":{"type":"float","value":43.77,"metadata":{}},`), body[1:]...)

	rep, err := envelope.VerifyEntity(entity, []envelope.Key{key}, "")
	if err != nil {
		panic(err)
	}
	for _, a := range rep.Attrs {
		fmt.Println(a.Name, a.Verdict, a.Seq)
	}
	fmt.Println("failed proofs:", rep.Bad())
	// Output:
	// latitude unsigned 0
	// temperature verified 8
	// failed proofs: 0
}
