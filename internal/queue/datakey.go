package queue

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"github.com/dgraph-io/badger/v4"
)

// Per-device data keys (crypto-shredding).
//
// Every queued and dead-lettered body written since value version 2 is
// sealed with AES-256-GCM under a random 256-bit key of its own device. The
// key is stored as
//
//	k/ <device> 0x00     32 raw key bytes
//
// inside the same badger store (so it is itself encrypted at rest with the
// store key). The 0x00 terminator makes "k/dev" 0x00 a prefix of exactly one
// key, so a prefix drop of one device's key can never touch "k/dev2".
//
// Destroying a device's key (EraseDevice) makes every copy of its bodies
// unreadable, including copies that badger has not yet compacted away in old
// SST or value-log files, and copies in backups of the store, even for
// someone who holds the store key.
//
// Value version 2 (queued):
//
//	0x02 | enqueued (8) | uvarint broker | nonce (12) | seal
//	seal = AES-GCM(data key, nonce, uvarint type, service, service path | body,
//	               aad = "q" | device | 0x00 | seq (8) | the value up to the nonce)
//
// Value version 2 (dead letter):
//
//	0x02 | enqueued (8) | at (8) | uvarint broker | nonce (12) | seal
//	seal = AES-GCM(data key, nonce, uvarint type, service, service path, reason | body,
//	               aad = "d" | device | 0x00 | seq (8) | the value up to the nonce)
//
// The enqueue time (and the broker URI, which is configuration, not device
// data) stay outside the seal: the lane index reads them without the key.
// Binding them, the device and the seq as associated data means a value
// cannot be moved to another device, seq or family, nor its times changed.
//
// Nonces are random, never derived from the seq: a seq can be assigned twice
// under one key when a batch is committed but its sync fails and the machine
// loses power (the counter goes back with it), and a dead letter re-seals the
// same (device, seq). With one key per device, a 96-bit random nonce is far
// from its birthday bound.
//
// Version 1 values (plain bodies, written before data keys existed) stay
// readable; they are erased by deletion only, without the shredding
// guarantee.

var (
	prefixDataKey = []byte("k/")
	valueVersion2 = byte(2)

	// ErrDataKeyMissing: a version 2 value whose device has no data key,
	// i.e. the device was erased while the value was being read, or the
	// store is damaged.
	ErrDataKeyMissing = errors.New("queue: device data key missing")
)

const (
	dataKeySize = 32
	nonceSize   = 12
)

// dataKey is one device's key. raw is kept only until the key is
// committed; persisted is read and written by the committer (or by
// EraseDevice, which excludes it through commitMu) only.
type dataKey struct {
	aead      cipher.AEAD
	raw       []byte
	persisted bool
}

func dataKeyKey(device string) []byte {
	k := make([]byte, 0, len(prefixDataKey)+len(device)+1)
	k = append(k, prefixDataKey...)
	k = append(k, device...)
	return append(k, 0)
}

func newDataKey(raw []byte, persisted bool) (*dataKey, error) {
	if len(raw) != dataKeySize {
		return nil, fmt.Errorf("data key: %d bytes, want %d: %w", len(raw), dataKeySize, errBadValue)
	}
	block, err := aes.NewCipher(raw)
	if err != nil {
		return nil, err
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, err
	}
	dk := &dataKey{aead: aead, persisted: persisted}
	if !persisted {
		dk.raw = raw
	}
	return dk, nil
}

// loadDataKeys fills the key cache from k/. Called by Open only.
func (q *Queue) loadDataKeys(txn *badger.Txn) error {
	io := badger.DefaultIteratorOptions
	io.Prefix = prefixDataKey
	it := txn.NewIterator(io)
	defer it.Close()
	for it.Rewind(); it.Valid(); it.Next() {
		k := it.Item().Key()
		if len(k) < len(prefixDataKey)+2 || k[len(k)-1] != 0 {
			return fmt.Errorf("data key %x: %w", k, errBadKey)
		}
		device := string(k[len(prefixDataKey) : len(k)-1])
		var dk *dataKey
		if err := it.Item().Value(func(v []byte) error {
			var err error
			dk, err = newDataKey(append([]byte(nil), v...), true)
			return err
		}); err != nil {
			return fmt.Errorf("data key of %q: %w", device, err)
		}
		q.keys[device] = dk
	}
	return nil
}

