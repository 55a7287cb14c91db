package command_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/edgegate/edgegate/internal/accesstoken"
	"github.com/edgegate/edgegate/internal/command"
	"github.com/edgegate/edgegate/internal/envelope"
	"github.com/edgegate/edgegate/internal/pipeline"
	"github.com/edgegate/edgegate/internal/queue"
	"github.com/edgegate/edgegate/internal/sim/centralsim"
	"github.com/edgegate/edgegate/internal/sim/radiosim"
	"github.com/edgegate/edgegate/internal/testkit"
	"github.com/edgegate/edgegate/internal/uplink"
	"github.com/edgegate/edgegate/mqtt"
	"github.com/edgegate/edgegate/policy"
	"github.com/edgegate/edgegate/radio"
	"github.com/edgegate/edgegate/radio/modbus"
)

// The harness is the gateway's downlink with every real part around it:
// the simulated stock platform (Keycloak tokens, the Orion Broker Filter
// in front of Orion, over TLS), the encrypted badger store, the pipeline
// and the uplink that write confirmations back, the embedded MQTT broker
// with paho clients as devices, and a MySensors serial gateway with a
// relay node on a pseudo-terminal. Only the gateway's token source is a
// shortcut: it asks the simulator to issue the account's access token
// (the filter verifies it like any Keycloak token).

const (
	owner   = "alice"
	foreign = "mallory"
	gwID    = "gw-cmd-test"
	relayID = "relay-1"
	lightID = "light-1"
	light2  = "light-2"
	coilID  = "coil-1"    // behind the Modbus link (an AttrWriter)
	bobsID  = "valve-bob" // bob's, not delegated: the filter refuses the gateway's reads
)

var devKeys = map[string][2]string{
	relayID: {"relay-k1-0123456789", "relay-k2-0123456789"},
	lightID: {"light-k1-0123456789", "light-k2-0123456789"},
	light2:  {"light2-k1-012345678", "light2-k2-012345678"},
	coilID:  {"coil-k1-0123456789", "coil-k2-0123456789"},
	bobsID:  {"valve-k1-012345678", "valve-k2-012345678"},
}

type simTokens struct {
	sim  *centralsim.Server
	user string
}

func (s simTokens) Token(context.Context) (string, error) {
	return s.sim.IssueAccessToken(s.user, 5*time.Minute)
}
func (simTokens) Invalidate(string) {}

// link is a TCP proxy between the gateway and the platform that a test
// can cut: the gateway's own uplink outage (the platform stays up for the
// IoT App).
type link struct {
	ln     net.Listener
	target string
	mu     sync.Mutex
	down   bool
	conns  []net.Conn
	wg     sync.WaitGroup
}

func newLink(t *testing.T, target string) *link {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l := &link{ln: ln, target: target}
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			l.mu.Lock()
			if l.down {
				l.mu.Unlock()
				c.Close()
				continue
			}
			l.mu.Unlock()
			up, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			l.mu.Lock()
			l.conns = append(l.conns, c, up)
			l.mu.Unlock()
			l.wg.Add(2)
			go func() { defer l.wg.Done(); _, _ = io.Copy(up, c); up.Close() }()
			go func() { defer l.wg.Done(); _, _ = io.Copy(c, up); c.Close() }()
		}
	}()
	t.Cleanup(func() { ln.Close(); l.set(true); l.wg.Wait() })
	return l
}

// set cuts (down) or restores the link; cutting closes every open
// connection.
func (l *link) set(down bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.down = down
	if down {
		for _, c := range l.conns {
			c.Close()
		}
		l.conns = nil
	}
}

