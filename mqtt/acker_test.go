package mqtt

import (
	"io"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
)

// TestAcksShareWrites: 48 QoS 1 publishes sent at once on one connection
// are acknowledged in publish order, and the acknowledgements of readings
// committed together go out in one write: far fewer writes than PUBACKs.
func TestAcksShareWrites(t *testing.T) {
	e := newAccessEnv(t)
	c, code := e.wireConnect(wireOpts{user: "a1", password: e.devicePassword("a1"), id: "acks-a1", clean: true})
	if code != 0 {
		t.Fatalf("CONNACK %d", code)
	}
	const n = 48
	var burst []byte
	for i := range n {
		burst = append(burst, encode(t, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1},
			TopicName: "devices/a1/telemetry", PacketID: uint16(i + 1), Payload: []byte(sample)})...)
	}
	if _, err := c.Write(burst); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	var ack [4]byte
	for i := range n {
		if _, err := io.ReadFull(c.br, ack[:]); err != nil {
			t.Fatalf("PUBACK %d: %v", i, err)
		}
		if want := uint16(i + 1); ack[0] != 0x40 || ack[1] != 2 || uint16(ack[2])<<8|uint16(ack[3]) != want {
			t.Fatalf("PUBACK %d is % x, want id %d", i, ack, want)
		}
	}
	h := e.broker.hook
	h.mu.Lock()
	var acks, writes int64
	for _, a := range h.ackers {
		acks, writes = acks+a.acks.Load(), writes+a.writes.Load()
	}
	h.mu.Unlock()
	if acks != n || writes < 1 || writes >= n/2 {
		t.Fatalf("%d PUBACKs in %d writes, want %d in fewer than %d", acks, writes, n, n/2)
	}
	t.Logf("%d PUBACKs in %d writes", acks, writes)
}
