// Package daemon wires the stages of `edgegate run` — sources, pipeline,
// queue, uplink — and stops them in order: producers first, then the queue
// (which commits what it holds), then the network, then the store.
package daemon

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"math"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/edgegate/edgegate/accesstoken"
	"github.com/edgegate/edgegate/admin"
	"github.com/edgegate/edgegate/audit"
	"github.com/edgegate/edgegate/config"
	"github.com/edgegate/edgegate/devkey"
	"github.com/edgegate/edgegate/identity"
	"github.com/edgegate/edgegate/metrics"
	"github.com/edgegate/edgegate/mqtt"
	"github.com/edgegate/edgegate/pipeline"
	"github.com/edgegate/edgegate/policy"
	"github.com/edgegate/edgegate/queue"
	"github.com/edgegate/edgegate/radio"
	"github.com/edgegate/edgegate/sdnotify"
	"github.com/edgegate/edgegate/storekey"
	centralsync "github.com/edgegate/edgegate/sync"
	"github.com/edgegate/edgegate/uplink"
)

// Version is stamped at build time.
var Version = "dev"

// stopTimeout bounds each stage's shutdown.
const stopTimeout = 20 * time.Second

// Daemon is one running gateway.
type Daemon struct {
	engine   *policy.Engine
	cfg      *config.Config
	log      *slog.Logger
	metrics  *metrics.Metrics
	gateway  string
	identity *identity.Identity // loaded by Run
	levels   *slog.LevelVar     // the log level, changed by a reload
	clock    *clock
}

// SetLevelVar lets a reload change the log level of the daemon's logger.
func (d *Daemon) SetLevelVar(v *slog.LevelVar) { d.levels = v }

// New prepares a daemon from a validated configuration.
func New(cfg *config.Config, log *slog.Logger) *Daemon {
	gw := cfg.Gateway.ID
	if gw == "" {
		gw = DefaultGatewayID()
	}
	return &Daemon{cfg: cfg, log: log, metrics: metrics.New(), gateway: gw, clock: newClock(os.Getenv)}
}

// DefaultGatewayID is "edgegate-" and the host name, reduced to the
// characters an NGSI id allows.
func DefaultGatewayID() string {
	h, _ := os.Hostname()
	var b strings.Builder
	for _, r := range h {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '_' || r == '-' {
			b.WriteRune(r)
		}
	}
	if b.Len() == 0 {
		return "edgegate"
	}
	return "edgegate-" + b.String()
}

// stage is one long-running part of the daemon.
type stage struct {
	name   string
	cancel context.CancelFunc
	done   chan error
}

func start(name string, run func(context.Context) error, errs chan<- error) *stage {
	ctx, cancel := context.WithCancel(context.Background())
	s := &stage{name: name, cancel: cancel, done: make(chan error, 1)}
	go func() {
		err := run(ctx)
		if err != nil {
			err = fmt.Errorf("%s: %w", name, err)
		}
		s.done <- err
		if err != nil || ctx.Err() == nil {
			// A stage that ends on its own stops the daemon.
			if err == nil {
				err = fmt.Errorf("%s stopped unexpectedly", name)
			}
			select {
			case errs <- err:
			default:
			}
		}
	}()
	return s
}

func (s *stage) stop(log *slog.Logger) error {
	s.cancel()
	select {
	case err := <-s.done:
		s.done <- err // keep it for a second stop
		return err
	case <-time.After(stopTimeout):
		log.Error("stage did not stop in time", "stage", s.name, "timeout", stopTimeout)
		return fmt.Errorf("%s: did not stop within %s", s.name, stopTimeout)
	}
}

// ErrNotConfigured marks a gateway that cannot start before it is paired
// (or given its client credentials): `edgegate run` exits 78 (EX_CONFIG)
// with it, and the unit's RestartPreventExitStatus=78 stops systemd from
// restarting it in a loop.
var ErrNotConfigured = errors.New("this gateway is not paired: pair it with edgegate pair --central URL")

// notConfigured is an error that is ErrNotConfigured without repeating its
// text.
type notConfigured struct{ err error }

func (e notConfigured) Error() string        { return e.err.Error() }
func (e notConfigured) Unwrap() error        { return e.err }
func (e notConfigured) Is(target error) bool { return target == ErrNotConfigured }