// readKey returns the cached data key of device. Every data key in the
// store is cached (loaded at Open, created by the committer), so a miss
// means the device has none.
func (q *Queue) readKey(device string) (cipher.AEAD, error) {
	q.keyMu.RLock()
	dk := q.keys[device]
	q.keyMu.RUnlock()
	if dk == nil {
		return nil, fmt.Errorf("device %q: %w", device, ErrDataKeyMissing)
	}
	return dk.aead, nil
}

// commitKey returns device's data key, creating one (not yet persisted:
// writeTxn stores it in the transaction of the device's first item) when
// it has none. Committer only.
func (q *Queue) commitKey(device string) (*dataKey, error) {
	q.keyMu.RLock()
	dk := q.keys[device]
	q.keyMu.RUnlock()
	if dk != nil {
		return dk, nil
	}
	raw := make([]byte, dataKeySize)
	if _, err := rand.Read(raw); err != nil {
		return nil, fmt.Errorf("create data key: %w", err)
	}
	dk, err := newDataKey(raw, false)
	if err != nil {
		return nil, err
	}
	q.keyMu.Lock()
	q.keys[device] = dk
	q.keyMu.Unlock()
	return dk, nil
}

// aad builds the associated data: family letter, device, 0x00, seq, and the
// clear part of the value.
func aad(dst []byte, fam byte, device string, seq uint64, clearPart []byte) []byte {
	dst = append(dst, fam)
	dst = append(dst, device...)
	dst = append(dst, 0)
	dst = binary.BigEndian.AppendUint64(dst, seq)
	return append(dst, clearPart...)
}

// sealItem encodes a queued item as a version 2 value. nonce must be 12
// fresh random bytes. The plaintext is built in place and sealed over
// itself: one allocation per item.
func sealItem(it *Item, aead cipher.AEAD, nonce []byte) []byte {
	n := 1 + 8 + binary.MaxVarintLen16 + len(it.Broker) + nonceSize +
		len(it.Type) + len(it.Service) + len(it.ServicePath) + 3*binary.MaxVarintLen16 + len(it.Body) + aead.Overhead()
	b := make([]byte, 0, n)
	b = append(b, valueVersion2)
	b = binary.BigEndian.AppendUint64(b, uint64(it.Enqueued.UnixNano()))
	b = appendString(b, it.Broker)
	clearPart := len(b)
	b = append(b, nonce...)
	start := len(b)
	b = appendString(b, it.Type)
	b = appendString(b, it.Service)
	b = appendString(b, it.ServicePath)
	b = append(b, it.Body...)
	return sealInPlace(b, clearPart, start, aead, 'q', it.Device, it.Seq)
}

// sealDead encodes a dead letter as a version 2 value.
func sealDead(d *DeadLetter, aead cipher.AEAD, nonce []byte) []byte {
	n := 1 + 16 + binary.MaxVarintLen16 + len(d.Broker) + nonceSize +
		len(d.Type) + len(d.Service) + len(d.ServicePath) + len(d.Reason) + 4*binary.MaxVarintLen16 + len(d.Body) + aead.Overhead()
	b := make([]byte, 0, n)
	b = append(b, valueVersion2)
	b = binary.BigEndian.AppendUint64(b, uint64(d.Enqueued.UnixNano()))
	b = binary.BigEndian.AppendUint64(b, uint64(d.At.UnixNano()))
	b = appendString(b, d.Broker)
	clearPart := len(b)
	b = append(b, nonce...)
	start := len(b)
	for _, s := range []string{d.Type, d.Service, d.ServicePath, d.Reason} {
		b = appendString(b, s)
	}
	b = append(b, d.Body...)
	return sealInPlace(b, clearPart, start, aead, 'd', d.Device, d.Seq)
}

