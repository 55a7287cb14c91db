package central

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"testing"
	"time"
)

// The scale benchmark: a platform snapshot of G gateways and D devices
// (D/G per gateway, one owner per gateway, a delegation on every tenth
// device) held in memory, mapped by Build and signed and stored by the
// service's own publish path, as one round does. Run it with
//
//	make bench-central            # 10,000 gateways, 1,000,000 devices, badger
//	BENCH_CENTRAL_STORE=postgres make bench-central   # the same on a real PostgreSQL
//
// BENCH_CENTRAL_GATEWAYS and BENCH_CENTRAL_DEVICES change the size.

const benchBroker = "orion-1"

// scaleSnapshot is what the platform would answer for the fleet: rows as
// the Ownership API lists them (elementDetails a JSON string written by
// device.php insert, common.php registerOwnership), the IoT Directory's
// types, the datamanager's delegations per owner.
func scaleSnapshot(gateways, devices int) *Snapshot {
	s := &Snapshot{Types: make(map[string]string, devices), Given: map[string][]DelegationRow{}, Failed: map[string]string{}}
	s.Rows = make([]OwnershipRow, 0, devices)
	for i := range devices {
		gw := i % gateways
		id := fmt.Sprintf("dev-%07d", i)
		owner := fmt.Sprintf("user-%05d", gw)
		det, _ := json.Marshal(map[string]string{
			"k1": fmt.Sprintf("%08x-k1-%07d", i*2654435761, i), "k2": fmt.Sprintf("%08x-k2-%07d", i*40503, i),
			"contextbroker": benchBroker, "edgegateway_type": "edgegate",
			"edgegateway_uri": fmt.Sprintf("edgegate://gw-%05d/mqtt", gw)})
		enc, _ := json.Marshal(string(det))
		s.Rows = append(s.Rows, OwnershipRow{Username: owner, ElementID: "Organization:" + benchBroker + ":" + id,
			ElementType: "IOTID", ElementName: id, ElementDetails: enc})
		s.Types[benchBroker+"/"+id] = "Thermometer"
		if i%10 == 0 {
			s.Given[owner] = append(s.Given[owner], DelegationRow{UsernameDelegator: owner, UsernameDelegated: "viewer",
				ElementID: "Organization:" + benchBroker + ":" + id, ElementType: "IOTID", Kind: "READ_ACCESS"})
		}
	}
	return s
}

// benchService is a Service with its real key ring, store and publish
// path, and no platform or network (Build's input is the snapshot).
func benchService(tb testing.TB, store Store) *Service {
	tb.Helper()
	s := &Service{cfg: Config{PolicyTTL: DefaultPolicyTTL, Platform: PlatformConfig{Brokers: map[string]string{benchBroker: "https://broker.example/orion-filter/orion-1"}}},
		log: slog.New(slog.DiscardHandler), now: time.Now, store: store}
	var err error
	if s.keys, err = OpenKeyRing(filepath.Join(tb.TempDir(), "keys.json"), true); err != nil {
		tb.Fatal(err)
	}
	s.metrics = newServiceMetrics(s)
	return s
}

type scaleFigures struct {
	Gateways, Devices     int
	Build, Sign           time.Duration
	BundlesPerSec         float64
	AvgBundleBytes        int
	HeapMiB               float64 // live heap after GC, snapshot and built policies held
	ChangeBuild           time.Duration
	ChangeRound           time.Duration // publish pass over every gateway after one change
	ChangeSigned          int
	SteadyRound           time.Duration // a publish pass with no change
	ChangeGatewayVersions [2]uint64
}

func (f scaleFigures) String() string {
	return fmt.Sprintf("gateways=%d devices=%d\n"+
		"  build all policies: %s\n  sign+store all bundles: %s (%.0f bundles/s, %d bytes/bundle avg)\n"+
		"  live heap after GC: %.0f MiB\n"+
		"  one ownership change: rebuild %s + publish pass %s, %d gateway re-signed (v%d -> v%d)\n"+
		"  steady publish pass, nothing changed: %s",
		f.Gateways, f.Devices, f.Build.Round(time.Millisecond), f.Sign.Round(time.Millisecond), f.BundlesPerSec, f.AvgBundleBytes,
		f.HeapMiB, f.ChangeBuild.Round(time.Millisecond), f.ChangeRound.Round(time.Millisecond), f.ChangeSigned,
		f.ChangeGatewayVersions[0], f.ChangeGatewayVersions[1], f.SteadyRound.Round(time.Millisecond))
}

// publishAll is the signing half of Service.Refresh: every gateway in id
// order, signed when its content changed.
func publishAll(ctx context.Context, tb testing.TB, s *Service, built map[string]*Built) (signed int, bytes int) {
	ids := make([]string, 0, len(built))
	for gw := range built {
		ids = append(ids, gw)
	}
	sort.Strings(ids)
	for _, gw := range ids {
		b := built[gw]
		if len(b.Problems) > 0 {
			tb.Fatalf("gateway %s refused: %v", gw, b.Problems)
		}
		rec, did, err := s.publish(ctx, b)
		if err != nil {
			tb.Fatalf("publish %s: %v", gw, err)
		}
		if did {
			signed++
			bytes += len(rec.Bundle)
		}
	}
	return signed, bytes
}

