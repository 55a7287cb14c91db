package atomicfile

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestWriteAndCreateNew(t *testing.T) {
	type fn func(string, []byte, fs.FileMode) error
	tests := []struct {
		name     string
		write    fn
		existing string // content already at the path; "" = none
		perm     fs.FileMode
		wantErr  error  // errors.Is target; nil = success
		wantErrS string // substring the error must have
		want     string // content after the call
	}{
		{name: "Write creates", write: Write, perm: 0o600, want: "new"},
		{name: "Write replaces", write: Write, existing: "old", perm: 0o644, want: "new"},
		{name: "Write sets the mode even over an existing file", write: Write, existing: "old", perm: 0o640, want: "new"},
		{name: "CreateNew creates", write: CreateNew, perm: 0o600, want: "new"},
		{name: "CreateNew never replaces", write: CreateNew, existing: "old", perm: 0o600,
			wantErr: fs.ErrExist, wantErrS: "create ", want: "old"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "state.json")
			if tt.existing != "" {
				if err := os.WriteFile(path, []byte(tt.existing), 0o666); err != nil {
					t.Fatal(err)
				}
			}
			err := tt.write(path, []byte("new"), tt.perm)
			if tt.wantErr == nil && err != nil {
				t.Fatalf("error %v", err)
			}
			if tt.wantErr != nil && !errors.Is(err, tt.wantErr) {
				t.Fatalf("error %v, want %v", err, tt.wantErr)
			}
			if err != nil && (!strings.Contains(err.Error(), tt.wantErrS) || !strings.Contains(err.Error(), path)) {
				t.Errorf("error %q does not name the path %s", err, path)
			}
			got, rerr := os.ReadFile(path)
			if rerr != nil || string(got) != tt.want {
				t.Fatalf("content %q (%v), want %q", got, rerr, tt.want)
			}
			if err == nil {
				st, _ := os.Stat(path)
				if st.Mode().Perm() != tt.perm {
					t.Errorf("mode %v, want %v", st.Mode().Perm(), tt.perm)
				}
			}
			// No temporary file is left behind, whatever happened.
			ents, _ := os.ReadDir(dir)
			if len(ents) != 1 {
				var names []string
				for _, e := range ents {
					names = append(names, e.Name())
				}
				t.Errorf("directory holds %v, want only state.json", names)
			}
		})
	}
}

func TestErrorsNameThePath(t *testing.T) {
	dir := t.TempDir()
	notDir := filepath.Join(dir, "plain")
	if err := os.WriteFile(notDir, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	sub := filepath.Join(dir, "sub")
	if err := os.Mkdir(sub, 0o700); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		path string
	}{
		{"missing directory", filepath.Join(dir, "missing", "f")},
		{"parent is a file", filepath.Join(notDir, "f")},
		{"target is a directory", sub},
	}
	for _, tt := range tests {
		for _, w := range []struct {
			name string
			f    func(string, []byte, fs.FileMode) error
		}{{"Write", Write}, {"CreateNew", CreateNew}} {
			t.Run(tt.name+"/"+w.name, func(t *testing.T) {
				err := w.f(tt.path, []byte("x"), 0o600)
				if err == nil {
					t.Fatal("no error")
				}
				if !strings.Contains(err.Error(), tt.path) {
					t.Errorf("error %q does not name %s", err, tt.path)
				}
			})
		}
	}
}
