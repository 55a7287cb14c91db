package daemon

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	sddaemon "github.com/coreos/go-systemd/v22/daemon"

	"github.com/edgegate/edgegate/internal/accesstoken"
	"github.com/edgegate/edgegate/internal/admin"
	"github.com/edgegate/edgegate/internal/audit"
	"github.com/edgegate/edgegate/internal/command"
	"github.com/edgegate/edgegate/internal/config"
	"github.com/edgegate/edgegate/internal/keys"
	"github.com/edgegate/edgegate/internal/pipeline"
	"github.com/edgegate/edgegate/internal/queue"
	"github.com/edgegate/edgegate/internal/supervise"
	"github.com/edgegate/edgegate/internal/uplink"
	"github.com/edgegate/edgegate/mqtt"
	"github.com/edgegate/edgegate/policy"
	"github.com/edgegate/edgegate/radio"
	"github.com/edgegate/edgegate/radio/modbus"
	centralsync "github.com/edgegate/edgegate/sync"
)

// state is what Run opens before any component starts and closes after
// the last one stopped: the store and everything built on it. The
// addresses are written by a component before it declares itself ready,
// and read only by the components started after it.
type state struct {
	q        *queue.Queue
	aud      *audit.Logger
	red      *audit.Redactor
	engine   *policy.Engine
	pol      *policy.Policy
	tokens   *centralsync.TokenSource
	central  *http.Client
	registry *centralsync.Registry
	syncer   *centralsync.Syncer
	mon      *stallMonitor
	up       *uplink.Uplink
	stats    *deviceStats
	pipe     *pipeline.Pipeline

	broker     *mqtt.Broker
	verifier   *accesstoken.Verifier
	client     *mqtt.Client
	accounts   *mqtt.Dynsec
	ready      *readiness
	ingestLive func() bool // nil: the embedded broker, live once listening
	radio      *radio.Manager
	modbus     *modbus.Master   // radio.modbus; nil without lines
	commands   *command.Service // nil unless commands.enabled

	mqttAddr, mqttTLSAddr, metricsAddr, adminAddr string

	reset func()      // factory reset: stop the daemon, wipe once closed
	wipe  atomic.Bool // set by a factory reset
}

// open opens the store and builds every part on it, in the order today's
// start relies on; nothing runs yet. On error it closes what it opened,
// and the error names the step that failed.
func (d *Daemon) open(reset context.CancelFunc) (*state, error) {
	st := &state{ready: &readiness{}}
	opened := false
	defer func() {
		if !opened {
			st.close(d.log, d.cfg.StateDir)
		}
	}()
	var in openInputs
	defer func() { clear(in.key) }()
	steps := []struct {
		name string
		run  func() error
	}{
		{"store key", func() error { return d.loadStoreKey(&in) }},
		{"policy", func() error { return d.loadPolicy(st) }},
		{"credentials", func() error { return d.loadCredentials(&in) }},
		{"store", func() error { return d.openStore(st, &in) }},
		{"identity", func() error { return d.loadIdentity(st) }},
		{"tokens", func() error { return d.openTokens(st, &in) }},
		{"audit", func() error { return d.openAudit(st, &in, reset) }},
		{"policy sync", func() error { return d.openPolicySync(st, &in) }},
		{"uplink", func() error { return d.openUplink(st, &in) }},
		{"pipeline", func() error { return d.openPipeline(st) }},
		{"ingest", func() error { return d.openIngest(st, in.centralCAs) }},
		{"radio", func() error { return d.openRadio(st) }},
		{"commands", func() error { return d.openCommands(st, in.brokerCAs) }},
	}
	for _, s := range steps {
		if err := s.run(); err != nil {
			return nil, fmt.Errorf("start-up step %s: %w", s.name, err)
		}
	}
	opened = true
	return st, nil
}

// openInputs is what the steps of open read from files once and hand on;
// key is cleared when open returns.
type openInputs struct {
	key                   []byte // the store key
	secret                string // the central client secret, unless paired
	centralCAs, brokerCAs *x509.CertPool
}

func (d *Daemon) loadStoreKey(in *openInputs) error {
	key, keySource, err := keys.LoadStoreKey(d.cfg.Store.Credential, d.cfg.KeyFile(), os.Getenv)
	if err != nil {
		return err // it says "load store key ..."
	}
	in.key = key
	d.log.Info("store key loaded", "source", keySource)
	return nil
}

