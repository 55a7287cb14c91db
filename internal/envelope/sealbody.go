package envelope

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"hash"
	"strconv"
	"sync"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jws"

	"github.com/edgegate/edgegate/internal/reading"
)

// The per-reading sealing path (issue 20). SealBody does what
// ClaimsOf + Seal + Body do — byte for byte the same JWS and NGSI body
// (TestSealBodyMatchesSealAndBody) — without the claims map, the sort of
// its keys, the JWS string or the metadata buffer: the claims are rendered
// from the reading's attributes, already sorted and unique (Validate), into
// a pooled scratch buffer, signed there, and the body is rendered into the
// same scratch and copied out once. HMAC-SHA256 runs on the scratch's
// SHA-256 (hmacSHA256), so a reading costs no hmac.New and its five
// allocations; nothing is kept per key (a gateway may hold 100k).

// scratch is the per-call working memory of SealBody and Seal, pooled:
// it holds no state between calls (every field is reset before use), only
// capacity, so concurrent sealers never share one.
type scratch struct {
	claims []byte   // the claims JSON
	jws    []byte   // header.payload, then .signature
	body   []byte   // the NGSI body before its copy out
	meta   []byte   // the metadata every attribute of the body carries
	spans  [][2]int // where each attribute's value is in claims
	sum    [sha256.Size]byte
	pad    [sha256.BlockSize]byte // the key XOR ipad, then XOR opad
	h      hash.Hash              // the SHA-256 HMAC runs on
}

// scratchPool is the package's one piece of shared state, and holds no
// data between calls, only reusable capacity (as fmt's and encoding/json's
// own buffer pools): the alternative, a Sealer object threaded through
// every caller of Seal, would change the API of a package other services
// import for the sake of a buffer.
var scratchPool = sync.Pool{New: func() any { return &scratch{h: sha256.New()} }}

// maxPooledScratch keeps a huge reading's buffers from staying pooled.
const maxPooledScratch = 64 << 10

func getScratch() *scratch { return scratchPool.Get().(*scratch) }

func putScratch(s *scratch) {
	if cap(s.claims) > maxPooledScratch || cap(s.jws) > maxPooledScratch || cap(s.body) > maxPooledScratch || cap(s.meta) > maxPooledScratch {
		return
	}
	scratchPool.Put(s)
}

// sign appends the compact JWS of payload under k to dst: header,
// payload and signature, base64url, dot-separated — what jws.Sign renders
// for the header Seal uses. HS256 with precomputed pads, EdDSA and ES256
// through the standard library; any other key through jwx.
func (k Key) sign(dst []byte, payload []byte, s *scratch) ([]byte, error) {
	if !k.CanSign() { // not signingKey() == nil: boxing the secret allocates
		return nil, errors.New("no key")
	}
	hdr := k.hdr
	if hdr == "" {
		hdr = headerB64(string(k.alg), k.id)
	}
	enc := base64.RawURLEncoding
	start := len(dst)
	dst = append(dst, hdr...)
	dst = append(dst, '.')
	dst = enc.AppendEncode(dst, payload)
	input := dst[start:]
	var sig []byte
	switch priv := k.priv.(type) {
	case nil:
		if k.alg == jwa.HS256 && len(k.secret) > 0 && len(k.secret) <= sha256.BlockSize {
			sig = hmacSHA256(s, k.secret, input)
		}
	case ed25519.PrivateKey:
		if k.alg == jwa.EdDSA {
			sig = ed25519.Sign(priv, input)
		}
	case *ecdsa.PrivateKey:
		if k.alg == jwa.ES256 {
			// RFC 7518 §3.4: R and S, 32 bytes each, big endian.
			digest := sha256.Sum256(input)
			r, ss, err := ecdsa.Sign(rand.Reader, priv, digest[:])
			if err != nil {
				return nil, err
			}
			var rs [64]byte
			r.FillBytes(rs[:32])
			ss.FillBytes(rs[32:])
			sig = rs[:]
		}
	}
	if sig == nil {
		signer, err := jws.NewSigner(k.alg)
		if err != nil {
			return nil, err
		}
		if sig, err = signer.Sign(input, k.signingKey()); err != nil {
			return nil, err
		}
	}
	dst = append(dst, '.')
	return enc.AppendEncode(dst, sig), nil
}

// hmacSHA256 is HMAC-SHA256 (RFC 2104) of input under secret (at most
// one block, DeriveHS256's 32 bytes), computed on the scratch's SHA-256
// and pad, into s.sum: what hmac.New(sha256.New, secret) computes, without
// its allocations (TestHMACSHA256 holds them equal).
func hmacSHA256(s *scratch, secret, input []byte) []byte {
	clear(s.pad[:])
	copy(s.pad[:], secret)
	for i := range s.pad {
		s.pad[i] ^= 0x36
	}
	s.h.Reset()
	s.h.Write(s.pad[:])
	s.h.Write(input)
	inner := s.h.Sum(s.sum[:0])
	for i := range s.pad {
		s.pad[i] ^= 0x36 ^ 0x5c
	}
	s.h.Reset()
	s.h.Write(s.pad[:])
	s.h.Write(inner) // read before Sum below overwrites s.sum
	return s.h.Sum(s.sum[:0])
}

// SealBody seals reading r as the gateway gw's reading seq under k and
// renders its NGSI attribute update: the result is exactly
// Body(ClaimsOf(gw, seq, r), Seal(k, that), sigMeta), in one allocation
// for a reading of attributes sorted by name (Validate's rule); other
// readings take that slower way.
func SealBody(k Key, gw string, seq uint64, r *reading.Reading, sigMeta string) ([]byte, error) {
	return sealRender(k, gw, seq, r, sigMeta, false)
}

