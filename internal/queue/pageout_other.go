//go:build !linux

package queue

import "context"

// pageOutStore is Linux only (see pageout_linux.go).
func pageOutStore(string) (int64, bool, error) { return 0, false, nil }

// pageOutLoop has nothing to do off Linux.
func (q *Queue) pageOutLoop(context.Context) {}
