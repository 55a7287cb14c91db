package e2e

// The chaos suite (issue 11): faults injected into the real daemon and its
// surroundings under load, judged Jepsen-style from two histories: every
// acknowledgement a source got (the QoS 1 PUBACK of reading n of a device)
// and every update the simulated broker accepted. A short version runs in
// `go test ./e2e`; `make chaos` (CHAOS_CYCLES=50) runs the long one. The
// figures of each run are logged as "chaos result" lines and collected in
// e2e/CHAOS.md.

import (
	"bytes"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/edgegate/edgegate/internal/envelope"
	"github.com/edgegate/edgegate/internal/sim/centralsim"
	"github.com/edgegate/edgegate/internal/sim/radiosim"
	"github.com/edgegate/edgegate/internal/testkit"
)

// chaosCycles is the number of crash cycles: CHAOS_CYCLES, else 3 (-short: 2).
func chaosCycles() int {
	if n, err := strconv.Atoi(os.Getenv("CHAOS_CYCLES")); err == nil && n > 0 {
		return n
	}
	if testing.Short() {
		return 2
	}
	return 3
}

// long reports a long run (make chaos): longer outages, more load.
func long() bool { return os.Getenv("CHAOS_CYCLES") != "" }

// history is what the sources were told: reading n of a device was
// acknowledged at a time. It is the ground truth the broker's history is
// checked against.
type history struct {
	mu    sync.Mutex
	next  map[string]int               // last n handed out per device
	acked map[string]map[int]time.Time // device → n → acknowledged at
	sent  map[string]map[int]bool      // device → n published (acked or not)
	after map[string]map[int]struct{}  // readings that must never arrive
}

func newHistory() *history {
	return &history{next: map[string]int{}, acked: map[string]map[int]time.Time{},
		sent: map[string]map[int]bool{}, after: map[string]map[int]struct{}{}}
}

func (h *history) take(dev string) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.next[dev]++
	n := h.next[dev]
	if h.sent[dev] == nil {
		h.sent[dev] = map[int]bool{}
	}
	h.sent[dev][n] = true
	return n
}

func (h *history) ack(dev string, n int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.acked[dev] == nil {
		h.acked[dev] = map[int]time.Time{}
	}
	h.acked[dev][n] = time.Now()
}

func (h *history) ackedCount() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	t := 0
	for _, m := range h.acked {
		t += len(m)
	}
	return t
}

// forbid marks reading n of dev as one that must never reach a broker.
func (h *history) forbid(dev string, n int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.after[dev] == nil {
		h.after[dev] = map[int]struct{}{}
	}
	h.after[dev][n] = struct{}{}
}

// verdict is the outcome of checking the two histories.
type verdict struct {
	Acked, Delivered, Duplicates int
	Lost, Invented, Disorder     []string
	// Late counts readings that arrived after a higher counter of their
	// device but were never acknowledged to it (published as the local
	// broker went away): a retransmission, not an ordering violation.
	Late int
}

// nOf is the counter attribute of an update.
func nOf(u centralsim.Update) (int, bool) {
	var a struct {
		Value float64 `json:"value"`
	}
	if err := json.Unmarshal(u.Attrs["n"], &a); err != nil {
		return 0, false
	}
	return int(a.Value), true
}

// judge checks no loss, no invention, per-device order and counts the
// duplicates. own maps each device to the broker (sim) it belongs to.
func judge(h *history, sims map[*centralsim.Server][]string) verdict {
	h.mu.Lock()
	defer h.mu.Unlock()
	var v verdict
	seen := map[string]map[int]int{}
	for sim, devs := range sims {
		mine := map[string]bool{}
		for _, d := range devs {
			mine[d] = true
		}
		lastSeq := map[string]uint64{}
		lastN := map[string]int{}
		for _, u := range sim.Updates() {
			if u.Verdict != centralsim.VerdictValid {
				v.Invented = append(v.Invented, fmt.Sprintf("%s: update with verdict %s (%s)", u.Device, u.Verdict, u.Detail))
				continue
			}
			n, ok := nOf(u)
			if !ok {
				v.Invented = append(v.Invented, fmt.Sprintf("%s seq %d: no counter attribute", u.Device, u.Seq))
				continue
			}
			switch {
			case !mine[u.Device]:
				v.Invented = append(v.Invented, fmt.Sprintf("%s #%d at a broker it does not belong to", u.Device, n))
			case !h.sent[u.Device][n]:
				v.Invented = append(v.Invented, fmt.Sprintf("%s #%d never sent", u.Device, n))
			case u.Gateway != "gw-e2e" || u.User != "alice":
				v.Invented = append(v.Invented, fmt.Sprintf("%s #%d from gateway %q user %q", u.Device, n, u.Gateway, u.User))
			}
			if _, bad := h.after[u.Device][n]; bad {
				v.Invented = append(v.Invented, fmt.Sprintf("%s #%d delivered after the device was revoked", u.Device, n))
			}
			if seen[u.Device] == nil {
				seen[u.Device] = map[int]int{}
			}
			seen[u.Device][n]++
			if u.Duplicate || seen[u.Device][n] > 1 {
				v.Duplicates++
				continue
			}
			v.Delivered++
			if u.Seq <= lastSeq[u.Device] {
				v.Disorder = append(v.Disorder, fmt.Sprintf("%s: seq %d after %d", u.Device, u.Seq, lastSeq[u.Device]))
			}
			if _, wasAcked := h.acked[u.Device][n]; n < lastN[u.Device] && !wasAcked {
				v.Late++
			} else if n < lastN[u.Device] {
				v.Disorder = append(v.Disorder, fmt.Sprintf("%s: n %d after %d", u.Device, n, lastN[u.Device]))
			}
			lastSeq[u.Device], lastN[u.Device] = u.Seq, max(n, lastN[u.Device])
		}
	}
	for dev, m := range h.acked {
		for n := range m {
			v.Acked++
			if seen[dev][n] == 0 {
				v.Lost = append(v.Lost, fmt.Sprintf("%s #%d", dev, n))
			}
		}
	}
	sort.Strings(v.Lost)
	return v
}

