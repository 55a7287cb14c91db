package modbus

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Function codes (Modbus Application Protocol V1.1b3, §6).
const (
	FuncReadCoils              byte = 0x01
	FuncReadDiscreteInputs     byte = 0x02
	FuncReadHoldingRegisters   byte = 0x03
	FuncReadInputRegisters     byte = 0x04
	FuncWriteSingleCoil        byte = 0x05
	FuncWriteSingleRegister    byte = 0x06
	FuncWriteMultipleCoils     byte = 0x0F
	FuncWriteMultipleRegisters byte = 0x10
)

// Limits of one PDU (Application Protocol §6.1–6.12): quantities a request
// may carry, and the largest RTU frame (Modbus over Serial Line §2.5.1).
const (
	MaxReadBits   = 2000
	MaxReadRegs   = 125
	MaxWriteBits  = 1968
	MaxWriteRegs  = 123
	MaxFrameBytes = 256
	// MinUnit and MaxUnit bound a slave address; 0 is the broadcast, which
	// no slave answers, so a master that reads never uses it.
	MinUnit = 1
	MaxUnit = 247
)

// Exception codes (Application Protocol §7).
const (
	ExIllegalFunction    byte = 0x01
	ExIllegalDataAddress byte = 0x02
	ExIllegalDataValue   byte = 0x03
	ExServerDeviceFail   byte = 0x04
	ExAcknowledge        byte = 0x05
	ExServerDeviceBusy   byte = 0x06
	ExMemoryParity       byte = 0x08
	ExGatewayPath        byte = 0x0A
	ExGatewayTarget      byte = 0x0B
)

// Errors a caller branches on (errors.Is).
var (
	// ErrCRC: the frame's CRC does not match its bytes (line noise, a
	// collision on the bus).
	ErrCRC = errors.New("modbus: bad CRC")
	// ErrFrame: a frame that is not the answer to the request (wrong
	// unit, function, length or echo).
	ErrFrame = errors.New("modbus: malformed frame")
	// ErrTimeout: no complete answer within the request's timeout.
	ErrTimeout = errors.New("modbus: request timed out")
)

// ExceptionError is a slave's exception response: it understood the
// request and refused it.
type ExceptionError struct {
	Func byte // the request's function code (without the 0x80 flag)
	Code byte
}

func (e *ExceptionError) Error() string {
	return fmt.Sprintf("modbus exception %#02x (%s) to function %#02x", e.Code, exceptionName(e.Code), e.Func)
}

func exceptionName(c byte) string {
	switch c {
	case ExIllegalFunction:
		return "illegal function"
	case ExIllegalDataAddress:
		return "illegal data address"
	case ExIllegalDataValue:
		return "illegal data value"
	case ExServerDeviceFail:
		return "server device failure"
	case ExAcknowledge:
		return "acknowledge"
	case ExServerDeviceBusy:
		return "server device busy"
	case ExMemoryParity:
		return "memory parity error"
	case ExGatewayPath:
		return "gateway path unavailable"
	case ExGatewayTarget:
		return "gateway target failed to respond"
	}
	return "unknown"
}

// Request is one request PDU addressed to a unit.
type Request struct {
	Unit  byte
	Func  byte
	Addr  uint16
	Count uint16   // reads, 0x0F, 0x10: the quantity
	Value uint16   // 0x05: 0xFF00 (on) or 0x0000 (off); 0x06: the register
	Regs  []uint16 // 0x10: the registers to write (len == Count)
	Coils []bool   // 0x0F: the coils to write (len == Count)
}

// Response is a decoded normal response.
type Response struct {
	Unit  byte
	Func  byte
	Bits  []bool   // 0x01, 0x02: the requested count of bits
	Regs  []uint16 // 0x03, 0x04
	Addr  uint16   // echo of 0x05, 0x06, 0x0F, 0x10
	Value uint16   // echo of 0x05, 0x06
	Count uint16   // echo of 0x0F, 0x10
}

// crcTable is CRC-16/MODBUS (reflected polynomial 0xA001, init 0xFFFF;
// Modbus over Serial Line V1.02 §6.2.2).
var crcTable = func() (t [256]uint16) {
	for i := range t {
		c := uint16(i)
		for range 8 {
			if c&1 != 0 {
				c = c>>1 ^ 0xA001
			} else {
				c >>= 1
			}
		}
		t[i] = c
	}
	return t
}()

