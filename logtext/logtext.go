// Package logtext makes untrusted text (a device id, a topic, a broker's
// answer) safe to put in one log line or error message: control characters
// become spaces, so nothing can forge another log line, and the text is cut
// at a byte limit without splitting a UTF-8 sequence.
package logtext

import "strings"

// Clip returns s fit for one log line, at most n bytes plus "…".
func Clip(s string, n int) string {
	s = strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return ' '
		}
		return r
	}, s)
	if len(s) > n {
		s = strings.ToValidUTF8(s[:n], "") + "…"
	}
	return s
}
