package central

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwk"

	"github.com/edgegate/edgegate/internal/mosquittotest"
	"github.com/edgegate/edgegate/internal/pki"
	"github.com/edgegate/edgegate/internal/sim/centralsim"
	"github.com/edgegate/edgegate/internal/testkit"
	"github.com/edgegate/edgegate/policy"
	centralsync "github.com/edgegate/edgegate/sync"
)

// The push→applied benchmark: N gateways in one process, each the real
// gateway side (centralsync.Syncer: push credentials from the companion's
// HTTPS API, its MQTT session over TLS, verify against the pinned keys,
// anti-rollback floor, apply to its policy.Engine), connected to a real
// Mosquitto with the dynamic-security plugin; the companion (its real
// key ring, badger store, publish path and external publisher) signs a
// change for every gateway and pushes it. Latency of a gateway = the
// moment its new version is in force (the engine's OnChange) minus the
// moment the companion started publishing that gateway's bundle.
//
//	make bench-central-push          # 1,000 gateways
//	BENCH_PUSH_GATEWAYS=10000 make bench-central-push
//	BENCH_PUSH_VIA=leaf make bench-central-push   # gateways on a bridged leaf
//	BENCH_PUSH_ACCOUNTS=control make bench-central-push
//
// The gateways' broker accounts are written into the dynamic-security
// file before Mosquitto starts (ExportDynsecAccounts, as `edgegate-central
// push accounts-export` does for an operator): created over the control
// topic (BENCH_PUSH_ACCOUNTS=control, as a companion does for a new
// gateway) they cost O(n²), ~25 min for 10,000.

// memState is a gateway's state store in memory (the real one is the
// encrypted badger queue; a thousand badgers in one process measure
// badger, not the push).
type memState struct {
	mu sync.Mutex
	m  map[string][]byte
}

func (s *memState) GetState(name string) ([]byte, bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	v, ok := s.m[name]
	return v, ok, nil
}

func (s *memState) PutState(name string, v []byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.m[name] = append([]byte(nil), v...)
	return nil
}

// staticToken is a gateway account's access token from the simulated SSO.
type staticToken string

func (t staticToken) Token(context.Context) (string, error) { return string(t), nil }
func (staticToken) Invalidate(string)                       {}

type pushFigures struct {
	Gateways               int
	Via                    string        // "" or "leaf"
	Seeded                 bool          // accounts written into the dynamic-security file
	Seed                   time.Duration // writing them (every broker's file)
	Provision              time.Duration // sign, create the accounts (unless seeded) and push every first bundle
	Connect                time.Duration // every gateway connected and on its first version
	Sign                   time.Duration // the change signed for every gateway
	Push                   time.Duration // the change published for every gateway
	Fleet                  time.Duration // first publish to the last gateway applying
	P50, P90, P99, Max     time.Duration // per gateway: publish start → applied
	BundleBytes, HeapMiB   int
	RSSMiB, PeakRSSMiB     int // the test process (companion + every gateway)
	BrokerRSSMiB           []int
	VersionFrom, VersionTo uint64
	PollsDuringPush        int // answered 304
}

func (f pushFigures) String() string {
	r := func(d time.Duration) time.Duration { return d.Round(100 * time.Microsecond) }
	via := "the broker the companion publishes to"
	if f.Via == "leaf" {
		via = "a leaf broker bridged from it"
	}
	accounts := "created over the control topic"
	if f.Seeded {
		accounts = fmt.Sprintf("written into the dynamic-security file in %s", r(f.Seed))
	}
	return fmt.Sprintf("gateways=%d on %s, bundle=%d bytes heap=%d MiB, process RSS %d MiB (peak %d), broker RSS %v MiB\n"+
		"  accounts %s\n"+
		"  first bundles: sign + create accounts + push: %s; all gateways connected and applied: %s\n"+
		"  change (v%d -> v%d): sign all %s, push all %s, fleet (first publish -> last applied) %s\n"+
		"  push->applied per gateway: p50 %s  p90 %s  p99 %s  max %s (polls answered 304 meanwhile: %d)",
		f.Gateways, via, f.BundleBytes, f.HeapMiB, f.RSSMiB, f.PeakRSSMiB, f.BrokerRSSMiB, accounts, r(f.Provision), r(f.Connect), f.VersionFrom, f.VersionTo,
		r(f.Sign), r(f.Push), r(f.Fleet), r(f.P50), r(f.P90), r(f.P99), r(f.Max), f.PollsDuringPush)
}

