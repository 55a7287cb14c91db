package queue

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Device sequence numbers (replay protection).
//
// A reading may carry its device's own sequence number (Entry.DeviceSeq:
// signed by the device, or given by its radio frames). The committer keeps,
// per device, the highest one accepted and the digests of the last few
// accepted ones, under
//
//	h/ <device>   high-water mark (8, big endian) | up to markRing entries of
//	              seq (8) | digest (8), most recent first
//
// and writes it in the same transaction as the item, so "accepted" and
// "queued" can never disagree, across crashes and restarts. A reading whose
// (seq, digest) is among the recent ones is a redelivery (ErrDuplicate); any
// other seq not above the mark is a replay or a re-ordering (ErrReplay).

var prefixMark = []byte("h/")

// markRing is how many recent (seq, digest) pairs are kept to recognise
// redeliveries: an MQTT QoS 1 sender has at most its in-flight window
// outstanding, usually 1..10.
const markRing = 16

// Errors of the device sequence check.
var (
	// ErrReplay: the entry's device seq is not above the last accepted one
	// (a replay or a re-ordering). The entry is refused for good.
	ErrReplay = errors.New("queue: device sequence number not above the last accepted")
	// ErrDuplicate: the entry is a redelivery of a recently accepted
	// reading (same device seq, same digest). It is already queued.
	ErrDuplicate = errors.New("queue: reading already accepted")
)

type markEntry struct {
	seq    uint64
	digest [8]byte
}

// deviceMark is an immutable value: accept returns a new one.
type deviceMark struct {
	high   uint64
	recent []markEntry // most recent first
}

func markKey(device string) []byte {
	return append(append([]byte(nil), prefixMark...), device...)
}

func (m deviceMark) check(seq uint64, digest [8]byte) error {
	if seq > m.high {
		return nil
	}
	for _, r := range m.recent {
		if r.seq == seq && r.digest == digest {
			return fmt.Errorf("device seq %d: %w", seq, ErrDuplicate)
		}
	}
	return fmt.Errorf("device seq %d, last accepted %d: %w", seq, m.high, ErrReplay)
}

func (m deviceMark) accept(seq uint64, digest [8]byte) deviceMark {
	n := deviceMark{high: max(m.high, seq), recent: make([]markEntry, 0, min(len(m.recent)+1, markRing))}
	n.recent = append(n.recent, markEntry{seq, digest})
	for _, r := range m.recent {
		if len(n.recent) == markRing {
			break
		}
		n.recent = append(n.recent, r)
	}
	return n
}

func (m deviceMark) encode() []byte {
	b := make([]byte, 0, 8+16*len(m.recent))
	b = binary.BigEndian.AppendUint64(b, m.high)
	for _, r := range m.recent {
		b = binary.BigEndian.AppendUint64(b, r.seq)
		b = append(b, r.digest[:]...)
	}
	return b
}

func decodeMark(v []byte) (deviceMark, error) {
	if len(v) < 8 || (len(v)-8)%16 != 0 {
		return deviceMark{}, errBadValue
	}
	m := deviceMark{high: binary.BigEndian.Uint64(v)}
	for v = v[8:]; len(v) > 0; v = v[16:] {
		var r markEntry
		r.seq = binary.BigEndian.Uint64(v)
		copy(r.digest[:], v[8:16])
		m.recent = append(m.recent, r)
	}
	return m, nil
}

// deviceMarkOf returns the device's mark (committer only), loading it on
// first use.
func (q *Queue) deviceMarkOf(device string) (deviceMark, error) {
	if m, ok := q.marks[device]; ok {
		return m, nil
	}
	var m deviceMark
	err := q.readValue(markKey(device), func(v []byte) (err error) {
		m, err = decodeMark(v)
		return err
	})
	if err != nil {
		return deviceMark{}, fmt.Errorf("load device sequence mark of %q: %w", device, err)
	}
	q.marks[device] = m
	return m, nil
}

// LastDeviceSeq returns the highest device sequence number accepted for
// device (0 = none).
func (q *Queue) LastDeviceSeq(device string) (uint64, error) {
	if !validDevice(device) {
		return 0, fmt.Errorf("last device seq: invalid device id %q", device)
	}
	var high uint64
	err := q.readValue(markKey(device), func(v []byte) error {
		m, err := decodeMark(v)
		high = m.high
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("last device seq of %q: %w", device, err)
	}
	return high, nil
}
