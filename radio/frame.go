package radio

import (
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"
)

// ErrLineTooLong reports a line longer than the codec's limit; the rest of it
// up to the next newline is discarded.
var ErrLineTooLong = errors.New("line too long")

// LineSplitter frames a byte stream into newline-terminated lines. It is
// fed whatever each read returned — a read may carry half a frame, several
// frames, or the tail of one and the head of the next — and never assumes
// that one read is one frame.
//
// A line longer than Max bytes is reported once, as ErrLineTooLong, and
// skipped up to the next newline: the stream resynchronises there. A
// trailing '\r' is dropped (CRLF links) and empty lines are skipped.
//
// Memory is bounded by Max whatever the input.
type LineSplitter struct {
	max     int
	buf     []byte // the current partial line, at most max bytes
	discard bool   // inside an over-long line, dropping up to the next '\n'
	off     int64  // stream offset of the next byte fed
	start   int64  // stream offset where the current line began
	line    int64  // number of the current line, 1-based
}

// Line is one frame handed out by a LineSplitter. Bytes aliases the
// splitter's buffer: it is valid only until the callback returns.
type Line struct {
	Bytes  []byte
	No     int64 // line number in the stream, 1-based
	Offset int64 // stream offset of the line's first byte
	Err    error // ErrLineTooLong (wrapped); Bytes then holds the first bytes of the line
}

// NewLineSplitter returns a splitter for lines of at most max bytes
// (without the newline).
func NewLineSplitter(max int) *LineSplitter {
	if max <= 0 {
		max = 256
	}
	return &LineSplitter{max: max, buf: make([]byte, 0, min(max, 4096)), line: 1}
}

// Feed frames p, calling fn for every complete line and every over-long
// line. fn must not retain l.Bytes.
func (s *LineSplitter) Feed(p []byte, fn func(l Line)) {
	for len(p) > 0 {
		i := bytes.IndexByte(p, '\n')
		chunk := p
		if i >= 0 {
			chunk = p[:i]
		}
		if !s.discard {
			if len(s.buf)+len(chunk) > s.max {
				head := append(s.buf, chunk[:min(len(chunk), s.max-len(s.buf))]...)
				fn(Line{Bytes: head, No: s.line, Offset: s.start,
					Err: fmt.Errorf("%w: more than %d bytes", ErrLineTooLong, s.max)})
				s.buf = s.buf[:0]
				s.discard = true
			} else {
				s.buf = append(s.buf, chunk...)
			}
		}
		s.off += int64(len(chunk))
		if i < 0 {
			return
		}
		// A newline ends the current line.
		if !s.discard {
			b := s.buf
			if n := len(b); n > 0 && b[n-1] == '\r' {
				b = b[:n-1]
			}
			if len(b) > 0 {
				fn(Line{Bytes: b, No: s.line, Offset: s.start})
			}
		}
		s.buf = s.buf[:0]
		s.discard = false
		s.off++
		s.start = s.off
		s.line++
		p = p[i+1:]
	}
}

// Reset drops any partial line, as after a reconnect: the bytes before it
// belong to another session. Counters keep running.
func (s *LineSplitter) Reset() {
	s.buf = s.buf[:0]
	s.discard = false
	s.start = s.off
}

// clipHex renders at most 32 bytes of b as hex for a log line, so that a
// hostile frame can be debugged without flooding the log.
func clipHex(b []byte) string {
	const n = 32
	if len(b) <= n {
		return hex.EncodeToString(b)
	}
	return hex.EncodeToString(b[:n]) + "…"
}
