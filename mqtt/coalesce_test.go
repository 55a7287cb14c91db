package mqtt

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/eclipse/paho.mqtt.golang/packets"

	"github.com/edgegate/edgegate/internal/testkit"
)

// loopbackPair is a real TCP connection on loopback: the coalescing side
// and the peer.
func loopbackPair(t *testing.T) (*coalescingConn, net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			close(accepted)
			return
		}
		accepted <- c
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	peer, ok := <-accepted
	if !ok {
		t.Fatal("accept failed")
	}
	cc := newCoalescingConn(c)
	t.Cleanup(func() { cc.Close(); peer.Close() })
	return cc, peer
}

// TestCoalescingConnOrderAndFewerWrites: 5,000 PUBACK-sized writes from
// one goroutine (paho's writer) reach the peer complete and in order, in
// far fewer socket writes than paho made.
func TestCoalescingConnOrderAndFewerWrites(t *testing.T) {
	cc, peer := loopbackPair(t)
	const n = 5000
	got := make(chan []byte, 1)
	go func() {
		b, _ := io.ReadAll(io.LimitReader(peer, n*4))
		got <- b
	}()
	var want []byte
	for i := range n {
		p := []byte{0x40, 0x02, 0, 0} // PUBACK with packet id i
		binary.BigEndian.PutUint16(p[2:], uint16(i))
		want = append(want, p...)
		if _, err := cc.Write(p); err != nil {
			t.Fatalf("write %d: %v", i, err)
		}
	}
	var b []byte
	select {
	case b = <-got:
	case <-time.After(10 * time.Second):
		t.Fatal("peer did not receive the writes within 10s")
	}
	if !bytes.Equal(b, want) {
		t.Fatalf("peer received %d bytes, not the %d written in order", len(b), len(want))
	}
	cc.mu.Lock()
	writes, flushes := cc.writes, cc.flushes
	cc.mu.Unlock()
	if writes != n || flushes >= n/2 {
		t.Fatalf("%d writes went out in %d socket writes, want fewer than %d", writes, flushes, n/2)
	}
	t.Logf("%d writes in %d socket writes", writes, flushes)
}

// TestCoalescingConnCloseFlushes: what is buffered when paho closes the
// connection (its DISCONNECT, the last PUBACKs) is written before the
// close; a Write after Close fails.
func TestCoalescingConnCloseFlushes(t *testing.T) {
	cc, peer := loopbackPair(t)
	msg := bytes.Repeat([]byte("last-acks "), 1000)
	if _, err := cc.Write(msg); err != nil {
		t.Fatal(err)
	}
	if err := cc.Close(); err != nil {
		t.Fatal(err)
	}
	_ = peer.SetReadDeadline(time.Now().Add(10 * time.Second))
	b, err := io.ReadAll(peer) // until the close
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(b, msg) {
		t.Fatalf("peer got %d bytes before the close, want the %d buffered", len(b), len(msg))
	}
	if _, err := cc.Write([]byte{0xe0, 0}); err == nil {
		t.Fatal("Write after Close succeeded")
	}
}

// TestCoalescingConnBoundedAndFails: a peer that reads nothing holds the
// writer at maxPending buffered bytes (a Write waits, as on a full
// socket), and once the peer is gone the writer gets an error instead of
// hanging.
func TestCoalescingConnBoundedAndFails(t *testing.T) {
	cc, peer := loopbackPair(t)
	errc := make(chan error, 1)
	go func() {
		p := make([]byte, 4096)
		for {
			if _, err := cc.Write(p); err != nil {
				errc <- err
				return
			}
		}
	}()
	// The kernel's socket buffers fill, then the flusher's write blocks,
	// then Write waits: the buffer never holds more than maxPending+4096.
	testkit.Eventually(t, 10*time.Second, "writer held by a full buffer", func() bool {
		cc.mu.Lock()
		defer cc.mu.Unlock()
		if len(cc.buf) > maxPending+4096 {
			t.Fatalf("buffered %d bytes, more than maxPending", len(cc.buf))
		}
		return len(cc.buf)+4096 > maxPending
	})
	peer.(*net.TCPConn).SetLinger(0)
	peer.Close() // a reset: the flusher's write fails
	select {
	case err := <-errc:
		if err == nil {
			t.Fatal("nil error")
		}
	case <-time.After(flushTimeout + 5*time.Second):
		t.Fatal("writer still blocked after the peer went away")
	}
}

// countingConn counts the reads that reach the socket.
type countingConn struct {
	net.Conn
	reads atomic.Int64
}

func (c *countingConn) Read(p []byte) (int, error) {
	c.reads.Add(1)
	return c.Conn.Read(p)
}

// TestCoalescingConnFewerReads: 2,000 PUBLISH packets, one of them larger
// than the read buffer, are read by paho's own packet reader complete and
// in order, in far fewer socket reads than packets (paho alone reads each
// packet in three or more).
func TestCoalescingConnFewerReads(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	const n = 2000
	big := bytes.Repeat([]byte("x"), 3*readBuffer)
	payloadOf := func(i int) []byte {
		if i == n/2 {
			return big
		}
		return fmt.Appendf(nil, `{"temperature":%d.5,"n":%d}`, 20+i%10, i)
	}
	sent := make(chan error, 1)
	readerDone := make(chan struct{})
	t.Cleanup(func() { close(readerDone) })
	go func() {
		peer, err := ln.Accept()
		if err != nil {
			sent <- err
			return
		}
		defer peer.Close()
		var out bytes.Buffer
		for i := range n {
			p := packets.NewControlPacket(packets.Publish).(*packets.PublishPacket)
			p.TopicName, p.Qos, p.MessageID, p.Payload = "devices/th-1/telemetry", 1, uint16(i+1), payloadOf(i)
			if err := p.Write(&out); err != nil {
				sent <- err
				return
			}
		}
		_, err = peer.Write(out.Bytes())
		sent <- err
		<-readerDone // hold the connection open until the reader is done
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	counted := &countingConn{Conn: c}
	cc := newCoalescingConn(counted)
	defer cc.Close()
	_ = cc.SetDeadline(time.Now().Add(10 * time.Second))
	for i := range n {
		cp, err := packets.ReadPacket(cc)
		if err != nil {
			t.Fatalf("packet %d: %v", i, err)
		}
		p, ok := cp.(*packets.PublishPacket)
		if !ok || p.MessageID != uint16(i+1) || !bytes.Equal(p.Payload, payloadOf(i)) {
			t.Fatalf("packet %d: %v, want PUBLISH id %d with its payload", i, cp, i+1)
		}
	}
	if err := <-sent; err != nil {
		t.Fatal(err)
	}
	if r := counted.reads.Load(); r >= n/2 {
		t.Fatalf("%d packets took %d socket reads, want fewer than %d", n, r, n/2)
	} else {
		t.Logf("%d packets in %d socket reads", n, r)
	}
}
