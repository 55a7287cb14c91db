package mqtt

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/edgegate/edgegate/internal/envelope"
	"github.com/edgegate/edgegate/internal/logx"
	"github.com/edgegate/edgegate/internal/metrics"
	"github.com/edgegate/edgegate/policy"
)

// External mode keeps the promise through Mosquitto's dynamic-security
// plugin (mosquitto 2.0+, mosquitto_dynamic_security.so): the gateway is a
// dynsec administrator and keeps the broker's accounts equal to the policy
// over $CONTROL/dynamic-security/v1 (the JSON command API of
// mosquitto/plugins/dynamic-security; response on .../v1/response):
//
//   - Each device of the policy has an account: username = its id, password
//     = envelope.DeriveMQTTPassword (the same credential as on the embedded
//     broker) and one role, edgegate-dev-{id}, that allows publishing to its
//     own reading topic only and denies every other publish and every
//     subscription (so the broker's default ACL does not matter for it).
//   - The gateway's ingest account gets the role edgegate-ingest: subscribe
//     to and receive every device's reading topic.
//   - What the gateway manages carries the textname "edgegate-managed ...";
//     a managed account whose device left the policy is deleted, which makes
//     Mosquitto disconnect its sessions at once. A changed key changes the
//     password (modifyClient), which disconnects it too. An unmanaged account
//     named like a device is taken over: device ids are the gateway's.
//   - Mosquitto stores password hashes only, so the textname carries a
//     fingerprint of the password (SHA-256 of a label and the password,
//     truncated; the password is 24 random bytes derived from K1/K2, so the
//     fingerprint reveals nothing) to tell a stale password without resetting
//     every account, and every device's session, at each start.
//   - Applications get accounts an operator provisions (edgegate app add):
//     see mosquitto_apps.go. An account an administrator adds by hand with
//     rights in the device namespace is
//     outside the promise: Check (what status and doctor show) names the
//     role that grants them, and the broker's default ACL when it lets every
//     account publish or subscribe; Reconcile leaves both to the
//     administrator.
//   - A password changed by hand (mosquitto_ctrl setClientPassword) is not
//     seen: Mosquitto does not let the hash be read back.
const (
	dynsecTopic    = "$CONTROL/dynamic-security/v1"
	dynsecResponse = "$CONTROL/dynamic-security/v1/response"
	managedMark    = "edgegate-managed"
	devRolePrefix  = "edgegate-dev-"
	ingestRole     = "edgegate-ingest"
)

// KeyedPolicy is what account management needs of the policy: the devices
// and their keys (policy.Engine).
type KeyedPolicy interface {
	Current() *policy.Policy
	DeviceKeys(device string) (k1, k2 string, ok bool)
}

// DynsecOptions configures account management on an external Mosquitto.
type DynsecOptions struct {
	URL      string // the broker, as for the ingest client
	ClientID string // a client id of its own (default edgegate-dynsec)
	Username string // a dynsec administrator (mosquitto_ctrl dynsec init)
	Password string
	TLS      *tls.Config
	Topic    Topic
	Policy   KeyedPolicy
	// IngestUser is the gateway's ingest account; it gets edgegate-ingest.
	IngestUser string
	// Apps lists the application accounts an operator provisioned
	// (edgegate app add); nil: none. See mosquitto_apps.go.
	Apps func() ([]AppAccount, error)
	// Interval between full reconciliations, which also repair drift
	// (default 5m). A policy change reconciles at once (Nudge).
	Interval time.Duration
	// Timeout bounds one command round trip (default 10s).
	Timeout time.Duration
	Logger  *slog.Logger
	Metrics *metrics.Metrics
}

