package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/edgegate/edgegate/internal/testkit"
)

// fixture writes a module of its own with the given test file, and an
// allow-list, and returns its folder. The tests below run the real
// `go test -json` on it: the event stream is cmd/test2json's, not a copy.
func fixture(t *testing.T, testFile, allow string) string {
	t.Helper()
	dir := t.TempDir()
	write := func(name, content string) {
		t.Helper()
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("go.mod", "module example.com/fix\n\ngo 1.22\n")
	write("sub/fix_test.go", testFile)
	write("allow", allow)
	return dir
}

// runIn runs the checker in dir on `go test -json ./...` (plus extra
// arguments first) and returns its exit status and output.
func runIn(t *testing.T, dir string, ci string, extra ...string) (int, string) {
	t.Helper()
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("go not on PATH: %v", err)
	}
	t.Chdir(dir)
	var out testkit.Buffer
	args := append(append([]string{"-allow", "allow"}, extra...), "--", goBin, "test", "-count=1", "-json", "./...")
	code := run(args, func(k string) string {
		if k == "CI" {
			return ci
		}
		return ""
	}, &out, &out)
	return code, out.String()
}

const skippy = `package sub

import "testing"

func TestPasses(t *testing.T) { t.Log("noise of a passing test") }

func TestToolMissing(t *testing.T) { t.Skip("frobnicator not installed") }

func TestShortOnly(t *testing.T) { t.Skip("skipped under -short") }

func TestParent(t *testing.T) {
	t.Run("listed", func(t *testing.T) { t.Skip("subtest skip") })
}
`

const skippyAllow = `# package test reason
./sub TestShortOnly   builds the world; skips under -short only
./sub TestParent      its subtests skip by design
`

