// Package mosquittotest starts a real Mosquitto for tests: a loopback
// listener, optionally the dynamic-security plugin with one administrator,
// stopped by its PID when the test ends.
package mosquittotest

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Broker is a real Mosquitto broker on a loopback port, started by
// the test and stopped (by its PID) when the test ends.
type Broker struct {
	Addr    string // 127.0.0.1:port
	URL     string // tcp://127.0.0.1:port
	Dir     string
	LogFile string
	cmd     *exec.Cmd
}

// DynsecPlugin is where Debian installs the plugin.
const DynsecPlugin = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"

// Start runs /usr/sbin/mosquitto with conf appended to a
// loopback listener. With dynsecAdmin set, the dynamic-security plugin is
// loaded with a fresh configuration whose only account is that admin
// (password AdminPassword), made by mosquitto_ctrl dynsec init.
func Start(t testing.TB, dynsecAdmin string, conf ...string) *Broker {
	t.Helper()
	return StartSeeded(t, dynsecAdmin, nil, conf...)
}

// StartSeeded is Start with seed called on the fresh dynamic-security
// file before Mosquitto starts (the plugin reads it once at start): bulk
// accounts without one control command, and one file rewrite, each.
func StartSeeded(t testing.TB, dynsecAdmin string, seed func(dynsecFile string) error, conf ...string) *Broker {
	t.Helper()
	bin := "/usr/sbin/mosquitto"
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("mosquitto is required: apt-get install mosquitto mosquitto-clients (%v)", err)
	}
	dir := t.TempDir()
	if dynsecAdmin != "" {
		ds := filepath.Join(dir, "dynsec.json")
		out, err := exec.Command("mosquitto_ctrl", "dynsec", "init", ds, dynsecAdmin, AdminPassword).CombinedOutput()
		if err != nil {
			t.Fatalf("mosquitto_ctrl dynsec init: %v %s", err, out)
		}
		if seed != nil {
			if err := seed(ds); err != nil {
				t.Fatalf("seed the dynamic-security file: %v", err)
			}
		}
		conf = append([]string{"allow_anonymous false", "plugin " + DynsecPlugin, "plugin_opt_config_file " + ds}, conf...)
	}
	if os.Geteuid() == 0 {
		// Mosquitto started as root drops to the user "mosquitto", who
		// cannot read the test's private files.
		conf = append([]string{"user root"}, conf...)
	}
	m := &Broker{Dir: dir, LogFile: filepath.Join(dir, "mosquitto.log")}
	for attempt := 0; attempt < 3; attempt++ {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port := strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
		ln.Close()
		text := fmt.Sprintf("listener %s 127.0.0.1\npersistence false\nmax_inflight_messages 512\nmax_queued_messages 100000\nlog_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\n%s\n",
			port, strings.Join(conf, "\n"))
		cf := filepath.Join(dir, "mosquitto.conf")
		if err := os.WriteFile(cf, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
		logf, err := os.Create(m.LogFile)
		if err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command(bin, "-c", cf)
		cmd.Stdout, cmd.Stderr = logf, logf
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		logf.Close()
		addr := "127.0.0.1:" + port
		if waitTCP(addr, 5*time.Second) {
			m.cmd, m.Addr, m.URL = cmd, addr, "tcp://"+addr
			break
		}
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	}
	if m.cmd == nil {
		b, _ := os.ReadFile(m.LogFile)
		t.Fatalf("mosquitto did not start:\n%s", b)
	}
	t.Cleanup(func() {
		_ = m.cmd.Process.Kill()
		_ = m.cmd.Wait()
	})
	return m
}

// PID is the broker process's id (to read its memory in /proc).
func (m *Broker) PID() int { return m.cmd.Process.Pid }

// Stop kills the broker now (a crash or an outage); the test's cleanup
// finds it stopped.
func (m *Broker) Stop() {
	_ = m.cmd.Process.Kill()
	_ = m.cmd.Wait()
}

// FreePort is a loopback port free a moment ago, for a further listener
// given in Start's conf (Start waits for its first listener; Mosquitto
// opens every listener before it serves any).
func FreePort(t testing.TB) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// TLSListener is the conf of a TLS listener on port with the PEM files
// certFile (chain) and keyFile, for Start.
func TLSListener(port int, certFile, keyFile string) []string {
	return []string{fmt.Sprintf("listener %d 127.0.0.1", port), "certfile " + certFile, "keyfile " + keyFile}
}

// Ctrl runs mosquitto_ctrl against the broker's plain listener as the
// dynsec administrator admin (as an operator would provision it).
func (m *Broker) Ctrl(t testing.TB, admin string, args ...string) {
	t.Helper()
	host, port, _ := net.SplitHostPort(m.Addr)
	full := append([]string{"-h", host, "-p", port, "-u", admin, "-P", AdminPassword, "dynsec"}, args...)
	if out, err := exec.Command("mosquitto_ctrl", full...).CombinedOutput(); err != nil {
		t.Fatalf("mosquitto_ctrl dynsec %s: %v %s", strings.Join(args, " "), err, out)
	}
}

// AdminPassword is the dynsec administrator's password.
const AdminPassword = "test-admin-pw"

func waitTCP(addr string, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
		if err == nil {
			c.Close()
			return true
		}
		time.Sleep(30 * time.Millisecond)
	}
	return false
}
