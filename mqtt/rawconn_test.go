package mqtt

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
)

// rawConn is the one hand-written MQTT client of the tests: packets
// encoded and decoded by mochi's packets package, written and read over a
// plain TCP connection, for what paho cannot express (a will without a
// DISCONNECT, keep-alive 0 never pinging, silence, dropping a connection
// without DISCONNECT, resending a PUBLISH with the same packet id, reading
// acknowledgements in order). The embedded net.Conn is there for byte-level
// writes and for Close.
type rawConn struct {
	net.Conn
	t       testing.TB
	br      *bufio.Reader
	version byte // 4 (3.1.1) or 5
}

// newRawConn wraps an established connection (TCP or TLS) speaking 3.1.1.
func newRawConn(t testing.TB, c net.Conn) *rawConn {
	return &rawConn{Conn: c, t: t, br: bufio.NewReader(c), version: 4}
}

// wireOpts is the CONNECT of connectPacket (MQTT 3.1.1 unless the caller
// sets the version).
type wireOpts struct {
	user, password, id string
	keepalive          uint16
	clean              bool
	will               []byte
	willTopic          string
	willRetain         bool
	from               string // local IP to dial from
}

// wireDial opens a TCP connection to the embedded broker from the local
// address from ("" for any), closed when the test ends. Nothing is sent.
func (e *accessEnv) wireDial(from string) *rawConn {
	e.t.Helper()
	d := net.Dialer{Timeout: 5 * time.Second}
	if from != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(from)}
	}
	c, err := d.Dial("tcp", e.broker.Addr())
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { c.Close() })
	return newRawConn(e.t, c)
}

func encode(t testing.TB, pk packets.Packet) []byte {
	t.Helper()
	var buf bytes.Buffer
	var err error
	switch pk.FixedHeader.Type {
	case packets.Connect:
		err = pk.ConnectEncode(&buf)
	case packets.Publish:
		err = pk.PublishEncode(&buf)
	case packets.Subscribe:
		err = pk.SubscribeEncode(&buf)
	case packets.Pubrel:
		err = pk.PubrelEncode(&buf)
	case packets.Puback:
		err = pk.PubackEncode(&buf)
	case packets.Disconnect:
		err = pk.DisconnectEncode(&buf)
	default:
		t.Fatalf("no encoder for %d", pk.FixedHeader.Type)
	}
	if err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func connectPacket(o wireOpts) packets.Packet {
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 4,
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: o.clean, ClientIdentifier: o.id,
			Keepalive: o.keepalive, UsernameFlag: true, Username: []byte(o.user), PasswordFlag: true, Password: []byte(o.password)}}
	if o.will != nil {
		pk.Connect.WillFlag, pk.Connect.WillTopic, pk.Connect.WillPayload, pk.Connect.WillRetain = true, o.willTopic, o.will, o.willRetain
	}
	return pk
}

// wireConnect sends a 3.1.1 CONNECT and returns the CONNACK return code,
// checking the CONNACK byte by byte.
func (e *accessEnv) wireConnect(o wireOpts) (*rawConn, byte) {
	e.t.Helper()
	c := e.wireDial(o.from)
	c.write(encode(e.t, connectPacket(o)))
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	var ack [4]byte
	if _, err := io.ReadFull(c.br, ack[:]); err != nil {
		e.t.Fatalf("no CONNACK: %v", err)
	}
	c.SetReadDeadline(time.Time{})
	if ack[0] != 0x20 || ack[1] != 2 {
		e.t.Fatalf("not a 3.1.1 CONNACK: % x", ack)
	}
	return c, ack[3]
}

type rawConnect struct {
	id, user, password string
	clean              bool
	willTopic          string
	willPayload        string
	willRetain         bool
	// MQTT 5: session expiry and will delay, seconds.
	v5                   bool
	expiry, willDelaySec uint32
	recvMax              uint16
}

