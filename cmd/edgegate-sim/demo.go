package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"text/tabwriter"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"gopkg.in/yaml.v3"

	"github.com/edgegate/edgegate/internal/envelope"
	"github.com/edgegate/edgegate/internal/logx"
	"github.com/edgegate/edgegate/internal/sim/centralsim"
	"github.com/edgegate/edgegate/internal/sim/radiosim"
	"github.com/edgegate/edgegate/internal/testkit"
)

// Relations of a demo device to the gateway's account (alice) on the
// platform: what decides whether the gateway may write it.
const (
	relOwned     = "owned"
	relDelegated = "delegated READ_WRITE"
	relForeign   = "foreign (not delegated)"
	relUnknown   = "not registered"
)

// demoDevice is one simulated device of the demo.
type demoDevice struct {
	id, typ, owner string
	rel            string // one of the rel constants
	attrs          []string
	radioNode      int // > 0: a MySensors node on the demo's radio link
	loginRefused   bool
	k1, k2         string
	published      int
	acks           int
}

// demoAccount is the platform user the demo gateway is paired as.
const demoAccount = "alice"

// runDemo shows the stock flow end to end against a simulated stock
// Snap4City (centralsim without the companion): pair with the device
// grant as alice, bind the radio node and the device bob delegated to
// alice in the gateway's registry, run the real daemon with
// policy.source ownership-api, let the devices publish, then read the
// stored entity back through the broker filter and verify it.
func runDemo(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("demo", flag.ContinueOnError)
	fs.SetOutput(stderr)
	seconds := fs.Int("seconds", envInt("DEMO_SECONDS", 30), "how long the devices publish (0: until Ctrl-C)")
	dir := fs.String("dir", "", "working directory (default: a temporary one, removed at the end)")
	binFlag := fs.String("edgegate", "", "the edgegate `binary` the demo runs (default: the one next to edgegate-sim, else on PATH)")
	centralFlag := fs.String("edgegate-central", "", "the edgegate-central `binary` of the live-push part (default: next to edgegate-sim, else on PATH)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	bin, err := findEdgegate(*binFlag)
	if err != nil {
		return err
	}
	centralBin, err := findSibling("edgegate-central", *centralFlag, "edgegate-central")
	if err != nil {
		return err
	}
	work := *dir
	if work == "" {
		d, err := os.MkdirTemp("", "edgegate-demo-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(d)
		work = d
	} else if err := os.MkdirAll(work, 0o700); err != nil {
		return err
	}
	if abs, err := filepath.Abs(work); err == nil {
		work = abs
	}
	out := &lineWriter{w: stdout}

	// The gateway is paired as alice. Bob delegated one meter to alice
	// READ_WRITE (the gateway may write it), the other not; rogue-7 is
	// registered nowhere. th-attic is a MySensors node on the radio link.
	devices := []*demoDevice{
		{id: "th-kitchen", typ: "TemperatureSensor", owner: demoAccount, rel: relOwned, attrs: []string{"temperature", "humidity"}},
		{id: "th-garden", typ: "TemperatureSensor", owner: demoAccount, rel: relOwned, attrs: []string{"temperature"}},
		{id: "th-attic", typ: "TemperatureSensor", owner: demoAccount, rel: relOwned, radioNode: 1,
			attrs: []string{"temperature", "humidity", "batteryLevel"}},
		{id: "meter-shared", typ: "PowerMeter", owner: "bob", rel: relDelegated, attrs: []string{"power"}},
		{id: "meter-bob", typ: "PowerMeter", owner: "bob", rel: relForeign, attrs: []string{"power"}},
		{id: "rogue-7", typ: "TemperatureSensor", owner: "mallory", rel: relUnknown, attrs: []string{"temperature"}},
	}
	link := filepath.Join(work, "ttyRADIO0")
	var simDevices []centralsim.Device
	for _, d := range devices {
		d.k1, d.k2 = uuidLike(), uuidLike()
		if d.rel == relUnknown {
			continue
		}
		// Attrs: the model's attributes, which the IoT Directory's insert
		// creates on the entity; stock Orion (3.12) updates only existing
		// attributes (PATCH .../attrs, 422 PartialUpdate for the rest).
		simDevices = append(simDevices, centralsim.Device{ID: d.id, Type: d.typ, Owner: d.owner, K1: d.k1, K2: d.k2, Attrs: d.attrs})
	}
	centralSecret := randomHex(16)
	simDevices = append(simDevices, demoRelayDevice()) // demo_actuator.go
	sim, err := centralsim.New(centralsim.Options{
		Devices:     simDevices,
		Delegations: []centralsim.Delegation{{Device: "meter-shared", User: demoAccount, Kind: centralsim.KindReadWrite}},
		// The companion part reads the platform as a RootAdmin.
		Users:   companionUsers(),
		Clients: []centralsim.Client{companionPlatformClient(centralSecret)},
		// The realm admin enabled the device grant on Snap4City's IoT Edge
		// client (pair's default); a short poll interval keeps the demo quick.
		Pairing: centralsim.PairingOptions{ClientID: pairClientID, Interval: time.Second},
	})
	if err != nil {
		return fmt.Errorf("create simulated platform: %w", err)
	}
	if err := sim.Start("127.0.0.1:0"); err != nil {
		return fmt.Errorf("start simulated platform: %w", err)
	}
	defer sim.Close()
	out.printf("▶ simulated stock Snap4City at %s: Keycloak realm master, Orion Broker Filter + Orion 3.12, Ownership API, datamanager, IoT Directory", sim.URL())
	out.printf("  alice owns th-kitchen, th-garden, th-attic; bob owns meter-shared (delegated READ_WRITE to alice) and meter-bob (not delegated)")

	// 1. Pair as alice, as a user would: edgegate pair, approve the code.
	caFile := filepath.Join(work, "central-ca.pem")
	if err := os.WriteFile(caFile, sim.CACertPEM(), 0o644); err != nil {
		return err
	}
	cfgPath := filepath.Join(work, "edgegate.yaml")
	stateDir := filepath.Join(work, "state")
	if err := demoPair(ctx, bin, sim, cfgPath, stateDir, caFile, out); err != nil {
		return err
	}

	// 2. The gateway's registry: what the platform does not say. The radio
	// node's binding, and the delegated meter's type and keys (a
	// delegation carries neither).
	keysFile := filepath.Join(work, "meter-shared.keys")
	for _, d := range devices {
		if d.id == "meter-shared" {
			if err := os.WriteFile(keysFile, []byte("k1: "+d.k1+"\nk2: "+d.k2+"\n"), 0o600); err != nil {
				return err
			}
		}
	}
	binds := [][]string{
		{"bind", "--config", cfgPath, "--type", "TemperatureSensor", "--radio-port", link, "--radio-node", "1",
			"--attr", "temperature", "--attr", "humidity", "--attr", "batteryLevel", "th-attic"},
		{"bind", "--config", cfgPath, "--type", "PowerMeter", "--mqtt", "--k1-file", keysFile, "--attr", "power", "meter-shared"},
		demoRelayBind(cfgPath, link),
	}
	for _, b := range binds {
		var bout, berr testkit.Buffer
		if err := runEdgegate(ctx, bin, append([]string{"device"}, b...), &bout, &berr); err != nil {
			return fmt.Errorf("edgegate device %s: %w\n%s", strings.Join(b, " "), err, berr.String())
		}
		out.printf("▶ edgegate device bind %s", b[len(b)-1])
		for _, l := range strings.Split(strings.TrimSpace(bout.String()), "\n") {
			out.printf("  | %s", l)
		}
	}

	// 3. What the demo needs on top of pair's configuration: loopback
	// listeners on free ports, the radio link, quick retries, a JSON log
	// to follow, and the entity type of alice's own devices (stock
	// ownership rows carry none).
	if err := demoTuneConfig(cfgPath, link); err != nil {
		return err
	}

	// A MySensors serial gateway on a pseudo-terminal, with two nodes: node
	// 1 is bound to th-attic, node 2 asks for an id and stays unbound
	// (pending) — and some garbage on the line.
	rsim, err := radiosim.New(radiosim.Options{Link: link, Nodes: 2, FirstID: 1, AutoID: 1,
		Interval: 2 * time.Second, Garbage: true, Relay: true, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		return fmt.Errorf("start simulated radio: %w", err)
	}
	defer rsim.Close()
	radioCtx, stopRadio := context.WithCancel(context.Background())
	defer stopRadio()
	go func() { _ = rsim.Run(radioCtx) }()
	out.printf("▶ simulated MySensors radio gateway on %s (node 1 = th-attic, node 2 unbound)", link)

	interrupted := ctx // done only on Ctrl-C: then the outcomes are not judged
	if *seconds > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, time.Duration(*seconds)*time.Second)
		defer cancel()
	}
	cmd := exec.Command(bin, "run", "--config", cfgPath)
	logs, err := cmd.StderrPipe()
	if err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start daemon: %w", err)
	}
	exited := make(chan error, 1)
	stopDaemon := sync.OnceValue(func() error {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-exited:
			return err
		case <-time.After(30 * time.Second):
			_ = cmd.Process.Kill()
			return errors.New("did not stop within 30s of SIGTERM; killed")
		}
	})
	ready := make(chan string, 1)
	applied := make(chan string, 4)
	logDone := make(chan struct{})
	go func() {
		defer close(logDone)
		followDaemonLog(logs, filepath.Join(work, "daemon.log"), out, ready, applied)
		exited <- cmd.Wait()
	}()
	defer stopDaemon()
	var mqttAddr string
	select {
	case mqttAddr = <-ready:
	case <-time.After(30 * time.Second):
		return errors.New("daemon did not become ready within 30s; see its log above")
	case err := <-exited:
		return fmt.Errorf("daemon exited before it was ready: %v", err)
	case <-ctx.Done():
		return nil
	}
	out.printf("▶ edgegate daemon (pid %d) ready in stock mode (policy.source ownership-api), local MQTT broker on %s", cmd.Process.Pid, mqttAddr)
	select {
	case pol := <-applied:
		out.printf("▶ policy from the Ownership API and alice's delegations applied: %s", pol)
	case <-time.After(20 * time.Second):
		out.printf("  (no policy applied yet after 20s; devices will be refused until one is)")
	case <-ctx.Done():
	}
	out.printf("▶ MQTT devices: th-kitchen, th-garden (alice's), meter-shared (bob's, delegated), meter-bob (bob's, not delegated), rogue-7 (not registered)")
	if *seconds > 0 {
		out.printf("▶ running for %ds (DEMO_SECONDS); Ctrl-C stops earlier", *seconds)
	} else {
		out.printf("▶ running until Ctrl-C")
	}

	var wg sync.WaitGroup
	for _, d := range devices {
		if d.radioNode > 0 {
			continue // the radio simulator speaks for it
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			runDemoDevice(ctx, mqttAddr, d, out)
		}()
	}
	seen := 0
	tick := time.NewTicker(500 * time.Millisecond)
	for done := false; !done; {
		select {
		case <-ctx.Done():
			done = true
		case <-tick.C:
		}
		ups := sim.Updates()
		for _, u := range ups[seen:] {
			out.printf("  broker ← %-12s seq=%-4d %s  signature %s (gateway %s, as user %s)",
				u.Device, u.Seq, attrSummary(u.Attrs), u.Verdict, u.Gateway, u.User)
		}
		seen = len(ups)
	}
	tick.Stop()
	wg.Wait()
	var actuatorProblems []string
	if interrupted.Err() == nil {
		actx, acancel := context.WithTimeout(interrupted, 30*time.Second)
		actuatorProblems = demoActuator(actx, sim, rsim, out) // demo_actuator.go
		acancel()
	}
	stopRadio()

	// Let the queue drain what was acknowledged, then stop the daemon.
	drainUntil := time.Now().Add(5 * time.Second)
	for time.Now().Before(drainUntil) && delivered(sim) < acked(devices) {
		time.Sleep(100 * time.Millisecond)
	}
	out.printf("▶ stopping the daemon (SIGTERM)")
	werr := stopDaemon()
	<-logDone
	if werr != nil {
		out.printf("  daemon exited: %v", werr)
	} else {
		out.printf("  daemon stopped cleanly")
	}
	problems := append(demoSummary(out, sim, devices), actuatorProblems...)
	// The daemon is stopped: verify can open the gateway's store for its
	// token. A fresh context: the run's has ended.
	vctx, vcancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer vcancel()
	if err := demoVerify(vctx, bin, out, sim, devices, cfgPath, caFile, work); err != nil {
		return err
	}
	if interrupted.Err() == nil {
		// The real edgegate-central and a second gateway in bundle mode:
		// an ownership change pushed live (demo_companion.go).
		cctx, ccancel := context.WithTimeout(interrupted, 2*time.Minute)
		defer ccancel()
		res, err := runCompanionPart(cctx, bin, centralBin, sim, centralSecret, work, out)
		if err != nil {
			return fmt.Errorf("demo, companion part: %w", err)
		}
		out.mu.Lock()
		problems = append(problems, companionSummary(out.w, res)...)
		out.mu.Unlock()
	}
	if len(problems) > 0 && interrupted.Err() == nil {
		return fmt.Errorf("demo: not the expected outcome: %s (daemon log: %s)", strings.Join(problems, "; "), filepath.Join(work, "daemon.log"))
	}
	return nil
}

