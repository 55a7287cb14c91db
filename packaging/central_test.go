package packaging

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
)

// The companion's package, unit and maintainer scripts: the same checks
// as the gateway's (deb_test.go, unit_test.go, scripts_test.go), run
// through the same scripts with PACKAGE=edgegate-central.

var (
	centralOnce sync.Once
	centralBin  string
	centralErr  string
)

// hostCentralBinary builds edgegate-central for this machine once, with
// gobuild.sh as `make deb-central` does.
func hostCentralBinary(t *testing.T) string {
	t.Helper()
	centralOnce.Do(func() {
		out := filepath.Join(scratch, "host-central", "edgegate-central")
		o, e, err := runErr(buildTimeout, repoRoot(t), nil, "packaging/gobuild.sh", runtime.GOARCH, out, "edgegate-central")
		if err != nil {
			centralErr = fmt.Sprintf("gobuild.sh %s edgegate-central: %v\n%s%s", runtime.GOARCH, err, o, e)
			return
		}
		centralBin = out
	})
	if centralBin == "" {
		t.Fatal(centralErr)
	}
	return centralBin
}

func buildCentralDeb(t *testing.T, outDir string) string {
	t.Helper()
	bin := hostCentralBinary(t)
	env := []string{"DEB_VERSION=1.2.3+test", "SOURCE_DATE_EPOCH=1790000000",
		"DEB_COMMIT=0123456789ab", "DEB_SUBJECT=test build"}
	out := run(t, pkgTimeout, repoRoot(t), env, "packaging/deb.sh", "amd64", bin, bin, outDir, "edgegate-central")
	deb := strings.TrimSpace(string(out))
	if filepath.Base(deb) != "edgegate-central_1.2.3+test_amd64.deb" {
		t.Fatalf("deb.sh printed %q, want .../edgegate-central_1.2.3+test_amd64.deb", deb)
	}
	return deb
}

