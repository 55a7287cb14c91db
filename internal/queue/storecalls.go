package queue

import (
	"github.com/dgraph-io/badger/v4"
)

// Calls into badger that can unmap a value log hold mapsMu shared.
//
// Why. The page-out drops this process's pages of the value logs with
// MADV_DONTNEED when it can (pageout_linux.go): the pages leave the
// resident size but stay in the page cache, so a drain that reads them
// again takes a minor fault instead of a disk read. That advice must only
// reach a range that is still the value log it was listed as: were the log
// unmapped meanwhile and its range reused by anonymous memory, the advice
// would zero that memory. badger unmaps a value log only inside calls the
// queue makes:
//   - a write that fills the log rotates it (valueLog.write, doneWriting:
//     munmap, truncate, mmap);
//   - value-log GC deletes a rewritten log (RunValueLogGC, deleteLogFile),
//     or leaves it to the close of the last open iterator
//     (decrIteratorCount), so any transaction with an iterator may too;
//   - DropPrefix and Close.
//
// So every such call holds mapsMu shared (view, update, and writeTxn, the
// write batches, GC and DropPrefix where they are made; Close holds it
// exclusively), and the page-out
// takes it exclusively, with TryLock only, while it lists the mappings
// afresh and advises them. It never waits: a page-out that finds the store
// in use evicts the logs' pages as before (MADV_PAGEOUT, safe on any
// range), so no call into the store ever waits behind a page-out that
// waits for another call (an export streaming to a slow client holds a
// view for as long as it takes).

// view runs fn in a read-only transaction, under mapsMu.
func (q *Queue) view(fn func(*badger.Txn) error) error {
	q.mapsMu.RLock()
	defer q.mapsMu.RUnlock()
	return q.db.View(fn)
}

// update runs fn in a read-write transaction and commits it, under mapsMu.
func (q *Queue) update(fn func(*badger.Txn) error) error {
	q.mapsMu.RLock()
	defer q.mapsMu.RUnlock()
	return q.db.Update(fn)
}

// storeCall runs fn, a call into badger other than a transaction (a write
// batch, value-log GC, DropPrefix), under mapsMu.
func (q *Queue) storeCall(fn func() error) error {
	q.mapsMu.RLock()
	defer q.mapsMu.RUnlock()
	return fn()
}

// deleteKeys deletes keys in one write batch (as many transactions as
// badger needs), under mapsMu.
func (q *Queue) deleteKeys(keys [][]byte) error {
	return q.storeCall(func() error {
		wb := q.db.NewWriteBatch()
		defer wb.Cancel()
		for _, k := range keys {
			if err := wb.Delete(k); err != nil {
				return err
			}
		}
		return wb.Flush()
	})
}
