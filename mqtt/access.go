package mqtt

import (
	"bytes"
	"context"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/edgegate/edgegate/internal/accesstoken"
	"github.com/edgegate/edgegate/internal/logx"
	"github.com/edgegate/edgegate/internal/metrics"
	"github.com/edgegate/edgegate/policy"
)

// Access rules of the embedded broker (documented in README.md):
//
//   - A device logs in with username = its device id and password = the
//     credential derived from its K1/K2 (envelope.DeriveMQTTPassword),
//     compared in constant time. It may publish only to its own reading
//     topic and subscribe only to filters whose device level is its own id.
//   - An application logs in with any username that is not a device id and
//     password = an access token of the central single sign-on, verified
//     offline (package accesstoken). It may publish nothing in the device
//     namespace and subscribe to device topics: a filter naming one device
//     is accepted only when its user may read that device (policy.MayRead:
//     the owner, a READ_ACCESS / READ_WRITE / MODIFY delegation to the
//     user, the same to a group the token says the user belongs to, or a
//     public delegation to ANONYMOUS — public means any SIGNED-IN
//     application, never an anonymous client); a filter with a
//     wildcard at the device level (devices/+/telemetry, devices/#, #) is
//     accepted, and every message is then checked at delivery against the
//     policy in force — so a withdrawn delegation stops deliveries at once,
//     on existing subscriptions too, and a wildcard only ever delivers what
//     the user may read. Topics outside the device namespace are never
//     delivered to applications. Deliveries stop when the token expires,
//     and the session is closed soon after.
//   - Group membership comes from the token's "groups" claim. Keycloak puts
//     one there only when the realm (or the client scope) has a "Group
//     Membership" mapper; without it group delegations grant nothing here
//     (the platform's own check asks its LDAP instead, which the gateway
//     cannot reach offline). Groups are fixed for the session: a changed
//     membership counts from the next login (the next token).
//   - Anonymous logins are refused.

// Policy is what access control needs of the policy.
type Policy interface {
	Current() *policy.Policy
	CheckDevicePassword(device string, pw []byte) bool
}

// TokenVerifier verifies application access tokens.
type TokenVerifier interface {
	Verify(ctx context.Context, token string) (accesstoken.Claims, error)
}

// Denial reasons (metric label values).
const (
	denyAnonymous     = "anonymous"
	denyBadPassword   = "bad_password"
	denyBadToken      = "bad_token"
	denyUnknownDevice = "unknown_device"
	denyNotOwnTopic   = "not_own_topic"
	denyNotReadable   = "not_readable"
	denyOutside       = "outside_namespace"
	denyExpired       = "token_expired"
	denyAppPublish    = "app_publish"
	denyUnauthorized  = "unauthenticated"
)

type principal struct {
	device  string    // set for a device
	user    string    // set for an application
	groups  []string  // the application token's groups claim
	expires time.Time // application token expiry
	// revoked is set when a policy change closes the session (device
	// revoked or re-registered): its will is never sent.
	revoked atomic.Bool
}

func (p *principal) String() string {
	if p.device != "" {
		return "device " + p.device
	}
	return "user " + p.user
}

// accessHook authenticates clients and decides every publish, subscribe
// and delivery.
type accessHook struct {
	mochi.HookBase
	pol     Policy
	tokens  TokenVerifier // nil: applications are refused
	topic   Topic
	log     *slog.Logger
	limited *logx.Limiter
	m       *metrics.Metrics
	now     func() time.Time
	onDeny  func(action, reason, who string)
	// localCommands, when set (commands.local_control), takes commands
	// that applications with a write grant publish on a command topic.
	localCommands func(user, device, attr string, payload []byte) error

	srv *mochi.Server // sessions, CONNACK refusals and wills; set by NewBroker

	mu         sync.Mutex
	principals map[*mochi.Client]*principal
	owners     map[string]string        // client id → key of the principal whose session holds it
	claims     map[string]*mochi.Client // client id → connection establishing its session
	wills      map[*mochi.Client]*heldWill
	delayed    map[string]*pendingWill // by client id
	gens       map[string]uint64       // device → registration changes seen (generation)
	stopped    bool
}

