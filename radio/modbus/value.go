package modbus

import (
	"encoding/json"
	"fmt"
	"math"
	"strconv"
	"strings"
)

// Register tables (the "function" of a register map entry).
const (
	TableHolding  = "holding"  // read 0x03, write 0x06 / 0x10
	TableInput    = "input"    // read 0x04
	TableCoil     = "coil"     // read 0x01, write 0x05
	TableDiscrete = "discrete" // read 0x02
)

// Value types of a register map entry; the register count follows.
const (
	TypeInt16   = "int16"
	TypeUint16  = "uint16"
	TypeInt32   = "int32"
	TypeUint32  = "uint32"
	TypeFloat32 = "float32"
	TypeBool    = "bool" // coils and discrete inputs
)

// Word orders of 32-bit values: big (the high word at the lower address,
// the Modbus convention) or little (the low word first, as many meters do).
const (
	WordBig    = "big"
	WordLittle = "little"
)

// Tables, Types and WordOrders list the accepted names, for validation
// messages.
var (
	Tables     = []string{TableHolding, TableInput, TableCoil, TableDiscrete}
	Types      = []string{TypeInt16, TypeUint16, TypeInt32, TypeUint32, TypeFloat32}
	WordOrders = []string{WordBig, WordLittle}
)

// Register is one attribute of a device's register map.
type Register struct {
	Attr  string  // the reading's attribute name
	Table string  // TableHolding, TableInput, TableCoil or TableDiscrete
	Addr  uint16  // protocol address (0-based), not the 4xxxx "register number"
	Type  string  // register tables only; TypeBool for coils is implied
	Words string  // WordBig (default) or WordLittle, for 32-bit types
	Scale float64 // reported = raw*Scale + Offset; 0 means 1
	// Offset is added after scaling.
	Offset float64
	Unit   string // informational: shown in status and docs
	// Writable lets WriteAttr change it (holding registers and coils).
	Writable bool
}

// isBit reports a coil or discrete input.
func (r Register) isBit() bool { return r.Table == TableCoil || r.Table == TableDiscrete }

// Count is how many registers (or bits) the entry spans.
func (r Register) Count() int {
	switch r.Type {
	case TypeInt32, TypeUint32, TypeFloat32:
		return 2
	}
	return 1
}

func (r Register) scale() float64 {
	if r.Scale == 0 {
		return 1
	}
	return r.Scale
}

func (r Register) readFunc() byte {
	switch r.Table {
	case TableHolding:
		return FuncReadHoldingRegisters
	case TableInput:
		return FuncReadInputRegisters
	case TableCoil:
		return FuncReadCoils
	}
	return FuncReadDiscreteInputs
}

// Check validates the entry; the error names the field.
func (r Register) Check() error {
	switch r.Table {
	case TableHolding, TableInput:
		switch r.Type {
		case TypeInt16, TypeUint16, TypeInt32, TypeUint32, TypeFloat32:
		default:
			return fmt.Errorf("type: %q is not one of %s", r.Type, strings.Join(Types, ", "))
		}
	case TableCoil, TableDiscrete:
		if r.Type != "" && r.Type != TypeBool {
			return fmt.Errorf("type: %q: a %s is a bool (leave type out)", r.Type, r.Table)
		}
	default:
		return fmt.Errorf("function: %q is not one of %s", r.Table, strings.Join(Tables, ", "))
	}
	if r.Words != "" && r.Words != WordBig && r.Words != WordLittle {
		return fmt.Errorf("word_order: %q is not one of %s", r.Words, strings.Join(WordOrders, ", "))
	}
	if int(r.Addr)+r.Count() > 0x10000 {
		return fmt.Errorf("address: %d + %d registers passes 65535", r.Addr, r.Count())
	}
	if math.IsNaN(r.Scale) || math.IsInf(r.Scale, 0) || math.IsNaN(r.Offset) || math.IsInf(r.Offset, 0) {
		return fmt.Errorf("scale/offset must be finite numbers")
	}
	if r.Writable && (r.Table == TableInput || r.Table == TableDiscrete) {
		return fmt.Errorf("writable: a %s cannot be written (only holding and coil)", r.Table)
	}
	return nil
}

