package queue

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/dgraph-io/badger/v4"

	"github.com/edgegate/edgegate/internal/metrics"
)

// ErrNotFound: the item is not (or no longer) in its lane.
var ErrNotFound = errors.New("queue: item not queued")

// Options configures Open.
type Options struct {
	Dir string // badger directory
	// Key is the 32-byte AES-256 store key (badger EncryptionKey); required.
	Key []byte
	// QuotaBytes refuses Append with ErrQuota once the store's allocated size
	// on disk (every file under Dir, refreshed every second by Run) reaches
	// it; 0 = none.
	QuotaBytes int64
	// MinFreeBytes refuses Append with ErrQuota while the filesystem has
	// less free space than this. Badger writes its memtable through a
	// sparse memory map: running out of space there is a SIGBUS, not an
	// error, so the store must stop writing well before the disk is full.
	// 0 = no floor.
	MinFreeBytes int64
	MaxBatch     int // entries per group commit, default 256
	// CommitDelay is the longest the committer waits for more readings
	// before a sync, when readings are arriving (groupcommit.go); 0 =
	// DefaultCommitDelay, negative = never wait.
	CommitDelay time.Duration
	Logger      *slog.Logger     // nil = discard
	Metrics     *metrics.Metrics // nil ok
	// GCInterval is how often Run runs value-log GC; default 1 minute.
	GCInterval time.Duration
}

// Queue is the durable queue. Open it, run Run in one goroutine, call the
// other methods from any goroutine, and Close it after Run returned.
//
// Ownership: the committer (Run) owns counters and is the only writer of s/
// keys, new q/ keys and new k/ keys. mutMu serialises the removers (Delete,
// DeadLetter, PurgeDevice, EraseDevice) and the state writers. commitMu is held by the committer from its write to the
// publication of the written items, so PurgeDevice never sees an item that
// the lane index does not know about yet. mu guards the lane index.
type Queue struct {
	db       *badger.DB
	dir      string
	log      *slog.Logger
	met      *metrics.Metrics
	quota    int64
	minFree  int64
	free     atomic.Int64 // free bytes of the filesystem, refreshed with disk
	maxBatch int
	gcEvery  time.Duration
	gc       *groupCommit // committer-owned, but for its atomic counters
	pageOuts atomic.Int64 // page-outs of the mapped files done (pageout_linux.go)
	// pageOutsKept counts the page-outs that dropped the value logs' pages
	// and left them in the page cache (storecalls.go).
	pageOutsKept atomic.Int64
	// pageOutLockMisses counts the page-out's tries of mapsMu that found
	// the store in use (tests).
	pageOutLockMisses atomic.Int64
	// pageOutLooks counts the page-out loop's looks, for tests that must
	// see several pass without a page-out.
	pageOutLooks atomic.Int64
	pageOut      pageOutState // pageout_linux.go
	// mapsMu: held shared by every call into badger that can unmap a
	// value log, exclusively by the page-out's MADV_DONTNEED of the logs
	// (storecalls.go).
	mapsMu sync.RWMutex

	reqs     chan *request
	stopping chan struct{} // closed when Run begins to stop
	closeMu  sync.RWMutex  // Append holds R while sending; Run takes W to set closed
	closed   bool
	running  atomic.Bool
	disk     atomic.Int64 // allocated bytes under dir

	// Committer-owned.
	counters map[string]uint64     // device -> last seq assigned and committed
	floor    map[string]uint64     // device -> highest seq found in q/ at Open
	marks    map[string]deviceMark // device -> device seq mark (devseq.go)
	pending  []record              // committed but whose Sync failed: not yet visible

	commitMu sync.Mutex
	mutMu    sync.Mutex

	// keyMu guards keys, the cache of every data key in the store (see
	// datakey.go): loaded at Open, added to by the committer, removed from
	// by EraseDevice.
	keyMu sync.RWMutex
	keys  map[string]*dataKey

	mu      sync.RWMutex
	lanes   map[string]*laneState // key: string(lane prefix)
	held    int64                 // recentCost of every lane (recent.go)
	dead    int
	changed chan struct{}
}

// laneState is the in-memory index of one lane. count and oldest are exact.
// bytes is the sum of value sizes: exact for values kept inline in the LSM
// (< 1 KB); for larger values, rebuilt on Open and subtracted on removal
// with badger's ValueSize, which estimates the varint header and can be off
// by a byte or so per item. It is clamped at zero.
type laneState struct {
	lane   Lane
	count  int
	bytes  int64
	oldest time.Time
	// visible is the highest seq that is synced: Peek never returns an item
	// above it, so the uplink never sends a reading that a crash could
	// still take back (its seq would then be reused for another reading).
	visible uint64
	// head is a lower bound of the lane's live seqs (usually the first).
	// Reads seek to it instead of scanning from the lane prefix, because
	// the tombstones of delivered items stay in the LSM until compaction
	// and a drain would otherwise re-walk all of them on every Peek.
	head uint64
	// recent: the lane's items held in memory (recent.go), with their
	// cost against recentBytes.
	recent     []Item
	recentCost int64
}

type request struct {
	ctx   context.Context
	entry Entry
	at    time.Time   // when it was handed over (adaptive group commit)
	done  chan result // buffered 1: the committer never blocks answering
}

type result struct {
	item Item
	err  error
}