func (d *Daemon) loadPolicy(st *state) error {
	var err error
	if st.pol, err = configPolicy(d.cfg); err != nil {
		return err
	}
	engine := policy.NewEngine(st.pol)
	st.engine, d.engine = engine, engine
	return nil
}

// loadCredentials reads the client secret (unless paired) and the CA pools.
func (d *Daemon) loadCredentials(in *openInputs) error {
	cfg := d.cfg
	var err error
	if cfg.Central.Credentials != config.CredentialsPaired {
		if in.secret, err = readSecretFile(cfg.Central.ClientSecretFile); err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				// The packaged config before pairing: no credentials at all.
				return notConfigured{fmt.Errorf("central.client_secret_file: %w; %w", err, ErrNotConfigured)}
			}
			return fmt.Errorf("read central.client_secret_file: %w", err)
		}
	}
	if in.centralCAs, err = loadPool(cfg.Central.CAFile); err != nil {
		return fmt.Errorf("load central.ca_file: %w", err)
	}
	if in.brokerCAs, err = loadPool(cfg.Uplink.CAFile); err != nil {
		return fmt.Errorf("load uplink.ca_file: %w", err)
	}
	return nil
}

func (d *Daemon) openStore(st *state, in *openInputs) error {
	if err := os.MkdirAll(d.cfg.StateDir, 0o700); err != nil {
		return fmt.Errorf("create state_dir: %w", err)
	}
	var err error
	st.q, err = d.openQueue(in.key)
	return err
}

// loadIdentity loads the gateway's stable id, shown by status even before
// pairing.
func (d *Daemon) loadIdentity(st *state) error {
	var err error
	if d.identity, err = keys.LoadIdentity(st.q); err != nil {
		return fmt.Errorf("load gateway identity: %w", err)
	}
	return nil
}

func (d *Daemon) openTokens(st *state, in *openInputs) error {
	cfg, log := d.cfg, d.log
	st.central = uplink.NewHTTPClient(in.centralCAs, cfg.Uplink.RequestTimeout, 2)
	if cfg.Central.Credentials != config.CredentialsPaired {
		st.tokens = centralsync.NewTokenSource(centralsync.ClientCredentials{
			TokenURL: cfg.Central.TokenURL, ClientID: cfg.Central.ClientID, ClientSecret: in.secret,
			Scopes: cfg.Central.Scopes, HTTPClient: st.central,
			Metrics: d.metrics, Logger: log.With("component", "tokens"), Now: d.clock.Now,
		})
		return nil
	}
	// The refresh token from pairing; requests signed with the gateway's
	// key where the provider allows (no shared secret).
	var err error
	st.tokens, err = centralsync.NewPairedTokenSource(centralsync.PairedOptions{
		Store: st.q, Identity: d.identity, HTTPClient: st.central,
		ClientCredentials: centralsync.ClientCredentials{Metrics: d.metrics, Logger: log.With("component", "tokens"), Now: d.clock.Now},
	})
	if errors.Is(err, centralsync.ErrNotPaired) {
		// Never paired, or unpaired since: restarting cannot help.
		return notConfigured{fmt.Errorf("central.credentials paired: %w, then systemctl restart edgegate", err)}
	}
	if err != nil {
		return fmt.Errorf("central.credentials paired: %w (run edgegate pair --force --central URL)", err)
	}
	return nil
}

