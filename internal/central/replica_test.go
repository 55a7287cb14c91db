package central

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"github.com/edgegate/edgegate/internal/testkit"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/queue"
	"github.com/edgegate/edgegate/internal/sim/centralsim"
	centralsync "github.com/edgegate/edgegate/sync"
)

// newPGEnv is newEnv with store: postgres on a fresh database of the
// test's real PostgreSQL, the DSN in a 0600 postgres_url_file.
func newPGEnv(t *testing.T, mut func(*Config)) *env {
	t.Helper()
	dsnFile := filepath.Join(t.TempDir(), "postgres-url")
	if err := os.WriteFile(dsnFile, []byte(testPG(t)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	e := newEnv(t, func(c *Config) {
		c.Store, c.PostgresURLFile = StorePostgres, dsnFile
		if mut != nil {
			mut(c)
		}
	})
	if _, ok := e.svc.Store().(*PostgresStore); !ok {
		t.Fatalf("store: postgres opened a %T", e.svc.Store())
	}
	t.Cleanup(func() {
		if strings.Contains(e.logs.String(), pgPassword) {
			t.Error("the PostgreSQL password appears in the companion's logs")
		}
	})
	return e
}

// replica starts another edgegate-central on the same configuration (the
// same database, key file and store key), as a second instance behind a
// load balancer would be.
func (e *env) replica(now func() time.Time) *Service {
	e.t.Helper()
	svc, err := New(context.Background(), Options{Config: e.cfg, PlatformHTTP: e.simHTTP, Now: now,
		Logger: slog.New(slog.NewJSONHandler(e.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))})
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { svc.Close() })
	return svc
}

func bundleVersion(t *testing.T, compact string) uint64 {
	t.Helper()
	parts := strings.Split(compact, ".")
	if len(parts) != 3 {
		t.Fatalf("bundle is not a compact JWS")
	}
	raw, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		Version uint64 `json:"version"`
	}
	if err := json.Unmarshal(raw, &doc); err != nil {
		t.Fatal(err)
	}
	return doc.Version
}

// orderedPublisher forwards to the real push broker and records what
// reached it, in the order it did: the two replicas share it as they
// would share an MQTT cluster.
type orderedPublisher struct {
	t    *testing.T
	next publisher
	mu   sync.Mutex
	seq  map[string][]uint64
	once sync.Once // both replicas close it
}

func (p *orderedPublisher) publish(gw, bundle string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.seq[gw] = append(p.seq[gw], bundleVersion(p.t, bundle))
	return p.next.publish(gw, bundle)
}

func (p *orderedPublisher) close() { p.once.Do(p.next.close) }

// signingStore records every version a replica committed.
type signingStore struct {
	Store
	mu     *sync.Mutex
	signed map[string]string // "gateway/version" → bundle digest, over all replicas
	dup    *[]string
	count  *atomic.Int64
}

func (s signingStore) UpdateGateway(ctx context.Context, id string, fn func(*GatewayRecord) error) (GatewayRecord, error) {
	var before uint64
	rec, err := s.Store.UpdateGateway(ctx, id, func(r *GatewayRecord) error { before = r.Version; return fn(r) })
	if err == nil && rec.Version != before {
		s.mu.Lock()
		key := fmt.Sprintf("%s/%d", id, rec.Version)
		if d, seen := s.signed[key]; seen && d != rec.Digest {
			*s.dup = append(*s.dup, fmt.Sprintf("%s: version %d signed twice", id, rec.Version))
		}
		if rec.Version < before {
			*s.dup = append(*s.dup, fmt.Sprintf("version went back from %d to %d", before, rec.Version))
		}
		s.signed[key] = rec.Digest
		s.mu.Unlock()
		s.count.Add(1)
	}
	return rec, err
}