// CRC returns the CRC-16/MODBUS of b.
func CRC(b []byte) uint16 {
	crc := uint16(0xFFFF)
	for _, x := range b {
		crc = crc>>8 ^ crcTable[byte(crc)^x]
	}
	return crc
}

// appendCRC appends the CRC of frame[start:], low byte first (§2.5.1.2).
func appendCRC(dst []byte, start int) []byte {
	return binary.LittleEndian.AppendUint16(dst, CRC(dst[start:]))
}

func checkCRC(frame []byte) error {
	if len(frame) < 4 {
		return fmt.Errorf("%w: %d bytes, at least 4", ErrFrame, len(frame))
	}
	n := len(frame) - 2
	if binary.LittleEndian.Uint16(frame[n:]) != CRC(frame[:n]) {
		return ErrCRC
	}
	return nil
}

func bitBytes(n int) int { return (n + 7) / 8 }

// validate checks a request's function and quantities before it is sent.
func (r Request) validate() error {
	if r.Unit < MinUnit || r.Unit > MaxUnit {
		return fmt.Errorf("modbus: unit %d is not in %d..%d", r.Unit, MinUnit, MaxUnit)
	}
	q := int(r.Count)
	switch r.Func {
	case FuncReadCoils, FuncReadDiscreteInputs:
		if q < 1 || q > MaxReadBits {
			return fmt.Errorf("modbus: read of %d bits, 1..%d", q, MaxReadBits)
		}
	case FuncReadHoldingRegisters, FuncReadInputRegisters:
		if q < 1 || q > MaxReadRegs {
			return fmt.Errorf("modbus: read of %d registers, 1..%d", q, MaxReadRegs)
		}
	case FuncWriteSingleCoil:
		if r.Value != 0xFF00 && r.Value != 0 {
			return fmt.Errorf("modbus: single coil value %#04x, 0xFF00 or 0", r.Value)
		}
		return nil
	case FuncWriteSingleRegister:
		return nil
	case FuncWriteMultipleCoils:
		if q < 1 || q > MaxWriteBits || len(r.Coils) != q {
			return fmt.Errorf("modbus: write of %d coils (%d given), 1..%d", q, len(r.Coils), MaxWriteBits)
		}
	case FuncWriteMultipleRegisters:
		if q < 1 || q > MaxWriteRegs || len(r.Regs) != q {
			return fmt.Errorf("modbus: write of %d registers (%d given), 1..%d", q, len(r.Regs), MaxWriteRegs)
		}
	default:
		return fmt.Errorf("modbus: function %#02x is not supported", r.Func)
	}
	if int(r.Addr)+q > 0x10000 {
		return fmt.Errorf("modbus: address %d + %d passes 65535", r.Addr, q)
	}
	return nil
}

// AppendRequest appends r as an RTU frame (address, PDU, CRC) to dst.
func AppendRequest(dst []byte, r Request) ([]byte, error) {
	if err := r.validate(); err != nil {
		return dst, err
	}
	start := len(dst)
	dst = append(dst, r.Unit, r.Func)
	dst = binary.BigEndian.AppendUint16(dst, r.Addr)
	switch r.Func {
	case FuncWriteSingleCoil, FuncWriteSingleRegister:
		dst = binary.BigEndian.AppendUint16(dst, r.Value)
	case FuncWriteMultipleCoils:
		dst = binary.BigEndian.AppendUint16(dst, r.Count)
		dst = append(dst, byte(bitBytes(len(r.Coils))))
		dst = appendBits(dst, r.Coils)
	case FuncWriteMultipleRegisters:
		dst = binary.BigEndian.AppendUint16(dst, r.Count)
		dst = append(dst, byte(2*len(r.Regs)))
		for _, v := range r.Regs {
			dst = binary.BigEndian.AppendUint16(dst, v)
		}
	default:
		dst = binary.BigEndian.AppendUint16(dst, r.Count)
	}
	return appendCRC(dst, start), nil
}

// appendBits packs bits LSB first, the first bit in the lowest bit of the
// first byte (§6.1).
func appendBits(dst []byte, bits []bool) []byte {
	for i := 0; i < len(bits); i += 8 {
		var b byte
		for j := 0; j < 8 && i+j < len(bits); j++ {
			if bits[i+j] {
				b |= 1 << j
			}
		}
		dst = append(dst, b)
	}
	return dst
}

func unpackBits(b []byte, n int) []bool {
	out := make([]bool, n)
	for i := range out {
		out[i] = b[i/8]&(1<<(i%8)) != 0
	}
	return out
}