type record struct {
	req      *request
	item     Item
	key, val []byte
	dk       *dataKey // the device's data key, stored with the item if new
	mark     []byte   // the device's seq mark after this item (devseq.go), or nil
}

// Open opens or creates the store and rebuilds the lane index.
func Open(opts Options) (*Queue, error) {
	if len(opts.Key) != 32 {
		return nil, fmt.Errorf("open queue: store key must be 32 bytes, got %d", len(opts.Key))
	}
	if opts.Dir == "" {
		return nil, errors.New("open queue: no directory")
	}
	if opts.MaxBatch <= 0 {
		opts.MaxBatch = 256
	}
	if opts.GCInterval <= 0 {
		opts.GCInterval = time.Minute
	}
	if opts.CommitDelay == 0 {
		opts.CommitDelay = DefaultCommitDelay
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With("component", "queue")
	if err := os.MkdirAll(opts.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("open queue: create directory: %w", err)
	}
	db, err := badger.Open(badgerOptions(opts.Dir, opts.Key, log))
	if err != nil {
		return nil, fmt.Errorf("open queue: %w", mapDiskFull(err))
	}
	q := &Queue{
		db:       db,
		dir:      opts.Dir,
		log:      log,
		met:      opts.Metrics,
		quota:    opts.QuotaBytes,
		minFree:  opts.MinFreeBytes,
		maxBatch: opts.MaxBatch,
		gcEvery:  opts.GCInterval,
		gc:       newGroupCommit(opts.CommitDelay),
		reqs:     make(chan *request, opts.MaxBatch),
		stopping: make(chan struct{}),
		counters: make(map[string]uint64),
		floor:    make(map[string]uint64),
		marks:    make(map[string]deviceMark),
		lanes:    make(map[string]*laneState),
		changed:  make(chan struct{}),
		keys:     make(map[string]*dataKey),
	}
	if err := q.rebuild(); err != nil {
		db.Close()
		return nil, fmt.Errorf("open queue: rebuild index: %w", err)
	}
	q.refreshSize()
	return q, nil
}

// rebuild loads the data keys and fills the lane index with a key-only scan
// of q/ and d/; it reads the clear header of one value per lane (the first)
// to learn the broker URI and oldest time.
func (q *Queue) rebuild() error {
	return q.view(func(txn *badger.Txn) error {
		if err := q.loadDataKeys(txn); err != nil {
			return err
		}
		io := badger.DefaultIteratorOptions
		io.PrefetchValues = false
		io.Prefix = prefixQueue
		it := txn.NewIterator(io)
		defer it.Close()
		var cur *laneState
		var curPrefix []byte
		for it.Rewind(); it.Valid(); it.Next() {
			bi := it.Item()
			prefix, device, seq, err := parseItemKey(bi.Key())
			if err != nil {
				return err
			}
			if cur == nil || !bytes.Equal(prefix, curPrefix) {
				curPrefix = append(curPrefix[:0], prefix...)
				var oldest time.Time
				var broker string
				if err := bi.Value(func(v []byte) error {
					var err error
					oldest, broker, err = itemHeader(v)
					return err
				}); err != nil {
					return fmt.Errorf("read %x: %w", bi.Key(), err)
				}
				cur = &laneState{lane: Lane{Broker: broker, Device: device}, oldest: oldest, head: seq}
				q.lanes[string(prefix)] = cur
			}
			cur.count++
			cur.bytes += bi.ValueSize()
			cur.visible = seq
			if seq > q.floor[device] {
				q.floor[device] = seq
			}
		}
		it.Close()

		io.Prefix = prefixDead
		dit := txn.NewIterator(io)
		defer dit.Close()
		for dit.Rewind(); dit.Valid(); dit.Next() {
			q.dead++
		}
		return nil
	})
}

// Close closes the store. Call it after Run returned.
func (q *Queue) Close() error {
	// Exclusively: no page-out advises the logs while they are unmapped,
	// even if Close came before Run returned (storecalls.go).
	q.mapsMu.Lock()
	defer q.mapsMu.Unlock()
	if err := q.db.Close(); err != nil {
		return fmt.Errorf("close queue: %w", err)
	}
	return nil
}

// Append queues e and returns after the batch carrying it is committed and
// synced. Errors: ErrQuota (also for a full disk), ErrClosed, the Seal error
// (wrapped), the caller's ctx error, or a store error. On any error the
// reading must not be acknowledged to its source.
func (q *Queue) Append(ctx context.Context, e Entry) (Item, error) {
	wait, err := q.Enqueue(ctx, e)
	if err != nil {
		return Item{}, err
	}
	return wait(ctx)
}

// Enqueue hands an entry to the committer and returns without waiting for
// the commit; wait blocks until the batch that carried it was synced (or
// failed), or its ctx is done (ErrNotYet; a done ctx polls). Entries
// enqueued by one goroutine are committed in that order, so a source can
// keep several readings in flight and still acknowledge them in order.
func (q *Queue) Enqueue(ctx context.Context, e Entry) (wait func(context.Context) (Item, error), err error) {
	switch {
	case e.Seal == nil:
		return nil, errors.New("append: entry has no Seal")
	case e.Broker == "":
		return nil, errors.New("append: entry has no broker")
	case !validDevice(e.Device):
		return nil, fmt.Errorf("append: invalid device id %q", e.Device)
	}
	if q.quota > 0 && q.disk.Load() >= q.quota {
		return nil, fmt.Errorf("append: %d of %d bytes used: %w", q.disk.Load(), q.quota, ErrQuota)
	}
	if free := q.free.Load(); q.minFree > 0 && free >= 0 && free < q.minFree {
		return nil, fmt.Errorf("append: %d bytes free on the disk, at least %d kept free: %w", free, q.minFree, ErrQuota)
	}
	req := &request{ctx: ctx, entry: e, at: time.Now(), done: make(chan result, 1)}
	q.closeMu.RLock()
	if q.closed {
		q.closeMu.RUnlock()
		return nil, ErrClosed
	}
	select {
	case q.reqs <- req:
	case <-q.stopping:
		q.closeMu.RUnlock()
		return nil, ErrClosed
	case <-ctx.Done():
		q.closeMu.RUnlock()
		return nil, fmt.Errorf("append: %w", ctx.Err())
	}
	q.closeMu.RUnlock()
	return func(ctx context.Context) (Item, error) {
		select { // an answer first, even to a context already done
		case r := <-req.done:
			return r.item, r.err
		default:
		}
		select {
		case r := <-req.done:
			return r.item, r.err
		case <-ctx.Done():
			// The committer may still commit it: not acknowledged, so at
			// worst a duplicate with its own seq later.
			return Item{}, notYet(ctx.Err())
		}
	}, nil
}

// errPolled is notYet's answer to a poll (a context cancelled before the
// wait): made once, since mqtt's acker polls every reading it acknowledges.
var errPolled = fmt.Errorf("append: %w: %w", ErrNotYet, context.Canceled)

// notYet is the error of a wait that ended before the committer answered.
func notYet(cause error) error {
	if cause == context.Canceled {
		return errPolled
	}
	return fmt.Errorf("append: %w: %w", ErrNotYet, cause)
}

// Run is the committer loop, with value-log GC and size refresh on the side.
// It returns nil when ctx is cancelled, after failing the Appends still
// waiting with ErrClosed.
func (q *Queue) Run(ctx context.Context) error {
	if !q.running.CompareAndSwap(false, true) {
		return errors.New("run queue: already run")
	}
	hkCtx, hkCancel := context.WithCancel(ctx)
	hkDone := make(chan struct{})
	go func() {
		defer close(hkDone)
		q.housekeep(hkCtx)
	}()
	defer func() {
		hkCancel()
		<-hkDone
	}()

	retry := time.NewTicker(time.Second)
	defer retry.Stop()
	batch := make([]*request, 0, q.maxBatch)
	for {
		// Cancellation wins over waiting Appends (select picks at random).
		if ctx.Err() != nil {
			q.stop()
			return nil
		}
		select {
		case <-ctx.Done():
			continue
		case <-retry.C:
			if len(q.pending) > 0 {
				q.retrySync()
			}
		case r := <-q.reqs:
			q.gc.observe(r)
			batch = q.drain(append(batch[:0], r))
			batch = q.fill(ctx, batch)
			q.gc.begin(time.Now())
			q.commit(batch)
			clear(batch) // drop references to bodies
		}
	}
}

// stop refuses new Appends and fails the queued ones.
func (q *Queue) stop() {
	close(q.stopping) // wakes senders blocked on a full channel, so they drop closeMu
	q.closeMu.Lock()
	q.closed = true
	q.closeMu.Unlock()
	for {
		select {
		case r := <-q.reqs:
			r.done <- result{err: ErrClosed}
		default:
			return
		}
	}
}

// housekeep refreshes the disk size every second and runs value-log GC
// every gcEvery. It runs in its own goroutine so a long GC never delays a
// commit.
func (q *Queue) housekeep(ctx context.Context) {
	size := time.NewTicker(time.Second)
	defer size.Stop()
	gc := time.NewTicker(q.gcEvery)
	defer gc.Stop()
	// The store's mapped files are paged out by a loop of their own
	// (pageout_linux.go), so that a long value-log GC below never stops it.
	pageOutDone := make(chan struct{})
	go func() {
		defer close(pageOutDone)
		q.pageOutLoop(ctx)
	}()
	defer func() { <-pageOutDone }()
	for {
		select {
		case <-ctx.Done():
			return
		case <-size.C:
			q.refreshSize()
		case <-gc.C:
			q.runGC(ctx)
			q.refreshSize()
		}
	}
}

// runGC rewrites value-log files while badger finds some worth it. With
// 8 MB logs a busy minute leaves many, mostly dead (delivered readings):
// a round goes on until nothing is worth rewriting, bounded to 1,024
// files and 20 seconds so that it always ends.
func (q *Queue) runGC(ctx context.Context) {
	deadline := time.Now().Add(20 * time.Second)
	for range 1024 {
		if ctx.Err() != nil || time.Now().After(deadline) {
			return
		}
		err := q.storeCall(func() error { return q.db.RunValueLogGC(0.5) })
		if err != nil {
			// ErrBlockedWrites: EraseDevice is compacting; try next round.
			if !errors.Is(err, badger.ErrNoRewrite) && !errors.Is(err, badger.ErrRejected) &&
				!errors.Is(err, badger.ErrBlockedWrites) {
				q.log.Warn("value-log GC failed", "err", err)
			}
			return
		}
	}
}

// refreshSize measures the allocated size of every file in the store
// directory (LSM tables, value logs, WALs, manifest).
func (q *Queue) refreshSize() {
	var total int64
	_ = filepath.WalkDir(q.dir, func(_ string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return nil // a file removed by compaction mid-walk is not an error
		}
		if fi, err := d.Info(); err == nil {
			total += allocated(fi)
		}
		return nil
	})
	q.disk.Store(total)
	q.free.Store(freeBytes(q.dir))
}