// demoPair runs `edgegate pair` in stock mode and approves its user code as
// alice, as she would in her browser.
func demoPair(ctx context.Context, bin string, sim *centralsim.Server, cfgPath, stateDir, caFile string, out *lineWriter) error {
	args := []string{"--central", sim.URL(), "--ca", caFile, "--config", cfgPath, "--state-dir", stateDir,
		"--store-key-file", filepath.Join(stateDir, "store.key"), "--gateway-id", "gw-demo-01",
		"--broker", centralsim.DefaultBrokerName, "--no-qr"}
	out.printf("▶ edgegate pair --central %s --broker %s (device grant; alice approves the code)", sim.URL(), centralsim.DefaultBrokerName)
	return pairApproving(ctx, bin, sim, args, out)
}

// pairApproving runs `edgegate pair ARGS` and approves its user code as
// alice, then shows pair's output up to its next steps.
func pairApproving(ctx context.Context, bin string, sim *centralsim.Server, args []string, out *lineWriter) error {
	var pout, perr testkit.Buffer
	done := make(chan error, 1)
	go func() { done <- runEdgegate(ctx, bin, append([]string{"pair"}, args...), &pout, &perr) }()
	approved := ""
	var err error
	deadline := time.After(60 * time.Second)
	for finished := false; !finished; {
		select {
		case err = <-done:
			finished = true
		case <-time.After(100 * time.Millisecond):
			if approved == "" {
				if codes := sim.PendingUserCodes(); len(codes) > 0 {
					approved = codes[0]
					if aerr := sim.ApproveDevice(codes[0], demoAccount); aerr != nil {
						return fmt.Errorf("approve the pairing code: %w", aerr)
					}
				}
			}
		case <-deadline:
			return fmt.Errorf("pair did not finish within 60s:\n%s", pout.String())
		}
	}
	if err != nil {
		return fmt.Errorf("edgegate pair: %w\n%s%s", err, pout.String(), perr.String())
	}
	// pair's own output, up to its "Next steps" (which the demo takes).
	for _, l := range strings.Split(strings.TrimSpace(pout.String()), "\n") {
		if strings.HasPrefix(l, "Next steps") {
			break
		}
		if l = strings.TrimRight(l, " "); l != "" {
			out.printf("  | %s", l)
		}
		if strings.HasPrefix(l, "Waiting for approval") && approved != "" {
			out.printf("  (alice signs in at the verification URL and approves code %s)", approved)
		}
	}
	return nil
}