// openAudit opens the audit log with its redactor, and hooks the policy's
// effects and its audit records to the engine.
func (d *Daemon) openAudit(st *state, in *openInputs, reset context.CancelFunc) error {
	cfg, log, engine, q := d.cfg, d.log, st.engine, st.q
	red := audit.NewRedactor()
	st.red = red
	red.Add(in.secret)
	for _, dv := range cfg.Devices {
		red.Add(dv.K1, dv.K2)
	}
	aud, err := audit.New(audit.Options{Path: filepath.Join(cfg.StateDir, "audit.log"), Logger: log.With("component", "audit"), Redactor: red})
	if err != nil {
		return fmt.Errorf("open the audit log: %w", err)
	}
	st.aud = aud
	st.reset = func() {
		aud.Record(context.Background(), audit.Event{Kind: audit.FactoryReset, Cause: "admin"})
		d.revokePairing(q)
		st.wipe.Store(true)
		reset()
	}
	engine.OnChange(policyEffects(q, d.metrics, log.With("component", "policy")))
	engine.OnChange(func(ch policy.Change) {
		// Keys that arrive with a synced policy are redacted from the audit
		// log as well as those of the configuration file.
		for _, d := range ch.New.Devices() {
			if k1, k2, ok := engine.DeviceKeys(d.ID); ok {
				red.Add(k1, k2)
			}
		}
		aud.Record(context.Background(), audit.Event{Kind: audit.PolicyApplied, Cause: ch.New.Source,
			Detail: fmt.Sprintf("%s; revoked %d, changed %d", ch.New.Describe(), len(ch.Revoked), len(ch.Rebound))})
	})
	return nil
}

// openPolicySync builds the device registry and, unless the policy comes
// from the configuration, its syncer.
func (d *Daemon) openPolicySync(st *state, in *openInputs) error {
	cfg, q := d.cfg, st.q
	// The gateway's device registry (sync/registry.go): ONE instance per
	// store, since it caches the record. The device endpoints write it;
	// the stock policy source must read this same instance
	// (OwnershipOptions.Registry).
	st.registry = centralsync.NewRegistry(q)
	if cfg.Policy.Source == config.PolicyConfig {
		return nil
	}
	// The cached policy is in force before any source or network starts.
	var err error
	st.syncer, err = newSyncer(cfg, d.gateway, d.identity, st.engine, q, st.tokens, st.central, in.centralCAs, d.metrics, d.log, d.clock.Now, st.registry,
		func(reason, via, detail string) {
			st.aud.Record(context.Background(), audit.Event{Kind: audit.PolicyRefused, Cause: reason, Detail: via + ": " + detail})
		})
	return err
}

func (d *Daemon) openUplink(st *state, in *openInputs) error {
	cfg, log := d.cfg, d.log
	// The systemd watchdog's view of the pipeline: the committer and the
	// uplink loops are timed through the queue interfaces they use.
	st.mon = newStallMonitor(stallWindow, time.Now)
	gated := &gatedSource{Source: st.q, engine: st.engine, grace: cfg.Policy.ExpiryGrace, now: d.clock.Now,
		log: log.With("component", "policy")}
	refusalWindow := cfg.Uplink.RefusalWindow
	if refusalWindow == 0 {
		refusalWindow = uplink.NoRefusalWindow // 0 in the file: dead-letter at once
	}
	batchLinger := cfg.Uplink.BatchLinger
	if batchLinger == 0 {
		batchLinger = -1 // 0 in the file: send at once
	}
	st.up = uplink.New(watchedSource{Source: gated, mon: st.mon}, st.tokens, uplink.Options{
		Mode: cfg.Uplink.Mode, BatchSize: cfg.Uplink.BatchSize, BatchLinger: batchLinger,
		Concurrency: cfg.Uplink.EffectiveConcurrency(), RefusalWindow: refusalWindow,
		MinBackoff: cfg.Uplink.MinBackoff, MaxBackoff: cfg.Uplink.MaxBackoff,
		HTTPClient: uplink.NewHTTPClient(in.brokerCAs, cfg.Uplink.RequestTimeout, cfg.Uplink.EffectiveConcurrency()),
		Logger:     log.With("component", "uplink"), Metrics: d.metrics, Now: d.clock.Now,
	})
	return nil
}

func (d *Daemon) openPipeline(st *state) error {
	cfg, engine, aud := d.cfg, st.engine, st.aud
	st.stats = newDeviceStats()
	count := st.stats.observe(func(id string) bool { _, ok := engine.Current().Device(id); return ok })
	st.pipe = pipeline.New(engine, watchedAppender{Appender: st.q, mon: st.mon}, pipeline.Options{
		Gateway: d.gateway, SignatureAttr: cfg.Uplink.SignatureAttribute,
		Logger: d.log.With("component", "pipeline"), Metrics: d.metrics, Now: d.clock.Now,
		// Private keys of gateway-signed devices, from the encrypted store.
		SigningKeys:  keys.NewDeviceRing(st.q),
		MaxClockSkew: cfg.Pipeline.MaxClockSkew, MaxAge: cfg.Pipeline.MaxAge,
		Observe: func(device string, out pipeline.Outcome, reason string) {
			if out == pipeline.Duplicate {
				return // a redelivery recognised by (device, seq): neither queued nor refused
			}
			count(device, out == pipeline.Queued)
			if out == pipeline.Refused {
				kind := audit.Kind(reason)
				if reason == policy.ReasonUnknownDevice {
					kind = audit.UnknownDevice
				}
				aud.Record(context.Background(), audit.Event{Kind: kind, Cause: reason, Device: device})
			}
		},
	})
	return nil
}

