package central

import (
	"context"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/edgegate/edgegate/internal/backoff"
	"github.com/edgegate/edgegate/internal/keys"
	"github.com/edgegate/edgegate/internal/logx"
	centralsync "github.com/edgegate/edgegate/sync"
)

// Push through an external broker (push.mode: external): a Mosquitto (or
// a tree of bridged Mosquittos) the operator runs, with the
// dynamic-security plugin. The companion:
//
//   - publishes each new bundle retained, QoS 1, on
//     edgegate/gateways/{gw}/policy with its own account, waiting for the
//     broker's PUBACK while it holds the gateway's publish lock (the
//     store's PublishLocked: a PostgreSQL advisory lock shared by every
//     replica), so the broker stores the versions of a gateway in order
//     and a retained version N is never replaced by N-1;
//   - gives each gateway an account: username edgegate-gw-{gw}, client id
//     edgegate-{gw} (the only one the broker accepts for it, so no other
//     account can take its session over), one role edgegate-gw-{gw} that
//     may subscribe to and receive its own topic only and publish nothing
//     (createRole/createClient on $CONTROL/dynamic-security/v1, as
//     mqtt/mosquitto.go drives the plugin for the gateway's own devices);
//   - derives each gateway's password from the store key (HKDF, then
//     HMAC of the gateway id), so every replica (which must share the
//     store key) provisions and hands out the same password without any
//     state, and hands it to the gateway over the authenticated HTTPS API
//     (GET .../push-credentials, sync/push.go), never over MQTT.
//
// Mosquitto keeps only the password's hash; the client's textname carries
// a fingerprint of the password, so a replica tells a stale account (the
// store key changed) from a good one without resetting it.
//
// The command round trip (brokerConn.do) speaks the same protocol as
// mqtt.Dynsec.do; that one is bound to the gateway's reconcile loop and
// its policy, so it is not shared (a common transport in mqtt is the
// obvious next step).
const (
	gwUserPrefix  = "edgegate-gw-"
	gwRolePrefix  = "edgegate-gw-"
	pushMark      = "edgegate-central"
	dynsecTopic   = "$CONTROL/dynamic-security/v1"
	dynsecReply   = "$CONTROL/dynamic-security/v1/response"
	extWait       = 10 * time.Second // every paho wait and dynsec round trip
	passwordLabel = "edgegate-central gateway push passwords v1"
)

// extPush is the publisher of push.mode: external: one connection to
// push.brokers (publishes, keeps accounts) and one to each leaf broker
// (keeps accounts only).
type extPush struct {
	s        *Service
	cfg      PushConfig
	password string
	tls      *tls.Config
	secret   []byte // derives the gateways' passwords
	log      *slog.Logger
	limited  *logx.Limiter
	cancel   context.CancelFunc
	wg       sync.WaitGroup
	ready    chan struct{} // closed after every broker's first session was set up
	conns    []*brokerConn // [0] publishes

	dirtyMu sync.Mutex
	dirty   map[string]bool // gateways whose last push failed: pushed again after a reconnect
}

// brokerConn is one broker's session: its dynamic-security requests and
// the gateway accounts this session saw in place.
type brokerConn struct {
	p       *extPush
	urls    []string
	name    string // for logs: the first URL
	publish bool
	ready   chan struct{}

	mu sync.Mutex // guards cl
	cl paho.Client

	reqMu  sync.Mutex // one dynamic-security request at a time
	resp   chan []byte
	serial int

	accMu    sync.Mutex
	accounts map[string]bool
}

// pushSecret derives the key of the gateways' push passwords from the
// store key: the same store key in every replica (required for
// PostgreSQL) gives the same gateway passwords everywhere, and
// ExportDynsecAccounts writes the same ones offline.
func pushSecret(stateDir string) ([]byte, error) {
	key, _, err := keys.LoadStoreKey(StoreKeyCredential, filepath.Join(stateDir, "store.key"), os.Getenv)
	if err != nil {
		return nil, err
	}
	return pushSecretOf(key)
}

