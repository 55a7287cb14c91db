package envelope_test

import (
	"errors"
	"fmt"
	"time"

	"github.com/edgegate/edgegate/envelope"
)

// A platform-side service verifies an NGSI update (or an entity read back
// from the broker) with the device's registered public keys, as it finds
// them in elementDetails.publickey: no secret, and nobody on the way —
// the gateway included — can have changed the reading.
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
	tampered := []byte(string(body[:len(body)-1]) + `,"temperature":{"type":"Number","value":30}}`)
	_, err = envelope.VerifyAttrsWith(tampered, keys, "signature")
	fmt.Println(errors.Is(err, envelope.ErrTampered))
	// Output:
	// <nil> th-kitchen 8 true
	// true
}