// TestReplicasRacing: two edgegate-central replicas on one PostgreSQL
// database refresh the same gateways at the same time while devices are
// added at the platform; one replica's clock runs 30 s behind. Every
// version is signed once (strictly increasing, no two bundles share a
// version), the pushes reach the shared broker in version order (never
// an older bundle after a newer one), the retained message is the
// newest, and the gateway ends on the newest version.
func TestReplicasRacing(t *testing.T) {
	e := newPGEnv(t, nil)
	e.insert("alice", "th-0", "gw-a")
	e.insert("bob", "th-b0", "gw-b")
	b := e.replica(func() time.Time { return time.Now().Add(-30 * time.Second) })
	var mu sync.Mutex
	signed := map[string]string{}
	var problems []string
	var countA, countB atomic.Int64
	e.svc.store = signingStore{Store: e.svc.store, mu: &mu, signed: signed, dup: &problems, count: &countA}
	b.store = signingStore{Store: b.store, mu: &mu, signed: signed, dup: &problems, count: &countB}
	pub := &orderedPublisher{t: t, next: e.svc.push, seq: map[string][]uint64{}}
	e.svc.push, b.push = pub, pub

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	g := e.startGateway(ctx, "gw-a", "gw-a-client", gwASecret)

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var rounds atomic.Int64
	for _, svc := range []*Service{e.svc, b} {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				if _, err := svc.Refresh(ctx, false); err != nil {
					t.Errorf("refresh: %v", err)
					return
				}
				rounds.Add(1)
			}
		})
	}
	// Stock caps a user at 5 IOTID devices (common.php limits): 4 new
	// devices, and a new delegation at every step.
	const changes = 4
	// afterRounds waits for n more refresh rounds (of either replica), so
	// the replicas race over each platform state.
	afterRounds := func(n int64) {
		t.Helper()
		want, deadline := rounds.Load()+n, time.Now().Add(10*time.Second)
		for rounds.Load() < want {
			if time.Now().After(deadline) {
				t.Fatalf("replicas stalled at %d refresh rounds, want %d", rounds.Load(), want)
			}
			time.Sleep(time.Millisecond) // polling the condition above
		}
	}
	for i := 1; i <= 16; i++ {
		if i%4 == 0 {
			e.insert("alice", fmt.Sprintf("th-%d", i/4), "gw-a")
		}
		e.sim.SetDelegations([]centralsim.Delegation{{Device: "th-0", User: fmt.Sprintf("viewer-%d", i), Kind: centralsim.KindReadAccess}})
		afterRounds(2)
	}
	afterRounds(8)
	close(stop)
	wg.Wait()
	// A last round by each replica: both see the final platform.
	for _, svc := range []*Service{e.svc, b} {
		if _, err := svc.Refresh(ctx, false); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("%d rounds; replica A signed %d, replica B signed %d", rounds.Load(), countA.Load(), countB.Load())
	if countA.Load() == 0 || countB.Load() == 0 {
		t.Fatalf("no race: replica A signed %d, B %d", countA.Load(), countB.Load())
	}
	mu.Lock()
	if len(problems) > 0 {
		t.Fatalf("versions: %v", problems)
	}
	mu.Unlock()

	newest, _, err := e.svc.Store().Gateway(ctx, "gw-a")
	if err != nil {
		t.Fatal(err)
	}
	if newest.Devices != changes+1 {
		t.Fatalf("newest version %d has %d devices, want %d", newest.Version, newest.Devices, changes+1)
	}
	var max uint64
	for k := range signed {
		var v uint64
		if _, err := fmt.Sscanf(k, "gw-a/%d", &v); err == nil {
			max = maxU(max, v)
		}
	}
	if newest.Version != max {
		t.Fatalf("stored version %d, but %d was signed", newest.Version, max)
	}
	pub.mu.Lock()
	seq := pub.seq["gw-a"]
	pub.mu.Unlock()
	for i := 1; i < len(seq); i++ {
		if seq[i] < seq[i-1] {
			t.Fatalf("version %d pushed after %d: %v", seq[i], seq[i-1], seq)
		}
	}
	if len(seq) == 0 || seq[len(seq)-1] != newest.Version {
		t.Fatalf("last push %v, newest %d", seq, newest.Version)
	}
	retained := e.svc.push.(*orderedPublisher).next.(*pushBroker).srv.Topics.Messages(centralsync.PushTopic("gw-a"))
	if len(retained) != 1 || bundleVersion(t, string(retained[0].Payload)) != newest.Version {
		t.Fatalf("retained on the broker: %d messages, want version %d", len(retained), newest.Version)
	}
	testkit.Eventually(t, 10*time.Second, "gateway on the newest version", func() bool {
		return g.engine.Current().Version == newest.Version
	})
	if _, ok := g.engine.Current().Device(fmt.Sprintf("th-%d", changes)); !ok {
		t.Fatal("the last device added is not in the gateway's policy")
	}
	if !g.engine.Current().CanRead("viewer-16", "th-0") || g.engine.Current().CanRead("viewer-15", "th-0") {
		t.Fatal("the gateway's delegations are not the newest")
	}
}

func maxU(a, b uint64) uint64 {
	if a > b {
		return a
	}
	return b
}