// missing is how many acknowledged readings have not arrived yet.
func missing(h *history, sims ...*centralsim.Server) int {
	got := map[string]map[int]bool{}
	for _, sim := range sims {
		for _, u := range sim.Updates() {
			if n, ok := nOf(u); ok && u.Verdict == centralsim.VerdictValid {
				if got[u.Device] == nil {
					got[u.Device] = map[int]bool{}
				}
				got[u.Device][n] = true
			}
		}
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	m := 0
	for dev, ns := range h.acked {
		for n := range ns {
			if !got[dev][n] {
				m++
			}
		}
	}
	return m
}

// drain waits until every acknowledged reading arrived and returns how
// long it took; the test fails after timeout.
func drain(t *testing.T, h *history, timeout time.Duration, sims ...*centralsim.Server) time.Duration {
	t.Helper()
	start := time.Now()
	testkit.Eventually(t, timeout, "every acknowledged reading at its broker", func() bool { return missing(h, sims...) == 0 })
	return time.Since(start)
}

// report fails on loss, invention or disorder and logs the figures.
func report(t *testing.T, scenario string, v verdict, extra string) {
	t.Helper()
	t.Logf("chaos result: %s: acked %d, delivered %d, duplicates %d, lost %d, invented %d, disorder %d, late unacked %d; %s",
		scenario, v.Acked, v.Delivered, v.Duplicates, len(v.Lost), len(v.Invented), len(v.Disorder), v.Late, extra)
	if len(v.Lost) > 0 {
		t.Errorf("%s: %d acknowledged readings lost, e.g. %v", scenario, len(v.Lost), first(v.Lost, 10))
	}
	if len(v.Invented) > 0 {
		t.Errorf("%s: %d readings invented or misrouted, e.g. %v", scenario, len(v.Invented), first(v.Invented, 10))
	}
	if len(v.Disorder) > 0 {
		t.Errorf("%s: per-device order broken, e.g. %v", scenario, first(v.Disorder, 10))
	}
}

func first(s []string, n int) []string {
	if len(s) > n {
		return s[:n]
	}
	return s
}

// loader publishes readings of several devices until stopped.
type loader struct {
	stop    chan struct{}
	wg      sync.WaitGroup
	sent    atomic.Int64
	refused atomic.Int64 // publishes not acknowledged in time
}

// startLoad publishes from each device, one reading at a time (QoS 1,
// waiting for the PUBACK up to 5s), every interval (0: as fast as
// possible). A device goroutine ends when its connection is lost.
func startLoad(t *testing.T, brokerURL string, h *history, interval time.Duration, devs ...testDevice) *loader {
	t.Helper()
	return startLoadVia(func(d testDevice) (paho.Client, error) {
		return connect(brokerURL, fmt.Sprintf("chaos-%s-%d", d.ID, rand.Int64()), d.ID, devicePasswordOf(d))
	}, h, interval, devs...)
}

// startLoadTLS is startLoad against Mosquitto over TLS.
func startLoadTLS(t *testing.T, mq *restartableMosquitto, h *history, interval time.Duration, devs ...testDevice) *loader {
	t.Helper()
	return startLoadVia(func(d testDevice) (paho.Client, error) {
		return connect(mq.URL, fmt.Sprintf("chaos-%s-%d", d.ID, rand.Int64()), d.ID, "x", mq.tlsOpt)
	}, h, interval, devs...)
}

// startLoadVia is startLoad with each device's session opened by dial.
func startLoadVia(dial func(testDevice) (paho.Client, error), h *history, interval time.Duration, devs ...testDevice) *loader {
	l := &loader{stop: make(chan struct{})}
	for _, d := range devs {
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			c, err := dial(d)
			if err != nil {
				return
			}
			defer c.Disconnect(50)
			tick := time.NewTicker(max(interval, time.Millisecond))
			defer tick.Stop()
			for {
				select {
				case <-l.stop:
					return
				default:
				}
				if interval > 0 {
					select {
					case <-l.stop:
						return
					case <-tick.C:
					}
				}
				n := h.take(d.ID)
				tok := c.Publish("devices/"+d.ID+"/telemetry", 1, false, readingBody(n))
				if tok.WaitTimeout(5*time.Second) && tok.Error() == nil {
					h.ack(d.ID, n)
					l.sent.Add(1)
					continue
				}
				l.refused.Add(1)
				if !c.IsConnected() {
					return
				}
			}
		}()
	}
	return l
}

func (l *loader) halt() {
	close(l.stop)
	l.wg.Wait()
}

// devicePasswordOf is devicePassword for a goroutine other than the
// test's, where t.Fatal may not be called.
func devicePasswordOf(d testDevice) string {
	pw, _ := envelope.DeriveMQTTPassword(d.ID, d.K1, d.K2)
	return pw
}

// chaosDevices are canary-keyed devices for a scenario.
func chaosDevices(prefix string, n int) []testDevice {
	var ds []testDevice
	for i := 1; i <= n; i++ {
		d := dev(fmt.Sprintf("%s-%d", prefix, i), "alice")
		d.K1 = fmt.Sprintf("K1-CANARY-%s-%d-7f3a9c", prefix, i)
		d.K2 = fmt.Sprintf("K2-CANARY-%s-%d-2e8b1d", prefix, i)
		ds = append(ds, d)
	}
	return ds
}