func pushSecretOf(key []byte) ([]byte, error) {
	secret, err := hkdf.Key(sha256.New, key, nil, passwordLabel, 32)
	if err != nil {
		return nil, fmt.Errorf("derive the push password key: %w", err)
	}
	return secret, nil
}

// StartExternalPush connects to push.brokers and push.leaf_brokers (and
// keeps reconnecting with backoff until Close) and makes the first the
// service's publisher. It returns at once; PushReady tells when every
// broker's first session is set up.
func (s *Service) StartExternalPush(ctx context.Context) error {
	c := s.cfg.Push
	if c.Mode != PushExternal {
		return errors.New("push.mode is not external")
	}
	pw, err := ReadSecretFile("push.password_file", c.PasswordFile)
	if err != nil {
		return err
	}
	tc := &tls.Config{MinVersion: tls.VersionTLS12}
	if c.CAFile != "" {
		pem, err := os.ReadFile(c.CAFile)
		if err != nil {
			return fmt.Errorf("push.ca_file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return fmt.Errorf("push.ca_file %s: no PEM certificate", c.CAFile)
		}
		tc.RootCAs = pool
	}
	secret, err := pushSecret(s.cfg.StateDir)
	if err != nil {
		return err
	}
	log := s.log.With("component", "central-push")
	rctx, cancel := context.WithCancel(ctx)
	p := &extPush{s: s, cfg: c, password: pw, tls: tc, secret: secret, log: log, limited: logx.NewLimiter(log, 30*time.Second),
		cancel: cancel, ready: make(chan struct{}), dirty: map[string]bool{}}
	p.conns = append(p.conns, p.newConn(c.Brokers, true))
	for _, u := range c.LeafBrokers {
		p.conns = append(p.conns, p.newConn([]string{u}, false))
	}
	s.ext, s.push = p, p
	for _, bc := range p.conns {
		p.wg.Go(func() { bc.run(rctx) })
	}
	go func() {
		for _, bc := range p.conns {
			select {
			case <-bc.ready:
			case <-rctx.Done():
				return
			}
		}
		close(p.ready)
	}()
	return nil
}

func (p *extPush) newConn(urls []string, publish bool) *brokerConn {
	return &brokerConn{p: p, urls: urls, name: urls[0], publish: publish, ready: make(chan struct{}),
		resp: make(chan []byte, 4), accounts: map[string]bool{}}
}

// PushReady is closed once every external broker's first session is set
// up (connected, subscribed, accounts read); nil in embedded mode.
func (s *Service) PushReady() <-chan struct{} {
	if s.ext == nil {
		return nil
	}
	return s.ext.ready
}

// credentials is what GET .../push-credentials answers for gw.
func (p *extPush) credentials(gw string) centralsync.PushCredentials {
	return centralsync.PushCredentials{Username: gwUserPrefix + gw, Password: p.gatewayPassword(gw), ClientID: "edgegate-" + gw}
}

func (p *extPush) gatewayPassword(gw string) string {
	m := hmac.New(sha256.New, p.secret)
	m.Write([]byte(gw))
	return base64.RawURLEncoding.EncodeToString(m.Sum(nil))
}

// pushFingerprint tells one password from another; the password is 32
// bytes from a keyed hash, so its fingerprint reveals nothing of it.
func pushFingerprint(password string) string {
	h := sha256.Sum256([]byte("edgegate-central/push-fingerprint/v1\x00" + password))
	return hex.EncodeToString(h[:8])
}

func gwTextname(password string) string { return pushMark + " gateway pw:" + pushFingerprint(password) }

// gatewayACLs: subscribe to and receive the gateway's own topic only,
// publish nothing. subscribeLiteral, not a pattern: a wildcard filter
// that would match the topic (edgegate/gateways/+/policy) is refused.
func gatewayACLs(gw string) []map[string]any {
	t := centralsync.PushTopic(gw)
	return []map[string]any{
		{"acltype": "subscribeLiteral", "topic": t, "priority": 10, "allow": true},
		{"acltype": "publishClientReceive", "topic": t, "priority": 10, "allow": true},
		{"acltype": "subscribePattern", "topic": "#", "priority": 0, "allow": false},
		{"acltype": "publishClientReceive", "topic": "#", "priority": 0, "allow": false},
		{"acltype": "publishClientSend", "topic": "#", "priority": 0, "allow": false},
	}
}

func (p *extPush) close() {
	p.cancel()
	p.wg.Wait()
}

// ensureAccount puts gw's account in place on the publishing broker (an
// error) and on each leaf broker: a leaf that is down gets it when it is
// back (createMissing) and blocks neither the push nor the gateways on
// the other brokers.
func (p *extPush) ensureAccount(ctx context.Context, gw string) error {
	if err := p.conns[0].ensureAccount(ctx, gw); err != nil {
		return fmt.Errorf("broker %s: %w", p.conns[0].name, err)
	}
	for _, bc := range p.conns[1:] {
		if err := bc.ensureAccount(ctx, gw); err != nil {
			p.limited.Log(ctx, slog.LevelWarn, "leaf-account/"+bc.name, "gateway account not created on a leaf broker yet; created when it is back",
				"broker", bc.name, "gateway", gw, "err", err)
		}
	}
	return nil
}

// publish implements publisher: the gateway's accounts first, then the
// bundle, retained, QoS 1, returning after the broker's PUBACK. A failed
// push is pushed again (the newest bundle) after the next reconnect.
func (p *extPush) publish(gw, bundle string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 3*extWait)
	defer cancel()
	err := p.ensureAccount(ctx, gw)
	if err == nil {
		err = p.conns[0].publishBundle(gw, bundle)
	}
	p.dirtyMu.Lock()
	if err != nil {
		p.dirty[gw] = true
	} else {
		delete(p.dirty, gw)
	}
	p.dirtyMu.Unlock()
	return err
}

