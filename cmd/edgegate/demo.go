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

	"github.com/edgegate/edgegate/centralsim"
	"github.com/edgegate/edgegate/envelope"
	"github.com/edgegate/edgegate/policy"
	"github.com/edgegate/edgegate/radio"
)

// demoDevice is one simulated device of the demo.
type demoDevice struct {
	id, typ, owner  string
	registered      bool // known to the gateway
	radioNode       int  // > 0: a MySensors node on the demo's radio link
	loginRefused    bool
	revoked         bool // by central ops, mid-run
	k1, k2          string
	attrs           []string
	published, acks int
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

func runDemo(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("demo", flag.ContinueOnError)
	fs.SetOutput(stderr)
	seconds := fs.Int("seconds", envInt("DEMO_SECONDS", 30), "how long to run (0: until Ctrl-C)")
	dir := fs.String("dir", "", "working directory (default: a temporary one, removed at the end)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *seconds > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, time.Duration(*seconds)*time.Second)
		defer cancel()
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

	// The gateway runs under alice's account; bob's meter is registered at
	// the gateway but bob never delegated to alice, so the broker refuses it.
	devices := []*demoDevice{
		{id: "th-kitchen", typ: "TemperatureSensor", owner: "alice", registered: true, attrs: []string{"temperature", "humidity"}},
		{id: "th-garden", typ: "TemperatureSensor", owner: "alice", registered: true, attrs: []string{"temperature"}},
		{id: "meter-bob", typ: "PowerMeter", owner: "bob", registered: true, attrs: []string{"power"}},
		{id: "rogue-7", typ: "TemperatureSensor", owner: "mallory", registered: false, attrs: []string{"temperature"}},
		{id: "th-attic", typ: "TemperatureSensor", owner: "alice", registered: true, radioNode: 1},
	}
	// The radio link's path is part of th-attic's registration.
	link := filepath.Join(work, "ttyRADIO0")
	var simDevices []centralsim.Device
	for _, d := range devices {
		d.k1, d.k2 = uuidLike(), uuidLike()
		if d.registered {
			sd := centralsim.Device{ID: d.id, Type: d.typ, Owner: d.owner, K1: d.k1, K2: d.k2}
			if d.radioNode > 0 {
				sd.Radio = &policy.RadioBinding{Port: link, Node: d.radioNode, Child: -1}
			}
			simDevices = append(simDevices, sd)
		}
	}
	secret := randomHex(24)
	sim, err := centralsim.New(centralsim.Options{
		Clients:   []centralsim.Client{{ID: "edgegate-demo", Secret: secret, Username: "alice"}},
		Devices:   simDevices,
		CheckKeys: false,
		TokenTTL:  2 * time.Minute,
		// Central ops' side of the policy: signed bundles for this gateway
		// (every registered device, so that bob's meter shows the broker
		// filter's refusal), pushed over the central MQTT broker.
		Gateways:         map[string]string{"edgegate-demo": "gw-demo-01"},
		BundleAllDevices: true,
		MQTT:             true,
		Companion:        true, // bundles and push are the companion's, not stock Snap4City's
	})
	if err != nil {
		return fmt.Errorf("create simulated central: %w", err)
	}
	if err := sim.Start("127.0.0.1:0"); err != nil {
		return fmt.Errorf("start simulated central: %w", err)
	}
	defer sim.Close()
	out.printf("▶ simulated central service at %s (OIDC issuer %s)", sim.URL(), sim.Issuer())

	// A MySensors serial gateway on a pseudo-terminal, with two nodes: node
	// 1 is bound to th-attic, node 2 asks for an id and stays unbound
	// (pending) — and some garbage on the line.
	rsim, err := radio.NewSim(radio.SimOptions{Link: link, Nodes: 2, FirstID: 1, AutoID: 1,
		Interval: 2 * time.Second, Garbage: true, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		return fmt.Errorf("start simulated radio: %w", err)
	}
	defer rsim.Close()
	radioCtx, stopRadio := context.WithCancel(context.Background())
	defer stopRadio()
	go func() { _ = rsim.Run(radioCtx) }()
	out.printf("▶ simulated MySensors radio gateway on %s (node 1 = th-attic, node 2 unregistered)", link)

	cfgPath, err := writeDemoConfig(work, sim, secret, link)
	if err != nil {
		return err
	}
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	cmd := exec.Command(exe, "run", "--config", cfgPath)
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
	out.printf("▶ edgegate daemon (pid %d) ready, local MQTT broker on %s", cmd.Process.Pid, mqttAddr)
	select {
	case pol := <-applied:
		out.printf("▶ signed policy from central ops verified and applied: %s", pol)
	case <-time.After(20 * time.Second):
		out.printf("  (no policy applied yet after 20s; devices will be refused until one arrives)")
	case <-ctx.Done():
	}
	out.printf("▶ MQTT devices: th-kitchen, th-garden (alice's), meter-bob (bob's, not delegated to alice), rogue-7 (not registered)")
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
	revokeAt := time.Now().Add(15 * time.Second)
	if *seconds > 0 {
		revokeAt = time.Now().Add(time.Duration(*seconds) * time.Second * 6 / 10)
	}
	revoked := false
	for done := false; !done; {
		select {
		case <-ctx.Done():
			done = true
		case <-tick.C:
		}
		if !revoked && time.Now().After(revokeAt) {
			revoked = true
			out.printf("▶ central ops revoke th-garden and push the new signed policy to the gateway")
			sim.RemoveDevice("th-garden")
			if err := sim.Push("gw-demo-01", true); err != nil {
				out.printf("  push failed: %v", err)
			}
			for _, d := range devices {
				if d.id == "th-garden" {
					d.revoked = true
				}
			}
			select {
			case pol := <-applied:
				out.printf("  gateway applied %s; th-garden's session is closed and its logins refused", pol)
			case <-time.After(10 * time.Second):
				out.printf("  (the gateway has not applied the pushed policy within 10s)")
			}
		}
		ups := sim.Updates()
		for _, u := range ups[seen:] {
			out.printf("  broker ← %-10s seq=%-4d %s  signature %s (by gateway %s, as user %s)",
				u.Device, u.Seq, attrSummary(u.Attrs), u.Verdict, u.Gateway, u.User)
		}
		seen = len(ups)
	}
	tick.Stop()
	wg.Wait()
	stopRadio()

	// Let the queue drain what was acknowledged, then stop the daemon.
	drainUntil := time.Now().Add(5 * time.Second)
	for time.Now().Before(drainUntil) && delivered(sim, "alice") < acked(devices, "alice") {
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
	demoSummary(out, sim, devices)
	return nil
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

func writeDemoConfig(work string, sim *centralsim.Server, secret string, radioLink string) (string, error) {
	write := func(name, body string) (string, error) {
		p := filepath.Join(work, name)
		return p, os.WriteFile(p, []byte(body), 0o600)
	}
	if _, err := write("central-ca.pem", string(sim.CACertPEM())); err != nil {
		return "", err
	}
	if _, err := write("client-secret", secret+"\n"); err != nil {
		return "", err
	}
	// The keys central ops sign policies with, as pairing pins them.
	keys, err := json.Marshal(sim.PolicyKeys())
	if err != nil {
		return "", err
	}
	if _, err := write("policy-keys.json", string(keys)); err != nil {
		return "", err
	}
	cfg := fmt.Sprintf(`gateway:
  id: gw-demo-01
state_dir: state
mqtt:
  mode: embedded
  embedded:
    listen: 127.0.0.1:0
central:
  token_url: %s
  client_id: edgegate-demo
  client_secret_file: client-secret
  ca_file: central-ca.pem
uplink:
  ca_file: central-ca.pem
  min_backoff: 100ms
  max_backoff: 2s
policy:
  source: bundle
  central_url: %s
  keys_file: policy-keys.json
  poll_interval: 30s
  push_url: %s
radio:
  ports:
    - path: %s
      codec: mysensors
metrics:
  listen: 127.0.0.1:0
log:
  format: json
`, sim.TokenURL(), sim.URL(), sim.MQTTURL(), radioLink)
	return write("edgegate.yaml", cfg)
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

func delivered(sim *centralsim.Server, owner string) int {
	n := 0
	for _, u := range sim.Updates() {
		if u.User == owner && u.Verdict == "valid" && !u.Duplicate {
			n++
		}
	}
	return n
}

func acked(devices []*demoDevice, owner string) int {
	n := 0
	for _, d := range devices {
		if d.owner == owner {
			n += d.acks
		}
	}
	return n
}

func demoSummary(out *lineWriter, sim *centralsim.Server, devices []*demoDevice) {
	atBroker := map[string]int{}
	valid := map[string]int{}
	for _, u := range sim.Updates() {
		if u.Duplicate {
			continue
		}
		atBroker[u.Device]++
		if u.Verdict == "valid" {
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
	out.printf("Summary")
	tw := tabwriter.NewWriter(out.w, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "  device\towner\tpublished\tacked\tat broker\tvalid signature\toutcome")
	for _, d := range devices {
		outcome := "delivered, signed"
		switch {
		case d.revoked:
			outcome = "revoked by central ops mid-run (pushed policy): session closed, later readings refused"
		case !d.registered && d.loginRefused:
			outcome = "refused by the gateway at login: not registered"
		case !d.registered:
			outcome = "refused by the gateway: not registered"
		case refused[d.id] > 0:
			outcome = "refused by the broker filter (" + refusedWhy[d.id] + "): dead-lettered"
		case d.radioNode > 0 && atBroker[d.id] == 0:
			outcome = "nothing received from the radio yet"
		case d.radioNode > 0:
			outcome = "delivered, signed (radio → gateway → broker)"
		case atBroker[d.id] < d.acks:
			outcome = "partly delivered (still queued)"
		}
		if d.radioNode > 0 {
			fmt.Fprintf(tw, "  %s\t%s\t(radio node %d)\t-\t%d\t%d\t%s\n", d.id, d.owner, d.radioNode, atBroker[d.id], valid[d.id], outcome)
			continue
		}
		fmt.Fprintf(tw, "  %s\t%s\t%d\t%d\t%d\t%d\t%s\n", d.id, d.owner, d.published, d.acks, atBroker[d.id], valid[d.id], outcome)
	}
	tw.Flush()

	if rs := sim.Receipts(); len(rs) > 0 {
		r := rs[len(rs)-1]
		out.printf("  central holds %d signed receipt(s) from the gateway; the last: policy v%d applied, signature valid=%v, gateway key %s…",
			len(rs), r.PolicyVersion, r.Valid, clipID(r.Thumbprint))
	}

	// Prove the signature end to end: verify the stored entity with only the
	// device's keys, then tamper with it.
	for _, d := range devices {
		if d.id != "th-kitchen" {
			continue
		}
		ent, ok := sim.Entity(d.id)
		if !ok {
			out.printf("  (no entity stored for %s yet)", d.id)
			return
		}
		doc, _ := json.Marshal(ent)
		key, _ := envelope.DeriveHS256(d.id, d.k1, d.k2)
		if c, err := envelope.VerifyAttrs(doc, key, ""); err == nil {
			out.printf("  edgegate verify %s entity at the broker: valid (seq %d, gateway %s)", d.id, c.Seq, c.Gateway)
		} else {
			out.printf("  edgegate verify %s entity at the broker: %v", d.id, err)
		}
		if t, ok := ent["temperature"].(map[string]any); ok {
			t["value"] = 99.9
			doc, _ = json.Marshal(ent)
			_, err := envelope.VerifyAttrs(doc, key, "")
			out.printf("  same entity with temperature changed to 99.9: %v", err)
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

func clipID(s string) string {
	if len(s) > 12 {
		return s[:12]
	}
	return s
}