// assertNoLeak checks that no canary (device keys, derived MQTT passwords,
// the client secret) appears in the daemon's log, its /metrics, or any
// byte of its state directory, raw or base64/hex encoded.
func assertNoLeak(t *testing.T, g *gateway, stateDir string, devs ...testDevice) {
	t.Helper()
	secrets := []string{gwSecret}
	for _, d := range devs {
		secrets = append(secrets, d.K1, d.K2, devicePasswordOf(d))
	}
	var needles [][]byte
	for _, s := range secrets {
		b := []byte(s)
		needles = append(needles, b,
			[]byte(base64.StdEncoding.EncodeToString(b)), []byte(base64.RawURLEncoding.EncodeToString(b)),
			[]byte(hex.EncodeToString(b)), []byte(strings.ToUpper(hex.EncodeToString(b))))
	}
	check := func(where string, data []byte) {
		for i, n := range needles {
			if bytes.Contains(data, n) {
				t.Errorf("secret canary %d (encoding %d) appears in %s", i/5, i%5, where)
			}
		}
	}
	if g != nil {
		check("the daemon log", []byte(g.log.String()))
		if g.Metrics != "" {
			c := &http.Client{Timeout: 5 * time.Second}
			if resp, err := c.Get("http://" + g.Metrics + "/metrics"); err == nil {
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				check("/metrics", body)
			}
		}
	}
	files := 0
	_ = filepath.WalkDir(stateDir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return nil
		}
		b, err := os.ReadFile(p)
		if err == nil {
			files++
			check("state file "+strings.TrimPrefix(p, stateDir), b)
		}
		return nil
	})
	t.Logf("secrets: %d canaries × 5 encodings checked in log, /metrics and %d state files", len(secrets), files)
}

// TestChaos runs every scenario as a subtest.
func TestChaos(t *testing.T) {
	t.Run("SIGKILL", chaosSIGKILL)
	t.Run("CrashWithPublishesInFlight", chaosInFlight)
	t.Run("BrokerFaults", chaosBrokerFaults)
	t.Run("TokenExpiresDuringOutage", chaosTokenExpiry)
	t.Run("FloodDoesNotStarve", chaosFlood)
	t.Run("RevocationUnderLoad", chaosRevocation)
	t.Run("DiskFull", chaosDiskFull)
	t.Run("CorruptedStore", chaosCorruptStore)
	t.Run("SerialUnplug", chaosSerial)
	t.Run("MosquittoRestart", chaosMosquitto)
	// The clock hook (EDGEGATE_CLOCK_OFFSET_FILE) and a second broker behind
	// the same sign-on (centralsim.Options.TrustTokensOf) exist: these run
	// the standalone tests' scenarios, so that `make chaos` covers them too.
	t.Run("ClockJump", TestClockJumps)
	t.Run("SecondBroker", TestTwoBrokersNoMisrouting)
}

// chaosSIGKILL: SIGKILL at a random point under load, cycle after cycle,
// with a slow broker so that the queue holds a backlog at each kill.
func chaosSIGKILL(t *testing.T) {
	devs := chaosDevices("kill", 3)
	sim := startSim(t, devs...)
	sim.SetFault(centralsim.Fault{Mode: centralsim.FaultSlow, Delay: 10 * time.Millisecond})
	dir := t.TempDir()
	cfg := writeGatewayConfig(t, dir, sim, gatewayConfig{}, devs...)
	h := newHistory()
	cycles := chaosCycles()
	var readyTimes []time.Duration
	for c := 0; c < cycles; c++ {
		start := time.Now()
		g := startGateway(t, cfg)
		readyTimes = append(readyTimes, time.Since(start))
		l := startLoad(t, "tcp://"+g.MQTT, h, 0, devs...)
		target := int64(20 + rand.IntN(200))
		testkit.Poll(10*time.Second, func() bool { return l.sent.Load() >= target })
		time.Sleep(time.Duration(rand.IntN(50)) * time.Millisecond)
		g.kill()
		l.halt()
	}
	sim.ClearFault()
	g := startGateway(t, cfg)
	d := drain(t, h, 120*time.Second, sim)
	v := judge(h, map[*centralsim.Server][]string{sim: ids(devs)})
	sort.Slice(readyTimes, func(i, j int) bool { return readyTimes[i] < readyTimes[j] })
	report(t, "SIGKILL", v, fmt.Sprintf("cycles %d, restart-to-ready median %v max %v, drain after last restart %v",
		cycles, readyTimes[len(readyTimes)/2].Round(time.Millisecond), readyTimes[len(readyTimes)-1].Round(time.Millisecond), d.Round(time.Millisecond)))
	if v.Duplicates > cycles*128 {
		t.Errorf("%d duplicates over %d kills: more than one commit batch (128) per kill", v.Duplicates, cycles)
	}
	assertNoLeak(t, g, filepath.Join(dir, "state"), devs...)
}

func ids(ds []testDevice) []string {
	var out []string
	for _, d := range ds {
		out = append(out, d.ID)
	}
	return out
}

