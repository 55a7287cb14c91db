package radio

import (
	"errors"
	"fmt"
	"math"
	"strconv"
	"unicode/utf8"

	"github.com/edgegate/edgegate/internal/logx"
	"github.com/edgegate/edgegate/internal/reading"
)

// valueKind is how a MySensors V_ payload is typed in the reading.
type valueKind uint8

const (
	kindNumber valueKind = iota + 1
	kindBool             // "0" or "1"
	kindText
)

// vtype names one MySensors set/req value type (serial API 2.x, V_TEMP=0 …
// V_POWER_FACTOR=56) as a reading attribute, with its kind and, for
// numbers, an optional valid range.
type vtype struct {
	name     string
	kind     valueKind
	lo, hi   float64
	hasRange bool
}

func num(name string) vtype { return vtype{name: name, kind: kindNumber} }
func rng(name string, lo, hi float64) vtype {
	return vtype{name: name, kind: kindNumber, lo: lo, hi: hi, hasRange: true}
}
func boolean(name string) vtype { return vtype{name: name, kind: kindBool} }
func text(name string) vtype    { return vtype{name: name, kind: kindText} }

// vtypes is indexed by the V_ number. Attribute names are the V_ names in
// lower camel case, except where the bare name says too little (V_WATT is
// "power", V_KWH "energy").
var vtypes = [...]vtype{
	0: num("temperature"), 1: rng("humidity", 0, 100), 2: boolean("status"),
	3: rng("percentage", 0, 100), 4: num("pressure"), 5: text("forecast"),
	6: num("rain"), 7: num("rainRate"), 8: num("wind"), 9: num("gust"),
	10: rng("direction", 0, 360), 11: num("uv"), 12: num("weight"),
	13: num("distance"), 14: num("impedance"), 15: boolean("armed"),
	16: boolean("tripped"), 17: num("power"), 18: num("energy"),
	19: text("sceneOn"), 20: text("sceneOff"), 21: text("hvacFlowState"),
	22: text("hvacSpeed"), 23: rng("lightLevel", 0, 100), 24: text("var1"),
	25: text("var2"), 26: text("var3"), 27: text("var4"), 28: text("var5"),
	29: text("up"), 30: text("down"), 31: text("stop"), 32: text("irSend"),
	33: text("irReceive"), 34: num("flow"), 35: num("volume"),
	36: boolean("lockStatus"), 37: num("level"), 38: num("voltage"),
	39: num("current"), 40: text("rgb"), 41: text("rgbw"), 42: text("sensorId"),
	43: text("unitPrefix"), 44: num("hvacSetpointCool"), 45: num("hvacSetpointHeat"),
	46: text("hvacFlowMode"), 47: text("text"), 48: text("custom"),
	49: text("position"), 50: text("irRecord"), 51: rng("ph", 0, 14), 52: num("orp"),
	53: num("ec"), 54: num("reactivePower"), 55: num("apparentPower"),
	56: rng("powerFactor", -1, 1),
}

// batteryAttr is the attribute an I_BATTERY_LEVEL becomes (percent 0..100).
var batteryAttr = rng("batteryLevel", 0, 100)

// ErrBadValue reports a payload that does not fit its V_ type.
var ErrBadValue = errors.New("bad value")

func lookupVType(t int) (vtype, bool) {
	if t < 0 || t >= len(vtypes) || vtypes[t].name == "" {
		return vtype{}, false
	}
	return vtypes[t], true
}

// appendAttrPayload appends the JSON object that reading.Parse reads as one
// NGSI-like attribute, e.g. {"temperature":{"value":21.5,"type":"Number"}}.
// It checks the payload against the kind and range first and appends
// nothing on error. Text values may not contain the characters the NGSI
// rules forbid (reading.Validate would refuse them anyway); V_POSITION's
// "lat;lon;alt" is rewritten "lat,lon,alt" for that reason.
func appendAttrPayload(dst []byte, vt vtype, payload []byte) ([]byte, error) {
	var f float64
	var b bool
	switch vt.kind {
	case kindNumber:
		v, err := strconv.ParseFloat(string(payload), 64) // does not allocate
		if err != nil || math.IsNaN(v) || math.IsInf(v, 0) {
			return dst, fmt.Errorf("%w: %s: %q is not a finite number", ErrBadValue, vt.name, clipText(payload))
		}
		if vt.hasRange && (v < vt.lo || v > vt.hi) {
			return dst, fmt.Errorf("%w: %s: %v outside %v..%v", ErrBadValue, vt.name, v, vt.lo, vt.hi)
		}
		f = v
	case kindBool:
		switch string(payload) {
		case "0":
		case "1":
			b = true
		default:
			return dst, fmt.Errorf("%w: %s: %q is not 0 or 1", ErrBadValue, vt.name, clipText(payload))
		}
	case kindText:
		if len(payload) == 0 {
			return dst, fmt.Errorf("%w: %s: empty", ErrBadValue, vt.name)
		}
		for i, c := range payload {
			if c == ';' && vt.name == "position" {
				continue
			}
			if c == '<' || c == '>' || c == '"' || c == '\'' || c == '=' || c == ';' || c == '(' || c == ')' || c == '\\' || c < 0x20 {
				return dst, fmt.Errorf("%w: %s: forbidden character %q at byte %d", ErrBadValue, vt.name, c, i)
			}
		}
		if !utf8.Valid(payload) {
			return dst, fmt.Errorf("%w: %s: invalid UTF-8", ErrBadValue, vt.name)
		}
	}
	dst = append(dst, `{"`...)
	dst = append(dst, vt.name...)
	dst = append(dst, `":{"value":`...)
	switch vt.kind {
	case kindNumber:
		dst = strconv.AppendFloat(dst, f, 'g', -1, 64)
		dst = append(dst, `,"type":"`+reading.TypeNumber+`"}}`...)
	case kindBool:
		dst = strconv.AppendBool(dst, b)
		dst = append(dst, `,"type":"`+reading.TypeBoolean+`"}}`...)
	default:
		dst = append(dst, '"')
		for _, c := range payload {
			if c == ';' {
				c = ','
			}
			dst = append(dst, c)
		}
		dst = append(dst, `","type":"`+reading.TypeText+`"}}`...)
	}
	return dst, nil
}

// clipText shortens untrusted bytes for an error message or a log line.
func clipText(b []byte) string { return logx.Clip(string(b), 32) }