// nextSeq returns the next sequence number for device without consuming it.
func (q *Queue) nextSeq(device string) (uint64, error) {
	last, ok := q.counters[device]
	if !ok {
		var err error
		if last, err = q.storedSeq(device); err != nil {
			return 0, fmt.Errorf("load sequence of %q: %w", device, err)
		}
		// A counter can never be below a queued item's seq; guard anyway so
		// a damaged counter cannot make us reuse a seq.
		last = max(last, q.floor[device])
		q.counters[device] = last
	}
	return last + 1, nil
}

// commit seals, writes, syncs and answers one batch.
func (q *Queue) commit(batch []*request) {
	q.commitMu.Lock()
	defer q.commitMu.Unlock()

	// Look at the disk right before writing: a disk filled by someone else
	// within the last second must not reach badger's memory-mapped
	// memtable, where running out of space is a crash, not an error.
	if q.minFree > 0 {
		free := freeBytes(q.dir)
		q.free.Store(free)
		if free >= 0 && free < q.minFree {
			for _, r := range batch {
				r.done <- result{err: fmt.Errorf("append: %d bytes free on the disk, at least %d kept free: %w", free, q.minFree, ErrQuota)}
			}
			return
		}
	}
	// No monotonic reading: the Item returned equals the one Peek decodes.
	now := time.Now().Round(0)
	recs := make([]record, 0, len(batch))
	nonce, err := nonces(len(batch))
	if err != nil {
		for _, r := range batch {
			r.done <- result{err: fmt.Errorf("append: %w", err)}
		}
		return
	}
	for i, r := range batch {
		if err := r.ctx.Err(); err != nil {
			r.done <- result{err: fmt.Errorf("append: %w", err)}
			continue
		}
		e := r.entry
		var mark deviceMark
		if e.DeviceSeq != 0 {
			m, err := q.deviceMarkOf(e.Device)
			if err == nil {
				err = m.check(e.DeviceSeq, e.DeviceDigest)
			}
			if err != nil {
				r.done <- result{err: fmt.Errorf("append: %w", err)}
				continue
			}
			mark = m.accept(e.DeviceSeq, e.DeviceDigest)
		}
		seq, err := q.nextSeq(e.Device)
		if err != nil {
			r.done <- result{err: fmt.Errorf("append: %w", err)}
			continue
		}
		dk, err := q.commitKey(e.Device)
		if err != nil {
			r.done <- result{err: fmt.Errorf("append: %w", err)}
			continue
		}
		body, err := e.Seal(seq)
		if err != nil {
			r.done <- result{err: fmt.Errorf("append: seal reading: %w", err)}
			continue
		}
		q.counters[e.Device] = seq
		var markVal []byte
		if e.DeviceSeq != 0 {
			q.marks[e.Device] = mark
			markVal = mark.encode()
		}
		it := Item{Broker: e.Broker, Device: e.Device, Type: e.Type, Service: e.Service,
			ServicePath: e.ServicePath, Seq: seq, Enqueued: now, Body: body}
		recs = append(recs, record{req: r, item: it, dk: dk,
			key: itemKey(prefixQueue, e.Broker, e.Device, seq),
			val: sealItem(&it, dk.aead, nonce[i*nonceSize:(i+1)*nonceSize]), mark: markVal})
	}
	if len(recs) == 0 {
		return
	}

	began := time.Now()
	n, werr := q.write(recs)
	if werr != nil {
		werr = fmt.Errorf("append: commit batch: %w", mapDiskFull(werr))
		q.log.Error("queue commit failed", "committed", n, "failed", len(recs)-n, "err", werr)
		// Seqs of the failed records were not committed: forget the
		// in-memory counters so the next batch reloads them from disk,
		// gap-free; so are the device seq marks.
		clear(q.counters)
		clear(q.marks)
		for _, rc := range recs[n:] {
			rc.req.done <- result{err: werr}
		}
	}
	done := recs[:n]
	if n == 0 {
		return
	}
	q.gc.syncs.Add(1)
	if err := q.db.Sync(); err != nil {
		err = fmt.Errorf("append: sync batch: %w", mapDiskFull(err))
		q.log.Error("queue sync failed", "items", n, "err", err)
		// The items are committed (their seqs are spent) but not durable:
		// keep them invisible until a later Sync succeeds.
		for i := range done {
			done[i].req.done <- result{err: err}
			done[i].req = nil
		}
		q.pending = append(q.pending, done...)
		return
	}
	if len(q.pending) > 0 {
		done = append(q.pending, done...)
		q.pending = nil
	}
	q.publish(done)
	for _, rc := range done {
		if rc.req != nil {
			rc.req.done <- result{item: rc.item}
		}
	}
	if q.met != nil {
		q.met.Queued.Add(float64(len(done)))
		q.met.CommitBatch.Observe(float64(len(done)))
		q.met.CommitSeconds.Observe(time.Since(began).Seconds())
	}
}

