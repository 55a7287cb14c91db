//go:build unix

package queue

import (
	"io/fs"
	"syscall"
)

// allocated returns the bytes a file really occupies. Badger preallocates its
// WAL and value-log files as sparse mmaps (2 x their nominal size), so the
// apparent size would overstate usage by ~150 MB on an empty store.
func allocated(fi fs.FileInfo) int64 {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return int64(st.Blocks) * 512
	}
	return fi.Size()
}

// freeBytes is the space left to unprivileged writers on dir's filesystem,
// or -1 when it cannot be told.
func freeBytes(dir string) int64 {
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		return -1
	}
	return int64(st.Bavail) * int64(st.Bsize)
}
