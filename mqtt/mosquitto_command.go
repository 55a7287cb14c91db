package mqtt

import (
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	mochi "github.com/mochi-mqtt/server/v2"
)

// The downlink in external mode (internal/command, docs/actuators.md): the
// gateway's own ingest client publishes a device's signed command,
// retained, QoS 1, on the device's command topic (Topic.Command), as the
// embedded broker does (command.go). What keeps it private is Mosquitto's
// dynamic-security plugin, kept by Dynsec (mosquitto.go):
//
//   - the device's role lets it subscribe to and receive its own
//     prefix/{id}/cmd/# only, and publish nothing there;
//   - the ingest role (the gateway's account) may publish on every
//     device's command topics, and is the only role that may;
//   - app roles may neither subscribe to nor receive command topics
//     (local control is refused in external mode at config validation:
//     Mosquitto cannot hand an app's publish to the gateway before it
//     is delivered).
//
// The device confirms by publishing its new state as a reading; the command
// service clears the retained command once the platform shows it.

// commandFilter matches the command topic of every attribute of every
// device: prefix/+/cmd/#.
func (t Topic) commandFilter() string {
	out := make([]string, 0, t.device+3)
	out = append(out, t.levels[:t.device]...)
	out = append(out, "+", t.commandLevel(), "#")
	return strings.Join(out, "/")
}

// commandOverlap reports whether an ACL topic filter can match a command
// topic (prefix/{id}/cmd/{attr}): what a role the gateway does not manage
// must not grant (Dynsec.Check).
func (t Topic) commandOverlap(filter string) bool {
	if strings.HasPrefix(filter, "$share/") {
		rest := strings.TrimPrefix(filter, "$share/")
		i := strings.IndexByte(rest, '/')
		if i < 0 {
			return false
		}
		filter = rest[i+1:]
	}
	want := append(append([]string(nil), t.levels[:t.device]...), "+", t.commandLevel(), "+")
	levels := strings.Split(filter, "/")
	for i, w := range want {
		if i >= len(levels) {
			return false
		}
		f := levels[i]
		switch {
		case f == "#":
			return true
		case f == "+", w == "+", f == w:
		default:
			return false
		}
	}
	return len(levels) == len(want)
}

// heldCommands is what the client published retained and did not clear
// yet, per device and attribute, so that a revocation can purge them:
// Mosquitto offers no way to list retained messages. It is memory only;
// after a restart the command service publishes again what is still
// unconfirmed, which makes it known again.
type heldCommands struct {
	mu   sync.Mutex
	held map[string]map[string]bool
}

func (h *heldCommands) set(device, attr string, on bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if on {
		if h.held == nil {
			h.held = map[string]map[string]bool{}
		}
		if h.held[device] == nil {
			h.held[device] = map[string]bool{}
		}
		h.held[device][attr] = true
		return
	}
	delete(h.held[device], attr)
	if len(h.held[device]) == 0 {
		delete(h.held, device)
	}
}

func (h *heldCommands) take(device string) []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []string
	for a := range h.held[device] {
		out = append(out, a)
	}
	delete(h.held, device)
	return out
}

// commandTimeout bounds the wait for Mosquitto's PUBACK of a command.
const commandTimeout = 10 * time.Second

// ErrNotConnected: the client holds no connection to the broker now; the
// command service tries again later.
var ErrNotConnected = errors.New("not connected to the local broker")

func (c *Client) paho() (paho.Client, error) {
	cl, _ := c.conn.Load().(paho.Client)
	if cl == nil || !c.live.Load() || !cl.IsConnectionOpen() {
		return nil, ErrNotConnected
	}
	return cl, nil
}

// commandTopic checks that device and attr name one command topic.
func (c *Client) commandTopic(device, attr string) (string, error) {
	topic := c.opts.Topic.Command(device, attr)
	if dev, ok := c.opts.Topic.MatchCommand(topic); !ok || dev != device || strings.ContainsAny(attr, "+#/") || !mochi.IsValidFilter(topic, true) {
		return "", fmt.Errorf("%w: %q", ErrNoCommandTopic, clipName(device+"/"+attr))
	}
	return topic, nil
}

// PublishCommand publishes payload, retained, QoS 1, on the command topic
// of attr of device, and waits for Mosquitto's PUBACK. Mosquitto keeps
// the retained message (on disk with persistence on) for the device to
// get when it subscribes.
func (c *Client) PublishCommand(device, attr string, payload []byte) error {
	topic, err := c.commandTopic(device, attr)
	if err != nil {
		return err
	}
	if len(payload) == 0 {
		return fmt.Errorf("publish the command of %s: empty payload", clipName(device))
	}
	cl, err := c.paho()
	if err != nil {
		return fmt.Errorf("publish the command of %s: %w", clipName(device), err)
	}
	// Held before the publish: a revocation racing it purges it too.
	c.cmds.set(device, attr, true)
	// A publish the ACL refuses is dropped by Mosquitto 2 with a PUBACK
	// all the same (MQTT 3.1.1 has no code for it): the ingest role's
	// publish grant (ingestACLs) is what makes it land.
	if err := waitToken(cl.Publish(topic, 1, true, payload), commandTimeout); err != nil {
		return fmt.Errorf("publish the command of %s: %w", clipName(device), err)
	}
	return nil
}

// ClearCommand drops the retained command of attr of device: an empty
// retained publish [MQTT-3.3.1-10]. Best effort: a failure leaves the
// topic held, and a later clear or purge tries again.
func (c *Client) ClearCommand(device, attr string) { _ = c.TryClearCommand(device, attr) }

// TryClearCommand is ClearCommand reporting a clear Mosquitto did not
// acknowledge (no connection yet, a timeout): the command service keeps
// the topic marked held and tries again (internal/command confirm.go). A
// topic that is held by nothing is cleared all the same: after a restart
// the gateway clears what an earlier run left retained.
func (c *Client) TryClearCommand(device, attr string) error {
	topic, err := c.commandTopic(device, attr)
	if err != nil {
		return nil // no such topic: nothing can have been published there
	}
	if err := c.clear(topic); err != nil {
		return fmt.Errorf("clear the command of %s: %w", clipName(device), err)
	}
	c.cmds.set(device, attr, false)
	return nil
}

func (c *Client) clear(topic string) error {
	cl, err := c.paho()
	if err != nil {
		return err
	}
	if err := waitToken(cl.Publish(topic, 1, true, []byte{}), commandTimeout); err != nil {
		c.limited.Log(c.ctx, slog.LevelWarn, "clear", "clear a retained command; tried again later", "err", err)
		return err
	}
	return nil
}

// PurgeCommands drops the retained commands this client published for
// devices (revoked, or re-registered under another owner), so that a
// command held for one registration is never delivered under another. It
// returns how many it cleared; those it could not (no connection) are
// kept and tried again on the next purge or clear.
func (c *Client) PurgeCommands(devices []string) int {
	n := 0
	for _, d := range devices {
		for _, a := range c.cmds.take(d) {
			topic, err := c.commandTopic(d, a)
			if err != nil {
				continue
			}
			if c.clear(topic) != nil {
				c.cmds.set(d, a, true)
				continue
			}
			n++
		}
	}
	return n
}
