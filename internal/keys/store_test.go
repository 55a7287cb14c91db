package keys

import (
	"bytes"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

var (
	rawKey = bytes.Repeat([]byte{0xA5}, StoreKeySize)
	hexKey = hex.EncodeToString(rawKey)
)

func env(m map[string]string) func(string) string {
	return func(k string) string { return m[k] }
}

func writeFile(t *testing.T, path string, data []byte, mode os.FileMode) {
	t.Helper()
	if err := os.WriteFile(path, data, mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, mode); err != nil { // WriteFile is subject to umask
		t.Fatal(err)
	}
}

func TestLoad(t *testing.T) {
	tests := []struct {
		name       string
		cred       []byte // nil: no credential file
		credDir    bool   // CREDENTIALS_DIRECTORY set
		file       []byte // nil: no key file
		fileMode   os.FileMode
		wantKey    []byte // nil: a generated key
		wantSource string
		wantErr    []string // substrings of the error
	}{
		{name: "credential raw", credDir: true, cred: rawKey, wantKey: rawKey, wantSource: "credential "},
		{name: "credential hex newline", credDir: true, cred: []byte(hexKey + "\n"), wantKey: rawKey, wantSource: "credential "},
		{name: "credential wins over file", credDir: true, cred: rawKey, file: []byte(strings.Repeat("00", 32)), fileMode: 0o600, wantKey: rawKey, wantSource: "credential "},
		{name: "credential wrong length", credDir: true, cred: []byte("short"), wantErr: []string{"credential", "got 5 bytes"}},
		{name: "credential dir without credential falls back to file", credDir: true, file: rawKey, fileMode: 0o600, wantKey: rawKey, wantSource: "file "},
		{name: "file raw", file: rawKey, fileMode: 0o600, wantKey: rawKey, wantSource: "file "},
		{name: "file hex", file: []byte(hexKey), fileMode: 0o400, wantKey: rawKey, wantSource: "file "},
		{name: "file hex crlf", file: []byte(hexKey + "\r\n"), fileMode: 0o600, wantKey: rawKey, wantSource: "file "},
		{name: "file group readable", file: rawKey, fileMode: 0o640, wantErr: []string{"key.bin", "0640", "chmod 600"}},
		{name: "file other readable", file: rawKey, fileMode: 0o604, wantErr: []string{"0604", "chmod 600"}},
		{name: "file group writable", file: rawKey, fileMode: 0o620, wantErr: []string{"key.bin", "0620", "open to group or others", "chmod 600"}},
		{name: "file too short", file: rawKey[:31], fileMode: 0o600, wantErr: []string{"got 31 bytes"}},
		{name: "file too long", file: append(rawKey, 'x'), fileMode: 0o600, wantErr: []string{"got 33 bytes"}},
		{name: "file 64 non-hex", file: []byte(strings.Repeat("zz", 32)), fileMode: 0o600, wantErr: []string{"not hex"}},
		{name: "file huge", file: bytes.Repeat([]byte("a"), 4096), fileMode: 0o600, wantErr: []string{"longer than 66 bytes"}},
		{name: "nothing: generate", wantSource: "generated "},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			credDir := filepath.Join(dir, "creds")
			keyFile := filepath.Join(dir, "state", "key.bin")
			vars := map[string]string{}
			if tt.credDir {
				vars["CREDENTIALS_DIRECTORY"] = credDir
				if err := os.MkdirAll(credDir, 0o700); err != nil {
					t.Fatal(err)
				}
			}
			if tt.cred != nil {
				writeFile(t, filepath.Join(credDir, "store-key"), tt.cred, 0o400)
			}
			if tt.file != nil {
				if err := os.MkdirAll(filepath.Dir(keyFile), 0o700); err != nil {
					t.Fatal(err)
				}
				writeFile(t, keyFile, tt.file, tt.fileMode)
			}
			key, source, err := LoadStoreKey("store-key", keyFile, env(vars))
			if len(tt.wantErr) > 0 {
				if err == nil {
					t.Fatalf("Load = %x, %q, nil, want error", key, source)
				}
				for _, want := range tt.wantErr {
					if !strings.Contains(err.Error(), want) {
						t.Errorf("Load error = %q, want it to contain %q", err, want)
					}
				}
				// No key material in errors, in either encoding.
				for _, secret := range []string{hexKey, string(rawKey), strings.ToUpper(hexKey)} {
					if strings.Contains(err.Error(), secret) {
						t.Errorf("Load error leaks the key: %q", err)
					}
				}
				if key != nil {
					t.Errorf("Load returned a key with an error")
				}
				return
			}
			if err != nil {
				t.Fatalf("Load = %v", err)
			}
			if !strings.HasPrefix(source, tt.wantSource) {
				t.Errorf("source = %q, want prefix %q", source, tt.wantSource)
			}
			if len(key) != StoreKeySize {
				t.Fatalf("len(key) = %d, want %d", len(key), StoreKeySize)
			}
			if tt.wantKey != nil && !bytes.Equal(key, tt.wantKey) {
				t.Errorf("key = %x, want %x", key, tt.wantKey)
			}
		})
	}
}

func TestGenerateIsPrivateAtomicAndStable(t *testing.T) {
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "new", "sub", "key")
	noEnv := env(nil)
	key, source, err := LoadStoreKey("store-key", keyFile, noEnv)
	if err != nil || source != "generated "+keyFile {
		t.Fatalf("Load = %q, %v", source, err)
	}
	fi, err := os.Stat(keyFile)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("key file mode = %v, %v, want 0600", fi.Mode(), err)
	}
	di, err := os.Stat(filepath.Dir(keyFile))
	if err != nil || di.Mode().Perm() != 0o700 {
		t.Errorf("key dir mode = %v, %v, want 0700", di.Mode(), err)
	}
	entries, _ := os.ReadDir(filepath.Dir(keyFile))
	if len(entries) != 1 {
		t.Errorf("key dir holds %d entries, want just the key (no temp files)", len(entries))
	}
	if bytes.Equal(key, make([]byte, StoreKeySize)) {
		t.Error("generated key is all zero")
	}
	// Second load reads the same key back.
	again, source, err := LoadStoreKey("store-key", keyFile, noEnv)
	if err != nil || !bytes.Equal(again, key) || source != "file "+keyFile {
		t.Errorf("reload = %x, %q, %v, want the generated key from the file", again, source, err)
	}
	// Two stores get different keys.
	other, _, err := LoadStoreKey("store-key", filepath.Join(dir, "other"), noEnv)
	if err != nil || bytes.Equal(other, key) {
		t.Errorf("second generated key = %v, equal to first: %v", err, bytes.Equal(other, key))
	}
}

func TestLoadRefusesNonRegularAndMissingConfig(t *testing.T) {
	dir := t.TempDir()
	if _, _, err := LoadStoreKey("store-key", dir, env(nil)); err == nil {
		t.Error("LoadStoreKey(directory) = nil, want error")
	}
	if _, _, err := LoadStoreKey("store-key", "", env(nil)); err == nil {
		t.Error("Load with no key file = nil, want error")
	}
}
