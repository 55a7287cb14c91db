package envelope

import (
	"bytes"
	"errors"
	"strings"
	"testing"

	"github.com/edgegate/edgegate/internal/reading"
)

// TestPackedBodyExpandsToBody: what the queue stores renders back, byte
// for byte, into the body Orion receives — for every algorithm, value
// kind, signature metadata name (before and after TimeInstant) and for
// attributes out of order (the map path) — and BodyLen knows its length
// without rendering it.
func TestPackedBodyExpandsToBody(t *testing.T) {
	rs := sealBodyReadings()
	s := sampleReading()
	rs = append(rs, &reading.Reading{Device: s.Device, Time: s.Time, Attrs: []reading.Attribute{s.Attrs[1], s.Attrs[0]}})
	for _, k := range allAlgKeys(t) {
		for _, r := range rs {
			for _, sigMeta := range []string{"", "Asig", "sig\"<"} {
				packed, err := SealPacked(k, "gw-1", 7, r, sigMeta)
				if err != nil {
					t.Fatalf("%s: SealPacked: %v", k.Alg(), err)
				}
				full, err := AppendBody([]byte("prefix"), packed)
				if err != nil {
					t.Fatalf("%s: AppendBody: %v", k.Alg(), err)
				}
				if !bytes.HasPrefix(full, []byte("prefix")) {
					t.Fatalf("AppendBody dropped what dst held: %.20s", full)
				}
				full = full[len("prefix"):]
				// ES256 signs with fresh randomness: the reference body is
				// rendered around the JWS the packed body carries.
				want, err := Body(ClaimsOf("gw-1", 7, r), jwsOf(t, full, sigMeta), sigMeta)
				if err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(full, want) {
					t.Fatalf("%s, %d attrs, meta %q:\n expanded %s\n Body     %s", k.Alg(), len(r.Attrs), sigMeta, full, want)
				}
				if k.Alg() != AlgES256 {
					direct, err := SealBody(k, "gw-1", 7, r, sigMeta)
					if err != nil || !bytes.Equal(direct, full) {
						t.Fatalf("%s: SealBody %s, %v; expanded %s", k.Alg(), direct, err, full)
					}
				}
				if n, err := BodyLen(packed); err != nil || n != len(full) {
					t.Errorf("BodyLen = %d, %v; the body is %d bytes", n, err, len(full))
				}
				repacked, err := PackBody(ClaimsOf("gw-1", 7, r), jwsOf(t, full, sigMeta), sigMeta)
				if err != nil || !bytes.Equal(repacked, packed) {
					t.Errorf("PackBody = %x, %v; SealPacked %x", repacked, err, packed)
				}
				if len(r.Attrs) > 1 && len(packed) >= len(full) {
					t.Errorf("%d attributes: packed %d bytes, full %d", len(r.Attrs), len(packed), len(full))
				}
			}
		}
	}
}

// TestPackedBodySize: a four-attribute reading, as the bench's devices
// send, is stored in well under half its rendered size.
func TestPackedBodySize(t *testing.T) {
	k := testKey(t, "th-1", "k1-aaa", "k2-bbb")
	s := sampleReading()
	r := &reading.Reading{Device: "th-1", Time: s.Time, Attrs: []reading.Attribute{
		{Name: "humidity", Type: "Number", Value: 41.0}, {Name: "n", Type: "Number", Value: 12345.0},
		{Name: "t0", Type: "Number", Value: 1.7648e18}, {Name: "temperature", Type: "Number", Value: 21.5},
	}}
	full, err := SealBody(k, "gw-1", 7, r, "")
	if err != nil {
		t.Fatal(err)
	}
	packed, err := SealPacked(k, "gw-1", 7, r, "")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("four attributes: %d bytes rendered, %d packed", len(full), len(packed))
	if 2*len(packed) > len(full) {
		t.Errorf("packed %d bytes, rendered %d: the JWS is stored more than once", len(packed), len(full))
	}
}

// TestAppendBodyFullPassesThrough: a body stored rendered — every body
// written before packing — is used as it is.
func TestAppendBodyFullPassesThrough(t *testing.T) {
	for _, b := range []string{`{"a":{"type":"Number","value":1}}`, ` {"x":1} `, `{}`, ``} {
		got, err := AppendBody(nil, []byte(b))
		if err != nil || string(got) != b {
			t.Errorf("AppendBody(%q) = %q, %v", b, got, err)
		}
		if n, err := BodyLen([]byte(b)); err != nil || n != len(b) {
			t.Errorf("BodyLen(%q) = %d, %v", b, n, err)
		}
	}
}

