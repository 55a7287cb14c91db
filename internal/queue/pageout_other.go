//go:build !linux

package queue

// pageOutStore is Linux only (see pageout_linux.go).
func pageOutStore(string) (int64, bool, error) { return 0, false, nil }