// republish pushes the newest bundle of each gateway whose push failed.
func (p *extPush) republish(ctx context.Context) {
	p.dirtyMu.Lock()
	var gws []string
	for gw := range p.dirty {
		gws = append(gws, gw)
	}
	p.dirtyMu.Unlock()
	for _, gw := range gws {
		err := p.s.store.PublishLocked(ctx, gw, func(cur GatewayRecord) error {
			if cur.Bundle == "" {
				return nil
			}
			return p.publish(gw, cur.Bundle)
		})
		if err != nil {
			p.limited.Log(ctx, slog.LevelWarn, "republish", "push after reconnect failed", "gateway", gw, "err", err)
		}
	}
}

func (bc *brokerConn) client() paho.Client {
	bc.mu.Lock()
	defer bc.mu.Unlock()
	if bc.cl == nil || !bc.cl.IsConnectionOpen() {
		return nil
	}
	return bc.cl
}

// run keeps one session at a time, reconnecting with backoff.
func (bc *brokerConn) run(ctx context.Context) {
	p := bc.p
	bo := backoff.New(time.Second, time.Minute)
	var once sync.Once
	for {
		err := bc.session(ctx, func() { bo.Reset(); once.Do(func() { close(bc.ready) }) })
		if ctx.Err() != nil {
			return
		}
		d := bo.Fail()
		p.limited.Log(ctx, slog.LevelWarn, "session/"+bc.name, "external push broker unreachable or lost; reconnecting",
			"broker", bc.name, "err", err, "retry_in", d.Round(time.Millisecond))
		select {
		case <-ctx.Done():
			return
		case <-time.After(d):
		}
	}
}