// ResponseLen says how long the answer to req is, given its first bytes
// (head): 0 while more bytes are needed to tell, else the whole frame's
// length, CRC included. An exception answer is 5 bytes. The result never
// exceeds MaxFrameBytes, so a reader's buffer is bounded whatever the
// bytes say. It lets a master frame an answer from a stream without
// relying on the inter-frame silence, which a tty's read timeout (100 ms
// steps) cannot measure.
func ResponseLen(req Request, head []byte) int {
	if len(head) < 2 {
		return 0
	}
	if head[1]&0x80 != 0 {
		return 5
	}
	switch req.Func {
	case FuncReadCoils, FuncReadDiscreteInputs, FuncReadHoldingRegisters, FuncReadInputRegisters:
		if len(head) < 3 {
			return 0
		}
		return 5 + int(head[2]) // at most 260: bounded below
	}
	return 8
}

// DecodeResponse checks frame (a whole RTU frame, CRC included) as the
// answer to req and decodes it. An exception answer is an
// *ExceptionError; a bad CRC is ErrCRC; anything else that is not a
// matching answer is ErrFrame.
func DecodeResponse(req Request, frame []byte) (Response, error) {
	if len(frame) > MaxFrameBytes+4 {
		return Response{}, fmt.Errorf("%w: %d bytes", ErrFrame, len(frame))
	}
	if err := checkCRC(frame); err != nil {
		return Response{}, err
	}
	pdu := frame[1 : len(frame)-2]
	if frame[0] != req.Unit {
		return Response{}, fmt.Errorf("%w: answer from unit %d to a request to unit %d", ErrFrame, frame[0], req.Unit)
	}
	if pdu[0] == req.Func|0x80 {
		if len(pdu) != 2 {
			return Response{}, fmt.Errorf("%w: exception of %d bytes", ErrFrame, len(pdu))
		}
		return Response{}, &ExceptionError{Func: req.Func, Code: pdu[1]}
	}
	if pdu[0] != req.Func {
		return Response{}, fmt.Errorf("%w: function %#02x in the answer to %#02x", ErrFrame, pdu[0], req.Func)
	}
	res := Response{Unit: frame[0], Func: pdu[0]}
	body := pdu[1:]
	switch req.Func {
	case FuncReadCoils, FuncReadDiscreteInputs:
		want := bitBytes(int(req.Count))
		if len(body) < 1 || int(body[0]) != want || len(body) != 1+want {
			return Response{}, fmt.Errorf("%w: %d data bytes for %d bits", ErrFrame, len(body)-1, req.Count)
		}
		res.Bits = unpackBits(body[1:], int(req.Count))
	case FuncReadHoldingRegisters, FuncReadInputRegisters:
		want := 2 * int(req.Count)
		if len(body) < 1 || int(body[0]) != want || len(body) != 1+want {
			return Response{}, fmt.Errorf("%w: %d data bytes for %d registers", ErrFrame, len(body)-1, req.Count)
		}
		res.Regs = make([]uint16, req.Count)
		for i := range res.Regs {
			res.Regs[i] = binary.BigEndian.Uint16(body[1+2*i:])
		}
	case FuncWriteSingleCoil, FuncWriteSingleRegister:
		if len(body) != 4 {
			return Response{}, fmt.Errorf("%w: echo of %d bytes", ErrFrame, len(body))
		}
		res.Addr, res.Value = binary.BigEndian.Uint16(body), binary.BigEndian.Uint16(body[2:])
		if res.Addr != req.Addr || res.Value != req.Value {
			return Response{}, fmt.Errorf("%w: echo %d=%#04x of a write of %d=%#04x", ErrFrame, res.Addr, res.Value, req.Addr, req.Value)
		}
	case FuncWriteMultipleCoils, FuncWriteMultipleRegisters:
		if len(body) != 4 {
			return Response{}, fmt.Errorf("%w: echo of %d bytes", ErrFrame, len(body))
		}
		res.Addr, res.Count = binary.BigEndian.Uint16(body), binary.BigEndian.Uint16(body[2:])
		if res.Addr != req.Addr || res.Count != req.Count {
			return Response{}, fmt.Errorf("%w: echo %d×%d of a write of %d×%d", ErrFrame, res.Addr, res.Count, req.Addr, req.Count)
		}
	default:
		return Response{}, fmt.Errorf("%w: function %#02x is not supported", ErrFrame, req.Func)
	}
	return res, nil
}

