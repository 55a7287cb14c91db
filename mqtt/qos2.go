package mqtt

import (
	"log/slog"

	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/edgegate/edgegate/internal/pipeline"
)

// QoS 2 on the embedded broker (MQTT 3.1.1 §4.3.3, MQTT 5 §4.3.3),
// documented in README.md: a QoS 2 reading is handed to the pipeline like
// a QoS 1 one, and answered with PUBREC (not PUBACK) once it is committed,
// in the order the publishes arrived (§4.6) among the connection's PUBACKs
// and PUBRECs. Its packet id is then held until the client's PUBREL, which
// is answered with PUBCOMP. A PUBLISH repeating a held packet id (the
// client's resend, DUP set) is not queued again: it gets its PUBREC, in
// order, once the first one is committed (if that one fails, neither is
// acknowledged and the client resends). Held ids belong to the session:
// they survive a reconnect of a clean-session=0 (MQTT 5: session expiry
// > 0) client and are dropped with the session. A session holding
// maxHeldQoS2 ids without releasing them is disconnected (0x93 in MQTT 5).

// qos2Overflow ends a connection that holds too many unreleased ids.
func (h *ingestHook) qos2Overflow(cl *mochi.Client, device string) {
	if h.deny != nil {
		h.deny("publish", denyQoS2Unreleased, device, "held", maxHeldQoS2)
	} else {
		h.limited.Log(h.ctx, slog.LevelWarn, "qos2/"+device, "QoS 2 publishes never released (PUBREL); connection closed",
			"device", device, "held", maxHeldQoS2)
	}
	if h.srv != nil {
		_ = h.srv.DisconnectClient(cl, packets.ErrReceiveMaximum)
		return
	}
	cl.Stop(packets.ErrReceiveMaximum)
}

// qos2Held returns the session's held QoS 2 ids; h.mu must be held.
func (h *ingestHook) qos2Held(id string) map[uint16]*inflight {
	m := h.qos2[id]
	if m == nil {
		m = map[uint16]*inflight{}
		h.qos2[id] = m
	}
	return m
}

// maxHeldQoS2 bounds the QoS 2 packet ids one session may hold unreleased
// (MQTT 5 bounds them by the receive maximum, 64; MQTT 3.1.1 does not).
const maxHeldQoS2 = 1024

// denyQoS2Unreleased counts connections closed for holding too many.
const denyQoS2Unreleased = "qos2_unreleased"

// qos2Receive registers a QoS 2 publish; it returns the first publish
// with the same packet id when this one repeats it. full is true when the
// session holds too many unreleased ids: the publish is not taken.
func (h *ingestHook) qos2Receive(cl *mochi.Client, it *inflight) (first *inflight, full bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	held := h.qos2Held(cl.ID)
	if f, ok := held[it.id]; ok {
		return f, false
	}
	if len(held) >= maxHeldQoS2 {
		return nil, true
	}
	held[it.id] = it
	return nil, false
}

// release drops what a settled publish no longer needs: a held QoS 2 id
// keeps only its outcome until PUBREL, never the reading.
func (it *inflight) release() {
	it.payload, it.msg, it.wait, it.ctx = nil, pipeline.Message{}, nil, nil
}

// qos2Failed forgets a QoS 2 publish that was not committed, so that the
// client's resend is queued.
func (h *ingestHook) qos2Failed(cl *mochi.Client, it *inflight) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if held := h.qos2[cl.ID]; held != nil && held[it.id] == it {
		delete(held, it.id)
	}
}

// OnPacketRead sees each PUBREL before mochi does: a PUBREL for a held,
// committed publish releases its id, and a placeholder lets mochi answer
// it with PUBCOMP "success" (processPubrel). For an unknown id mochi
// answers PUBCOMP "packet identifier not found" (MQTT 5 0x92; a plain
// PUBCOMP in 3.1.1, which is what §4.3.3 asks for).
func (h *ingestHook) OnPacketRead(cl *mochi.Client, pk packets.Packet) (packets.Packet, error) {
	if pk.FixedHeader.Type != packets.Pubrel || cl.Net.Inline {
		return pk, nil
	}
	h.mu.Lock()
	it, ok := h.qos2[cl.ID][pk.PacketID]
	if ok && it.isCommitted() {
		delete(h.qos2[cl.ID], pk.PacketID)
	} else {
		ok = false
	}
	h.mu.Unlock()
	if _, used := cl.State.Inflight.Get(pk.PacketID); ok && !used {
		// processPubrel adds back one send quota it never took.
		cl.State.Inflight.DecreaseSendQuota()
		cl.State.Inflight.Set(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pubrec}, PacketID: pk.PacketID})
	}
	return pk, nil
}

// OnSessionEstablish drops the QoS 2 state of a session the client starts
// clean [MQTT-3.1.2-6].
func (h *ingestHook) OnSessionEstablish(cl *mochi.Client, pk packets.Packet) {
	if cl.Net.Inline {
		return
	}
	if pk.Connect.Clean {
		h.mu.Lock()
		delete(h.qos2, cl.ID)
		h.mu.Unlock()
	}
}

// qos2SessionEnded drops the QoS 2 state of a session that ends.
func (h *ingestHook) qos2SessionEnded(cl *mochi.Client, expire bool) {
	if !expire || cl.IsTakenOver() {
		return
	}
	h.mu.Lock()
	delete(h.qos2, cl.ID)
	h.mu.Unlock()
}