// demoTuneConfig adds to the configuration pair wrote what the demo needs.
func demoTuneConfig(cfgPath, radioLink string) error {
	b, err := os.ReadFile(cfgPath)
	if err != nil {
		return err
	}
	var cfg map[string]any
	if err := yaml.Unmarshal(b, &cfg); err != nil {
		return fmt.Errorf("read %s: %w", cfgPath, err)
	}
	section := func(name string) map[string]any {
		m, ok := cfg[name].(map[string]any)
		if !ok {
			m = map[string]any{}
			cfg[name] = m
		}
		return m
	}
	mqtt := section("mqtt")
	emb, ok := mqtt["embedded"].(map[string]any)
	if !ok {
		emb = map[string]any{}
		mqtt["embedded"] = emb
	}
	emb["listen"] = "127.0.0.1:0"
	up := section("uplink")
	up["min_backoff"], up["max_backoff"] = "100ms", "2s"
	pol := section("policy")
	own, ok := pol["ownership"].(map[string]any)
	if !ok {
		return fmt.Errorf("%s: pair wrote no policy.ownership (not stock mode?)", cfgPath)
	}
	own["default_type"] = "TemperatureSensor"
	section("radio")["ports"] = []any{map[string]any{"path": radioLink, "codec": "mysensors"}}
	section("metrics")["listen"] = "127.0.0.1:0"
	section("log")["format"] = "json"
	// The downlink, for the actuator step (demo_actuator.go).
	cmds := section("commands")
	cmds["enabled"], cmds["poll_interval"] = true, "1s"
	nb, err := yaml.Marshal(cfg)
	if err != nil {
		return err
	}
	return os.WriteFile(cfgPath, nb, 0o600)
}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil {
		return v
	}
	return def
}