type env struct {
	t      *testing.T
	ctx    context.Context
	sim    *centralsim.Server
	link   *link
	engine *policy.Engine
	q      *queue.Queue
	pipe   *pipeline.Pipeline
	broker *mqtt.Broker
	radio  *radio.Manager
	rsim   *radiosim.Sim
	port   string
	svc    *command.Service
	stop   func() // stops the command service
	ttl    time.Duration
	bus    *testkit.Buffer
	regs   []policy.Registration
	coils  *coils
	// submitFails: see envOpt.
	submitFails int
	// route, when set, replaces the service's Route (an external broker's
	// link, links_mosquitto_test.go).
	route func(*policy.Device) command.Deliverer
}

// coils is the real Modbus master (radio/modbus) on a pseudo-terminal,
// with a simulated slave (unit 1) whose coil 0 is the coil device's "on".
type coils struct {
	sim *radiosim.ModbusSim
	ms  *modbus.Master
}

func newCoils(t *testing.T) *coils {
	t.Helper()
	sim, err := radiosim.NewModbus(radiosim.ModbusOptions{Link: filepath.Join(t.TempDir(), "ttyRS485")})
	if err != nil {
		t.Fatal(err)
	}
	sim.Unit(1).SetCoils(0, false)
	ctx, cancel := context.WithCancel(context.Background())
	simDone := make(chan struct{})
	go func() { sim.Run(ctx); close(simDone) }()
	ms, err := modbus.New([]modbus.LineConfig{{Path: sim.Link(), Baud: 115200, Devices: []modbus.DeviceConfig{{Device: coilID, Unit: 1,
		Period: time.Hour, Timeout: time.Second, Registers: []modbus.Register{
			{Attr: "on", Table: modbus.TableCoil, Addr: 0, Writable: true},
		}}}}}, discardReadings{}, modbus.Options{})
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	msDone := make(chan struct{})
	go func() { _ = ms.Run(ctx); close(msDone) }()
	t.Cleanup(func() { cancel(); <-msDone; <-simDone })
	return &coils{sim: sim, ms: ms}
}

// discardReadings takes the master's polled readings (not under test here).
type discardReadings struct{}

func (discardReadings) Submit(context.Context, pipeline.Message) (pipeline.Outcome, error) {
	return pipeline.Queued, nil
}

// writes is how many writes the slave applied, and its coil now.
func (c *coils) writes() (int, bool) { return c.sim.Stats().Writes[1], c.sim.Unit(1).Coil(0) }

// envOpt changes the harness: the radio simulator's options, local control.
type envOpt struct {
	radio func(*radiosim.Options)
	local bool
	// submitFails makes the first n write-backs fail, as a full store does
	// (queue.ErrQuota).
	submitFails int
}

type flakySubmit struct {
	next  command.Submitter
	mu    sync.Mutex
	fails int
}

func (f *flakySubmit) Submit(ctx context.Context, m pipeline.Message) (pipeline.Outcome, error) {
	f.mu.Lock()
	fail := f.fails > 0
	if fail {
		f.fails--
	}
	f.mu.Unlock()
	if fail {
		return 0, fmt.Errorf("append: %w", queue.ErrQuota)
	}
	return f.next.Submit(ctx, m)
}

// policyWithout is the env's policy without the device id (as a policy
// that no longer lists it).
func (e *env) policyWithout(t *testing.T, id string) *policy.Policy {
	t.Helper()
	var regs []policy.Registration
	for _, r := range e.regs {
		if r.ID != id {
			regs = append(regs, r)
		}
	}
	pol, err := policy.New(1, "config", regs)
	if err != nil {
		t.Fatal(err)
	}
	return pol
}