// openQueue opens the encrypted store; a corrupt one is moved aside whole,
// never repaired in place or deleted: what it holds stays there for
// recovery, and the gateway keeps working with an empty store.
func (d *Daemon) openQueue(key []byte) (*queue.Queue, error) {
	cfg, log := d.cfg, d.log
	commitDelay := cfg.Store.CommitDelay
	if commitDelay == 0 {
		commitDelay = -1 // 0 in the file: sync at once
	}
	qopts := queue.Options{
		Dir: cfg.QueueDir(), Key: key, QuotaBytes: int64(cfg.Store.Quota), MinFreeBytes: int64(cfg.Store.MinFree),
		MaxBatch: cfg.Store.MaxBatch, CommitDelay: commitDelay,
		Logger: log.With("component", "queue"), Metrics: d.metrics,
	}
	q, err := queue.Open(qopts)
	if err != nil && corrupt(err) {
		moved := cfg.QueueDir() + ".quarantined-" + time.Now().UTC().Format("20060102T150405Z")
		if rerr := os.Rename(cfg.QueueDir(), moved); rerr != nil {
			return nil, fmt.Errorf("open queue: %w (and it could not be quarantined: %v)", err, rerr)
		}
		log.Error("the store is corrupt: quarantined; starting with an empty store. The readings queued in it, the cached policy and the pairing are kept in the quarantined copy; they are not delivered. Pair again if this gateway was paired. The policy's version floor, kept outside the store, still holds.",
			"err", err, "quarantined", moved)
		q, err = queue.Open(qopts)
	}
	if err != nil {
		return nil, fmt.Errorf("open queue: %w", err)
	}
	return q, nil
}

