package e2e

import (
	"encoding/json"
	"errors"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/edgegate/edgegate/internal/sim/centralsim"
	"github.com/edgegate/edgegate/internal/testkit"
)

// TestEmbeddedEndToEnd: MQTT in (embedded broker) → signed → queued → HTTPS
// to the broker filter; an unknown device is refused and never forwarded.
func TestEmbeddedEndToEnd(t *testing.T) {
	a, b := dev("th-a", "alice"), dev("th-b", "alice")
	sim := startSim(t, a, b)
	dir := t.TempDir()
	g := startGateway(t, writeGatewayConfig(t, dir, sim, gatewayConfig{}, a, b))
	if os.Getenv("GOMEMLIMIT") == "" && g.MemoryLimit != "40MiB" {
		t.Errorf("the daemon runs with memory limit %q, want the default 40MiB", g.MemoryLimit)
	}

	const n = 50
	pa := newPublisher(t, "tcp://"+g.MQTT, a)
	pb := newPublisher(t, "tcp://"+g.MQTT, b)
	for i := 1; i <= n; i++ {
		if !pa.publish(i) || !pb.publish(i) {
			t.Fatalf("reading %d not acknowledged", i)
		}
	}
	// An unregistered device cannot even log in to the embedded broker.
	for i := 1; i <= 3; i++ {
		if _, err := connect("tcp://"+g.MQTT, "rogue", "rogue-1", "guess"); err == nil {
			t.Fatal("an unregistered device logged in")
		}
	}
	testkit.Eventually(t, 20*time.Second, "all readings at the broker", func() bool {
		d := delivered(sim)
		return len(d[a.ID]) == n && len(d[b.ID]) == n
	})
	for _, u := range sim.Updates() {
		if u.Device == "rogue-1" {
			t.Fatalf("reading of an unregistered device reached the broker: %+v", u)
		}
		if u.Gateway != "gw-e2e" || u.User != "alice" {
			t.Errorf("update %+v: want gateway gw-e2e and user alice", u)
		}
	}
	// Per-device order: the gateway's seq follows the device's counter.
	var last = map[string]uint64{}
	for _, u := range sim.Updates() {
		if u.Seq <= last[u.Device] {
			t.Fatalf("device %s: seq %d after %d", u.Device, u.Seq, last[u.Device])
		}
		last[u.Device] = u.Seq
	}
	if got := scrape(t, g.Metrics, `edgegate_mqtt_access_denied_total{action="connect",reason="unknown_device"}`); got != "3" {
		t.Errorf("access denied{connect,unknown_device} = %q, want 3", got)
	}
	if !strings.Contains(g.log.String(), "rogue-1") {
		t.Errorf("the refusal of rogue-1 is not logged")
	}
	if err := g.term(); err != nil {
		t.Fatalf("daemon exit after SIGTERM = %v, want 0", err)
	}
	assertNoSecrets(t, g.log.String(), a, b)
}

// TestMosquittoEndToEnd: the same path through a real Mosquitto over TLS,
// with the daemon as a persistent-session paho client.
func TestMosquittoEndToEnd(t *testing.T) {
	mq := startMosquitto(t)
	a := dev("th-m", "alice")
	sim := startSim(t, a)
	dir := t.TempDir()
	mqttCfg := "mqtt:\n  mode: external\n  external:\n    url: " + mq.URL + "\n    client_id: edgegate-e2e\n    ca_file: " + mq.CAFile + "\n"
	g := startGateway(t, writeGatewayConfig(t, dir, sim, gatewayConfig{MQTT: mqttCfg}, a))
	testkit.Eventually(t, 15*time.Second, "the daemon to subscribe", func() bool {
		return strings.Contains(g.log.String(), "subscribed to the local broker")
	})
	const n = 40
	p := newPublisher(t, mq.URL, a, mq.tlsOpt)
	for i := 1; i <= n; i++ {
		if !p.publish(i) {
			t.Fatalf("reading %d not acknowledged by mosquitto", i)
		}
	}
	testkit.Eventually(t, 20*time.Second, "all readings at the broker", func() bool { return len(delivered(sim)[a.ID]) == n })

	// Readings published while the daemon is down stay in Mosquitto's
	// persistent session and arrive after it restarts.
	if err := g.term(); err != nil {
		t.Fatalf("SIGTERM exit = %v", err)
	}
	for i := n + 1; i <= n+20; i++ {
		if !p.publish(i) {
			t.Fatalf("reading %d not acknowledged by mosquitto", i)
		}
	}
	startGateway(t, filepath.Join(dir, "edgegate.yaml"))
	testkit.Eventually(t, 30*time.Second, "readings published while the daemon was down", func() bool {
		return len(delivered(sim)[a.ID]) == n+20
	})
	// mosquitto_sub as a plain subscriber sees the raw device traffic: the
	// local broker is the device's side (its ACLs are a later issue).
	out, err := exec.Command("mosquitto_pub", "-h", "127.0.0.1", "-p", mq.Port, "--cafile", mq.CAFile,
		"-t", "devices/th-m/telemetry", "-q", "1", "-m", `{"n": 1000, "temperature": 1}`).CombinedOutput()
	if err != nil {
		t.Fatalf("mosquitto_pub: %v: %s", err, out)
	}
	testkit.Eventually(t, 20*time.Second, "the mosquitto_pub reading", func() bool { return delivered(sim)[a.ID][1000] == 1 })
}