// session connects (paho's own reconnect off: this loop owns retries and
// each session is a new client id, so no old session's in-flight publish
// is ever resent after a newer one), subscribes to the dynamic-security
// responses, reads which gateway accounts exist and creates the missing
// ones (a broker reset, a new leaf), pushes again what failed, and waits
// for the connection to end.
func (bc *brokerConn) session(ctx context.Context, up func()) error {
	p := bc.p
	lost := make(chan error, 1)
	suffix := make([]byte, 4)
	_, _ = rand.Read(suffix)
	o := paho.NewClientOptions().SetClientID(p.cfg.ClientID + "-" + hex.EncodeToString(suffix)).
		SetUsername(p.cfg.Username).SetPassword(p.password).SetTLSConfig(p.tls).
		SetCleanSession(true).SetAutoReconnect(false).SetConnectRetry(false).
		SetConnectTimeout(extWait).SetWriteTimeout(extWait).SetKeepAlive(30 * time.Second).SetPingTimeout(10 * time.Second).
		SetOrderMatters(false).
		SetConnectionLostHandler(func(_ paho.Client, err error) {
			select {
			case lost <- err:
			default:
			}
		})
	for _, b := range bc.urls {
		o.AddBroker(b)
	}
	cl := paho.NewClient(o)
	if err := wait(cl.Connect(), "connect"); err != nil {
		cl.Disconnect(0)
		return err
	}
	defer cl.Disconnect(250)
	st := cl.Subscribe(dynsecReply, 1, func(_ paho.Client, m paho.Message) {
		select {
		case bc.resp <- m.Payload():
		default: // a stale answer nobody waits for
		}
	})
	if err := wait(st, "subscribe "+dynsecReply); err != nil {
		return err
	}
	if code := st.(*paho.SubscribeToken).Result()[dynsecReply]; code >= 0x80 {
		return fmt.Errorf("subscribe %s: refused: is %q a dynamic-security administrator?", dynsecReply, p.cfg.Username)
	}
	bc.mu.Lock()
	bc.cl = cl
	bc.mu.Unlock()
	defer func() {
		bc.mu.Lock()
		bc.cl = nil
		bc.mu.Unlock()
	}()
	if err := bc.readAccounts(ctx); err != nil {
		return err
	}
	if err := bc.createMissing(ctx); err != nil {
		return err
	}
	p.log.Info("connected to the external push broker", "broker", bc.name, "account", p.cfg.Username, "publishes", bc.publish)
	up()
	if bc.publish {
		p.republish(ctx)
	}
	select {
	case <-ctx.Done():
		return nil
	case err := <-lost:
		return fmt.Errorf("connection lost: %w", err)
	}
}

// createMissing creates the account of every gateway that has a bundle
// and none on this broker; on the publishing broker their bundles are
// pushed again (republish, after it).
func (bc *brokerConn) createMissing(ctx context.Context) error {
	recs, err := bc.p.s.store.Gateways(ctx)
	if err != nil {
		return fmt.Errorf("list the gateways: %w", err)
	}
	n := 0
	for _, r := range recs {
		if r.Bundle == "" {
			continue
		}
		bc.accMu.Lock()
		ok := bc.accounts[r.ID]
		bc.accMu.Unlock()
		if ok {
			continue
		}
		if err := bc.ensureAccount(ctx, r.ID); err != nil {
			return err
		}
		n++
		if bc.publish {
			// No account: a new or reset broker, which holds no retained
			// bundle for the gateway either.
			bc.p.dirtyMu.Lock()
			bc.p.dirty[r.ID] = true
			bc.p.dirtyMu.Unlock()
		}
	}
	if n > 0 {
		bc.p.log.Info("gateway accounts created on the push broker", "broker", bc.name, "accounts", n)
	}
	return nil
}

func wait(t paho.Token, what string) error {
	if !t.WaitTimeout(extWait) {
		return fmt.Errorf("%s: no answer within %s", what, extWait)
	}
	if err := t.Error(); err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	return nil
}

func (bc *brokerConn) publishBundle(gw, bundle string) error {
	cl := bc.client()
	if cl == nil {
		return fmt.Errorf("not connected to the push broker %s", bc.name)
	}
	topic := centralsync.PushTopic(gw)
	return wait(cl.Publish(topic, 1, true, []byte(bundle)), "publish to "+topic)
}

