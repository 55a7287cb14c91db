package central

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

var testStoreKey = bytes.Repeat([]byte{0x42}, 32)

// stores are the Store implementations every conformance test runs on.
var stores = []struct {
	name string
	open func(t *testing.T) Store
}{
	{"badger", func(t *testing.T) Store {
		s, err := OpenBadger(t.TempDir(), testStoreKey)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		return s
	}},
	{"postgres", func(t *testing.T) Store {
		s, err := OpenPostgres(context.Background(), testPG(t), testStoreKey, nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		return s
	}},
}

func forEachStore(t *testing.T, f func(t *testing.T, s Store)) {
	for _, st := range stores {
		t.Run(st.name, func(t *testing.T) { f(t, st.open(t)) })
	}
}

// TestStoreConformance: what Service relies on, for both stores.
func TestStoreConformance(t *testing.T) {
	ctx := context.Background()
	forEachStore(t, func(t *testing.T, s Store) {
		if _, ok, err := s.Gateway(ctx, "gw-x"); ok || err != nil {
			t.Fatalf("missing gateway: ok=%v err=%v", ok, err)
		}
		now := time.Date(2026, 12, 3, 7, 0, 0, 0, time.UTC)
		want := GatewayRecord{ID: "gw-x", Account: "acct", Pin: "tp", Version: 7, Content: "sha256:c", IssuedAt: now,
			ExpiresAt: now.Add(time.Hour), Bundle: "a.b.c", Digest: "sha256:d", Devices: 3, Issued: map[uint64]string{7: "sha256:d"},
			Applied: 6, AppliedDigest: "sha256:e", AppliedAt: now, ReceiptAt: now, AppliedSince: now, RefusedReceipts: 2,
			LastRefusal: "why", BuildError: "be", BuildErrorAt: now}
		got, err := s.UpdateGateway(ctx, "gw-x", func(r *GatewayRecord) error {
			if r.ID != "gw-x" || r.Version != 0 {
				return fmt.Errorf("a new record is not zero with its id: %+v", r)
			}
			*r = want
			return nil
		})
		if err != nil || !recordsEqual(got, want) {
			t.Fatalf("update: %v\n got %+v\nwant %+v", err, got, want)
		}
		if got, ok, err := s.Gateway(ctx, "gw-x"); err != nil || !ok || !recordsEqual(got, want) {
			t.Fatalf("read back: ok=%v err=%v\n got %+v", ok, err, got)
		}
		// fn failing stores nothing.
		boom := errors.New("boom")
		if _, err := s.UpdateGateway(ctx, "gw-x", func(r *GatewayRecord) error { r.Version = 99; return boom }); !errors.Is(err, boom) {
			t.Fatalf("fn error: %v", err)
		}
		if _, err := s.UpdateGateway(ctx, "gw-new", func(r *GatewayRecord) error { return boom }); !errors.Is(err, boom) {
			t.Fatalf("fn error: %v", err)
		}
		if got, _, _ := s.Gateway(ctx, "gw-x"); got.Version != 7 {
			t.Fatalf("a failed update stored version %d", got.Version)
		}
		// Concurrent updates of one gateway never interleave.
		var wg sync.WaitGroup
		for range 40 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if _, err := s.UpdateGateway(ctx, "gw-count", func(r *GatewayRecord) error { r.Devices++; return nil }); err != nil {
					t.Error(err)
				}
			}()
		}
		wg.Wait()
		if got, _, _ := s.Gateway(ctx, "gw-count"); got.Devices != 40 {
			t.Fatalf("40 concurrent increments gave %d", got.Devices)
		}
		// Gateways lists all, by id (a failed first update created none).
		recs, err := s.Gateways(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var ids []string
		for _, r := range recs {
			ids = append(ids, r.ID)
		}
		if strings.Join(ids, ",") != "gw-count,gw-x" {
			t.Fatalf("gateways: %v", ids)
		}
		// PublishLocked sees the newest record, excludes another
		// PublishLocked of the gateway (not of another one), and lets fn
		// update the gateway (the ACL hook may bind an account).
		entered, release := make(chan struct{}), make(chan struct{})
		go func() {
			_ = s.PublishLocked(ctx, "gw-x", func(r GatewayRecord) error {
				if r.Version != 7 || r.Bundle != "a.b.c" {
					t.Errorf("PublishLocked saw %+v", r)
				}
				close(entered)
				<-release
				return nil
			})
		}()
		<-entered
		second := make(chan uint64)
		go func() {
			_ = s.PublishLocked(ctx, "gw-x", func(r GatewayRecord) error { second <- r.Version; return nil })
		}()
		other := make(chan struct{})
		go func() {
			_ = s.PublishLocked(ctx, "gw-count", func(GatewayRecord) error { close(other); return nil })
		}()
		select {
		case <-other:
		case <-time.After(10 * time.Second):
			t.Fatal("PublishLocked of another gateway waited")
		}
		if _, err := s.UpdateGateway(ctx, "gw-x", func(r *GatewayRecord) error { r.Version++; return nil }); err != nil {
			t.Fatal(err)
		}
		select {
		case v := <-second:
			t.Fatalf("a second PublishLocked (saw v%d) ran while the first held the gateway", v)
		case <-time.After(200 * time.Millisecond):
		}
		close(release)
		select {
		case v := <-second:
			if v != 8 {
				t.Fatalf("the second PublishLocked saw v%d, want the newest, 8", v)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("the second PublishLocked did not run")
		}
		if err := s.PublishLocked(ctx, "gw-none", func(r GatewayRecord) error {
			if r.ID != "gw-none" || r.Version != 0 {
				return fmt.Errorf("missing gateway: %+v", r)
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		if got, _, _ := s.Gateway(ctx, "gw-x"); got.Version != 8 {
			t.Fatalf("version after the update: %d", got.Version)
		}
	})
}

func recordsEqual(a, b GatewayRecord) bool {
	return fmt.Sprintf("%+v", a) == fmt.Sprintf("%+v", b)
}

// TestPostgresStoreRefusesLowerVersion: the database, not the replica's
// code, refuses a version going back; records are sealed (no K1/K2 or
// bundle in the table); the schema migration is idempotent across
// replicas starting together; a wrong store key is a clear error.
func TestPostgresStoreRefusesLowerVersion(t *testing.T) {
	ctx := context.Background()
	dsn := testPG(t)
	var wg sync.WaitGroup
	opened := make([]*PostgresStore, 4)
	for i := range opened {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s, err := OpenPostgres(ctx, dsn, testStoreKey, slog.New(slog.DiscardHandler))
			if err != nil {
				t.Errorf("replica %d: %v", i, err)
				return
			}
			opened[i] = s
		}()
	}
	wg.Wait()
	for _, s := range opened {
		if s != nil {
			defer s.Close()
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	s := opened[0]
	if _, err := s.UpdateGateway(ctx, "gw-v", func(r *GatewayRecord) error {
		r.Version, r.Bundle = 100, "bundle-with-"+devK1
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	_, err := s.UpdateGateway(ctx, "gw-v", func(r *GatewayRecord) error { r.Version = 99; return nil })
	if err == nil || !strings.Contains(err.Error(), "version would go back from 100 to 99") {
		t.Fatalf("lowering a version: %v", err)
	}
	if r, _, _ := s.Gateway(ctx, "gw-v"); r.Version != 100 {
		t.Fatalf("version %d after a refused lower write", r.Version)
	}
	c, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(ctx)
	var raw []byte
	var version int64
	var migrations int
	if err := c.QueryRow(ctx, `SELECT record, version FROM edgegate_central_gateways WHERE id = 'gw-v'`).Scan(&raw, &version); err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(raw, []byte(devK1)) || bytes.Contains(raw, []byte("bundle-with")) || version != 100 {
		t.Fatalf("the table holds the record in clear or version %d", version)
	}
	if err := c.QueryRow(ctx, `SELECT count(*) FROM edgegate_central_migrations`).Scan(&migrations); err != nil || migrations != len(pgMigrations) {
		t.Fatalf("migrations recorded: %d %v", migrations, err)
	}
	other, err := OpenPostgres(ctx, dsn, bytes.Repeat([]byte{1}, 32), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	if _, _, err := other.Gateway(ctx, "gw-v"); err == nil || !strings.Contains(err.Error(), "same key") {
		t.Fatalf("wrong store key: %v", err)
	}
	// A record copied under another id does not open.
	if _, err := c.Exec(ctx, `INSERT INTO edgegate_central_gateways (id, record) SELECT 'gw-w', record FROM edgegate_central_gateways WHERE id = 'gw-v'`); err != nil {
		t.Fatal(err)
	}
	if _, _, err := s.Gateway(ctx, "gw-w"); err == nil {
		t.Fatal("a record moved to another gateway's row opened")
	}
}

// TestPostgresDSNNeverInErrors: a bad or unreachable connection string
// is refused without repeating its password.
func TestPostgresDSNNeverInErrors(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, dsn := range []string{
		"postgres://u:" + pgPassword + "@127.0.0.1:1/db?sslmode=disable&connect_timeout=2",
		"postgres://u:" + pgPassword + "@[::1/db",
		"host=127.0.0.1 port=notaport password=" + pgPassword,
	} {
		_, err := OpenPostgres(ctx, dsn, testStoreKey, nil)
		if err == nil {
			t.Fatalf("%.20s…: opened", dsn)
		}
		if strings.Contains(err.Error(), pgPassword) {
			t.Fatalf("the password appears in the error: %v", strings.ReplaceAll(err.Error(), pgPassword, "***"))
		}
	}
}

// TestPostgresURLFileRefusedWhenReadable: the connection string holds a
// password; a file others can read is refused before any connection, and
// the error names the setting, not the content.
func TestPostgresURLFileRefusedWhenReadable(t *testing.T) {
	dsnFile := filepath.Join(t.TempDir(), "postgres-url")
	if err := os.WriteFile(dsnFile, []byte("postgres://u:"+pgPassword+"@127.0.0.1:1/db\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	secret := filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(secret, []byte("s\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := Config{StateDir: t.TempDir(), Store: StorePostgres, PostgresURLFile: dsnFile,
		Platform: PlatformConfig{URL: "https://p.example", Issuer: "https://p.example/auth/realms/master",
			ClientID: "c", ClientSecretFile: secret, Brokers: map[string]string{"orion-1": "https://b.example/x"}}}
	_, err := New(context.Background(), Options{Config: cfg})
	if err == nil || !strings.Contains(err.Error(), "postgres_url_file") || !strings.Contains(err.Error(), "mode 644") {
		t.Fatalf("a world-readable postgres_url_file: %v", err)
	}
	if strings.Contains(err.Error(), pgPassword) {
		t.Fatal("the error quotes the password")
	}
}