func TestUnlistedSkipFailsUnderCI(t *testing.T) {
	dir := fixture(t, skippy, skippyAllow)
	code, out := runIn(t, dir, "true")
	if code != 1 {
		t.Errorf("exit status %d, want 1 for an unlisted skip under CI; output:\n%s", code, out)
	}
	for _, want := range []string{
		"ok  \texample.com/fix/sub",
		"2 skipped test(s) on the allow-list",
		"FAIL: 1 test(s) skipped",
		"example.com/fix/sub TestToolMissing: fix_test.go:7: frobnicator not installed",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	for _, unwanted := range []string{"noise of a passing test", "TestShortOnly:", "=== RUN", `"Action"`} {
		if strings.Contains(out, unwanted) {
			t.Errorf("output holds %q:\n%s", unwanted, out)
		}
	}
}

func TestUnlistedSkipWarnsOutsideCI(t *testing.T) {
	dir := fixture(t, skippy, skippyAllow)
	code, out := runIn(t, dir, "")
	if code != 0 {
		t.Errorf("exit status %d, want 0 outside CI; output:\n%s", code, out)
	}
	if !strings.Contains(out, "WARNING (not failing: not under CI): 1 test(s) skipped") || !strings.Contains(out, "TestToolMissing") {
		t.Errorf("the unlisted skip is not reported:\n%s", out)
	}
	// -strict makes it fail without CI.
	if code, out := runIn(t, dir, "", "-strict"); code != 1 {
		t.Errorf("-strict: exit status %d, want 1; output:\n%s", code, out)
	}
}

func TestAllListedPasses(t *testing.T) {
	dir := fixture(t, skippy, skippyAllow+"./sub TestToolMissing the frobnicator is optional\n")
	if code, out := runIn(t, dir, "true"); code != 0 {
		t.Errorf("exit status %d, want 0 with every skip listed; output:\n%s", code, out)
	}
}

// TestFailureKeepsStatusAndOutput: a failing test's status is the run's,
// whatever the skips, and its output is shown as go test shows it.
func TestFailureKeepsStatusAndOutput(t *testing.T) {
	dir := fixture(t, `package sub

import "testing"

func TestPasses(t *testing.T) { t.Log("noise of a passing test") }

func TestBroken(t *testing.T) { t.Fatal("the widget is bent") }
`, "")
	code, out := runIn(t, dir, "true")
	if code != 1 {
		t.Errorf("exit status %d, want go test's 1; output:\n%s", code, out)
	}
	for _, want := range []string{"--- FAIL: TestBroken", "fix_test.go:7: the widget is bent", "FAIL\texample.com/fix/sub"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "noise of a passing test") {
		t.Errorf("a passing test's log is shown:\n%s", out)
	}
}

// TestCrashOutputIsShown: a test binary that dies in a goroutine ends no
// test; what the running test printed, the panic included, is shown.
func TestCrashOutputIsShown(t *testing.T) {
	dir := fixture(t, `package sub

import (
	"testing"
	"time"
)

func TestCrash(t *testing.T) {
	t.Log("before the crash")
	go func() { panic("boom in a goroutine") }()
	time.Sleep(5 * time.Second)
}
`, "")
	code, out := runIn(t, dir, "true")
	if code != 1 {
		t.Errorf("exit status %d, want 1; output:\n%s", code, out)
	}
	for _, want := range []string{"before the crash", "panic: boom in a goroutine", "FAIL\texample.com/fix/sub"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	if strings.Index(out, "panic: boom") > strings.Index(out, "FAIL\texample.com/fix/sub") {
		t.Errorf("the panic is shown after the package's verdict:\n%s", out)
	}
}

func TestBuildFailureIsShown(t *testing.T) {
	dir := fixture(t, "package sub\n\nfunc broken( {\n", "")
	code, out := runIn(t, dir, "true")
	if code == 0 {
		t.Errorf("exit status 0 for a package that does not compile; output:\n%s", out)
	}
	if !strings.Contains(out, "fix_test.go:3") {
		t.Errorf("the compiler's error is not shown:\n%s", out)
	}
}

// TestExitStatusPassedThrough: whatever the command's status, it is the
// checker's, not a 1 or a 0 of its own.
func TestExitStatusPassedThrough(t *testing.T) {
	dir := fixture(t, skippy, "")
	t.Chdir(dir)
	var out testkit.Buffer
	if code := run([]string{"-allow", "allow", "--", "sh", "-c", "echo not json; exit 7"}, func(string) string { return "true" }, &out, &out); code != 7 {
		t.Errorf("exit status %d, want the command's 7", code)
	}
	if !strings.Contains(out.String(), "not json") {
		t.Errorf("a line that is not an event was lost: %q", out.String())
	}
}

func TestAllowListErrors(t *testing.T) {
	for _, tt := range []struct{ name, allow, want string }{
		{"no reason", "./sub TestX\n", "allow:1: want PACKAGE TEST REASON, the reason is required"},
		{"absolute package", "# c\nexample.com/fix/sub TestX why\n", "allow:2: package \"example.com/fix/sub\" must be relative"},
		{"not a test", "./sub Example why\n", "allow:1: \"Example\" is not a test name"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			dir := fixture(t, skippy, tt.allow)
			code, out := runIn(t, dir, "true")
			if code != 2 || !strings.Contains(out, tt.want) {
				t.Errorf("exit status %d, output %q; want 2 and %q", code, out, tt.want)
			}
		})
	}
}

// TestHeldOutputIsBounded: a chatty test's output is kept only up to
// maxHeld, its last lines, with a note of how many were not kept.
func TestHeldOutputIsBounded(t *testing.T) {
	var h heldOutput
	line := strings.Repeat("x", 1023) + "\n"
	for range 3 * maxHeld / len(line) {
		h.add(line)
	}
	h.add("the failure\n")
	if h.size > maxHeld {
		t.Errorf("held %d bytes, want at most %d", h.size, maxHeld)
	}
	s := h.String()
	if !strings.HasSuffix(s, "the failure\n") || !strings.Contains(s, "earlier lines of this test's output not kept") {
		t.Errorf("held output lacks its last line or the note: %.200q ... %q", s, s[len(s)-40:])
	}
}
