package packaging

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// maxExposure is the highest `systemd-analyze security` score the unit may
// have (0 = fully locked down, 10 = unprotected).
const maxExposure = 1.5

var exposureRE = regexp.MustCompile(`(?m)Overall exposure level for \S+: ([0-9]+(?:\.[0-9]+)?)`)

// parseExposure extracts the overall exposure level from the output of
// `systemd-analyze security UNIT`.
func parseExposure(out string) (float64, error) {
	m := exposureRE.FindStringSubmatch(out)
	if m == nil {
		return 0, fmt.Errorf("no \"Overall exposure level\" line in:\n%s", out)
	}
	return strconv.ParseFloat(m[1], 64)
}

func TestParseExposure(t *testing.T) {
	tests := []struct {
		name, out string
		want      float64
		wantErr   bool
	}{
		{"ok", "✓ UMask= ...\n\n→ Overall exposure level for edgegate.service: 1.4 OK 🙂\n", 1.4, false},
		{"unsafe", "→ Overall exposure level for x.service: 9.6 UNSAFE 😨", 9.6, false},
		{"integer", "→ Overall exposure level for x.service: 2 OK", 2, false},
		{"missing", "Failed to load unit", 0, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseExposure(tt.out)
			if (err != nil) != tt.wantErr || got != tt.want {
				t.Errorf("parseExposure(%q) = %v, %v; want %v, error %v", tt.out, got, err, tt.want, tt.wantErr)
			}
		})
	}
}

// TestUnitSecurityExposure scores the unit file offline, as an auditor would
// with `systemd-analyze security --offline=true systemd/edgegate.service`.
func TestUnitSecurityExposure(t *testing.T) {
	sa := requireTool(t, "systemd-analyze", "systemd")
	out, stderr, err := runErr(time.Minute, repoRoot(t), nil, sa, "security", "--offline=true", "--no-pager", "systemd/edgegate.service")
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
	t.Logf("systemd-analyze security: exposure %.1f", got)
}

func unprotected(out string) string {
	var b strings.Builder
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, "✗") {
			b.WriteString(l + "\n")
		}
	}
	return b.String()
}

// unitCopy writes the unit into dir with ExecStart= pointing at exe:
// systemd-analyze verify checks that the binary exists, and the tests must
// not install anything into /usr/bin.
func unitCopy(t *testing.T, dir, exe string) string {
	t.Helper()
	b, err := os.ReadFile("../systemd/edgegate.service")
	if err != nil {
		t.Fatal(err)
	}
	const orig = "ExecStart=/usr/bin/edgegate "
	if !strings.Contains(string(b), "\n"+orig) {
		t.Fatalf("the unit has no %q line", orig)
	}
	unit := strings.Replace(string(b), "\n"+orig, "\nExecStart="+exe+" ", 1)
	p := filepath.Join(dir, "edgegate.service")
	if err := os.WriteFile(p, []byte(unit), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestUnitVerify runs `systemd-analyze verify` on the unit, alone and with
// the drop-in the credential generator writes, and wants no output at all:
// verify exits 0 on unknown or misspelt keys and only warns.
func TestUnitVerify(t *testing.T) {
	sa := requireTool(t, "systemd-analyze", "systemd")
	// Any executable will do for verify; the real binary when it is built
	// anyway (not under -short), else a copy of /bin/true.
	exe := "/bin/true"
	if !testing.Short() {
		exe = hostBinary(t)
	}
	verify := func(t *testing.T, unit string) {
		t.Helper()
		out, stderr, err := runErr(time.Minute, filepath.Dir(unit), []string{"SYSTEMD_LOG_COLOR=0"}, sa, "verify", "--no-pager", unit)
		if err != nil || len(out)+len(stderr) > 0 {
			t.Errorf("systemd-analyze verify %s: err=%v\n%s%s", unit, err, out, stderr)
		}
	}
	t.Run("unit", func(t *testing.T) {
		verify(t, unitCopy(t, t.TempDir(), exe))
	})
	t.Run("with credential drop-in", func(t *testing.T) {
		dir := t.TempDir()
		cred := filepath.Join(dir, "store-key.cred")
		if err := os.WriteFile(cred, []byte("sealed"), 0o600); err != nil {
			t.Fatal(err)
		}
		// verify reads drop-ins from <unit>.d next to the unit file.
		runGenerator(t, cred, dir)
		if _, err := os.Stat(filepath.Join(dir, "edgegate.service.d", "50-store-key-credential.conf")); err != nil {
			t.Fatal(err)
		}
		verify(t, unitCopy(t, dir, exe))
	})
}

func runGenerator(t *testing.T, cred, out string) {
	t.Helper()
	run(t, time.Minute, "", []string{"EDGEGATE_STORE_KEY_CRED=" + cred},
		"../systemd/edgegate-credential-generator", out, out, out)
}

// TestCredentialGenerator: the drop-in exists exactly when the .cred file
// does, and names it for the credential the daemon reads (store-key).
func TestCredentialGenerator(t *testing.T) {
	dir := t.TempDir()
	cred := filepath.Join(dir, "store-key.cred")
	out := filepath.Join(dir, "gen")
	dropIn := filepath.Join(out, "edgegate.service.d", "50-store-key-credential.conf")

	runGenerator(t, cred, out)
	if _, err := os.Stat(dropIn); !os.IsNotExist(err) {
		t.Fatalf("drop-in written without a credential file (stat: %v)", err)
	}

	if err := os.WriteFile(cred, []byte("sealed"), 0o600); err != nil {
		t.Fatal(err)
	}
	runGenerator(t, cred, out)
	b, err := os.ReadFile(dropIn)
	if err != nil {
		t.Fatalf("no drop-in with a credential file: %v", err)
	}
	want := "[Service]\nLoadCredentialEncrypted=store-key:" + cred + "\n"
	if !strings.HasSuffix(string(b), want) {
		t.Errorf("drop-in =\n%s\nwant it to end with\n%s", b, want)
	}

	// Without arguments (not run by systemd) it does nothing and succeeds.
	run(t, time.Minute, "", nil, "../systemd/edgegate-credential-generator")
}

// TestUnitContract pins the settings the daemon and the package rely on,
// which the sandbox score does not see.
func TestUnitContract(t *testing.T) {
	b, err := os.ReadFile("../systemd/edgegate.service")
	if err != nil {
		t.Fatal(err)
	}
	unit := string(b)
	for _, line := range []string{
		"Type=notify", "NotifyAccess=main", "Restart=on-failure", "WatchdogSec=60s",
		"StateDirectory=edgegate", "ConfigurationDirectory=edgegate", "RuntimeDirectory=edgegate",
		"User=edgegate", "ExecStart=/usr/bin/edgegate run --config /etc/edgegate/edgegate.yaml",
		"DevicePolicy=closed", "DeviceAllow=char-ttyUSB rw", "DeviceAllow=char-ttyACM rw", "DeviceAllow=char-ttyAMA rw",
		"Wants=modprobe@usbserial.service", "After=modprobe@usbserial.service",
		"RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
		// Not paired (78, EX_CONFIG) or a bad config (2): no restart loop.
		"RestartPreventExitStatus=2 78",
	} {
		if !regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(line) + `$`).MatchString(unit) {
			t.Errorf("the unit lacks the line %q", line)
		}
	}
	// The credential must not be named in the unit itself: systemd 252
	// fails the unit when the file is missing (see the generator).
	if regexp.MustCompile(`(?m)^LoadCredentialEncrypted=`).MatchString(unit) {
		t.Error("LoadCredentialEncrypted= in the unit: a gateway without the .cred file would not start")
	}
}