// SealPacked is SealBody in the packed form the queue stores (packed.go):
// AppendBody(nil, SealPacked(...)) is SealBody(...).
func SealPacked(k Key, gw string, seq uint64, r *reading.Reading, sigMeta string) ([]byte, error) {
	return sealRender(k, gw, seq, r, sigMeta, true)
}

func sealRender(k Key, gw string, seq uint64, r *reading.Reading, sigMeta string, packed bool) ([]byte, error) {
	for i := 1; i < len(r.Attrs); i++ {
		if r.Attrs[i-1].Name >= r.Attrs[i].Name {
			return sealBodyMap(k, gw, seq, r, sigMeta, packed)
		}
	}
	if sigMeta == "" {
		sigMeta = DefaultSignatureAttr
	}
	s := getScratch()
	defer putScratch(s)
	t := r.Time.UTC()
	var err error
	s.claims, s.spans, err = appendReadingClaims(s.claims[:0], s.spans[:0], gw, r.Device, seq, t, r.Attrs)
	if err != nil {
		return nil, fmt.Errorf("seal envelope: %w", err)
	}
	if s.jws, err = k.sign(s.jws[:0], s.claims, s); err != nil {
		return nil, fmt.Errorf("seal envelope: %w", err)
	}
	if err := checkBodyArgs(sigMeta, len(r.Attrs)); err != nil {
		return nil, err
	}
	// The metadata are the same on every attribute, and each value is
	// rendered in the claims already: both are copied, not rendered again.
	s.meta = appendMeta(s.meta[:0], t, sigMeta, s.jws)
	w := newBodyWriter(s.body[:0], s.meta, packed)
	for i, a := range r.Attrs {
		w.begin()
		w.b = appendAttrHead(w.b, a.Name, a.Type)
		w.b = append(w.b, s.claims[s.spans[i][0]:s.spans[i][1]]...)
		if err := w.end(); err != nil {
			s.body = w.b
			return nil, err
		}
	}
	s.body = w.finish()
	return append(make([]byte, 0, len(s.body)), s.body...), nil
}

// sealBodyMap is SealBody the way it was, for attributes not in order.
func sealBodyMap(k Key, gw string, seq uint64, r *reading.Reading, sigMeta string, packed bool) ([]byte, error) {
	c := ClaimsOf(gw, seq, r)
	compact, err := Seal(k, c)
	if err != nil {
		return nil, err
	}
	return renderBody(c, compact, sigMeta, packed)
}

// checkBodyArgs is Body's refusal of its arguments.
func checkBodyArgs(sigMeta string, attrs int) error {
	if sigMeta == TimeInstantMeta {
		return fmt.Errorf("render NGSI body: %w: signature metadata name %q is the observation time's", reading.ErrInvalid, sigMeta)
	}
	if attrs == 0 {
		return fmt.Errorf("render NGSI body: %w: no attributes", reading.ErrInvalid)
	}
	return nil
}

// appendMeta renders the metadata Body puts on every attribute, its keys
// in json.Marshal's (sorted) order, and the end of the attribute.
func appendMeta(b []byte, t time.Time, sigMeta string, compact []byte) []byte {
	sig := func(b []byte) []byte {
		b = appendString(b, sigMeta)
		b = append(b, `:{"type":"`+SignatureMetaType+`","value":"`...)
		b = append(b, compact...) // base64url and dots: nothing to escape
		return append(b, `"}`...)
	}
	ts := func(b []byte) []byte {
		b = append(b, `"TimeInstant":{"type":"DateTime","value":"`...)
		b = t.AppendFormat(b, timeInstantLayout) // digits, '-', ':', '.', 'T', 'Z'
		return append(b, `"}`...)
	}
	b = append(b, `,"metadata":{`...)
	if sigMeta < TimeInstantMeta {
		b = append(sig(b), ',')
		b = ts(b)
	} else {
		b = append(ts(b), ',')
		b = sig(b)
	}
	return append(b, "}}"...)
}

// appendReadingClaims renders the claims of ClaimsOf(gw, seq, r) as
// appendClaims does, from attributes sorted by name and unique, and
// appends to spans where each attribute's value is in b.
func appendReadingClaims(b []byte, spans [][2]int, gw, dev string, seq uint64, t time.Time, attrs []reading.Attribute) ([]byte, [][2]int, error) {
	b = append(b, `{"v":`...)
	b = strconv.AppendInt(b, Version, 10)
	b = append(b, `,"gw":`...)
	b = appendString(b, gw)
	b = append(b, `,"dev":`...)
	b = appendString(b, dev)
	b = append(b, `,"seq":`...)
	b = strconv.AppendUint(b, seq, 10)
	b = append(b, `,"t":`...)
	var err error
	if b, err = appendTime(b, t); err != nil {
		return nil, spans, err
	}
	b = append(b, `,"attrs":{`...)
	for i, a := range attrs {
		if i > 0 {
			b = append(b, ',')
		}
		b = appendAttrHead(b, a.Name, a.Type)
		start := len(b)
		if b, err = appendValue(b, a.Value); err != nil {
			return nil, spans, err
		}
		spans = append(spans, [2]int{start, len(b)})
		b = append(b, '}')
	}
	return append(b, "}}"...), spans, nil
}