// chaosInFlight: many publishes in flight (not waiting for each PUBACK)
// when the daemon is killed: those acknowledged must all arrive.
func chaosInFlight(t *testing.T) {
	devs := chaosDevices("infl", 2)
	sim := startSim(t, devs...)
	sim.SetFault(centralsim.Fault{Mode: centralsim.FaultDown})
	dir := t.TempDir()
	cfg := writeGatewayConfig(t, dir, sim, gatewayConfig{}, devs...)
	h := newHistory()
	cycles := max(2, chaosCycles()/5)
	for c := 0; c < cycles; c++ {
		g := startGateway(t, cfg)
		var wg sync.WaitGroup
		for _, d := range devs {
			cl, err := connect("tcp://"+g.MQTT, fmt.Sprintf("inflight-%s-%d", d.ID, c), d.ID, devicePasswordOf(d),
				func(o *paho.ClientOptions) { o.SetMaxResumePubInFlight(1000).SetOrderMatters(false) })
			if err != nil {
				t.Fatal(err)
			}
			for i := 0; i < 300; i++ {
				n := h.take(d.ID)
				tok := cl.Publish("devices/"+d.ID+"/telemetry", 1, false, readingBody(n))
				wg.Add(1)
				go func() {
					defer wg.Done()
					if tok.WaitTimeout(10*time.Second) && tok.Error() == nil {
						h.ack(d.ID, n)
					}
				}()
			}
			defer cl.Disconnect(0)
		}
		time.Sleep(time.Duration(20+rand.IntN(80)) * time.Millisecond)
		g.kill()
		wg.Wait()
	}
	sim.ClearFault()
	g := startGateway(t, cfg)
	d := drain(t, h, 60*time.Second, sim)
	v := judge(h, map[*centralsim.Server][]string{sim: ids(devs)})
	sent := 0
	for _, m := range h.sent {
		sent += len(m)
	}
	report(t, "crash with publishes in flight", v, fmt.Sprintf("cycles %d, published %d, drain %v", cycles, sent, d.Round(time.Millisecond)))
	assertNoLeak(t, g, filepath.Join(dir, "state"), devs...)
}

// chaosBrokerFaults: the broker filter down, slow, 5xx, 429 with
// Retry-After, transient 401 storms and an invalid token, under load; the
// queue holds everything and drains after each fault heals.
func chaosBrokerFaults(t *testing.T) {
	devs := chaosDevices("flt", 3)
	sim := startSim(t, devs...)
	dir := t.TempDir()
	cfg := writeGatewayConfig(t, dir, sim, gatewayConfig{}, devs...)
	g := startGateway(t, cfg)
	h := newHistory()
	hold := 2 * time.Second
	if long() {
		hold = 20 * time.Second
	}
	faults := []struct {
		name string
		f    centralsim.Fault
	}{
		{"down", centralsim.Fault{Mode: centralsim.FaultDown}},
		{"slow 2s", centralsim.Fault{Mode: centralsim.FaultSlow, Delay: 2 * time.Second}},
		{"503", centralsim.Fault{Mode: centralsim.FaultStatus, Status: 503, Body: "upstream down"}},
		{"429 Retry-After 1", centralsim.Fault{Mode: centralsim.FaultTooMany, RetryAfter: 1}},
		{"transient 401 storm", centralsim.Fault{Mode: centralsim.FaultTransient401}},
		{"invalid token ×20", centralsim.Fault{Mode: centralsim.FaultInvalidToken, Count: 20}},
		{"token endpoint 503", centralsim.Fault{Mode: centralsim.FaultStatus, Target: centralsim.TargetToken, Status: 503}},
	}
	var figures []string
	for _, fl := range faults {
		l := startLoad(t, "tcp://"+g.MQTT, h, 20*time.Millisecond, devs...)
		sim.SetFault(fl.f)
		time.Sleep(hold)
		sim.ClearFault()
		l.halt()
		d := drain(t, h, 60*time.Second, sim)
		figures = append(figures, fmt.Sprintf("%s: drain %v", fl.name, d.Round(time.Millisecond)))
	}
	v := judge(h, map[*centralsim.Server][]string{sim: ids(devs)})
	report(t, "broker faults", v, fmt.Sprintf("hold %v each; %s", hold, strings.Join(figures, "; ")))
	if got := scrape(t, g.Metrics, `edgegate_readings_dead_lettered_total`); got != "" && got != "0" {
		t.Errorf("transient faults dead-lettered readings: %s", got)
	}
	assertNoLeak(t, g, filepath.Join(dir, "state"), devs...)
}

// chaosTokenExpiry: tokens live 3s; the broker and the token endpoint are
// down for longer than that; after the outage the gateway gets a new token
// and drains.
func chaosTokenExpiry(t *testing.T) {
	devs := chaosDevices("tok", 2)
	sim := startSimWith(t, func(o *centralsim.Options) { o.TokenTTL = 3 * time.Second }, devs...)
	dir := t.TempDir()
	g := startGateway(t, writeGatewayConfig(t, dir, sim, gatewayConfig{}, devs...))
	h := newHistory()
	l := startLoad(t, "tcp://"+g.MQTT, h, 20*time.Millisecond, devs...)
	testkit.Eventually(t, 10*time.Second, "readings to flow before the outage", func() bool { return h.ackedCount() >= 10 })
	sim.SetFault(centralsim.Fault{Mode: centralsim.FaultDown})
	outage := 6 * time.Second
	time.Sleep(outage)
	sim.ClearFault()
	l.halt()
	d := drain(t, h, 60*time.Second, sim)
	v := judge(h, map[*centralsim.Server][]string{sim: ids(devs)})
	report(t, "token expires during outage", v, fmt.Sprintf("token TTL 3s, outage %v, drain %v", outage, d.Round(time.Millisecond)))
	assertNoLeak(t, g, filepath.Join(dir, "state"), devs...)
}

