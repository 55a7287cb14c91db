package packaging

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// stub stands in for the system commands the maintainer scripts call, so
// their logic runs here without creating users or touching systemd: each
// call is logged, and getent and id answer from the environment.
const stub = `#!/bin/sh
echo "$(basename "$0") $*" >>"$STUB_LOG"
case $(basename "$0") in
getent) [ "${STUB_USER_EXISTS:-}" = 1 ] ;;
id) if [ "${STUB_IN_DIALOUT:-}" = 1 ]; then echo "edgegate dialout"; else echo edgegate; fi ;;
dpkg-statoverride) exit 1 ;;  # no local override
deb-systemd-helper) [ "$1" != debian-installed ] || [ "${STUB_INSTALLED:-}" = 1 ] ;;
esac
`

type scriptEnv struct {
	root, log string
	env       []string
}

func newScriptEnv(t *testing.T) *scriptEnv {
	t.Helper()
	dir := t.TempDir()
	bin := filepath.Join(dir, "bin")
	if err := os.Mkdir(bin, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"getent", "id", "addgroup", "adduser", "deluser", "chown",
		"dpkg-statoverride", "deb-systemd-helper", "deb-systemd-invoke", "systemctl"} {
		if err := os.WriteFile(filepath.Join(bin, name), []byte(stub), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	root := filepath.Join(dir, "root")
	// What dpkg has unpacked before postinst runs.
	if err := os.MkdirAll(filepath.Join(root, "etc/edgegate"), 0o755); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(root, "etc/edgegate/edgegate.yaml"), "state_dir: /var/lib/edgegate\n")
	log := filepath.Join(dir, "calls.log")
	return &scriptEnv{root: root, log: log, env: []string{
		"PATH=" + bin + ":" + os.Getenv("PATH"), "DPKG_ROOT=" + root, "STUB_LOG=" + log,
	}}
}

func writeFile(t *testing.T, p, s string) {
	t.Helper()
	if err := os.WriteFile(p, []byte(s), 0o600); err != nil {
		t.Fatal(err)
	}
}

// run runs a maintainer script and returns the commands it called.
func (s *scriptEnv) run(t *testing.T, extraEnv []string, script string, args ...string) string {
	t.Helper()
	os.Remove(s.log)
	env := append(append([]string{}, s.env...), extraEnv...)
	run(t, time.Minute, "", env, "sh", append([]string{filepath.Join("scripts", script)}, args...)...)
	b, err := os.ReadFile(s.log)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	return string(b)
}

func wantCalls(t *testing.T, calls string, want ...string) {
	t.Helper()
	for _, w := range want {
		if !strings.Contains(calls, w) {
			t.Errorf("no call %q; calls:\n%s", w, calls)
		}
	}
}

func wantNoCalls(t *testing.T, calls string, unwanted ...string) {
	t.Helper()
	for _, w := range unwanted {
		if strings.Contains(calls, w) {
			t.Errorf("unexpected call %q; calls:\n%s", w, calls)
		}
	}
}

// TestMaintainerScripts runs the life cycle install, upgrade, remove,
// purge under $DPKG_ROOT with stubbed system commands.
func TestMaintainerScripts(t *testing.T) {
	s := newScriptEnv(t)
	state := filepath.Join(s.root, "var/lib/edgegate")

	t.Run("install", func(t *testing.T) {
		calls := s.run(t, nil, "postinst", "configure")
		wantCalls(t, calls,
			"addgroup --quiet --system edgegate",
			"adduser --quiet --system --ingroup edgegate --no-create-home --home /var/lib/edgegate --shell /usr/sbin/nologin",
			"adduser --quiet edgegate dialout",
			"chown edgegate:edgegate "+state,
			"chown root:edgegate "+filepath.Join(s.root, "etc/edgegate"),
			"deb-systemd-helper enable edgegate.service",
		)
		// Not started on a fresh install: the configuration is an example.
		wantNoCalls(t, calls, "deb-systemd-invoke")
		st, err := os.Stat(state)
		if err != nil || st.Mode().Perm() != 0o700 {
			t.Errorf("state directory: %v, %v; want mode 0700", st, err)
		}
		if st, _ := os.Stat(filepath.Join(s.root, "etc/edgegate")); st == nil || st.Mode().Perm() != 0o750 {
			t.Errorf("/etc/edgegate mode %v, want 0750", st)
		}
	})

	// The daemon has run: a queue and a key exist; the admin edited the config.
	writeFile(t, filepath.Join(state, "store.key"), "key")
	writeFile(t, filepath.Join(s.root, "etc/edgegate/client-secret"), "secret")
	existing := []string{"STUB_USER_EXISTS=1", "STUB_IN_DIALOUT=1", "STUB_INSTALLED=1"}

	t.Run("upgrade", func(t *testing.T) {
		if calls := s.run(t, existing, "prerm", "upgrade", "1.1"); strings.Contains(calls, "stop") {
			t.Errorf("prerm upgrade stops the daemon; calls:\n%s", calls)
		}
		s.run(t, existing, "postrm", "upgrade", "1.1")
		calls := s.run(t, existing, "postinst", "configure", "1.0")
		wantNoCalls(t, calls, "adduser", "addgroup", "chown edgegate:edgegate")
		wantCalls(t, calls, "deb-systemd-helper update-state edgegate.service")
		for _, p := range []string{filepath.Join(state, "store.key"), filepath.Join(s.root, "etc/edgegate/client-secret")} {
			if _, err := os.Stat(p); err != nil {
				t.Errorf("upgrade lost %s: %v", p, err)
			}
		}
	})

	t.Run("remove keeps config and state", func(t *testing.T) {
		s.run(t, existing, "prerm", "remove")
		calls := s.run(t, existing, "postrm", "remove")
		wantCalls(t, calls, "deb-systemd-helper mask edgegate.service")
		for _, p := range []string{filepath.Join(state, "store.key"), filepath.Join(s.root, "etc/edgegate/client-secret")} {
			if _, err := os.Stat(p); err != nil {
				t.Errorf("remove deleted %s: %v", p, err)
			}
		}
	})

	t.Run("purge removes state, keeps the user", func(t *testing.T) {
		calls := s.run(t, existing, "postrm", "purge")
		wantCalls(t, calls, "deb-systemd-helper purge edgegate.service", "deb-systemd-helper unmask edgegate.service")
		wantNoCalls(t, calls, "deluser")
		for _, p := range []string{state, filepath.Join(s.root, "etc/edgegate")} {
			if _, err := os.Stat(p); !os.IsNotExist(err) {
				t.Errorf("purge left %s (stat: %v)", p, err)
			}
		}
	})
}