// RequestLen is ResponseLen for a slave: the length of the request frame
// starting with head, 0 while more bytes are needed, -1 for a function it
// cannot frame (the slave then waits for the line to fall silent).
func RequestLen(head []byte) int {
	if len(head) < 2 {
		return 0
	}
	switch head[1] {
	case FuncReadCoils, FuncReadDiscreteInputs, FuncReadHoldingRegisters, FuncReadInputRegisters,
		FuncWriteSingleCoil, FuncWriteSingleRegister:
		return 8
	case FuncWriteMultipleCoils, FuncWriteMultipleRegisters:
		if len(head) < 7 {
			return 0
		}
		return 9 + int(head[6])
	}
	return -1
}

// DecodeRequest decodes a whole request frame (a slave's view, used by the
// simulated slave and the fuzz tests). A quantity out of range is an
// *ExceptionError with ExIllegalDataValue, as a slave answers it (§7).
func DecodeRequest(frame []byte) (Request, error) {
	if len(frame) > MaxFrameBytes {
		return Request{}, fmt.Errorf("%w: %d bytes", ErrFrame, len(frame))
	}
	if err := checkCRC(frame); err != nil {
		return Request{}, err
	}
	pdu := frame[1 : len(frame)-2]
	r := Request{Unit: frame[0], Func: pdu[0]}
	if n := RequestLen(frame); n < 0 {
		return r, &ExceptionError{Func: r.Func, Code: ExIllegalFunction}
	} else if n != len(frame) {
		return r, fmt.Errorf("%w: %d bytes for function %#02x, want %d", ErrFrame, len(frame), r.Func, n)
	}
	r.Addr = binary.BigEndian.Uint16(pdu[1:])
	switch r.Func {
	case FuncWriteSingleCoil, FuncWriteSingleRegister:
		r.Value = binary.BigEndian.Uint16(pdu[3:])
	case FuncWriteMultipleCoils:
		r.Count = binary.BigEndian.Uint16(pdu[3:])
		data := pdu[6:]
		if int(pdu[5]) != bitBytes(int(r.Count)) || len(data) != int(pdu[5]) {
			return r, &ExceptionError{Func: r.Func, Code: ExIllegalDataValue}
		}
		r.Coils = unpackBits(data, int(r.Count))
	case FuncWriteMultipleRegisters:
		r.Count = binary.BigEndian.Uint16(pdu[3:])
		data := pdu[6:]
		if int(pdu[5]) != 2*int(r.Count) || len(data) != int(pdu[5]) {
			return r, &ExceptionError{Func: r.Func, Code: ExIllegalDataValue}
		}
		r.Regs = make([]uint16, r.Count)
		for i := range r.Regs {
			r.Regs[i] = binary.BigEndian.Uint16(data[2*i:])
		}
	default:
		r.Count = binary.BigEndian.Uint16(pdu[3:])
	}
	if r.Unit < MinUnit || r.Unit > MaxUnit {
		return r, fmt.Errorf("%w: unit %d", ErrFrame, r.Unit)
	}
	if err := r.validate(); err != nil {
		return r, &ExceptionError{Func: r.Func, Code: ExIllegalDataValue}
	}
	return r, nil
}

// AppendResponse appends the RTU frame of a normal response (a slave's
// side).
func AppendResponse(dst []byte, r Response) []byte {
	start := len(dst)
	dst = append(dst, r.Unit, r.Func)
	switch r.Func {
	case FuncReadCoils, FuncReadDiscreteInputs:
		dst = append(dst, byte(bitBytes(len(r.Bits))))
		dst = appendBits(dst, r.Bits)
	case FuncReadHoldingRegisters, FuncReadInputRegisters:
		dst = append(dst, byte(2*len(r.Regs)))
		for _, v := range r.Regs {
			dst = binary.BigEndian.AppendUint16(dst, v)
		}
	case FuncWriteSingleCoil, FuncWriteSingleRegister:
		dst = binary.BigEndian.AppendUint16(dst, r.Addr)
		dst = binary.BigEndian.AppendUint16(dst, r.Value)
	default:
		dst = binary.BigEndian.AppendUint16(dst, r.Addr)
		dst = binary.BigEndian.AppendUint16(dst, r.Count)
	}
	return appendCRC(dst, start)
}

// AppendException appends the RTU frame of an exception response.
func AppendException(dst []byte, unit, fn, code byte) []byte {
	start := len(dst)
	dst = append(dst, unit, fn|0x80, code)
	return appendCRC(dst, start)
}