// chaosFlood: one device publishes as fast as it can, three others at 5/s;
// the others' latency (PUBACK to arrival at the broker) stays bounded.
func chaosFlood(t *testing.T) {
	devs := chaosDevices("fld", 4)
	var mu sync.Mutex
	arrived := map[string]time.Time{}
	sim := startSimWith(t, func(o *centralsim.Options) {
		o.OnUpdate = func(u centralsim.Update) {
			if n, ok := nOf(u); ok {
				mu.Lock()
				k := fmt.Sprintf("%s/%d", u.Device, n)
				if _, dup := arrived[k]; !dup {
					arrived[k] = time.Now()
				}
				mu.Unlock()
			}
		}
	}, devs...)
	dir := t.TempDir()
	g := startGateway(t, writeGatewayConfig(t, dir, sim, gatewayConfig{}, devs...))
	h := newHistory()
	flood := startLoad(t, "tcp://"+g.MQTT, h, 0, devs[0])
	calm := startLoad(t, "tcp://"+g.MQTT, h, 200*time.Millisecond, devs[1:]...)
	run := 5 * time.Second
	if long() {
		run = 30 * time.Second
	}
	time.Sleep(run)
	calm.halt()
	flood.halt()
	drain(t, h, 120*time.Second, sim)
	h.mu.Lock()
	var lat []time.Duration
	for _, d := range devs[1:] {
		for n, at := range h.acked[d.ID] {
			mu.Lock()
			arr, ok := arrived[fmt.Sprintf("%s/%d", d.ID, n)]
			mu.Unlock()
			if ok {
				lat = append(lat, arr.Sub(at))
			}
		}
	}
	flooded := len(h.acked[devs[0].ID])
	h.mu.Unlock()
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	if len(lat) == 0 {
		t.Fatal("no latency samples")
	}
	p50, p99, mx := lat[len(lat)/2], lat[len(lat)*99/100], lat[len(lat)-1]
	v := judge(h, map[*centralsim.Server][]string{sim: ids(devs)})
	report(t, "flood", v, fmt.Sprintf("%v: flooder acked %d (%.0f/s); others at 5/s: latency p50 %v p99 %v max %v over %d readings",
		run, flooded, float64(flooded)/run.Seconds(), p50.Round(time.Millisecond), p99.Round(time.Millisecond), mx.Round(time.Millisecond), len(lat)))
	if p99 > 2*time.Second {
		t.Errorf("under a flood the other devices' p99 latency is %v, want ≤ 2s", p99)
	}
}

// chaosRevocation: two devices under load; central ops revoke one and push
// the bundle. Nothing the revoked device sends afterwards reaches the
// broker, and the gateway stops forwarding it (no refusals for it at the
// broker once the push is applied).
func chaosRevocation(t *testing.T) {
	devs := chaosDevices("rev", 2)
	a, b := devs[0], devs[1]
	sim := startPolicySim(t, a, b)
	dir := t.TempDir()
	g := startGateway(t, bundleConfig(t, dir, sim, sim.URL()))
	waitLogin(t, g, a)
	h := newHistory()
	la := startLoad(t, "tcp://"+g.MQTT, h, 10*time.Millisecond, a)
	lb := startLoad(t, "tcp://"+g.MQTT, h, 0, b)
	testkit.Eventually(t, 10*time.Second, "readings to flow before the revocation", func() bool { return h.ackedCount() >= 40 })
	sim.RemoveDevice(b.ID)
	pushAt := time.Now()
	if err := sim.Push("gw-e2e", true); err != nil {
		t.Fatal(err)
	}
	lb.wg.Wait() // b's session is closed by the gateway
	closedIn := time.Since(pushAt)
	// Every reading b sends from now on must never arrive.
	for i := 0; i < 20; i++ {
		n := h.take(b.ID)
		h.forbid(b.ID, n)
		if c, err := connect("tcp://"+g.MQTT, fmt.Sprintf("b-again-%d", i), b.ID, devicePasswordOf(b)); err == nil {
			c.Publish("devices/"+b.ID+"/telemetry", 1, false, readingBody(n)).WaitTimeout(2 * time.Second)
			c.Disconnect(10)
			t.Errorf("revoked device %s logged in again", b.ID)
		}
	}
	time.Sleep(time.Second)
	la.halt()
	close(lb.stop)
	// b's readings acked before the revocation may be purged (README: the
	// revoked device's queued readings are purged): not a loss.
	h.mu.Lock()
	purgedCandidates := len(h.acked[b.ID])
	delete(h.acked, b.ID)
	h.mu.Unlock()
	d := drain(t, h, 60*time.Second, sim)
	var lateRefusals int
	for _, r := range sim.Refusals() {
		if r.Device == b.ID && r.Time.After(pushAt.Add(2*time.Second)) {
			lateRefusals++
		}
	}
	v := judge(h, map[*centralsim.Server][]string{sim: ids(devs)})
	report(t, "revocation under load", v, fmt.Sprintf("b's session closed %v after the push; b acked before: %d; refusals of b at the broker >2s after the push: %d; drain of a %v",
		closedIn.Round(time.Millisecond), purgedCandidates, lateRefusals, d.Round(time.Millisecond)))
	if lateRefusals > 0 {
		t.Errorf("the gateway still forwarded %d readings of the revoked device after the push", lateRefusals)
	}
	assertNoLeak(t, g, filepath.Join(dir, "state"), devs...)
}