// TestSIGKILLLosesNoAckedReading kills the daemon mid-stream (SIGKILL, and
// SIGTERM in between), restarts it, and checks that every reading
// acknowledged to a device reached the broker.
func TestSIGKILLLosesNoAckedReading(t *testing.T) {
	devs := []testDevice{dev("k-1", "alice"), dev("k-2", "alice"), dev("k-3", "alice")}
	sim := startSim(t, devs...)
	// Slow the broker so a backlog builds up and the kill hits queued data.
	sim.SetFault(centralsim.Fault{Mode: centralsim.FaultSlow, Delay: 20 * time.Millisecond})
	dir := t.TempDir()
	cfg := writeGatewayConfig(t, dir, sim, gatewayConfig{}, devs...)

	var mu sync.Mutex
	acked := map[string]map[int]bool{}
	next := map[string]int{}
	const cycles = 3
	for cycle := 0; cycle < cycles; cycle++ {
		g := startGateway(t, cfg)
		var wg sync.WaitGroup
		stop := make(chan struct{})
		var sent atomic.Int64
		for _, d := range devs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				p := newPublisher(t, "tcp://"+g.MQTT, d)
				for {
					select {
					case <-stop:
						return
					default:
					}
					mu.Lock()
					next[d.ID]++
					i := next[d.ID]
					mu.Unlock()
					if !p.publish(i) {
						return // the daemon died under us
					}
					sent.Add(1)
					mu.Lock()
					if acked[d.ID] == nil {
						acked[d.ID] = map[int]bool{}
					}
					acked[d.ID][i] = true
					mu.Unlock()
				}
			}()
		}
		// Kill at a random point once some readings went through.
		target := int64(100 + rand.IntN(200))
		testkit.Eventually(t, 30*time.Second, "readings to flow", func() bool { return sent.Load() >= target })
		if cycle == 1 {
			if err := g.term(); err != nil {
				t.Fatalf("SIGTERM under load: exit %v, want 0", err)
			}
		} else {
			g.kill()
		}
		close(stop)
		wg.Wait()
	}
	sim.ClearFault()
	g := startGateway(t, cfg)
	total := 0
	for _, m := range acked {
		total += len(m)
	}
	testkit.Eventually(t, 60*time.Second, "every acknowledged reading at the broker", func() bool {
		d := delivered(sim)
		for dv, m := range acked {
			for i := range m {
				if d[dv][i] == 0 {
					return false
				}
			}
		}
		return true
	})
	t.Logf("%d acknowledged readings over %d SIGKILL/SIGTERM cycles, all delivered", total, cycles)
	// Nothing invented: every delivered reading was sent by its device.
	for dv, m := range delivered(sim) {
		for i := range m {
			if i < 1 || i > next[dv] {
				t.Errorf("device %s: reading %d delivered but never sent", dv, i)
			}
		}
	}
	if err := g.term(); err != nil {
		t.Fatalf("SIGTERM exit = %v", err)
	}
}

