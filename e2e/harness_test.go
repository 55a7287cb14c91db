// Package e2e drives the real edgegate binary end to end: a real daemon
// process, the simulated central service over HTTPS on 127.0.0.1, real MQTT
// clients (paho), the embedded broker and a real Mosquitto.
package e2e

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/edgegate/edgegate/internal/envelope"
	"github.com/edgegate/edgegate/internal/sim/centralsim"
	"github.com/edgegate/edgegate/internal/testkit"
)

var binary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "edgegate-e2e-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	// Readable by all: a test runs the CLI as an unprivileged user.
	_ = os.Chmod(dir, 0o755)
	binary = filepath.Join(dir, "edgegate")
	build := exec.Command("go", "build", "-o", binary, "../cmd/edgegate")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "build edgegate:", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// testDevice is a device registered both at the gateway and the central.
type testDevice struct {
	ID, Type, Owner, K1, K2 string
	// Broker, when set, is the broker the gateway sends the device's
	// readings to, instead of the sim's; RadioPort binds the device to a
	// JSON-lines radio port.
	Broker, RadioPort string
}

func dev(id, owner string) testDevice {
	return testDevice{ID: id, Type: "TemperatureSensor", Owner: owner, K1: "k1-canary-" + id, K2: "k2-canary-" + id}
}

const (
	gwClientID = "gw-test"
	gwSecret   = "secret-canary-5f2b9c"
)

// startSim starts the simulated central service; the gateway account acts
// as user "alice".
func startSim(t *testing.T, devices ...testDevice) *centralsim.Server {
	t.Helper()
	return startSimWith(t, nil, devices...)
}

