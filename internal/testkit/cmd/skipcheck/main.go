// Command skipcheck runs `go test -json ...`, prints what a plain `go test`
// would (package results, and the output of failing tests), and under CI
// fails the run when a test was skipped that the allow-list does not name.
// A test that skips because a tool is missing passes silently otherwise,
// and the feature it guards goes untested without anyone noticing.
//
//	skipcheck [-allow FILE] [-strict] -- go test -json [flags] [packages]
//
// The exit status is the test command's when it fails; otherwise 1 when an
// unlisted skip was seen and the check is strict (-strict, or $CI set and
// not "false"/"0"), else 0. Not strict, unlisted skips are only reported.
//
// The allow-list has one test a line: the package relative to the module
// ("./packaging", "." for the root), the test name, and the reason, which
// is required. An entry covers the test's subtests too. '#' starts a
// comment line.
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"sort"
	"strings"
	"syscall"
)

func main() {
	os.Exit(run(os.Args[1:], os.Getenv, os.Stdout, os.Stderr))
}

func run(args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("skipcheck", flag.ContinueOnError)
	fs.SetOutput(stderr)
	allowFile := fs.String("allow", ".ci/skip-allow", "the allow-list of tests that may skip, with a reason each")
	strict := fs.Bool("strict", ciSet(getenv("CI")), "fail on a skip the allow-list does not name (default: $CI is set)")
	module := fs.String("module", "", "the module path the allow-list's packages are relative to (default: from ./go.mod)")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	cmdArgs := fs.Args()
	if len(cmdArgs) == 0 {
		fmt.Fprintln(stderr, "skipcheck: no test command; usage: skipcheck [-allow FILE] [-strict] -- go test -json ...")
		return 2
	}
	if *module == "" {
		m, err := modulePath("go.mod")
		if err != nil {
			fmt.Fprintf(stderr, "skipcheck: %v (or pass -module)\n", err)
			return 2
		}
		*module = m
	}
	allow, err := readAllowList(*allowFile, *module)
	if err != nil {
		fmt.Fprintf(stderr, "skipcheck: %v\n", err)
		return 2
	}

	cmd := exec.Command(cmdArgs[0], cmdArgs[1:]...)
	cmd.Stderr = stderr
	pipe, err := cmd.StdoutPipe()
	if err != nil {
		fmt.Fprintf(stderr, "skipcheck: %v\n", err)
		return 2
	}
	if err := cmd.Start(); err != nil {
		fmt.Fprintf(stderr, "skipcheck: start %s: %v\n", cmdArgs[0], err)
		return 2
	}
	// An interrupt or a stop is passed on to the test command, and this
	// process waits for it to end and report rather than dying first and
	// losing its exit status.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	done := make(chan struct{})
	forwarded := make(chan struct{})
	go func() {
		defer close(forwarded)
		for {
			select {
			case s := <-sigs:
				_ = cmd.Process.Signal(s)
			case <-done:
				return
			}
		}
	}()
	f := newFilter(stdout)
	readErr := f.read(pipe)
	waitErr := cmd.Wait()
	signal.Stop(sigs)
	close(done)
	<-forwarded

	code := 0
	var exit *exec.ExitError
	switch {
	case errors.As(waitErr, &exit):
		code = exit.ExitCode()
		if code <= 0 { // killed by a signal
			code = 1
		}
	case waitErr != nil:
		fmt.Fprintf(stderr, "skipcheck: %v\n", waitErr)
		code = 2
	case readErr != nil:
		fmt.Fprintf(stderr, "skipcheck: reading the test output: %v\n", readErr)
		code = 2
	}
	if n := report(stdout, f.skips, allow, *allowFile, *strict); n > 0 && *strict && code == 0 {
		code = 1
	}
	return code
}

// ciSet reports whether $CI asks for the strict check.
func ciSet(v string) bool {
	return v != "" && v != "false" && v != "0"
}