// openIngest builds the embedded broker, or the client of an external one
// and the accounts kept on it.
func (d *Daemon) openIngest(st *state, centralCAs *x509.CertPool) error {
	cfg, log, engine, q := d.cfg, d.log, st.engine, st.q
	topic, err := mqtt.ParseTopic(cfg.MQTT.Topic)
	if err != nil {
		return err
	}
	switch cfg.MQTT.Mode {
	case config.ModeEmbedded:
		e := cfg.MQTT.Embedded
		bo := mqtt.BrokerOptions{Listen: e.Listen, TLSListen: e.TLSListen, Topic: topic, Policy: engine,
			Metrics: d.metrics, Logger: log, Now: d.clock.Now, DeviceRate: e.DeviceRate, DeviceBurst: e.DeviceBurst, MaxClients: e.MaxClients,
			Limits: brokerLimits(e.Limits),
			OnDeny: func(action, reason, who string) {
				st.aud.Record(context.Background(), audit.Event{Kind: audit.ACLDenied, Cause: action + "/" + reason, User: who})
			}}
		if e.TLSListen != "" {
			if bo.TLS, err = localTLS(q, e.CertFile, e.KeyFile, e.TLSNames, filepath.Join(cfg.StateDir, "tls", "ca.pem"), time.Now()); err != nil {
				return err
			}
		}
		if cfg.Central.Issuer != "" {
			if st.verifier, err = accesstoken.New(accesstoken.Options{
				Issuer: cfg.Central.Issuer, Audience: cfg.Central.Audience, JWKSURL: cfg.Central.JWKSURL,
				HTTPClient: uplink.NewHTTPClient(centralCAs, cfg.Uplink.RequestTimeout, 2), Store: q,
				Now: d.clock.Now,
			}); err != nil {
				return err
			}
			bo.Tokens = st.verifier
		}
		b, err := mqtt.NewBroker(st.pipe, bo)
		if err != nil {
			return fmt.Errorf("start embedded broker (mqtt.embedded): %w", err)
		}
		engine.OnChange(func(ch policy.Change) {
			gone := append(append([]string(nil), ch.Revoked...), ch.Rebound...)
			b.CloseDeviceSessions(gone)
			// Data retained under the old registration is not delivered
			// under the new one.
			b.PurgeRetained(gone)
		})
		st.broker = b
	case config.ModeExternal:
		tlsCfg, password, err := externalCredentials(cfg.MQTT.External)
		if err != nil {
			return err
		}
		// A password need not look like a secret to the shape rules.
		st.red.Add(password)
		c := mqtt.NewClient(st.pipe, mqtt.ClientOptions{
			URL: cfg.MQTT.External.URL, ClientID: cfg.MQTT.External.ClientID,
			Username: cfg.MQTT.External.Username, Password: password, TLS: tlsCfg,
			Topic: topic, Inflight: cfg.MQTT.External.Inflight, Keepalive: cfg.MQTT.External.Keepalive,
			Logger: log, Metrics: d.metrics,
			// Back on Mosquitto: deliver the commands that waited for it
			// (st.commands is set at start-up, before the client runs).
			OnConnect: func() {
				if st.commands != nil {
					st.commands.Nudge()
				}
			},
		})
		apps := func() ([]mqtt.AppAccount, error) { return LoadApps(q) } // apps.go
		if st.accounts, err = externalAccounts(cfg.MQTT.External, topic, engine, tlsCfg, password, st.red.Add, apps, d.metrics, log); err != nil {
			return err
		}
		if st.accounts != nil {
			engine.OnChange(func(policy.Change) { st.accounts.Nudge() })
			// Devices can log in only once their accounts exist.
			st.ready.add("Mosquitto accounts in line with the policy", st.accounts.Synced())
		} else {
			log.Warn("mqtt.external.accounts is none: Mosquitto's accounts and ACLs are kept by hand, and nothing ties them to the ownership policy; set accounts: dynsec")
		}
		// Ready only once subscribed: before it, on a first start, the
		// broker holds no session for us and drops what devices publish.
		st.ready.add("the subscription on the external broker", c.Subscribed())
		st.client, st.ingestLive, st.mqttAddr = c, c.Live, cfg.MQTT.External.URL
	}
	return nil
}

// openRadio builds the serial radio manager, if radio.ports lists any,
// and the Modbus master, if radio.modbus does.
func (d *Daemon) openRadio(st *state) error {
	cfg := d.cfg
	if len(cfg.Radio.Modbus) > 0 {
		m, err := modbus.New(modbus.LinesFromConfig(cfg.Radio.Modbus), st.pipe, modbus.Options{
			Logger: d.log, Metrics: d.metrics, Now: d.clock.Now})
		if err != nil {
			return fmt.Errorf("configure radio.modbus: %w", err)
		}
		st.modbus = m
	}
	if len(cfg.Radio.Ports) == 0 {
		return nil
	}
	ports := make([]radio.PortConfig, 0, len(cfg.Radio.Ports))
	for _, p := range cfg.Radio.Ports {
		ports = append(ports, radio.PortConfig{Path: p.Path, Baud: p.Baud, Codec: p.Codec, ReadTimeout: p.ReadTimeout})
	}
	mgr, err := radio.NewManager(ports, st.pipe, st.engine, radio.Options{
		StateDir: filepath.Join(cfg.StateDir, "radio"), Logger: d.log.With("component", "radio"), Metrics: d.metrics,
		// Opening a tty is cheap: look for a replugged radio often.
		MaxBackoff: 5 * time.Second,
		// A node claiming an id bound on another port: audited like
		// an MQTT access refusal.
		OnRefusal: func(reason, port, node, bound string) {
			st.aud.Record(context.Background(), audit.Event{Kind: audit.ACLDenied, Cause: "radio/" + reason, Port: port,
				Detail: "node " + node + " is bound on " + bound})
		},
	})
	if err != nil {
		return fmt.Errorf("configure radio.ports: %w", err)
	}
	st.radio = mgr
	return nil
}

