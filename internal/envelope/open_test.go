package envelope

import (
	"errors"
	"reflect"
	"testing"
)

// generalOpen forces OpenWith's general (jwx) path: without a rendered
// header no key matches the fast path.
func generalOpen(compact string, k Key) (Claims, error) {
	k.hdr = ""
	return OpenWith(compact, []Key{k})
}

// errClass names the sentinel an error wraps, for comparing verdicts.
func errClass(err error) string {
	for _, s := range []error{ErrMalformed, ErrWrongKey, ErrTampered} {
		if errors.Is(err, s) {
			return s.Error()
		}
	}
	if err != nil {
		return "other: " + err.Error()
	}
	return "ok"
}

// TestOpenFastAgreesWithJWX flips every byte of a sealed envelope of each
// algorithm (and truncates it at every length) and checks that the fast
// path and jwx reach the same verdict and, when valid, the same claims.
func TestOpenFastAgreesWithJWX(t *testing.T) {
	hs := testKey(t, "th-1", "k1-aaa", "k2-bbb")
	ed, err := GenerateKey(AlgEdDSA)
	if err != nil {
		t.Fatal(err)
	}
	es, err := GenerateKey(AlgES256)
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range []Key{hs, ed, es} {
		t.Run(k.Alg(), func(t *testing.T) {
			jws, err := Seal(k, ClaimsOf("gw-1", 7, sampleReading()))
			if err != nil {
				t.Fatal(err)
			}
			fast, fastErr := OpenWith(jws, []Key{k})
			if _, ok, _ := openFast(jws, []Key{k}); !ok {
				t.Fatal("the fast path did not take an envelope Seal produced")
			}
			slow, slowErr := generalOpen(jws, k)
			if fastErr != nil || slowErr != nil || !reflect.DeepEqual(fast, slow) {
				t.Fatalf("valid envelope: fast %+v, %v; jwx %+v, %v", fast, fastErr, slow, slowErr)
			}
			variants := make([]string, 0, 2*len(jws))
			for i := range len(jws) {
				b := []byte(jws)
				b[i] ^= 0x01
				variants = append(variants, string(b), jws[:i])
			}
			differ := 0
			for _, v := range variants {
				_, e1 := OpenWith(v, []Key{k})
				_, e2 := generalOpen(v, k)
				if errClass(e1) == "ok" && errClass(e2) != "ok" {
					t.Errorf("fast path accepted what jwx refuses (%s): %q", errClass(e2), v)
				}
				if (errClass(e1) == "ok") != (errClass(e2) == "ok") {
					differ++
				}
			}
			if differ > 0 {
				t.Errorf("%d of %d altered envelopes got a different verdict", differ, len(variants))
			}
		})
	}
}

// TestOpenFastRefusesForgery: a changed payload or signature is tampered,
// whichever path verifies it.
func TestOpenFastRefusesForgery(t *testing.T) {
	k := testKey(t, "th-1", "k1-aaa", "k2-bbb")
	other := testKey(t, "th-1", "k1-zzz", "k2-bbb")
	jws, err := Seal(other, ClaimsOf("gw-1", 1, sampleReading()))
	if err != nil {
		t.Fatal(err)
	}
	// Same header shape, the header of k, the signature of other.
	forged := k.hdr + jws[len(other.hdr):]
	if _, err := OpenWith(forged, []Key{k}); !errors.Is(err, ErrTampered) {
		t.Fatalf("signature of another key under this key's header: %v, want ErrTampered", err)
	}
}
