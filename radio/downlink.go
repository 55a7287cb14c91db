package radio

import (
	"context"
	"errors"
	"fmt"
	"math"
	"strconv"
	"time"
)

// The downlink of a MySensors port: a value the platform set for a node's
// child (internal/command) goes out as a set message with the ack flag,
// and the node's echo is the proof it arrived. MySensors serial API v2:
// a message sent with ack=1 is echoed back by its destination with ack=1
// (MyTransport.cpp transportProcessMessage answers "echo" requests), so
// the controller learns that the node, not only the radio gateway, got
// it. Without an echo the set is sent again, a bounded number of times.

// Errors of SendSet callers branch on.
var (
	// ErrNoEcho: the node did not echo any of the sends in time.
	ErrNoEcho = errors.New("no echo from the node")
	// ErrNotWritable: the attribute has no MySensors value type, or the
	// value does not fit it; sending again cannot help.
	ErrNotWritable = errors.New("value cannot be sent to a MySensors node")
)

// maxEchoWaiters bounds the sets waiting for an echo on one port.
const maxEchoWaiters = 64

// VTypeOf is the MySensors V_ type whose attribute name is attr (the
// names readings carry, vtypes.go).
func VTypeOf(attr string) (int, bool) {
	for i, vt := range vtypes {
		if vt.name != "" && vt.name == attr {
			return i, true
		}
	}
	return 0, false
}

// EncodeSet renders a value (as decoded from JSON: bool, float64, string,
// or a numeric string) as the payload of a set of attr's V_ type: booleans
// as 1/0, numbers in their shortest form, text as is. The payload is
// checked the way an incoming set of that type is (range, characters).
func EncodeSet(attr string, value any) (vtype int, payload []byte, err error) {
	t, ok := VTypeOf(attr)
	if !ok {
		return 0, nil, fmt.Errorf("%w: attribute %q is no MySensors value type", ErrNotWritable, attr)
	}
	vt := vtypes[t]
	switch v := value.(type) {
	case bool:
		if v {
			payload = []byte("1")
		} else {
			payload = []byte("0")
		}
	case float64:
		if math.IsNaN(v) || math.IsInf(v, 0) {
			return 0, nil, fmt.Errorf("%w: %s: not a finite number", ErrNotWritable, attr)
		}
		if vt.kind == kindBool && (v == 0 || v == 1) {
			payload = strconv.AppendInt(nil, int64(v), 10)
		} else {
			payload = strconv.AppendFloat(nil, v, 'g', -1, 64)
		}
	case string:
		payload = []byte(v)
		if vt.kind == kindBool {
			switch v {
			case "true", "on", "ON":
				payload = []byte("1")
			case "false", "off", "OFF":
				payload = []byte("0")
			}
		}
	default:
		return 0, nil, fmt.Errorf("%w: %s: a %T value", ErrNotWritable, attr, value)
	}
	if len(payload) > MaxMySensorsLine-24 || badTextAt(payload) >= 0 {
		return 0, nil, fmt.Errorf("%w: %s: payload too long or with control bytes", ErrNotWritable, attr)
	}
	if _, err := appendAttrPayload(nil, vt, payload); err != nil {
		return 0, nil, fmt.Errorf("%w: %w", ErrNotWritable, err)
	}
	return t, payload, nil
}

// SendSet sends value to child of node on the MySensors port at path,
// with the ack flag, and waits up to ackTimeout for the node's echo;
// without one it sends again, tries times in all. It returns the echo as
// the reading payload a set from the node with that value would give
// (e.g. {"status":{"value":true,"type":"Boolean"}}): the device's own
// confirmation of its new state.
func (m *Manager) SendSet(ctx context.Context, path string, node, child int, attr string, value any, tries int, ackTimeout time.Duration) ([]byte, error) {
	var p *port
	for _, c := range m.ports {
		if c.cfg.Path == path {
			p = c
		}
	}
	switch {
	case p == nil:
		return nil, fmt.Errorf("radio port %q is not configured", path)
	case p.ctrl == nil:
		return nil, fmt.Errorf("%w: port %q speaks %s", ErrNotWritable, path, p.cfg.Codec)
	case node < 1 || node > MaxNodeID || child < 0 || child > 254:
		return nil, fmt.Errorf("%w: node %d child %d: a set needs one node (1..254) and one child (0..254)", ErrNotWritable, node, child)
	}
	t, payload, err := EncodeSet(attr, value)
	if err != nil {
		return nil, err
	}
	line := AppendMySensors(nil, MSMessage{Node: node, Child: child, Command: CmdSet, Ack: true, Type: t, Payload: payload})
	key := node<<16 | child<<8 | t
	echo := make(chan []byte, 1)
	p.mu.Lock()
	if p.echoWait == nil {
		p.echoWait = map[int]chan []byte{}
	}
	if _, busy := p.echoWait[key]; busy || len(p.echoWait) >= maxEchoWaiters {
		p.mu.Unlock()
		return nil, fmt.Errorf("port %s: a set to node %d child %d is already waiting for its echo", path, node, child)
	}
	p.echoWait[key] = echo
	p.mu.Unlock()
	defer func() {
		p.mu.Lock()
		delete(p.echoWait, key)
		p.mu.Unlock()
	}()
	tries = max(1, tries)
	for i := 0; i < tries; i++ {
		// One ackTimeout per try covers both the wait for the writer (the
		// port may be closed, being reopened) and the wait for the echo.
		timer := time.NewTimer(ackTimeout)
		select {
		case p.cmds <- line:
		case <-ctx.Done():
			timer.Stop()
			return nil, ctx.Err()
		case <-timer.C:
			continue
		}
		select {
		case got := <-echo:
			timer.Stop()
			if string(got) != string(payload) {
				// The node echoes what it received; anything else is not
				// our set's proof.
				return nil, fmt.Errorf("%w: node %d child %d echoed %q for %q", ErrNoEcho, node, child, clipText(got), payload)
			}
			return appendAttrPayload(nil, vtypes[t], got)
		case <-ctx.Done():
			timer.Stop()
			return nil, ctx.Err()
		case <-timer.C:
		}
	}
	return nil, fmt.Errorf("%w: node %d child %d, %d sends of %s", ErrNoEcho, node, child, tries, attr)
}

// echoed hands an echoed set (ack=1) to the SendSet waiting for it.
func (p *port) echoed(m MSMessage) {
	if m.Command != CmdSet {
		return
	}
	key := m.Node<<16 | m.Child<<8 | m.Type
	p.mu.Lock()
	ch := p.echoWait[key]
	p.mu.Unlock()
	if ch != nil {
		select {
		case ch <- append([]byte(nil), m.Payload...):
		default:
		}
	}
}
