package envelope

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/edgegate/edgegate/internal/reading"
)

// The packed body: how the gateway stores a reading's NGSI update.
//
// Body puts the same metadata — the observation time and the compact JWS
// of the whole reading — on every attribute, because stock Orion keeps
// metadata per attribute (see Body). For a reading of four attributes
// that is the JWS four times: 2.6 KB rendered, of which the attributes
// themselves are ~200 bytes. The queue wrote, encrypted, synced and read
// back every copy (issue 20). A packed body holds the metadata once:
//
//	0x01 | uint32 len(meta) | meta | { uint32 len(attr) | attr }...
//
// meta is `,"metadata":{...}}` as Body renders it after each attribute's
// value (it also closes the attribute), attr is `"name":{"type":"T","value":V`,
// lengths are big endian and there is at least one attribute.
// AppendBody renders the full body, byte for byte what Body renders
// (TestPackedBodyExpandsToBody). 0x01 cannot start a JSON text, so a body
// stored in full — before packing existed, or by any other producer — is
// told apart by its first byte and used as it is.
const packedV1 = 0x01

// errPacked is what AppendBody and BodyLen return for a packed body that
// is cut short or inconsistent (the store's AEAD makes that a bug, not an
// attack, but it is never a panic).
var errPacked = errors.New("malformed packed body")

// errNotObject: a body stored in full that is not a JSON object, which no
// broker accepts as an attribute update.
var errNotObject = errors.New("stored body is not a JSON object")

// bodyWriter renders an NGSI attribute update, in full or packed, from
// attributes appended between begin and end: the one renderer of Body,
// PackBody, SealBody and SealPacked.
type bodyWriter struct {
	b      []byte
	meta   []byte
	packed bool
	n      int // attributes ended
	full   int // the length of the full rendering so far, '{' included
	start  int // where the current attribute begins in b
}

func newBodyWriter(b, meta []byte, packed bool) bodyWriter {
	w := bodyWriter{b: b, meta: meta, packed: packed, full: 1}
	if packed {
		w.b = append(w.b, packedV1)
		w.b = binary.BigEndian.AppendUint32(w.b, uint32(len(meta)))
		w.b = append(w.b, meta...)
	} else {
		w.b = append(w.b, '{')
	}
	return w
}

// begin starts an attribute: the caller appends its head and value to w.b.
func (w *bodyWriter) begin() {
	if w.packed {
		w.b = append(w.b, 0, 0, 0, 0) // the length, set by end
	} else if w.n > 0 {
		w.b = append(w.b, ',')
	}
	w.start = len(w.b)
}

// end closes the attribute begun last. It refuses a body whose full
// rendering would pass MaxBodyBytes, as soon as it does: the JWS repeats
// on every attribute.
func (w *bodyWriter) end() error {
	attr := len(w.b) - w.start
	if w.packed {
		binary.BigEndian.PutUint32(w.b[w.start-4:], uint32(attr))
	} else {
		w.b = append(w.b, w.meta...)
	}
	if w.n > 0 {
		w.full++ // the comma
	}
	w.n++
	w.full += attr + len(w.meta)
	if w.full+1 > MaxBodyBytes {
		return fmt.Errorf("render NGSI body: %w: more than %d bytes with the signature on each of %d attributes", reading.ErrTooLarge, MaxBodyBytes, w.n)
	}
	return nil
}

func (w *bodyWriter) finish() []byte {
	if w.packed {
		return w.b
	}
	return append(w.b, '}')
}

// AppendBody appends to dst the NGSI attribute update that stored holds:
// a packed body rendered in full, any other body as it is. On an error
// dst is returned as it was.
func AppendBody(dst, stored []byte) ([]byte, error) {
	if len(stored) == 0 || stored[0] != packedV1 {
		return append(dst, stored...), nil
	}
	mark := len(dst)
	dst, err := AppendAttrs(append(dst, '{'), stored)
	if err != nil {
		return dst[:mark], err
	}
	return append(dst, '}'), nil
}

// AppendAttrs appends to dst the attributes of the update stored holds,
// without the braces around them — what an op/update entity carries after
// its id and type — rendered straight from a packed body, trimmed from a
// body stored in full. On an error dst is returned as it was.
func AppendAttrs(dst, stored []byte) ([]byte, error) {
	if len(stored) == 0 || stored[0] != packedV1 {
		body := bytes.TrimSpace(stored)
		if len(body) < 2 || body[0] != '{' || body[len(body)-1] != '}' {
			return dst, errNotObject
		}
		return append(dst, bytes.TrimSpace(body[1:len(body)-1])...), nil
	}
	mark := len(dst)
	err := eachAttr(stored, func(i int, meta, attr []byte) {
		if i > 0 {
			dst = append(dst, ',')
		}
		dst = append(dst, attr...)
		dst = append(dst, meta...)
	})
	if err != nil {
		return dst[:mark], err
	}
	return dst, nil
}

// BodyLen is the length of what AppendBody appends for stored, without
// rendering it: what a request carrying it costs against a size limit.
func BodyLen(stored []byte) (int, error) {
	if len(stored) == 0 || stored[0] != packedV1 {
		return len(stored), nil
	}
	n := 2 // '{' and '}'
	err := eachAttr(stored, func(i int, meta, attr []byte) {
		if i > 0 {
			n++ // ','
		}
		n += len(attr) + len(meta)
	})
	if err != nil {
		return 0, err
	}
	return n, nil
}

// eachAttr calls fn with each attribute of the packed body stored, in
// order, and the metadata that follows every one, until the layout is
// found broken: the caller drops what fn saw then.
func eachAttr(stored []byte, fn func(i int, meta, attr []byte)) error {
	meta, rest, err := packedPart(stored, 1)
	if err != nil {
		return err
	}
	if len(rest) == 0 {
		return fmt.Errorf("%w: no attribute after the metadata (%d bytes)", errPacked, len(stored))
	}
	for i := 0; len(rest) > 0; i++ {
		var attr []byte
		if attr, rest, err = packedPart(stored, len(stored)-len(rest)); err != nil {
			return err
		}
		fn(i, meta, attr)
	}
	return nil
}

// packedPart reads the length-prefixed part of stored at off, and returns
// it and what follows it.
func packedPart(stored []byte, off int) (part, rest []byte, err error) {
	if len(stored)-off < 4 {
		return nil, nil, fmt.Errorf("%w: length at byte %d cut short (%d bytes)", errPacked, off, len(stored))
	}
	n := binary.BigEndian.Uint32(stored[off:])
	if uint64(n) > uint64(len(stored)-off-4) {
		return nil, nil, fmt.Errorf("%w: part at byte %d claims %d bytes, %d remain", errPacked, off, n, len(stored)-off-4)
	}
	end := off + 4 + int(n)
	return stored[off+4 : end], stored[end:], nil
}