// TestAppendBodyMalformed: a packed body cut at any byte, or with a length
// that runs past its end, is an error naming the byte, never a panic or a
// partial body left in dst.
func TestAppendBodyMalformed(t *testing.T) {
	k := testKey(t, "th-1", "k1-aaa", "k2-bbb")
	packed, err := SealPacked(k, "gw-1", 7, sampleReading(), "")
	if err != nil {
		t.Fatal(err)
	}
	ends := map[int]bool{} // where a whole attribute ends: a valid body
	for off := 1; off < len(packed); {
		n := int(packed[off])<<24 | int(packed[off+1])<<16 | int(packed[off+2])<<8 | int(packed[off+3])
		off += 4 + n
		ends[off] = true
	}
	for cut := 1; cut < len(packed); cut++ {
		if ends[cut] {
			continue
		}
		got, err := AppendBody([]byte("dst"), packed[:cut])
		if !errors.Is(err, errPacked) || string(got) != "dst" {
			t.Fatalf("cut at %d: AppendBody = %q, %v", cut, got, err)
		}
		if !strings.Contains(err.Error(), "byte") {
			t.Fatalf("cut at %d: %v names no byte", cut, err)
		}
		if _, err := BodyLen(packed[:cut]); !errors.Is(err, errPacked) {
			t.Fatalf("cut at %d: BodyLen = %v", cut, err)
		}
	}
	bad := append([]byte(nil), packed...)
	bad[1] = 0xff // the metadata's length: 4 GB
	if _, err := AppendBody(nil, bad); err == nil || !strings.Contains(err.Error(), "at byte 1") {
		t.Errorf("huge length: %v", err)
	}
}

// TestPackedRefusesOversize: packing refuses what Body refuses, by the
// length the body will have when rendered, not by the stored length.
func TestPackedRefusesOversize(t *testing.T) {
	k := testKey(t, "th-1", "k1-aaa", "k2-bbb")
	r := &reading.Reading{Device: "th-1", Time: sampleReading().Time}
	for i := range 200 {
		r.Attrs = append(r.Attrs, reading.Attribute{Name: "a" + strings.Repeat("x", i), Type: "Text", Value: strings.Repeat("v", 4000)})
	}
	_, errFull := SealBody(k, "gw", 1, r, "")
	_, errPacked := SealPacked(k, "gw", 1, r, "")
	if !errors.Is(errFull, reading.ErrTooLarge) || !errors.Is(errPacked, reading.ErrTooLarge) {
		t.Errorf("SealBody: %v; SealPacked: %v; want ErrTooLarge from both", errFull, errPacked)
	}
}

// FuzzAppendBody: any stored bytes give a body or an error, and BodyLen
// agrees with the body's length.
func FuzzAppendBody(f *testing.F) {
	k := testKey(f, "th-1", "k1-aaa", "k2-bbb")
	packed, err := SealPacked(k, "gw-1", 7, sampleReading(), "")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(packed)
	f.Add([]byte{packedV1, 0, 0, 0, 1, '}', 0, 0, 0, 0})
	f.Add([]byte(`{"a":1}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		body, err := AppendBody(nil, b)
		n, lerr := BodyLen(b)
		if (err == nil) != (lerr == nil) {
			t.Fatalf("AppendBody error %v, BodyLen error %v", err, lerr)
		}
		if err == nil && n != len(body) {
			t.Fatalf("BodyLen %d, body %d bytes", n, len(body))
		}
	})
}

// TestAppendAttrs: the attributes without their braces, from a body stored
// in full (trimmed) or packed (rendered); a stored body that is not an
// object is an error and leaves dst as it was.
func TestAppendAttrs(t *testing.T) {
	for in, want := range map[string]string{`{"a":{"type":"Number","value":1}}`: `"a":{"type":"Number","value":1}`, ` { "x":1 } `: `"x":1`, `{}`: ``} {
		got, err := AppendAttrs([]byte("dst"), []byte(in))
		if err != nil || string(got) != "dst"+want {
			t.Errorf("AppendAttrs(%q) = %q, %v; want %q", in, got, err, "dst"+want)
		}
	}
	for _, in := range []string{``, `[1]`, `"s"`, `{`} {
		if got, err := AppendAttrs([]byte("dst"), []byte(in)); !errors.Is(err, errNotObject) || string(got) != "dst" {
			t.Errorf("AppendAttrs(%q) = %q, %v; want errNotObject", in, got, err)
		}
	}
	k := testKey(t, "th-1", "k1-aaa", "k2-bbb")
	packed, err := SealPacked(k, "gw-1", 7, sampleReading(), "")
	if err != nil {
		t.Fatal(err)
	}
	full, _ := AppendBody(nil, packed)
	attrs, err := AppendAttrs(nil, packed)
	if err != nil || "{"+string(attrs)+"}" != string(full) {
		t.Errorf("packed: attributes %s, %v; the body is %s", attrs, err, full)
	}
}