// ensureAccount creates gw's role and account unless this session saw
// them in place; concurrent replicas may race: "already exists" is
// success, and an account with another password (another store key) is
// given this one.
func (bc *brokerConn) ensureAccount(ctx context.Context, gw string) error {
	if !gatewayIDRE.MatchString(gw) {
		return fmt.Errorf("gateway id %q cannot be an MQTT username or topic level", clip(gw))
	}
	bc.accMu.Lock()
	ok := bc.accounts[gw]
	bc.accMu.Unlock()
	if ok {
		return nil
	}
	pw := bc.p.gatewayPassword(gw)
	user, role := gwUserPrefix+gw, gwRolePrefix+gw
	rs, err := bc.do(ctx, []map[string]any{
		{"command": "createRole", "rolename": role, "textname": pushMark, "acls": gatewayACLs(gw)},
		{"command": "createClient", "username": user, "password": pw, "clientid": "edgegate-" + gw, "textname": gwTextname(pw),
			"roles": []map[string]any{{"rolename": role}}},
	})
	if err != nil {
		return fmt.Errorf("create the broker account of gateway %s: %w", gw, err)
	}
	if e := rs[0].Error; e != "" && !strings.Contains(e, "already exists") {
		return fmt.Errorf("create the broker role of gateway %s: dynsec: %s", gw, e)
	}
	if e := rs[1].Error; e != "" {
		if !strings.Contains(e, "already exists") {
			return fmt.Errorf("create the broker account of gateway %s: dynsec: %s", gw, e)
		}
		if err := bc.repairAccount(ctx, gw, pw); err != nil {
			return err
		}
	}
	bc.accMu.Lock()
	bc.accounts[gw] = true
	bc.accMu.Unlock()
	return nil
}

func (bc *brokerConn) forget(gw string) {
	bc.accMu.Lock()
	delete(bc.accounts, gw)
	bc.accMu.Unlock()
}

// repairAccount makes an existing account gw's: its password (only when
// the fingerprint differs: a new password disconnects the gateway), its
// client id and its one role.
func (bc *brokerConn) repairAccount(ctx context.Context, gw, pw string) error {
	user, role := gwUserPrefix+gw, gwRolePrefix+gw
	rs, err := bc.do(ctx, []map[string]any{{"command": "getClient", "username": user}})
	if err != nil {
		return fmt.Errorf("read the broker account of gateway %s: %w", gw, err)
	}
	var got struct {
		Client dynClient `json:"client"`
	}
	if rs[0].Error != "" || json.Unmarshal(rs[0].Data, &got) != nil {
		return fmt.Errorf("read the broker account of gateway %s: dynsec: %s", gw, rs[0].Error)
	}
	if got.Client.good(gw, pw) {
		return nil
	}
	bc.p.log.Warn("gateway's broker account differs from the companion's; repairing it", "gateway", gw, "broker", bc.name)
	rs, err = bc.do(ctx, []map[string]any{
		{"command": "setClientPassword", "username": user, "password": pw},
		{"command": "modifyClient", "username": user, "clientid": "edgegate-" + gw, "textname": gwTextname(pw),
			"roles": []map[string]any{{"rolename": role}}, "groups": []map[string]any{}},
		{"command": "enableClient", "username": user},
	})
	if err == nil {
		for _, r := range rs {
			if r.Error != "" {
				err = fmt.Errorf("dynsec %s: %s", r.Command, r.Error)
			}
		}
	}
	if err != nil {
		return fmt.Errorf("repair the broker account of gateway %s: %w", gw, err)
	}
	return nil
}

type dynClient struct {
	Username string `json:"username"`
	ClientID string `json:"clientid"`
	Textname string `json:"textname"`
	Disabled bool   `json:"disabled"`
	Roles    []struct {
		Name string `json:"rolename"`
	} `json:"roles"`
}

func (c dynClient) good(gw, pw string) bool {
	return c.Textname == gwTextname(pw) && c.ClientID == "edgegate-"+gw && !c.Disabled &&
		len(c.Roles) == 1 && c.Roles[0].Name == gwRolePrefix+gw
}

// readAccounts lists the broker's clients once per session: the gateways
// whose accounts are in place need no command before their next push.
func (bc *brokerConn) readAccounts(ctx context.Context) error {
	rs, err := bc.do(ctx, []map[string]any{{"command": "listClients", "verbose": true, "count": -1, "offset": 0}})
	if err != nil {
		return fmt.Errorf("list the broker's accounts: %w", err)
	}
	var l struct {
		Clients []dynClient `json:"clients"`
	}
	if rs[0].Error != "" || json.Unmarshal(rs[0].Data, &l) != nil {
		return fmt.Errorf("list the broker's accounts: dynsec: %s", rs[0].Error)
	}
	good := map[string]bool{}
	for _, c := range l.Clients {
		if gw, ok := strings.CutPrefix(c.Username, gwUserPrefix); ok && c.good(gw, bc.p.gatewayPassword(gw)) {
			good[gw] = true
		}
	}
	bc.accMu.Lock()
	bc.accounts = good
	bc.accMu.Unlock()
	return nil
}

