package radio

import (
	"fmt"
	"slices"
	"strconv"
	"sync"
	"time"
)

// msController is the controller side of one MySensors serial gateway (one
// port): it keeps what the nodes presented, answers what a controller must
// answer, and turns set messages into attribute payloads. It does no I/O;
// the port writes the replies and submits the readings.
//
// What a controller must do, as pymysensors (Home Assistant) and the
// MySensors core do it:
//
//   - echo/ack: a node that asks for an ack of a message addressed to the
//     gateway gets it from the gateway firmware itself (MyTransport.cpp,
//     gatewayTransportProcess); the controller never acks. An incoming line
//     with ack=1 is the echo of something the controller sent: it is not a
//     new reading. Replies are sent with ack=0.
//   - I_ID_REQUEST (from node 255) → "255;255;3;0;4;<id>", a fresh id:
//     never one handed out or seen on this port (persisted in the state
//     file) nor one the policy binds to a device (on any port).
//   - I_CONFIG → "N;255;3;0;6;M" (metric).
//   - I_TIME → "N;255;3;0;1;<seconds>", seconds since 1970 in local wall
//     time, as pymysensors sends (calendar.timegm(time.localtime())).
//   - req → a set with the last value the controller knows, or nothing.
//   - I_GATEWAY_READY → broadcast I_DISCOVER so that nodes show themselves.
//   - a set from a node that never presented → ask it to present again
//     (I_PRESENTATION), at most once per presentEvery.
type msController struct {
	port string
	ids  *nodeIDs
	now  func() time.Time
	// bound reports a node id the policy binds to a device (on any port):
	// never handed out by I_ID_REQUEST. nil: none.
	bound func(node int) bool

	mu    sync.Mutex
	nodes map[int]*msNode
}

const (
	presentEvery   = 10 * time.Minute
	maxValuesKept  = 64 // last values kept per node for req
	maxDescription = 32
)

type msNode struct {
	id            int
	presented     bool
	nodeType      int // S_ARDUINO_NODE / S_ARDUINO_REPEATER_NODE
	libVersion    string
	sketch        string
	sketchVersion string
	battery       int // -1 unknown
	heartbeat     string
	children      map[int]msChild
	values        map[int]string // child<<8|type -> last payload, for req
	lastSeen      time.Time
	askedPresent  time.Time
}

type msChild struct {
	typ  int
	desc string
}

// msResult is what handling one message produced.
type msResult struct {
	replies []byte // zero or more encoded lines to send to the gateway
	payload []byte // JSON attributes when the message is a reading
	child   int    // the child the reading binds by (255: the node itself)
	event   string // what the message was, for counters and debug logs
	warn    error  // a problem worth logging that does not make the frame bad
}

// Events.
const (
	evReading  = "reading"
	evEcho     = "echo"
	evLog      = "log"
	evInternal = "internal"
	evPresent  = "presentation"
	evReq      = "req"
	evStream   = "stream"
)

func newMSController(port string, ids *nodeIDs, now func() time.Time) *msController {
	return &msController{port: port, ids: ids, now: now, nodes: map[int]*msNode{}}
}

// node returns the node's record, creating it. Node 255 is not recorded.
func (c *msController) node(id int) *msNode {
	n := c.nodes[id]
	if n == nil {
		n = &msNode{id: id, battery: -1, children: map[int]msChild{}, values: map[int]string{}}
		c.nodes[id] = n
	}
	return n
}

// handle processes one decoded message. res.replies and res.payload are
// appended to the slices passed in res (so a caller can reuse buffers). An
// error means the frame is bad (counted, skipped): a bad frame neither
// creates a node nor marks its id as used.
func (c *msController) handle(m MSMessage, res *msResult) error {
	res.event, res.child, res.warn = "", 0, nil
	c.mu.Lock()
	_, known := c.nodes[m.Node]
	err := c.handleLocked(m, res)
	if err != nil && !known {
		delete(c.nodes, m.Node)
	}
	c.mu.Unlock()
	if err == nil && !m.Ack && m.Node != NodeAuto {
		// A failure to persist only weakens the no-reuse guarantee for
		// this id; the message is still good.
		res.warn = c.ids.markSeen(c.port, m.Node)
	}
	return err
}

