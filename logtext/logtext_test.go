package logtext

import (
	"strings"
	"testing"
	"unicode/utf8"
)

func TestClip(t *testing.T) {
	tests := []struct {
		in   string
		n    int
		want string
	}{
		{"short", 64, "short"},
		{"line\nforged: INFO admin logged in", 64, "line forged: INFO admin logged in"},
		{strings.Repeat("a", 10), 4, "aaaa…"},
		{"ééé", 3, "é…"}, // never half a rune
		{"tab\tdel\x7f", 64, "tab del "},
	}
	for _, tt := range tests {
		got := Clip(tt.in, tt.n)
		if got != tt.want || !utf8.ValidString(got) {
			t.Errorf("Clip(%q, %d) = %q, want %q", tt.in, tt.n, got, tt.want)
		}
	}
}
