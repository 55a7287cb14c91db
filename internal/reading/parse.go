package reading

import (
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode/utf16"
	"unicode/utf8"
)

// The hand-written payload parser (issue 20). Parse runs it first; it
// accepts exactly what the encoding/json-based parseStd accepts and
// builds the same attributes, but with a handful of allocations instead of
// two dozen: the payload is copied into one string once and every
// unescaped name and string value is a substring of it, and no
// intermediate map or json.RawMessage is built.
//
// It never words an error itself. On anything that is not the plain,
// valid case — a syntax error, a number out of float64 range, a bad time,
// an empty "type", more than MaxAttrs attributes, a U+FFFD anywhere (a
// lone surrogate escape or one the device sent), nesting deeper than
// fastMaxDepth — it gives up and Parse runs parseStd on the same payload,
// which returns today's error (or result). So refusals stay byte for byte
// what they were, and the fast path only has to be right about what it
// accepts: FuzzParseDifferential compares the two on random input.

// fastMaxDepth bounds the fast parser's recursion; deeper input goes to
// parseStd (encoding/json allows 10000 levels, and Validate refuses more
// than maxDepth anyway).
const fastMaxDepth = 64

type fastParser struct {
	s   string // the payload, copied once; unescaped strings are substrings of it
	pos int
	// fail is set on anything the fast path leaves to parseStd.
	fail bool
}

// parseFast returns ok false when parseStd must decide (see above).
// payload is already known to be valid UTF-8 and within MaxPayloadBytes.
func parseFast(payload []byte) (attrs []Attribute, observed time.Time, ok bool) {
	p := fastParser{s: string(payload)}
	p.ws()
	if !p.eat('{') {
		return nil, time.Time{}, false
	}
	var (
		timeInstant, observedAt       string
		hasTimeInstant, hasObservedAt bool
	)
	// Counted first so that the slice is allocated once at its size.
	attrs = make([]Attribute, 0, p.countMembers())
	p.ws()
	if !p.eat('}') {
		for {
			p.ws()
			name := p.str()
			p.ws()
			if p.fail || !p.eat(':') {
				return nil, time.Time{}, false
			}
			p.ws()
			switch name {
			case "TimeInstant", "observedAt":
				// The last occurrence counts, as in a map; only a string
				// can be a time (null and the rest: parseStd's error).
				if p.peek() != '"' {
					return nil, time.Time{}, false
				}
				v := p.str()
				if name == "TimeInstant" {
					timeInstant, hasTimeInstant = v, true
				} else {
					observedAt, hasObservedAt = v, true
				}
			default:
				a, ok := p.attr(name)
				if !ok {
					return nil, time.Time{}, false
				}
				attrs = append(attrs, a)
			}
			p.ws()
			if p.fail {
				return nil, time.Time{}, false
			}
			if p.eat(',') {
				continue
			}
			if p.eat('}') {
				break
			}
			return nil, time.Time{}, false
		}
	}
	p.ws()
	if p.fail || p.pos != len(p.s) {
		return nil, time.Time{}, false
	}
	for _, t := range [...]struct {
		has bool
		v   string
	}{{hasTimeInstant, timeInstant}, {hasObservedAt, observedAt}} {
		if !t.has {
			continue
		}
		ts, err := time.Parse(time.RFC3339Nano, t.v)
		if err != nil {
			return nil, time.Time{}, false
		}
		observed = ts.UTC()
	}
	// Sorted by name; of a repeated name the last one stays, as
	// encoding/json's map keeps it (the sort is stable).
	if len(attrs) > 1 {
		slices.SortStableFunc(attrs, func(a, b Attribute) int { return strings.Compare(a.Name, b.Name) })
		w := 0
		for i := range attrs {
			if i+1 < len(attrs) && attrs[i+1].Name == attrs[i].Name {
				continue
			}
			attrs[w] = attrs[i]
			w++
		}
		clear(attrs[w:])
		attrs = attrs[:w]
	}
	if len(attrs) > MaxAttrs {
		return nil, time.Time{}, false
	}
	return attrs, observed, true
}

// countMembers counts the top-level members ahead (commas at depth 1,
// outside strings), as a capacity hint only.
func (p *fastParser) countMembers() int {
	n, depth := 1, 0
	s := p.s[p.pos:]
	for i := 0; i < len(s); i++ {
		switch s[i] {
		case '"':
			for i++; i < len(s) && s[i] != '"'; i++ {
				if s[i] == '\\' {
					i++
				}
			}
		case '{', '[':
			depth++
		case '}', ']':
			depth--
			if depth < 0 {
				return min(n, MaxAttrs+2)
			}
		case ',':
			if depth == 0 {
				n++
			}
		}
	}
	return min(n, MaxAttrs+2)
}