// event is one line of `go test -json` (cmd/test2json).
type event struct {
	Action     string
	Package    string
	Test       string
	Output     string
	ImportPath string // build-output, build-fail (Go ≥ 1.24)
}

type testKey struct{ pkg, test string }

// skip is a test that reported SKIP, with the lines it logged (the reason).
type skip struct {
	testKey
	reason string
}

// filter turns the event stream into a plain go test's output: the
// package lines as they come, a test's own lines only once it failed (or
// skipped: its reason), and nothing of the tests that passed.
type filter struct {
	out   io.Writer
	held  map[testKey]*heldOutput
	order []testKey // of the held tests, first output first
	skips []skip
}

// maxHeld bounds what is kept of one test's output until it ends: its
// last lines, which hold the failure; the earlier ones are counted.
const maxHeld = 1 << 20

type heldOutput struct {
	lines   []string
	size    int
	dropped int
}

func (h *heldOutput) add(line string) {
	h.lines = append(h.lines, line)
	h.size += len(line)
	for h.size > maxHeld && len(h.lines) > 1 {
		h.size -= len(h.lines[0])
		h.lines = h.lines[1:]
		h.dropped++
	}
}

func (h *heldOutput) String() string {
	if h == nil {
		return ""
	}
	s := strings.Join(h.lines, "")
	if h.dropped > 0 {
		s = fmt.Sprintf("    [skipcheck: %d earlier lines of this test's output not kept]\n", h.dropped) + s
	}
	return s
}

func newFilter(out io.Writer) *filter {
	return &filter{out: out, held: map[testKey]*heldOutput{}}
}

func (f *filter) read(r io.Reader) error {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64*1024), 16*1024*1024)
	for sc.Scan() {
		f.line(sc.Bytes())
	}
	if err := sc.Err(); err != nil {
		// A line longer than the buffer: the rest goes through as it is,
		// so that the test command never blocks on a pipe nobody reads.
		_, _ = io.Copy(f.out, r)
		return err
	}
	return nil
}

func (f *filter) line(b []byte) {
	var e event
	if len(b) == 0 || b[0] != '{' || json.Unmarshal(b, &e) != nil {
		// Not an event (a program printing to stdout outside the test
		// framework): pass it through rather than lose it.
		fmt.Fprintf(f.out, "%s\n", b)
		return
	}
	k := testKey{e.Package, e.Test}
	switch {
	case e.Action == "build-output":
		io.WriteString(f.out, e.Output)
	case e.Test == "":
		switch {
		case e.Action == "output" && strings.HasPrefix(e.Output, "FAIL"):
			// A test binary that crashed (a panic in a goroutine, a
			// timeout, os.Exit) ends no test: what the running tests
			// printed is the evidence, shown before the verdict.
			f.flush(e.Package)
			io.WriteString(f.out, e.Output)
		case e.Action == "output" && e.Output != "PASS\n":
			io.WriteString(f.out, e.Output)
		case e.Action == "pass" || e.Action == "fail" || e.Action == "skip":
			f.flush(e.Package)
		}
	case e.Action == "output":
		if !strings.HasPrefix(e.Output, "=== ") {
			h, ok := f.held[k]
			if !ok {
				h = &heldOutput{}
				f.held[k] = h
				f.order = append(f.order, k)
			}
			h.add(e.Output)
		}
	case e.Action == "fail":
		io.WriteString(f.out, f.held[k].String())
		delete(f.held, k)
	case e.Action == "skip":
		var lines []string
		if h := f.held[k]; h != nil {
			lines = h.lines
		}
		delete(f.held, k)
		var reason []string
		for _, l := range lines {
			if t := strings.TrimSpace(l); t != "" && !strings.HasPrefix(t, "--- SKIP") {
				reason = append(reason, t)
			}
		}
		f.skips = append(f.skips, skip{k, strings.Join(reason, " ")})
	case e.Action == "pass":
		delete(f.held, k)
	}
}