func uuidLike() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	h := hex.EncodeToString(b)
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

// followDaemonLog copies the daemon's JSON log to a file, reports the MQTT
// address once it is ready, and echoes warnings and errors compactly.
func followDaemonLog(r io.Reader, path string, out *lineWriter, ready, applied chan<- string) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		f = nil
	}
	defer func() {
		if f != nil {
			f.Close()
		}
	}()
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Bytes()
		if f != nil {
			_, _ = f.Write(append(line, '\n'))
		}
		var rec map[string]any
		if json.Unmarshal(line, &rec) != nil {
			out.printf("  daemon | %s", line)
			continue
		}
		msg, _ := rec["msg"].(string)
		level, _ := rec["level"].(string)
		if msg == "policy applied" {
			pol, _ := rec["policy"].(string)
			select {
			case applied <- pol:
			default:
			}
			continue
		}
		if msg == "edgegate ready" {
			addr, _ := rec["mqtt"].(string)
			select {
			case ready <- addr:
			default:
			}
			continue
		}
		if level == "WARN" || level == "ERROR" {
			var extra []string
			if msg == "audit" {
				continue // the same events are logged by the stages themselves
			}
			for _, k := range []string{"device", "port", "node", "reason", "who", "broker", "detail", "err"} {
				if v, ok := rec[k]; ok && v != "" {
					extra = append(extra, fmt.Sprintf("%s=%v", k, v))
				}
			}
			out.printf("  daemon | %s %s %s", level, msg, strings.Join(extra, " "))
		}
	}
}

