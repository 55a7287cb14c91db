// The store key: the 32-byte key that encrypts the store (the queue's
// badger directory) at rest. It is imported by cmd/edgegate only; the key is
// then passed to queue.Open.
//
// The key comes from a systemd credential when the daemon runs under systemd
// with LoadCredential= or LoadCredentialEncrypted= (the latter seals it with
// the TPM or the host key), else from a 0600 key file, generated on first
// use. It never comes from the config file. Errors never contain key bytes.

package keys

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/edgegate/edgegate/internal/atomicfile"
)

// StoreKeySize is the key length: AES-256.
const StoreKeySize = 32

// Load returns the 32-byte store key and where it came from ("credential
// FILE", "file FILE" or "generated FILE"): from $CREDENTIALS_DIRECTORY/credName
// when that variable is set, else from keyFile; when neither exists, it
// generates a random key into keyFile (mode 0600, parent dir 0700, written
// atomically). It refuses a key file readable by group or other, and a key
// that is neither 32 raw bytes nor 64 hex characters (plus an optional
// newline).
func LoadStoreKey(credName, keyFile string, getenv func(string) string) (key []byte, source string, err error) {
	if dir := getenv("CREDENTIALS_DIRECTORY"); dir != "" && credName != "" {
		p := filepath.Join(dir, credName)
		// systemd makes credentials 0400 and owned by the service user, so
		// no permission check: the directory itself is private to us.
		b, err := os.ReadFile(p)
		switch {
		case err == nil:
			key, err := parse(b)
			if err != nil {
				return nil, "", fmt.Errorf("load store key from credential %s: %w", p, err)
			}
			return key, "credential " + p, nil
		case !errors.Is(err, fs.ErrNotExist):
			return nil, "", fmt.Errorf("load store key from credential: %w", err)
		}
		// Credential directory without this credential: fall back to the file.
	}
	if keyFile == "" {
		return nil, "", errors.New("load store key: no credential and no key file configured")
	}
	key, err = readKeyFile(keyFile)
	if err == nil {
		return key, "file " + keyFile, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return nil, "", err
	}
	key, err = generate(keyFile)
	if err != nil {
		return nil, "", err
	}
	return key, "generated " + keyFile, nil
}

func readKeyFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open store key file: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("stat store key file: %w", err)
	}
	// Checked on the open file, so a swap between check and read is
	// impossible.
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("store key file %s is not a regular file", path)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		// Group or other write access is refused as well: whoever can
		// replace the key can make the gateway encrypt with a key they know.
		return nil, fmt.Errorf("store key file %s has mode %04o, open to group or others: run `chmod 600 %s`", path, perm, path)
	}
	// One byte more than the longest valid form, so an oversized file is
	// reported as such without reading all of it.
	b, err := io.ReadAll(io.LimitReader(f, 2*StoreKeySize+3))
	if err != nil {
		return nil, fmt.Errorf("read store key file %s: %w", path, err)
	}
	if len(b) > 2*StoreKeySize+2 {
		return nil, fmt.Errorf("read store key file %s: longer than %d bytes", path, 2*StoreKeySize+2)
	}
	key, err := parse(b)
	if err != nil {
		return nil, fmt.Errorf("read store key file %s: %w", path, err)
	}
	return key, nil
}

// parse accepts 32 raw bytes, or 64 hex characters with an optional
// trailing newline (LF or CRLF). The error describes the length only.
func parse(b []byte) ([]byte, error) {
	if len(b) == StoreKeySize {
		return bytes.Clone(b), nil
	}
	t := bytes.TrimSuffix(bytes.TrimSuffix(b, []byte("\n")), []byte("\r"))
	if len(t) == 2*StoreKeySize {
		key := make([]byte, StoreKeySize)
		if _, err := hex.Decode(key, t); err == nil {
			return key, nil
		}
		return nil, errors.New("key is 64 characters but not hex")
	}
	return nil, fmt.Errorf("key must be %d raw bytes or %d hex characters, got %d bytes", StoreKeySize, 2*StoreKeySize, len(b))
}

// generate writes a fresh random key to path atomically (atomicfile: temp
// file in the same directory, fsync, install, fsync of the directory). A
// crash leaves either no key file or a complete one, never a truncated key
// that would make the store unreadable. It is created, never replaced
// (atomicfile.CreateNew links rather than renames): if another process
// generated a key meanwhile, that key wins, since the store may already be
// encrypted with it.
func generate(path string) ([]byte, error) {
	key := make([]byte, StoreKeySize)
	if _, err := rand.Read(key); err != nil {
		return nil, fmt.Errorf("generate store key: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("create store key directory: %w", err)
	}
	data := append(hex.AppendEncode(nil, key), '\n')
	if err := atomicfile.CreateNew(path, data, 0o600); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return readKeyFile(path)
		}
		return nil, fmt.Errorf("install store key file: %w", err)
	}
	return key, nil
}
