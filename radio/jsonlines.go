package radio

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"time"
	"unicode/utf8"

	"github.com/edgegate/edgegate/internal/reading"
)

// MaxJSONLine bounds one line of the JSON-lines codec (64 KiB).
const MaxJSONLine = 64 << 10

// JSONLine is one frame of the JSON-lines codec:
//
//	{"device":"th-1","seq":12,"time":"2024-05-01T10:00:00Z","attrs":{"temperature":21.5}}
//
// Attrs is a JSON object in either form reading.Parse accepts (flat or
// NGSI-like, mixed). Seq and Time are optional.
type JSONLine struct {
	Device string
	Seq    *uint64         // the device's own frame counter, if it keeps one
	Time   time.Time       // observation time; zero if the line has none
	Attrs  json.RawMessage // a JSON object; aliases the decoded line
}

type jsonLineWire struct {
	Device string          `json:"device"`
	Seq    *uint64         `json:"seq,omitempty"`
	Time   string          `json:"time,omitempty"`
	Attrs  json.RawMessage `json:"attrs"`
}

// ErrBadJSON reports a JSON line that is not a valid frame.
var ErrBadJSON = errors.New("bad JSON line")

// DecodeJSONLine parses one line (without its newline). It refuses lines
// longer than MaxJSONLine, invalid UTF-8, unknown top-level keys, a device
// id that is not a valid NGSI id, a time that is not RFC 3339, and attrs
// that are not a JSON object. Attribute-level rules are the pipeline's
// (reading.Parse and Validate).
func DecodeJSONLine(line []byte) (JSONLine, error) {
	var l JSONLine
	if len(line) > MaxJSONLine {
		return l, fmt.Errorf("%w: %d bytes, at most %d", ErrLineTooLong, len(line), MaxJSONLine)
	}
	if !utf8.Valid(line) {
		return l, fmt.Errorf("%w: invalid UTF-8", ErrBadText)
	}
	var w jsonLineWire
	dec := json.NewDecoder(bytes.NewReader(line))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&w); err != nil {
		return l, fmt.Errorf("%w: %v", ErrBadJSON, err)
	}
	if dec.More() {
		return l, fmt.Errorf("%w: trailing data after the object", ErrBadJSON)
	}
	if err := reading.ValidateDeviceID(w.Device); err != nil {
		return l, fmt.Errorf("%w: %v", ErrBadJSON, err)
	}
	attrs := bytes.TrimSpace(w.Attrs)
	if len(attrs) < 2 || attrs[0] != '{' {
		return l, fmt.Errorf("%w: attrs must be a JSON object", ErrBadJSON)
	}
	l = JSONLine{Device: w.Device, Seq: w.Seq, Attrs: attrs}
	if w.Time != "" {
		t, err := time.Parse(time.RFC3339Nano, w.Time)
		if err != nil {
			return JSONLine{}, fmt.Errorf("%w: time %q is not RFC 3339", ErrBadJSON, clipText([]byte(w.Time)))
		}
		l.Time = t
	}
	return l, nil
}

// AppendJSONLine appends l as one line (with its newline) to dst.
func AppendJSONLine(dst []byte, l JSONLine) ([]byte, error) {
	w := jsonLineWire{Device: l.Device, Seq: l.Seq, Attrs: l.Attrs}
	if !l.Time.IsZero() {
		w.Time = l.Time.Format(time.RFC3339Nano)
	}
	// No HTML escaping: attrs go out as they came ("&" stays "&").
	buf := bytes.NewBuffer(dst)
	enc := json.NewEncoder(buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(w); err != nil {
		return dst, fmt.Errorf("encode JSON line of %s: %w", l.Device, err)
	}
	return buf.Bytes(), nil // Encode ends the line with a newline
}

// pipelinePayload is the payload handed to the pipeline for l: its attrs,
// with the line's time as a top-level "TimeInstant" that reading.Parse
// takes as the observation time. The line's time wins over one inside
// attrs (the last duplicate key wins in encoding/json). The result is a
// fresh slice: l.Attrs aliases the serial buffer.
func (l JSONLine) pipelinePayload() []byte {
	if l.Time.IsZero() {
		return append([]byte(nil), l.Attrs...)
	}
	inner := bytes.TrimSpace(l.Attrs[1 : len(l.Attrs)-1])
	out := make([]byte, 0, len(l.Attrs)+48)
	out = append(out, '{')
	out = append(out, inner...)
	if len(inner) > 0 {
		out = append(out, ',')
	}
	out = append(out, `"TimeInstant":"`...)
	out = l.Time.UTC().AppendFormat(out, time.RFC3339Nano)
	return append(out, `"}`...)
}
