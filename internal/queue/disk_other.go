//go:build !unix

package queue

import "io/fs"

func allocated(fi fs.FileInfo) int64 { return fi.Size() }

func freeBytes(string) int64 { return -1 }
