package mqtt

import (
	"errors"
	"fmt"
	"strings"
	"sync/atomic"

	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// The downlink on the embedded broker (internal/command, docs/actuators.md):
// the gateway publishes a device's signed command, retained, on the
// device's command topic (Topic.Command); only that device may subscribe
// to it and be delivered it (access.go, session.go mayRead). Retained, so
// that a device that connects later still gets the newest command; the
// command service clears it once the command is confirmed or expired.

// ErrNoCommandTopic: the device id cannot name a topic level.
var ErrNoCommandTopic = errors.New("device id cannot be a topic level")

// CommandTopic is the command topic of one attribute of device.
func (b *Broker) CommandTopic(device, attr string) string {
	return b.access.topic.Command(device, attr)
}

// PublishCommand publishes payload, retained, on the command topic of
// attr of device. The broker keeps retained messages in memory only:
// after a restart the command service publishes again what is still
// unconfirmed.
func (b *Broker) PublishCommand(device, attr string, payload []byte) error {
	topic := b.access.topic.Command(device, attr)
	if dev, ok := b.access.topic.MatchCommand(topic); !ok || dev != device || strings.ContainsAny(attr, "+#/") || !mochi.IsValidFilter(topic, true) {
		return fmt.Errorf("%w: %q", ErrNoCommandTopic, clipName(device+"/"+attr))
	}
	if err := b.srv.Publish(topic, payload, true, 1); err != nil {
		return fmt.Errorf("publish the command of %s: %w", clipName(device), err)
	}
	return nil
}

// ClearCommand drops the retained command of attr of device [MQTT-3.3.1-6].
func (b *Broker) ClearCommand(device, attr string) {
	topic := b.access.topic.Command(device, attr)
	if _, ok := b.srv.Topics.Retained.Get(topic); !ok {
		return
	}
	b.srv.Topics.RetainMessage(packets.Packet{TopicName: topic,
		FixedHeader: packets.FixedHeader{Type: packets.Publish, Retain: true}})
	atomic.StoreInt64(&b.srv.Info.Retained, int64(b.srv.Topics.Retained.Len()))
}

// SetLocalCommands enables local control (commands.local_control): an
// application the policy lets write a device (its owner, or a READ_WRITE,
// WRITE_ONLY or MODIFY delegation) may publish on the device's command
// topic; take receives each such publish (user, device, attribute,
// payload) and the
// raw message is delivered to nobody. Call before Run.
func (b *Broker) SetLocalCommands(take func(user, device, attr string, payload []byte) error) {
	b.access.localCommands = take
}

// onCommandPublish takes an application's publish on a command topic that
// OnACLCheck let through (local control): handed to the command service,
// acknowledged, never delivered as is. Everything else passes on.
func (h *accessHook) onCommandPublish(cl *mochi.Client, pk packets.Packet) (packets.Packet, error) {
	if cl.Net.Inline || h.localCommands == nil {
		return pk, nil
	}
	dev, ok := h.topic.MatchCommand(pk.TopicName)
	if !ok || strings.ContainsAny(pk.TopicName, "+#") {
		return pk, nil
	}
	p := h.get(cl)
	if p == nil || p.device != "" || !h.pol.Current().MayWrite(p.user, p.groups, dev) {
		// OnACLCheck refused it already; never deliver it raw.
		return pk, packets.ErrRejectPacket
	}
	attr := pk.TopicName[strings.LastIndexByte(pk.TopicName, '/')+1:]
	if err := h.localCommands(p.user, dev, attr, append([]byte(nil), pk.Payload...)); err != nil {
		h.deny("command", "refused", p.user, "device", clipName(dev), "err", err)
	}
	return pk, packets.CodeSuccessIgnore
}

// PurgeCommands drops the retained commands of devices (revoked, or
// re-registered under another owner): a command held for one registration
// is never delivered under another.
func (b *Broker) PurgeCommands(devices []string) int {
	return b.purgeRetained(devices, b.access.topic.MatchCommand, "dropped the retained command of a revoked or re-registered device")
}