// chaosDiskFull: the state directory on a 64 MiB tmpfs, filled up by
// another file while the daemon runs: publishes are not acknowledged while
// full (refusal before corruption), and everything flows again once the
// filler is deleted.
func chaosDiskFull(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mount needs root")
	}
	devs := chaosDevices("disk", 2)
	sim := startSim(t, devs...)
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	if err := os.MkdirAll(state, 0o700); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", state).CombinedOutput(); err != nil {
		t.Skipf("mount tmpfs not permitted here: %v: %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("umount", "-l", state).Run() })
	port := freePort(t)
	mq := "mqtt:\n  mode: embedded\n  embedded:\n    listen: 127.0.0.1:" + port + "\n"
	cfg := writeGatewayConfig(t, dir, sim, gatewayConfig{MQTT: mq, Store: "store:\n  max_batch: 128\n  quota: 1GiB\n  min_free: 16MiB\n"}, devs...)
	g := startGateway(t, cfg)
	h := newHistory()
	l := startLoad(t, "tcp://"+g.MQTT, h, 10*time.Millisecond, devs...)
	testkit.Eventually(t, 10*time.Second, "readings to flow before the disk fills", func() bool { return h.ackedCount() >= 40 })
	// Fill the file system.
	filler := filepath.Join(state, "filler")
	f, err := os.Create(filler)
	if err != nil {
		t.Fatal(err)
	}
	chunk := bytes.Repeat([]byte{0xA5}, 1<<20)
	filled := 0
	for i := 0; i < 128; i++ {
		if _, err := f.Write(chunk); err != nil {
			break
		}
		filled++
	}
	f.Sync()
	f.Close()
	before := l.sent.Load()
	time.Sleep(3 * time.Second)
	during := l.sent.Load() - before
	aliveWhileFull := true
	select {
	case <-g.done:
		aliveWhileFull = false
	default:
	}
	l.halt()
	if !aliveWhileFull {
		t.Errorf("the daemon died with the disk full: %v\n%s", g.waitErr, crashSummary(g.log.String()))
	}
	// A publish now must be held, not acknowledged.
	var heldTok paho.Token
	var heldN int
	if aliveWhileFull {
		c, err := connect("tcp://"+g.MQTT, "disk-held", devs[0].ID, devicePasswordOf(devs[0]),
			func(o *paho.ClientOptions) {
				o.SetCleanSession(false).SetAutoReconnect(true).SetConnectRetry(true).
					SetConnectRetryInterval(200 * time.Millisecond).SetMaxReconnectInterval(time.Second)
			})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Disconnect(50)
		heldN = h.take(devs[0].ID)
		heldTok = c.Publish("devices/"+devs[0].ID+"/telemetry", 1, false, readingBody(heldN))
		if heldTok.WaitTimeout(2*time.Second) && heldTok.Error() == nil {
			t.Logf("a reading was acknowledged with the disk full (the queue may still have had room in its files)")
			h.ack(devs[0].ID, heldN)
			heldTok = nil
		}
	}
	os.Remove(filler)
	freedAt := time.Now()
	if heldTok != nil {
		if !heldTok.WaitTimeout(30*time.Second) || heldTok.Error() != nil {
			t.Errorf("the reading held while the disk was full was not acknowledged within 30s of space returning")
		} else {
			h.ack(devs[0].ID, heldN)
		}
	}
	ackAfter := time.Since(freedAt)
	if !aliveWhileFull {
		startGateway(t, cfg)
	}
	d := drain(t, h, 60*time.Second, sim)
	v := judge(h, map[*centralsim.Server][]string{sim: ids(devs)})
	report(t, "disk full", v, fmt.Sprintf("tmpfs 64 MiB, filler %d MiB; acks while full in 3s: %d; daemon alive: %v; held reading acked %v after space returned; drain %v",
		filled, during, aliveWhileFull, ackAfter.Round(time.Millisecond), d.Round(time.Millisecond)))
	if aliveWhileFull && strings.Contains(g.log.String(), "panic") {
		t.Errorf("the daemon logged a panic with the disk full")
	}
}

// chaosCorruptStore: acknowledged readings queued while the broker is
// down, the daemon stopped, bytes of a badger file overwritten; at start
// the daemon must say clearly that the store is damaged or deliver every
// acknowledged reading — never lose them silently.
func chaosCorruptStore(t *testing.T) {
	devs := chaosDevices("crpt", 1)
	sim := startSim(t, devs...)
	sim.SetFault(centralsim.Fault{Mode: centralsim.FaultDown})
	dir := t.TempDir()
	cfg := writeGatewayConfig(t, dir, sim, gatewayConfig{}, devs...)
	g := startGateway(t, cfg)
	h := newHistory()
	l := startLoad(t, "tcp://"+g.MQTT, h, 0, devs...)
	testkit.Eventually(t, 10*time.Second, "200 acknowledged readings", func() bool { return l.sent.Load() >= 200 })
	l.halt()
	if err := g.term(); err != nil {
		t.Fatalf("SIGTERM: %v", err)
	}
	qdir := filepath.Join(dir, "state", "queue")
	var victims []string
	_ = filepath.WalkDir(qdir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			switch filepath.Ext(p) {
			case ".vlog", ".sst", ".mem":
				if st, _ := d.Info(); st != nil && st.Size() > 0 {
					victims = append(victims, p)
				}
			}
		}
		return nil
	})
	if len(victims) == 0 {
		t.Fatalf("no badger data files under %s", qdir)
	}
	var what []string
	for _, p := range victims {
		st, _ := os.Stat(p)
		f, err := os.OpenFile(p, os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		off := st.Size() / 3
		n := min(int64(4096), st.Size()-off)
		f.WriteAt(bytes.Repeat([]byte{0xFF}, int(n)), off)
		f.Close()
		what = append(what, fmt.Sprintf("%s (%d bytes at %d)", filepath.Base(p), n, off))
	}
	sim.ClearFault()
	// Start it by hand: it may refuse.
	cmd := exec.Command(binary, "run", "--config", cfg)
	cmd.Env = append(os.Environ(), "CREDENTIALS_DIRECTORY=")
	var out syncBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() { _ = cmd.Process.Kill(); <-done })
	var exitErr error
	exited := false
	deadline := time.After(30 * time.Second)