// TestBrokerOutageLosesNothing: the broker filter is down, then answers 503
// and transient 401s; the queue holds everything and drains on recovery.
func TestBrokerOutageLosesNothing(t *testing.T) {
	a := dev("out-1", "alice")
	sim := startSim(t, a)
	dir := t.TempDir()
	g := startGateway(t, writeGatewayConfig(t, dir, sim, gatewayConfig{}, a))
	p := newPublisher(t, "tcp://"+g.MQTT, a)

	sim.SetFault(centralsim.Fault{Mode: centralsim.FaultDown})
	for i := 1; i <= 30; i++ {
		if !p.publish(i) {
			t.Fatalf("reading %d not acknowledged during the outage", i)
		}
	}
	testkit.Eventually(t, 10*time.Second, "refused attempts while down", func() bool { return len(sim.Refusals()) >= 3 })
	sim.SetFault(centralsim.Fault{Mode: centralsim.FaultStatus, Status: 503, Count: 5})
	for i := 31; i <= 40; i++ {
		p.publish(i)
	}
	testkit.Eventually(t, 10*time.Second, "503s consumed", func() bool { return countStatus(sim, 503) >= 5 })
	sim.SetFault(centralsim.Fault{Mode: centralsim.FaultTransient401, Count: 5})
	testkit.Eventually(t, 30*time.Second, "all 40 readings after recovery", func() bool { return len(delivered(sim)[a.ID]) == 40 })
	if dups := duplicates(sim, a.ID); dups > 0 {
		t.Logf("%d duplicates (allowed: at-least-once)", dups)
	}
	if got := scrape(t, g.Metrics, `edgegate_readings_dead_lettered_total`); got != "" && got != "0" {
		t.Errorf("transient failures dead-lettered readings: %s", got)
	}
}

func countStatus(sim *centralsim.Server, status int) int {
	n := 0
	for _, r := range sim.Refusals() {
		if r.Status == status {
			n++
		}
	}
	return n
}

func duplicates(sim *centralsim.Server, device string) int {
	n := 0
	for _, c := range delivered(sim)[device] {
		n += c - 1
	}
	return n
}

// TestVerifyCommand: `edgegate verify` says valid, tampered or wrong key for
// an entity read back from the broker.
func TestVerifyCommand(t *testing.T) {
	a := dev("v-1", "alice")
	sim := startSim(t, a)
	dir := t.TempDir()
	g := startGateway(t, writeGatewayConfig(t, dir, sim, gatewayConfig{}, a))
	p := newPublisher(t, "tcp://"+g.MQTT, a)
	if !p.publish(7) {
		t.Fatal("not acknowledged")
	}
	testkit.Eventually(t, 15*time.Second, "the reading at the broker", func() bool { return len(delivered(sim)[a.ID]) == 1 })
	ent, ok := sim.Entity(a.ID)
	if !ok {
		t.Fatal("no entity at the broker")
	}
	write := func(name string, v any) string {
		b, _ := json.Marshal(v)
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	good := write("entity.json", ent)
	tamperedEnt := map[string]any{}
	for k, v := range ent {
		tamperedEnt[k] = v
	}
	// Tampering keeps the attribute's signature metadata (the gateway signs
	// every attribute in its metadata) and changes only the value.
	nAttr, ok := ent["n"].(map[string]any)
	if !ok {
		t.Fatalf("entity attribute n is %T, not an NGSI attribute", ent["n"])
	}
	tn := map[string]any{}
	for k, v := range nAttr {
		tn[k] = v
	}
	tn["value"] = 8
	tamperedEnt["n"] = tn
	bad := write("tampered.json", tamperedEnt)
	otherKeys := filepath.Join(dir, "other-devices.yaml")
	os.WriteFile(otherKeys, []byte("devices:\n  - id: v-1\n    type: T\n    owner: x\n    k1: other\n    k2: keys\n    broker: https://x\n"), 0o600)

	tests := []struct {
		name, input, devices string
		code                 int
		want                 string
	}{
		// An entity is verified attribute by attribute: one line each, then
		// a summary (the model's other attributes, never written by the
		// gateway, are unsigned).
		{"valid", good, "devices.yaml", 0, "entity v-1 (TemperatureSensor): 2 verified"},
		{"tampered", bad, "devices.yaml", 1, "1 tampered"},
		{"wrong key", good, otherKeys, 1, "2 wrong key"},
	}
	lines := map[string][]*regexp.Regexp{
		"valid": {
			regexp.MustCompile(`(?m)^n +verified +seq 1 +observed \S+ +gateway gw-e2e$`),
			regexp.MustCompile(`(?m)^temperature +verified +seq 1 +observed \S+ +gateway gw-e2e$`),
		},
		"tampered": {
			regexp.MustCompile(`(?m)^n +tampered .*value other than the signed one`),
			regexp.MustCompile(`(?m)^temperature +verified +seq 1 `),
		},
		"wrong key": {
			regexp.MustCompile(`(?m)^n +wrong_key .*signed with a different key`),
			regexp.MustCompile(`(?m)^temperature +wrong_key `),
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			devices := tt.devices
			if !filepath.IsAbs(devices) {
				devices = filepath.Join(dir, devices)
			}
			cmd := exec.Command(binary, "verify", "--devices", devices, tt.input)
			out, err := cmd.CombinedOutput()
			code := 0
			var ee *exec.ExitError
			if errors.As(err, &ee) {
				code = ee.ExitCode()
			}
			if code != tt.code || !strings.Contains(string(out), tt.want) {
				t.Fatalf("verify %s: exit %d, output %q; want exit %d and %q", tt.name, code, out, tt.code, tt.want)
			}
			for _, re := range lines[tt.name] {
				if !re.Match(out) {
					t.Errorf("verify %s: output %q has no line matching %s", tt.name, out, re)
				}
			}
			assertNoSecrets(t, string(out), a)
		})
	}
}