// TestCentralDebPackage builds the companion's amd64 .deb and checks what
// dpkg will see, then lintian.
func TestCentralDebPackage(t *testing.T) {
	if testing.Short() {
		t.Skip("skipped under -short: builds edgegate-central and its .deb")
	}
	if runtime.GOARCH != "amd64" {
		t.Skip("the package test packages the host binary as amd64; this is", runtime.GOARCH)
	}
	dpkgDeb := requireTool(t, "dpkg-deb", "dpkg")
	deb := buildCentralDeb(t, t.TempDir())

	t.Run("contents", func(t *testing.T) {
		listing := string(run(t, time.Minute, "", nil, dpkgDeb, "-c", deb))
		want := map[string]string{
			"./usr/bin/edgegate-central":                               "-rwxr-xr-x root/root",
			"./usr/lib/systemd/system/edgegate-central.service":        "-rw-r--r-- root/root",
			"./etc/edgegate-central/config.yaml":                       "-rw-r--r-- root/root",
			"./usr/share/edgegate-central/grafana/edgegate-fleet.json": "-rw-r--r-- root/root",
			"./usr/share/doc/edgegate-central/copyright":               "-rw-r--r-- root/root",
			"./usr/share/doc/edgegate-central/changelog.gz":            "-rw-r--r-- root/root",
			"./usr/share/doc/edgegate-central/central.md":              "-rw-r--r-- root/root",
			"./usr/share/lintian/overrides/edgegate-central":           "-rw-r--r-- root/root",
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
		for _, want := range []string{"Package: edgegate-central", "Version: 1.2.3+test", "Architecture: amd64",
			"Section: net", "Priority: optional"} {
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
		if got := strings.TrimSpace(string(b)); got != "/etc/edgegate-central/config.yaml" {
			t.Errorf("conffiles = %q, want just /etc/edgegate-central/config.yaml", got)
		}
	})
	t.Run("scripts", func(t *testing.T) {
		for _, name := range []string{"postinst", "prerm", "postrm"} {
			got, err := os.ReadFile(filepath.Join(ctl, name))
			if err != nil {
				t.Fatalf("%s missing: %v", name, err)
			}
			want, _ := os.ReadFile(filepath.Join("central", "scripts", name))
			if !bytes.Equal(got, want) {
				t.Errorf("%s in the package differs from packaging/central/scripts/%s", name, name)
			}
		}
	})

	data := t.TempDir()
	run(t, time.Minute, "", nil, dpkgDeb, "-x", deb, data)
	t.Run("files", func(t *testing.T) {
		bin := filepath.Join(data, "usr/bin/edgegate-central")
		conf := filepath.Join(data, "etc/edgegate-central/config.yaml")
		if out, stderr, err := runErr(time.Minute, "", nil, bin, "config", "check", "--config", conf); err != nil {
			t.Errorf("config check of the shipped configuration: %v\n%s%s", err, out, stderr)
		}
		for pkg, src := range map[string]string{
			"usr/lib/systemd/system/edgegate-central.service":        "../systemd/edgegate-central.service",
			"usr/share/edgegate-central/grafana/edgegate-fleet.json": "central/grafana/edgegate-fleet.json",
			"etc/edgegate-central/config.yaml":                       "central/config.yaml",
		} {
			got, _ := os.ReadFile(filepath.Join(data, pkg))
			want, err := os.ReadFile(src)
			if err != nil || !bytes.Equal(got, want) {
				t.Errorf("/%s in the package differs from packaging/%s (%v)", pkg, src, err)
			}
		}
		cl := run(t, time.Minute, "", nil, "sh", "-c", `gzip -dc "$0"`, filepath.Join(data, "usr/share/doc/edgegate-central/changelog.gz"))
		if !bytes.HasPrefix(cl, []byte("edgegate-central (1.2.3+test) unstable; urgency=medium\n")) {
			t.Errorf("changelog does not start with this package's entry:\n%s", cl)
		}
	})

	t.Run("reproducible", func(t *testing.T) {
		again := buildCentralDeb(t, t.TempDir())
		if a, b := sha256File(t, deb), sha256File(t, again); a != b {
			t.Errorf("two packagings of the same binary differ: %s vs %s", a, b)
		}
	})

	t.Run("lintian", func(t *testing.T) {
		lintian := requireTool(t, "lintian", "lintian")
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

// TestCentralUnitSecurityExposure scores the companion's unit offline, with
// the same bound as the gateway's.
func TestCentralUnitSecurityExposure(t *testing.T) {
	sa := requireTool(t, "systemd-analyze", "systemd")
	out, stderr, err := runErr(time.Minute, repoRoot(t), nil, sa, "security", "--offline=true", "--no-pager", "systemd/edgegate-central.service")
	if err != nil {
		t.Fatalf("systemd-analyze security: %v\n%s%s", err, out, stderr)
	}
	got, err := parseExposure(string(out))
	if err != nil {
		t.Fatal(err)
	}
	if got > maxExposure {
		t.Errorf("exposure level %.1f, want at most %.1f; the unprotected items:\n%s", got, maxExposure, unprotected(string(out)))
	}
	t.Logf("systemd-analyze security edgegate-central: exposure %.1f", got)
}

// TestCentralUnitVerify: `systemd-analyze verify` has nothing to say.
func TestCentralUnitVerify(t *testing.T) {
	sa := requireTool(t, "systemd-analyze", "systemd")
	exe := "/bin/true"
	if !testing.Short() {
		exe = hostCentralBinary(t)
	}
	b, err := os.ReadFile("../systemd/edgegate-central.service")
	if err != nil {
		t.Fatal(err)
	}
	const orig = "\nExecStart=/usr/bin/edgegate-central "
	if !strings.Contains(string(b), orig) {
		t.Fatalf("the unit has no %q line", orig)
	}
	dir := t.TempDir()
	unit := filepath.Join(dir, "edgegate-central.service")
	if err := os.WriteFile(unit, []byte(strings.Replace(string(b), orig, "\nExecStart="+exe+" ", 1)), 0o644); err != nil {
		t.Fatal(err)
	}
	out, stderr, err := runErr(time.Minute, dir, []string{"SYSTEMD_LOG_COLOR=0"}, sa, "verify", "--no-pager", unit)
	if err != nil || len(out)+len(stderr) > 0 {
		t.Errorf("systemd-analyze verify: err=%v\n%s%s", err, out, stderr)
	}
}

// TestCentralUnitContract pins what the binary and the package rely on:
// the credential names are the ones internal/central reads
// (KeyCredential, StoreKeyCredential), the sources are the files the
// postinst creates, and the shipped configuration names the secrets by
// the path systemd gives them.
func TestCentralUnitContract(t *testing.T) {
	b, err := os.ReadFile("../systemd/edgegate-central.service")
	if err != nil {
		t.Fatal(err)
	}
	unit := string(b)
	for _, line := range []string{
		"ExecStart=/usr/bin/edgegate-central serve --config /etc/edgegate-central/config.yaml",
		"DynamicUser=yes", "StateDirectory=edgegate-central", "Restart=on-failure",
		"LoadCredential=policy-signing-keys:/etc/edgegate-central/credentials/policy-signing-keys",
		"LoadCredential=edgegate-central-store-key:/etc/edgegate-central/credentials/store-key",
		"LoadCredential=secret:/etc/edgegate-central/secrets",
		"RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX", "NoNewPrivileges=yes", "ProtectSystem=strict",
	} {
		if !regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(line) + `$`).MatchString(unit) {
			t.Errorf("the unit lacks the line %q", line)
		}
	}
	cfg, err := os.ReadFile("central/config.yaml")
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range regexp.MustCompile(`/run/credentials/([^/]+)/secret_([A-Za-z0-9._-]+)`).FindAllStringSubmatch(string(cfg), -1) {
		if m[1] != "edgegate-central.service" {
			t.Errorf("config.yaml names credentials of unit %q", m[1])
		}
	}
	if !strings.Contains(string(cfg), "state_dir: /var/lib/edgegate-central") {
		t.Error("config.yaml's state_dir is not the unit's StateDirectory")
	}
}

// TestCentralMaintainerScripts: install generates the two credentials
// (0600, in 0700 directories) and never replaces them; remove keeps
// everything; purge removes configuration, credentials and state.
func TestCentralMaintainerScripts(t *testing.T) {
	s := newScriptEnv(t)
	// keys init, stubbed: writes a file where it is told.
	bin := strings.SplitN(strings.TrimPrefix(s.env[0], "PATH="), ":", 2)[0] // the stubs' directory
	if err := os.WriteFile(filepath.Join(bin, "edgegate-central"), []byte(stub+`
if [ "$1 $2 $3" = "keys init --key-file" ]; then (umask 077; echo '{"keys":[]}' >"$4"); fi
`), 0o755); err != nil {
		t.Fatal(err)
	}
	etc := filepath.Join(s.root, "etc/edgegate-central")
	if err := os.MkdirAll(etc, 0o755); err != nil {
		t.Fatal(err)
	}
	runScript := func(extra []string, script string, args ...string) string {
		os.Remove(s.log)
		env := append(append([]string{}, s.env...), extra...)
		run(t, time.Minute, "", env, "sh", append([]string{filepath.Join("central", "scripts", script)}, args...)...)
		b, _ := os.ReadFile(s.log)
		return string(b)
	}
	storeKey := filepath.Join(etc, "credentials/store-key")
	signing := filepath.Join(etc, "credentials/policy-signing-keys")

	t.Run("install", func(t *testing.T) {
		calls := runScript(nil, "postinst", "configure")
		wantCalls(t, calls, "edgegate-central keys init --key-file "+signing, "deb-systemd-helper enable edgegate-central.service")
		wantNoCalls(t, calls, "adduser", "deb-systemd-invoke")
		for _, d := range []string{"credentials", "secrets"} {
			if st, err := os.Stat(filepath.Join(etc, d)); err != nil || st.Mode().Perm() != 0o700 {
				t.Errorf("%s: %v, %v; want a 0700 directory", d, st, err)
			}
		}
		st, err := os.Stat(storeKey)
		if err != nil || st.Mode().Perm() != 0o600 || st.Size() != 32 {
			t.Errorf("store key: %v, %v; want 32 bytes, mode 0600", st, err)
		}
	})
	key, _ := os.ReadFile(storeKey)
	existing := []string{"STUB_INSTALLED=1"}
	t.Run("upgrade keeps the keys", func(t *testing.T) {
		calls := runScript(existing, "postinst", "configure", "1.0")
		wantNoCalls(t, calls, "keys init")
		wantCalls(t, calls, "deb-systemd-helper update-state edgegate-central.service")
		if again, _ := os.ReadFile(storeKey); !bytes.Equal(key, again) {
			t.Error("upgrade replaced the store key")
		}
	})
	t.Run("remove keeps, purge removes", func(t *testing.T) {
		runScript(existing, "prerm", "remove")
		runScript(existing, "postrm", "remove")
		if _, err := os.Stat(storeKey); err != nil {
			t.Errorf("remove deleted the store key: %v", err)
		}
		state := filepath.Join(s.root, "var/lib/private/edgegate-central")
		if err := os.MkdirAll(state, 0o700); err != nil {
			t.Fatal(err)
		}
		calls := runScript(existing, "postrm", "purge")
		wantCalls(t, calls, "deb-systemd-helper purge edgegate-central.service")
		for _, p := range []string{etc, state} {
			if _, err := os.Stat(p); !os.IsNotExist(err) {
				t.Errorf("purge left %s (stat: %v)", p, err)
			}
		}
	})
}
