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
	"log/slog"
	"math"
	"net"
	"net/http"
	"os"
	"runtime/debug"
	"strings"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/edgegate/edgegate/internal/config"
	"github.com/edgegate/edgegate/internal/keys"
	"github.com/edgegate/edgegate/internal/metrics"
	"github.com/edgegate/edgegate/internal/procs"
	"github.com/edgegate/edgegate/internal/queue"
	"github.com/edgegate/edgegate/internal/supervise"
	"github.com/edgegate/edgegate/internal/uplink"
	"github.com/edgegate/edgegate/mqtt"
	"github.com/edgegate/edgegate/policy"
	centralsync "github.com/edgegate/edgegate/sync"
)

// Version is stamped at build time.
var Version = "dev"

// Daemon is one running gateway.
type Daemon struct {
	engine   *policy.Engine
	cfg      *config.Config
	log      *slog.Logger
	metrics  *metrics.Metrics
	gateway  string
	identity *keys.Identity // loaded by Run
	levels   *slog.LevelVar // the log level, changed by a reload
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

// Run runs the gateway until ctx is done (SIGTERM), a component fails or a
// factory reset, then stops it in order.
func (d *Daemon) Run(ctx context.Context) error {
	// A factory reset cancels ctx; the state is wiped once the store is
	// closed (state.close).
	ctx, reset := context.WithCancel(ctx)
	defer reset()
	st, err := d.open(reset) // store key, queue, identity, tokens, audit, engine, parts
	if err != nil {
		return err
	}
	defer st.close(d.log, d.cfg.StateDir) // after every component stopped
	// Started in this order, each once the previous is ready; stopped in
	// reverse: STOPPING=1 first, then the producers, then the queue's
	// committer (it commits what they handed it), the network last. The
	// network starts before the committer: no producer runs yet.
	err = supervise.Supervise(ctx, d.log,
		// One P while quiet, the runtime's default when busy.
		supervise.Component{Name: "procs", Run: func(ctx context.Context) error {
			return procs.Run(ctx, procs.Options{Log: d.log.With("component", "procs")})
		}},
		d.metricsHTTP(st), policySync(st), // network: stops last
		supervise.Component{Name: "uplink", Run: st.up.Run},
		supervise.Component{Name: "queue", Run: st.q.Run},
		accounts(st), d.ingest(st), radioComponent(st), commandsComponent(st), d.admin(st), // producers
		d.lifecycle(st)) // READY=1 last, STOPPING=1 first
	d.log.Info("stopped")
	return err
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
			Signing: dv.Signing, PublicKeys: keys, Kind: dv.Kind, Writable: dv.Writable,
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