// TestBadConfigNamesKey: the daemon refuses a bad configuration with an
// error that names the key and the value, and exits 2.
func TestBadConfigNamesKey(t *testing.T) {
	dir := t.TempDir()
	tests := []struct{ name, body, want string }{
		{"unknown key", "state_dir: s\nuplink:\n  concurency: 2\n", "uplink.concurency is not a known key (did you mean concurrency?)"},
		{"bad value", "state_dir: s\nmqtt:\n  mode: cloud\n", `mqtt.mode must be embedded or external: "cloud"`},
		{"bad duration", "state_dir: s\nuplink:\n  max_backoff: 5 minutes\n", `uplink.max_backoff has a bad value`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := filepath.Join(dir, strings.ReplaceAll(tt.name, " ", "-")+".yaml")
			if err := os.WriteFile(p, []byte(tt.body), 0o600); err != nil {
				t.Fatal(err)
			}
			out, err := exec.Command(binary, "run", "--config", p).CombinedOutput()
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.ExitCode() != 2 {
				t.Fatalf("run with %s: err %v, want exit 2; output %s", tt.name, err, out)
			}
			if !strings.Contains(string(out), tt.want) {
				t.Fatalf("run with %s: output %q, want %q", tt.name, out, tt.want)
			}
		})
	}
	// The template loads back through the binary.
	tpl, err := exec.Command(binary, "config", "template").Output()
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, "template.yaml")
	os.WriteFile(p, tpl, 0o640)
	out, err := exec.Command(binary, "config", "check", "--config", p).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "valid") {
		t.Fatalf("config check of the template: %v: %s", err, out)
	}
}

// assertNoSecrets fails if a device key or the client secret appears in s.
func assertNoSecrets(t *testing.T, s string, devs ...testDevice) {
	t.Helper()
	secrets := []string{gwSecret}
	for _, d := range devs {
		secrets = append(secrets, d.K1, d.K2)
	}
	for _, sec := range secrets {
		if strings.Contains(s, sec) {
			t.Fatalf("a secret appears in the output")
		}
	}
}