func runDemoDevice(ctx context.Context, addr string, d *demoDevice, out *lineWriter) {
	// Devices log in with their id and the password derived from K1/K2.
	pw, _ := envelope.DeriveMQTTPassword(d.id, d.k1, d.k2)
	opts := paho.NewClientOptions().AddBroker("tcp://" + addr).SetClientID("demo-" + d.id).
		SetUsername(d.id).SetPassword(pw).
		SetConnectTimeout(5 * time.Second).SetAutoReconnect(true).SetCleanSession(false)
	c := paho.NewClient(opts)
	if t := c.Connect(); !t.WaitTimeout(10*time.Second) || t.Error() != nil {
		out.printf("  device %s: login refused by the gateway's broker (%v)", d.id, t.Error())
		d.loginRefused = true
		return
	}
	defer c.Disconnect(250)
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for i := 0; ; i++ {
		payload := map[string]any{}
		for j, a := range d.attrs {
			switch a {
			case "temperature":
				payload[a] = math.Round((20+3*math.Sin(float64(i)/5+float64(j)))*10) / 10
			case "humidity":
				payload[a] = map[string]any{"value": 40 + i%7, "type": "Number"}
			case "power":
				payload[a] = 230 + i%11
			}
		}
		payload["TimeInstant"] = time.Now().UTC().Format(time.RFC3339Nano)
		body, _ := json.Marshal(payload)
		t := c.Publish("devices/"+d.id+"/telemetry", 1, false, body)
		d.published++
		if t.WaitTimeout(10*time.Second) && t.Error() == nil {
			d.acks++
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

func attrSummary(attrs map[string]json.RawMessage) string {
	names := make([]string, 0, len(attrs))
	for n := range attrs {
		if n != envelope.DefaultSignatureAttr {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	var parts []string
	for _, n := range names {
		var a struct {
			Value any `json:"value"`
		}
		_ = json.Unmarshal(attrs[n], &a)
		parts = append(parts, fmt.Sprintf("%s=%v", n, a.Value))
	}
	return fmt.Sprintf("%-32s", strings.Join(parts, " "))
}

// delivered counts the validly signed, first-time updates at the broker.
func delivered(sim *centralsim.Server) int {
	n := 0
	for _, u := range sim.Updates() {
		if u.Verdict == centralsim.VerdictValid && !u.Duplicate {
			n++
		}
	}
	return n
}

// acked counts the readings the gateway acknowledged for devices it may
// write (the others it refuses at login).
func acked(devices []*demoDevice) int {
	n := 0
	for _, d := range devices {
		if d.rel == relOwned || d.rel == relDelegated {
			n += d.acks
		}
	}
	return n
}

// demoSummary prints the outcome per device and returns what differs from
// the expected one: every device the gateway may write delivered with
// valid signatures, every other refused at login.
func demoSummary(out *lineWriter, sim *centralsim.Server, devices []*demoDevice) (problems []string) {
	atBroker := map[string]int{}
	valid := map[string]int{}
	for _, u := range sim.Updates() {
		if u.Duplicate {
			continue
		}
		atBroker[u.Device]++
		if u.Verdict == centralsim.VerdictValid {
			valid[u.Device]++
		}
	}
	refused := map[string]int{}
	refusedWhy := map[string]string{}
	for _, r := range sim.Refusals() {
		if r.Device != "" && !r.Fault {
			refused[r.Device]++
			refusedWhy[r.Device] = fmt.Sprintf("%d %s", r.Status, r.Message)
		}
	}
	out.printf("")
	out.printf("Summary (gateway paired as %s, policy from the Ownership API and delegations)", demoAccount)
	tw := tabwriter.NewWriter(out.w, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "  device\towner\ton the platform\tpublished\tacked\tat broker\tvalid sig\toutcome")
	for _, d := range devices {
		outcome := "delivered, signed"
		switch {
		case d.rel == relUnknown && d.loginRefused:
			outcome = "refused by the gateway at login: not registered on the platform"
		case d.rel == relForeign && d.loginRefused:
			outcome = "refused by the gateway at login: neither alice's nor delegated to her"
		case d.rel == relUnknown || d.rel == relForeign:
			outcome = "NOT REFUSED: the gateway accepted its login"
		case refused[d.id] > 0 && atBroker[d.id] == 0:
			outcome = "refused by the broker filter (" + refusedWhy[d.id] + ")"
		case d.radioNode > 0 && atBroker[d.id] == 0:
			outcome = "nothing received from the radio"
		case atBroker[d.id] == 0:
			outcome = "nothing delivered"
		case valid[d.id] < atBroker[d.id]:
			outcome = "delivered, but some signatures did not verify"
		case d.radioNode > 0:
			outcome = "delivered, signed (radio → registry binding → broker)"
		case d.rel == relDelegated:
			outcome = "delivered, signed (bob's device, written under alice's delegation)"
		case atBroker[d.id] < d.acks:
			outcome = "partly delivered (still queued)"
		}
		switch {
		case (d.rel == relUnknown || d.rel == relForeign) && (!d.loginRefused || atBroker[d.id] > 0):
			problems = append(problems, d.id+" was not refused")
		case (d.rel == relOwned || d.rel == relDelegated) && atBroker[d.id] == 0:
			problems = append(problems, d.id+": nothing delivered")
		case valid[d.id] < atBroker[d.id]:
			problems = append(problems, fmt.Sprintf("%s: %d of %d signatures valid", d.id, valid[d.id], atBroker[d.id]))
		}
		if d.radioNode > 0 {
			fmt.Fprintf(tw, "  %s\t%s\t%s\t(radio node %d)\t-\t%d\t%d\t%s\n", d.id, d.owner, d.rel, d.radioNode, atBroker[d.id], valid[d.id], outcome)
			continue
		}
		fmt.Fprintf(tw, "  %s\t%s\t%s\t%d\t%d\t%d\t%d\t%s\n", d.id, d.owner, d.rel, d.published, d.acks, atBroker[d.id], valid[d.id], outcome)
	}
	tw.Flush()

	// What the broker answered, as stock Orion behind the filter would.
	byStatus := map[string]int{}
	for _, r := range sim.Refusals() {
		if !r.Fault {
			byStatus[fmt.Sprintf("%d %s", r.Status, logx.Clip(r.Message, 60))]++
		}
	}
	total := 0
	for _, n := range atBroker {
		total += n
	}
	line := fmt.Sprintf("  broker: %d updates accepted (PATCH through the Orion Broker Filter as %s)", total, demoAccount)
	if len(byStatus) == 0 {
		line += ", no refusal, no 422 PartialUpdate (every attribute is in the device models)"
	} else {
		keys := make([]string, 0, len(byStatus))
		for k := range byStatus {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			line += fmt.Sprintf("; %d× %s", byStatus[k], k)
		}
	}
	out.printf("%s", line)
	return problems
}

// demoVerify reads th-kitchen's entity back through the broker filter with
// the gateway's own token (edgegate verify --broker) and verifies every
// attribute's signature metadata with only the device's keys; then it
// changes one stored value and verifies again.
func demoVerify(ctx context.Context, bin string, out *lineWriter, sim *centralsim.Server, devices []*demoDevice, cfgPath, caFile, work string) error {
	var d *demoDevice
	for _, dd := range devices {
		if dd.id == "th-kitchen" {
			d = dd
		}
	}
	if d == nil {
		return nil
	}
	// The device's keys, as its owner holds them (a devices file, 0600).
	devFile := filepath.Join(work, "verify-devices.yaml")
	body := fmt.Sprintf("devices:\n  - id: %s\n    type: %s\n    k1: %s\n    k2: %s\n", d.id, d.typ, d.k1, d.k2)
	if err := os.WriteFile(devFile, []byte(body), 0o600); err != nil {
		return err
	}
	out.printf("")
	out.printf("▶ edgegate verify --broker %s --device %s --type %s --config edgegate.yaml --ca central-ca.pem --devices FILE", sim.BrokerURL(), d.id, d.typ)
	out.printf("  (the entity as GET through the broker filter returns it, with the gateway's token; the device's K1/K2 from FILE)")
	var vout, verr testkit.Buffer
	err := runEdgegate(ctx, bin, []string{"verify", "--broker", sim.BrokerURL(), "--device", d.id, "--type", d.typ, "--config", cfgPath,
		"--ca", caFile, "--devices", devFile}, &vout, &verr)
	printIndented(out, vout.String()+verr.String())
	if err != nil {
		out.printf("  verify failed: %v", err)
		return fmt.Errorf("verify %s at the broker: %w", d.id, err)
	}
	// The same entity, tampered as stored: someone with write access to
	// the broker changes a value; the signature metadata no longer matches.
	ent, ok := sim.Entity(d.id)
	if !ok {
		return fmt.Errorf("no entity %s at the broker", d.id)
	}
	t, ok := ent["temperature"]
	if !ok {
		return fmt.Errorf("entity %s has no temperature", d.id)
	}
	raw, err := json.Marshal(t)
	if err != nil {
		return err
	}
	var attr map[string]any
	if err := json.Unmarshal(raw, &attr); err != nil {
		return err
	}
	attr["value"] = 99.9
	ent["temperature"] = attr
	doc, err := json.Marshal(ent)
	if err != nil {
		return err
	}
	tampered := filepath.Join(work, "th-kitchen-tampered.json")
	if err := os.WriteFile(tampered, doc, 0o600); err != nil {
		return err
	}
	out.printf("▶ the same entity with temperature changed to 99.9 at the broker: edgegate verify --entity FILE --devices FILE")
	var tout, terr testkit.Buffer
	err = runEdgegate(ctx, bin, []string{"verify", "--entity", tampered, "--devices", devFile}, &tout, &terr)
	printIndented(out, tout.String()+terr.String())
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 1 {
		return fmt.Errorf("verify of the tampered entity: want exit status 1 (tampered), got %v", err)
	}
	out.printf("  (exit status 1: tampered, as expected)")
	return nil
}

func printIndented(out *lineWriter, text string) {
	for _, l := range strings.Split(strings.TrimRight(text, "\n"), "\n") {
		if l != "" {
			out.printf("  | %s", l)
		}
	}
}

// lineWriter serialises output lines from several goroutines.
type lineWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lineWriter) printf(format string, args ...any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	fmt.Fprintf(l.w, format+"\n", args...)
}
