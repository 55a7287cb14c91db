// qrTerminal renders QR codes for a terminal with Unicode half blocks, two
// modules per character cell, so that a code fits in a normal window and a
// phone can read it from the screen. Used by pair for the
// device-grant link.

package main

import (
	"fmt"
	"strings"

	qrcode "github.com/skip2/go-qrcode"
)

// qrQuiet is the qrQuiet zone, in modules, around the code (the standard asks
// for 4; 2 reads fine on screens and keeps the code small).
const qrQuiet = 2

// Terminal returns text as a QR code (error correction M) drawn with
// "█", "▀", "▄" and spaces: light modules are drawn, dark ones are left
// blank, which reads correctly on the usual dark terminal background. Each
// line ends with "\n".
func qrTerminal(text string) (string, error) {
	code, err := qrcode.New(text, qrcode.Medium)
	if err != nil {
		return "", fmt.Errorf("qr code: %w", err)
	}
	code.DisableBorder = true
	return qrRender(code.Bitmap()), nil
}

// render draws a bitmap (true = dark) with a light qrQuiet zone.
func qrRender(bm [][]bool) string {
	n := len(bm)
	size := n + 2*qrQuiet
	dark := func(r, c int) bool {
		r, c = r-qrQuiet, c-qrQuiet
		return r >= 0 && r < n && c >= 0 && c < n && bm[r][c]
	}
	var b strings.Builder
	for r := 0; r < size; r += 2 {
		for c := 0; c < size; c++ {
			top := !dark(r, c)
			bot := r+1 < size && !dark(r+1, c)
			switch {
			case top && bot:
				b.WriteString("█")
			case top:
				b.WriteString("▀")
			case bot:
				b.WriteString("▄")
			default:
				b.WriteByte(' ')
			}
		}
		b.WriteByte('\n')
	}
	return b.String()
}
