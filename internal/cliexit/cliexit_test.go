package cliexit

import (
	"errors"
	"flag"
	"fmt"
	"testing"
)

func TestCode(t *testing.T) {
	for _, tt := range []struct {
		err  error
		want int
	}{
		{nil, 0},
		{errors.New("x"), 1},
		{flag.ErrHelp, 2},
		{fmt.Errorf("wrapped: %w", &Error{Code: 78, Err: errors.New("unpaired")}), 78},
		{&Error{Code: 5, Err: flag.ErrHelp}, 2},
	} {
		if got := Code(tt.err); got != tt.want {
			t.Errorf("Code(%v) = %d, want %d", tt.err, got, tt.want)
		}
	}
}
