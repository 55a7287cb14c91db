package envelope

import (
	"encoding/base64"
	"encoding/json"
	"math"
	"slices"
	"strconv"
	"time"
	"unicode/utf8"
)

// The hot path (one Seal and one Body per queued reading) renders JSON by
// hand instead of through encoding/json and jws.Sign: the output is byte for
// byte what json.Marshal produces (sorted map keys, the same float and
// string encodings; TestEncodersMatchEncodingJSON pins that), with a
// fraction of the allocations. Values of types other than the ones a
// reading holds (float64, string, bool, nil, []any, map[string]any) fall
// back to json.Marshal.

// headerB64 is the base64url of the protected header, as jwx renders it
// (keys sorted): {"alg":"HS256","kid":"<kid>","typ":"edgegate-reading+jws"}.
func headerB64(alg, kid string) string {
	b := make([]byte, 0, 64+len(kid))
	b = append(b, `{"alg":`...)
	b = appendString(b, alg)
	b = append(b, `,"kid":`...)
	b = appendString(b, kid)
	b = append(b, `,"typ":"edgegate-reading+jws"}`...)
	return base64.RawURLEncoding.EncodeToString(b)
}

// appendClaims renders c as json.Marshal(c) does.
func appendClaims(b []byte, c *Claims) ([]byte, error) {
	b = append(b, `{"v":`...)
	b = strconv.AppendInt(b, int64(c.Version), 10)
	b = append(b, `,"gw":`...)
	b = appendString(b, c.Gateway)
	b = append(b, `,"dev":`...)
	b = appendString(b, c.Device)
	b = append(b, `,"seq":`...)
	b = strconv.AppendUint(b, c.Seq, 10)
	b = append(b, `,"t":`...)
	var err error
	if b, err = appendTime(b, c.Time); err != nil {
		return nil, err
	}
	b = append(b, `,"attrs":`...)
	if c.Attrs == nil {
		b = append(b, "null"...)
		if c.Kind != "" {
			b = append(b, `,"kind":`...)
			b = appendString(b, c.Kind)
		}
		return append(b, '}'), nil
	}
	b = append(b, '{')
	for i, name := range sortedNames(c.Attrs, "") {
		if i > 0 {
			b = append(b, ',')
		}
		a := c.Attrs[name]
		b = appendAttrHead(b, name, a.Type)
		if b, err = appendValue(b, a.Value); err != nil {
			return nil, err
		}
		b = append(b, '}')
	}
	b = append(b, '}')
	if c.Kind != "" {
		b = append(b, `,"kind":`...)
		b = appendString(b, c.Kind)
	}
	return append(b, '}'), nil
}

// appendAttrHead renders the start of an attribute, in the claims and in
// the NGSI body alike: "name":{"type":"T","value": — the value follows.
func appendAttrHead(b []byte, name, typ string) []byte {
	b = appendString(b, name)
	b = append(b, `:{"type":`...)
	b = appendString(b, typ)
	return append(b, `,"value":`...)
}

// appendTime renders t as time.Time.MarshalJSON does, into b.
func appendTime(b []byte, t time.Time) ([]byte, error) {
	b = append(b, '"')
	// AppendText is MarshalJSON's strict RFC 3339 without the quotes,
	// and validates the year range like it.
	b, err := t.AppendText(b)
	if err != nil {
		return nil, err
	}
	return append(b, '"'), nil
}

// sortedNames returns the keys of m plus extra (when not empty), sorted.
func sortedNames(m map[string]Attr, extra string) []string {
	names := make([]string, 0, len(m)+1)
	for k := range m {
		names = append(names, k)
	}
	if extra != "" {
		names = append(names, extra)
	}
	slices.Sort(names)
	return names
}

// appendValue renders v as json.Marshal does.
func appendValue(b []byte, v any) ([]byte, error) {
	switch x := v.(type) {
	case nil:
		return append(b, "null"...), nil
	case bool:
		return strconv.AppendBool(b, x), nil
	case string:
		return appendString(b, x), nil
	case float64:
		if math.IsInf(x, 0) || math.IsNaN(x) {
			break // json.Marshal's error
		}
		return appendFloat(b, x), nil
	case []any:
		b = append(b, '[')
		for i, e := range x {
			if i > 0 {
				b = append(b, ',')
			}
			var err error
			if b, err = appendValue(b, e); err != nil {
				return nil, err
			}
		}
		return append(b, ']'), nil
	case map[string]any:
		var small [8]string // most structured values are small: no allocation
		keys := small[:0]
		for k := range x {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		b = append(b, '{')
		for i, k := range keys {
			if i > 0 {
				b = append(b, ',')
			}
			b = appendString(b, k)
			b = append(b, ':')
			var err error
			if b, err = appendValue(b, x[k]); err != nil {
				return nil, err
			}
		}
		return append(b, '}'), nil
	}
	mb, err := json.Marshal(v)
	if err != nil {
		return nil, err
	}
	return append(b, mb...), nil
}

// appendFloat is encoding/json's float64 encoder (ES6 number formatting).
func appendFloat(b []byte, f float64) []byte {
	abs := math.Abs(f)
	format := byte('f')
	if abs != 0 && (abs < 1e-6 || abs >= 1e21) {
		format = 'e'
	}
	b = strconv.AppendFloat(b, f, format, -1, 64)
	if format == 'e' {
		// clean up e-09 to e-9
		n := len(b)
		if n >= 4 && b[n-4] == 'e' && b[n-3] == '-' && b[n-2] == '0' {
			b[n-2] = b[n-1]
			b = b[:n-1]
		}
	}
	return b
}

// AppendJSONString appends s as json.Marshal renders a string, without
// its allocations: for other encoders of the gateway's NGSI requests
// (internal/uplink).
func AppendJSONString(b []byte, s string) []byte { return appendString(b, s) }

// appendString renders s as json.Marshal does: HTML-safe escaping,
// invalid UTF-8 replaced by U+FFFD, U+2028 and U+2029 escaped (encoding/json
// encode.go appendString, copied so that no string takes the reflection
// path; TestEncodersMatchEncodingJSON and FuzzAppendString pin it).
func appendString(b []byte, s string) []byte {
	const hex = "0123456789abcdef"
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		if c := s[i]; c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' && c != '<' && c != '>' && c != '&' {
				i++
				continue
			}
			b = append(b, s[start:i]...)
			switch c {
			case '\\', '"':
				b = append(b, '\\', c)
			case '\b':
				b = append(b, '\\', 'b')
			case '\f':
				b = append(b, '\\', 'f')
			case '\n':
				b = append(b, '\\', 'n')
			case '\r':
				b = append(b, '\\', 'r')
			case '\t':
				b = append(b, '\\', 't')
			default:
				b = append(b, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xF])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			b = append(b, s[start:i]...)
			b = append(b, `\ufffd`...)
			i += size
			start = i
			continue
		}
		if r == '\u2028' || r == '\u2029' {
			b = append(b, s[start:i]...)
			b = append(b, '\\', 'u', '2', '0', '2', hex[r&0xF])
			i += size
			start = i
			continue
		}
		i += size
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}