// Dynsec keeps an external Mosquitto's accounts and ACLs equal to the
// policy. Run it as a stage; Nudge it on every policy change.
type Dynsec struct {
	opts    DynsecOptions
	log     *slog.Logger
	limited *logx.Limiter
	nudge   chan struct{}

	synced   chan struct{} // closed after the first successful reconciliation
	syncOnce sync.Once
	lastErr  atomic.Pointer[string]

	mu     sync.Mutex // one request at a time
	cl     paho.Client
	resp   chan []byte
	lost   chan struct{} // the connection dropped (Mosquitto kicks on some changes)
	serial int
}

// NewDynsec builds the manager; Run connects it.
func NewDynsec(opts DynsecOptions) *Dynsec {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With("component", "mosquitto-accounts")
	if opts.ClientID == "" {
		opts.ClientID = "edgegate-dynsec"
	}
	if opts.Interval <= 0 {
		opts.Interval = 5 * time.Minute
	}
	if opts.Timeout <= 0 {
		opts.Timeout = 10 * time.Second
	}
	return &Dynsec{opts: opts, log: log, limited: logx.NewLimiter(log, 30*time.Second),
		nudge: make(chan struct{}, 1), synced: make(chan struct{}), resp: make(chan []byte, 4), lost: make(chan struct{}, 1)}
}

// Nudge asks for a reconciliation now (a policy change); it never blocks.
func (d *Dynsec) Nudge() {
	select {
	case d.nudge <- struct{}{}:
	default:
	}
}

// Synced is closed once the broker's accounts first matched the policy.
func (d *Dynsec) Synced() <-chan struct{} { return d.synced }

// LastError is the error of the last reconciliation, or "".
func (d *Dynsec) LastError() string {
	if p := d.lastErr.Load(); p != nil {
		return *p
	}
	return ""
}

// Run connects, reconciles at once, on every Nudge and every Interval,
// until ctx ends.
func (d *Dynsec) Run(ctx context.Context) error {
	po := paho.NewClientOptions().AddBroker(d.opts.URL).SetClientID(d.opts.ClientID).
		SetCleanSession(true).SetAutoReconnect(true).SetConnectRetry(true).
		SetConnectRetryInterval(2 * time.Second).SetMaxReconnectInterval(10 * time.Second).
		SetConnectTimeout(10 * time.Second).SetWriteTimeout(10 * time.Second).
		SetUsername(d.opts.Username).SetPassword(d.opts.Password).
		SetOrderMatters(false)
	if d.opts.TLS != nil {
		po.SetTLSConfig(d.opts.TLS)
	}
	subscribed := make(chan struct{}, 1)
	po.SetOnConnectHandler(func(cl paho.Client) {
		go func() {
			for cl.IsConnectionOpen() && ctx.Err() == nil {
				tok := cl.Subscribe(dynsecResponse, 1, d.onResponse)
				err := waitToken(tok, d.opts.Timeout)
				if st, ok := tok.(*paho.SubscribeToken); ok && err == nil {
					if code, acked := st.Result()[dynsecResponse]; !acked || code >= 0x80 {
						err = errors.New("refused by the broker (no SUBACK, or 0x80)")
					}
				}
				if err == nil {
					select {
					case subscribed <- struct{}{}:
					default:
					}
					return
				}
				msg := fmt.Sprintf("subscribe to %s: %v: is the plugin loaded and %q a dynsec admin?", dynsecResponse, err, clipName(d.opts.Username))
				d.lastErr.Store(&msg)
				d.limited.Log(ctx, slog.LevelError, "sub", "cannot manage Mosquitto's accounts", "err", msg)
				select {
				case <-ctx.Done():
				case <-time.After(5 * time.Second):
				}
			}
		}()
	})
	po.SetConnectionLostHandler(func(_ paho.Client, err error) {
		// A request in flight gets no answer on this connection.
		select {
		case d.lost <- struct{}{}:
		default:
		}
		d.limited.Log(ctx, slog.LevelWarn, "lost", "connection to the broker lost; reconnecting", "err", err)
	})
	cl := paho.NewClient(po)
	d.mu.Lock()
	d.cl = cl
	d.mu.Unlock()
	cl.Connect()
	defer cl.Disconnect(250)
	tick := time.NewTicker(d.opts.Interval)
	defer tick.Stop()
	retry := time.NewTimer(time.Hour)
	retry.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-subscribed: // each (re)connection: the broker may have been reset
		case <-d.nudge:
		case <-tick.C:
		case <-retry.C:
		}
		if !cl.IsConnectionOpen() {
			continue // the next connection reconciles
		}
		rctx, cancel := context.WithTimeout(ctx, 4*d.opts.Timeout)
		n, err := d.Reconcile(rctx)
		cancel()
		if errors.Is(err, errKicked) {
			d.log.Info("Mosquitto disconnected the gateway after the change to the administrator's role, as it does; reconnecting")
			retry.Reset(time.Second)
			continue
		}
		if err != nil {
			msg := err.Error()
			d.lastErr.Store(&msg)
			if d.opts.Metrics != nil {
				d.opts.Metrics.MQTTAccountSyncErrors.Inc()
			}
			d.limited.Log(ctx, slog.LevelError, "reconcile", "Mosquitto accounts not in line with the policy; retrying", "err", err)
			retry.Reset(5 * time.Second)
			continue
		}
		d.lastErr.Store(nil)
		if n > 0 {
			d.log.Info("Mosquitto accounts updated from the policy", "changes", n)
		}
		d.syncOnce.Do(func() { close(d.synced) })
	}
}

