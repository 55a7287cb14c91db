package central

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// PostgresStore is the Store of a fleet: any number of stateless
// edgegate-central replicas share one PostgreSQL database, and the
// database, not a leader, decides each gateway's version. Every update of
// a gateway runs in one transaction holding the gateway's row lock
// (SELECT ... FOR UPDATE), so the read of the current version, the choice
// of the next one and the write are atomic across replicas; a trigger
// refuses any write that would lower a version, whatever a replica's code
// or clock does. Publishers of a gateway are serialised by an advisory
// lock and publish the newest committed record (PublishLocked), so the
// order of pushes follows the order of versions.
//
// Records hold bundles, and bundles hold device keys (K1/K2): each record
// is sealed with AES-256-GCM under the store key (the same key the
// embedded store is encrypted with; every replica must be given the same
// one), the gateway id as associated data, so a database dump or a
// replica of the database shows no key and a record cannot be moved to
// another gateway's row.
type PostgresStore struct {
	pool *pgxpool.Pool
	aead cipher.AEAD
}

// pgMigrations are applied in order, each once, recorded in
// edgegate_central_migrations. Append only: never edit an applied one.
var pgMigrations = []string{
	`CREATE TABLE edgegate_central_gateways (
		id         text PRIMARY KEY,
		version    bigint NOT NULL DEFAULT 0 CHECK (version >= 0),
		record     bytea NOT NULL,
		updated_at timestamptz NOT NULL DEFAULT now()
	)`,
	`CREATE FUNCTION edgegate_central_version_grows() RETURNS trigger LANGUAGE plpgsql AS $$
	BEGIN
		IF NEW.version < OLD.version THEN
			RAISE EXCEPTION 'gateway % version would go back from % to %', OLD.id, OLD.version, NEW.version
				USING ERRCODE = 'check_violation';
		END IF;
		RETURN NEW;
	END $$`,
	`CREATE TRIGGER edgegate_central_version_grows BEFORE UPDATE ON edgegate_central_gateways
		FOR EACH ROW EXECUTE FUNCTION edgegate_central_version_grows()`,
}

// pgMigrationLock is the advisory lock key that serialises migrations of
// replicas starting together (CREATE ... IF NOT EXISTS alone races on
// the catalog).
const pgMigrationLock = 0x6564676567617465 // "edgegate"

// OpenPostgres connects to the database named by dsn (a libpq URL or
// key=value string, read from postgres_url_file: it may hold a password)
// and applies the missing migrations. key (32 bytes) seals the records.
// Errors never include the DSN's password: pgx redacts it and we do not
// repeat the DSN.
func OpenPostgres(ctx context.Context, dsn string, key []byte, log *slog.Logger) (*PostgresStore, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, fmt.Errorf("postgres store key: %w", err)
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, fmt.Errorf("postgres store key: %w", err)
	}
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		// pgconn's parse error may quote the DSN; say only what is wrong.
		return nil, errors.New("postgres_url_file: not a valid PostgreSQL connection string")
	}
	cfg.ConnConfig.RuntimeParams["application_name"] = "edgegate-central"
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("postgres: %w", err)
	}
	s := &PostgresStore{pool: pool, aead: aead}
	n, err := s.migrate(ctx)
	if err != nil {
		pool.Close()
		return nil, err
	}
	log.Info("postgres store ready", "host", cfg.ConnConfig.Host, "port", cfg.ConnConfig.Port,
		"database", cfg.ConnConfig.Database, "migrations_applied", n)
	return s, nil
}

