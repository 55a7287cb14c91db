package queue

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"time"

	"github.com/dgraph-io/badger/v4"

	"github.com/edgegate/edgegate/internal/envelope"
)

// Data rights: what the store holds for one device, handed out (export) or
// destroyed (erase). See datakey.go for how erasure is made final.

// Held is one reading the store holds for a device: queued, or a dead
// letter (Dead, with Reason and At).
type Held struct {
	Item
	Dead   bool
	Reason string    // dead letters only
	At     time.Time // dead letters only
}

// EraseReport says what EraseDevice removed.
type EraseReport struct {
	Device      string `json:"device"`
	Queued      int    `json:"queued"`
	DeadLetters int    `json:"dead_letters"`
	// Unsealed counts version 1 values (written before data keys existed):
	// deleted, but without the shredding guarantee — until badger compacts
	// them away, old files still hold them under the store key alone.
	Unsealed int `json:"unsealed"`
	// KeyDestroyed: the device had a data key and it is deleted.
	KeyDestroyed bool `json:"key_destroyed"`
	// Compacted: badger flushed its memtables and compacted the device's
	// keys out of every table (DropPrefix). False when that best-effort step
	// failed; the erasure itself still holds.
	Compacted bool `json:"compacted"`
}

// ExportDevice calls fn with everything the store holds for device, queued
// items first, then dead letters, each decrypted, until fn returns an error
// or ctx is done. It reads one consistent snapshot.
func (q *Queue) ExportDevice(ctx context.Context, device string, fn func(Held) error) error {
	if !validDevice(device) {
		return fmt.Errorf("export device: invalid device id %q", device)
	}
	err := q.view(func(txn *badger.Txn) error {
		for _, fam := range [][]byte{prefixQueue, prefixDead} {
			err := eachOfDevice(txn, fam, device, func(_ []byte, seq uint64, bi *badger.Item) error {
				if err := ctx.Err(); err != nil {
					return err
				}
				h := Held{Item: Item{Device: device, Seq: seq}, Dead: fam[0] == prefixDead[0]}
				err := bi.Value(func(v []byte) error {
					if !h.Dead {
						return q.decodeItemValue(v, &h.Item)
					}
					dl := DeadLetter{Item: h.Item}
					if err := q.decodeDeadValue(v, &dl); err != nil {
						return err
					}
					h.Item, h.Reason, h.At = dl.Item, dl.Reason, dl.At
					return nil
				})
				if err != nil {
					return fmt.Errorf("decode %s/%d: %w", device, seq, err)
				}
				return fn(h)
			})
			if err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("export device %q: %w", device, err)
	}
	return nil
}

// EraseDevice removes everything the store holds for device — queued items
// in every lane and dead letters — and destroys its data key, so that
// copies of its sealed values left in old SST or value-log files (or in a
// copy of the store) are unreadable even with the store key. The sequence
// counter stays: seqs are never reused, and the next reading of the device
// gets a new data key.
//
// Order, for crash safety: the items go first (compacted out, then
// tombstoned and synced), the key last, so a crash in between leaves
// nothing unreadable behind, only a key to destroy by erasing again.
//
// Compaction blocks the store's writes while it runs (badger's DropPrefix);
// Appends, Deletes and state writes wait for EraseDevice to return.
func (q *Queue) EraseDevice(device string) (EraseReport, error) {
	rep := EraseReport{Device: device}
	if !validDevice(device) {
		return rep, fmt.Errorf("erase device: invalid device id %q", device)
	}
	q.commitMu.Lock()
	defer q.commitMu.Unlock()
	q.mutMu.Lock()
	defer q.mutMu.Unlock()

	var keys, prefixes [][]byte
	err := q.view(func(txn *badger.Txn) error {
		for _, fam := range [][]byte{prefixQueue, prefixDead} {
			err := eachOfDevice(txn, fam, device, func(prefix []byte, _ uint64, bi *badger.Item) error {
				if !slices.ContainsFunc(prefixes, func(p []byte) bool { return bytes.Equal(p, prefix) }) {
					prefixes = append(prefixes, bytes.Clone(prefix))
				}
				keys = append(keys, bi.KeyCopy(nil))
				if fam[0] == prefixDead[0] {
					rep.DeadLetters++
				} else {
					rep.Queued++
				}
				return bi.Value(func(v []byte) error {
					if len(v) > 0 && v[0] == valueVersion1 {
						rep.Unsealed++
					}
					return nil
				})
			})
			if err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return rep, fmt.Errorf("erase device %q: scan: %w", device, err)
	}

	// 1. Items: compacted out of memtables and tables (best effort), then
	// tombstoned and synced in any case.
	compacted := true
	if len(prefixes) > 0 {
		if err := q.storeCall(func() error { return q.db.DropPrefix(prefixes...) }); err != nil {
			q.log.Warn("erase: compacting the device's items failed; they are deleted and will be compacted later",
				"device", device, "err", err)
			compacted = false
		}
	}
	if len(keys) > 0 {
		if err := q.deleteKeys(keys); err != nil {
			return rep, fmt.Errorf("erase device %q: %w", device, err)
		}
	}
	q.pending = slices.DeleteFunc(q.pending, func(r record) bool { return r.item.Device == device })
	q.mu.Lock()
	for p, ls := range q.lanes {
		if ls.lane.Device == device {
			q.dropLane(p, ls)
		}
	}
	q.dead = max(0, q.dead-rep.DeadLetters)
	q.mu.Unlock()
	if err := q.db.Sync(); err != nil {
		return rep, fmt.Errorf("erase device %q: sync: %w", device, err)
	}

	// 2. The data key.
	kk := dataKeyKey(device)
	var hasKey bool
	if err := q.view(func(txn *badger.Txn) error {
		_, err := txn.Get(kk)
		if errors.Is(err, badger.ErrKeyNotFound) {
			return nil
		}
		hasKey = err == nil
		return err
	}); err != nil {
		return rep, fmt.Errorf("erase device %q: read data key: %w", device, err)
	}
	if hasKey {
		if err := q.storeCall(func() error { return q.db.DropPrefix(kk) }); err != nil {
			q.log.Warn("erase: compacting the device's data key failed; it is deleted and will be compacted later",
				"device", device, "err", err)
			compacted = false
		}
		if err := q.update(func(txn *badger.Txn) error { return txn.Delete(kk) }); err != nil {
			return rep, fmt.Errorf("erase device %q: delete data key: %w", device, err)
		}
		if err := q.db.Sync(); err != nil {
			return rep, fmt.Errorf("erase device %q: sync: %w", device, err)
		}
	}
	q.keyMu.Lock()
	if _, ok := q.keys[device]; ok || hasKey {
		rep.KeyDestroyed = true
	}
	delete(q.keys, device)
	q.keyMu.Unlock()
	rep.Compacted = compacted
	q.refreshSize()
	return rep, nil
}

// eachOfDevice calls fn, in key order, for every key of device in the
// family fam (prefixQueue or prefixDead), with its lane prefix (a sub-slice
// of the key, valid during the call) and seq. Values are not prefetched.
func eachOfDevice(txn *badger.Txn, fam []byte, device string, fn func(prefix []byte, seq uint64, bi *badger.Item) error) error {
	io := badger.DefaultIteratorOptions
	io.PrefetchValues = false
	io.Prefix = fam
	it := txn.NewIterator(io)
	defer it.Close()
	for it.Rewind(); it.Valid(); it.Next() {
		bi := it.Item()
		prefix, d, seq, err := parseItemKey(bi.Key())
		if err != nil || d != device {
			continue
		}
		if err := fn(prefix, seq, bi); err != nil {
			return err
		}
	}
	return nil
}

// ExportRecord is one line of ExportNDJSON. Body is the NGSI update the
// broker receives (a packed body rendered in full: envelope.AppendBody),
// else the stored bytes as a JSON string: an export never drops a reading.
type ExportRecord struct {
	Kind           string          `json:"kind"` // "queued" or "dead_letter"
	Device         string          `json:"device"`
	Seq            uint64          `json:"seq"`
	Broker         string          `json:"broker"`
	Type           string          `json:"type,omitempty"`
	Service        string          `json:"service,omitempty"`
	ServicePath    string          `json:"service_path,omitempty"`
	Enqueued       time.Time       `json:"enqueued"`
	Reason         string          `json:"reason,omitempty"`
	DeadLetteredAt time.Time       `json:"dead_lettered_at,omitzero"`
	Body           json.RawMessage `json:"body"`
}

// ExportNDJSON writes everything held for device to w as NDJSON, one
// ExportRecord a line, and returns how many records it wrote.
func (q *Queue) ExportNDJSON(ctx context.Context, device string, w io.Writer) (int, error) {
	n := 0
	enc := json.NewEncoder(w)
	enc.SetEscapeHTML(false)
	err := q.ExportDevice(ctx, device, func(h Held) error {
		r := ExportRecord{Kind: "queued", Device: h.Device, Seq: h.Seq, Broker: h.Broker, Type: h.Type,
			Service: h.Service, ServicePath: h.ServicePath, Enqueued: h.Enqueued}
		if h.Dead {
			r.Kind, r.Reason, r.DeadLetteredAt = "dead_letter", h.Reason, h.At
		}
		if body, err := envelope.AppendBody(nil, h.Body); err == nil && json.Valid(body) {
			r.Body = body
		} else {
			r.Body, _ = json.Marshal(string(h.Body))
		}
		if err := enc.Encode(r); err != nil {
			return err
		}
		n++
		return nil
	})
	return n, err
}