func (c *msController) handleLocked(m MSMessage, res *msResult) error {
	now := c.now()
	if m.Ack {
		// The echo of a message the controller sent (serial API: incoming
		// ack=1 "is an ack message"); never a new reading.
		res.event = evEcho
		return nil
	}
	if m.Node == NodeAuto {
		// A node without an id may only ask for one (or look for a parent,
		// which the gateway answers itself).
		if m.Command == CmdInternal && m.Type == IIDRequest {
			id, err := c.ids.allocate(c.port, c.bound)
			if err != nil {
				return err
			}
			res.event = evInternal
			res.replies = AppendMySensors(res.replies, MSMessage{Node: NodeAuto, Child: ChildNode,
				Command: CmdInternal, Type: IIDResponse, Payload: strconv.AppendInt(nil, int64(id), 10)})
			return nil
		}
		if m.Command == CmdInternal {
			res.event = evInternal
			return nil
		}
		return fmt.Errorf("%w: node %d (no id yet) sent command %d", ErrBadField, m.Node, m.Command)
	}
	n := c.node(m.Node)
	n.lastSeen = now

	switch m.Command {
	case CmdPresentation:
		res.event = evPresent
		if m.Child == ChildNode {
			n.presented = true
			n.nodeType = m.Type
			n.libVersion = clipString(m.Payload, maxDescription)
			return nil
		}
		if _, ok := n.children[m.Child]; !ok && len(n.children) >= 256 {
			return nil
		}
		n.children[m.Child] = msChild{typ: m.Type, desc: clipString(m.Payload, maxDescription)}
		return nil

	case CmdSet:
		vt, ok := lookupVType(m.Type)
		if !ok {
			return fmt.Errorf("%w: unknown value type %d", ErrBadValue, m.Type)
		}
		p, err := appendAttrPayload(res.payload, vt, m.Payload)
		if err != nil {
			return err
		}
		res.payload, res.child, res.event = p, m.Child, evReading
		key := m.Child<<8 | m.Type
		if _, ok := n.values[key]; ok || len(n.values) < maxValuesKept {
			if old := n.values[key]; old != string(m.Payload) {
				n.values[key] = string(m.Payload)
			}
		}
		if !n.presented && m.Node != 0 && now.Sub(n.askedPresent) >= presentEvery {
			n.askedPresent = now
			res.replies = AppendMySensors(res.replies, MSMessage{Node: m.Node, Child: ChildNode,
				Command: CmdInternal, Type: IPresentation})
		}
		return nil

	case CmdReq:
		res.event = evReq
		if v, ok := n.values[m.Child<<8|m.Type]; ok {
			res.replies = AppendMySensors(res.replies, MSMessage{Node: m.Node, Child: m.Child,
				Command: CmdSet, Type: m.Type, Payload: []byte(v)})
		}
		return nil

	case CmdStream:
		res.event = evStream // OTA firmware: not supported, ignored
		return nil
	}

	// CmdInternal
	res.event = evInternal
	switch m.Type {
	case IBatteryLevel:
		p, err := appendAttrPayload(res.payload, batteryAttr, m.Payload)
		if err != nil {
			return err
		}
		lvl, _ := strconv.ParseFloat(string(m.Payload), 64)
		n.battery = int(lvl)
		res.payload, res.child, res.event = p, ChildNode, evReading
	case ITime:
		_, off := now.Zone()
		secs := now.Unix() + int64(off)
		res.replies = AppendMySensors(res.replies, MSMessage{Node: m.Node, Child: ChildNode,
			Command: CmdInternal, Type: ITime, Payload: strconv.AppendInt(nil, secs, 10)})
	case IConfig:
		res.replies = AppendMySensors(res.replies, MSMessage{Node: m.Node, Child: ChildNode,
			Command: CmdInternal, Type: IConfig, Payload: []byte("M")})
	case IIDRequest:
		// A node with an id asking again (e.g. its EEPROM was cleared but
		// the sketch sets a static id): answer like pymysensors, fresh id.
		id, err := c.ids.allocate(c.port, c.bound)
		if err != nil {
			return err
		}
		res.replies = AppendMySensors(res.replies, MSMessage{Node: m.Node, Child: m.Child,
			Command: CmdInternal, Type: IIDResponse, Payload: strconv.AppendInt(nil, int64(id), 10)})
	case ILogMessage:
		res.event = evLog
	case ISketchName:
		n.sketch = clipString(m.Payload, maxDescription)
	case ISketchVersion:
		n.sketchVersion = clipString(m.Payload, maxDescription)
	case IHeartbeatResponse:
		n.heartbeat = clipString(m.Payload, maxDescription)
	case IGatewayReady:
		res.replies = AppendMySensors(res.replies, MSMessage{Node: NodeAuto, Child: ChildNode,
			Command: CmdInternal, Type: IDiscoverRequest})
	case IVersion:
		n.libVersion = clipString(m.Payload, maxDescription)
	}
	return nil
}

// nodeInfo is a snapshot of one node for the pending list.
type nodeInfo struct {
	id            int
	children      []ChildInfo
	sketch        string
	sketchVersion string
	battery       int
	lastSeen      time.Time
}

func (c *msController) snapshot() []nodeInfo {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]nodeInfo, 0, len(c.nodes))
	for _, n := range c.nodes {
		if n.id == 0 && len(n.children) == 0 {
			continue // the gateway itself, with no sensors of its own
		}
		ni := nodeInfo{id: n.id, sketch: n.sketch, sketchVersion: n.sketchVersion, battery: n.battery, lastSeen: n.lastSeen}
		for id, ch := range n.children {
			ni.children = append(ni.children, ChildInfo{ID: id, Type: ch.typ, Description: ch.desc})
		}
		slices.SortFunc(ni.children, func(a, b ChildInfo) int { return a.ID - b.ID })
		out = append(out, ni)
	}
	slices.SortFunc(out, func(a, b nodeInfo) int { return a.id - b.id })
	return out
}

func clipString(b []byte, n int) string {
	if len(b) > n {
		b = b[:n]
	}
	return string(b)
}