// TestQuotaHoldsReadingsUnacknowledged: over the disk quota the daemon does
// not acknowledge a reading, so the device keeps it; once space returns
// (here: a restart with a larger quota) the device's resend is delivered.
func TestQuotaHoldsReadingsUnacknowledged(t *testing.T) {
	a := dev("q-1", "alice")
	sim := startSim(t, a)
	dir := t.TempDir()
	port := freePort(t)
	mq := "mqtt:\n  mode: embedded\n  embedded:\n    listen: 127.0.0.1:" + port + "\n"
	cfg := writeGatewayConfig(t, dir, sim, gatewayConfig{MQTT: mq, Store: "store:\n  quota: 1\n"}, a)
	g := startGateway(t, cfg)

	p := newPublisher(t, "tcp://"+g.MQTT, a, func(o *paho.ClientOptions) {
		o.SetClientID("quota-device").SetCleanSession(false).SetAutoReconnect(true).
			SetConnectRetry(true).SetConnectRetryInterval(200 * time.Millisecond).SetMaxReconnectInterval(time.Second)
	})
	tok := p.client.Publish("devices/q-1/telemetry", 1, false, `{"n": 1, "temperature": 20}`)
	if tok.WaitTimeout(2 * time.Second) {
		t.Fatalf("reading acknowledged over quota (err %v); it must be held", tok.Error())
	}
	testkit.Eventually(t, 10*time.Second, "the quota refusal to be counted", func() bool {
		v := scrape(t, g.Metrics, `edgegate_readings_refused_total{reason="quota"}`)
		return v != "" && v != "0"
	})
	if len(sim.Updates()) != 0 {
		t.Fatal("a reading over quota reached the broker")
	}
	if err := g.term(); err != nil {
		t.Fatalf("SIGTERM exit = %v", err)
	}
	writeGatewayConfig(t, dir, sim, gatewayConfig{MQTT: mq, Store: "store:\n  quota: 64MiB\n"}, a)
	startGateway(t, cfg)
	if !tok.WaitTimeout(20*time.Second) || tok.Error() != nil {
		t.Fatalf("the device's resend was not acknowledged after space returned: %v", tok.Error())
	}
	testkit.Eventually(t, 20*time.Second, "the held reading at the broker", func() bool { return delivered(sim)[a.ID][1] == 1 })
}

// TestMosquittoACLExample runs Mosquitto with the README's ACL example
// (packaging/mosquitto/edgegate.acl) and password logins: the gateway reads
// every device; a device publishes only its own readings; an application
// user reads only what the ACL lists.
func TestMosquittoACLExample(t *testing.T) {
	if _, err := exec.LookPath("mosquitto_passwd"); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("mosquitto_passwd missing; .ci/run installs mosquitto")
		}
		t.Skip("mosquitto not installed")
	}
	kitchen, other := dev("th-kitchen", "alice"), dev("th-other", "alice")
	dir := t.TempDir()
	passwd := filepath.Join(dir, "edgegate.passwd")
	users := map[string]string{"edgegate": "gateway-canary-pw", "alice": "alice-pw",
		kitchen.ID: devicePassword(t, kitchen), other.ID: devicePassword(t, other)}
	for u, p := range users {
		args := []string{"-b", passwd, u, p}
		if _, err := os.Stat(passwd); err != nil {
			args = append([]string{"-c"}, args...)
		}
		if out, err := exec.Command("mosquitto_passwd", args...).CombinedOutput(); err != nil {
			t.Fatalf("mosquitto_passwd: %v %s", err, out)
		}
	}
	acl, err := os.ReadFile("../packaging/mosquitto/edgegate.acl")
	if err != nil {
		t.Fatal(err)
	}
	aclFile := filepath.Join(dir, "edgegate.acl")
	os.WriteFile(aclFile, acl, 0o600)
	mq := startMosquitto(t, "allow_anonymous false", "password_file "+passwd, "acl_file "+aclFile)

	sim := startSim(t, kitchen, other)
	gwDir := t.TempDir()
	os.WriteFile(filepath.Join(gwDir, "mqtt-password"), []byte(users["edgegate"]), 0o600)
	mqttCfg := "mqtt:\n  mode: external\n  external:\n    url: " + mq.URL + "\n    client_id: edgegate-acl\n    username: edgegate\n    password_file: mqtt-password\n    ca_file: " + mq.CAFile + "\n"
	g := startGateway(t, writeGatewayConfig(t, gwDir, sim, gatewayConfig{MQTT: mqttCfg}, kitchen, other))
	testkit.Eventually(t, 15*time.Second, "the daemon to subscribe", func() bool {
		return strings.Contains(g.log.String(), "subscribed to the local broker")
	})
	alice, err := connect(mq.URL, "alice-app", "alice", users["alice"], mq.tlsOpt)
	if err != nil {
		t.Fatal(err)
	}
	defer alice.Disconnect(50)
	var mu sync.Mutex
	seen := map[string]int{}
	alice.Subscribe("devices/+/telemetry", 1, func(_ paho.Client, m paho.Message) {
		mu.Lock()
		seen[m.Topic()]++
		mu.Unlock()
	}).WaitTimeout(5 * time.Second)

	pk := newPublisher(t, mq.URL, kitchen, mq.tlsOpt)
	po := newPublisher(t, mq.URL, other, mq.tlsOpt)
	// th-kitchen tries to publish as th-other: Mosquitto drops it.
	pk.client.Publish("devices/th-other/telemetry", 1, false, `{"n": 666, "temperature": 1}`).WaitTimeout(5 * time.Second)
	for i := 1; i <= 5; i++ {
		if !pk.publish(i) || !po.publish(i) {
			t.Fatalf("reading %d not acknowledged", i)
		}
	}
	testkit.Eventually(t, 20*time.Second, "both devices' readings through the gateway", func() bool {
		d := delivered(sim)
		return len(d[kitchen.ID]) == 5 && len(d[other.ID]) == 5
	})
	if delivered(sim)[other.ID][666] != 0 {
		t.Fatal("a reading forged by another device went through")
	}
	mu.Lock()
	defer mu.Unlock()
	if seen["devices/th-kitchen/telemetry"] != 5 || seen["devices/th-other/telemetry"] != 0 {
		t.Fatalf("alice's application saw %v; want th-kitchen's 5 readings and none of th-other", seen)
	}
	assertNoSecrets(t, g.log.String(), kitchen, other)
	if strings.Contains(g.log.String(), users["edgegate"]) {
		t.Fatal("the gateway's MQTT password reached the log")
	}
}