// Run runs the gateway until ctx is done (SIGTERM), then stops it in order.
func (d *Daemon) Run(ctx context.Context) error {
	cfg, log := d.cfg, d.log
	// A factory reset stops the daemon; the state is wiped once the store
	// is closed (this defer runs after the store's).
	ctx, resetStop := context.WithCancel(ctx)
	defer resetStop()
	var wipe atomic.Bool
	defer func() {
		if wipe.Load() {
			if err := wipeState(cfg.StateDir); err != nil {
				log.Error("factory reset: wipe the state directory", "err", err)
				return
			}
			log.Warn("factory reset: state, keys and credentials wiped; the gateway is unpaired (the policy's anti-rollback floor is kept)")
		}
	}()

	key, keySource, err := storekey.Load(cfg.Store.Credential, cfg.KeyFile(), os.Getenv)
	if err != nil {
		return fmt.Errorf("load store key: %w", err)
	}
	log.Info("store key loaded", "source", keySource)

	pol, err := configPolicy(cfg)
	if err != nil {
		return err
	}
	engine := policy.NewEngine(pol)
	d.engine = engine

	var secret string
	if cfg.Central.Credentials != config.CredentialsPaired {
		if secret, err = readSecretFile(cfg.Central.ClientSecretFile); err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				// The packaged config before pairing: no credentials at all.
				return notConfigured{fmt.Errorf("central.client_secret_file: %w; %w", err, ErrNotConfigured)}
			}
			return fmt.Errorf("read central.client_secret_file: %w", err)
		}
	}
	centralCAs, err := loadPool(cfg.Central.CAFile)
	if err != nil {
		return fmt.Errorf("load central.ca_file: %w", err)
	}
	brokerCAs, err := loadPool(cfg.Uplink.CAFile)
	if err != nil {
		return fmt.Errorf("load uplink.ca_file: %w", err)
	}

	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return fmt.Errorf("create state_dir: %w", err)
	}
	qopts := queue.Options{
		Dir: cfg.QueueDir(), Key: key, QuotaBytes: int64(cfg.Store.Quota), MinFreeBytes: int64(cfg.Store.MinFree),
		MaxBatch: cfg.Store.MaxBatch,
		Logger:   log.With("component", "queue"), Metrics: d.metrics,
	}
	q, err := queue.Open(qopts)
	if err != nil && corrupt(err) {
		// A corrupt store is moved aside whole, never repaired in place
		// or deleted: what it holds stays there for recovery, and the
		// gateway keeps working with an empty store.
		moved := cfg.QueueDir() + ".quarantined-" + time.Now().UTC().Format("20060102T150405Z")
		if rerr := os.Rename(cfg.QueueDir(), moved); rerr != nil {
			clear(key)
			return fmt.Errorf("open queue: %w (and it could not be quarantined: %v)", err, rerr)
		}
		log.Error("the store is corrupt: quarantined; starting with an empty store. The readings queued in it, the cached policy and the pairing are kept in the quarantined copy; they are not delivered. Pair again if this gateway was paired. The policy's version floor, kept outside the store, still holds.",
			"err", err, "quarantined", moved)
		q, err = queue.Open(qopts)
	}
	clear(key)
	if err != nil {
		return fmt.Errorf("open queue: %w", err)
	}
	defer func() {
		if err := q.Close(); err != nil {
			log.Error("close queue", "err", err)
		}
	}()

	// The gateway's stable id, shown by status even before pairing.
	if d.identity, err = identity.Load(q); err != nil {
		return fmt.Errorf("load gateway identity: %w", err)
	}
	centralClient := uplink.NewHTTPClient(centralCAs, cfg.Uplink.RequestTimeout, 2)
	var tokens *centralsync.TokenSource
	if cfg.Central.Credentials == config.CredentialsPaired {
		// The refresh token from pairing; requests signed with the
		// gateway's key where the provider allows (no shared secret).
		tokens, err = centralsync.NewPairedTokenSource(centralsync.PairedOptions{
			Store: q, Identity: d.identity, HTTPClient: centralClient,
			ClientCredentials: centralsync.ClientCredentials{Metrics: d.metrics, Logger: log.With("component", "tokens"), Now: d.clock.Now},
		})
		if errors.Is(err, centralsync.ErrNotPaired) {
			// Never paired, or unpaired since: restarting cannot help.
			return notConfigured{fmt.Errorf("central.credentials paired: %w, then systemctl restart edgegate", err)}
		}
		if err != nil {
			return fmt.Errorf("central.credentials paired: %w (run edgegate pair --force --central URL)", err)
		}
	} else {
		tokens = centralsync.NewTokenSource(centralsync.ClientCredentials{
			TokenURL: cfg.Central.TokenURL, ClientID: cfg.Central.ClientID, ClientSecret: secret,
			Scopes: cfg.Central.Scopes, HTTPClient: centralClient,
			Metrics: d.metrics, Logger: log.With("component", "tokens"), Now: d.clock.Now,
		})
	}
	red := audit.NewRedactor()
	red.Add(secret)
	for _, dv := range cfg.Devices {
		red.Add(dv.K1, dv.K2)
	}
	aud, err := audit.New(audit.Options{Path: filepath.Join(cfg.StateDir, "audit.log"), Logger: log.With("component", "audit"), Redactor: red})
	if err != nil {
		return fmt.Errorf("open the audit log: %w", err)
	}
	defer aud.Close()
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
	// The gateway's device registry (sync/registry.go): ONE instance per
	// store, since it caches the record. The device endpoints write it;
	// the stock policy source must read this same instance
	// (OwnershipOptions.Registry).
	registry := centralsync.NewRegistry(q)
	var syncer *centralsync.Syncer
	if cfg.Policy.Source != config.PolicyConfig {
		// The cached policy is in force before any source or network starts.
		syncer, err = newSyncer(cfg, d.gateway, d.identity, engine, q, tokens, centralClient, centralCAs, d.metrics, log, d.clock.Now, registry,
			func(reason, via, detail string) {
				aud.Record(context.Background(), audit.Event{Kind: audit.PolicyRefused, Cause: reason, Detail: via + ": " + detail})
			})
		if err != nil {
			return err
		}
	}
	// The systemd watchdog's view of the pipeline: the committer and the
	// uplink loops are timed through the queue interfaces they use.
	mon := newStallMonitor(stallWindow, time.Now)
	gated := &gatedSource{Source: q, engine: engine, grace: cfg.Policy.ExpiryGrace, now: d.clock.Now,
		log: log.With("component", "policy")}
	refusalWindow := cfg.Uplink.RefusalWindow
	if refusalWindow == 0 {
		refusalWindow = uplink.NoRefusalWindow // 0 in the file: dead-letter at once
	}
	up := uplink.New(watchedSource{Source: gated, mon: mon}, tokens, uplink.Options{
		Mode: cfg.Uplink.Mode, BatchSize: cfg.Uplink.BatchSize,
		Concurrency: cfg.Uplink.EffectiveConcurrency(), RefusalWindow: refusalWindow,
		MinBackoff: cfg.Uplink.MinBackoff, MaxBackoff: cfg.Uplink.MaxBackoff,
		HTTPClient: uplink.NewHTTPClient(brokerCAs, cfg.Uplink.RequestTimeout, cfg.Uplink.EffectiveConcurrency()),
		Logger:     log.With("component", "uplink"), Metrics: d.metrics, Now: d.clock.Now,
	})
	stats := newDeviceStats()
	count := stats.observe(func(id string) bool { _, ok := engine.Current().Device(id); return ok })
	pipe := pipeline.New(engine, watchedAppender{Appender: q, mon: mon}, pipeline.Options{
		Gateway: d.gateway, SignatureAttr: cfg.Uplink.SignatureAttribute,
		Logger: log.With("component", "pipeline"), Metrics: d.metrics, Now: d.clock.Now,
		// Private keys of gateway-signed devices, from the encrypted store.
		SigningKeys:  devkey.NewRing(q),
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
	topic, err := mqtt.ParseTopic(cfg.MQTT.Topic)
	if err != nil {
		return err
	}

	errs := make(chan error, 8)
	queueStage := start("queue", q.Run, errs)
	uplinkStage := start("uplink", up.Run, errs)
	var syncStage *stage
	if syncer != nil {
		syncStage = start("policy-sync", syncer.Run, errs)
	}

	var metricsStage *stage
	var metricsAddr string
	if cfg.Metrics.Listen != "" {
		ln, err := net.Listen("tcp", cfg.Metrics.Listen)
		if err != nil {
			d.stopAll(nil, queueStage, uplinkStage, syncStage)
			return fmt.Errorf("listen metrics.listen %s: %w", cfg.Metrics.Listen, err)
		}
		metricsAddr = ln.Addr().String()
		metricsStage = start("metrics", func(ctx context.Context) error { return d.serveMetrics(ctx, ln, mon.healthy) }, errs)
	}

	var ingest, accountsStage *stage
	var mqttAddr, mqttTLSAddr string
	ready := &readiness{}
	var ingestLive func() bool // nil: the embedded broker, live once listening
	var accounts *mqtt.Dynsec
	switch cfg.MQTT.Mode {
	case config.ModeEmbedded:
		e := cfg.MQTT.Embedded
		bo := mqtt.BrokerOptions{Listen: e.Listen, TLSListen: e.TLSListen, Topic: topic, Policy: engine,
			Metrics: d.metrics, Logger: log, Now: d.clock.Now, DeviceRate: e.DeviceRate, DeviceBurst: e.DeviceBurst, MaxClients: e.MaxClients,
			Limits: brokerLimits(e.Limits),
			OnDeny: func(action, reason, who string) {
				aud.Record(context.Background(), audit.Event{Kind: audit.ACLDenied, Cause: action + "/" + reason, User: who})
			}}
		if e.TLSListen != "" {
			bo.TLS, err = localTLS(q, e.CertFile, e.KeyFile, e.TLSNames, filepath.Join(cfg.StateDir, "tls", "ca.pem"), time.Now())
			if err != nil {
				d.stopAll(nil, queueStage, uplinkStage, syncStage, metricsStage)
				return err
			}
		}
		if cfg.Central.Issuer != "" {
			v, err := accesstoken.New(accesstoken.Options{
				Issuer: cfg.Central.Issuer, Audience: cfg.Central.Audience, JWKSURL: cfg.Central.JWKSURL,
				HTTPClient: uplink.NewHTTPClient(centralCAs, cfg.Uplink.RequestTimeout, 2), Store: q,
				Now: d.clock.Now,
			})
			if err != nil {
				d.stopAll(nil, queueStage, uplinkStage, syncStage, metricsStage)
				return err
			}
			bo.Tokens = v
			// Fresh keys when the central service is reachable; the cached
			// ones serve meanwhile, and offline.
			go func() {
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				defer cancel()
				if err := v.Refresh(ctx); err != nil {
					log.Warn("SSO signing keys not refreshed; using the cached ones", "keys", v.Keys(), "err", err)
				}
			}()
		}
		b, err := mqtt.NewBroker(pipe, bo)
		if err != nil {
			err = fmt.Errorf("start embedded broker (mqtt.embedded): %w", err)
			d.stopAll(nil, queueStage, uplinkStage, syncStage, metricsStage)
			return err
		}
		engine.OnChange(func(ch policy.Change) {
			gone := append(append([]string(nil), ch.Revoked...), ch.Rebound...)
			b.CloseDeviceSessions(gone)
			// Data retained under the old registration is not delivered
			// under the new one.
			b.PurgeRetained(gone)
		})
		listening := make(chan struct{})
		ingest = start("mqtt-broker", func(ctx context.Context) error {
			return b.Run(ctx, func() { close(listening) })
		}, errs)
		select {
		case <-listening:
			mqttAddr, mqttTLSAddr = b.Addr(), b.TLSAddr()
		case err := <-errs:
			d.stopAll([]*stage{ingest}, queueStage, uplinkStage, syncStage, metricsStage)
			return err
		}
	case config.ModeExternal:
		tlsCfg, password, err := externalCredentials(cfg.MQTT.External)
		if err != nil {
			d.stopAll(nil, queueStage, uplinkStage, syncStage, metricsStage)
			return err
		}
		// A password need not look like a secret to the shape rules.
		red.Add(password)
		c := mqtt.NewClient(pipe, mqtt.ClientOptions{
			URL: cfg.MQTT.External.URL, ClientID: cfg.MQTT.External.ClientID,
			Username: cfg.MQTT.External.Username, Password: password, TLS: tlsCfg,
			Topic: topic, Inflight: cfg.MQTT.External.Inflight, Keepalive: cfg.MQTT.External.Keepalive,
			Logger: log, Metrics: d.metrics,
		})
		apps := func() ([]mqtt.AppAccount, error) { return LoadApps(q) } // apps.go
		if accounts, err = externalAccounts(cfg.MQTT.External, topic, engine, tlsCfg, password, red.Add, apps, d.metrics, log); err != nil {
			d.stopAll(nil, queueStage, uplinkStage, syncStage, metricsStage)
			return err
		}
		if accounts != nil {
			engine.OnChange(func(policy.Change) { accounts.Nudge() })
			accountsStage = start("mosquitto-accounts", accounts.Run, errs)
			// Devices can log in only once their accounts exist.
			ready.add("Mosquitto accounts in line with the policy", accounts.Synced())
		} else {
			log.Warn("mqtt.external.accounts is none: Mosquitto's accounts and ACLs are kept by hand, and nothing ties them to the ownership policy; set accounts: dynsec")
		}
		ingest = start("mqtt-ingest", c.Run, errs)
		// Ready only once subscribed: before it, on a first start, the
		// broker holds no session for us and drops what devices publish.
		ready.add("the subscription on the external broker", c.Subscribed())
		ingestLive = c.Live
		mqttAddr = cfg.MQTT.External.URL
	}

	var radioStage *stage
	var radioMgr *radio.Manager
	if len(cfg.Radio.Ports) > 0 {
		ports := make([]radio.PortConfig, 0, len(cfg.Radio.Ports))
		for _, p := range cfg.Radio.Ports {
			ports = append(ports, radio.PortConfig{Path: p.Path, Baud: p.Baud, Codec: p.Codec, ReadTimeout: p.ReadTimeout})
		}
		mgr, err := radio.NewManager(ports, pipe, engine, radio.Options{
			StateDir: filepath.Join(cfg.StateDir, "radio"), Logger: log.With("component", "radio"), Metrics: d.metrics,
			// Opening a tty is cheap: look for a replugged radio often.
			MaxBackoff: 5 * time.Second,
			// A node claiming an id bound on another port: audited like
			// an MQTT access refusal.
			OnRefusal: func(reason, port, node, bound string) {
				aud.Record(context.Background(), audit.Event{Kind: audit.ACLDenied, Cause: "radio/" + reason, Port: port,
					Detail: "node " + node + " is bound on " + bound})
			},
		})
		if err != nil {
			d.stopAll([]*stage{ingest, accountsStage}, queueStage, uplinkStage, syncStage, metricsStage)
			return fmt.Errorf("configure radio.ports: %w", err)
		}
		radioStage = start("radio", mgr.Run, errs)
		radioMgr = mgr
	}

	backend := &adminBackend{d: d, q: q, engine: engine, syncer: syncer, radio: radioMgr, mon: mon, stats: stats,
		missing: up.MissingAttributes,
		// Provisioned either way: paired (refresh token) or a client secret.
		paired:    cfg.Central.Credentials == config.CredentialsPaired || cfg.Central.ClientSecretFile != "",
		mqttAddrs: strings.TrimSpace(mqttAddr + " " + mqttTLSAddr),
		ready:     ready, ingestLive: ingestLive, accounts: accounts,
		reset: func() {
			aud.Record(context.Background(), audit.Event{Kind: audit.FactoryReset, Cause: "admin"})
			d.revokePairing(q)
			wipe.Store(true)
			resetStop()
		}}
	// Device registration while running (devices.go).
	backend.devAdmin = &DeviceAdmin{Store: q, Registry: registry, Gateway: d.gateway,
		Logger: log.With("component", "devices")}
	if syncer != nil {
		backend.devAdmin.Nudge = syncer.Nudge
	}
	// App accounts of an external Mosquitto (apps.go).
	backend.appAdmin = &AppAdmin{Store: q, Accounts: accounts, Policy: engine.Current, Logger: log.With("component", "apps")}
	if cfg.Central.Credentials == config.CredentialsPaired {
		if cred, err := centralsync.LoadCredentials(q); err == nil {
			backend.devAdmin.Directory = centralsync.NewDirectory(cred.CentralURL, centralClient, tokens.Token)
			backend.devAdmin.User = cred.User
		}
	}
	adm, err := admin.Listen(admin.ServerOptions{Socket: d.adminSocket(), Backend: backend, Audit: aud, Logger: log.With("component", "admin")})
	if err != nil {
		d.stopAll([]*stage{radioStage, ingest, accountsStage}, queueStage, uplinkStage, syncStage, metricsStage)
		return fmt.Errorf("open the admin socket: %w", err)
	}
	adminStage := start("admin", adm.Run, errs)

	// Under systemd (Type=notify) start-up ends at READY, not at exec:
	// units ordered after edgegate wait until every ingest path is live.
	notify := sdnotify.FromEnv(os.Getenv)
	var watchdog *stage
	becomeReady := func() {
		log.Info("edgegate ready", "version", Version, "admin", adm.Addr(), "gateway", d.gateway, "devices", pol.Len(),
			"mqtt", mqttAddr, "mqtt_tls", mqttTLSAddr, "metrics", metricsAddr, "state_dir", cfg.StateDir,
			"memory_limit", memoryLimit())
		if err := notify.Ready(); err != nil {
			log.Warn("tell systemd we are ready", "err", err)
		}
		if interval, ok := notify.WatchdogInterval(os.Getenv, os.Getpid()); ok {
			watchdog = start("watchdog", func(ctx context.Context) error {
				return notify.Watchdog(ctx, interval, mon.healthy, log.With("component", "watchdog"))
			}, errs)
		}
	}
	live := ready.all(ctx)
	// Said once if the wait is long (a broker down at start-up).
	slow := time.NewTimer(10 * time.Second)
	defer slow.Stop()
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	var runErr error
	for running := true; running; {
		select {
		case <-ctx.Done():
			log.Info("stopping")
			running = false
		case runErr = <-errs:
			log.Error("stage failed; stopping", "err", runErr)
			running = false
		case <-hup:
			d.reload()
		case <-live:
			live = nil
			becomeReady()
		case <-slow.C:
			if w := ready.waiting(); w != "" {
				log.Warn("not ready yet: readings are not taken in until it is", "waiting_for", w)
				_ = notify.Status("waiting for " + w)
			}
		}
	}
	// systemd shows "deactivating" and stops enforcing WatchdogSec= while
	// the stages drain; the keep-alives stop first, so a slow drain is not
	// mistaken for a stuck pipeline by our own monitor.
	if err := notify.Stopping(); err != nil {
		log.Warn("tell systemd we are stopping", "err", err)
	}
	if watchdog != nil {
		_ = watchdog.stop(log)
	}
	if err := d.stopAll([]*stage{adminStage, radioStage, ingest, accountsStage}, queueStage, uplinkStage, syncStage, metricsStage); err != nil && runErr == nil {
		runErr = err
	}
	log.Info("stopped")
	return runErr
}

// stopAll stops producers first, then the queue (committing what it holds),
// then the network side.
func (d *Daemon) stopAll(producers []*stage, queueStage *stage, network ...*stage) error {
	var errs []error
	for _, s := range append(append(producers, queueStage), network...) {
		if s == nil {
			continue
		}
		if err := s.stop(d.log); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func (d *Daemon) serveMetrics(ctx context.Context, ln net.Listener, healthy func() error) error {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(d.metrics.Registry, promhttp.HandlerOpts{}))
	// The same verdict as the systemd watchdog's: the committer and the
	// uplink loops make progress.
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		if err := healthy(); err != nil {
			w.WriteHeader(http.StatusServiceUnavailable)
			_, _ = w.Write([]byte("unhealthy: " + err.Error() + "\n"))
			return
		}
		_, _ = w.Write([]byte("ok\n"))
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 10 * time.Second,
		WriteTimeout: 10 * time.Second, IdleTimeout: 60 * time.Second}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// readSecretFile reads a secret from a file only its owner can read.
// The rule is config.PrivateFile, the one `config check` applies too.
func readSecretFile(path string) (string, error) {
	if err := config.PrivateFile(path); err != nil {
		return "", err
	}
	st, err := os.Stat(path)
	if err != nil {
		return "", err
	}
	if st.Size() > 64<<10 {
		return "", fmt.Errorf("%s is too large for a secret (%d bytes)", path, st.Size())
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	s := strings.TrimSpace(string(b))
	if s == "" {
		return "", fmt.Errorf("%s is empty", path)
	}
	return s, nil
}

func loadPool(path string) (*x509.CertPool, error) {
	if path == "" {
		return nil, nil // system roots
	}
	pem, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("%s holds no PEM certificate", path)
	}
	return pool, nil
}

func externalCredentials(e config.External) (*tls.Config, string, error) {
	var tlsCfg *tls.Config
	if strings.HasPrefix(e.URL, "tls://") || strings.HasPrefix(e.URL, "ssl://") || strings.HasPrefix(e.URL, "mqtts://") {
		pool, err := loadPool(e.CAFile)
		if err != nil {
			return nil, "", fmt.Errorf("load mqtt.external.ca_file: %w", err)
		}
		tlsCfg = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	}
	var password string
	if e.PasswordFile != "" {
		p, err := readSecretFile(e.PasswordFile)
		if err != nil {
			return nil, "", fmt.Errorf("read mqtt.external.password_file: %w", err)
		}
		password = p
	}
	return tlsCfg, password, nil
}

// externalAccounts builds the manager of Mosquitto's accounts when
// mqtt.external.accounts is dynsec (nil for none). Its administrator is
// admin_username / admin_password_file, or the ingest account.
func externalAccounts(e config.External, topic mqtt.Topic, engine *policy.Engine, tlsCfg *tls.Config, ingestPassword string, redact func(...string), apps func() ([]mqtt.AppAccount, error), m *metrics.Metrics, log *slog.Logger) (*mqtt.Dynsec, error) {
	if e.Accounts != config.AccountsDynsec {
		return nil, nil
	}
	user, pw := e.Username, ingestPassword
	if e.AdminUsername != "" {
		user = e.AdminUsername
		p, err := readSecretFile(e.AdminPasswordFile)
		if err != nil {
			return nil, fmt.Errorf("read mqtt.external.admin_password_file: %w", err)
		}
		pw = p
		redact(pw)
	}
	return mqtt.NewDynsec(mqtt.DynsecOptions{
		URL: e.URL, ClientID: e.ClientID + "-accounts", Username: user, Password: pw, TLS: tlsCfg,
		Topic: topic, Policy: engine, IngestUser: e.Username, Interval: e.AccountsInterval, Logger: log, Metrics: m,
		Apps: apps,
	}), nil
}

// configPolicy builds the version-0 policy of the configuration's devices.
func configPolicy(cfg *config.Config) (*policy.Policy, error) {
	regs := make([]policy.Registration, 0, len(cfg.Devices))
	for _, dv := range cfg.Devices {
		svc, path := dv.Service, dv.ServicePath
		if svc == "" {
			svc = cfg.Uplink.FiwareService
		}
		if path == "" {
			path = cfg.Uplink.FiwareServicePath
		}
		var rb *policy.RadioBinding
		if dv.Radio != nil {
			rb = &policy.RadioBinding{Port: dv.Radio.Port, Node: dv.Radio.NodeOrAny(), Child: dv.Radio.ChildOrAny()}
		}
		var keys []json.RawMessage
		for i, k := range dv.PublicKeys {
			ks, err := policy.ParsePublicKeys([]byte(k))
			if err != nil {
				return nil, fmt.Errorf("devices[%s].public_keys[%d]: %w", dv.ID, i, err)
			}
			keys = append(keys, ks...)
		}
		regs = append(regs, policy.Registration{
			ID: dv.ID, Type: dv.Type, Owner: dv.Owner, Broker: strings.TrimRight(dv.Broker, "/"),
			Service: svc, ServicePath: path, K1: dv.K1, K2: dv.K2, Radio: rb,
			Signing: dv.Signing, PublicKeys: keys,
		})
	}
	return policy.New(0, config.PolicyConfig, regs)
}

// reload re-reads the configuration on SIGHUP. A bad file is refused and the
// running configuration kept. The devices (with policy.source config) and the
// log level apply at once, without restarting any stage, so nothing queued
// or in flight is lost or sent twice; every other change is reported as
// needing a restart and is not applied.
func (d *Daemon) reload() {
	log := d.log
	next, err := config.Load(d.cfg.Path)
	if err != nil {
		log.Error("configuration reload refused; the running configuration stays", "err", err)
		return
	}
	if d.levels != nil {
		var lv slog.Level
		if lv.UnmarshalText([]byte(next.Log.Level)) == nil {
			d.levels.Set(lv)
		}
	}
	var restart []string
	if next.StateDir != d.cfg.StateDir {
		restart = append(restart, "state_dir")
	}
	if fmt.Sprint(next.MQTT) != fmt.Sprint(d.cfg.MQTT) {
		restart = append(restart, "mqtt")
	}
	if fmt.Sprint(next.Central) != fmt.Sprint(d.cfg.Central) {
		restart = append(restart, "central")
	}
	if fmt.Sprint(next.Uplink) != fmt.Sprint(d.cfg.Uplink) {
		restart = append(restart, "uplink")
	}
	if fmt.Sprint(next.Radio) != fmt.Sprint(d.cfg.Radio) {
		restart = append(restart, "radio")
	}
	if fmt.Sprint(next.Policy) != fmt.Sprint(d.cfg.Policy) || fmt.Sprint(next.Store) != fmt.Sprint(d.cfg.Store) {
		restart = append(restart, "policy/store")
	}
	if next.Policy.Source == config.PolicyConfig && d.cfg.Policy.Source == config.PolicyConfig {
		p, err := configPolicy(next)
		if err != nil {
			log.Error("configuration reload refused; the running configuration stays", "err", err)
			return
		}
		ch, _ := d.engine.Apply(p, true)
		log.Info("configuration reloaded", "devices", p.Len(), "revoked", len(ch.Revoked), "changed", len(ch.Rebound))
	} else {
		log.Info("configuration reloaded")
	}
	if len(restart) > 0 {
		log.Warn("configuration changes that need a restart were not applied", "sections", strings.Join(restart, ","))
	}
	// Keep the running values of what was not applied.
	keep := *d.cfg
	keep.Devices, keep.DevicesFile, keep.Log = next.Devices, next.DevicesFile, next.Log
	d.cfg = &keep
}

// adminSocket is admin.socket, or the systemd RuntimeDirectory's admin.sock
// when the default is kept.
func (d *Daemon) adminSocket() string {
	return adminSocketFor(d.cfg.Admin.Socket, d.cfg.StateDir) // devices.go
}

// revokePairing revokes the paired refresh token at the provider, where it
// supports revocation, before a factory reset wipes it.
func (d *Daemon) revokePairing(q *queue.Queue) {
	if d.cfg.Central.Credentials != config.CredentialsPaired {
		return
	}
	creds, err := centralsync.LoadCredentials(q)
	if err != nil {
		return
	}
	var signer centralsync.AssertionSigner
	if d.identity != nil {
		signer, _ = centralsync.SignerFor(creds, d.identity)
	}
	ca, _ := loadPool(d.cfg.Central.CAFile)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	if err := centralsync.Revoke(ctx, uplink.NewHTTPClient(ca, 10*time.Second, 1), creds, signer); err != nil {
		d.log.Warn("factory reset: the refresh token could not be revoked at the provider", "err", err)
	}
}

// corrupt tells a damaged store from the failures that quarantining must
// not hide: the wrong key (its data is intact), a lock held by another
// process, a permission problem.
func corrupt(err error) bool {
	switch {
	case errors.Is(err, badger.ErrEncryptionKeyMismatch), errors.Is(err, os.ErrPermission):
		return false
	}
	msg := err.Error()
	return !strings.Contains(msg, "Cannot acquire directory lock") && !strings.Contains(msg, "resource temporarily unavailable")
}

// memoryLimit renders the Go runtime's soft memory limit in force.
func memoryLimit() string {
	n := debug.SetMemoryLimit(-1) // -1 reads it
	if n == math.MaxInt64 {
		return "none"
	}
	return config.ByteSize(n).String()
}

// brokerLimits maps mqtt.embedded.limits onto the broker's limits.
func brokerLimits(l config.BrokerLimits) mqtt.Limits {
	return mqtt.Limits{
		ConnectionsPerDevice: l.ConnectionsPerDevice, ConnectionsPerUser: l.ConnectionsPerUser,
		SubscriptionsPerClient: l.SubscriptionsPerClient, FiltersPerSubscribe: l.FiltersPerSubscribe,
		Inflight: l.Inflight, WritesPending: l.WritesPending, KeptSessionBytes: int(l.KeptSessionBytes),
		RetainedBytes: int64(l.RetainedBytes), RetainedBytesPerPrincipal: int64(l.RetainedBytesPerPrincipal),
		RetainedMessages: l.RetainedMessages, WillBytes: int(l.WillBytes), AppPacketBytes: int(l.AppPacketBytes),
		ConnectTimeout: l.ConnectTimeout, PendingConnects: l.PendingConnects, PendingConnectsPerHost: l.PendingConnectsPerHost,
		MaxKeepalive: l.MaxKeepalive,
	}
}