// openCommands builds the downlink (commands.enabled): commands learned
// from the platform through the filter, delivered on each device's bound
// link (docs/actuators.md): a Modbus write, a MySensors set, or a publish
// on the device's command topic of the embedded broker or of an external
// Mosquitto whose accounts the gateway keeps (accounts: dynsec).
func (d *Daemon) openCommands(st *state, brokerCAs *x509.CertPool) error {
	cfg := d.cfg
	if !cfg.Commands.Enabled {
		return nil
	}
	c := cfg.Commands
	modbusDevs := map[string]bool{}
	if st.modbus != nil {
		for _, id := range st.modbus.Devices() {
			modbusDevs[id] = true
		}
	}
	mysensors := command.MySensors{Radio: st.radio, Tries: c.Retries, AckTimeout: c.AckTimeout}
	notify, err := notifyOptions(c, d.gateway, st.red.Add, d.log.With("component", "commands"))
	if err != nil {
		return fmt.Errorf("commands: %w", err)
	}
	svc, err := command.New(command.Options{
		Notify:  notify,
		Gateway: d.gateway, Store: st.q, Policy: st.engine, Tokens: st.tokens,
		HTTPClient: uplink.NewHTTPClient(brokerCAs, cfg.Uplink.RequestTimeout, 2), Submit: st.pipe,
		SignatureMeta: cfg.Uplink.SignatureAttribute, TTL: c.TTL, PollInterval: c.PollInterval, PollBudget: c.PollBudget,
		MinBackoff: cfg.Uplink.MinBackoff, MaxBackoff: cfg.Uplink.MaxBackoff,
		Logger: d.log.With("component", "commands"), Now: d.clock.Now,
		Route: func(dev *policy.Device) command.Deliverer {
			switch {
			case modbusDevs[dev.ID]:
				// A device on a Modbus line (radio.modbus) is written by
				// its master, which reads the register back.
				return command.Modbus{Writer: st.modbus}
			case dev.Radio != nil && st.radio != nil:
				return mysensors
			case dev.Radio == nil && st.broker != nil:
				return command.MQTT{Broker: st.broker}
			case dev.Radio == nil && st.client != nil && st.accounts != nil:
				// External Mosquitto: the ingest client publishes, the
				// dynsec roles keep the topic the device's alone
				// (mqtt/mosquitto_command.go).
				return command.MQTT{Broker: st.client}
			}
			// External Mosquitto with accounts none: nothing keeps the
			// command topics private, so nothing is published there.
			return nil
		},
	})
	if err != nil {
		return fmt.Errorf("commands: %w", err)
	}
	if c.LocalControl && st.broker != nil {
		st.broker.SetLocalCommands(svc.Local)
	}
	st.engine.OnChange(func(ch policy.Change) {
		gone := append(append([]string(nil), ch.Revoked...), ch.Rebound...)
		svc.Forget(gone)
		svc.Resubscribe() // devices added or changed: their Orion subscriptions (notify.go)
		if st.broker != nil {
			st.broker.PurgeCommands(gone)
		}
		if st.client != nil {
			st.client.PurgeCommands(gone)
		}
	})
	if st.broker == nil && st.accounts == nil {
		d.log.Warn("commands.enabled with mqtt.mode external and mqtt.external.accounts none: commands reach radio and Modbus devices only (nothing would keep the MQTT command topics private)")
	}
	if d.metrics != nil {
		if err := d.metrics.Registry.Register(svc.Collector()); err != nil {
			return fmt.Errorf("commands: metrics: %w", err)
		}
	}
	st.commands = svc
	return nil
}

func commandsComponent(st *state) supervise.Component {
	if st.commands == nil {
		return supervise.Component{Name: "commands"}
	}
	return supervise.Component{Name: "commands", Run: st.commands.Run}
}

// close closes the audit log and the store once every component stopped;
// after a factory reset it then wipes the state directory.
func (st *state) close(log *slog.Logger, stateDir string) {
	if st.aud != nil {
		st.aud.Close()
	}
	if st.q != nil {
		if err := st.q.Close(); err != nil {
			log.Error("close queue", "err", err)
		}
	}
	if st.wipe.Load() {
		if err := wipeState(stateDir); err != nil {
			log.Error("factory reset: wipe the state directory", "err", err)
			return
		}
		log.Warn("factory reset: state, keys and credentials wiped; the gateway is unpaired (the policy's anti-rollback floor is kept)")
	}
}