// pushAll is the push half of Service.Refresh for each signed gateway:
// the newest stored bundle under the gateway's publish lock.
func pushAll(ctx context.Context, tb testing.TB, s *Service, ids []string, started map[string]time.Time) {
	tb.Helper()
	for _, gw := range ids {
		if started != nil {
			started[gw] = time.Now()
		}
		err := s.store.PublishLocked(ctx, gw, func(cur GatewayRecord) error { return s.push.publish(gw, cur.Bundle) })
		if err != nil {
			tb.Fatalf("push %s: %v", gw, err)
		}
	}
}

// runPushApplied runs n gateways connected to the companion's broker, or
// with via "leaf" to a Mosquitto bridged from it.
// With seeded, the gateways' accounts are written into each broker's
// dynamic-security file before it starts.
func runPushApplied(tb testing.TB, n int, via string, seeded bool) pushFigures {
	tb.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	f := pushFigures{Gateways: n, Via: via, Seeded: seeded}
	// One MQTT connection per gateway in this process and in Mosquitto
	// (each its own process), plus the HTTPS connections of the burst of
	// credential requests (both ends in this process) and badger's files.
	raiseFDLimit(tb, n+4096)
	dir := tb.TempDir()
	ids := make([]string, n)
	for i := range n {
		ids[i] = fmt.Sprintf("gw-%05d", i)
	}
	var seed func(string) error
	if seeded {
		seed = func(file string) error {
			t0 := time.Now()
			if _, err := pushSecret(dir); err != nil { // creates the store key
				return err
			}
			// The store key in dir is created here; the companion below
			// derives the same passwords from it.
			added, _, err := ExportDynsecAccounts(filepath.Join(dir, "store.key"), file, ids)
			if err == nil && added != n {
				err = fmt.Errorf("added %d accounts of %d", added, n)
			}
			f.Seed += time.Since(t0)
			return err
		}
	}
	sim, err := centralsim.New(centralsim.Options{Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		tb.Fatal(err)
	}
	if err := sim.Start("127.0.0.1:0"); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { sim.Close() })
	ca, err := pki.NewCA("push bench CA", time.Now())
	if err != nil {
		tb.Fatal(err)
	}
	broker := startExtBrokerSeeded(tb, ca, mosquittotest.FreePort(tb), seed, true)
	brokers := []*extBroker{broker}
	gatewayURL := broker.url
	var leaves []string
	if via == "leaf" {
		// The gateways connect to a leaf Mosquitto bridged from the one
		// the companion publishes to.
		const bridgePW = "bench-bridge-pw"
		broker.Ctrl(tb, centralAdmin, "createRole", "edgegate-bridge")
		broker.Ctrl(tb, centralAdmin, "addRoleACL", "edgegate-bridge", "subscribePattern", "edgegate/gateways/+/policy", "allow")
		broker.Ctrl(tb, centralAdmin, "addRoleACL", "edgegate-bridge", "publishClientReceive", "edgegate/gateways/+/policy", "allow")
		broker.Ctrl(tb, centralAdmin, "createClient", "edgegate-bridge", "-p", bridgePW)
		broker.Ctrl(tb, centralAdmin, "addClientRole", "edgegate-bridge", "edgegate-bridge")
		leaf := startExtBrokerSeeded(tb, ca, mosquittotest.FreePort(tb), seed, false,
			"connection root", "address "+broker.Addr, "remote_username edgegate-bridge", "remote_password "+bridgePW,
			"remote_clientid edgegate-bridge-bench", "topic edgegate/gateways/+/policy in 1", "cleansession true",
			"bridge_protocol_version mqttv311", "restart_timeout 1")
		gatewayURL, leaves = leaf.url, []string{leaf.url}
		brokers = append(brokers, leaf)
	}

	// The companion: real keys, badger store, publish path, external push,
	// HTTP API (push credentials, policy) with the SSO's token check.
	caFile, pwFile := filepath.Join(dir, "ca.pem"), filepath.Join(dir, "mqtt-password")
	if err := os.WriteFile(caFile, ca.CertPEM, 0o644); err != nil {
		tb.Fatal(err)
	}
	if err := os.WriteFile(pwFile, []byte(centralPW), 0o600); err != nil {
		tb.Fatal(err)
	}
	store, err := OpenBadger(filepath.Join(dir, "db"), testStoreKey)
	if err != nil {
		tb.Fatal(err)
	}
	s := benchService(tb, store)
	s.cfg.StateDir = dir
	s.cfg.Push = PushConfig{Mode: PushExternal, Brokers: []string{broker.url}, CAFile: caFile, Username: centralUser,
		PasswordFile: pwFile, ClientID: "edgegate-central", LeafBrokers: leaves}
	s.cfg.Gateways = map[string]string{}
	simRoots := x509.NewCertPool()
	simRoots.AppendCertsFromPEM(sim.CACertPEM())
	simHTTP := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: simRoots}}}
	s.tokens = newTokenVerifier(ctx, sim.Issuer(), simHTTP)
	s.stop = cancel
	tb.Cleanup(func() { s.Close() })
	if err := s.StartExternalPush(ctx); err != nil {
		tb.Fatal(err)
	}
	select {
	case <-s.PushReady():
	case <-time.After(20 * time.Second):
		tb.Fatal("no session with the broker")
	}
	cert, err := ca.IssueServer(time.Now(), "127.0.0.1")
	if err != nil {
		tb.Fatal(err)
	}
	// During the measured push the policy endpoint answers every poll
	// 304, so the change reaches the gateways by push only (a gateway's
	// poll after its connect could otherwise fetch it first).
	var pushOnly atomic.Bool
	var pollsDuringPush atomic.Int64
	// polls counts each gateway's answered polls: a Syncer polls when it
	// starts and once after its push session is up, and no more (its poll
	// interval is hours); the change waits for both, so that no startup
	// poll holds a gateway's apply loop during the measurement.
	polls := map[string]*atomic.Int64{}
	h := s.Handler("")
	api := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		gw, isPoll := strings.CutSuffix(strings.TrimPrefix(r.URL.Path, "/edgegate/v1/gateways/"), "/policy")
		if isPoll && pushOnly.Load() {
			pollsDuringPush.Add(1)
			w.WriteHeader(http.StatusNotModified)
			return
		}
		h.ServeHTTP(w, r)
		if c := polls[gw]; isPoll && c != nil {
			c.Add(1)
		}
	}))
	api.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	api.StartTLS()
	tb.Cleanup(api.Close)

	snap := scaleSnapshot(n, n) // one device per gateway
	for i := range n {
		s.cfg.Gateways[ids[i]] = ids[i] + "-client"
		polls[ids[i]] = &atomic.Int64{}
	}
	start := time.Now()
	built, err := Build(snap, s.cfg.Platform.Brokers, nil)
	if err != nil {
		tb.Fatal(err)
	}
	if signed, _ := publishAll(ctx, tb, s, built); signed != n {
		tb.Fatalf("signed %d of %d", signed, n)
	}
	pushAll(ctx, tb, s, ids, nil)
	f.Provision = time.Since(start)

	raw, _ := json.Marshal(s.keys.Public(time.Now()))
	pinned, err := jwk.Parse(raw)
	if err != nil {
		tb.Fatal(err)
	}
	gwHTTP := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: ca.Pool()}, MaxIdleConnsPerHost: 64}}
	type applied struct {
		mu sync.Mutex
		at map[uint64]time.Time
	}
	gws := make([]*applied, n)
	engines := make([]*policy.Engine, n)
	var wg sync.WaitGroup
	gctx, stopGateways := context.WithCancel(ctx)
	defer func() { stopGateways(); wg.Wait() }()
	start = time.Now()
	for i, gw := range ids {
		p0, _ := policy.New(0, "config", nil)
		eng := policy.NewEngine(p0)
		a := &applied{at: map[uint64]time.Time{}}
		eng.OnChange(func(c policy.Change) {
			now := time.Now()
			a.mu.Lock()
			a.at[c.New.Version] = now
			a.mu.Unlock()
		})
		tok, err := sim.IssueAccessToken("user-"+gw, 4*time.Hour, gw+"-client")
		if err != nil {
			tb.Fatal(err)
		}
		syn, err := centralsync.New(centralsync.Options{Gateway: gw, Source: centralsync.SourceBundle, Engine: eng,
			Store: &memState{m: map[string][]byte{}}, Tokens: staticToken(tok), CentralURL: api.URL, HTTPClient: gwHTTP,
			Keys: pinned, PollInterval: 4 * time.Hour, MQTTURL: gatewayURL, MQTTUsername: gw + "-client",
			MQTTTLS: &tls.Config{RootCAs: ca.Pool()}})
		if err != nil {
			tb.Fatal(err)
		}
		gws[i], engines[i] = a, eng
		wg.Go(func() { _ = syn.Run(gctx) })
	}
	// 2,000 gateways connected in 13 s on the shared 2-vCPU VM: allow
	// ~25x that per gateway before calling it a failure.
	bound := max(5*time.Minute, time.Duration(n)*150*time.Millisecond)
	v1 := func(i int) uint64 { r, _, _ := s.store.Gateway(ctx, ids[i]); return r.Version }
	first := make([]uint64, n)
	for i := range n {
		first[i] = v1(i)
	}
	testkit.Eventually(tb, bound, "every gateway on its first bundle, its startup polls answered", func() bool {
		for i, e := range engines {
			if e.Current().Version != first[i] || polls[ids[i]].Load() < 2 {
				return false
			}
		}
		return true
	})
	f.Connect = time.Since(start)

	// The change: a new read delegation on every gateway's device.
	for i := range n {
		owner := fmt.Sprintf("user-%05d", i)
		snap.Given[owner] = append(snap.Given[owner], DelegationRow{UsernameDelegator: owner, UsernameDelegated: "auditor",
			ElementID: fmt.Sprintf("Organization:%s:dev-%07d", benchBroker, i), ElementType: "IOTID", Kind: "READ_ACCESS"})
	}
	if built, err = Build(snap, s.cfg.Platform.Brokers, nil); err != nil {
		tb.Fatal(err)
	}
	pushOnly.Store(true)
	start = time.Now()
	if signed, _ := publishAll(ctx, tb, s, built); signed != n {
		tb.Fatalf("the change signed %d of %d", signed, n)
	}
	f.Sign = time.Since(start)
	want := make([]uint64, n)
	for i := range n {
		want[i] = v1(i)
	}
	started := make(map[string]time.Time, n)
	start = time.Now()
	pushAll(ctx, tb, s, ids, started)
	f.Push = time.Since(start)
	testkit.Eventually(tb, bound, "every gateway on the change", func() bool {
		for i, e := range engines {
			if e.Current().Version != want[i] {
				return false
			}
		}
		return true
	})
	pushOnly.Store(false)
	f.PollsDuringPush = int(pollsDuringPush.Load())
	lat := make([]time.Duration, n)
	var last time.Time
	for i, a := range gws {
		a.mu.Lock()
		at := a.at[want[i]]
		a.mu.Unlock()
		lat[i] = at.Sub(started[ids[i]])
		if at.After(last) {
			last = at
		}
	}
	f.Fleet = last.Sub(started[ids[0]])
	slices.Sort(lat)
	q := func(p float64) time.Duration { return lat[min(n-1, int(float64(n)*p))] }
	f.P50, f.P90, f.P99, f.Max = q(0.50), q(0.90), q(0.99), lat[n-1]
	f.VersionFrom, f.VersionTo = first[0], want[0]
	r, _, _ := s.store.Gateway(ctx, ids[0])
	f.BundleBytes = len(r.Bundle)
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	f.HeapMiB = int(ms.HeapAlloc >> 20)
	f.RSSMiB, f.PeakRSSMiB = procRSS(tb, os.Getpid())
	for _, b := range brokers {
		rss, _ := procRSS(tb, b.PID())
		f.BrokerRSSMiB = append(f.BrokerRSSMiB, rss)
	}
	return f
}

