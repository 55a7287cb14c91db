package central

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"reflect"
	"runtime"
	"testing"
	"time"
)

// TestBuildCacheSameAsFull: over rounds of random platform changes (a
// row's keys changed, a device moved to another gateway, deleted, added;
// an entity type changed or missing; delegations given and revoked; an
// owner's delegations unreadable), the incremental build gives exactly
// what a full build gives, and rebuilds only the gateways that changed.
func TestBuildCacheSameAsFull(t *testing.T) {
	const gateways, devices = 30, 300
	snap := scaleSnapshot(gateways, devices)
	brokers := map[string]string{benchBroker: "https://broker.example/orion-filter/orion-1"}
	rng := rand.New(rand.NewPCG(1, 2))
	var c BuildCache
	details := func(i, gw int, k1 string) json.RawMessage {
		det, _ := json.Marshal(map[string]string{"k1": k1, "k2": fmt.Sprintf("k2-%d", i), "contextbroker": benchBroker,
			"edgegateway_type": "edgegate", "edgegateway_uri": fmt.Sprintf("edgegate://gw-%05d/mqtt", gw)})
		enc, _ := json.Marshal(string(det))
		return enc
	}
	next := devices
	for round := range 40 {
		changed := map[string]bool{}
		for range 1 + rng.IntN(3) {
			i := rng.IntN(len(snap.Rows))
			r := &snap.Rows[i]
			var gw int
			fmt.Sscanf(r.Username, "user-%05d", &gw)
			switch op := rng.IntN(7); op {
			case 0: // new keys
				r.ElementDetails = details(i, gw, fmt.Sprintf("k1-round-%d", round))
			case 1: // moved to another gateway (its owner's delegations follow it)
				to := rng.IntN(gateways)
				r.ElementDetails = details(i, to, "k1-moved")
				changed[fmt.Sprintf("gw-%05d", to)] = true
			case 2: // deleted
				r.Deleted = json.RawMessage(`"2026-01-01 00:00:00"`)
			case 3: // a new device
				id := fmt.Sprintf("dev-%07d", next)
				next++
				snap.Rows = append(snap.Rows, OwnershipRow{Username: r.Username, ElementID: "Organization:" + benchBroker + ":" + id,
					ElementType: "IOTID", ElementName: id, ElementDetails: details(next, gw, "k1-new")})
				snap.Types[benchBroker+"/"+id] = "Thermometer"
			case 4: // a type changed, or gone from the IoT Directory
				key := benchBroker + "/" + r.ElementName
				if rng.IntN(2) == 0 {
					snap.Types[key] = "Hygrometer"
				} else {
					delete(snap.Types, key)
				}
			case 5: // a delegation given, or all of an owner's revoked
				if rng.IntN(2) == 0 {
					snap.Given[r.Username] = append(snap.Given[r.Username], DelegationRow{UsernameDelegator: r.Username,
						UsernameDelegated: fmt.Sprintf("viewer-%d", round), ElementID: r.ElementID, ElementType: "IOTID", Kind: "READ_ACCESS"})
				} else {
					delete(snap.Given, r.Username)
				}
			case 6: // the owner's delegations unreadable this round, or readable again
				if _, failed := snap.Failed[r.Username]; failed {
					delete(snap.Failed, r.Username)
				} else {
					snap.Failed[r.Username] = "HTTP 500"
				}
			}
			changed[fmt.Sprintf("gw-%05d", gw)] = true
		}
		full, err := Build(snap, brokers, nil)
		if err != nil {
			t.Fatal(err)
		}
		inc, err := c.Build(snap, brokers, nil)
		if err != nil {
			t.Fatal(err)
		}
		if len(full) != len(inc) {
			t.Fatalf("round %d: %d gateways built in full, %d incrementally", round, len(full), len(inc))
		}
		for gw, f := range full {
			i := inc[gw]
			if i == nil || i.Content != f.Content || !reflect.DeepEqual(i.Problems, f.Problems) || !reflect.DeepEqual(i.Doc, f.Doc) {
				t.Fatalf("round %d: gateway %s differs:\nfull        %+v\nincremental %+v", round, gw, f, i)
			}
		}
		if round > 0 && c.Stats.GatewaysBuilt > len(changed) {
			t.Fatalf("round %d: %d gateways rebuilt for %d changed (%v)", round, c.Stats.GatewaysBuilt, len(changed), changed)
		}
	}
}

// BenchmarkBuildIncremental: a full build of BENCH_CENTRAL_GATEWAYS
// gateways and BENCH_CENTRAL_DEVICES devices, then the round after one
// delegation changed, full and incremental.
//
//	go test -run '^$' -bench BuildIncremental -benchtime 1x ./internal/central/
func BenchmarkBuildIncremental(b *testing.B) {
	gateways := envInt("BENCH_CENTRAL_GATEWAYS", 10_000)
	devices := envInt("BENCH_CENTRAL_DEVICES", 1_000_000)
	brokers := map[string]string{benchBroker: "https://broker.example/orion-filter/orion-1"}
	for range b.N {
		snap := scaleSnapshot(gateways, devices)
		var c BuildCache
		start := time.Now()
		if _, err := c.Build(snap, brokers, nil); err != nil {
			b.Fatal(err)
		}
		first := time.Since(start)
		owner := "user-00007"
		snap.Given[owner] = append(snap.Given[owner], DelegationRow{UsernameDelegator: owner, UsernameDelegated: "auditor",
			ElementID: fmt.Sprintf("Organization:%s:dev-%07d", benchBroker, 7), ElementType: "IOTID", Kind: "READ_ACCESS"})
		start = time.Now()
		if _, err := Build(snap, brokers, nil); err != nil {
			b.Fatal(err)
		}
		full := time.Since(start)
		start = time.Now()
		if _, err := c.Build(snap, brokers, nil); err != nil {
			b.Fatal(err)
		}
		incr := time.Since(start)
		fmt.Printf("build (GOMAXPROCS=%d) %d gateways, %d devices: first (cache empty) %s; after one change: full %s, incremental %s (%+v)\n",
			runtime.GOMAXPROCS(0), gateways, devices, first.Round(time.Millisecond), full.Round(time.Millisecond), incr.Round(time.Millisecond), c.Stats)
		b.ReportMetric(float64(incr)/float64(time.Millisecond), "incremental-ms")
		b.ReportMetric(float64(full)/float64(time.Millisecond), "full-ms")
	}
}