// retrySync makes pending records visible once a Sync succeeds.
func (q *Queue) retrySync() {
	q.commitMu.Lock()
	defer q.commitMu.Unlock()
	if err := q.db.Sync(); err != nil {
		q.log.Warn("queue sync retry failed", "items", len(q.pending), "err", err)
		return
	}
	q.publish(q.pending)
	q.pending = nil
}

// write commits recs in as few transactions as badger allows, each carrying
// the counters of its own items, and returns how many leading records were
// committed.
func (q *Queue) write(recs []record) (int, error) {
	err := q.writeTxn(recs)
	if errors.Is(err, badger.ErrTxnTooBig) && len(recs) > 1 {
		mid := len(recs) / 2
		n, err := q.write(recs[:mid])
		if err != nil {
			return n, err
		}
		m, err := q.write(recs[mid:])
		return n + m, err
	}
	if err != nil {
		return 0, err
	}
	return len(recs), nil
}

// writeTxn also stores the data key of each device whose key is new, in
// the transaction of its first item: an item is never committed without
// its key.
func (q *Queue) writeTxn(recs []record) error {
	q.mapsMu.RLock() // the write may rotate the value log (storecalls.go)
	defer q.mapsMu.RUnlock()
	txn := q.db.NewTransaction(true)
	defer txn.Discard()
	last := make(map[string]uint64)
	marks := make(map[string][]byte)
	var newKeys []*dataKey
	for i := range recs {
		if err := txn.Set(recs[i].key, recs[i].val); err != nil {
			return err
		}
		dev := recs[i].item.Device
		if dk := recs[i].dk; dk != nil && !dk.persisted && !slices.Contains(newKeys, dk) {
			if err := txn.Set(dataKeyKey(dev), dk.raw); err != nil {
				return err
			}
			newKeys = append(newKeys, dk)
		}
		last[dev] = recs[i].item.Seq // seqs rise within a batch
		if recs[i].mark != nil {
			marks[dev] = recs[i].mark // the later mark includes the earlier
		}
	}
	for dev, m := range marks {
		if err := txn.Set(markKey(dev), m); err != nil {
			return err
		}
	}
	for dev, seq := range last {
		if err := txn.Set(seqKey(dev), binary.BigEndian.AppendUint64(nil, seq)); err != nil {
			return err
		}
	}
	if err := txn.Commit(); err != nil {
		return err
	}
	for _, dk := range newKeys {
		dk.persisted, dk.raw = true, nil
	}
	return nil
}