// component is a supervise.Component whose Ready is closed by Run.
func component(name string, run func(ctx context.Context, ready func()) error) supervise.Component {
	ch := make(chan struct{})
	return supervise.Component{Name: name, Ready: ch, Run: func(ctx context.Context) error {
		return run(ctx, sync.OnceFunc(func() { close(ch) }))
	}}
}

func (d *Daemon) metricsHTTP(st *state) supervise.Component {
	if d.cfg.Metrics.Listen == "" {
		return supervise.Component{Name: "metrics"}
	}
	return component("metrics", func(ctx context.Context, ready func()) error {
		ln, err := net.Listen("tcp", d.cfg.Metrics.Listen)
		if err != nil {
			return fmt.Errorf("listen metrics.listen %s: %w", d.cfg.Metrics.Listen, err)
		}
		st.metricsAddr = ln.Addr().String()
		ready()
		return d.serveMetrics(ctx, ln, st.mon.healthy)
	})
}

func policySync(st *state) supervise.Component {
	if st.syncer == nil {
		return supervise.Component{Name: "policy-sync"}
	}
	return supervise.Component{Name: "policy-sync", Run: st.syncer.Run}
}

// ingest is the embedded broker (ready once listening) or the client of
// an external one (its readiness is the daemon's, see ready.go).
func (d *Daemon) ingest(st *state) supervise.Component {
	if st.client != nil {
		return supervise.Component{Name: "mqtt-ingest", Run: st.client.Run}
	}
	return component("mqtt-broker", func(ctx context.Context, ready func()) error {
		if v := st.verifier; v != nil {
			// Fresh SSO keys when the central service is reachable; the
			// cached ones serve meanwhile, and offline.
			refreshed := make(chan struct{})
			defer func() { <-refreshed }() // bounded by its 30 s and by ctx
			go func() {
				defer close(refreshed)
				ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
				defer cancel()
				if err := v.Refresh(ctx); err != nil {
					d.log.Warn("SSO signing keys not refreshed; using the cached ones", "keys", v.Keys(), "err", err)
				}
			}()
		}
		return st.broker.Run(ctx, func() {
			st.mqttAddr, st.mqttTLSAddr = st.broker.Addr(), st.broker.TLSAddr()
			ready()
		})
	})
}

func accounts(st *state) supervise.Component {
	if st.accounts == nil {
		return supervise.Component{Name: "mosquitto-accounts"}
	}
	return supervise.Component{Name: "mosquitto-accounts", Run: st.accounts.Run}
}

// radioComponent runs the radio ports and the Modbus lines: the serial
// producers, started and stopped together.
func radioComponent(st *state) supervise.Component {
	var runs []func(context.Context) error
	if st.radio != nil {
		runs = append(runs, st.radio.Run)
	}
	if st.modbus != nil {
		runs = append(runs, st.modbus.Run)
	}
	switch len(runs) {
	case 0:
		return supervise.Component{Name: "radio"}
	case 1:
		return supervise.Component{Name: "radio", Run: runs[0]}
	}
	return supervise.Component{Name: "radio", Run: func(ctx context.Context) error {
		// Both return nil when ctx ends; an error from one stops the other.
		ctx, cancel := context.WithCancel(ctx)
		defer cancel()
		errs := make(chan error, len(runs))
		for _, run := range runs {
			go func() {
				err := run(ctx)
				cancel()
				errs <- err
			}()
		}
		return errors.Join(<-errs, <-errs)
	}}
}