func (s *PostgresStore) migrate(ctx context.Context) (applied int, err error) {
	err = pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock($1)`, int64(pgMigrationLock)); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `CREATE TABLE IF NOT EXISTS edgegate_central_migrations (
			version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())`); err != nil {
			return err
		}
		var done int
		if err := tx.QueryRow(ctx, `SELECT coalesce(max(version), 0) FROM edgegate_central_migrations`).Scan(&done); err != nil {
			return err
		}
		if done > len(pgMigrations) {
			return fmt.Errorf("schema version %d is newer than this binary's %d: upgrade edgegate-central", done, len(pgMigrations))
		}
		for i := done; i < len(pgMigrations); i++ {
			if _, err := tx.Exec(ctx, pgMigrations[i]); err != nil {
				return fmt.Errorf("migration %d: %w", i+1, err)
			}
			if _, err := tx.Exec(ctx, `INSERT INTO edgegate_central_migrations (version) VALUES ($1)`, i+1); err != nil {
				return fmt.Errorf("migration %d: %w", i+1, err)
			}
			applied++
		}
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("postgres schema: %w", err)
	}
	return applied, nil
}

// Close closes the pool.
func (s *PostgresStore) Close() error { s.pool.Close(); return nil }

func (s *PostgresStore) seal(rec *GatewayRecord) ([]byte, error) {
	plain, err := json.Marshal(rec)
	if err != nil {
		return nil, fmt.Errorf("store: gateway %s: %w", rec.ID, err)
	}
	nonce := make([]byte, s.aead.NonceSize(), s.aead.NonceSize()+len(plain)+s.aead.Overhead())
	if _, err := rand.Read(nonce); err != nil {
		return nil, fmt.Errorf("store: %w", err)
	}
	return s.aead.Seal(nonce, nonce, plain, []byte(rec.ID)), nil
}

func (s *PostgresStore) open(id string, sealed []byte, rec *GatewayRecord) error {
	ns := s.aead.NonceSize()
	if len(sealed) < ns+s.aead.Overhead() {
		return fmt.Errorf("store: gateway %s: record of %d bytes is truncated", id, len(sealed))
	}
	plain, err := s.aead.Open(nil, sealed[:ns], sealed[ns:], []byte(id))
	if err != nil {
		// Wrong store key on this replica, or a row copied from another id.
		return fmt.Errorf("store: gateway %s: record does not open with this store key (every replica needs the same key)", id)
	}
	if err := json.Unmarshal(plain, rec); err != nil {
		return fmt.Errorf("store: gateway %s: %w", id, err)
	}
	if rec.ID != id {
		return fmt.Errorf("store: gateway %s: record names gateway %q", id, clip(rec.ID))
	}
	return nil
}

// Gateway implements Store.
func (s *PostgresStore) Gateway(ctx context.Context, id string) (GatewayRecord, bool, error) {
	var rec GatewayRecord
	var sealed []byte
	err := s.pool.QueryRow(ctx, `SELECT record FROM edgegate_central_gateways WHERE id = $1`, id).Scan(&sealed)
	if errors.Is(err, pgx.ErrNoRows) {
		return rec, false, nil
	}
	if err != nil {
		return rec, false, fmt.Errorf("store: gateway %s: %w", id, err)
	}
	return rec, true, s.open(id, sealed, &rec)
}

// lockRow inserts the gateway's row when missing and locks it until tx
// ends; it returns the current record (zero with ID set when new).
func (s *PostgresStore) lockRow(ctx context.Context, tx pgx.Tx, id string) (GatewayRecord, error) {
	rec := GatewayRecord{ID: id}
	var sealed []byte
	err := tx.QueryRow(ctx, `SELECT record FROM edgegate_central_gateways WHERE id = $1 FOR UPDATE`, id).Scan(&sealed)
	if errors.Is(err, pgx.ErrNoRows) {
		// Two replicas may insert at once: the loser waits on the winner's
		// row and then locks it.
		empty, err := s.seal(&rec)
		if err != nil {
			return rec, err
		}
		if _, err := tx.Exec(ctx, `INSERT INTO edgegate_central_gateways (id, record) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING`, id, empty); err != nil {
			return rec, fmt.Errorf("store: gateway %s: %w", id, err)
		}
		err = tx.QueryRow(ctx, `SELECT record FROM edgegate_central_gateways WHERE id = $1 FOR UPDATE`, id).Scan(&sealed)
		if err != nil {
			return rec, fmt.Errorf("store: gateway %s: %w", id, err)
		}
	} else if err != nil {
		return rec, fmt.Errorf("store: gateway %s: %w", id, err)
	}
	rec = GatewayRecord{}
	if err := s.open(id, sealed, &rec); err != nil {
		return rec, err
	}
	return rec, nil
}

// UpdateGateway implements Store: one transaction holding the gateway's
// row lock, so a version is read, chosen and written by one replica at a
// time; a replica that would lower the version is refused by the trigger.
func (s *PostgresStore) UpdateGateway(ctx context.Context, id string, fn func(*GatewayRecord) error) (GatewayRecord, error) {
	var rec GatewayRecord
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		var err error
		if rec, err = s.lockRow(ctx, tx, id); err != nil {
			return err
		}
		rec.ID = id
		if err := fn(&rec); err != nil {
			return err
		}
		rec.ID = id
		sealed, err := s.seal(&rec)
		if err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `UPDATE edgegate_central_gateways SET version = $2, record = $3, updated_at = now() WHERE id = $1`,
			id, int64(rec.Version), sealed); err != nil {
			var pe *pgconn.PgError
			if errors.As(err, &pe) && pe.Code == "23514" { // check_violation: the trigger
				return fmt.Errorf("store: gateway %s: %s", id, pe.Message)
			}
			return fmt.Errorf("store: gateway %s: %w", id, err)
		}
		return nil
	})
	return rec, err
}

// PublishLocked implements Store: a transaction-scoped advisory lock per
// gateway serialises the publishers of all replicas; the record is read
// after taking it (READ COMMITTED: the newest committed version). Not the
// row lock: fn may update the gateway (the push ACL hook binding an
// account) and would wait on itself.
func (s *PostgresStore) PublishLocked(ctx context.Context, id string, fn func(GatewayRecord) error) error {
	return pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock(hashtext('edgegate-central/publish'), hashtext($1))`, id); err != nil {
			return fmt.Errorf("store: gateway %s: publish lock: %w", id, err)
		}
		rec := GatewayRecord{ID: id}
		var sealed []byte
		err := tx.QueryRow(ctx, `SELECT record FROM edgegate_central_gateways WHERE id = $1`, id).Scan(&sealed)
		if err != nil && !errors.Is(err, pgx.ErrNoRows) {
			return fmt.Errorf("store: gateway %s: %w", id, err)
		}
		if err == nil {
			rec = GatewayRecord{}
			if err := s.open(id, sealed, &rec); err != nil {
				return err
			}
		}
		return fn(rec)
	})
}

// Gateways implements Store.
func (s *PostgresStore) Gateways(ctx context.Context) ([]GatewayRecord, error) {
	rows, err := s.pool.Query(ctx, `SELECT id, record FROM edgegate_central_gateways ORDER BY id`)
	if err != nil {
		return nil, fmt.Errorf("store: %w", err)
	}
	defer rows.Close()
	var out []GatewayRecord
	for rows.Next() {
		var id string
		var sealed []byte
		if err := rows.Scan(&id, &sealed); err != nil {
			return nil, fmt.Errorf("store: %w", err)
		}
		var rec GatewayRecord
		if err := s.open(id, sealed, &rec); err != nil {
			return nil, err
		}
		out = append(out, rec)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("store: %w", err)
	}
	return out, nil
}