// publish adds synced records to the lane index and wakes Changed waiters.
func (q *Queue) publish(recs []record) {
	if len(recs) == 0 {
		return
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	for _, rc := range recs {
		p := rc.key[:len(rc.key)-8]
		ls := q.lanes[string(p)] // no string allocated for a lookup
		if ls == nil {
			ls = &laneState{lane: Lane{Broker: rc.item.Broker, Device: rc.item.Device}, oldest: rc.item.Enqueued, head: rc.item.Seq}
			q.lanes[string(p)] = ls
		}
		ls.count++
		ls.bytes += int64(len(rc.val))
		ls.visible = max(ls.visible, rc.item.Seq)
		q.hold(ls, rc.item)
	}
	close(q.changed)
	q.changed = make(chan struct{})
}

// Changed returns a channel closed at the next commit that adds items.
// Callers re-call it after each wake-up, before looking at the lanes, so no
// commit falls between the look and the wait.
func (q *Queue) Changed() <-chan struct{} {
	q.mu.RLock()
	defer q.mu.RUnlock()
	return q.changed
}

// Brokers returns the brokers with non-empty lanes, sorted.
func (q *Queue) Brokers() []string {
	q.mu.RLock()
	defer q.mu.RUnlock()
	var out []string
	for _, ls := range q.lanes {
		if !slices.Contains(out, ls.lane.Broker) {
			out = append(out, ls.lane.Broker)
		}
	}
	slices.Sort(out)
	return out
}

// Lanes returns the non-empty lanes of broker, sorted by device.
func (q *Queue) Lanes(broker string) []Lane {
	q.mu.RLock()
	defer q.mu.RUnlock()
	var out []Lane
	for _, ls := range q.lanes {
		if ls.lane.Broker == broker {
			out = append(out, ls.lane)
		}
	}
	slices.SortFunc(out, func(a, b Lane) int { return strings.Compare(a.Device, b.Device) })
	return out
}

// Ready counts the synced readings of lanes, at most perLane of each (the
// most one batch takes of a lane): how full a batch sent now would be. One
// lock and a map lookup per lane, nothing read from the store.
func (q *Queue) Ready(lanes []Lane, perLane int) int {
	var buf []byte
	var h [8]byte
	broker, n := "", 0
	q.mu.RLock()
	defer q.mu.RUnlock()
	for i, l := range lanes {
		if i == 0 || l.Broker != broker {
			broker, h = l.Broker, brokerHash(l.Broker)
		}
		buf = append(append(append(append(buf[:0], prefixQueue...), h[:]...), l.Device...), 0)
		if ls := q.lanes[string(buf)]; ls != nil { // no string allocated for a lookup
			n += min(ls.count, perLane)
		}
	}
	return n
}

// Peek returns up to max items of lane l, oldest first. It returns only
// synced items.
func (q *Queue) Peek(l Lane, max int) ([]Item, error) {
	if max <= 0 || !validDevice(l.Device) {
		return nil, nil
	}
	prefix := lanePrefix(prefixQueue, l.Broker, l.Device)
	q.mu.RLock()
	ls := q.lanes[string(prefix)]
	var visible, head uint64
	if ls != nil {
		if out, ok := peekHeld(ls, max); ok {
			q.mu.RUnlock()
			return out, nil
		}
		visible, head = ls.visible, ls.head
	}
	q.mu.RUnlock()
	if visible == 0 {
		return nil, nil
	}
	var out []Item
	err := q.view(func(txn *badger.Txn) error {
		// Lanes are dense (a device's seqs are consecutive and delivered
		// from the head), so point reads from the head find the items
		// without building an iterator over every table, which cost more
		// than the read itself (one Peek per reading in filter mode).
		seq := head
		key := make([]byte, 0, len(prefix)+8)
		for seq <= visible && len(out) < max {
			key = binary.BigEndian.AppendUint64(append(key[:0], prefix...), seq)
			bi, err := txn.Get(key)
			if errors.Is(err, badger.ErrKeyNotFound) {
				break // a gap (dead letter, purge, stale head): iterate
			}
			if err != nil {
				return err
			}
			item := Item{Device: l.Device, Seq: seq}
			if err := bi.Value(func(v []byte) error { return q.decodeItemValue(v, &item) }); err != nil {
				return fmt.Errorf("decode %s/%d: %w", l.Device, seq, err)
			}
			out = append(out, item)
			seq++
		}
		if len(out) >= max || seq > visible {
			return nil
		}
		io := badger.DefaultIteratorOptions
		io.Prefix = prefix
		io.PrefetchSize = min(max-len(out), 100)
		it := txn.NewIterator(io)
		defer it.Close()
		for it.Seek(binary.BigEndian.AppendUint64(prefix, seq)); it.Valid() && len(out) < max; it.Next() {
			bi := it.Item()
			_, device, seq, err := parseItemKey(bi.Key())
			if err != nil {
				return err
			}
			if seq > visible {
				break
			}
			item := Item{Device: device, Seq: seq}
			if err := bi.Value(func(v []byte) error { return q.decodeItemValue(v, &item) }); err != nil {
				return fmt.Errorf("decode %s/%d: %w", device, seq, err)
			}
			out = append(out, item)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("peek lane %s: %w", l.Device, err)
	}
	return out, nil
}

// removal is one item taken out of a lane.
type removal struct {
	prefix string
	seq    uint64
	bytes  int64
}

// Delete removes delivered items. Items already gone are skipped, so a
// repeated Delete is harmless. Not synced: a delete lost in a crash only
// makes the item be delivered again.
func (q *Queue) Delete(items []Item) error {
	if len(items) == 0 {
		return nil
	}
	q.mutMu.Lock()
	defer q.mutMu.Unlock()
	// Under mutMu no other remover runs, so what is held in memory now is
	// still live when the transaction deletes it: its size need not be
	// read back (deletes.go).
	removed, err := q.deleteSized(items, q.heldSizes(items))
	// Index what was removed even on error: a split delete may have
	// committed its first half.
	if uerr := q.unindex(removed); err == nil {
		err = uerr
	}
	if err != nil {
		return fmt.Errorf("delete items: %w", err)
	}
	return nil
}

// unindex applies removals to the lane index and re-reads the oldest time of
// each lane that still has items. Callers hold mutMu.
func (q *Queue) unindex(removed []removal) error {
	if len(removed) == 0 {
		return nil
	}
	// Per lane still holding items: its head before, and the seqs removed.
	type span struct {
		from     uint64 // the head to seek from
		lo, hi   uint64 // smallest and largest seq removed
		n        uint64 // how many removed
		headGone bool   // the head itself was removed
		covered  bool   // the held items covered the lane from its head
	}
	touched := make(map[string]*span)
	q.mu.Lock()
	for _, r := range removed {
		ls := q.lanes[r.prefix]
		if ls == nil {
			continue
		}
		ls.count--
		ls.bytes = max(0, ls.bytes-r.bytes)
		if ls.count <= 0 {
			q.dropLane(r.prefix, ls)
			delete(touched, r.prefix)
			continue
		}
		covered := q.forget(ls, r.seq)
		sp := touched[r.prefix]
		if sp == nil {
			sp = &span{from: ls.head, lo: r.seq, hi: r.seq, covered: covered}
			touched[r.prefix] = sp
		}
		sp.lo, sp.hi, sp.n = min(sp.lo, r.seq), max(sp.hi, r.seq), sp.n+1
		sp.headGone = sp.headGone || r.seq == ls.head
	}
	// The new head of a lane whose held items covered it is the first
	// one still held: no read of the store.
	for p, sp := range touched {
		ls := q.lanes[p]
		if sp.headGone && sp.covered && ls != nil && len(ls.recent) > 0 {
			ls.head, ls.oldest = ls.recent[0].Seq, ls.recent[0].Enqueued
			delete(touched, p)
		}
	}
	q.mu.Unlock()
	for p, sp := range touched {
		if !sp.headGone {
			continue // removed from the middle: the head and its time stand
		}
		// The usual case: the head and the items right after it were
		// delivered, [head, hi] with nothing left between, so the new head
		// is hi+1 if it exists: one point read instead of an iterator.
		from := sp.from
		if sp.lo == sp.from && sp.hi-sp.lo+1 == sp.n {
			from = sp.hi + 1
		}
		seq, err := q.laneHead([]byte(p), from)
		if err != nil {
			return fmt.Errorf("re-read lane head: %w", err)
		}
		q.mu.Lock()
		if ls := q.lanes[p]; ls != nil && seq != 0 {
			// The head's time is read when Stats asks (oldestOf): reading
			// it here read every delivered reading's successor back from
			// the value log, a second time right before Peek did.
			ls.oldest, ls.head = time.Time{}, seq
		}
		q.mu.Unlock()
	}
	return nil
}

// laneHead is firstLive with a point read of from first: after a delivery
// the next item is usually exactly there. Keys only: no value is read.
func (q *Queue) laneHead(prefix []byte, from uint64) (uint64, error) {
	err := q.view(func(txn *badger.Txn) error {
		_, err := txn.Get(binary.BigEndian.AppendUint64(bytes.Clone(prefix), from))
		return err
	})
	switch {
	case err == nil:
		return from, nil
	case errors.Is(err, badger.ErrKeyNotFound):
		seq, _, err := q.firstLive(prefix, from, false)
		return seq, err
	default:
		return 0, err
	}
}

// firstLive returns the seq and, if withTime, the enqueue time of the first
// item under prefix at or after seq from (0, zero time if none).
func (q *Queue) firstLive(prefix []byte, from uint64, withTime bool) (uint64, time.Time, error) {
	var t time.Time
	var seq uint64
	err := q.view(func(txn *badger.Txn) error {
		io := badger.DefaultIteratorOptions
		io.PrefetchValues = false
		io.Prefix = prefix
		it := txn.NewIterator(io)
		defer it.Close()
		it.Seek(binary.BigEndian.AppendUint64(prefix, from))
		if !it.Valid() {
			return nil
		}
		k := it.Item().Key()
		seq = binary.BigEndian.Uint64(k[len(k)-8:])
		if !withTime {
			return nil
		}
		return it.Item().Value(func(v []byte) error {
			var err error
			t, err = enqueuedOf(v)
			return err
		})
	})
	return seq, t, err
}

// DeadLetter moves it out of its lane into the dead-letter area, with the
// reason and the time, in one synced transaction. It returns ErrNotFound if
// the item is not queued.
func (q *Queue) DeadLetter(it Item, reason string) error {
	if !validDevice(it.Device) {
		return fmt.Errorf("dead-letter: invalid device id %q: %w", it.Device, ErrNotFound)
	}
	q.mutMu.Lock()
	defer q.mutMu.Unlock()
	key := itemKey(prefixQueue, it.Broker, it.Device, it.Seq)
	var size int64
	err := q.update(func(txn *badger.Txn) error {
		bi, err := txn.Get(key)
		if errors.Is(err, badger.ErrKeyNotFound) {
			return ErrNotFound
		}
		if err != nil {
			return err
		}
		size = bi.ValueSize()
		// The stored copy is the truth, not the caller's.
		d := DeadLetter{Item: Item{Device: it.Device, Seq: it.Seq}, Reason: reason, At: time.Now()}
		if err := bi.Value(func(v []byte) error { return q.decodeItemValue(v, &d.Item) }); err != nil {
			return err
		}
		// Re-sealed with a fresh nonce under the device's key; a version 1
		// item of a device that never got a key stays version 1.
		val := encodeDead(&d)
		if aead, err := q.readKey(it.Device); err == nil {
			nonce, err := nonces(1)
			if err != nil {
				return err
			}
			val = sealDead(&d, aead, nonce)
		}
		if err := txn.Set(itemKey(prefixDead, it.Broker, it.Device, it.Seq), val); err != nil {
			return err
		}
		return txn.Delete(key)
	})
	if err != nil {
		return fmt.Errorf("dead-letter %s/%d: %w", it.Device, it.Seq, mapDiskFull(err))
	}
	q.mu.Lock()
	q.dead++
	q.mu.Unlock()
	if err := q.unindex([]removal{{prefix: string(key[:len(key)-8]), seq: it.Seq, bytes: size}}); err != nil {
		return err
	}
	if err := q.db.Sync(); err != nil {
		return fmt.Errorf("dead-letter %s/%d: sync: %w", it.Device, it.Seq, mapDiskFull(err))
	}
	return nil
}

// DeadLetters calls fn for each dead letter, in key order (broker hash,
// device, seq), until fn returns an error or ctx is done.
func (q *Queue) DeadLetters(ctx context.Context, fn func(DeadLetter) error) error {
	err := q.view(func(txn *badger.Txn) error {
		io := badger.DefaultIteratorOptions
		io.Prefix = prefixDead
		it := txn.NewIterator(io)
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			if err := ctx.Err(); err != nil {
				return err
			}
			bi := it.Item()
			_, device, seq, err := parseItemKey(bi.Key())
			if err != nil {
				return err
			}
			d := DeadLetter{Item: Item{Device: device, Seq: seq}}
			if err := bi.Value(func(v []byte) error { return q.decodeDeadValue(v, &d) }); err != nil {
				return fmt.Errorf("decode dead letter %s/%d: %w", device, seq, err)
			}
			if err := fn(d); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("list dead letters: %w", err)
	}
	return nil
}

// Stats returns per-broker depth, bytes and oldest item, the dead-letter
// count, the disk usage and the quota.
func (q *Queue) Stats() Stats {
	q.resolveOldest()
	q.mu.RLock()
	defer q.mu.RUnlock()
	byBroker := make(map[string]*BrokerStats)
	st := Stats{DeadLetters: q.dead, DiskBytes: q.disk.Load(), QuotaBytes: q.quota}
	for _, ls := range q.lanes {
		b := byBroker[ls.lane.Broker]
		if b == nil {
			b = &BrokerStats{Broker: ls.lane.Broker}
			byBroker[ls.lane.Broker] = b
		}
		b.Depth += ls.count
		b.Bytes += ls.bytes
		if !ls.oldest.IsZero() && (b.Oldest.IsZero() || ls.oldest.Before(b.Oldest)) {
			b.Oldest = ls.oldest
		}
		st.Depth += ls.count
	}
	for _, b := range byBroker {
		st.Brokers = append(st.Brokers, *b)
	}
	slices.SortFunc(st.Brokers, func(a, b BrokerStats) int { return strings.Compare(a.Broker, b.Broker) })
	return st
}

// resolveOldest reads the enqueue time of the lanes' heads that a delivery
// left unknown (unindex), outside q.mu.
func (q *Queue) resolveOldest() {
	type want struct {
		prefix string
		head   uint64
	}
	var todo []want
	q.mu.RLock()
	for p, ls := range q.lanes {
		if ls.oldest.IsZero() {
			todo = append(todo, want{p, ls.head})
		}
	}
	q.mu.RUnlock()
	for _, w := range todo {
		seq, t, err := q.firstLive([]byte(w.prefix), w.head, true)
		if err != nil || seq == 0 {
			continue // a lane drained meanwhile; a failed read shows no time
		}
		q.mu.Lock()
		if ls := q.lanes[w.prefix]; ls != nil && ls.oldest.IsZero() && ls.head <= seq {
			ls.oldest, ls.head = t, seq
		}
		q.mu.Unlock()
	}
}

// LastSeq returns the last sequence number committed for device (0 = none).
func (q *Queue) LastSeq(device string) (uint64, error) {
	if !validDevice(device) {
		return 0, fmt.Errorf("last seq: invalid device id %q", device)
	}
	last, err := q.storedSeq(device)
	if err != nil {
		return 0, fmt.Errorf("last seq of %q: %w", device, err)
	}
	return last, nil
}

// storedSeq reads a device's persisted counter (0 = none).
func (q *Queue) storedSeq(device string) (last uint64, err error) {
	err = q.readValue(seqKey(device), func(v []byte) error {
		if len(v) != 8 {
			return errBadValue
		}
		last = binary.BigEndian.Uint64(v)
		return nil
	})
	return last, err
}

// readValue calls fn with the value stored under key; a missing key is no
// error and no call.
func (q *Queue) readValue(key []byte, fn func(v []byte) error) error {
	return q.view(func(txn *badger.Txn) error {
		bi, err := txn.Get(key)
		if errors.Is(err, badger.ErrKeyNotFound) {
			return nil
		}
		if err != nil {
			return err
		}
		return bi.Value(fn)
	})
}

// PurgeDevice drops every queued item of device, in every lane, and returns
// how many. The device's sequence counter is kept, so its seqs are never
// reused. Dead letters are kept (they are evidence); see the data purge
// command for those.
func (q *Queue) PurgeDevice(device string) (int, error) {
	if !validDevice(device) {
		return 0, fmt.Errorf("purge device: invalid device id %q", device)
	}
	// commitMu: no committed-but-unpublished item of this device can exist
	// while we scan, so the index stays exact.
	q.commitMu.Lock()
	defer q.commitMu.Unlock()
	q.mutMu.Lock()
	defer q.mutMu.Unlock()

	var keys [][]byte
	err := q.view(func(txn *badger.Txn) error {
		return eachOfDevice(txn, prefixQueue, device, func(_ []byte, _ uint64, bi *badger.Item) error {
			keys = append(keys, bi.KeyCopy(nil))
			return nil
		})
	})
	if err != nil {
		return 0, fmt.Errorf("purge device %q: scan: %w", device, err)
	}
	if err := q.deleteKeys(keys); err != nil {
		return 0, fmt.Errorf("purge device %q: %w", device, err)
	}
	// Drop records of the device waiting for a successful Sync too.
	q.pending = slices.DeleteFunc(q.pending, func(r record) bool { return r.item.Device == device })
	q.mu.Lock()
	for p, ls := range q.lanes {
		if ls.lane.Device == device {
			q.dropLane(p, ls)
		}
	}
	q.mu.Unlock()
	if err := q.db.Sync(); err != nil {
		return len(keys), fmt.Errorf("purge device %q: sync: %w", device, err)
	}
	return len(keys), nil
}

// mapDiskFull wraps a "no space left on device" error so it also matches
// ErrQuota: callers then treat a full disk like the quota (not acknowledged,
// retried later).
func mapDiskFull(err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, syscall.ENOSPC) || strings.Contains(err.Error(), "no space left on device") {
		return fmt.Errorf("%w: %w", ErrQuota, err)
	}
	return err
}