func (d *Daemon) admin(st *state) supervise.Component {
	return component("admin", func(ctx context.Context, ready func()) error {
		cfg := d.cfg
		backend := &adminBackend{d: d, q: st.q, engine: st.engine, syncer: st.syncer, radio: st.radio, mon: st.mon, stats: st.stats,
			missing: st.up.MissingAttributes,
			// Provisioned either way: paired (refresh token) or a client secret.
			paired:    cfg.Central.Credentials == config.CredentialsPaired || cfg.Central.ClientSecretFile != "",
			mqttAddrs: strings.TrimSpace(st.mqttAddr + " " + st.mqttTLSAddr),
			ready:     st.ready, ingestLive: st.ingestLive, accounts: st.accounts,
			commands: st.commands, modbus: st.modbus,
			reset: st.reset}
		// Device registration while running (devices.go).
		backend.devAdmin = &DeviceAdmin{Store: st.q, Registry: st.registry, Gateway: d.gateway,
			Logger: d.log.With("component", "devices")}
		if st.syncer != nil {
			backend.devAdmin.Nudge = st.syncer.Nudge
		}
		// App accounts of an external Mosquitto (apps.go).
		backend.appAdmin = &AppAdmin{Store: st.q, Accounts: st.accounts, Policy: st.engine.Current, Logger: d.log.With("component", "apps")}
		if cfg.Central.Credentials == config.CredentialsPaired {
			if cred, err := centralsync.LoadCredentials(st.q); err == nil {
				backend.devAdmin.Directory = centralsync.NewDirectory(cred.CentralURL, st.central, st.tokens.Token)
				backend.devAdmin.User = cred.User
			}
		}
		adm, err := admin.Listen(admin.ServerOptions{Socket: d.adminSocket(), Backend: backend, Audit: st.aud, Logger: d.log.With("component", "admin")})
		if err != nil {
			return fmt.Errorf("open the admin socket: %w", err)
		}
		st.adminAddr = adm.Addr()
		ready()
		return adm.Run(ctx)
	})
}

// lifecycle starts last and stops first: it says READY=1 once every ingest
// path is live (ready.go), keeps the systemd watchdog fed, applies SIGHUP
// reloads, and says STOPPING=1 before the others are stopped.
func (d *Daemon) lifecycle(st *state) supervise.Component {
	return supervise.Component{Name: "lifecycle", Run: func(ctx context.Context) error {
		log := d.log
		// Under systemd (Type=notify) start-up ends at READY, not at exec:
		// units ordered after edgegate wait until every ingest path is live.
		live := st.ready.all(ctx)
		// Said once if the wait is long (a broker down at start-up).
		slow := time.NewTimer(10 * time.Second)
		defer slow.Stop()
		hup := make(chan os.Signal, 1)
		signal.Notify(hup, syscall.SIGHUP)
		defer signal.Stop(hup)
		// The watchdog runs once ready; its goroutine is this component's
		// and ends before it returns.
		wctx, stopWatchdog := context.WithCancel(ctx)
		watchdogDone := make(chan struct{})
		close(watchdogDone) // replaced once the watchdog runs
		watchdogErr := make(chan error, 1)
		defer func() {
			// systemd shows "deactivating" and stops enforcing WatchdogSec=
			// while the others drain; the keep-alives stop first, so a slow
			// drain is not mistaken for a stuck pipeline by our own monitor.
			if err := sdNotify(sddaemon.SdNotifyStopping); err != nil {
				log.Warn("tell systemd we are stopping", "err", err)
			}
			stopWatchdog()
			<-watchdogDone
		}()
		for {
			select {
			case <-ctx.Done():
				log.Info("stopping")
				return nil
			case err := <-watchdogErr:
				return fmt.Errorf("watchdog: %w", err)
			case <-hup:
				d.reload()
			case <-live:
				live = nil
				log.Info("edgegate ready", "version", Version, "admin", st.adminAddr, "gateway", d.gateway, "devices", st.pol.Len(),
					"mqtt", st.mqttAddr, "mqtt_tls", st.mqttTLSAddr, "metrics", st.metricsAddr, "state_dir", d.cfg.StateDir,
					"memory_limit", memoryLimit())
				if err := sdNotify(sddaemon.SdNotifyReady); err != nil {
					log.Warn("tell systemd we are ready", "err", err)
				}
				interval, err := watchdogInterval()
				if err != nil {
					log.Warn("systemd watchdog settings ignored; no keep-alives will be sent", "err", err)
				}
				if interval > 0 {
					watchdogDone = make(chan struct{})
					go func(done chan<- struct{}) {
						defer close(done)
						err := watchdog(wctx, interval, st.mon.healthy, log.With("component", "watchdog"))
						if wctx.Err() == nil {
							if err == nil {
								err = errors.New("stopped on its own")
							}
							watchdogErr <- err
						}
					}(watchdogDone)
				}
			case <-slow.C:
				if w := st.ready.waiting(); w != "" {
					log.Warn("not ready yet: readings are not taken in until it is", "waiting_for", w)
					_ = sdStatus("waiting for " + w)
				}
			}
		}
	}}
}