// startSimWith is startSim with options changed by tune (nil: none).
func startSimWith(t *testing.T, tune func(*centralsim.Options), devices ...testDevice) *centralsim.Server {
	t.Helper()
	var ds []centralsim.Device
	for _, d := range devices {
		// The model declares what readingBody sends: stock Orion writes only
		// attributes the device's entity has.
		ds = append(ds, centralsim.Device{ID: d.ID, Type: d.Type, Owner: d.Owner, K1: d.K1, K2: d.K2, Attrs: []string{"n", "temperature"}})
	}
	o := centralsim.Options{
		Clients:  []centralsim.Client{{ID: gwClientID, Secret: gwSecret, Username: "alice"}},
		Devices:  ds,
		TokenTTL: time.Minute,
	}
	if tune != nil {
		tune(&o)
	}
	sim, err := centralsim.New(o)
	if err != nil {
		t.Fatal(err)
	}
	if err := sim.Start("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sim.Close() })
	return sim
}

// gatewayConfig is what a test varies in the daemon's configuration.
type gatewayConfig struct {
	MQTT  string // the mqtt: section; default embedded on 127.0.0.1:0
	Store string // the store: section
	Extra string // more top-level YAML
}

// writeGatewayConfig writes the config, secret, CA and devices into dir.
func writeGatewayConfig(t *testing.T, dir string, sim *centralsim.Server, gc gatewayConfig, devices ...testDevice) string {
	t.Helper()
	must := func(err error) {
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.WriteFile(filepath.Join(dir, "ca.pem"), sim.CACertPEM(), 0o600))
	must(os.WriteFile(filepath.Join(dir, "client-secret"), []byte(gwSecret+"\n"), 0o600))
	var b strings.Builder
	b.WriteString("devices:\n")
	for _, d := range devices {
		broker := d.Broker
		if broker == "" {
			broker = sim.BrokerURL()
		}
		fmt.Fprintf(&b, "  - id: %s\n    type: %s\n    owner: %s\n    k1: %s\n    k2: %s\n    broker: %s\n",
			d.ID, d.Type, d.Owner, d.K1, d.K2, broker)
		if d.RadioPort != "" {
			fmt.Fprintf(&b, "    radio:\n      port: %s\n", d.RadioPort)
		}
	}
	must(os.WriteFile(filepath.Join(dir, "devices.yaml"), []byte(b.String()), 0o600))
	mq := gc.MQTT
	if mq == "" {
		mq = "mqtt:\n  mode: embedded\n  embedded:\n    listen: 127.0.0.1:0\n"
	}
	store := gc.Store
	if store == "" {
		store = "store:\n  max_batch: 128\n"
	}
	cfg := fmt.Sprintf(`gateway:
  id: gw-e2e
state_dir: state
%s%s
central:
  token_url: %s
  client_id: %s
  client_secret_file: client-secret
  ca_file: ca.pem
uplink:
  ca_file: ca.pem
  min_backoff: 50ms
  max_backoff: 500ms
  request_timeout: 3s
devices_file: devices.yaml
metrics:
  listen: 127.0.0.1:0
log:
  format: json
  level: debug
%s`, store, mq, sim.TokenURL(), gwClientID, gc.Extra)
	p := filepath.Join(dir, "edgegate.yaml")
	must(os.WriteFile(p, []byte(cfg), 0o600))
	return p
}

// gateway is a running daemon process.
type gateway struct {
	t       *testing.T
	cmd     *exec.Cmd
	log     *syncBuffer
	done    chan struct{}
	waitErr error
	MQTT    string // embedded broker address, or the external URL
	Metrics string
	// MemoryLimit is the Go soft memory limit the daemon runs with.
	MemoryLimit string
}

type syncBuffer = testkit.Buffer

// startGateway runs `edgegate run` and waits for its ready line.
func startGateway(t *testing.T, cfgPath string) *gateway {
	t.Helper()
	cmd := exec.Command(binary, "run", "--config", cfgPath)
	cmd.Env = append(os.Environ(), "CREDENTIALS_DIRECTORY=")
	pr, pw := io.Pipe()
	g := &gateway{t: t, cmd: cmd, log: &syncBuffer{}, done: make(chan struct{})}
	cmd.Stderr = pw
	cmd.Stdout = g.log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	ready := make(chan map[string]any, 1)
	go func() {
		sc := bufio.NewScanner(pr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			line := sc.Bytes()
			g.log.Write(append(append([]byte(nil), line...), '\n'))
			var rec map[string]any
			if json.Unmarshal(line, &rec) == nil && rec["msg"] == "edgegate ready" {
				select {
				case ready <- rec:
				default:
				}
			}
		}
	}()
	go func() {
		g.waitErr = cmd.Wait()
		pw.Close()
		close(g.done)
	}()
	t.Cleanup(func() {
		g.kill()
		if t.Failed() {
			t.Logf("daemon log:\n%s", tail(g.log.String(), 60))
		}
	})
	select {
	case rec := <-ready:
		g.MQTT, _ = rec["mqtt"].(string)
		g.Metrics, _ = rec["metrics"].(string)
		g.MemoryLimit, _ = rec["memory_limit"].(string)
	case <-g.done:
		t.Fatalf("daemon exited before it was ready: %v\n%s", g.waitErr, g.log.String())
	case <-time.After(30 * time.Second):
		t.Fatalf("daemon not ready within 30s:\n%s", g.log.String())
	}
	return g
}

func tail(s string, n int) string {
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// kill sends SIGKILL and waits.
func (g *gateway) kill() {
	select {
	case <-g.done:
		return
	default:
	}
	_ = g.cmd.Process.Kill()
	<-g.done
}

// term sends SIGTERM and waits (bounded); it returns the exit error.
func (g *gateway) term() error {
	g.t.Helper()
	_ = g.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-g.done:
		return g.waitErr
	case <-time.After(40 * time.Second):
		g.t.Fatalf("daemon did not stop within 40s of SIGTERM:\n%s", tail(g.log.String(), 40))
		return nil
	}
}

// publisher is a device publishing readings with a counter attribute "n".
type publisher struct {
	t      *testing.T
	client paho.Client
	device string
}

// newPublisher connects device d with its credentials (username = device
// id, password derived from K1/K2).
func newPublisher(t *testing.T, brokerURL string, d testDevice, opts ...func(*paho.ClientOptions)) *publisher {
	t.Helper()
	c, err := connect(brokerURL, "pub-"+d.ID+fmt.Sprint(time.Now().UnixNano()), d.ID, devicePassword(t, d), opts...)
	if err != nil {
		t.Fatalf("connect %s to %s: %v", d.ID, brokerURL, err)
	}
	t.Cleanup(func() { c.Disconnect(100) })
	return &publisher{t: t, client: c, device: d.ID}
}

func devicePassword(t *testing.T, d testDevice) string {
	t.Helper()
	pw, err := envelope.DeriveMQTTPassword(d.ID, d.K1, d.K2)
	if err != nil {
		t.Fatal(err)
	}
	return pw
}

// connect opens an MQTT 3.1.1 session; the error says why it was refused.
func connect(brokerURL, clientID, user, password string, opts ...func(*paho.ClientOptions)) (paho.Client, error) {
	o := paho.NewClientOptions().AddBroker(brokerURL).SetClientID(clientID).SetUsername(user).SetPassword(password).
		SetConnectTimeout(5 * time.Second).SetAutoReconnect(false).SetWriteTimeout(5 * time.Second).
		SetProtocolVersion(4) // no silent fallback to MQTT 3.1 after a refusal
	for _, f := range opts {
		f(o)
	}
	c := paho.NewClient(o)
	tok := c.Connect()
	if !tok.WaitTimeout(10 * time.Second) {
		return nil, fmt.Errorf("connect timed out")
	}
	if err := tok.Error(); err != nil {
		return nil, err
	}
	return c, nil
}

// publish sends reading n with QoS 1 and reports whether it was acknowledged.
func (p *publisher) publish(n int) bool {
	tok := p.client.Publish("devices/"+p.device+"/telemetry", 1, false, readingBody(n))
	return tok.WaitTimeout(5*time.Second) && tok.Error() == nil
}

// readingBody is reading n of a device: its counter attribute "n" and a
// temperature.
func readingBody(n int) string {
	return fmt.Sprintf(`{"n": %d, "temperature": {"value": %d.5, "type": "Number"}}`, n, 20+n%10)
}

// waitLogin waits until device d can log in to the gateway's embedded
// broker: once the policy synced from the central admits it.
func waitLogin(t *testing.T, g *gateway, d testDevice) {
	t.Helper()
	testkit.Eventually(t, 20*time.Second, d.ID+" to log in with the synced policy", func() bool {
		c, err := connect("tcp://"+g.MQTT, "probe-"+d.ID, d.ID, devicePassword(t, d))
		if err != nil {
			return false
		}
		c.Disconnect(10)
		return true
	})
}

// delivered returns, per device, the set of counters n that reached the
// broker with a valid signature.
func delivered(sim *centralsim.Server) map[string]map[int]int {
	out := map[string]map[int]int{}
	for _, u := range sim.Updates() {
		n, ok := nOf(u)
		if u.Verdict != centralsim.VerdictValid || !ok {
			continue
		}
		if out[u.Device] == nil {
			out[u.Device] = map[int]int{}
		}
		out[u.Device][n]++
	}
	return out
}

// scrape returns the value of the metric line that starts with prefix.
func scrape(t *testing.T, addr, prefix string) string {
	t.Helper()
	c := &http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatalf("scrape metrics: %v", err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	for _, line := range strings.Split(string(body), "\n") {
		if strings.HasPrefix(line, prefix) {
			return strings.TrimSpace(strings.TrimPrefix(line, prefix))
		}
	}
	return ""
}
