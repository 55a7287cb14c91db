package mqtt

import (
	"bufio"
	"bytes"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
)

// TestMosquittoDynsecWill is the external-mode side of "wills are
// publishes": a device's will on another device's topic is never delivered
// to the gateway (Mosquitto checks a will against the account's publish
// ACL, which the gateway keeps), while a will on its own topic is.
func TestMosquittoDynsecWill(t *testing.T) {
	e := newDynsecEnv(t)
	dropWithWill := func(user, topic, payload string) {
		t.Helper()
		c, err := net.DialTimeout("tcp", strings.TrimPrefix(e.m.URL, "tcp://"), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 4,
			Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), ClientIdentifier: user + "-will", Keepalive: 30, Clean: true,
				Username: []byte(user), UsernameFlag: true, Password: []byte(e.password(user)), PasswordFlag: true,
				WillFlag: true, WillTopic: topic, WillPayload: []byte(payload), WillQos: 1}}
		var buf bytes.Buffer
		if err := pk.ConnectEncode(&buf); err != nil {
			t.Fatal(err)
		}
		if _, err := c.Write(buf.Bytes()); err != nil {
			t.Fatal(err)
		}
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		ack := make([]byte, 4)
		if _, err := bufio.NewReader(c).Read(ack); err != nil || ack[0]>>4 != packets.Connack || ack[3] != 0 {
			t.Fatalf("%s: CONNACK %x: %v", user, ack, err)
		}
		c.Close() // no DISCONNECT: the will is due
	}
	dropWithWill("a1", "devices/b1/telemetry", "forged-will-by-a1")
	dropWithWill("a1", "devices/a1/telemetry", "a1-own-will")
	b1, err := e.dial("b1", e.password("b1"))
	if err != nil {
		t.Fatal(err)
	}
	defer b1.Disconnect(0)
	send(t, b1, "b1", "b1-marker")
	eventually(t, "a1's own will and b1's marker ingested", func() bool { return e.got("a1", "a1-own-will") && e.got("b1", "b1-marker") })
	if e.got("b1", "forged-will-by-a1") {
		t.Fatal("a1's will on b1's topic reached the gateway")
	}
}