// TestReloadOnSIGHUP: a new device in the devices file takes effect on
// SIGHUP without a restart (nothing in flight lost); a broken file is
// refused and the running configuration kept.
func TestReloadOnSIGHUP(t *testing.T) {
	a, b := dev("r-1", "alice"), dev("r-2", "alice")
	sim := startSim(t, a, b)
	dir := t.TempDir()
	cfg := writeGatewayConfig(t, dir, sim, gatewayConfig{}, a)
	g := startGateway(t, cfg)
	pa := newPublisher(t, "tcp://"+g.MQTT, a)
	if _, err := connect("tcp://"+g.MQTT, "b-early", b.ID, devicePassword(t, b)); err == nil {
		t.Fatal("b logged in before it was registered")
	}
	for i := 1; i <= 20; i++ {
		if !pa.publish(i) {
			t.Fatal("not acknowledged")
		}
	}
	writeGatewayConfig(t, dir, sim, gatewayConfig{}, a, b)
	if err := g.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, 10*time.Second, "the reload", func() bool { return strings.Contains(g.log.String(), "configuration reloaded") })
	pb := newPublisher(t, "tcp://"+g.MQTT, b)
	if !pb.publish(1) || !pa.publish(21) {
		t.Fatal("not acknowledged after the reload")
	}
	// A broken file is refused; the daemon keeps running with the old one.
	os.WriteFile(cfg, []byte("state_dir: s\nmqtt:\n  mode: nonsense\n"), 0o600)
	g.cmd.Process.Signal(syscall.SIGHUP)
	testkit.Eventually(t, 10*time.Second, "the refused reload", func() bool {
		return strings.Contains(g.log.String(), "configuration reload refused")
	})
	if !pa.publish(22) || !pb.publish(2) {
		t.Fatal("not acknowledged after a refused reload")
	}
	testkit.Eventually(t, 20*time.Second, "every reading once", func() bool {
		d := delivered(sim)
		return len(d[a.ID]) == 22 && len(d[b.ID]) == 2
	})
	if dups := duplicates(sim, a.ID); dups != 0 {
		t.Errorf("%d duplicates across reloads", dups)
	}
}