wait:
	for {
		select {
		case exitErr = <-done:
			exited = true
			done <- exitErr
			break wait
		case <-deadline:
			break wait
		case <-time.After(200 * time.Millisecond):
			if missing(h, sim) == 0 {
				break wait
			}
		}
	}
	miss := missing(h, sim)
	v := judge(h, map[*centralsim.Server][]string{sim: ids(devs)})
	log := out.String()
	outcome := "started and delivered everything"
	switch {
	case exited:
		outcome = fmt.Sprintf("refused to start (%v): %s", exitErr, lastErrorLine(log))
	case miss > 0:
		outcome = fmt.Sprintf("started, %d of %d acknowledged readings never delivered within 30s", miss, h.ackedCount())
	}
	t.Logf("chaos result: corrupted store: corrupted %s; acked %d, delivered %d; %s", strings.Join(what, ", "), v.Acked, v.Delivered, outcome)
	quarantined := strings.Contains(log, "quarantined")
	if !exited && miss > 0 && quarantined {
		// Not silent: the store was moved aside whole with a loud error;
		// the acknowledged readings it held are kept there for recovery.
		t.Logf("the corrupted store was quarantined with %d acknowledged readings kept in it", miss)
	} else if !exited && miss > 0 {
		clear := strings.Contains(strings.ToLower(log), "corrupt") || strings.Contains(strings.ToLower(log), "checksum")
		if !clear {
			t.Errorf("silent loss: the daemon started on a corrupted store and %d acknowledged readings never arrived, with no error in its log:\n%s", miss, tail(log, 20))
		} else {
			t.Errorf("the daemon started on a corrupted store and lost %d acknowledged readings (it did log the corruption):\n%s", miss, tail(log, 20))
		}
	}
	if exited && !strings.Contains(strings.ToLower(log), "queue") && !strings.Contains(strings.ToLower(log), "store") {
		t.Errorf("the daemon refused to start but its error names neither the store nor the queue:\n%s", tail(log, 10))
	}
}

// crashSummary is the start of a Go crash in a log: the panic or fatal
// error line and the first goroutine's frames.
func crashSummary(log string) string {
	lines := strings.Split(log, "\n")
	for i, l := range lines {
		if strings.HasPrefix(l, "panic:") || strings.HasPrefix(l, "fatal error:") || strings.HasPrefix(l, "unexpected fault") ||
			strings.HasPrefix(l, "SIGBUS") || strings.HasPrefix(l, "SIGSEGV") {
			return strings.Join(lines[i:min(len(lines), i+24)], "\n")
		}
	}
	return tail(log, 30)
}

func lastErrorLine(log string) string {
	lines := strings.Split(strings.TrimSpace(log), "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		if l := strings.ToLower(lines[i]); strings.Contains(l, "error") || strings.Contains(l, "edgegate:") {
			return strings.TrimSpace(lines[i])
		}
	}
	if len(lines) > 0 {
		return lines[len(lines)-1]
	}
	return ""
}

