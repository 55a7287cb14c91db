package packaging

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"testing"
	"time"
)

// buildTimeout bounds one `go build` of the daemon: a cold build takes
// about 30 s on two cores, more while the rest of the suite runs.
const buildTimeout = 6 * time.Minute

// scratch is the directory for artefacts shared between tests (the
// host binary); TestMain removes it.
var scratch string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "edgegate-packaging-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	scratch = dir
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// repoRoot is the module root: the tests run in packaging/.
func repoRoot(t *testing.T) string {
	t.Helper()
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	return root
}

// inCI reports whether missing tools must fail rather than skip (.ci/run
// sets CI=true and installs them).
func inCI() bool { return os.Getenv("CI") == "true" }

// requireTool returns the path of a tool, skipping the test when it is
// absent locally and failing it in CI.
func requireTool(t *testing.T, name, aptPackage string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err == nil {
		return p
	}
	for _, dir := range []string{"/usr/sbin", "/sbin"} { // not on every PATH
		if p := filepath.Join(dir, name); isExecutable(p) {
			return p
		}
	}
	if inCI() {
		t.Fatalf("%s not found; CI must install the %s package (apt-get install %s)", name, aptPackage, aptPackage)
	}
	t.Skipf("%s not found; install %s to run this test", name, aptPackage)
	return ""
}

func isExecutable(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0
}

// run runs a command in dir with a deadline and returns its stdout; on
// failure the test fails with the command's stderr.
func run(t *testing.T, timeout time.Duration, dir string, env []string, name string, args ...string) []byte {
	t.Helper()
	out, stderr, err := runErr(timeout, dir, env, name, args...)
	if err != nil {
		t.Fatalf("%s %q: %v\nstdout:\n%s\nstderr:\n%s", name, args, err, out, stderr)
	}
	return out
}

func runErr(timeout time.Duration, dir string, env []string, name string, args ...string) (stdout, stderr []byte, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), env...)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	// A killed build must not leave its compiler children running.
	cmd.WaitDelay = 10 * time.Second
	err = cmd.Run()
	if ctx.Err() != nil {
		err = fmt.Errorf("timed out after %s: %w", timeout, err)
	}
	return o.Bytes(), e.Bytes(), err
}

// build runs packaging/gobuild.sh, the script `make cross` uses.
func build(t *testing.T, target, out string, env ...string) {
	t.Helper()
	run(t, buildTimeout, repoRoot(t), env, "packaging/gobuild.sh", target, out)
}

var (
	hostOnce sync.Once
	hostBin  string
	hostErr  string
)

// hostBinary builds the daemon for this machine once per test run; the
// package test packages it (on amd64 it is the amd64 package's binary) and
// the unit tests point ExecStart= at it.
func hostBinary(t *testing.T) string {
	t.Helper()
	hostOnce.Do(func() {
		out := filepath.Join(scratch, "host", "edgegate")
		o, e, err := runErr(buildTimeout, repoRoot(t), nil, "packaging/gobuild.sh", runtime.GOARCH, out)
		if err != nil {
			hostErr = fmt.Sprintf("gobuild.sh %s: %v\n%s%s", runtime.GOARCH, err, o, e)
			return
		}
		hostBin = out
	})
	if hostBin == "" {
		t.Fatal(hostErr)
	}
	return hostBin
}
