package radio

import (
	"bytes"
	"errors"
	"fmt"
	"strconv"
	"unicode/utf8"
)

// MySensors serial API v2 limits and constants.
const (
	// MaxMySensorsLine bounds one line of the MySensors serial protocol.
	// The gateway firmware sends at most MY_GATEWAY_MAX_SEND_LENGTH (120)
	// bytes and parses at most 100; 256 leaves room and still bounds memory.
	MaxMySensorsLine = 256

	// Commands (the third field).
	CmdPresentation = 0
	CmdSet          = 1
	CmdReq          = 2
	CmdInternal     = 3
	CmdStream       = 4

	// NodeAuto is the node id of a node that has no id yet (it asks for
	// one with I_ID_REQUEST) and the broadcast address.
	NodeAuto = 255
	// ChildNode is the child id that addresses the node itself.
	ChildNode = 255
	// MaxNodeID is the highest id a controller may hand out.
	MaxNodeID = 254
)

// Internal message types (command 3) that the controller handles.
const (
	IBatteryLevel      = 0
	ITime              = 1
	IVersion           = 2
	IIDRequest         = 3
	IIDResponse        = 4
	IInclusionMode     = 5
	IConfig            = 6
	ILogMessage        = 9
	ISketchName        = 11
	ISketchVersion     = 12
	IGatewayReady      = 14
	IHeartbeatRequest  = 18
	IPresentation      = 19
	IDiscoverRequest   = 20
	IDiscoverResponse  = 21
	IHeartbeatResponse = 22
)

// Presentation types used by the simulator and the pending list.
const (
	SArduinoNode         = 17
	SArduinoRepeaterNode = 18
	STemp                = 6
	SHum                 = 7
)

// Set/req value types used by name in this package (the full table is in
// vtypes).
const (
	VTemp = 0
	VHum  = 1
)

// MSMessage is one MySensors serial-protocol message:
//
//	node-id;child-sensor-id;command;ack;type;payload\n
//
// Payload aliases the decoded line: copy it to keep it.
type MSMessage struct {
	Node    int // 0..255; 0 is the gateway, 255 a node without id / broadcast
	Child   int // 0..255; 255 is the node itself
	Command int // CmdPresentation..CmdStream
	Ack     bool
	Type    int // 0..255, meaning depends on Command
	Payload []byte
}

// Errors of the MySensors codec, wrapped with the detail.
var (
	ErrFieldCount = errors.New("wrong field count")
	ErrBadField   = errors.New("bad field")
	ErrBadText    = errors.New("bad text")
)

// DecodeMySensors parses one line (without its newline). The payload is
// everything after the fifth ';' and may itself contain ';' (V_POSITION
// does). It is a pure function and does not allocate unless it fails.
//
// Rejected: more than MaxMySensorsLine bytes, invalid UTF-8 or control
// bytes, fewer than six fields, a numeric field that is empty, not decimal,
// longer than three digits or above 255, a command above 4, ack other than
// 0 or 1.
func DecodeMySensors(line []byte) (MSMessage, error) {
	var m MSMessage
	if len(line) > MaxMySensorsLine {
		return m, fmt.Errorf("%w: %d bytes, at most %d", ErrLineTooLong, len(line), MaxMySensorsLine)
	}
	if i := badTextAt(line); i >= 0 {
		return m, fmt.Errorf("%w: invalid UTF-8 or control byte at offset %d", ErrBadText, i)
	}
	var f [5]int
	rest := line
	for k := 0; k < 5; k++ {
		i := bytes.IndexByte(rest, ';')
		if i < 0 {
			return m, fmt.Errorf("%w: %d fields, want 6", ErrFieldCount, k+1)
		}
		v, ok := parseSmall(rest[:i])
		if !ok {
			return m, fmt.Errorf("%w: field %d is not a number in 0..255", ErrBadField, k+1)
		}
		f[k] = v
		rest = rest[i+1:]
	}
	if f[2] > CmdStream {
		return m, fmt.Errorf("%w: command %d, at most %d", ErrBadField, f[2], CmdStream)
	}
	if f[3] > 1 {
		return m, fmt.Errorf("%w: ack %d, want 0 or 1", ErrBadField, f[3])
	}
	m = MSMessage{Node: f[0], Child: f[1], Command: f[2], Ack: f[3] == 1, Type: f[4], Payload: rest}
	return m, nil
}

// parseSmall parses a field of 1..3 decimal digits with a value in 0..255.
func parseSmall(b []byte) (v int, ok bool) {
	if len(b) < 1 || len(b) > 3 {
		return 0, false
	}
	for _, c := range b {
		if c < '0' || c > '9' {
			return 0, false
		}
		v = v*10 + int(c-'0')
	}
	return v, v <= 255
}

// badTextAt returns the offset of the first invalid UTF-8 sequence or
// control byte in b, or -1.
func badTextAt(b []byte) int {
	for i := 0; i < len(b); {
		c := b[i]
		if c < utf8.RuneSelf {
			if c < 0x20 || c == 0x7f {
				return i
			}
			i++
			continue
		}
		r, size := utf8.DecodeRune(b[i:])
		if r == utf8.RuneError && size <= 1 {
			return i
		}
		i += size
	}
	return -1
}

// AppendMySensors appends m as a line (with its newline) to dst. It does not
// validate: encode only what DecodeMySensors would accept, i.e. fields in
// range and a payload without newline or control bytes.
func AppendMySensors(dst []byte, m MSMessage) []byte {
	dst = strconv.AppendInt(dst, int64(m.Node), 10)
	dst = append(dst, ';')
	dst = strconv.AppendInt(dst, int64(m.Child), 10)
	dst = append(dst, ';')
	dst = strconv.AppendInt(dst, int64(m.Command), 10)
	if m.Ack {
		dst = append(dst, ";1;"...)
	} else {
		dst = append(dst, ";0;"...)
	}
	dst = strconv.AppendInt(dst, int64(m.Type), 10)
	dst = append(dst, ';')
	dst = append(dst, m.Payload...)
	return append(dst, '\n')
}