// BenchmarkPushApplied prints the figures docs/central.md quotes
// (BENCH_PUSH_GATEWAYS gateways, 1,000 by default).
func BenchmarkPushApplied(b *testing.B) {
	n := envInt("BENCH_PUSH_GATEWAYS", 1000)
	for range b.N {
		f := runPushApplied(b, n, os.Getenv("BENCH_PUSH_VIA"), os.Getenv("BENCH_PUSH_ACCOUNTS") != "control")
		fmt.Printf("edgegate-central push through Mosquitto (GOMAXPROCS=%d):\n%s\n", runtime.GOMAXPROCS(0), f)
		b.ReportMetric(float64(f.P50)/float64(time.Millisecond), "p50-ms")
		b.ReportMetric(float64(f.P99)/float64(time.Millisecond), "p99-ms")
		b.ReportMetric(float64(f.Fleet)/float64(time.Millisecond), "fleet-ms")
	}
}

// TestPushAppliedSmall runs the benchmark's path with 20 gateways on
// every test run: every gateway gets its first bundle and the change,
// with accounts created over the control topic and written beforehand.
func TestPushAppliedSmall(t *testing.T) {
	for _, c := range []struct {
		via    string
		seeded bool
	}{{"", false}, {"leaf", false}, {"", true}, {"leaf", true}} {
		f := runPushApplied(t, 20, c.via, c.seeded)
		t.Logf("%s", f)
		if f.P99 <= 0 || f.VersionTo <= f.VersionFrom {
			t.Fatalf("figures: %+v", f)
		}
	}
}

// raiseFDLimit lifts the open-file limit to at least want (Mosquitto,
// started after this, inherits it); raising the hard limit needs
// CAP_SYS_RESOURCE.
func raiseFDLimit(tb testing.TB, want int) {
	tb.Helper()
	var l syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &l); err != nil {
		tb.Fatal(err)
	}
	if l.Cur >= uint64(want) {
		return
	}
	l.Cur = max(l.Cur, uint64(want))
	l.Max = max(l.Max, l.Cur)
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &l); err != nil {
		tb.Fatalf("open-file limit %d needed for this many gateways: %v (raise ulimit -n)", want, err)
	}
}

// procRSS is a process's resident memory and its peak, in MiB (Linux
// /proc/PID/status VmRSS and VmHWM).
func procRSS(tb testing.TB, pid int) (rss, peak int) {
	tb.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		tb.Fatal(err)
	}
	for line := range strings.Lines(string(b)) {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		var kb int
		fmt.Sscanf(strings.TrimSpace(v), "%d", &kb)
		switch k {
		case "VmRSS":
			rss = kb >> 10
		case "VmHWM":
			peak = kb >> 10
		}
	}
	return rss, peak
}