// attr parses a top-level member's value: NGSI-like ({"value":…,
// "type":…, "metadata":…}, nothing else) or flat.
func (p *fastParser) attr(name string) (Attribute, bool) {
	if p.peek() != '{' {
		v := p.value(0)
		return Attribute{Name: name, Type: inferType(v), Value: v}, !p.fail
	}
	// An object: NGSI-like only when its keys are among value, type and
	// metadata and value is one of them. Its members are kept in order
	// (a repeated key: the last one counts) until that is known.
	p.pos++
	var small [4]objMember
	members := small[:0]
	p.object(1, func(k string, v any) { members = append(members, objMember{k, v}) })
	if p.fail {
		return Attribute{}, false
	}
	var (
		val, typ        any
		hasVal, hasType bool
		ngsi            = true
	)
	for _, m := range members {
		switch m.key {
		case "value":
			val, hasVal = m.val, true
		case "type":
			typ, hasType = m.val, true
		case "metadata":
		default:
			ngsi = false
		}
	}
	if ngsi && hasVal {
		t, _ := typ.(string)
		if hasType && t == "" {
			return Attribute{}, false // parseStd's "type must be a non-empty string"
		}
		if t == "" {
			t = inferType(val)
		}
		return Attribute{Name: name, Type: t, Value: val}, true
	}
	obj := make(map[string]any, len(members))
	for _, m := range members {
		obj[m.key] = m.val
	}
	return Attribute{Name: name, Type: TypeStructured, Value: obj}, true
}

type objMember struct {
	key string
	val any
}

// object parses the members of an object whose '{' was consumed, up to
// and including its '}', handing each to each in order.
func (p *fastParser) object(depth int, each func(k string, v any)) {
	p.ws()
	if p.eat('}') {
		return
	}
	for !p.fail {
		p.ws()
		k := p.str()
		p.ws()
		if p.fail || !p.eat(':') {
			p.fail = true
			return
		}
		p.ws()
		v := p.value(depth)
		if p.fail {
			return
		}
		each(k, v)
		p.ws()
		if !p.eat(',') {
			p.fail = p.fail || !p.eat('}')
			return
		}
	}
}

// value parses any JSON value as encoding/json decodes it into an any:
// float64, string, bool, nil, []any, map[string]any.
func (p *fastParser) value(depth int) any {
	if depth > fastMaxDepth {
		p.fail = true
		return nil
	}
	switch c := p.peek(); {
	case c == '"':
		return p.str()
	case c == '{':
		// Straight into the map (a repeated key: the last one stays).
		p.pos++
		obj := map[string]any{}
		p.object(depth+1, func(k string, v any) { obj[k] = v })
		if p.fail {
			return nil
		}
		return obj
	case c == '[':
		p.pos++
		arr := []any{}
		p.ws()
		if p.eat(']') {
			return arr
		}
		for {
			p.ws()
			v := p.value(depth + 1)
			if p.fail {
				return nil
			}
			arr = append(arr, v)
			p.ws()
			if p.eat(',') {
				continue
			}
			if !p.eat(']') {
				p.fail = true
				return nil
			}
			return arr
		}
	case c == 't':
		return p.literal("true", true)
	case c == 'f':
		return p.literal("false", false)
	case c == 'n':
		return p.literal("null", nil)
	case c == '-' || c >= '0' && c <= '9':
		return p.number()
	}
	p.fail = true
	return nil
}

func (p *fastParser) literal(word string, v any) any {
	if !strings.HasPrefix(p.s[p.pos:], word) {
		p.fail = true
		return nil
	}
	p.pos += len(word)
	return v
}

// number parses a number of exactly JSON's grammar (strconv.ParseFloat
// alone would also take "0x1p3", "1_0", "Inf", "+1", ".5" or "01").
func (p *fastParser) number() any {
	s, i := p.s, p.pos
	start := i
	if i < len(s) && s[i] == '-' {
		i++
	}
	switch {
	case i < len(s) && s[i] == '0':
		i++
	case i < len(s) && s[i] >= '1' && s[i] <= '9':
		for i < len(s) && s[i] >= '0' && s[i] <= '9' {
			i++
		}
	default:
		p.fail = true
		return nil
	}
	// digits skips one or more digits at s[i:], or reports none.
	digits := func(i int) (int, bool) {
		j := i
		for j < len(s) && s[j] >= '0' && s[j] <= '9' {
			j++
		}
		return j, j > i
	}
	ok := true
	if i < len(s) && s[i] == '.' {
		i, ok = digits(i + 1)
	}
	if ok && i < len(s) && (s[i] == 'e' || s[i] == 'E') {
		i++
		if i < len(s) && (s[i] == '+' || s[i] == '-') {
			i++
		}
		i, ok = digits(i)
	}
	if !ok {
		p.fail = true
		return nil
	}
	f, err := strconv.ParseFloat(s[start:i], 64)
	if err != nil {
		// Out of range (1e400): parseStd's not_finite refusal.
		p.fail = true
		return nil
	}
	p.pos = i
	return f
}