// sealInPlace encrypts b[start:] over itself (GCM allows exact overlap)
// with the nonce at b[clearPart:start], and appends the tag.
func sealInPlace(b []byte, clearPart, start int, aead cipher.AEAD, fam byte, device string, seq uint64) []byte {
	var adBuf [128]byte
	ad := aad(adBuf[:0], fam, device, seq, b[:clearPart])
	return aead.Seal(b[:start], b[clearPart:start], b[start:], ad)
}

// openSealed splits val at clearLen (the end of its clear part) and
// decrypts the rest.
func openSealed(val []byte, clearLen int, fam byte, device string, seq uint64, aead cipher.AEAD) ([]byte, error) {
	if len(val) < clearLen+nonceSize+aead.Overhead() {
		return nil, errBadValue
	}
	nonce := val[clearLen : clearLen+nonceSize]
	ad := aad(make([]byte, 0, 1+len(device)+9+clearLen), fam, device, seq, val[:clearLen])
	plain, err := aead.Open(nil, nonce, val[clearLen+nonceSize:], ad)
	if err != nil {
		return nil, fmt.Errorf("open %c/%s/%d: %w", fam, device, seq, errBadValue)
	}
	return plain, nil
}

// decodeItemValue fills it (whose Device and Seq come from the key) from a
// queued value of either version.
func (q *Queue) decodeItemValue(val []byte, it *Item) error {
	if len(val) > 0 && val[0] == valueVersion1 {
		return decodeItem(val, it)
	}
	if len(val) < 9 || val[0] != valueVersion2 {
		return errBadValue
	}
	it.Enqueued = time.Unix(0, int64(binary.BigEndian.Uint64(val[1:9])))
	var err error
	var rest []byte
	if it.Broker, rest, err = readString(val[9:]); err != nil {
		return err
	}
	aead, err := q.readKey(it.Device)
	if err != nil {
		return err
	}
	plain, err := openSealed(val, len(val)-len(rest), 'q', it.Device, it.Seq, aead)
	if err != nil {
		return err
	}
	for _, dst := range []*string{&it.Type, &it.Service, &it.ServicePath} {
		if *dst, plain, err = readString(plain); err != nil {
			return err
		}
	}
	it.Body = plain // freshly allocated by Open: not a badger buffer
	return nil
}

// decodeDeadValue fills d (whose Device and Seq come from the key) from a
// dead-letter value of either version.
func (q *Queue) decodeDeadValue(val []byte, d *DeadLetter) error {
	if len(val) > 0 && val[0] == valueVersion1 {
		return decodeDead(val, d)
	}
	if len(val) < 17 || val[0] != valueVersion2 {
		return errBadValue
	}
	d.Enqueued = time.Unix(0, int64(binary.BigEndian.Uint64(val[1:9])))
	d.At = time.Unix(0, int64(binary.BigEndian.Uint64(val[9:17])))
	var err error
	var rest []byte
	if d.Broker, rest, err = readString(val[17:]); err != nil {
		return err
	}
	aead, err := q.readKey(d.Device)
	if err != nil {
		return err
	}
	plain, err := openSealed(val, len(val)-len(rest), 'd', d.Device, d.Seq, aead)
	if err != nil {
		return err
	}
	for _, dst := range []*string{&d.Type, &d.Service, &d.ServicePath, &d.Reason} {
		if *dst, plain, err = readString(plain); err != nil {
			return err
		}
	}
	d.Body = plain
	return nil
}

// itemHeader reads the enqueue time and the broker of a queued value of
// either version, without the data key.
func itemHeader(val []byte) (time.Time, string, error) {
	if len(val) < 9 || (val[0] != valueVersion1 && val[0] != valueVersion2) {
		return time.Time{}, "", errBadValue
	}
	t := time.Unix(0, int64(binary.BigEndian.Uint64(val[1:9])))
	broker, _, err := readString(val[9:])
	return t, broker, err
}

// nonces returns n fresh 12-byte nonces from one read of the system's
// random source (one syscall per batch, not per reading).
func nonces(n int) ([]byte, error) {
	b := make([]byte, n*nonceSize)
	if _, err := rand.Read(b); err != nil {
		return nil, fmt.Errorf("read nonces: %w", err)
	}
	return b, nil
}