// flush prints what the tests of pkg that never ended printed, and
// forgets the package's tests.
func (f *filter) flush(pkg string) {
	keep := f.order[:0]
	for _, k := range f.order {
		h, ok := f.held[k]
		switch {
		case k.pkg != pkg:
			if ok {
				keep = append(keep, k)
			}
		case ok:
			io.WriteString(f.out, h.String())
			delete(f.held, k)
		}
	}
	f.order = keep
}

// allowList maps an import path and test name to the reason it may skip.
type allowList map[testKey]string

func (a allowList) allows(k testKey) bool {
	for name := k.test; ; {
		if _, ok := a[testKey{k.pkg, name}]; ok {
			return true
		}
		i := strings.LastIndexByte(name, '/')
		if i < 0 {
			return false
		}
		name = name[:i]
	}
}

func readAllowList(path, module string) (allowList, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("allow-list: %w", err)
	}
	a := allowList{}
	for i, line := range strings.Split(string(data), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		fields := strings.Fields(line)
		if len(fields) < 3 {
			return nil, fmt.Errorf("%s:%d: want PACKAGE TEST REASON, the reason is required: %q", path, i+1, line)
		}
		pkg := fields[0]
		switch {
		case pkg == ".":
			pkg = module
		case strings.HasPrefix(pkg, "./"):
			pkg = module + "/" + strings.TrimPrefix(pkg, "./")
		default:
			return nil, fmt.Errorf("%s:%d: package %q must be relative to the module (./dir or .)", path, i+1, fields[0])
		}
		if !strings.HasPrefix(fields[1], "Test") {
			return nil, fmt.Errorf("%s:%d: %q is not a test name", path, i+1, fields[1])
		}
		a[testKey{pkg, fields[1]}] = strings.Join(fields[2:], " ")
	}
	return a, nil
}

// modulePath reads the module line of a go.mod.
func modulePath(gomod string) (string, error) {
	data, err := os.ReadFile(gomod)
	if err != nil {
		return "", fmt.Errorf("module path: %w", err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if rest, ok := strings.CutPrefix(strings.TrimSpace(line), "module "); ok {
			return strings.Trim(strings.TrimSpace(rest), `"`), nil
		}
	}
	return "", fmt.Errorf("module path: no module line in %s", gomod)
}

// report lists the skips and returns how many the allow-list does not name.
func report(w io.Writer, skips []skip, allow allowList, allowFile string, strict bool) int {
	if len(skips) == 0 {
		return 0
	}
	sort.Slice(skips, func(i, j int) bool {
		if skips[i].pkg != skips[j].pkg {
			return skips[i].pkg < skips[j].pkg
		}
		return skips[i].test < skips[j].test
	})
	var allowed, unlisted []skip
	for _, s := range skips {
		if allow.allows(s.testKey) {
			allowed = append(allowed, s)
		} else {
			unlisted = append(unlisted, s)
		}
	}
	if len(allowed) > 0 {
		fmt.Fprintf(w, "skipcheck: %d skipped test(s) on the allow-list (%s)\n", len(allowed), allowFile)
	}
	if len(unlisted) == 0 {
		return 0
	}
	verdict := "FAIL"
	if !strict {
		verdict = "WARNING (not failing: not under CI)"
	}
	fmt.Fprintf(w, "skipcheck: %s: %d test(s) skipped that %s does not allow:\n", verdict, len(unlisted), allowFile)
	for _, s := range unlisted {
		fmt.Fprintf(w, "  %s %s: %s\n", s.pkg, s.test, orNone(s.reason))
	}
	fmt.Fprintf(w, "skipcheck: make the test run here (install what it needs), or add it to %s with the reason it may skip\n", allowFile)
	return len(unlisted)
}

func orNone(s string) string {
	if s == "" {
		return "(no reason given)"
	}
	return s
}
