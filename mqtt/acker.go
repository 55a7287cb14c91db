package mqtt

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
	"golang.org/x/sync/semaphore"

	"github.com/edgegate/edgegate/internal/pipeline"
	"github.com/edgegate/edgegate/internal/queue"
)

// Starter is the pipelined side of the pipeline: hand a reading over now,
// learn its outcome later.
type Starter interface {
	Start(ctx context.Context, msg pipeline.Message) pipeline.Pending
}

// window is how many QoS 1 readings of one connection may wait for their
// commit at once (the MQTT 5 receive maximum the broker announces).
const window = 64

// An acker acknowledges one connection's QoS 1 publishes in the order they
// arrived, each once its reading is committed — so a device may keep many
// publishes in flight (one group commit then carries many of them) while a
// PUBACK still means "synced to disk".
//
// The hook hands each publish to the pipeline on the connection's own
// goroutine, in arrival order (so they are committed in that order) and
// tells mochi to send nothing (packets.ErrRejectPacket); the acker then
// writes the PUBACK and delivers the reading to local subscribers.
type acker struct {
	h    *ingestHook
	cl   *mochi.Client
	q    chan *inflight
	stop chan struct{} // closed when the connection or the broker ends
	once sync.Once
	// overflow is set once the session held too many unreleased QoS 2 ids
	// (qos2.go): the connection closes after the acknowledgements before.
	overflow atomic.Bool
	// own is this connection's share of the in-flight byte budget
	// (inflightShares in broker.go).
	own *semaphore.Weighted
	// out holds encoded acknowledgements not yet written: the ones of one
	// group commit go in one write (flush), not one write each — mochi's
	// WritePacket is a system call per packet, 13 % of the daemon's CPU
	// in an embedded burst. Only the acker's goroutine touches it.
	out bytes.Buffer
	// acks and writes count acknowledgements and the writes that carried
	// them (tests).
	acks, writes atomic.Int64
	// poll is a context already done: a wait given it answers at once
	// (queue.ErrNotYet when the reading is not committed yet).
	poll context.Context
}

// maxHeldAcks bounds the acknowledgements held before a write.
const maxHeldAcks = 4 << 10

// ack encodes a PUBACK (PUBREC for QoS 2) into out, to go with the next
// flush.
func (a *acker) ack(typ byte, id uint16) {
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: typ}, PacketID: id, ProtocolVersion: a.cl.Properties.ProtocolVersion}
	var err error
	if typ == packets.Pubrec {
		err = pk.PubrecEncode(&a.out)
	} else {
		err = pk.PubackEncode(&a.out)
	}
	if err != nil {
		a.h.limited.Log(a.h.ctx, slog.LevelDebug, "ack", "acknowledgement not encoded", "err", err)
		return
	}
	a.acks.Add(1)
	if a.out.Len() >= maxHeldAcks {
		a.flush()
	}
}

// flush writes the acknowledgements held, in one write, under the client's
// lock as mochi's own writes are; a closed connection drops them (the
// device resends what it has no PUBACK for).
func (a *acker) flush() {
	if a.out.Len() == 0 {
		return
	}
	if !a.cl.Closed() && a.cl.Net.Conn != nil {
		a.writes.Add(1) // before the write: a test that read the PUBACKs sees it
		a.cl.Lock()
		_, err := a.cl.Net.Conn.Write(a.out.Bytes())
		a.cl.Unlock()
		if err != nil {
			a.h.limited.Log(a.h.ctx, slog.LevelDebug, "ack", "acknowledgements not written", "err", err)
		}
	}
	a.out.Reset()
}

type inflight struct {
	topic   string
	payload []byte
	retain  bool
	id      uint16
	qos     byte
	gen     uint64 // the device's registration generation when it arrived
	msg     pipeline.Message
	wait    pipeline.Pending
	ctx     context.Context
	cancel  context.CancelFunc
	cost    int64               // its share of BrokerOptions.InflightBytes, released by settled
	own     *semaphore.Weighted // its connection's share (acker.own), and
	ownCost int64               // what it takes of it, released by settled

	// QoS 2 (qos2.go): done is closed once the reading is committed
	// (committed true) or given up; dupOf, when set, makes this a resend
	// of a held publish, answered with PUBREC but not queued again.
	done      chan struct{}
	committed atomic.Bool
	dupOf     *inflight
	overflow  string // set: not a publish; close the connection of this device
}

func (it *inflight) isCommitted() bool { return it.committed.Load() }

// finish records a QoS 2 publish's outcome for its resends.
func (it *inflight) finish(committed bool) {
	if it.done == nil {
		return
	}
	it.committed.Store(committed)
	close(it.done)
}

