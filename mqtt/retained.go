package mqtt

import (
	"sync/atomic"

	"github.com/mochi-mqtt/server/v2/packets"
)

// Retained messages (documented in README.md): a retained message is
// delivered to a subscriber only if the subscriber may read its device at
// the time of delivery (mochi checks every retained delivery with
// OnACLCheck, like any other). Data collected under one registration is
// never delivered under another: when a device is revoked or re-registered
// (new owner, keys, broker or type), its retained message is dropped
// (PurgeRetained, called on every policy change), and a reading taken
// before the change but committed after it is not delivered locally or
// retained (accessHook.generation, checked by the acker).

// PurgeRetained drops the retained messages of the given devices (revoked,
// or re-registered) and returns how many were dropped.
func (b *Broker) PurgeRetained(devices []string) int {
	return b.purgeRetained(devices, b.access.topic.Match, "dropped the retained message of a revoked or re-registered device")
}

// purgeRetained clears every retained topic whose device, as match reads
// it from the topic, is one of devices: the one pass behind PurgeRetained
// (readings) and PurgeCommands (commands).
func (b *Broker) purgeRetained(devices []string, match func(topic string) (string, bool), msg string) int {
	if len(devices) == 0 {
		return 0
	}
	set := make(map[string]bool, len(devices))
	for _, d := range devices {
		set[d] = true
	}
	n := 0
	for topic := range b.srv.Topics.Retained.GetAll() {
		dev, ok := match(topic)
		if !ok || !set[dev] {
			continue
		}
		// An empty retained payload clears the topic [MQTT-3.3.1-6].
		b.srv.Topics.RetainMessage(packets.Packet{TopicName: topic,
			FixedHeader: packets.FixedHeader{Type: packets.Publish, Retain: true}})
		n++
		b.log.Info(msg, "device", clipName(dev))
	}
	atomic.StoreInt64(&b.srv.Info.Retained, int64(b.srv.Topics.Retained.Len()))
	return n
}
