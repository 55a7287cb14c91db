package main

import (
	"strings"
	"testing"
	"unicode/utf8"

	qrcode "github.com/skip2/go-qrcode"
)

// TestRoundTrip decodes the drawn characters back into modules and compares
// them with the library's bitmap: what the terminal shows is the code.
func TestQRRoundTrip(t *testing.T) {
	for _, text := range []string{"x", "https://sso.example.org/auth/realms/edgegate/device?user_code=BCDF-GHJK"} {
		code, err := qrcode.New(text, qrcode.Medium)
		if err != nil {
			t.Fatal(err)
		}
		code.DisableBorder = true
		bm := code.Bitmap()
		out, err := qrTerminal(text)
		if err != nil {
			t.Fatal(err)
		}
		lines := strings.Split(strings.TrimSuffix(out, "\n"), "\n")
		size := len(bm) + 2*qrQuiet
		if len(lines) != (size+1)/2 {
			t.Fatalf("qrTerminal(%q): %d lines, want %d", text, len(lines), (size+1)/2)
		}
		for i, l := range lines {
			if utf8.RuneCountInString(l) != size {
				t.Fatalf("line %d: %d cells, want %d", i, utf8.RuneCountInString(l), size)
			}
			for c, ch := range []rune(l) {
				for half, r := range []int{2 * i, 2*i + 1} {
					if r >= size {
						continue
					}
					light := ch == '█' || (half == 0 && ch == '▀') || (half == 1 && ch == '▄')
					rr, cc := r-qrQuiet, c-qrQuiet
					wantDark := rr >= 0 && rr < len(bm) && cc >= 0 && cc < len(bm) && bm[rr][cc]
					if light == wantDark {
						t.Fatalf("qrTerminal(%q): module (%d,%d) light=%v, want dark=%v", text, r, c, light, wantDark)
					}
				}
			}
		}
	}
}
