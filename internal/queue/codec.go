package queue

import (
	"encoding/binary"
	"errors"
	"fmt"
	"time"
)

// Key layout. All keys start with a two-byte prefix so the three families
// never interleave and each can be scanned with a prefix iterator.
//
//	q/ <h8> <device> 0x00 <seq8>   a queued item
//	s/ <device>                    last sequence number assigned to the device (8-byte big endian)
//	d/ <h8> <device> 0x00 <seq8>   a dead letter
//	k/ <device> 0x00               the device's data key (datakey.go)
//
// h8 is the first 8 bytes of FNV-1a-64 of the broker URI: it keeps keys short
// and fixed-width while the full URI is stored in the value. seq8 is big
// endian so byte order is numeric order, which makes a lane prefix scan
// return the lane oldest first. Device ids are [A-Za-z0-9._-] and therefore
// never contain 0x00, so "a" 0x00 can never be a prefix of "ab" 0x00: one lane
// prefix selects exactly one lane.
//
// Values are written as version 2 (bodies sealed with the device's data
// key; see datakey.go). Version 1, below, is still read. The queue does
// not look inside a body: the pipeline stores readings packed
// (envelope.SealPacked) and the uplink renders them (envelope.AppendBody).
// Only the data export renders one here (rights.go).
//
// Queued value (version 1):
//
//	0x01 | enqueued unix nanos (8, big endian) | uvarint-prefixed broker,
//	type, service, service path | body (rest)
//
// Dead-letter value (version 1):
//
//	0x01 | enqueued (8) | dead-lettered at (8) | uvarint-prefixed broker,
//	type, service, service path, reason | body (rest)
//
// The enqueue time comes first so the lane index can read a lane's oldest
// time by decoding 9 bytes.
var (
	prefixQueue   = []byte("q/")
	prefixSeq     = []byte("s/")
	prefixDead    = []byte("d/")
	errBadKey     = errors.New("malformed key")
	errBadValue   = errors.New("malformed value")
	valueVersion1 = byte(1)
)

// maxDeviceLen bounds a device id so keys stay small; NGSI entity ids are
// limited to 256 characters.
const maxDeviceLen = 256

// brokerHash is FNV-1a-64 of the broker URI (hash/fnv's New64a, the
// key layout's contract), computed inline: it runs for every key of every
// reading, and the loop needs no hash.Hash and no copy of the URI
// (TestBrokerHashIsFNV1a pins the equality).
func brokerHash(broker string) [8]byte {
	const (
		offset64 = 14695981039346656037
		prime64  = 1099511628211
	)
	h := uint64(offset64)
	for i := 0; i < len(broker); i++ {
		h ^= uint64(broker[i])
		h *= prime64
	}
	var out [8]byte
	binary.BigEndian.PutUint64(out[:], h)
	return out
}

// validDevice reports whether id is a non-empty [A-Za-z0-9._-] string of at
// most maxDeviceLen bytes.
func validDevice(id string) bool {
	if id == "" || len(id) > maxDeviceLen {
		return false
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '.', c == '_', c == '-':
		default:
			return false
		}
	}
	return true
}

// lanePrefix returns fam + h8 + device + 0x00.
func lanePrefix(fam []byte, broker, device string) []byte {
	h := brokerHash(broker)
	k := make([]byte, 0, len(fam)+8+len(device)+1+8)
	k = append(k, fam...)
	k = append(k, h[:]...)
	k = append(k, device...)
	return append(k, 0)
}

func itemKey(fam []byte, broker, device string, seq uint64) []byte {
	return binary.BigEndian.AppendUint64(lanePrefix(fam, broker, device), seq)
}

func seqKey(device string) []byte {
	return append(append([]byte(nil), prefixSeq...), device...)
}

// parseItemKey splits a q/ or d/ key into its lane prefix (a sub-slice of
// key), device and sequence number.
func parseItemKey(key []byte) (prefix []byte, device string, seq uint64, err error) {
	const head = 2 + 8
	if len(key) < head+1+1+8 || key[len(key)-9] != 0 {
		return nil, "", 0, fmt.Errorf("parse key %x: %w", key, errBadKey)
	}
	device = string(key[head : len(key)-9])
	return key[:len(key)-8], device, binary.BigEndian.Uint64(key[len(key)-8:]), nil
}

func appendString(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

func readString(b []byte) (string, []byte, error) {
	n, w := binary.Uvarint(b)
	if w <= 0 || uint64(len(b)-w) < n {
		return "", nil, errBadValue
	}
	return string(b[w : w+int(n)]), b[w+int(n):], nil
}

func encodeItem(it *Item) []byte {
	n := 1 + 8 + len(it.Broker) + len(it.Type) + len(it.Service) + len(it.ServicePath) + 4*binary.MaxVarintLen16 + len(it.Body)
	b := make([]byte, 0, n)
	b = append(b, valueVersion1)
	b = binary.BigEndian.AppendUint64(b, uint64(it.Enqueued.UnixNano()))
	b = appendString(b, it.Broker)
	b = appendString(b, it.Type)
	b = appendString(b, it.Service)
	b = appendString(b, it.ServicePath)
	return append(b, it.Body...)
}

// decodeItem fills it from a queued value. Device and Seq come from the key.
// The body is copied, so val may be a badger-owned buffer.
func decodeItem(val []byte, it *Item) error {
	if len(val) < 9 || val[0] != valueVersion1 {
		return errBadValue
	}
	it.Enqueued = time.Unix(0, int64(binary.BigEndian.Uint64(val[1:9])))
	rest := val[9:]
	var err error
	for _, dst := range []*string{&it.Broker, &it.Type, &it.Service, &it.ServicePath} {
		if *dst, rest, err = readString(rest); err != nil {
			return err
		}
	}
	it.Body = append([]byte(nil), rest...)
	return nil
}

// enqueuedOf reads only the enqueue time of a queued value (version 1 or
// 2: both start with it, outside any seal).
func enqueuedOf(val []byte) (time.Time, error) {
	if len(val) < 9 || (val[0] != valueVersion1 && val[0] != valueVersion2) {
		return time.Time{}, errBadValue
	}
	return time.Unix(0, int64(binary.BigEndian.Uint64(val[1:9]))), nil
}

func encodeDead(d *DeadLetter) []byte {
	b := make([]byte, 0, 1+16+len(d.Broker)+len(d.Type)+len(d.Service)+len(d.ServicePath)+len(d.Reason)+5*binary.MaxVarintLen16+len(d.Body))
	b = append(b, valueVersion1)
	b = binary.BigEndian.AppendUint64(b, uint64(d.Enqueued.UnixNano()))
	b = binary.BigEndian.AppendUint64(b, uint64(d.At.UnixNano()))
	for _, s := range []string{d.Broker, d.Type, d.Service, d.ServicePath, d.Reason} {
		b = appendString(b, s)
	}
	return append(b, d.Body...)
}

func decodeDead(val []byte, d *DeadLetter) error {
	if len(val) < 17 || val[0] != valueVersion1 {
		return errBadValue
	}
	d.Enqueued = time.Unix(0, int64(binary.BigEndian.Uint64(val[1:9])))
	d.At = time.Unix(0, int64(binary.BigEndian.Uint64(val[9:17])))
	rest := val[17:]
	var err error
	for _, dst := range []*string{&d.Broker, &d.Type, &d.Service, &d.ServicePath, &d.Reason} {
		if *dst, rest, err = readString(rest); err != nil {
			return err
		}
	}
	d.Body = append([]byte(nil), rest...)
	return nil
}
