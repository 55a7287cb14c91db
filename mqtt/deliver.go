package mqtt

import (
	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// Delivery checks (documented in README.md): mochi checks a delivery with
// OnACLCheck when it routes a message to a subscriber (publishToClient),
// but writes some PUBLISH packets later without asking again: messages
// queued while an MQTT 5 client's receive maximum was exhausted (sent after
// its next acknowledgement, processPacket's NextImmediate) and messages in
// flight resent to a resumed session (ResendInflightMessages). A policy
// change in between would let them through. So every PUBLISH is checked
// once more as it is written (OnPacketEncode), against the policy in force;
// a refused one is not written (and counted).

// denyLate is the reason for a delivery refused as it was being written.
const denyLate = "not_readable_at_write"

// OnPacketEncode refuses, at write time, a PUBLISH its client may no longer
// read. mochi has no way for this hook to drop a packet; an encoded-size
// limit of one byte makes WritePacket refuse it (packets.ErrPacketTooLarge,
// clients.go), which mochi treats as a failed write: the message stays in
// flight for a session that resumes, and is checked again then.
func (h *accessHook) OnPacketEncode(cl *mochi.Client, pk packets.Packet) packets.Packet {
	if pk.FixedHeader.Type != packets.Publish || cl.Net.Inline || pk.TopicName == "" {
		// An empty topic is an MQTT 5 topic alias: its first use carried
		// the topic and was checked.
		return pk
	}
	p := h.get(cl)
	if p != nil && h.mayRead(p, pk.TopicName) {
		return pk
	}
	who := clipName(cl.ID)
	if p != nil {
		who = p.String()
	}
	h.deny("deliver", denyLate, who, "topic", clipName(pk.TopicName))
	pk.Mods.MaxSize = 1
	return pk
}
