package modbus

import (
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"
	"math"
	"reflect"
	"testing"
)

func TestCRC(t *testing.T) {
	// The check value of CRC-16/MODBUS (reveng catalogue) and the request
	// frame of the spec's worked example (Modbus over Serial Line §6.2.2
	// shows the CRC low byte first).
	if got := CRC([]byte("123456789")); got != 0x4B37 {
		t.Errorf("CRC(123456789) = %#04x, want 0x4b37", got)
	}
	f, err := AppendRequest(nil, Request{Unit: 1, Func: FuncReadHoldingRegisters, Addr: 0, Count: 10})
	if err != nil {
		t.Fatal(err)
	}
	if got := hex.EncodeToString(f); got != "01030000000ac5cd" {
		t.Errorf("read request = %s, want 01030000000ac5cd", got)
	}
}

// frameCases are request/response pairs in both directions; the fuzz
// targets are seeded from them.
var frameCases = []struct {
	name string
	req  Request
	res  Response
}{
	{"read holding", Request{Unit: 1, Func: FuncReadHoldingRegisters, Addr: 100, Count: 3},
		Response{Unit: 1, Func: FuncReadHoldingRegisters, Regs: []uint16{1, 0xFFFF, 0x8000}}},
	{"read input", Request{Unit: 247, Func: FuncReadInputRegisters, Addr: 0xFFFE, Count: 2},
		Response{Unit: 247, Func: FuncReadInputRegisters, Regs: []uint16{0x4148, 0}}},
	{"read coils", Request{Unit: 3, Func: FuncReadCoils, Addr: 19, Count: 10},
		Response{Unit: 3, Func: FuncReadCoils, Bits: []bool{true, false, true, true, false, false, false, false, true, true}}},
	{"read discrete", Request{Unit: 3, Func: FuncReadDiscreteInputs, Addr: 0, Count: 1},
		Response{Unit: 3, Func: FuncReadDiscreteInputs, Bits: []bool{true}}},
	{"write coil", Request{Unit: 9, Func: FuncWriteSingleCoil, Addr: 172, Value: 0xFF00},
		Response{Unit: 9, Func: FuncWriteSingleCoil, Addr: 172, Value: 0xFF00}},
	{"write register", Request{Unit: 9, Func: FuncWriteSingleRegister, Addr: 1, Value: 3},
		Response{Unit: 9, Func: FuncWriteSingleRegister, Addr: 1, Value: 3}},
	{"write registers", Request{Unit: 9, Func: FuncWriteMultipleRegisters, Addr: 1, Count: 2, Regs: []uint16{0x000A, 0x0102}},
		Response{Unit: 9, Func: FuncWriteMultipleRegisters, Addr: 1, Count: 2}},
	{"write coils", Request{Unit: 9, Func: FuncWriteMultipleCoils, Addr: 19, Count: 10,
		Coils: []bool{true, false, true, true, false, false, true, true, true, false}},
		Response{Unit: 9, Func: FuncWriteMultipleCoils, Addr: 19, Count: 10}},
}

func TestFrameRoundTrip(t *testing.T) {
	for _, tt := range frameCases {
		t.Run(tt.name, func(t *testing.T) {
			rf, err := AppendRequest(nil, tt.req)
			if err != nil {
				t.Fatalf("AppendRequest = %v", err)
			}
			if n := RequestLen(rf[:min(len(rf), 7)]); n != len(rf) {
				t.Errorf("RequestLen = %d, want %d", n, len(rf))
			}
			got, err := DecodeRequest(rf)
			if err != nil || !reflect.DeepEqual(got, tt.req) {
				t.Errorf("DecodeRequest(%x) = %+v, %v; want %+v", rf, got, err, tt.req)
			}
			sf := AppendResponse(nil, tt.res)
			if n := ResponseLen(tt.req, sf[:3]); n != len(sf) {
				t.Errorf("ResponseLen = %d, want %d", n, len(sf))
			}
			res, err := DecodeResponse(tt.req, sf)
			if err != nil || !reflect.DeepEqual(res, tt.res) {
				t.Errorf("DecodeResponse(%x) = %+v, %v; want %+v", sf, res, err, tt.res)
			}
		})
	}
}