// rawDial connects (3.1.1, or 5 with rc.v5) and returns the CONNACK return
// code and session present.
func (e *accessEnv) rawDial(t *testing.T, rc rawConnect) (*rawConn, byte, bool) {
	t.Helper()
	r := e.wireDial("")
	r.t = t
	if rc.v5 {
		r.version = 5
	}
	pk := connectPacket(wireOpts{user: rc.user, password: rc.password, id: rc.id, clean: rc.clean, keepalive: 30})
	pk.ProtocolVersion = r.version
	if rc.willTopic != "" {
		pk.Connect.WillFlag, pk.Connect.WillTopic, pk.Connect.WillPayload = true, rc.willTopic, []byte(rc.willPayload)
		pk.Connect.WillQos, pk.Connect.WillRetain = 1, rc.willRetain
		pk.Connect.WillProperties.WillDelayInterval = rc.willDelaySec
	}
	if rc.v5 && rc.recvMax > 0 {
		pk.Properties.ReceiveMaximum = rc.recvMax
	}
	if rc.v5 && rc.expiry > 0 {
		pk.Properties.SessionExpiryInterval, pk.Properties.SessionExpiryIntervalFlag = rc.expiry, true
	}
	r.write(encode(t, pk))
	ack := r.read()
	if ack.FixedHeader.Type != packets.Connack {
		t.Fatalf("first packet is type %d, want CONNACK", ack.FixedHeader.Type)
	}
	return r, ack.ReasonCode, ack.SessionPresent
}

func (r *rawConn) write(b []byte) {
	r.t.Helper()
	r.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if _, err := r.Write(b); err != nil {
		r.t.Fatalf("write: %v", err)
	}
}

// read returns the next packet, failing the test after 5 s.
func (r *rawConn) read() packets.Packet {
	r.t.Helper()
	pk, err := r.next(5 * time.Second)
	if err != nil {
		r.t.Fatalf("read: %v", err)
	}
	return pk
}

func (r *rawConn) next(wait time.Duration) (packets.Packet, error) {
	r.SetReadDeadline(time.Now().Add(wait))
	hb, err := r.br.ReadByte()
	if err != nil {
		return packets.Packet{}, err
	}
	pk := packets.Packet{ProtocolVersion: r.version}
	if err := pk.FixedHeader.Decode(hb); err != nil {
		return pk, err
	}
	n, mul := 0, 1
	for {
		b, err := r.br.ReadByte()
		if err != nil {
			return pk, err
		}
		n += int(b&127) * mul
		mul *= 128
		if b&128 == 0 {
			break
		}
	}
	pk.FixedHeader.Remaining = n
	body := make([]byte, n)
	if _, err := io.ReadFull(r.br, body); err != nil {
		return pk, err
	}
	switch pk.FixedHeader.Type {
	case packets.Connack:
		err = pk.ConnackDecode(body)
	case packets.Publish:
		err = pk.PublishDecode(body)
	case packets.Puback:
		err = pk.PubackDecode(body)
	case packets.Pubrec:
		err = pk.PubrecDecode(body)
	case packets.Pubcomp:
		err = pk.PubcompDecode(body)
	case packets.Suback:
		err = pk.SubackDecode(body)
	}
	return pk, err
}

func (r *rawConn) send(pk packets.Packet) {
	r.t.Helper()
	pk.ProtocolVersion = r.version
	if pk.FixedHeader.Type == packets.Pubrel || pk.FixedHeader.Type == packets.Subscribe {
		pk.FixedHeader.Qos = 1
	}
	r.write(encode(r.t, pk))
}

func rawPublish(topic string, qos byte, id uint16, dup, retain bool, payload string) packets.Packet {
	return packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: qos, Dup: dup, Retain: retain},
		TopicName: topic, PacketID: id, Payload: []byte(payload)}
}

// closed reports whether the server closes the connection within wait,
// reading and discarding whatever it sends before.
func (r *rawConn) closed(wait time.Duration) bool {
	r.SetReadDeadline(time.Now().Add(wait))
	_, err := io.Copy(io.Discard, r.br)
	return err == nil || !isTimeout(err)
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