// ackerFor returns the connection's acker, starting it on first use.
func (h *ingestHook) ackerFor(cl *mochi.Client) *acker {
	h.mu.Lock()
	defer h.mu.Unlock()
	if a, ok := h.ackers[cl]; ok {
		return a
	}
	poll, done := context.WithCancel(context.Background())
	done()
	a := &acker{h: h, cl: cl, q: make(chan *inflight, window), stop: make(chan struct{}), own: semaphore.NewWeighted(h.connMax), poll: poll}
	h.ackers[cl] = a
	h.wg.Add(1)
	go a.run()
	return a
}

// push queues a publish for acknowledgement; false when the connection is
// ending (the publish stays unacknowledged: the device resends it).
func (a *acker) push(it *inflight) bool {
	select {
	case <-a.stop:
		return false
	default:
	}
	select {
	case a.q <- it:
		return true
	case <-a.stop:
		return false
	}
}

func (a *acker) close() { a.once.Do(func() { close(a.stop) }) }

func (a *acker) run() {
	defer a.h.wg.Done()
	for {
		select {
		case it := <-a.q:
			a.settle(it)
			if len(a.q) == 0 {
				a.flush()
			}
		case <-a.stop:
			// Resolve what was handed over, in order: what commits is
			// acknowledged if the connection still takes it, the rest stays
			// unacknowledged and the device resends it.
			for {
				select {
				case it := <-a.q:
					a.settle(it)
				default:
					a.flush()
					return
				}
			}
		}
	}
}

func (a *acker) settle(it *inflight) {
	h := a.h
	if it.overflow != "" {
		a.flush()
		h.qos2Overflow(a.cl, it.overflow)
		return
	}
	if it.dupOf != nil {
		a.flush()
		// A resend of a held QoS 2 publish (the first may belong to an
		// earlier connection of the session): PUBREC once it is committed.
		select {
		case <-it.dupOf.done:
		case <-h.ctx.Done():
			return
		}
		if it.dupOf.isCommitted() && !a.cl.Closed() {
			_ = a.cl.WritePacket(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubrec}, PacketID: it.id})
		}
		return
	}
	defer h.settled(it)
	// The acknowledgements held go out before this reading is waited for:
	// only those of readings committed together share a write.
	out, err := it.wait(a.poll)
	if errors.Is(err, queue.ErrNotYet) {
		a.flush()
		out, err = it.wait(it.ctx)
	}
	if err != nil {
		a.flush() // hold may wait long
	}
	// Later publishes of this connection wait behind a held one.
	if out, err = h.hold(a.cl, it.msg, out, err); err != nil {
		if it.qos == 2 {
			h.qos2Failed(a.cl, it)
		}
		it.finish(false)
		return
	}
	it.finish(true)
	if !a.cl.Closed() {
		ackType := packets.Puback
		if it.qos == 2 {
			ackType = packets.Pubrec // [MQTT-4.3.3-8]; PUBCOMP answers the PUBREL
		}
		a.ack(ackType, it.id)
	}
	if out == pipeline.Queued && h.srv != nil && (h.generation == nil || h.generation(it.msg.Device) == it.gen) &&
		(it.retain || hasSubscribers(h.srv, it.topic)) {
		// Local subscribers get it once it is safe; refused and duplicate
		// readings are acknowledged but never delivered.
		if err := h.srv.Publish(it.topic, it.payload, it.retain, it.qos); err != nil {
			h.limited.Log(h.ctx, slog.LevelWarn, "deliver", "local delivery failed", "device", it.msg.Device, "err", err)
		}
	}
	if it.qos == 2 {
		it.release() // its id stays held until PUBREL; the reading need not
	}
}

// OnDisconnect ends the connection's acker once what it holds is resolved.
func (h *ingestHook) OnDisconnect(cl *mochi.Client, _ error, expire bool) {
	h.mu.Lock()
	a, ok := h.ackers[cl]
	delete(h.ackers, cl)
	h.mu.Unlock()
	if ok {
		a.close()
	}
	h.qos2SessionEnded(cl, expire)
}

// stopAckers ends every acker and waits (bounded) until the readings they
// hold are resolved, before the queue behind them stops.
func (h *ingestHook) stopAckers(limit time.Duration) bool {
	h.mu.Lock()
	for cl, a := range h.ackers {
		a.close()
		delete(h.ackers, cl)
	}
	h.mu.Unlock()
	done := make(chan struct{})
	go func() { h.wg.Wait(); close(done) }()
	select {
	case <-done:
		return true
	case <-time.After(limit):
		return false
	}
}

// hasSubscribers reports whether a client or an inline handler subscribes
// to topic now. Without one, mochi's Publish of a reading that is not
// retained delivers nothing, yet runs every hook and builds the packet:
// 5 % of the daemon's CPU at 1,500 readings/s with no local subscriber
// (docs/bench/profiles/pace-after-embedded-batch-paced.top.txt,
// Server.Publish). A subscription made right after the check misses this
// reading as it would had it come a moment later.
func hasSubscribers(srv *mochi.Server, topic string) bool {
	s := srv.Topics.Subscribers(topic)
	return len(s.Subscriptions) > 0 || len(s.Shared) > 0 || len(s.InlineSubscriptions) > 0
}