func (d *Dynsec) onResponse(_ paho.Client, m paho.Message) {
	select {
	case d.resp <- m.Payload():
	default: // a stale response nobody waits for
	}
}

// dynCmd is one dynamic-security command; fields by the plugin's names.
type dynCmd map[string]any

type dynResponse struct {
	Command         string          `json:"command"`
	Error           string          `json:"error"`
	CorrelationData string          `json:"correlationData"`
	Data            json.RawMessage `json:"data"`
}

// do sends commands in one message and returns their responses, in order.
// Passwords travel in the payload only; errors never quote a command.
func (d *Dynsec) do(ctx context.Context, cmds []dynCmd) ([]dynResponse, error) {
	if len(cmds) == 0 {
		return nil, nil
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.cl == nil || !d.cl.IsConnectionOpen() {
		return nil, errors.New("not connected to the broker")
	}
	d.serial++
	corr := "edgegate-" + strconv.Itoa(d.serial)
	cmds[0]["correlationData"] = corr
	body, err := json.Marshal(map[string]any{"commands": cmds})
	if err != nil {
		return nil, fmt.Errorf("encode dynsec commands: %w", err)
	}
	// Drop what a timed-out request or an old connection left.
	for drained := false; !drained; {
		select {
		case <-d.resp:
		case <-d.lost:
		default:
			drained = true
		}
	}
	if err := waitToken(d.cl.Publish(dynsecTopic, 1, false, body), d.opts.Timeout); err != nil {
		return nil, fmt.Errorf("send dynsec commands: %w", err)
	}
	t := time.NewTimer(d.opts.Timeout)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-d.lost:
			return nil, errors.New("the connection to the broker dropped before its dynamic-security response")
		case <-t.C:
			return nil, fmt.Errorf("no dynamic-security response within %s: is the plugin loaded and %q a dynsec admin?", d.opts.Timeout, d.opts.Username)
		case b := <-d.resp:
			var r struct {
				Responses []dynResponse `json:"responses"`
			}
			if err := json.Unmarshal(b, &r); err != nil {
				return nil, fmt.Errorf("decode dynsec response: %w", err)
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

// dynACL is one ACL entry as the plugin lists it.
type dynACL struct {
	Type     string `json:"acltype"`
	Topic    string `json:"topic"`
	Priority int    `json:"priority"`
	Allow    bool   `json:"allow"`
}

type dynClient struct {
	Username string       `json:"username"`
	Textname string       `json:"textname"`
	Disabled bool         `json:"disabled"`
	Roles    []dynRoleRef `json:"roles"`
	Groups   []struct {
		Name string `json:"groupname"`
	} `json:"groups"`
}

type dynRoleRef struct {
	Name string `json:"rolename"`
}

type dynRole struct {
	Name     string   `json:"rolename"`
	Textname string   `json:"textname"`
	ACLs     []dynACL `json:"acls"`
}

// brokerState is what the broker holds, read back with listClients,
// listRoles and getDefaultACLAccess.
type brokerState struct {
	clients    map[string]dynClient
	roles      map[string]dynRole
	defaultACL []dynACL
}

func (d *Dynsec) read(ctx context.Context) (*brokerState, error) {
	rs, err := d.do(ctx, []dynCmd{
		{"command": "listClients", "verbose": true, "count": -1, "offset": 0},
		{"command": "listRoles", "verbose": true, "count": -1, "offset": 0},
		{"command": "getDefaultACLAccess"},
	})
	if err != nil {
		return nil, err
	}
	for _, r := range rs {
		if r.Error != "" {
			return nil, fmt.Errorf("dynsec %s: %s", r.Command, r.Error)
		}
	}
	var cl struct {
		Clients []dynClient `json:"clients"`
	}
	var ro struct {
		Roles []dynRole `json:"roles"`
	}
	var da struct {
		ACLs []dynACL `json:"acls"`
	}
	if err := errors.Join(json.Unmarshal(rs[0].Data, &cl), json.Unmarshal(rs[1].Data, &ro), json.Unmarshal(rs[2].Data, &da)); err != nil {
		return nil, fmt.Errorf("decode dynsec lists: %w", err)
	}
	st := &brokerState{clients: map[string]dynClient{}, roles: map[string]dynRole{}, defaultACL: da.ACLs}
	for _, c := range cl.Clients {
		st.clients[c.Username] = c
	}
	for _, r := range ro.Roles {
		st.roles[r.Name] = r
	}
	return st, nil
}

// wantDevice is one device account as the policy wants it.
type wantDevice struct {
	id, password, textname string
	acls                   []dynACL
}

// Device ids that cannot be an MQTT topic level or username are never given
// an account (the policy validates ids; this is the broker's own limit).
func usableDeviceID(id string) bool {
	return id != "" && !strings.ContainsAny(id, "+#/\x00") && len(id) <= 256
}

func fingerprint(password string) string {
	h := sha256.Sum256([]byte("edgegate/dynsec-fingerprint/v1\x00" + password))
	return hex.EncodeToString(h[:8])
}

func (d *Dynsec) want() (map[string]wantDevice, error) {
	out := map[string]wantDevice{}
	for _, dv := range d.opts.Policy.Current().Devices() {
		if !usableDeviceID(dv.ID) || dv.ID == d.opts.IngestUser || dv.ID == d.opts.Username {
			d.limited.Log(context.Background(), slog.LevelWarn, "id/"+clipName(dv.ID), "device not given a Mosquitto account: its id cannot be a username here", "device", clipName(dv.ID))
			continue
		}
		k1, k2, ok := d.opts.Policy.DeviceKeys(dv.ID)
		if !ok || k1 == "" || k2 == "" {
			continue // no MQTT credential without both keys
		}
		pw, err := envelope.DeriveMQTTPassword(dv.ID, k1, k2)
		if err != nil {
			return nil, fmt.Errorf("device %s: %w", dv.ID, err)
		}
		out[dv.ID] = wantDevice{id: dv.ID, password: pw,
			textname: managedMark + " device pw:" + fingerprint(pw), acls: deviceACLs(d.opts.Topic, dv.ID)}
	}
	return out, nil
}

// deviceACLs: publish on its own reading topic, subscribe to and receive
// its own command topics (the downlink, mosquitto_command.go), nothing
// else, whatever the broker's default ACL says (higher priority first).
func deviceACLs(t Topic, id string) []dynACL {
	cmds := t.Command(id, "#")
	return []dynACL{
		{Type: "publishClientSend", Topic: t.For(id), Priority: 10, Allow: true},
		{Type: "subscribePattern", Topic: cmds, Priority: 10, Allow: true},
		{Type: "publishClientReceive", Topic: cmds, Priority: 10, Allow: true},
		{Type: "publishClientSend", Topic: "#", Priority: 0, Allow: false},
		{Type: "subscribePattern", Topic: "#", Priority: 0, Allow: false},
		{Type: "publishClientReceive", Topic: "#", Priority: 0, Allow: false},
	}
}

// ingestACLs: the gateway's account reads every device's readings and is
// the one account that publishes commands.
func ingestACLs(t Topic) []dynACL {
	return []dynACL{
		{Type: "publishClientReceive", Topic: t.Filter(), Priority: 0, Allow: true},
		{Type: "subscribePattern", Topic: t.Filter(), Priority: 0, Allow: true},
		{Type: "publishClientSend", Topic: t.commandFilter(), Priority: 0, Allow: true},
	}
}

// fixACLs returns the commands that make a role's ACLs exactly want:
// removeRoleACL for every other entry, then addRoleACL for every missing
// one. The role is edited in place: deleteRole and createRole would leave
// its accounts with a role reference mosquitto 2.0.11 will not add again.
func fixACLs(role string, have, want []dynACL) []dynCmd {
	var cmds []dynCmd
	removed := map[string]bool{}
	for _, h := range have {
		if !slices.Contains(want, h) {
			k := h.Type + "\x00" + h.Topic
			if !removed[k] {
				removed[k] = true
				cmds = append(cmds, dynCmd{"command": "removeRoleACL", "rolename": role, "acltype": h.Type, "topic": h.Topic})
			}
		}
	}
	for _, w := range want {
		// An entry of the same type and topic was removed above when it
		// differed; one that matched stays, unless removed with a twin.
		if slices.Contains(have, w) && !removed[w.Type+"\x00"+w.Topic] {
			continue
		}
		cmds = append(cmds, dynCmd{"command": "addRoleACL", "rolename": role, "acltype": w.Type, "topic": w.Topic,
			"priority": w.Priority, "allow": w.Allow})
	}
	return cmds
}

func aclsArg(acls []dynACL) []map[string]any {
	out := make([]map[string]any, len(acls))
	for i, a := range acls {
		out[i] = map[string]any{"acltype": a.Type, "topic": a.Topic, "priority": a.Priority, "allow": a.Allow}
	}
	return out
}

// step is one difference between broker and policy, with the commands
// that remove it.
type step struct {
	issue string
	cmds  []dynCmd
}

// kicks reports a step that changes a role the gateway does not manage:
// the administrator's (planAdminGrant). Mosquitto disconnects the
// gateway's own clients when it runs, so it is sent last, alone.
func (s step) kicks() bool {
	if len(s.cmds) == 0 || s.cmds[0]["command"] != "addRoleACL" {
		return false
	}
	role, _ := s.cmds[0]["rolename"].(string)
	return !strings.HasPrefix(role, "edgegate-")
}

// errKicked: the step that changes the administrator's role ran and
// Mosquitto disconnected us before its response, as it does; the next
// connection reconciles again and finds it done.
var errKicked = errors.New("mosquitto disconnected the gateway's clients after a change to the administrator's role; reconnecting")

// kind is the step's metric label: what its first command does.
func (s step) kind() string {
	switch c, _ := s.cmds[0]["command"].(string); c {
	case "createClient", "createRole":
		return "create"
	case "deleteClient", "deleteRole":
		return "delete"
	case "modifyClient", "enableClient":
		return "update"
	case "addClientRole":
		return "ingest"
	default:
		return "acl"
	}
}

// plan compares the broker with the policy.
// notes are differences the gateway cannot remove itself.
func (d *Dynsec) plan(st *brokerState) ([]step, []string, error) {
	want, err := d.want()
	if err != nil {
		return nil, nil, err
	}
	var steps []step
	ids := make([]string, 0, len(want))
	for id := range want {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	for _, id := range ids {
		w := want[id]
		role := devRolePrefix + id
		if r, ok := st.roles[role]; !ok {
			steps = append(steps, step{"device " + id + ": no role " + role,
				[]dynCmd{{"command": "createRole", "rolename": role, "textname": managedMark, "acls": aclsArg(w.acls)}}})
		} else if cmds := fixACLs(role, r.ACLs, w.acls); len(cmds) > 0 {
			steps = append(steps, step{"device " + id + ": role " + role + " has other ACLs than its own topic", cmds})
		}
		c, ok := st.clients[id]
		create := dynCmd{"command": "createClient", "username": id, "password": w.password, "textname": w.textname,
			"roles": []map[string]any{{"rolename": role}}}
		switch {
		case !ok:
			steps = append(steps, step{"device " + id + ": no account", []dynCmd{create}})
		case !strings.HasPrefix(c.Textname, managedMark):
			steps = append(steps, step{"device " + id + ": an account not made by the gateway holds its name",
				[]dynCmd{{"command": "deleteClient", "username": id}, create}})
		default:
			var why []string
			if c.Textname != w.textname {
				why = append(why, "stale password")
			}
			if slices.ContainsFunc(c.Roles, func(r dynRoleRef) bool { return r.Name != role }) || len(c.Roles) == 0 {
				why = append(why, "other roles")
			}
			if len(c.Groups) > 0 {
				why = append(why, "in groups")
			}
			if c.Disabled {
				why = append(why, "disabled")
			}
			if len(why) == 0 {
				continue
			}
			cmds := []dynCmd{{"command": "modifyClient", "username": id, "password": w.password, "textname": w.textname,
				"roles": []map[string]any{{"rolename": role}}, "groups": []map[string]any{}}}
			if c.Disabled {
				cmds = append(cmds, dynCmd{"command": "enableClient", "username": id})
			}
			steps = append(steps, step{"device " + id + ": " + strings.Join(why, ", "), cmds})
		}
	}
	// Managed accounts and roles of devices no longer in the policy.
	var gone []string
	for name, c := range st.clients {
		// App accounts are planApps' (their mark starts like a device's).
		if _, ok := want[name]; !ok && strings.HasPrefix(c.Textname, managedMark) && !strings.HasPrefix(c.Textname, appMark) {
			gone = append(gone, name)
		}
	}
	sort.Strings(gone)
	for _, name := range gone {
		steps = append(steps, step{"account " + name + ": its device is not in the policy",
			[]dynCmd{{"command": "deleteClient", "username": name}}})
	}
	var stale []string
	for name, r := range st.roles {
		if strings.HasPrefix(name, devRolePrefix) && r.Textname == managedMark {
			if _, ok := want[strings.TrimPrefix(name, devRolePrefix)]; !ok {
				stale = append(stale, name)
			}
		}
	}
	sort.Strings(stale)
	for _, name := range stale {
		steps = append(steps, step{"role " + name + ": its device is not in the policy",
			[]dynCmd{{"command": "deleteRole", "rolename": name}}})
	}
	// The gateway's own read access.
	if r, ok := st.roles[ingestRole]; !ok {
		steps = append(steps, step{"no role " + ingestRole,
			[]dynCmd{{"command": "createRole", "rolename": ingestRole, "textname": managedMark, "acls": aclsArg(ingestACLs(d.opts.Topic))}}})
	} else if cmds := fixACLs(ingestRole, r.ACLs, ingestACLs(d.opts.Topic)); len(cmds) > 0 {
		steps = append(steps, step{"role " + ingestRole + " has other ACLs", cmds})
	}
	// When the ingest account is the administrator itself, its admin role
	// (mosquitto_ctrl dynsec init: subscribe and receive #) already reads
	// every device; adding a role would only make Mosquitto disconnect it
	// (dynsec kicks an account whose roles change), and us with it.
	if u := d.opts.IngestUser; u != "" && u != d.opts.Username {
		if c, ok := st.clients[u]; ok && !slices.Contains(c.Roles, dynRoleRef{ingestRole}) {
			steps = append(steps, step{"ingest account " + u + ": no role " + ingestRole,
				[]dynCmd{{"command": "addClientRole", "username": u, "rolename": ingestRole, "priority": 0}}})
		}
		// An ingest account the broker does not know is the administrator's
		// to create (its password is not the gateway's to choose); the
		// ingest client's login failure says so.
	}
	appSteps, notes, _, err := d.planApps(st, want)
	if err != nil {
		return nil, nil, err
	}
	steps = append(steps, appSteps...)
	if s, ok := d.planAdminGrant(st); ok {
		steps = append(steps, s)
	}
	return steps, notes, nil
}

// planAdminGrant: when the administrator ingests, it publishes the
// commands too (mosquitto_command.go), which its admin role (mosquitto_ctrl
// dynsec init) does not allow. The grant goes on the role it holds,
// additively: nothing of the administrator's is removed. Mosquitto
// 2.0.11 disconnects a role's clients on addRoleACL, the gateway's own
// included; so this runs once, last, alone (step.kicks); both clients
// reconnect, and the ingest session is persistent, so no reading is lost.
func (d *Dynsec) planAdminGrant(st *brokerState) (step, bool) {
	if d.opts.Username == "" || (d.opts.IngestUser != "" && d.opts.IngestUser != d.opts.Username) {
		return step{}, false
	}
	c, ok := st.clients[d.opts.Username]
	if !ok || len(c.Roles) == 0 {
		return step{}, false
	}
	grant := dynACL{Type: "publishClientSend", Topic: d.opts.Topic.commandFilter(), Priority: 0, Allow: true}
	for _, r := range c.Roles {
		if slices.ContainsFunc(st.roles[r.Name].ACLs, func(a dynACL) bool {
			return a.Type == grant.Type && a.Topic == grant.Topic && a.Allow
		}) {
			return step{}, false
		}
	}
	return step{issue: "administrator " + d.opts.Username + ": role " + c.Roles[0].Name + " may not publish commands",
		cmds: []dynCmd{{"command": "addRoleACL", "rolename": c.Roles[0].Name, "acltype": grant.Type, "topic": grant.Topic,
			"priority": grant.Priority, "allow": grant.Allow}}}, true
}

// Reconcile makes the broker's accounts equal to the policy; it returns how
// many differences it removed.
func (d *Dynsec) Reconcile(ctx context.Context) (int, error) {
	st, err := d.read(ctx)
	if err != nil {
		return 0, err
	}
	steps, notes, err := d.plan(st)
	if err != nil {
		return 0, err
	}
	d.logNotes(ctx, notes)
	// Steps go in batches (one message, one response) so a first sync of
	// many devices takes few round trips; a step is never split.
	var errs []error
	for i := 0; i < len(steps); {
		j, n := i, 0
		var cmds []dynCmd
		for ; j < len(steps) && (j == i || (n+len(steps[j].cmds) <= maxBatch && !steps[j].kicks())); j++ {
			cmds = append(cmds, steps[j].cmds...)
			n += len(steps[j].cmds)
		}
		rs, err := d.do(ctx, cmds)
		if err != nil && steps[i].kicks() {
			d.log.Info("Mosquitto account updated", "change", steps[i].issue)
			return i, errKicked
		}
		if err != nil {
			return i, fmt.Errorf("%s: %w", steps[i].issue, err)
		}
		k := 0
		for _, s := range steps[i:j] {
			for range s.cmds {
				// Deleting what is already gone is the goal reached.
				if r := rs[k]; r.Error != "" && !strings.Contains(r.Error, "not found") {
					errs = append(errs, fmt.Errorf("%s: dynsec %s: %s", s.issue, r.Command, r.Error))
				}
				k++
			}
			d.log.Info("Mosquitto account updated", "change", s.issue)
			if d.opts.Metrics != nil {
				d.opts.Metrics.MQTTAccountChanges.WithLabelValues(s.kind()).Inc()
			}
		}
		i = j
	}
	return len(steps), errors.Join(errs...)
}

// maxBatch bounds the commands sent in one dynamic-security message.
const maxBatch = 64

// Check reads the broker's accounts back and lists every way they differ
// from the policy (empty: in line), and what in the broker's defaults
// weakens the promise. It changes nothing.
func (d *Dynsec) Check(ctx context.Context) ([]string, error) {
	st, err := d.read(ctx)
	if err != nil {
		return nil, err
	}
	steps, notes, err := d.plan(st)
	if err != nil {
		return nil, err
	}
	out := make([]string, 0, len(steps)+len(notes))
	for _, s := range steps {
		out = append(out, s.issue)
	}
	out = append(out, notes...)
	out = append(out, d.foreignGrants(st)...)
	for _, a := range st.defaultACL {
		if a.Allow && (a.Type == "publishClientSend" || a.Type == "subscribe") {
			out = append(out, "default ACL allows "+a.Type+" to every account: set it to deny (mosquitto_ctrl dynsec setDefaultACLAccess "+a.Type+" deny)")
		}
	}
	return out, nil
}

// foreignGrants lists the roles the gateway does not manage that let an
// account other than the gateway's own publish or read in the device
// namespace: such an account speaks for, or reads, devices outside the
// policy. Check reports them; Reconcile leaves the administrator's roles
// alone.
func (d *Dynsec) foreignGrants(st *brokerState) []string {
	holders := map[string][]string{}
	for name, c := range st.clients {
		if name == d.opts.Username || name == d.opts.IngestUser || strings.HasPrefix(c.Textname, managedMark) {
			continue
		}
		for _, r := range c.Roles {
			holders[r.Name] = append(holders[r.Name], name)
		}
	}
	var out []string
	names := make([]string, 0, len(holders))
	for n := range holders {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, name := range names {
		r, ok := st.roles[name]
		if !ok || r.Textname == managedMark {
			continue
		}
		sort.Strings(holders[name])
		for _, a := range r.ACLs {
			if !a.Allow {
				continue
			}
			if d.opts.Topic.commandOverlap(a.Topic) {
				// Commands are the device's and the gateway's alone
				// (mosquitto_command.go).
				switch a.Type {
				case "publishClientSend":
					out = append(out, fmt.Sprintf("role %s (not the gateway's) lets %s publish commands to devices on %s", name, strings.Join(holders[name], ", "), a.Topic))
				case "subscribePattern", "subscribeLiteral":
					out = append(out, fmt.Sprintf("role %s (not the gateway's) lets %s read devices' commands on %s", name, strings.Join(holders[name], ", "), a.Topic))
				}
			}
			if _, _, inside := d.opts.Topic.classifyFilter(a.Topic); !inside {
				continue
			}
			what := ""
			switch a.Type {
			case "publishClientSend":
				what = "publish readings as devices"
			case "subscribePattern", "subscribeLiteral":
				what = "read devices' readings"
			default:
				continue
			}
			sort.Strings(holders[name])
			out = append(out, fmt.Sprintf("role %s (not the gateway's) lets %s %s on %s", name, strings.Join(holders[name], ", "), what, a.Topic))
		}
	}
	return out
}
