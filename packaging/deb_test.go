package packaging

import (
	"bytes"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"testing"
	"time"
)

const pkgTimeout = 2 * time.Minute

// buildDeb packages the host binary with packaging/deb.sh, the script
// `make deb` runs, into outDir, and returns the .deb's path.
func buildDeb(t *testing.T, outDir string) string {
	t.Helper()
	bin := hostBinary(t)
	// Every input pinned, git's included: the lead may commit while the
	// test runs.
	env := []string{"DEB_VERSION=1.2.3+test", "SOURCE_DATE_EPOCH=1790000000",
		"DEB_COMMIT=0123456789ab", "DEB_SUBJECT=test build"}
	out := run(t, pkgTimeout, repoRoot(t), env, "packaging/deb.sh", "amd64", bin, bin, outDir)
	deb := strings.TrimSpace(string(out))
	if filepath.Base(deb) != "edgegate_1.2.3+test_amd64.deb" {
		t.Fatalf("deb.sh printed %q, want .../edgegate_1.2.3+test_amd64.deb", deb)
	}
	return deb
}

// TestDebPackage builds the amd64 .deb with go tool nfpm and checks what
// dpkg will see: files, modes, the conffile, the control fields and the
// maintainer scripts; then lintian, when installed.
func TestDebPackage(t *testing.T) {
	if testing.Short() {
		t.Skip("skipped under -short: builds the daemon and the amd64 .deb")
	}
	if runtime.GOARCH != "amd64" {
		t.Skip("the package test packages the host binary as amd64; this is", runtime.GOARCH)
	}
	dpkgDeb := requireTool(t, "dpkg-deb", "dpkg")
	deb := buildDeb(t, t.TempDir())

	t.Run("contents", func(t *testing.T) {
		listing := string(run(t, time.Minute, "", nil, dpkgDeb, "-c", deb))
		want := map[string]string{ // path -> mode and owner
			"./usr/bin/edgegate":                                                "-rwxr-xr-x root/root",
			"./usr/lib/systemd/system/edgegate.service":                         "-rw-r--r-- root/root",
			"./usr/lib/systemd/system-generators/edgegate-credential-generator": "-rwxr-xr-x root/root",
			"./etc/edgegate/edgegate.yaml":                                      "-rw-r--r-- root/root",
			"./usr/share/doc/edgegate/copyright":                                "-rw-r--r-- root/root",
			"./usr/share/doc/edgegate/changelog.gz":                             "-rw-r--r-- root/root",
			"./usr/share/doc/edgegate/README.md":                                "-rw-r--r-- root/root",
			"./usr/share/doc/edgegate/install.md":                               "-rw-r--r-- root/root",
			"./usr/share/doc/edgegate/operations.md":                            "-rw-r--r-- root/root",
			"./usr/share/doc/edgegate/snap4city.md":                             "-rw-r--r-- root/root",
			"./usr/share/doc/edgegate/security.md":                              "-rw-r--r-- root/root",
			"./usr/share/lintian/overrides/edgegate":                            "-rw-r--r-- root/root",
		}
		got := map[string]string{}
		for _, line := range strings.Split(strings.TrimSpace(listing), "\n") {
			f := strings.Fields(line)
			if len(f) < 6 {
				t.Fatalf("unexpected dpkg-deb -c line %q", line)
			}
			got[f[5]] = f[0] + " " + f[1]
			if !strings.HasPrefix(f[3], "2026-09-21") { // SOURCE_DATE_EPOCH 1790000000
				t.Errorf("%s has date %s %s, want SOURCE_DATE_EPOCH's", f[5], f[3], f[4])
			}
		}
		for path, mode := range want {
			if got[path] != mode {
				t.Errorf("%s: %q, want %q", path, got[path], mode)
			}
		}
		for path, mode := range got {
			if _, ok := want[path]; !ok && !strings.HasPrefix(mode, "d") {
				t.Errorf("unexpected file in the package: %s", path)
			}
		}
	})

	t.Run("control", func(t *testing.T) {
		info := string(run(t, time.Minute, "", nil, dpkgDeb, "-I", deb))
		for _, want := range []string{
			"Package: edgegate", "Version: 1.2.3+test", "Architecture: amd64",
			"Depends: adduser", "Section: net", "Priority: optional",
		} {
			if !regexp.MustCompile(`(?m)^ ` + regexp.QuoteMeta(want) + `$`).MatchString(info) {
				t.Errorf("control lacks %q:\n%s", want, info)
			}
		}
	})

	ctl := t.TempDir()
	run(t, time.Minute, "", nil, dpkgDeb, "-e", deb, ctl)
	t.Run("conffiles", func(t *testing.T) {
		b, err := os.ReadFile(filepath.Join(ctl, "conffiles"))
		if err != nil {
			t.Fatal(err)
		}
		// A plain line (no "remove-on-upgrade" flag): dpkg keeps local edits.
		if got := strings.TrimSpace(string(b)); got != "/etc/edgegate/edgegate.yaml" {
			t.Errorf("conffiles = %q, want just /etc/edgegate/edgegate.yaml", got)
		}
	})

	t.Run("scripts", func(t *testing.T) {
		for _, name := range []string{"postinst", "prerm", "postrm"} {
			p := filepath.Join(ctl, name)
			st, err := os.Stat(p)
			if err != nil {
				t.Fatalf("%s missing: %v", name, err)
			}
			if st.Mode().Perm()&0o111 == 0 {
				t.Errorf("%s is not executable: %v", name, st.Mode())
			}
			run(t, time.Minute, "", nil, "sh", "-n", p)
			want, err := os.ReadFile(filepath.Join("scripts", name))
			if err != nil {
				t.Fatal(err)
			}
			got, _ := os.ReadFile(p)
			if !bytes.Equal(got, want) {
				t.Errorf("%s in the package differs from packaging/scripts/%s", name, name)
			}
		}
		post, _ := os.ReadFile(filepath.Join(ctl, "postinst"))
		for _, want := range []string{
			"adduser --quiet --system --ingroup edgegate", "--home /var/lib/edgegate",
			"--shell /usr/sbin/nologin", "adduser --quiet edgegate dialout",
		} {
			if !bytes.Contains(post, []byte(want)) {
				t.Errorf("postinst lacks %q", want)
			}
		}
		postrm, _ := os.ReadFile(filepath.Join(ctl, "postrm"))
		if !bytes.Contains(postrm, []byte(`rm -rf "$root/var/lib/edgegate"`)) {
			t.Error("postrm does not remove the state directory on purge")
		}
		if bytes.Contains(postrm, []byte("deluser")) {
			t.Error("postrm removes the user; the package leaves it (Debian policy)")
		}
	})

	data := t.TempDir()
	run(t, time.Minute, "", nil, dpkgDeb, "-x", deb, data)
	t.Run("files", func(t *testing.T) {
		// The conffile is the template of the very binary it ships with.
		bin := filepath.Join(data, "usr/bin/edgegate")
		tmpl := run(t, time.Minute, "", nil, bin, "config", "template")
		conf, err := os.ReadFile(filepath.Join(data, "etc/edgegate/edgegate.yaml"))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(conf, tmpl) {
			t.Error("/etc/edgegate/edgegate.yaml differs from `edgegate config template`")
		}
		// ... and a configuration the daemon accepts.
		out, stderr, err := runErr(time.Minute, "", nil, bin, "config", "check", "--config", filepath.Join(data, "etc/edgegate/edgegate.yaml"))
		if err != nil {
			t.Errorf("config check of the shipped configuration: %v\n%s%s", err, out, stderr)
		}
		unit, _ := os.ReadFile(filepath.Join(data, "usr/lib/systemd/system/edgegate.service"))
		want, _ := os.ReadFile("../systemd/edgegate.service")
		if !bytes.Equal(unit, want) {
			t.Error("the packaged unit differs from systemd/edgegate.service")
		}
		cl := run(t, time.Minute, "", nil, "sh", "-c", `gzip -dc "$0"`, filepath.Join(data, "usr/share/doc/edgegate/changelog.gz"))
		if !bytes.HasPrefix(cl, []byte("edgegate (1.2.3+test) unstable; urgency=medium\n\n  * Built from commit 0123456789ab: test build\n")) {
			t.Errorf("changelog does not start with this version's entry:\n%s", cl)
		}
	})

	t.Run("reproducible", func(t *testing.T) {
		again := buildDeb(t, t.TempDir())
		if a, b := sha256File(t, deb), sha256File(t, again); a != b {
			t.Errorf("two packagings of the same binary differ: %s vs %s", a, b)
		}
	})

	t.Run("lintian", func(t *testing.T) {
		lintian := requireTool(t, "lintian", "lintian")
		// No --suppress-tags: the one accepted tag (statically-linked-binary)
		// is overridden inside the package, with its reason, in
		// packaging/lintian/edgegate.
		out, stderr, err := runErr(3*time.Minute, "", nil, lintian, "--fail-on", "error", deb)
		if err != nil {
			t.Fatalf("lintian reports errors: %v\n%s%s", err, out, stderr)
		}
		if regexp.MustCompile(`(?m)^E: `).Match(out) {
			t.Errorf("lintian errors:\n%s", out)
		}
		if len(out) > 0 {
			t.Logf("lintian (warnings and notes are accepted):\n%s", out)
		}
	})
}