func newAccessHook(pol Policy, tokens TokenVerifier, topic Topic, log *slog.Logger, m *metrics.Metrics) *accessHook {
	return &accessHook{
		pol: pol, tokens: tokens, topic: topic, log: log, m: m, now: time.Now,
		limited:    logx.NewLimiter(log, 30*time.Second),
		principals: map[*mochi.Client]*principal{},
		owners:     map[string]string{},
		claims:     map[string]*mochi.Client{},
		wills:      map[*mochi.Client]*heldWill{},
		delayed:    map[string]*pendingWill{},
		gens:       map[string]uint64{},
	}
}

func (h *accessHook) ID() string { return "edgegate-access" }

func (h *accessHook) Provides(b byte) bool {
	return bytes.Contains([]byte{mochi.OnConnectAuthenticate, mochi.OnACLCheck, mochi.OnDisconnect, mochi.OnClientExpired, mochi.OnSessionEstablished,
		mochi.OnPacketEncode, mochi.OnPublish}, []byte{b})
}

// OnPublish takes local commands (command.go); readings pass on to the
// ingest hook.
func (h *accessHook) OnPublish(cl *mochi.Client, pk packets.Packet) (packets.Packet, error) {
	return h.onCommandPublish(cl, pk)
}

func (h *accessHook) deny(action, reason, who string, args ...any) {
	if h.m != nil {
		h.m.AccessDenied.WithLabelValues(action, reason).Inc()
	}
	if h.onDeny != nil {
		h.onDeny(action, reason, who)
	}
	h.limited.Log(context.Background(), slog.LevelWarn, action+"/"+reason+"/"+who, "local MQTT access denied",
		append([]any{"action", action, "reason", reason, "who", who}, args...)...)
}

