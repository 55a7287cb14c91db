package e2e

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/edgegate/edgegate/internal/pki"
	"github.com/edgegate/edgegate/internal/testkit"
)

// mosquitto is a real Mosquitto broker with a TLS listener on 127.0.0.1.
type mosquitto struct {
	URL, Port, CAFile string
	pool              *x509.CertPool
}

func (m *mosquitto) tlsOpt(o *paho.ClientOptions) {
	o.SetTLSConfig(&tls.Config{RootCAs: m.pool, MinVersion: tls.VersionTLS12})
}

func freePort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
}

// startMosquitto runs mosquitto with persistence and a TLS listener; it is
// stopped when the test ends. The test is skipped outside CI when mosquitto
// is not installed (.ci/run installs it).
func startMosquitto(t *testing.T, extraConf ...string) *mosquitto {
	t.Helper()
	bin, err := exec.LookPath("mosquitto")
	if err != nil {
		bin = "/usr/sbin/mosquitto"
		if _, serr := os.Stat(bin); serr != nil {
			if os.Getenv("CI") != "" {
				t.Fatal("mosquitto is not installed; .ci/run installs it")
			}
			t.Skip("mosquitto not installed: apt-get install mosquitto mosquitto-clients")
		}
	}
	dir := t.TempDir()
	now := time.Now()
	ca, err := pki.NewCA("e2e mosquitto CA", now)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := ca.IssueServer(now, "127.0.0.1", "localhost")
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(cert.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	write := func(name string, data []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, data, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	caFile := write("ca.pem", ca.CertPEM)
	certFile := write("server.pem", pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Certificate[0]}))
	keyFile := write("server.key", pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}))
	if err := os.MkdirAll(filepath.Join(dir, "data"), 0o700); err != nil {
		t.Fatal(err)
	}

	var cmd *exec.Cmd
	var port string
	for attempt := 0; attempt < 3; attempt++ {
		port = freePort(t)
		anon := "allow_anonymous true"
		if len(extraConf) > 0 {
			anon = ""
		}
		conf := fmt.Sprintf(anon+`
user root
listener %s 127.0.0.1
cafile %s
certfile %s
keyfile %s
persistence true
persistence_location %s/
autosave_interval 1
max_queued_messages 100000
max_inflight_messages 512
log_dest stderr
log_type error
log_type warning
%s
`, port, caFile, certFile, keyFile, filepath.Join(dir, "data"), strings.Join(extraConf, "\n"))
		confFile := write("mosquitto.conf", []byte(conf))
		cmd = exec.Command(bin, "-c", confFile)
		logf, _ := os.Create(filepath.Join(dir, "mosquitto.log"))
		cmd.Stdout, cmd.Stderr = logf, logf
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		if waitListening("127.0.0.1:"+port, 5*time.Second) {
			break
		}
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		cmd = nil
	}
	if cmd == nil {
		log, _ := os.ReadFile(filepath.Join(dir, "mosquitto.log"))
		t.Fatalf("mosquitto did not start:\n%s", log)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	return &mosquitto{URL: "tls://127.0.0.1:" + port, Port: port, CAFile: caFile, pool: ca.Pool()}
}

func waitListening(addr string, timeout time.Duration) bool {
	return testkit.Poll(timeout, func() bool {
		c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
		if err == nil {
			c.Close()
		}
		return err == nil
	})
}
