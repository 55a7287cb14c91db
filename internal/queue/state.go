package queue

import (
	"bytes"
	"fmt"

	"github.com/dgraph-io/badger/v4"
)

// prefixState holds small named records of other stages (the policy in
// force, its version floor, tokens) in the same encrypted store, so that
// one key protects everything and one fsync discipline applies.
var prefixState = []byte("x/")

// MaxStateBytes bounds one state record.
const MaxStateBytes = 16 << 20

func stateKey(name string) []byte {
	return append(append([]byte(nil), prefixState...), name...)
}

// GetState reads a named state record; ok is false when there is none.
func (q *Queue) GetState(name string) (value []byte, ok bool, err error) {
	err = q.readValue(stateKey(name), func(v []byte) error {
		value, ok = bytes.Clone(v), true
		return nil
	})
	if err != nil {
		return nil, false, fmt.Errorf("read state %q: %w", name, err)
	}
	return value, ok, nil
}

// PutState writes a named state record and syncs it to disk before
// returning.
func (q *Queue) PutState(name string, value []byte) error {
	if len(value) > MaxStateBytes {
		return fmt.Errorf("write state %q: %d bytes, at most %d", name, len(value), MaxStateBytes)
	}
	// mutMu: EraseDevice blocks badger's writes while it compacts; a state
	// write then would fail with ErrBlockedWrites instead of waiting.
	q.mutMu.Lock()
	defer q.mutMu.Unlock()
	if err := q.update(func(txn *badger.Txn) error {
		return txn.Set(stateKey(name), value)
	}); err != nil {
		return fmt.Errorf("write state %q: %w", name, mapDiskFull(err))
	}
	if err := q.db.Sync(); err != nil {
		return fmt.Errorf("sync state %q: %w", name, mapDiskFull(err))
	}
	return nil
}

// DeleteState removes a named state record (synced).
func (q *Queue) DeleteState(name string) error {
	q.mutMu.Lock()
	defer q.mutMu.Unlock()
	if err := q.update(func(txn *badger.Txn) error {
		return txn.Delete(stateKey(name))
	}); err != nil {
		return fmt.Errorf("delete state %q: %w", name, err)
	}
	return q.db.Sync()
}
