//go:build !unix

package queue

import "io/fs"

func allocated(fi fs.FileInfo) int64 { return fi.Size() }