func newEnv(t *testing.T, ttl time.Duration, opts ...envOpt) *env {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	e := &env{t: t, ctx: ctx, ttl: ttl, bus: &testkit.Buffer{}, coils: newCoils(t)}
	sim, err := centralsim.New(centralsim.Options{
		Users: []centralsim.User{{Username: owner}, {Username: foreign}},
		Devices: []centralsim.Device{
			{ID: relayID, Type: "Relay", Owner: owner, K1: devKeys[relayID][0], K2: devKeys[relayID][1], Attrs: []string{"status"}},
			{ID: lightID, Type: "Light", Owner: owner, K1: devKeys[lightID][0], K2: devKeys[lightID][1], Attrs: []string{"power"}},
			{ID: light2, Type: "Light", Owner: owner, K1: devKeys[light2][0], K2: devKeys[light2][1], Attrs: []string{"power"}},
			{ID: coilID, Type: "Coil", Owner: owner, K1: devKeys[coilID][0], K2: devKeys[coilID][1], Attrs: []string{"on"}},
			{ID: bobsID, Type: "Valve", Owner: "bob", K1: devKeys[bobsID][0], K2: devKeys[bobsID][1], Attrs: []string{"open"}},
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := sim.Start("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sim.Close() })
	e.sim = sim
	host := strings.TrimPrefix(sim.URL(), "https://")
	e.link = newLink(t, host)
	brokerURL := "https://" + e.link.ln.Addr().String() + "/orion-filter/" + centralsim.DefaultBrokerName

	e.port = filepath.Join(t.TempDir(), "ttyRADIO0")
	ro := radiosim.Options{Link: e.port, Nodes: 1, FirstID: 1, AutoID: -1, Silent: true, HearController: true, Relay: true}
	for _, o := range opts {
		if o.radio != nil {
			o.radio(&ro)
		}
	}
	rs, err := radiosim.New(ro)
	if err != nil {
		t.Fatal(err)
	}
	e.rsim = rs
	rsDone := make(chan struct{})
	go func() { defer close(rsDone); _ = rs.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-rsDone })

	regs := []policy.Registration{
		{ID: relayID, Type: "Relay", Owner: owner, Broker: brokerURL, K1: devKeys[relayID][0], K2: devKeys[relayID][1],
			Kind: policy.KindActuator, Radio: &policy.RadioBinding{Port: e.port, Node: 1, Child: radiosim.RelayChild}},
		{ID: lightID, Type: "Light", Owner: owner, Broker: brokerURL, K1: devKeys[lightID][0], K2: devKeys[lightID][1],
			Kind: policy.KindActuator},
		{ID: light2, Type: "Light", Owner: owner, Broker: brokerURL, K1: devKeys[light2][0], K2: devKeys[light2][1],
			Kind: policy.KindActuator},
		{ID: coilID, Type: "Coil", Owner: owner, Broker: brokerURL, K1: devKeys[coilID][0], K2: devKeys[coilID][1],
			Kind: policy.KindSensor, Writable: []string{"on"}},
		{ID: bobsID, Type: "Valve", Owner: "bob", Broker: brokerURL, K1: devKeys[bobsID][0], K2: devKeys[bobsID][1],
			Kind: policy.KindActuator},
	}
	pol, err := policy.New(0, "config", regs)
	if err != nil {
		t.Fatal(err)
	}
	e.engine = policy.NewEngine(pol)
	e.regs = regs
	// As the daemon does (components.go openCommands).
	e.engine.OnChange(func(ch policy.Change) {
		gone := append(append([]string(nil), ch.Revoked...), ch.Rebound...)
		e.svc.Forget(gone)
		e.broker.PurgeCommands(gone)
	})
	q, err := queue.Open(queue.Options{Dir: t.TempDir(), Key: bytes.Repeat([]byte{9}, 32)})
	if err != nil {
		t.Fatal(err)
	}
	e.q = q
	qctx, qcancel := context.WithCancel(context.Background())
	qDone := make(chan struct{})
	go func() { defer close(qDone); _ = q.Run(qctx) }()
	// Registered first: runs last, after everything that uses the store.
	t.Cleanup(func() { qcancel(); <-qDone; _ = q.Close() })

	tokens := simTokens{sim: sim, user: owner}
	httpc := uplink.NewHTTPClient(sim.CAPool(), 5*time.Second, 2)
	e.pipe = pipeline.New(e.engine, e.q, pipeline.Options{Gateway: gwID})
	up := uplink.New(e.q, tokens, uplink.Options{HTTPClient: httpc, MinBackoff: 50 * time.Millisecond, MaxBackoff: 300 * time.Millisecond})
	upDone := make(chan struct{})
	go func() { defer close(upDone); _ = up.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-upDone })

	topic, err := mqtt.ParseTopic("devices/{device}/telemetry")
	if err != nil {
		t.Fatal(err)
	}
	verifier, err := accesstoken.New(accesstoken.Options{Issuer: sim.Issuer(), Audience: centralsim.DefaultAudience,
		JWKSURL: sim.JWKSURL(), HTTPClient: httpc})
	if err != nil {
		t.Fatal(err)
	}
	b, err := mqtt.NewBroker(e.pipe, mqtt.BrokerOptions{Listen: "127.0.0.1:0", Topic: topic, Policy: e.engine, Tokens: verifier})
	if err != nil {
		t.Fatal(err)
	}
	e.broker = b
	for _, o := range opts {
		if o.local {
			// commands.local_control: the service is built below; the
			// broker calls through e at each publish.
			b.SetLocalCommands(func(user, device, attr string, payload []byte) error {
				return e.svc.Local(user, device, attr, payload)
			})
		}
	}
	ready := make(chan struct{})
	bDone := make(chan struct{})
	go func() { defer close(bDone); _ = b.Run(ctx, func() { close(ready) }) }()
	t.Cleanup(func() { cancel(); <-bDone })
	<-ready

	mgr, err := radio.NewManager([]radio.PortConfig{{Path: e.port, Codec: radio.CodecMySensors}}, e.pipe, e.engine,
		radio.Options{StateDir: t.TempDir(), MinBackoff: 50 * time.Millisecond, MaxBackoff: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	e.radio = mgr
	rDone := make(chan struct{})
	go func() { defer close(rDone); _ = mgr.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-rDone })
	testkit.Eventually(t, 10*time.Second, "the radio port open", func() bool {
		ps := mgr.Ports()
		return len(ps) == 1 && ps[0].Open
	})
	for _, o := range opts {
		e.submitFails += o.submitFails
	}
	e.startService()
	return e
}

// routeOf is the link each test device is on: the coil on Modbus, the
// relay on the MySensors radio, the rest on the embedded broker.
func (e *env) routeOf(d *policy.Device) command.Deliverer {
	if e.route != nil {
		return e.route(d)
	}
	if d.ID == coilID {
		return command.Modbus{Writer: e.coils.ms}
	}
	if d.Radio != nil {
		return command.MySensors{Radio: e.radio, Tries: 3, AckTimeout: 300 * time.Millisecond}
	}
	return command.MQTT{Broker: e.broker}
}

func (e *env) startService() {
	svc, err := command.New(command.Options{
		Gateway: gwID, Store: e.q, Policy: e.engine, Tokens: simTokens{sim: e.sim, user: owner},
		HTTPClient: uplink.NewHTTPClient(e.sim.CAPool(), 5*time.Second, 2), Submit: &flakySubmit{next: e.pipe, fails: e.submitFails},
		Route:  e.routeOf,
		Logger: slog.New(slog.NewTextHandler(e.bus, nil)),
		TTL:    e.ttl, PollInterval: 100 * time.Millisecond, MinBackoff: 50 * time.Millisecond, MaxBackoff: 300 * time.Millisecond,
	})
	e.runService(svc, err)
}

// patch is an IoT App's write through the filter, as user.
func (e *env) patch(user, device, body string) (int, string) {
	e.t.Helper()
	tok, err := e.sim.IssueAccessToken(user, time.Minute)
	if err != nil {
		e.t.Fatal(err)
	}
	req, _ := http.NewRequest(http.MethodPatch, e.sim.BrokerURL()+"/v2/entities/"+device+"/attrs", strings.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+tok)
	req.Header.Set("Content-Type", "application/json")
	c := uplink.NewHTTPClient(e.sim.CAPool(), 5*time.Second, 1)
	resp, err := c.Do(req)
	if err != nil {
		e.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// write is an owner's (or App's) PATCH through the filter that must be
// accepted (204).
func (e *env) write(user, device, body string) {
	e.t.Helper()
	if code, resp := e.patch(user, device, body); code != 204 {
		e.t.Fatalf("PATCH %s as %s: %d %s", device, user, code, resp)
	}
}

// attr reads an attribute back from the simulated Orion and verifies it
// with the device's keys.
func (e *env) attr(device, name string) (value any, verdict envelope.Verdict) {
	ent, ok := e.sim.Entity(device)
	if !ok {
		return nil, ""
	}
	doc, _ := json.Marshal(ent)
	key, err := envelope.DeriveHS256(device, devKeys[device][0], devKeys[device][1])
	if err != nil {
		e.t.Fatal(err)
	}
	rep, err := envelope.VerifyEntity(doc, []envelope.Key{key}, "")
	if err != nil {
		return nil, ""
	}
	for _, a := range rep.Attrs {
		if a.Name == name {
			m, _ := ent[name].(map[string]any)
			return m["value"], a.Verdict
		}
	}
	return nil, ""
}

func (e *env) command(device, attr string) command.Command {
	cs, err := e.svc.Commands()
	if err != nil {
		e.t.Fatal(err)
	}
	for _, c := range cs {
		if c.Device == device && c.Attr == attr {
			return c
		}
	}
	return command.Command{}
}

func (e *env) relaySets() []string { return e.rsim.Stats().RelaySets }

// device is a paho client logged in as a device.
type device struct {
	c   paho.Client
	mu  sync.Mutex
	got []mqttMsg
}

type mqttMsg struct {
	topic   string
	payload []byte
}

func (e *env) connectDevice(id string) *device { return e.connectDeviceAs(id, id+"-client") }

func (e *env) connectDeviceAs(id, clientID string) *device {
	e.t.Helper()
	return e.dialDeviceAt("tcp://"+e.broker.Addr(), id, clientID)
}

// subscribe returns the granted QoS (0x80: refused).
func (d *device) subscribe(t *testing.T, filter string) byte {
	t.Helper()
	tok := d.c.Subscribe(filter, 1, nil)
	if !tok.WaitTimeout(5 * time.Second) {
		t.Fatalf("subscribe %s: no SUBACK", filter)
	}
	if err := tok.Error(); err != nil && !errors.Is(err, paho.ErrNotConnected) {
		t.Logf("subscribe %s: %v", filter, err)
	}
	st, _ := tok.(*paho.SubscribeToken)
	return st.Result()[filter]
}

func (d *device) messages() []mqttMsg {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]mqttMsg(nil), d.got...)
}

// connectApp logs an application in as user, with an access token.
func (e *env) connectApp(user string) *device {
	e.t.Helper()
	tok, err := e.sim.IssueAccessToken(user, 5*time.Minute)
	if err != nil {
		e.t.Fatal(err)
	}
	d := &device{}
	o := paho.NewClientOptions().AddBroker("tcp://" + e.broker.Addr()).SetClientID(user + "-app").
		SetUsername(user + "-app").SetPassword(tok).SetAutoReconnect(false).SetConnectTimeout(5 * time.Second)
	d.c = paho.NewClient(o)
	if t := d.c.Connect(); !t.WaitTimeout(5*time.Second) || t.Error() != nil {
		e.t.Fatalf("connect app %s: %v", user, t.Error())
	}
	e.t.Cleanup(func() { d.c.Disconnect(100) })
	return d
}

// runService runs a service New made until the test ends (or e.stop).
func (e *env) runService(svc *command.Service, err error) {
	e.t.Helper()
	if err != nil {
		e.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(e.ctx)
	done := make(chan struct{})
	go func() { defer close(done); _ = svc.Run(ctx) }()
	e.svc = svc
	e.stop = func() { cancel(); <-done }
	e.t.Cleanup(func() { e.stop() })
}