func TestDecodeResponseErrors(t *testing.T) {
	req := Request{Unit: 5, Func: FuncReadHoldingRegisters, Addr: 0, Count: 2}
	good := AppendResponse(nil, Response{Unit: 5, Func: FuncReadHoldingRegisters, Regs: []uint16{1, 2}})
	corrupt := bytes.Clone(good)
	corrupt[3] ^= 1
	otherUnit := AppendResponse(nil, Response{Unit: 6, Func: FuncReadHoldingRegisters, Regs: []uint16{1, 2}})
	short := AppendResponse(nil, Response{Unit: 5, Func: FuncReadHoldingRegisters, Regs: []uint16{1}})
	otherFunc := AppendResponse(nil, Response{Unit: 5, Func: FuncReadInputRegisters, Regs: []uint16{1, 2}})
	tests := []struct {
		name  string
		frame []byte
		want  error
	}{
		{"bad crc", corrupt, ErrCRC},
		{"other unit", otherUnit, ErrFrame},
		{"too few registers", short, ErrFrame},
		{"other function", otherFunc, ErrFrame},
		{"three bytes", []byte{5, 3, 0}, ErrFrame},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := DecodeResponse(req, tt.frame); !errors.Is(err, tt.want) {
				t.Errorf("DecodeResponse(%x) = %v, want %v", tt.frame, err, tt.want)
			}
		})
	}
	exc := AppendException(nil, 5, FuncReadHoldingRegisters, ExIllegalDataAddress)
	if n := ResponseLen(req, exc[:2]); n != 5 {
		t.Errorf("ResponseLen(exception) = %d, want 5", n)
	}
	_, err := DecodeResponse(req, exc)
	var ex *ExceptionError
	if !errors.As(err, &ex) || ex.Code != ExIllegalDataAddress || ex.Func != FuncReadHoldingRegisters {
		t.Fatalf("DecodeResponse(exception) = %v, want an *ExceptionError with code 2", err)
	}
	if want := "modbus exception 0x02 (illegal data address) to function 0x03"; err.Error() != want {
		t.Errorf("error = %q, want %q", err, want)
	}
}

func TestRequestValidation(t *testing.T) {
	bad := []Request{
		{Unit: 0, Func: FuncReadCoils, Count: 1},
		{Unit: 248, Func: FuncReadCoils, Count: 1},
		{Unit: 1, Func: FuncReadHoldingRegisters, Count: 126},
		{Unit: 1, Func: FuncReadCoils, Count: 2001},
		{Unit: 1, Func: FuncReadCoils, Count: 0},
		{Unit: 1, Func: FuncWriteSingleCoil, Value: 1},
		{Unit: 1, Func: FuncWriteMultipleRegisters, Count: 2, Regs: []uint16{1}},
		{Unit: 1, Func: FuncReadHoldingRegisters, Addr: 0xFFFF, Count: 2},
		{Unit: 1, Func: 0x2B, Count: 1},
	}
	for _, r := range bad {
		if f, err := AppendRequest(nil, r); err == nil {
			t.Errorf("AppendRequest(%+v) = %x, want an error", r, f)
		}
	}
}

func TestRegisterValues(t *testing.T) {
	f32 := math.Float32bits(230.5)
	tests := []struct {
		reg  Register
		regs []uint16
		want float64
	}{
		{Register{Type: TypeInt16}, []uint16{0xFFFE}, -2},
		{Register{Type: TypeUint16, Scale: 0.1}, []uint16{2315}, 231.5},
		{Register{Type: TypeInt32}, []uint16{0xFFFF, 0xFFFF}, -1},
		{Register{Type: TypeInt32, Words: WordLittle}, []uint16{0x0002, 0x0001}, 65538},
		{Register{Type: TypeUint32, Scale: 0.01, Offset: -10}, []uint16{0x0001, 0x0000}, 645.36},
		{Register{Type: TypeUint16, Scale: 0.1}, []uint16{2305}, 230.5},
		{Register{Type: TypeUint32, Words: WordLittle}, []uint16{0x0000, 0x8000}, 2147483648},
		{Register{Type: TypeFloat32}, []uint16{uint16(f32 >> 16), uint16(f32)}, 230.5},
		{Register{Type: TypeFloat32, Words: WordLittle, Scale: 2}, []uint16{uint16(f32), uint16(f32 >> 16)}, 461},
	}
	for _, tt := range tests {
		got, err := tt.reg.decodeRegs(tt.regs)
		if err != nil || got != tt.want {
			t.Errorf("%+v decode(%x) = %v, %v; want %v", tt.reg, tt.regs, got, err, tt.want)
			continue
		}
		back, err := tt.reg.encodeRegs(tt.want)
		if err != nil || !reflect.DeepEqual(back, tt.regs) {
			t.Errorf("%+v encode(%v) = %x, %v; want %x", tt.reg, tt.want, back, err, tt.regs)
		}
	}
	if _, err := (Register{Attr: "sp", Type: TypeInt16}).encodeRegs(40000); err == nil {
		t.Error("encode 40000 as int16: want an out-of-range error")
	}
	nan := math.Float32bits(float32(math.NaN()))
	if _, err := (Register{Attr: "p", Type: TypeFloat32}).decodeRegs([]uint16{uint16(nan >> 16), uint16(nan)}); err == nil {
		t.Error("decode a NaN float32: want an error (NaN is no NGSI number)")
	}
}

