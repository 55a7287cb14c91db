//go:build !linux

package queue

import "context"

// pageOutStore is Linux only (see pageout_linux.go).
func pageOutStore(string) (int64, bool, error) { return 0, false, nil }

// pageOutState has nothing to hold off Linux.
type pageOutState struct{}

// pageOutLoop has nothing to do off Linux.
func (q *Queue) pageOutLoop(context.Context) {}
