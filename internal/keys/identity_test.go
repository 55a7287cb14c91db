package keys

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"log/slog"
	"strings"
	"testing"

	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jwk"
	"github.com/lestrrat-go/jwx/v2/jws"

	"github.com/edgegate/edgegate/internal/queue"
)

func openStore(t *testing.T, dir string) *queue.Queue {
	t.Helper()
	q, err := queue.Open(queue.Options{Dir: dir, Key: bytes.Repeat([]byte{7}, 32)})
	if err != nil {
		t.Fatalf("open store: %v", err)
	}
	return q
}

func TestLoadGeneratesOnceAndPersists(t *testing.T) {
	dir := t.TempDir()
	q := openStore(t, dir)
	id1, err := LoadIdentity(q)
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	seed, ok, err := q.GetState(IdentityStateName)
	if err != nil || !ok || len(seed) != ed25519.SeedSize {
		t.Fatalf("stored seed: ok=%v len=%d err=%v", ok, len(seed), err)
	}
	id2, err := LoadIdentity(q)
	if err != nil {
		t.Fatalf("second Load: %v", err)
	}
	if id1.Thumbprint() != id2.Thumbprint() {
		t.Fatalf("thumbprint changed within one store: %s vs %s", id1.Thumbprint(), id2.Thumbprint())
	}
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	// A "restart": the same store, reopened.
	q = openStore(t, dir)
	defer q.Close()
	id3, err := LoadIdentity(q)
	if err != nil {
		t.Fatalf("Load after reopen: %v", err)
	}
	if id3.Thumbprint() != id1.Thumbprint() {
		t.Fatalf("thumbprint after restart = %s, want %s", id3.Thumbprint(), id1.Thumbprint())
	}
}

type mapStore map[string][]byte

func (m mapStore) GetState(n string) ([]byte, bool, error) { v, ok := m[n]; return v, ok, nil }
func (m mapStore) PutState(n string, v []byte) error       { m[n] = append([]byte(nil), v...); return nil }

func TestLoadRefusesCorruptSeed(t *testing.T) {
	st := mapStore{IdentityStateName: []byte("short")}
	if _, err := LoadIdentity(st); err == nil || !strings.Contains(err.Error(), "5 bytes") {
		t.Fatalf("LoadIdentity(corrupt) = %v, want a length error", err)
	}
}

// RFC 8037 appendix A.1/A.3: the Ed25519 key and its RFC 7638 thumbprint.
func TestThumbprintRFC8037Vector(t *testing.T) {
	seed, _ := base64.RawURLEncoding.DecodeString("nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A")
	id, err := LoadIdentity(mapStore{IdentityStateName: seed})
	if err != nil {
		t.Fatal(err)
	}
	const want = "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
	if got := id.Thumbprint(); got != want {
		t.Fatalf("Thumbprint() = %q, want %q", got, want)
	}
	// And by hand, from the members RFC 7638 names, in lexical order.
	x := base64.RawURLEncoding.EncodeToString(id.PublicKey())
	sum := sha256.Sum256([]byte(`{"crv":"Ed25519","kty":"OKP","x":"` + x + `"}`))
	if got := base64.RawURLEncoding.EncodeToString(sum[:]); got != want {
		t.Fatalf("hand thumbprint = %q, want %q", got, want)
	}
	pk := id.PublicJWK()
	if pk.KeyID() != want || pk.Algorithm() != jwa.EdDSA {
		t.Fatalf("PublicJWK kid=%q alg=%v", pk.KeyID(), pk.Algorithm())
	}
	if _, isPriv := pk.(jwk.OKPPrivateKey); isPriv {
		t.Fatal("PublicJWK is a private key")
	}
}

func TestSignVerifiableWithEmbeddedJWK(t *testing.T) {
	id, err := LoadIdentity(mapStore{})
	if err != nil {
		t.Fatal(err)
	}
	payload := []byte(`{"hello":"central"}`)
	compact, err := id.Sign(payload, map[string]any{"typ": "edgegate-receipt+jws"})
	if err != nil {
		t.Fatalf("Sign: %v", err)
	}
	msg, err := jws.Parse([]byte(compact), jws.WithCompact())
	if err != nil {
		t.Fatal(err)
	}
	h := msg.Signatures()[0].ProtectedHeaders()
	if h.KeyID() != id.Thumbprint() || h.Algorithm() != jwa.EdDSA || h.Type() != "edgegate-receipt+jws" {
		t.Fatalf("header kid=%q alg=%v typ=%q", h.KeyID(), h.Algorithm(), h.Type())
	}
	// A verifier that knows nothing but the token: key from the header,
	// bound to the kid by recomputing the thumbprint.
	hk := h.JWK()
	if hk == nil {
		t.Fatal("no jwk header")
	}
	tp, _ := hk.Thumbprint(0x5) // crypto.SHA256
	if base64.RawURLEncoding.EncodeToString(tp) != h.KeyID() {
		t.Fatal("kid is not the thumbprint of the jwk header")
	}
	got, err := jws.Verify([]byte(compact), jws.WithKey(jwa.EdDSA, hk))
	if err != nil || !bytes.Equal(got, payload) {
		t.Fatalf("Verify = %q, %v", got, err)
	}
	if _, err := id.Verify([]byte(compact)); err != nil {
		t.Fatalf("id.Verify: %v", err)
	}
	other, _ := LoadIdentity(mapStore{})
	if _, err := other.Verify([]byte(compact)); err == nil {
		t.Fatal("another identity verified the signature")
	}
}

func TestSignRefusesReservedHeaders(t *testing.T) {
	id, _ := LoadIdentity(mapStore{})
	for _, h := range []string{"alg", "kid", "jwk", "crit", "b64"} {
		if _, err := id.Sign([]byte("x"), map[string]any{h: "none"}); err == nil {
			t.Errorf("Sign(extra %q) succeeded, want refusal", h)
		}
	}
}

func TestNeverShowsPrivateKey(t *testing.T) {
	st := mapStore{}
	id, err := LoadIdentity(st)
	if err != nil {
		t.Fatal(err)
	}
	seed := st[IdentityStateName]
	priv := ed25519.NewKeyFromSeed(seed)
	secrets := []string{
		hex.EncodeToString(seed), base64.RawURLEncoding.EncodeToString(seed), base64.StdEncoding.EncodeToString(seed),
		hex.EncodeToString(priv), base64.RawURLEncoding.EncodeToString(priv),
		strings.TrimSuffix(fmt.Sprint([]byte(seed)), "]"), strings.TrimSuffix(fmt.Sprintf("%x", []byte(seed)), "]"),
	}
	var logs bytes.Buffer
	slog.New(slog.NewJSONHandler(&logs, nil)).Info("loaded", "identity", id)
	pub, _ := json.Marshal(id.PublicJWK())
	outs := []string{
		id.String(), fmt.Sprintf("%v", id), fmt.Sprintf("%+v", id), fmt.Sprintf("%#v", id),
		fmt.Sprintf("%s", id), fmt.Sprintf("%x", id), fmt.Sprintf("%v", *id), logs.String(), string(pub),
	}
	for _, out := range outs {
		for _, s := range secrets {
			if strings.Contains(out, s) {
				t.Fatalf("output %q shows the private key", out)
			}
		}
		if strings.Contains(out, `"d"`) {
			t.Fatalf("output %q has a private JWK member", out)
		}
	}
	if !strings.Contains(id.String(), id.Thumbprint()) {
		t.Fatalf("String() = %q, want the thumbprint", id.String())
	}
}