func TestPlanBlocks(t *testing.T) {
	regs := []Register{
		{Attr: "a", Table: TableHolding, Addr: 10, Type: TypeFloat32},
		{Attr: "b", Table: TableHolding, Addr: 12, Type: TypeUint16},
		{Attr: "c", Table: TableHolding, Addr: 20, Type: TypeUint16}, // a gap: another request
		{Attr: "d", Table: TableInput, Addr: 12, Type: TypeInt16},
		{Attr: "e", Table: TableCoil, Addr: 0},
		{Attr: "f", Table: TableCoil, Addr: 1},
	}
	got := planBlocks(regs)
	type short struct {
		fn          byte
		addr, count uint16
		n           int
	}
	var s []short
	for _, b := range got {
		s = append(s, short{b.fn, b.addr, b.count, len(b.regs)})
	}
	want := []short{{FuncReadCoils, 0, 2, 2}, {FuncReadHoldingRegisters, 10, 3, 2}, {FuncReadHoldingRegisters, 20, 1, 1}, {FuncReadInputRegisters, 12, 1, 1}}
	if !reflect.DeepEqual(s, want) {
		t.Errorf("planBlocks = %+v, want %+v", s, want)
	}
	// 64 contiguous float32 (128 registers) do not fit one read of at
	// most 125: two requests, neither splitting a value.
	var many []Register
	for i := range 64 {
		many = append(many, Register{Attr: fmt.Sprint("v", i), Table: TableInput, Addr: uint16(2 * i), Type: TypeFloat32})
	}
	got = planBlocks(many)
	if len(got) != 2 || got[0].count != 124 || got[1].addr != 124 || got[1].count != 4 {
		t.Errorf("planBlocks(64 float32) = %d blocks, first %d registers", len(got), got[0].count)
	}
}

// FuzzDecodeResponse: whatever a slave (or noise) sends, decoding never
// panics, a length is bounded, and a decoded answer has what was asked.
func FuzzDecodeResponse(f *testing.F) {
	for _, tt := range frameCases {
		rf, _ := AppendRequest(nil, tt.req)
		f.Add(rf[:8], AppendResponse(nil, tt.res))
		f.Add(rf[:8], AppendException(nil, tt.req.Unit, tt.req.Func, ExServerDeviceBusy))
	}
	f.Fuzz(func(t *testing.T, reqHead, frame []byte) {
		if len(reqHead) < 6 {
			return
		}
		req := Request{Unit: reqHead[0], Func: reqHead[1], Addr: uint16(reqHead[2])<<8 | uint16(reqHead[3]),
			Count: uint16(reqHead[4])<<8 | uint16(reqHead[5])}
		if n := ResponseLen(req, frame); n < 0 || n > MaxFrameBytes+4 {
			t.Fatalf("ResponseLen = %d", n)
		}
		res, err := DecodeResponse(req, frame)
		if err != nil {
			return
		}
		switch req.Func {
		case FuncReadCoils, FuncReadDiscreteInputs:
			if len(res.Bits) != int(req.Count) {
				t.Fatalf("%d bits for a request of %d", len(res.Bits), req.Count)
			}
		case FuncReadHoldingRegisters, FuncReadInputRegisters:
			if len(res.Regs) != int(req.Count) {
				t.Fatalf("%d registers for a request of %d", len(res.Regs), req.Count)
			}
		}
		if res.Unit != req.Unit {
			t.Fatalf("answer of unit %d accepted for unit %d", res.Unit, req.Unit)
		}
	})
}

// FuzzDecodeRequest: the slave side (the simulator) never panics, and
// what it accepts re-encodes to a frame that decodes the same (padding
// bits of a coil write may differ).
func FuzzDecodeRequest(f *testing.F) {
	for _, tt := range frameCases {
		rf, _ := AppendRequest(nil, tt.req)
		f.Add(rf)
	}
	f.Fuzz(func(t *testing.T, frame []byte) {
		req, err := DecodeRequest(frame)
		if err != nil {
			return
		}
		back, err := AppendRequest(nil, req)
		if err != nil || len(back) != len(frame) {
			t.Fatalf("DecodeRequest(%x) = %+v; re-encoded %x, %v", frame, req, back, err)
		}
		again, err := DecodeRequest(back)
		if err != nil || !reflect.DeepEqual(again, req) {
			t.Fatalf("DecodeRequest(%x) = %+v, then %+v, %v", frame, req, again, err)
		}
	})
}

func BenchmarkDecodeResponse(b *testing.B) {
	req := Request{Unit: 1, Func: FuncReadInputRegisters, Addr: 0, Count: 14}
	frame := AppendResponse(nil, Response{Unit: 1, Func: FuncReadInputRegisters, Regs: make([]uint16, 14)})
	b.ReportAllocs()
	for b.Loop() {
		if _, err := DecodeResponse(req, frame); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkAppendRequest(b *testing.B) {
	buf := make([]byte, 0, MaxFrameBytes)
	req := Request{Unit: 1, Func: FuncReadInputRegisters, Addr: 0, Count: 14}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := AppendRequest(buf[:0], req); err != nil {
			b.Fatal(err)
		}
	}
}