// chaosSerial: a JSON-lines radio on a simulated serial port, unplugged and
// replugged under load with garbage in between; lines written while plugged
// arrive (the radio has no acknowledgement, so lines written to an
// unplugged port are the only ones allowed to be lost), garbage is counted,
// and the port resumes at the same path.
func chaosSerial(t *testing.T) {
	devs := chaosDevices("rad", 1) // a port-wide binding belongs to one device
	sim := startSim(t, devs...)
	dir := t.TempDir()
	link := filepath.Join(dir, "ttyRADIO0")
	devs[0].RadioPort = link
	rs, err := radiosim.New(radiosim.Options{Link: link, Silent: true, Seed: 11})
	if err != nil {
		t.Skipf("no pseudo-terminal for the radio sim: %v", err)
	}
	t.Cleanup(func() { rs.Close() })
	cfgPath := writeGatewayConfig(t, dir, sim, gatewayConfig{Extra: "radio:\n  ports:\n    - path: " + link + "\n      codec: jsonlines\n      read_timeout: 100ms\n"}, devs...)
	g := startGateway(t, cfgPath)
	h := newHistory()
	write := func(d testDevice) {
		n := h.take(d.ID)
		line := fmt.Sprintf(`{"device":%q,"attrs":{"n":%d,"temperature":21.5}}`+"\n", d.ID, n)
		if rs.Inject([]byte(line)) == nil {
			h.ack(d.ID, n) // written to a plugged port: must arrive
		}
	}
	garbage := [][]byte{{0x00, 0xff, 0xfe, '\n'}, []byte(strings.Repeat("x", 70000) + "\n"), []byte(`{"device":"rad-1","attrs":` + "\n"),
		[]byte(`{"device":"nobody","attrs":{"n":1}}` + "\n"), []byte("\xc3\x28garbage\r\n")}
	cycles := max(2, chaosCycles()/5)
	// Wait until the daemon reads the port.
	testkit.Eventually(t, 15*time.Second, "the first radio reading", func() bool {
		write(devs[0])
		time.Sleep(100 * time.Millisecond)
		return len(delivered(sim)[devs[0].ID]) > 0
	})
	for c := 0; c < cycles; c++ {
		for i := 0; i < 50; i++ {
			write(devs[i%len(devs)])
			if i%10 == 0 {
				_ = rs.Inject(garbage[(i/10)%len(garbage)])
			}
			time.Sleep(5 * time.Millisecond)
		}
		if err := rs.Unplug(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(300 * time.Millisecond)
		if err := rs.Replug(); err != nil {
			t.Fatal(err)
		}
		// The line discipline may hold a partial line from before; resync.
		_ = rs.Inject([]byte("\n"))
		time.Sleep(500 * time.Millisecond)
	}
	for i := 0; i < 20; i++ {
		write(devs[i%len(devs)])
	}
	d := drain(t, h, 60*time.Second, sim)
	v := judge(h, map[*centralsim.Server][]string{sim: ids(devs)})
	bad := scrape(t, g.Metrics, `edgegate_readings_refused_total{reason="bad_frame"}`)
	report(t, "serial unplug/replug", v, fmt.Sprintf("cycles %d, bad frames counted %s, drain %v", cycles, bad, d.Round(time.Millisecond)))
	if bad == "" || bad == "0" {
		t.Errorf("garbage on the serial line was not counted as bad frames")
	}
	assertNoLeak(t, g, filepath.Join(dir, "state"), devs...)
}

// chaosMosquitto: external mode; Mosquitto (persistence on) is stopped and
// restarted under load — with SIGTERM (it saves its database) and, in the
// long run, SIGKILL (it loses what it acknowledged since its last autosave:
// a Mosquitto property, reported, not judged).
func chaosMosquitto(t *testing.T) {
	mq := startRestartableMosquitto(t)
	devs := chaosDevices("mq", 2)
	sim := startSim(t, devs...)
	dir := t.TempDir()
	mqttCfg := "mqtt:\n  mode: external\n  external:\n    url: " + mq.URL + "\n    client_id: edgegate-chaos\n    ca_file: " + mq.CAFile + "\n"
	g := startGateway(t, writeGatewayConfig(t, dir, sim, gatewayConfig{MQTT: mqttCfg}, devs...))
	testkit.Eventually(t, 15*time.Second, "the daemon to subscribe", func() bool {
		return strings.Contains(g.log.String(), "subscribed to the local broker")
	})
	h := newHistory()
	cycles := max(2, chaosCycles()/10)
	var resub []time.Duration
	for c := 0; c < cycles; c++ {
		l := startLoadTLS(t, mq, h, 10*time.Millisecond, devs...)
		time.Sleep(time.Second)
		subs := strings.Count(g.log.String(), "subscribed to the local broker")
		mq.restart(t, syscall.SIGTERM)
		l.halt()
		at := time.Now()
		testkit.Eventually(t, 60*time.Second, "the daemon to resubscribe after the restart", func() bool {
			return strings.Count(g.log.String(), "subscribed to the local broker") > subs
		})
		resub = append(resub, time.Since(at))
	}
	d := drain(t, h, 60*time.Second, sim)
	v := judge(h, map[*centralsim.Server][]string{sim: ids(devs)})
	report(t, "mosquitto restart", v, fmt.Sprintf("cycles %d (SIGTERM), resubscribed after %v, drain %v", cycles, resub, d.Round(time.Millisecond)))
	assertNoLeak(t, g, filepath.Join(dir, "state"), devs...)
}

// restartableMosquitto is a Mosquitto that can be stopped and started at
// the same port with the same persistence directory.
type restartableMosquitto struct {
	*mosquitto
	bin, conf string
	mu        sync.Mutex
	cmd       *exec.Cmd
}

func startRestartableMosquitto(t *testing.T) *restartableMosquitto {
	t.Helper()
	base := startMosquitto(t) // skips when Mosquitto is missing; gives CA and certificate
	// Reuse its configuration: find it next to its CA file.
	conf := filepath.Join(filepath.Dir(base.CAFile), "mosquitto.conf")
	bin, err := exec.LookPath("mosquitto")
	if err != nil {
		bin = "/usr/sbin/mosquitto"
	}
	m := &restartableMosquitto{mosquitto: base, bin: bin, conf: conf}
	// Take over: stop the helper's process by its pid file-less port and
	// run our own with the same configuration.
	if err := killListener(base.Port); err != nil {
		t.Skipf("cannot take over the test mosquitto: %v", err)
	}
	m.start(t)
	t.Cleanup(func() { m.stop(syscall.SIGKILL) })
	return m
}

func (m *restartableMosquitto) start(t *testing.T) {
	t.Helper()
	cmd := exec.Command(m.bin, "-c", m.conf)
	logf, _ := os.OpenFile(filepath.Join(filepath.Dir(m.conf), "mosquitto-chaos.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	m.mu.Lock()
	m.cmd = cmd
	m.mu.Unlock()
	if !waitListening("127.0.0.1:"+m.Port, 10*time.Second) {
		t.Fatalf("mosquitto did not come back on port %s", m.Port)
	}
}

func (m *restartableMosquitto) stop(sig syscall.Signal) {
	m.mu.Lock()
	cmd := m.cmd
	m.cmd = nil
	m.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = cmd.Process.Signal(sig)
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		_ = cmd.Process.Kill()
		<-done
	}
}

func (m *restartableMosquitto) restart(t *testing.T, sig syscall.Signal) {
	t.Helper()
	m.stop(sig)
	m.start(t)
}

// killListener stops the mosquitto that startMosquitto started (found by
// its listening port in /proc/net/tcp and its /proc/<pid>/fd), so that this
// suite owns the process and can restart it. Only a process named
// mosquitto and a child of this test process is signalled.
func killListener(port string) error {
	p, err := strconv.Atoi(port)
	if err != nil {
		return err
	}
	inode := ""
	data, err := os.ReadFile("/proc/net/tcp")
	if err != nil {
		return err
	}
	want := fmt.Sprintf(":%04X", p)
	for _, line := range strings.Split(string(data), "\n")[1:] {
		f := strings.Fields(line)
		if len(f) > 9 && strings.HasSuffix(f[1], want) && f[3] == "0A" {
			inode = f[9]
		}
	}
	if inode == "" {
		return errors.New("no listener found")
	}
	procs, _ := os.ReadDir("/proc")
	for _, pe := range procs {
		pid, err := strconv.Atoi(pe.Name())
		if err != nil {
			continue
		}
		stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil || !strings.Contains(string(stat), "(mosquitto)") {
			continue
		}
		fields := strings.Fields(string(stat))
		if len(fields) < 4 || fields[3] != strconv.Itoa(os.Getpid()) {
			continue
		}
		fds, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
		for _, fd := range fds {
			l, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name()))
			if l == "socket:["+inode+"]" {
				if err := syscall.Kill(pid, syscall.SIGTERM); err != nil {
					return err
				}
				stopped := testkit.Poll(5*time.Second, func() bool {
					c, err := net.DialTimeout("tcp", "127.0.0.1:"+port, 200*time.Millisecond)
					if err == nil {
						c.Close()
					}
					return err != nil
				})
				if !stopped {
					return errors.New("mosquitto did not stop")
				}
				return nil
			}
		}
	}
	return errors.New("listener is not a mosquitto of this test")
}
