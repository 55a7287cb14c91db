package mqtt

import (
	"bufio"
	"crypto/tls"
	"errors"
	"net"
	"net/url"
	"sync"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
)

// Coalesced writes to the external broker.
//
// paho writes every packet it sends with its own Write on the connection:
// one PUBACK, one system call (and, over TLS, one record). The settler
// releases PUBACKs in groups — every reading of a group commit at once —
// so at 1,500 readings/s the ingest client made ~1,500 writes a second of
// 4 bytes each (paho's PubackPacket.Write was 7.5 % of the daemon's CPU in
// docs/bench/profiles/pace-before-mosquitto-batch-paced.top.txt). A
// coalescingConn takes paho's writes into a buffer and one flusher
// goroutine writes whatever gathered while its previous write ran: the
// bytes and their order are the socket's as before (MQTT 3.1.1 §4.6: the
// PUBACKs stay in publish order), only the number of writes changes. An
// idle connection's packet still goes at once: nothing waits for company.

// Buffered reads from the external broker.
//
// paho reads each packet straight from the connection: one read for the
// fixed header's first byte, one per byte of the remaining length, one
// for the rest (packets.ReadPacket). Through Mosquitto at 1,500
// readings/s that was 22,903 read system calls in 5 s — three per
// reading, ~20 µs each (strace -c -f of the daemon in the bench's paced
// phase). A coalescingConn reads through a bufio.Reader: one read takes
// whatever the socket holds, many PUBLISHes at once under load. paho is
// the only reader, from one goroutine; a packet larger than the buffer is
// read past it, straight into paho's slice.
const readBuffer = 32 << 10

// maxPending bounds the bytes buffered and not yet written: beyond it a
// Write waits for the flusher, as a full socket buffer makes it wait.
const maxPending = 256 << 10

// flushTimeout bounds one write of the flusher (paho's own write timeout
// covers only its PUBLISH writes); a broker that takes nothing for this
// long gets its connection closed, and paho reconnects.
const flushTimeout = 10 * time.Second

type coalescingConn struct {
	net.Conn
	r       *bufio.Reader // the connection's reads (paho's reader goroutine only)
	mu      sync.Mutex
	cond    *sync.Cond // signalled when buf was taken or an error set
	buf     []byte
	err     error // the first write error; every later Write returns it
	closing bool
	kick    chan struct{} // cap 1: something to flush
	done    chan struct{} // closed when the flusher ends
	// writes and flushes count paho's writes and the flusher's (tests).
	writes, flushes int
}

func newCoalescingConn(c net.Conn) *coalescingConn {
	cc := &coalescingConn{Conn: c, r: bufio.NewReaderSize(c, readBuffer), kick: make(chan struct{}, 1), done: make(chan struct{})}
	cc.cond = sync.NewCond(&cc.mu)
	go cc.flusher()
	return cc
}

var errConnClosed = errors.New("connection closed")

// Read reads through the buffer (see readBuffer).
func (c *coalescingConn) Read(p []byte) (int, error) { return c.r.Read(p) }

// Write buffers p for the flusher. It reports the first error of an
// earlier flush, and waits while maxPending bytes are still unwritten.
func (c *coalescingConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	for c.err == nil && !c.closing && len(c.buf) > 0 && len(c.buf)+len(p) > maxPending {
		c.cond.Wait()
	}
	switch {
	case c.err != nil:
		err := c.err
		c.mu.Unlock()
		return 0, err
	case c.closing:
		c.mu.Unlock()
		return 0, errConnClosed
	}
	c.buf = append(c.buf, p...)
	c.writes++
	select { // under mu: Close closes kick under mu
	case c.kick <- struct{}{}:
	default: // a flush is already due: it will take p too
	}
	c.mu.Unlock()
	return len(p), nil
}

// flusher writes what gathered, one write per wake-up, until Close (which
// closes kick: what is left is written, then the flusher ends).
func (c *coalescingConn) flusher() {
	defer close(c.done)
	var out []byte
	for {
		_, open := <-c.kick
		c.mu.Lock()
		out, c.buf = c.buf, out[:0]
		if len(out) > 0 {
			c.flushes++
		}
		c.cond.Broadcast()
		c.mu.Unlock()
		if len(out) > 0 {
			_ = c.Conn.SetWriteDeadline(time.Now().Add(flushTimeout))
			if _, err := c.Conn.Write(out); err != nil {
				c.mu.Lock()
				c.err = err
				c.cond.Broadcast()
				c.mu.Unlock()
				_ = c.Conn.Close() // paho's reader sees it and reconnects
				return
			}
		}
		if !open {
			return
		}
	}
}

// SetWriteDeadline is kept for paho's calls but does not reach the socket:
// the flusher sets its own deadline for each write (flushTimeout).
func (c *coalescingConn) SetWriteDeadline(time.Time) error { return nil }

// SetDeadline sets the read deadline only, as SetWriteDeadline explains.
func (c *coalescingConn) SetDeadline(t time.Time) error { return c.Conn.SetReadDeadline(t) }

// Close writes what is buffered (paho's DISCONNECT, the last PUBACKs),
// bounded by flushTimeout, then closes the connection.
func (c *coalescingConn) Close() error {
	c.mu.Lock()
	if c.closing {
		c.mu.Unlock()
		<-c.done
		return nil
	}
	c.closing = true
	close(c.kick) // the flusher writes what is left, then ends
	c.cond.Broadcast()
	c.mu.Unlock()
	<-c.done
	return c.Conn.Close()
}

// openCoalesced is the ingest client's paho connection: the schemes the
// configuration allows for mqtt.external.url (tcp/mqtt on loopback,
// tls/ssl/mqtts), dialled as paho's own openConnection does, wrapped in a
// coalescingConn.
func openCoalesced(uri *url.URL, o paho.ClientOptions) (net.Conn, error) {
	d := o.Dialer
	if d == nil {
		d = &net.Dialer{Timeout: o.ConnectTimeout}
	}
	var c net.Conn
	var err error
	switch uri.Scheme {
	case "tcp", "mqtt":
		c, err = d.Dial("tcp", uri.Host)
	case "tls", "ssl", "mqtts", "mqtt+ssl", "tcps":
		c, err = tls.DialWithDialer(d, "tcp", uri.Host, o.TLSConfig)
	default:
		return nil, errors.New("unsupported scheme " + uri.Scheme)
	}
	if err != nil {
		return nil, err
	}
	return newCoalescingConn(c), nil
}
