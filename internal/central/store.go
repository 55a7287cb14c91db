package central

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"os"
	"sort"
	"sync"
	"time"

	badger "github.com/dgraph-io/badger/v4"
)

// Store keeps the companion's state per gateway: the embedded badger one
// (one process) or PostgresStore (replicas deciding the version in the
// database).
type Store interface {
	// Gateway returns a gateway's record; ok false when there is none.
	Gateway(ctx context.Context, id string) (rec GatewayRecord, ok bool, err error)
	// UpdateGateway runs fn on the record (a zero one with ID set when
	// there is none) and stores the result atomically: two updates of one
	// gateway never interleave. fn returning an error stores nothing and
	// returns that error with the record as fn left it.
	UpdateGateway(ctx context.Context, id string, fn func(*GatewayRecord) error) (GatewayRecord, error)
	// PublishLocked runs fn with the gateway's newest committed record
	// while no other PublishLocked of that gateway runs (in any replica).
	// A publisher that publishes what it read there never publishes an
	// older version after a newer one: a newer version's own publisher
	// reads it later. Updates are not blocked (the push broker's ACL hook
	// may bind an account, an update, from inside fn). fn must be short
	// (one publish); it stores nothing.
	PublishLocked(ctx context.Context, id string, fn func(GatewayRecord) error) error
	// Gateways lists every record, by id.
	Gateways(ctx context.Context) ([]GatewayRecord, error)
	Close() error
}

// keptVersions is how many issued versions a record remembers, so that a
// receipt for a recent but superseded version is still recognised.
const keptVersions = 16

// GatewayRecord is one gateway's state. Bundle holds device keys (K1/K2):
// the badger store is encrypted at rest (see OpenBadger).
type GatewayRecord struct {
	ID      string `json:"id"`
	Account string `json:"account,omitempty"` // azp bound to it
	Pin     string `json:"pin,omitempty"`     // RFC 7638 thumbprint of its identity key

	Version   uint64    `json:"version"`
	Content   string    `json:"content"` // digest of devices and delegations
	IssuedAt  time.Time `json:"issued_at,omitzero"`
	ExpiresAt time.Time `json:"expires_at,omitzero"`
	Bundle    string    `json:"bundle,omitempty"` // compact JWS
	Digest    string    `json:"digest,omitempty"` // centralsync.Digest of Bundle
	Devices   int       `json:"devices"`
	// Issued maps recent versions to their bundle digests.
	Issued map[uint64]string `json:"issued,omitempty"`

	// From the last accepted receipt.
	Applied         uint64    `json:"applied_version,omitempty"`
	AppliedDigest   string    `json:"applied_digest,omitempty"`
	AppliedAt       time.Time `json:"applied_at,omitzero"`
	ReceiptAt       time.Time `json:"receipt_at,omitzero"`
	AppliedSince    time.Time `json:"applied_since,omitzero"` // first receipt of Applied
	RefusedReceipts int       `json:"refused_receipts,omitempty"`
	LastRefusal     string    `json:"last_refusal,omitempty"`
	BuildError      string    `json:"build_error,omitempty"` // why the last build was refused
	BuildErrorAt    time.Time `json:"build_error_at,omitzero"`
}

func (r *GatewayRecord) remember(version uint64, digest string) {
	if r.Issued == nil {
		r.Issued = map[uint64]string{}
	}
	r.Issued[version] = digest
	if len(r.Issued) <= keptVersions {
		return
	}
	vs := make([]uint64, 0, len(r.Issued))
	for v := range r.Issued {
		vs = append(vs, v)
	}
	sort.Slice(vs, func(i, j int) bool { return vs[i] < vs[j] })
	for _, v := range vs[:len(vs)-keptVersions] {
		delete(r.Issued, v)
	}
}

// BadgerStore is the embedded Store.
type BadgerStore struct {
	db *badger.DB
	// locks serialise PublishLocked per gateway (striped by id).
	locks [64]sync.Mutex
}

func (s *BadgerStore) lock(id string) *sync.Mutex {
	h := fnv.New32a()
	h.Write([]byte(id))
	return &s.locks[h.Sum32()%uint32(len(s.locks))]
}

// PublishLocked implements Store.
func (s *BadgerStore) PublishLocked(ctx context.Context, id string, fn func(GatewayRecord) error) error {
	mu := s.lock(id)
	mu.Lock()
	defer mu.Unlock()
	rec, _, err := s.Gateway(ctx, id)
	if err != nil {
		return err
	}
	rec.ID = id
	return fn(rec)
}

const gwPrefix = "gw/"

// OpenBadger opens (creating) the store in dir, encrypted at rest with
// key (32 bytes, AES-256: bundles hold K1/K2).
func OpenBadger(dir string, key []byte) (*BadgerStore, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("store: %w", err)
	}
	db, err := badger.Open(badger.DefaultOptions(dir).WithLogger(nil).WithNumVersionsToKeep(1).
		WithEncryptionKey(key).WithIndexCacheSize(16 << 20))
	if err != nil {
		return nil, fmt.Errorf("store %s: %w", dir, err)
	}
	return &BadgerStore{db: db}, nil
}

// Close closes the database.
func (s *BadgerStore) Close() error { return s.db.Close() }

// Gateway implements Store.
func (s *BadgerStore) Gateway(_ context.Context, id string) (GatewayRecord, bool, error) {
	var rec GatewayRecord
	found := false
	err := s.db.View(func(txn *badger.Txn) error {
		var err error
		found, err = getRecord(txn, id, &rec)
		return err
	})
	return rec, found, err
}

func getRecord(txn *badger.Txn, id string, rec *GatewayRecord) (bool, error) {
	it, err := txn.Get([]byte(gwPrefix + id))
	if errors.Is(err, badger.ErrKeyNotFound) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("store: gateway %s: %w", id, err)
	}
	return true, it.Value(func(v []byte) error {
		if err := json.Unmarshal(v, rec); err != nil {
			return fmt.Errorf("store: gateway %s: %w", id, err)
		}
		return nil
	})
}

// UpdateGateway implements Store: a badger transaction, retried on a
// conflict with a concurrent update.
func (s *BadgerStore) UpdateGateway(ctx context.Context, id string, fn func(*GatewayRecord) error) (GatewayRecord, error) {
	for {
		var rec GatewayRecord
		err := s.db.Update(func(txn *badger.Txn) error {
			rec = GatewayRecord{}
			if _, err := getRecord(txn, id, &rec); err != nil {
				return err
			}
			rec.ID = id
			if err := fn(&rec); err != nil {
				return err
			}
			b, err := json.Marshal(rec)
			if err != nil {
				return fmt.Errorf("store: gateway %s: %w", id, err)
			}
			return txn.Set([]byte(gwPrefix+id), b)
		})
		if errors.Is(err, badger.ErrConflict) && ctx.Err() == nil {
			continue
		}
		return rec, err
	}
}

// Gateways implements Store.
func (s *BadgerStore) Gateways(_ context.Context) ([]GatewayRecord, error) {
	var out []GatewayRecord
	err := s.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte(gwPrefix)})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			var rec GatewayRecord
			if err := it.Item().Value(func(v []byte) error { return json.Unmarshal(v, &rec) }); err != nil {
				return fmt.Errorf("store: %s: %w", it.Item().Key(), err)
			}
			out = append(out, rec)
		}
		return nil
	})
	return out, err
}
