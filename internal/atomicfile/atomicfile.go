// Package atomicfile is the gateway's one crash-safe file writer. The PKI,
// the radio's node state, the policy floor, central's signing keys, the
// store key and `edgegate pair` each used to carry a copy of the same
// dance; one copy means one place where an fsync cannot be forgotten.
//
// Both functions write a temporary file in the target's directory (so
// the final step is within one file system), set its mode, write and
// fsync it, then install it under its name and fsync the directory, so
// that after a power cut the name holds either the old content or the
// complete new one, never a truncated file.
package atomicfile

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// Write replaces path with data (mode perm): a reader sees the old content
// or the new one, and the new one survives a power cut once Write returns.
// The directory must exist.
func Write(path string, data []byte, perm fs.FileMode) error {
	return install(path, data, perm, os.Rename)
}

// CreateNew creates path with data (mode perm) only if nothing is there
// yet; otherwise it leaves the existing file untouched and returns an
// error that matches fs.ErrExist. It is for files that must never be
// replaced once they exist, even by a racing process: a key the store may
// already be encrypted with. The file is installed by a hard link, which,
// unlike a rename, fails on an existing name.
func CreateNew(path string, data []byte, perm fs.FileMode) error {
	return install(path, data, perm, os.Link)
}

func install(path string, data []byte, perm fs.FileMode, place func(tmp, path string) error) (err error) {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".*.tmp")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	tmp := f.Name()
	// After a rename this is a no-op; after a link it drops the temporary
	// name and leaves path.
	defer os.Remove(tmp)
	werr := f.Chmod(perm)
	if werr == nil {
		_, werr = f.Write(data)
	}
	if werr == nil {
		werr = f.Sync()
	}
	if cerr := f.Close(); werr == nil {
		werr = cerr
	}
	if werr != nil {
		return fmt.Errorf("write %s: %w", path, werr)
	}
	if err := place(tmp, path); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("create %s: %w", path, fs.ErrExist)
		}
		return fmt.Errorf("install %s: %w", path, err)
	}
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync directory of %s: %w", path, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync directory of %s: %w", path, err)
	}
	return nil
}
