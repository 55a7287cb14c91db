package logx

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

func TestRedactURL(t *testing.T) {
	for _, tt := range []struct{ in, want string }{
		{"https://broker.example/v2", "https://broker.example/v2"},
		{"https://alice:s3cret@broker.example/v2", "https://REDACTED@broker.example/v2"},
		{"tls://tok3n@broker:8883", "tls://REDACTED@broker:8883"},
		{"https://h/x?access_token=s3cret&a=b", "https://h/x?a=REDACTED&access_token=REDACTED"},
		{"https://h/x#s3cret", "https://h/x#REDACTED"},
		{"https://al ice:s3cret@h/%zz?t=s3cret", "https://REDACTED@h/%zz?REDACTED"},
		{"alice:s3cret@broker:8883", "REDACTED@broker:8883"},
		{"alice@example.org", "alice@example.org"},
		{"plain", "plain"},
	} {
		got := RedactURL(tt.in)
		if got != tt.want {
			t.Errorf("RedactURL(%q) = %q, want %q", tt.in, got, tt.want)
		}
		if strings.Contains(got, "s3cret") {
			t.Errorf("RedactURL(%q) = %q leaks the secret", tt.in, got)
		}
	}
}
