package radio

import (
	"errors"
	"testing"
)

func TestEncodeSet(t *testing.T) {
	for _, tt := range []struct {
		attr    string
		value   any
		vtype   int
		payload string
		err     error
	}{
		{"status", true, 2, "1", nil},
		{"status", false, 2, "0", nil},
		{"status", float64(1), 2, "1", nil},
		{"status", "on", 2, "1", nil},
		{"status", "0", 2, "0", nil},
		{"status", "maybe", 0, "", ErrNotWritable},
		{"percentage", float64(42.5), 3, "42.5", nil},
		{"percentage", float64(140), 0, "", ErrNotWritable}, // V_PERCENTAGE is 0..100
		{"text", "hello world", 47, "hello world", nil},
		{"text", "a;b", 0, "", ErrNotWritable},
		{"text", "line\nbreak", 0, "", ErrNotWritable},
		{"noSuchAttr", true, 0, "", ErrNotWritable},
		{"status", map[string]any{}, 0, "", ErrNotWritable},
	} {
		vt, p, err := EncodeSet(tt.attr, tt.value)
		if tt.err != nil {
			if !errors.Is(err, tt.err) {
				t.Errorf("EncodeSet(%q, %v) error = %v, want %v", tt.attr, tt.value, err, tt.err)
			}
			continue
		}
		if err != nil || vt != tt.vtype || string(p) != tt.payload {
			t.Errorf("EncodeSet(%q, %v) = %d, %q, %v; want %d, %q", tt.attr, tt.value, vt, p, err, tt.vtype, tt.payload)
		}
	}
}