// str parses a JSON string at p.pos. Without escapes it is a substring of
// the payload; a U+FFFD in the result (sent as such or from a lone
// surrogate escape) is left to parseStd, which tells the two apart.
func (p *fastParser) str() string {
	s := p.s
	i := p.pos
	if i >= len(s) || s[i] != '"' {
		p.fail = true
		return ""
	}
	i++
	start := i
	for i < len(s) {
		c := s[i]
		switch {
		case c == '"':
			p.pos = i + 1
			return s[start:i]
		case c == '\\':
			return p.unescape(start, i)
		case c < 0x20:
			p.fail = true
			return ""
		case c >= utf8.RuneSelf:
			// The payload is valid UTF-8 (Parse checked): only U+FFFD
			// (EF BF BD) matters.
			if c == 0xEF && strings.HasPrefix(s[i:], "\uFFFD") {
				p.fail = true
				return ""
			}
		}
		i++
	}
	p.fail = true
	return ""
}

// unescape decodes a string with escapes: the plain part s[start:i], then
// the rest, into a new string.
func (p *fastParser) unescape(start, i int) string {
	s := p.s
	b := make([]byte, 0, i-start+16)
	b = append(b, s[start:i]...)
	for i < len(s) {
		c := s[i]
		switch {
		case c == '"':
			p.pos = i + 1
			return string(b)
		case c < 0x20:
			p.fail = true
			return ""
		case c == 0xEF && strings.HasPrefix(s[i:], "\uFFFD"):
			p.fail = true
			return ""
		case c != '\\':
			b = append(b, c)
			i++
			continue
		}
		if i+1 >= len(s) {
			p.fail = true
			return ""
		}
		e := s[i+1]
		if c, ok := unescapeByte(e); ok {
			b = append(b, c)
			i += 2
			continue
		}
		if e != 'u' {
			p.fail = true
			return ""
		}
		r := hex4(s, i+2)
		if r < 0 {
			p.fail = true
			return ""
		}
		i += 6
		if utf16.IsSurrogate(r) {
			r2 := rune(-1)
			if i+1 < len(s) && s[i] == '\\' && s[i+1] == 'u' {
				r2 = hex4(s, i+2)
			}
			// A lone surrogate becomes U+FFFD: parseStd's call.
			if r = utf16.DecodeRune(r, r2); r == utf8.RuneError {
				p.fail = true
				return ""
			}
			i += 6
		}
		if r == utf8.RuneError {
			p.fail = true
			return ""
		}
		b = utf8.AppendRune(b, r)
	}
	p.fail = true
	return ""
}

// unescapeByte maps JSON's one-character escapes (\" \\ \/ \b \f \n \r \t).
func unescapeByte(e byte) (byte, bool) {
	switch e {
	case '"', '\\', '/':
		return e, true
	case 'b':
		return '\b', true
	case 'f':
		return '\f', true
	case 'n':
		return '\n', true
	case 'r':
		return '\r', true
	case 't':
		return '\t', true
	}
	return 0, false
}

// hex4 reads the four hex digits of a \u escape at s[i:], or -1.
func hex4(s string, i int) rune {
	if i+4 > len(s) {
		return -1
	}
	var r rune
	for _, c := range []byte(s[i : i+4]) {
		switch {
		case c >= '0' && c <= '9':
			c -= '0'
		case c >= 'a' && c <= 'f':
			c = c - 'a' + 10
		case c >= 'A' && c <= 'F':
			c = c - 'A' + 10
		default:
			return -1
		}
		r = r<<4 | rune(c)
	}
	return r
}

// ws skips JSON's four white-space bytes.
func (p *fastParser) ws() {
	for p.pos < len(p.s) && (p.s[p.pos] == ' ' || p.s[p.pos] == '\n' || p.s[p.pos] == '\r' || p.s[p.pos] == '\t') {
		p.pos++
	}
}

func (p *fastParser) peek() byte {
	if p.pos < len(p.s) {
		return p.s[p.pos]
	}
	return 0
}

func (p *fastParser) eat(c byte) bool {
	if p.pos < len(p.s) && p.s[p.pos] == c {
		p.pos++
		return true
	}
	return false
}
