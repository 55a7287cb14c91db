package queue

import (
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/dgraph-io/badger/v4/options"
)

// badgerOptions tunes badger for a 1 GB Raspberry Pi with encryption on.
//
// Memory ceiling (anonymous memory badger can hold at once, worst case):
//
//	term                                   size        why
//	memtables: NumMemtables(2) x arena     2 x 2.6 MB  skiplist arena = MemTableSize(2 MB)
//	                                                   + maxBatchSize(0.3 MB) + maxBatchCount x node
//	block cache (ristretto)                4 MB        BlockCacheSize: the uplink reads
//	                                                   fresh readings from memory (recent.go)
//	index cache (ristretto)                4 MB        IndexCacheSize, required with encryption
//	L0 flush table builder                 ~2 MB       builds one table from a full memtable
//	compactions: NumCompactors(2) x ~2 x   ~2 MB       each builds BaseTableSize(512 KB) tables,
//	  BaseTableSize x ~2                               double-buffered; see below
//	write channel + our batch              ~1 MB       MaxBatch(256) x ~1 KB readings, twice
//	----------------------------------------------------
//	total                                  ~21 MB
//
// File-backed mappings come on top. They are page cache, but pages a
// process has mapped count in its RSS (and in what the OOM killer weighs)
// until they are unmapped, and badger keeps every value-log file mapped
// until value-log GC deletes it. So the value logs are small (8 MB: at most
// that much of the file being written is resident), the store's mapped
// pages are paged out past a budget (pageout_linux.go), and GC runs every minute
// until nothing is worth rewriting (runGC). Measured with edgegate-bench
// at full load: peak RSS 111 MB with 64 MB logs and 8 MB memtables, 46-53
// MB now, of which ~14 MB is the daemon's own binary. The memtables hold
// keys and value pointers (readings go to the value log): 2 MB is ~20k
// readings, and 2 MB or 8 MB made no difference to throughput. Each memtable WAL is mmapped at
// 2 x MemTableSize; on 32-bit ARM the address space is a limit too.
func badgerOptions(dir string, key []byte, logger *slog.Logger) badger.Options {
	return badger.DefaultOptions(dir).
		// Durability comes from db.Sync after each group commit.
		WithSyncWrites(false).
		WithEncryptionKey(key).
		// Data keys are rotated under the master key; ten days keeps the
		// registry small (~37 keys a year) while limiting what one data key
		// protects.
		WithEncryptionKeyRotationDuration(10 * 24 * time.Hour).
		WithIndexCacheSize(4 << 20).
		WithBlockCacheSize(4 << 20).
		WithMemTableSize(2 << 20).
		WithNumMemtables(2).
		WithNumLevelZeroTables(2).
		WithNumLevelZeroTablesStall(4).
		WithValueLogFileSize(8 << 20).
		// Readings go to the value log and the LSM holds keys and value
		// pointers. A sealed reading is ~0.5-1 KB packed (its JWS once;
		// envelope.SealPacked), 1.2-2.8 KB before packing. Inline, they
		// cost memory (an 8 KB threshold: 108-117 MB anonymous,
		// docs/bench/README.md) and every memtable flush and compaction
		// rewrote them: packed readings under the old 1 KB threshold
		// went inline and the embedded burst fell from 16.3k to 5.1k/s.
		// s/ and k/ values (8-100 bytes) stay inline.
		WithValueThreshold(256).
		// Table builders allocate twice the table size, several per
		// compaction (up to 8 + splits at once), and badger keeps up to 8
		// used builders' buffers in its allocator pool for reuse, freeing
		// one every 2 s (ristretto z.AllocatorPool): 12 of the 27 MB badger
		// held in a heap profile while draining a backlog, and the live
		// heap of a queuing backlog peaked at 32 MB with 1 MB tables
		// (gctrace), so that a 32 MiB memory_limit ran the collector back
		// to back (18 % of the CPU). Tables hold keys and value pointers
		// only; 1 MB ones made queuing faster than 2 MB, and 512 KB ones
		// kept the backlog's RSS within 10 % from 100k to 400k queued under
		// memory_limit 40MiB (docs/performance.md#memory).
		WithBaseTableSize(512 << 10).
		WithNumCompactors(2).
		WithNumGoroutines(2).
		WithCompression(options.Snappy).
		// badger's metrics live in package-level expvars keyed by directory;
		// we measure the directory ourselves instead.
		WithMetricsEnabled(false).
		// Safe: the committer is the only writer of s/ keys and of new q/
		// keys, and Delete/DeadLetter/PurgeDevice are serialised by
		// Queue.mutMu, so no two transactions ever race on one key.
		WithDetectConflicts(false).
		// Not WithLoggingLevel: it replaces the logger with badger's stderr
		// one. badgerLogger does the level filtering itself.
		WithLogger(badgerLogger{logger.With("component", "badger")})
}

// badgerLogger forwards badger's WARNING and ERROR lines to slog. Info and
// debug lines are dropped: badger logs every compaction at INFO, which would
// wear an SD card through journald.
type badgerLogger struct{ l *slog.Logger }

func (b badgerLogger) Errorf(f string, a ...any) {
	b.l.Error(strings.TrimSpace(fmt.Sprintf(f, a...)))
}
func (b badgerLogger) Warningf(f string, a ...any) {
	b.l.Warn(strings.TrimSpace(fmt.Sprintf(f, a...)))
}
func (badgerLogger) Infof(string, ...any)  {}
func (badgerLogger) Debugf(string, ...any) {}