// TestGatewayOfflineForADay: a gateway applies its policy, goes offline;
// over the next day (the companion's clock moves hour by hour, both
// replicas taking rounds) devices are added, a delegation is given and
// revoked and a device removed. When the gateway comes back with its
// store, it goes straight to the newest version (not through the
// intermediate ones) and its receipt reports it.
func TestGatewayOfflineForADay(t *testing.T) {
	var offset atomic.Int64 // the companion's clock: real time minus a day, plus offset
	offset.Store(int64(-24 * time.Hour))
	clock := func() time.Time { return time.Now().Add(time.Duration(offset.Load())) }
	e := newPGEnv(t, func(c *Config) { c.PolicyTTL = 72 * time.Hour })
	e.svc.now = clock
	b := e.replica(clock)
	shared := &orderedPublisher{t: t, next: e.svc.push, seq: map[string][]uint64{}}
	e.svc.push, b.push = shared, shared // one broker, as a cluster would be
	e.insert("alice", "th-1", "gw-a")
	e.insert("alice", "th-2", "gw-a")
	ctx := context.Background()
	if _, err := e.svc.Refresh(ctx, false); err != nil {
		t.Fatal(err)
	}
	q, err := queue.Open(queue.Options{Dir: t.TempDir(), Key: bytes.Repeat([]byte{7}, 32)})
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	gctx, gone := context.WithCancel(ctx)
	g := e.startGatewayOn(gctx, "gw-a", "gw-a-client", gwASecret, q)
	first, _, _ := e.svc.Store().Gateway(ctx, "gw-a")
	testkit.Eventually(t, 10*time.Second, "first version applied", func() bool { return g.engine.Current().Version == first.Version })
	testkit.Eventually(t, 10*time.Second, "first receipt", func() bool {
		r, _, _ := e.svc.Store().Gateway(ctx, "gw-a")
		return r.Applied == first.Version
	})
	gone() // offline
	<-g.done

	var versions []uint64
	for hour := 1; hour <= 24; hour++ {
		offset.Store(int64(time.Duration(hour-24) * time.Hour))
		switch hour {
		case 3:
			e.insert("alice", "th-3", "gw-a")
		case 8:
			e.sim.SetDelegations([]centralsim.Delegation{{Device: "th-1", User: "bob", Kind: centralsim.KindReadAccess}})
		case 15:
			e.sim.SetDelegations(nil)
		case 20:
			e.sim.RemoveDevice("th-2")
		}
		svc := e.svc
		if hour%2 == 0 {
			svc = b
		}
		if _, err := svc.Refresh(ctx, false); err != nil {
			t.Fatal(err)
		}
		r, _, _ := e.svc.Store().Gateway(ctx, "gw-a")
		if len(versions) == 0 || versions[len(versions)-1] != r.Version {
			versions = append(versions, r.Version)
		}
	}
	newest, _, _ := e.svc.Store().Gateway(ctx, "gw-a")
	if len(versions) < 4 {
		t.Fatalf("only %d versions issued while offline: %v", len(versions), versions)
	}
	if rec, _, _ := e.svc.Store().Gateway(ctx, "gw-a"); rec.Applied != first.Version {
		t.Fatalf("an offline gateway's receipt moved to %d", rec.Applied)
	}

	bctx, cancel := context.WithCancel(ctx)
	defer cancel()
	back := e.startGatewayOn(bctx, "gw-a", "gw-a-client", gwASecret, q)
	start := time.Now()
	applied := map[uint64]bool{}
	testkit.Eventually(t, 10*time.Second, "the newest version applied after a day offline", func() bool {
		v := back.engine.Current().Version
		applied[v] = true
		return v == newest.Version
	})
	t.Logf("caught up from version %d to %d (%d versions issued while offline) in %s",
		first.Version, newest.Version, len(versions), time.Since(start).Round(time.Millisecond))
	for _, v := range versions[:len(versions)-1] {
		if applied[v] && v != first.Version {
			t.Errorf("the returning gateway applied intermediate version %d", v)
		}
	}
	cur := back.engine.Current()
	if _, ok := cur.Device("th-3"); !ok {
		t.Fatal("th-3, added while offline, is missing")
	}
	if _, ok := cur.Device("th-2"); ok {
		t.Fatal("th-2, removed while offline, is still in force")
	}
	if cur.CanRead("bob", "th-1") {
		t.Fatal("bob's delegation, given and revoked while offline, is in force")
	}
	testkit.Eventually(t, 10*time.Second, "receipt for the newest version", func() bool {
		r, _, _ := e.svc.Store().Gateway(ctx, "gw-a")
		return r.Applied == newest.Version
	})
}
