package policy

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/edgegate/edgegate/internal/envelope"
)

func TestCompileSigningModes(t *testing.T) {
	cur, err := envelope.GenerateKey(envelope.AlgEdDSA)
	if err != nil {
		t.Fatal(err)
	}
	old, _ := envelope.GenerateKey(envelope.AlgES256)
	pubs, err := PublicKeysJSON([]envelope.Key{cur.Public(), old.Public()})
	if err != nil {
		t.Fatal(err)
	}
	priv, _ := cur.PrivateJWK()
	with := func(signing string, keys ...json.RawMessage) Registration {
		r := reg("d1", "alice")
		r.Signing, r.PublicKeys = signing, keys
		return r
	}
	for _, tt := range []struct {
		name    string
		r       Registration
		wantErr string
	}{
		{"default is hs256", with(""), ""},
		{"gateway with keys", with(SigningGateway, pubs...), ""},
		{"device with keys", with(SigningDevice, pubs...), ""},
		{"device without keys", with(SigningDevice), "needs public_keys"},
		{"unknown mode", with("rsa"), "is not one of"},
		{"private key in the policy", with(SigningDevice, priv), "private key"},
		{"key twice", with(SigningDevice, pubs[0], pubs[0]), "twice"},
		{"garbage key", with(SigningDevice, json.RawMessage(`{"kty":"oct","k":"AAAA"}`)), "public_keys[0]"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			p, err := New(0, "config", []Registration{tt.r})
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("New = %v, want an error containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			d, _ := p.Device("d1")
			switch d.Signing() {
			case SigningHS256:
				if len(d.VerifyKeys()) != 1 || d.VerifyKeys()[0].ID() != d.Key().ID() || d.SigningKeyID() != "" {
					t.Fatalf("hs256 verify keys = %v", d.VerifyKeys())
				}
			case SigningGateway:
				if d.SigningKeyID() != cur.ID() {
					t.Fatalf("SigningKeyID = %q, want the newest %q", d.SigningKeyID(), cur.ID())
				}
				fallthrough
			case SigningDevice:
				if len(d.VerifyKeys()) != 2 || d.VerifyKeys()[1].ID() != old.ID() {
					t.Fatalf("verify keys = %v", d.VerifyKeys())
				}
			}
		})
	}
}
