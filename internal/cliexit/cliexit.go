// Package cliexit is the exit protocol shared by the command mains: run
// returns an error, which Exit turns into a message and an exit code.
package cliexit

import (
	"errors"
	"flag"
	"fmt"
	"os"
)

// Error carries a process exit code through run.
type Error struct {
	Code int
	Err  error
}

func (e *Error) Error() string { return e.Err.Error() }
func (e *Error) Unwrap() error { return e.Err }

// Code is the exit code of err: 0 for nil, 2 for flag.ErrHelp (usage),
// an *Error's Code, otherwise 1.
func Code(err error) int {
	var ee *Error
	switch {
	case err == nil:
		return 0
	case errors.Is(err, flag.ErrHelp):
		return 2
	case errors.As(err, &ee):
		return ee.Code
	}
	return 1
}

// Exit returns when err is nil; otherwise it prints err (unless it is
// flag.ErrHelp, whose usage was printed, or has an empty message) after
// name and exits with Code(err).
func Exit(name string, err error) {
	if err == nil {
		return
	}
	if !errors.Is(err, flag.ErrHelp) && err.Error() != "" {
		fmt.Fprintln(os.Stderr, name+":", err)
	}
	os.Exit(Code(err))
}
