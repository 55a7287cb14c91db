package queue

import (
	"encoding/binary"
	"errors"

	"github.com/dgraph-io/badger/v4"
)

// Deletes without reading back what is held in memory (issue 20).
//
// Delete used to read every item back (txn.Get) before deleting it, to
// learn that it is still there and the size of its value for the lane's
// byte count. In filter mode that read was 40–70 % of a Delete, and a
// Delete 27–36 % of what the uplink's workers spent per reading at a
// paced 1,500/s (docs/bench/profiles/filter-before-paced.top.txt): badger
// looks the key up in every memtable and, as the version asked is never
// the one stored, in the tables of every level too. A reading settled
// within a second of its commit is still held in memory (recent.go), and
// a held item is live by that list's invariant; its value's size is what
// sealItem made of it. So Delete reads back only the items not held.
// Paced 1,500/s in make bench-peers, with the deletes shared
// (internal/uplink/settle.go): 10–17 → 3–7 ms of CPU per 1,000 readings
// deleted (docs/bench/profiles/filter-ab.txt).

// heldSizes returns, for each item held in its lane's recent list, the size
// of its stored value, and -1 for the others (and for a repeat of an item
// earlier in items: the transaction must find it gone, as Delete does).
// Callers hold mutMu.
func (q *Queue) heldSizes(items []Item) []int64 {
	sizes := make([]int64, len(items))
	type key struct {
		prefix string
		seq    uint64
	}
	var seen map[key]bool
	q.mu.RLock()
	defer q.mu.RUnlock()
	for i, it := range items {
		sizes[i] = -1
		if !validDevice(it.Device) {
			continue
		}
		p := lanePrefix(prefixQueue, it.Broker, it.Device)
		ls := q.lanes[string(p)]
		if ls == nil {
			continue
		}
		held := heldAt(ls, it.Seq)
		if held == nil {
			continue
		}
		if len(items) > 1 {
			if seen == nil {
				seen = make(map[key]bool, len(items))
			}
			k := key{string(p), it.Seq}
			if seen[k] {
				continue
			}
			seen[k] = true
		}
		sizes[i] = sealedSize(held)
	}
	return sizes
}

// deleteSized deletes items in one transaction, or several if badger
// finds it too big, and reports what it removed. The size of item i is
// sizes[i] when that is known (>= 0, heldSizes); other items are read back
// for theirs. Callers hold mutMu.
func (q *Queue) deleteSized(items []Item, sizes []int64) ([]removal, error) {
	var removed []removal
	err := q.update(func(txn *badger.Txn) error {
		removed = removed[:0]
		for i, it := range items {
			if !validDevice(it.Device) {
				continue
			}
			key := itemKey(prefixQueue, it.Broker, it.Device, it.Seq)
			size := sizes[i]
			if size < 0 {
				bi, err := txn.Get(key)
				if errors.Is(err, badger.ErrKeyNotFound) {
					continue
				}
				if err != nil {
					return err
				}
				size = bi.ValueSize()
			}
			if err := txn.Delete(key); err != nil {
				return err
			}
			removed = append(removed, removal{prefix: string(key[:len(key)-8]), seq: it.Seq, bytes: size})
		}
		return nil
	})
	if errors.Is(err, badger.ErrTxnTooBig) && len(items) > 1 {
		h := len(items) / 2
		a, err := q.deleteSized(items[:h], sizes[:h])
		if err != nil {
			return a, err
		}
		b, err := q.deleteSized(items[h:], sizes[h:])
		return append(a, b...), err
	}
	if err != nil {
		return nil, err // nothing of this transaction was committed
	}
	return removed, nil
}

// sealedSize is len(sealItem(it, …)): the size of the value the committer
// stored for an item it holds (every held item was sealed by this
// process, as version 2). TestSealedSizeMatchesSealItem holds them equal.
func sealedSize(it *Item) int64 {
	str := func(s string) int { return uvarintLen(uint64(len(s))) + len(s) }
	return int64(1 + 8 + str(it.Broker) + nonceSize + str(it.Type) + str(it.Service) + str(it.ServicePath) +
		len(it.Body) + gcmTagSize)
}

// gcmTagSize is the AEAD's overhead (cipher.NewGCM: 16-byte tags).
const gcmTagSize = 16

func uvarintLen(v uint64) int {
	var b [binary.MaxVarintLen64]byte
	return binary.PutUvarint(b[:], v)
}