// OnConnectAuthenticate never logs the password.
func (h *accessHook) OnConnectAuthenticate(cl *mochi.Client, pk packets.Packet) bool {
	if cl.Net.Inline {
		return true
	}
	user := string(pk.Connect.Username)
	who := clipName(user)
	if user == "" {
		h.deny("connect", denyAnonymous, cl.Net.Remote)
		return false
	}
	if _, isDevice := h.pol.Current().Device(user); isDevice {
		if !h.pol.CheckDevicePassword(user, pk.Connect.Password) {
			h.deny("connect", denyBadPassword, who, "remote", cl.Net.Remote)
			return false
		}
		return h.admit(cl, pk, &principal{device: user})
	}
	if h.tokens == nil {
		// Without an SSO issuer only devices can log in.
		h.deny("connect", denyUnknownDevice, who, "remote", cl.Net.Remote)
		return false
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	pw := string(pk.Connect.Password)
	if strings.Count(pw, ".") != 2 {
		// Not an access token's shape: a device the policy does not list
		// (the likelier mistake), said as such rather than "bad token".
		h.deny("connect", denyUnknownDevice, who, "remote", cl.Net.Remote)
		return false
	}
	c, err := h.tokens.Verify(ctx, pw)
	if err != nil {
		h.deny("connect", denyBadToken, who, "remote", cl.Net.Remote, "err", err)
		return false
	}
	if !h.admit(cl, pk, &principal{user: c.User, groups: c.Groups, expires: c.Expiry}) {
		return false
	}
	h.log.Info("application connected", "user", c.User, "client", clipName(cl.ID))
	return true
}

func (h *accessHook) get(cl *mochi.Client) *principal {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.principals[cl]
}

// OnDisconnect sends a due will and forgets the connection (session.go).
func (h *accessHook) OnDisconnect(cl *mochi.Client, err error, expire bool) {
	h.disconnected(cl, err, expire)
}

// OnACLCheck is called with a topic for a publish, with a filter for a
// subscribe, and with a topic for every delivery.
func (h *accessHook) OnACLCheck(cl *mochi.Client, topic string, write bool) bool {
	if cl.Net.Inline {
		return true
	}
	p := h.get(cl)
	if p == nil {
		h.deny(actionOf(write), denyUnauthorized, clipName(cl.ID))
		return false
	}
	if p.device != "" {
		if cmdDev, isCmd := h.topic.MatchCommand(topic); isCmd {
			// Its own command topic: a device subscribes to it and is
			// delivered what the gateway publishes there; it never
			// publishes on it (nor on another device's).
			if write || cmdDev != p.device {
				h.deny(actionOf(write), denyNotOwnTopic, p.device, "topic", clipName(topic))
				return false
			}
			return true
		}
		if write {
			dev, ok := h.topic.Match(topic)
			if !ok || dev != p.device {
				h.deny("publish", denyNotOwnTopic, p.device, "topic", clipName(topic))
				return false
			}
			return true
		}
		dev, wildcard, inside := h.topic.classifyFilter(topic)
		if !inside || wildcard || dev != p.device {
			h.deny("subscribe", denyNotOwnTopic, p.device, "filter", clipName(topic))
			return false
		}
		return true
	}
	// An application.
	if write {
		if dev, isCmd := h.topic.MatchCommand(topic); isCmd && h.localCommands != nil && !strings.ContainsAny(topic, "+#") &&
			h.pol.Current().MayWrite(p.user, p.groups, dev) {
			// Local control (commands.local_control): the publish is
			// taken in by the command service (OnPublish, command.go),
			// signed and queued like a command from the platform; the
			// raw message itself never reaches the device.
			return true
		}
		h.deny("publish", denyAppPublish, p.user, "topic", clipName(topic))
		return false
	}
	if !p.expires.IsZero() && h.now().After(p.expires) {
		h.deny("deliver", denyExpired, p.user)
		return false
	}
	dev, wildcard, inside := h.topic.classifyFilter(topic)
	switch {
	case !inside:
		h.deny("subscribe", denyOutside, p.user, "filter", clipName(topic))
		return false
	case wildcard:
		return true // each delivery is checked with its concrete topic
	case !h.pol.Current().MayRead(p.user, p.groups, dev):
		h.deny("read", denyNotReadable, p.user, "device", clipName(dev))
		return false
	}
	return true
}

func actionOf(write bool) string {
	if write {
		return "publish"
	}
	return "read"
}

// sessions returns the clients whose principal matches.
func (h *accessHook) sessions(match func(*principal) bool) []*mochi.Client {
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []*mochi.Client
	for cl, p := range h.principals {
		if match(p) {
			out = append(out, cl)
		}
	}
	return out
}

// classifyFilter tells whether a topic or filter lies in the device
// namespace of the pattern, and which device it names; wildcard is true
// when the device level is a wildcard. Shared subscriptions
// ($share/group/filter) are classified by their filter.
func (t Topic) classifyFilter(filter string) (device string, wildcard, inside bool) {
	if strings.HasPrefix(filter, "$share/") {
		rest := strings.TrimPrefix(filter, "$share/")
		i := strings.IndexByte(rest, '/')
		if i < 0 {
			return "", false, false
		}
		filter = rest[i+1:]
	}
	levels := strings.Split(filter, "/")
	for i, pl := range t.levels {
		if i >= len(levels) {
			return "", false, false
		}
		f := levels[i]
		if f == "#" {
			if i <= t.device {
				return "", true, true
			}
			return device, wildcard, true
		}
		switch {
		case i == t.device:
			if f == "+" {
				wildcard = true
			} else if f == "" || strings.ContainsAny(f, "#+") {
				return "", false, false
			} else {
				device = f
			}
		case f != "+" && f != pl:
			return "", false, false
		}
	}
	if len(levels) != len(t.levels) {
		return "", false, false
	}
	return device, wildcard, true
}

func clipName(s string) string { return logx.Clip(s, 64) }