func runScale(ctx context.Context, tb testing.TB, s *Service, gateways, devices int) scaleFigures {
	tb.Helper()
	f := scaleFigures{Gateways: gateways, Devices: devices}
	snap := scaleSnapshot(gateways, devices)
	brokers := s.cfg.Platform.Brokers

	start := time.Now()
	built, err := Build(snap, brokers, nil)
	if err != nil {
		tb.Fatal(err)
	}
	f.Build = time.Since(start)
	if len(built) != gateways {
		tb.Fatalf("built %d gateways, want %d", len(built), gateways)
	}

	start = time.Now()
	signed, total := publishAll(ctx, tb, s, built)
	f.Sign = time.Since(start)
	if signed != gateways {
		tb.Fatalf("signed %d of %d", signed, gateways)
	}
	f.BundlesPerSec = float64(signed) / f.Sign.Seconds()
	f.AvgBundleBytes = total / signed

	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	f.HeapMiB = float64(ms.HeapAlloc) / (1 << 20)
	runtime.KeepAlive(snap)
	runtime.KeepAlive(built)

	start = time.Now()
	if signed, _ = publishAll(ctx, tb, s, built); signed != 0 {
		tb.Fatalf("a pass with no change signed %d", signed)
	}
	f.SteadyRound = time.Since(start)

	// One ownership change: a device of gateway 7's owner delegated to
	// one more user. Only that gateway may be re-signed.
	target := fmt.Sprintf("gw-%05d", 7%gateways)
	before, _, _ := s.store.Gateway(ctx, target)
	owner := fmt.Sprintf("user-%05d", 7%gateways)
	snap.Given[owner] = append(snap.Given[owner], DelegationRow{UsernameDelegator: owner, UsernameDelegated: "auditor",
		ElementID: fmt.Sprintf("Organization:%s:dev-%07d", benchBroker, 7%gateways), ElementType: "IOTID", Kind: "READ_ACCESS"})
	start = time.Now()
	if built, err = Build(snap, brokers, nil); err != nil {
		tb.Fatal(err)
	}
	f.ChangeBuild = time.Since(start)
	start = time.Now()
	f.ChangeSigned, _ = publishAll(ctx, tb, s, built)
	f.ChangeRound = time.Since(start)
	after, _, _ := s.store.Gateway(ctx, target)
	f.ChangeGatewayVersions = [2]uint64{before.Version, after.Version}
	if f.ChangeSigned != 1 || after.Version <= before.Version {
		tb.Fatalf("one change re-signed %d gateways; %s went from v%d to v%d", f.ChangeSigned, target, before.Version, after.Version)
	}
	return f
}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

// BenchmarkCentralScale prints the figures docs/central.md quotes.
func BenchmarkCentralScale(b *testing.B) {
	gateways := envInt("BENCH_CENTRAL_GATEWAYS", 10_000)
	devices := envInt("BENCH_CENTRAL_DEVICES", 1_000_000)
	storeName := os.Getenv("BENCH_CENTRAL_STORE")
	for range b.N {
		var store Store
		var err error
		switch storeName {
		case "postgres":
			store, err = OpenPostgres(context.Background(), testPG(b), testStoreKey, nil)
		case "", "badger":
			storeName = "badger"
			store, err = OpenBadger(b.TempDir(), testStoreKey)
		default:
			b.Fatalf("BENCH_CENTRAL_STORE=%q: want badger or postgres", storeName)
		}
		if err != nil {
			b.Fatal(err)
		}
		f := runScale(context.Background(), b, benchService(b, store), gateways, devices)
		store.Close()
		fmt.Printf("edgegate-central scale (%s store, GOMAXPROCS=%d):\n%s\n", storeName, runtime.GOMAXPROCS(0), f)
		b.ReportMetric(f.BundlesPerSec, "bundles/s")
		b.ReportMetric(f.HeapMiB, "heap-MiB")
		b.ReportMetric(float64(f.ChangeRound+f.ChangeBuild)/float64(time.Millisecond), "change-ms")
	}
}

// TestScaleSmall runs the benchmark's path at a small size on both
// stores, so it is checked by every test run: every gateway signed once,
// a pass with no change signs nothing, one change re-signs one gateway.
func TestScaleSmall(t *testing.T) {
	forEachStore(t, func(t *testing.T, s Store) {
		f := runScale(context.Background(), t, benchService(t, s), 40, 2_000)
		t.Logf("%s", f)
		recs, err := s.Gateways(context.Background())
		if err != nil || len(recs) != 40 {
			t.Fatalf("stored %d gateways: %v", len(recs), err)
		}
		for _, r := range recs {
			if r.Devices != 50 || r.Bundle == "" {
				t.Fatalf("%s: %d devices, want 50", r.ID, r.Devices)
			}
		}
	})
}