// decodeRegs turns the raw registers of one entry into its reported value:
// a float64 (Number) scaled and offset.
func (r Register) decodeRegs(regs []uint16) (float64, error) {
	if len(regs) != r.Count() {
		return 0, fmt.Errorf("%s: %d registers, want %d", r.Attr, len(regs), r.Count())
	}
	var raw float64
	switch r.Type {
	case TypeInt16:
		raw = float64(int16(regs[0]))
	case TypeUint16:
		raw = float64(regs[0])
	default:
		hi, lo := regs[0], regs[1]
		if r.Words == WordLittle {
			hi, lo = lo, hi
		}
		u := uint32(hi)<<16 | uint32(lo)
		switch r.Type {
		case TypeInt32:
			raw = float64(int32(u))
		case TypeUint32:
			raw = float64(u)
		default:
			f := math.Float32frombits(u)
			if math.IsNaN(float64(f)) || math.IsInf(float64(f), 0) {
				return 0, fmt.Errorf("%s: float32 register holds %v", r.Attr, f)
			}
			// The shortest decimal that is this float32 (49.95, not
			// 49.95000076293945): what the device meant.
			raw, _ = strconv.ParseFloat(strconv.FormatFloat(float64(f), 'g', -1, 32), 64)
		}
	}
	return tidy(raw*r.scale() + r.Offset), nil
}

// tidy rounds v to 12 significant digits, which every register type and
// a sane scale stay within, so that 2305 × 0.1 reports 230.5 rather than
// 230.50000000000003.
func tidy(v float64) float64 {
	t, err := strconv.ParseFloat(strconv.FormatFloat(v, 'g', 12, 64), 64)
	if err != nil {
		return v
	}
	return t
}

// encodeRegs is decodeRegs reversed: the raw registers that report v. A
// value the type cannot hold (after removing offset and scale) is an
// error naming the range; integers are rounded to the nearest.
func (r Register) encodeRegs(v float64) ([]uint16, error) {
	raw := (v - r.Offset) / r.scale()
	if math.IsNaN(raw) || math.IsInf(raw, 0) {
		return nil, fmt.Errorf("%s: %v is not a finite number", r.Attr, v)
	}
	var u uint32
	switch r.Type {
	case TypeFloat32:
		if math.Abs(raw) > math.MaxFloat32 {
			return nil, fmt.Errorf("%s: %v does not fit a float32", r.Attr, v)
		}
		u = math.Float32bits(float32(raw))
	default:
		lo, hi := intRange(r.Type)
		n := math.Round(raw)
		if n < lo || n > hi {
			return nil, fmt.Errorf("%s: %v (raw %v) is outside %s range %v..%v", r.Attr, v, n, r.Type, lo, hi)
		}
		u = uint32(int64(n))
		if r.Count() == 1 {
			return []uint16{uint16(u)}, nil
		}
	}
	hi, lo := uint16(u>>16), uint16(u)
	if r.Words == WordLittle {
		return []uint16{lo, hi}, nil
	}
	return []uint16{hi, lo}, nil
}

func intRange(t string) (float64, float64) {
	switch t {
	case TypeInt16:
		return math.MinInt16, math.MaxInt16
	case TypeUint16:
		return 0, math.MaxUint16
	case TypeInt32:
		return math.MinInt32, math.MaxInt32
	}
	return 0, math.MaxUint32
}

// toFloat accepts the value types a command may carry.
func toFloat(v any) (float64, error) {
	switch x := v.(type) {
	case float64:
		return x, nil
	case float32:
		return float64(x), nil
	case int:
		return float64(x), nil
	case int8:
		return float64(x), nil
	case int16:
		return float64(x), nil
	case int32:
		return float64(x), nil
	case int64:
		return float64(x), nil
	case uint:
		return float64(x), nil
	case uint8:
		return float64(x), nil
	case uint16:
		return float64(x), nil
	case uint32:
		return float64(x), nil
	case uint64:
		return float64(x), nil
	case json.Number:
		return x.Float64()
	case string:
		return strconv.ParseFloat(strings.TrimSpace(x), 64)
	case bool:
		if x {
			return 1, nil
		}
		return 0, nil
	}
	return 0, fmt.Errorf("a %T is not a number", v)
}

// toBool accepts what a coil command may carry: a bool, 0/1, or the
// words on/off, true/false.
func toBool(v any) (bool, error) {
	if b, ok := v.(bool); ok {
		return b, nil
	}
	if s, ok := v.(string); ok {
		switch strings.ToLower(strings.TrimSpace(s)) {
		case "on", "true", "1":
			return true, nil
		case "off", "false", "0":
			return false, nil
		}
		return false, fmt.Errorf("%q is not on/off, true/false or 1/0", s)
	}
	f, err := toFloat(v)
	if err != nil {
		return false, err
	}
	switch f {
	case 1:
		return true, nil
	case 0:
		return false, nil
	}
	return false, fmt.Errorf("%v is not 0 or 1", f)
}