type dynResponse struct {
	Command         string          `json:"command"`
	Error           string          `json:"error"`
	CorrelationData string          `json:"correlationData"`
	Data            json.RawMessage `json:"data"`
}

// do sends commands in one message on $CONTROL/dynamic-security/v1 and
// returns their responses in order (the protocol mqtt.Dynsec.do speaks
// for the gateway's own accounts). Passwords travel in the payload only;
// errors never quote a command.
func (bc *brokerConn) do(ctx context.Context, cmds []map[string]any) ([]dynResponse, error) {
	bc.reqMu.Lock()
	defer bc.reqMu.Unlock()
	cl := bc.client()
	if cl == nil {
		return nil, fmt.Errorf("not connected to the push broker %s", bc.name)
	}
	bc.serial++
	corr := "edgegate-central-" + strconv.Itoa(bc.serial)
	cmds[0]["correlationData"] = corr
	body, err := json.Marshal(map[string]any{"commands": cmds})
	if err != nil {
		return nil, fmt.Errorf("encode dynsec commands: %w", err)
	}
	for drained := false; !drained; {
		select {
		case <-bc.resp:
		default:
			drained = true
		}
	}
	// QoS 0: with QoS 1 Mosquitto writes the PUBACK and then the
	// response as two small segments, and Nagle holds the second until
	// the client's delayed ACK: 44 ms per command instead of 0.1 ms
	// (measured on loopback; 1,000 accounts took 95 s instead of ~2 s). A
	// command lost with its connection gets no response: the wait below
	// times out and the caller retries, as with QoS 1 on a clean session.
	if err := wait(cl.Publish(dynsecTopic, 0, false, body), "send dynsec commands"); err != nil {
		return nil, err
	}
	t := time.NewTimer(extWait)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-t.C:
			return nil, fmt.Errorf("no dynamic-security answer within %s: is the plugin loaded and %q an administrator?", extWait, bc.p.cfg.Username)
		case b := <-bc.resp:
			var r struct {
				Responses []dynResponse `json:"responses"`
			}
			if err := json.Unmarshal(b, &r); err != nil {
				return nil, fmt.Errorf("decode dynsec answer: %w", err)
			}
			if len(r.Responses) == 0 || r.Responses[0].CorrelationData != corr {
				continue // another request's
			}
			if len(r.Responses) != len(cmds) {
				return nil, fmt.Errorf("dynsec answered %d of %d commands", len(r.Responses), len(cmds))
			}
			return r.Responses, nil
		}
	}
}

// handlePushCredentials answers a gateway's own push credentials; the
// account is created first, so the gateway can connect at once.
func (s *Service) handlePushCredentials(w http.ResponseWriter, r *http.Request) {
	gw, ok := s.gatewayRequest(w, r)
	if !ok {
		return
	}
	if s.ext == nil {
		apiError(w, http.StatusNotFound, "not_found", "this companion pushes on its own broker: the MQTT password is the access token")
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 3*extWait)
	defer cancel()
	// A gateway asks when it has none or the broker refused them: check
	// the account again rather than trust this session's list (an
	// operator may have deleted or changed it since).
	for _, bc := range s.ext.conns {
		bc.forget(gw)
	}
	if err := s.ext.ensureAccount(ctx, gw); err != nil {
		s.log.Warn("push credentials not served: the broker account is not in place", "gateway", gw, "err", err)
		w.Header().Set("Retry-After", "10")
		apiError(w, http.StatusServiceUnavailable, "unavailable", "the push broker account is not ready")
		return
	}
	w.Header().Set("Cache-Control", "no-store")
	writeJSON(w, http.StatusOK, s.ext.credentials(gw))
}
