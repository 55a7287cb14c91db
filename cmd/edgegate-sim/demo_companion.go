package main

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"sync"
	"syscall"
	"text/tabwriter"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"gopkg.in/yaml.v3"

	"github.com/edgegate/edgegate/internal/envelope"
	"github.com/edgegate/edgegate/internal/pki"
	"github.com/edgegate/edgegate/internal/sim/centralsim"
	"github.com/edgegate/edgegate/internal/testkit"
)

// The companion part of the demo: the real edgegate-central (embedded
// badger store, embedded push broker) beside the same simulated stock
// platform, a second gateway paired with it (bundle mode), and an
// ownership change at the platform pushed live to that running gateway.
const (
	companionGateway = "gw-demo-02"
	companionDevice  = "th-porch"
	// companionClient is the platform's client the companion reads with:
	// its tokens name the RootAdmin user companionAdmin (docs/central.md).
	companionClient = "edgegate-central"
	companionAdmin  = "ops"
)

// companionUsers are the accounts of the demo's platform: the companion
// reads it as a RootAdmin (list/index.php lists every row for one).
func companionUsers() []centralsim.User {
	return []centralsim.User{{Username: demoAccount}, {Username: "bob"}, {Username: "mallory"},
		{Username: companionAdmin, Role: centralsim.RoleRootAdmin}}
}

// companionOutcome is what the companion part measured.
type companionOutcome struct {
	delivered     int           // the device's readings at the broker before the change
	pushToApplied time.Duration // `edgegate-central push` started → the gateway's policy applied without the device
	pushToRefused time.Duration // ... → the device cut off and its next login refused
	afterRefusal  int           // the device's readings at the broker after that: must be 0
	problems      []string
}

// findSibling is a binary next to this one (`make build` puts them all in
// bin/), else on PATH; flagged wins.
func findSibling(name, flagged, flagName string) (string, error) {
	if flagged != "" {
		if _, err := os.Stat(flagged); err != nil {
			return "", fmt.Errorf("--%s: %w", flagName, err)
		}
		return flagged, nil
	}
	if exe, err := os.Executable(); err == nil {
		next := filepath.Join(filepath.Dir(exe), name)
		if st, err := os.Stat(next); err == nil && !st.IsDir() {
			return next, nil
		}
	}
	p, err := exec.LookPath(name)
	if err != nil {
		return "", fmt.Errorf("no %s binary next to edgegate-sim or on PATH (make build, or --%s PATH): %w", name, flagName, err)
	}
	return p, nil
}

func freeLoopbackAddr() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

// companionFiles writes the companion's configuration, TLS certificate
// (its own CA), secrets (0600) and the CA bundle the gateway trusts
// (platform's and companion's), and returns the paths.
type companionFiles struct {
	dir, config, gatewayCA, apiURL, pushURL string
	caPool                                  *x509.CertPool
}

func writeCompanionFiles(sim *centralsim.Server, dir, clientSecret string) (*companionFiles, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	ca, err := pki.NewCA("edgegate-central demo CA", time.Now())
	if err != nil {
		return nil, err
	}
	cert, err := ca.IssueServer(time.Now(), "127.0.0.1")
	if err != nil {
		return nil, err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(cert.PrivateKey)
	if err != nil {
		return nil, err
	}
	api, err := freeLoopbackAddr()
	if err != nil {
		return nil, err
	}
	push, err := freeLoopbackAddr()
	if err != nil {
		return nil, err
	}
	f := &companionFiles{dir: dir, config: filepath.Join(dir, "config.yaml"), gatewayCA: filepath.Join(dir, "gateway-ca.pem"),
		apiURL: "https://" + api, pushURL: "tls://" + push, caPool: ca.Pool()}
	leaf := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Certificate[0]})
	files := []struct {
		name string
		data []byte
		mode os.FileMode
	}{
		// The CLI trusts tls_cert's certificates: the leaf, then its CA.
		{"tls.crt", append(leaf, ca.CertPEM...), 0o644},
		{"tls.key", pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600},
		{"client-secret", []byte(clientSecret + "\n"), 0o600},
		{"admin-token", []byte(randomHex(16) + "\n"), 0o600},
		{"platform-ca.pem", sim.CACertPEM(), 0o644},
		{"gateway-ca.pem", append(append([]byte{}, sim.CACertPEM()...), ca.CertPEM...), 0o644},
	}
	for _, fl := range files {
		if err := os.WriteFile(filepath.Join(dir, fl.name), fl.data, fl.mode); err != nil {
			return nil, err
		}
	}
	cfg := map[string]any{
		"listen": api, "public_url": f.apiURL, "mqtt_listen": push,
		"tls_cert": filepath.Join(dir, "tls.crt"), "tls_key": filepath.Join(dir, "tls.key"),
		"state_dir": filepath.Join(dir, "state"), "store": "badger", "admin_token_file": filepath.Join(dir, "admin-token"),
		"platform": map[string]any{
			"url": sim.URL(), "issuer": sim.Issuer(), "ca_file": filepath.Join(dir, "platform-ca.pem"),
			"client_id": companionClient, "client_secret_file": filepath.Join(dir, "client-secret"),
			"brokers": map[string]string{centralsim.DefaultBrokerName: sim.BrokerURL()},
		},
		// The gateway's tokens come from the device grant of pair's client.
		"gateways": map[string]string{companionGateway: pairClientID},
		// Ops push after a change; the poll is the safety net.
		"poll_interval": "10m", "policy_ttl": "24h",
	}
	b, err := yaml.Marshal(cfg)
	if err != nil {
		return nil, err
	}
	return f, os.WriteFile(f.config, b, 0o600)
}

// companionPlatformClient is the operator's platform client for the
// companion: a service account whose tokens name a RootAdmin
// (docs/central.md, "Reads the platform"), registered with the simulated
// realm when it is created.
func companionPlatformClient(secret string) centralsim.Client {
	return centralsim.Client{ID: companionClient, Secret: secret, Username: companionAdmin}
}

// startCompanion runs `edgegate-central serve` and waits until its API
// answers; stop ends it by its PID (SIGTERM, then kill).
func startCompanion(ctx context.Context, centralBin string, f *companionFiles) (stop func() error, pid int, err error) {
	logf, err := os.OpenFile(filepath.Join(f.dir, "edgegate-central.log"), os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, 0, err
	}
	cmd := exec.Command(centralBin, "serve", "--config", f.config)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, 0, fmt.Errorf("start edgegate-central: %w", err)
	}
	// exited is closed when the process has ended; waitErr is then its
	// exit status.
	exited := make(chan struct{})
	var waitErr error
	go func() { waitErr = cmd.Wait(); logf.Close(); close(exited) }()
	stop = sync.OnceValue(func() error {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
			return waitErr
		case <-time.After(20 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
			return errors.New("edgegate-central did not stop within 20s of SIGTERM; killed")
		}
	})
	hc := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: f.caPool}}}
	defer hc.CloseIdleConnections()
	up := testkit.Poll(20*time.Second, func() bool {
		select {
		case <-exited:
			return true
		default:
		}
		if ctx.Err() != nil {
			return true
		}
		resp, err := hc.Get(f.apiURL + "/edgegate/v1/policy-keys")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
	select {
	case <-exited:
		return nil, 0, fmt.Errorf("edgegate-central exited at start: %v (log: %s)", waitErr, filepath.Join(f.dir, "edgegate-central.log"))
	default:
	}
	if err := ctx.Err(); err != nil {
		_ = stop()
		return nil, 0, err
	}
	if !up {
		_ = stop()
		return nil, 0, fmt.Errorf("edgegate-central did not answer within 20s (log: %s)", filepath.Join(f.dir, "edgegate-central.log"))
	}
	return stop, cmd.Process.Pid, nil
}

// demoTuneBundleConfig is demoTuneConfig for a gateway paired with the
// companion: loopback listeners on free ports, quick retries, a JSON log.
func demoTuneBundleConfig(cfgPath string) error {
	b, err := os.ReadFile(cfgPath)
	if err != nil {
		return err
	}
	var cfg map[string]any
	if err := yaml.Unmarshal(b, &cfg); err != nil {
		return fmt.Errorf("read %s: %w", cfgPath, err)
	}
	section := func(m map[string]any, name string) map[string]any {
		s, ok := m[name].(map[string]any)
		if !ok {
			s = map[string]any{}
			m[name] = s
		}
		return s
	}
	if src, _ := section(cfg, "policy")["source"].(string); src != "bundle" {
		return fmt.Errorf("%s: policy.source is %q, not bundle: pair did not find the companion", cfgPath, src)
	}
	section(section(cfg, "mqtt"), "embedded")["listen"] = "127.0.0.1:0"
	up := section(cfg, "uplink")
	up["min_backoff"], up["max_backoff"] = "100ms", "2s"
	section(cfg, "metrics")["listen"] = "127.0.0.1:0"
	section(cfg, "log")["format"] = "json"
	nb, err := yaml.Marshal(cfg)
	if err != nil {
		return err
	}
	return os.WriteFile(cfgPath, nb, 0o600)
}

var devicesOfPolicy = regexp.MustCompile(`, (\d+) devices`)

// waitApplied waits for the gateway to apply a policy with want devices
// and returns when it saw it.
func waitApplied(applied <-chan string, want int, timeout time.Duration) (string, time.Time, error) {
	deadline := time.After(timeout)
	for {
		select {
		case pol := <-applied:
			if m := devicesOfPolicy.FindStringSubmatch(pol); m != nil {
				if n, _ := strconv.Atoi(m[1]); n == want {
					return pol, time.Now(), nil
				}
			}
		case <-deadline:
			return "", time.Time{}, fmt.Errorf("no policy with %d device(s) applied within %s", want, timeout)
		}
	}
}

// runCompanionPart is the demo's companion part (see the constants).
// clientSecret is the secret of companionPlatformClient.
func runCompanionPart(ctx context.Context, bin, centralBin string, sim *centralsim.Server, clientSecret, work string, out *lineWriter) (companionOutcome, error) {
	var res companionOutcome
	out.printf("")
	out.printf("━━ The companion: signed policy pushed live ━━")
	f, err := writeCompanionFiles(sim, filepath.Join(work, "central"), clientSecret)
	if err != nil {
		return res, err
	}
	stopCentral, pid, err := startCompanion(ctx, centralBin, f)
	if err != nil {
		return res, err
	}
	defer stopCentral()
	out.printf("▶ edgegate-central serve (pid %d): API %s, push broker %s, embedded badger store, reads the platform as %s (RootAdmin)",
		pid, f.apiURL, f.pushURL, companionAdmin)

	// A second gateway, paired with the companion: bundle mode.
	gwDir := filepath.Join(work, companionGateway)
	cfgPath := filepath.Join(gwDir, "edgegate.yaml")
	stateDir := filepath.Join(gwDir, "state")
	if err := os.MkdirAll(gwDir, 0o700); err != nil {
		return res, err
	}
	args := []string{"--central", sim.URL(), "--companion", f.apiURL, "--push-url", f.pushURL, "--ca", f.gatewayCA,
		"--config", cfgPath, "--state-dir", stateDir, "--store-key-file", filepath.Join(stateDir, "store.key"),
		"--gateway-id", companionGateway, "--no-qr"}
	out.printf("▶ edgegate pair --central %s --companion %s --push-url %s --gateway-id %s", sim.URL(), f.apiURL, f.pushURL, companionGateway)
	if err := pairApproving(ctx, bin, sim, args, out); err != nil {
		return res, err
	}
	if err := demoTuneBundleConfig(cfgPath); err != nil {
		return res, err
	}

	// alice registers a device on this gateway the stock way (device.php
	// insert with edgegateway_uri edgegate://gw-demo-02/mqtt).
	keysFile := filepath.Join(gwDir, companionDevice+".keys")
	add := []string{"device", "add", "--config", cfgPath, "--type", "TemperatureSensor",
		"--attr", "temperature:float:temperature:°C", "--mqtt", "--keys-out", keysFile, companionDevice}
	var aout, aerr testkit.Buffer
	if err := runEdgegate(ctx, bin, add, &aout, &aerr); err != nil {
		return res, fmt.Errorf("edgegate device add %s: %w\n%s%s", companionDevice, err, aout.String(), aerr.String())
	}
	out.printf("▶ edgegate device add --type TemperatureSensor --mqtt %s (alice registers it at the IoT Directory, bound to %s)", companionDevice, companionGateway)
	printIndented(out, aout.String())
	kb, err := os.ReadFile(keysFile)
	if err != nil {
		return res, err
	}
	var keys struct{ K1, K2 string }
	if err := yaml.Unmarshal(kb, &keys); err != nil || keys.K1 == "" {
		return res, fmt.Errorf("%s: no k1/k2 (%v)", keysFile, err)
	}

	// The gateway daemon in bundle mode.
	cmd := exec.Command(bin, "run", "--config", cfgPath)
	logs, err := cmd.StderrPipe()
	if err != nil {
		return res, err
	}
	if err := cmd.Start(); err != nil {
		return res, fmt.Errorf("start the second daemon: %w", err)
	}
	exited := make(chan error, 1)
	ready := make(chan string, 1)
	applied := make(chan string, 16)
	logDone := make(chan struct{})
	go func() {
		defer close(logDone)
		followDaemonLog(logs, filepath.Join(gwDir, "daemon.log"), out, ready, applied)
		exited <- cmd.Wait()
	}()
	stopDaemon := sync.OnceValue(func() error {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-exited:
			return err
		case <-time.After(30 * time.Second):
			_ = cmd.Process.Kill()
			return errors.New("did not stop within 30s of SIGTERM; killed")
		}
	})
	defer func() { _ = stopDaemon(); <-logDone }()
	var mqttAddr string
	select {
	case mqttAddr = <-ready:
	case err := <-exited:
		return res, fmt.Errorf("the second daemon exited before it was ready: %v", err)
	case <-time.After(30 * time.Second):
		return res, errors.New("the second daemon did not become ready within 30s")
	}
	out.printf("▶ edgegate daemon (pid %d) for %s ready in bundle mode, local MQTT broker on %s", cmd.Process.Pid, companionGateway, mqttAddr)

	push := func() (time.Time, error) {
		start := time.Now()
		var pout, perr testkit.Buffer
		err := runEdgegate(ctx, centralBin, []string{"push", "--config", f.config, "--gateway", companionGateway}, &pout, &perr)
		out.printf("▶ edgegate-central push --gateway %s", companionGateway)
		printIndented(out, pout.String()+perr.String())
		return start, err
	}
	if _, err := push(); err != nil {
		return res, err
	}
	pol, _, err := waitApplied(applied, 1, 15*time.Second)
	if err != nil {
		return res, fmt.Errorf("%s after the push: %w", companionGateway, err)
	}
	out.printf("▶ %s applied the signed bundle: %s", companionGateway, pol)

	// The device publishes every 250 ms; its connection loss is timed.
	pw, _ := envelope.DeriveMQTTPassword(companionDevice, keys.K1, keys.K2)
	lost := make(chan time.Time, 1)
	opts := paho.NewClientOptions().AddBroker("tcp://" + mqttAddr).SetClientID("demo-" + companionDevice).
		SetUsername(companionDevice).SetPassword(pw).SetConnectTimeout(5 * time.Second).SetAutoReconnect(false).
		SetConnectionLostHandler(func(paho.Client, error) {
			select {
			case lost <- time.Now():
			default:
			}
		})
	dev := paho.NewClient(opts)
	if t := dev.Connect(); !t.WaitTimeout(10*time.Second) || t.Error() != nil {
		return res, fmt.Errorf("%s could not log in to %s's broker: %v", companionDevice, companionGateway, t.Error())
	}
	pubCtx, stopPub := context.WithCancel(ctx)
	pubDone := make(chan struct{})
	go func() {
		defer close(pubDone)
		tick := time.NewTicker(250 * time.Millisecond)
		defer tick.Stop()
		for i := 0; ; i++ {
			body := fmt.Sprintf(`{"temperature": %.1f}`, 18+float64(i%10)/10)
			dev.Publish("devices/"+companionDevice+"/telemetry", 1, false, body).WaitTimeout(2 * time.Second)
			select {
			case <-pubCtx.Done():
				return
			case <-tick.C:
			}
		}
	}()
	defer func() { stopPub(); <-pubDone; dev.Disconnect(100) }()
	atBroker := func() int {
		n := 0
		for _, u := range sim.Updates() {
			if u.Device == companionDevice && !u.Duplicate {
				n++
			}
		}
		return n
	}
	if !testkit.Poll(15*time.Second, func() bool { return atBroker() >= 3 }) {
		return res, fmt.Errorf("%s: nothing delivered within 15s", companionDevice)
	}
	res.delivered = atBroker()
	out.printf("▶ %s publishes every 250 ms; %d readings at the broker, signed", companionDevice, res.delivered)

	// The ownership change: alice's device is deleted at the platform
	// (IoT Directory delete: its ownership row ends). The gateway still
	// holds a valid bundle that lists it; only a push takes it away before
	// the next poll.
	sim.RemoveDevice(companionDevice)
	out.printf("▶ at the platform: %s deleted (its ownership row ends); the gateway's bundle still lists it", companionDevice)
	start, err := push()
	if err != nil {
		return res, err
	}
	pol, appliedAt, err := waitApplied(applied, 0, 15*time.Second)
	if err != nil {
		return res, fmt.Errorf("%s after the revocation's push: %w", companionGateway, err)
	}
	res.pushToApplied = appliedAt.Sub(start)
	out.printf("▶ %s applied %s, %s after the push command started", companionGateway, pol, res.pushToApplied.Round(time.Millisecond))
	var lostAt time.Time
	select {
	case lostAt = <-lost:
	case <-time.After(10 * time.Second):
		res.problems = append(res.problems, companionDevice+": its connection was not closed after the revocation")
	}
	stopPub()
	<-pubDone
	// Its next login is refused: the gateway no longer knows the device.
	again := paho.NewClient(opts.SetClientID("demo-" + companionDevice + "-again"))
	t := again.Connect()
	t.WaitTimeout(10 * time.Second)
	if t.Error() == nil {
		again.Disconnect(100)
		res.problems = append(res.problems, companionDevice+": login accepted after the revocation")
	} else if !lostAt.IsZero() {
		res.pushToRefused = lostAt.Sub(start)
		out.printf("▶ %s: connection closed by the gateway %s after the push; its next login refused (%v)",
			companionDevice, res.pushToRefused.Round(time.Millisecond), t.Error())
	}
	// What the gateway acknowledged before the cut-off may still drain
	// (and be refused by the filter: the entity is gone too); nothing the
	// device sent after it was accepted.
	if !lostAt.IsZero() {
		for _, u := range sim.Updates() {
			if u.Device == companionDevice && !u.Duplicate && u.Time.After(lostAt.Add(time.Second)) {
				res.afterRefusal++
			}
		}
	}
	return res, nil
}

// companionSummary prints the companion part's table and returns what
// differs from the expected outcome.
func companionSummary(w io.Writer, res companionOutcome) []string {
	problems := append([]string{}, res.problems...)
	fmt.Fprintf(w, "\nSummary of the live push (edgegate-central, embedded store and broker; gateway %s in bundle mode)\n", companionGateway)
	tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "  step\tresult")
	fmt.Fprintf(tw, "  %s before the change\t%d readings delivered, signed\n", companionDevice, res.delivered)
	fmt.Fprintf(tw, "  push → policy applied at the gateway\t%s\n", fmtDur(res.pushToApplied))
	fmt.Fprintf(tw, "  push → device cut off, next login refused\t%s\n", fmtDur(res.pushToRefused))
	fmt.Fprintf(tw, "  %s readings at the broker after that\t%d\n", companionDevice, res.afterRefusal)
	tw.Flush()
	switch {
	case res.delivered == 0:
		problems = append(problems, companionDevice+": nothing delivered before the change")
	case res.pushToApplied <= 0 || res.pushToApplied > 10*time.Second:
		problems = append(problems, fmt.Sprintf("push → applied took %s, want within seconds", res.pushToApplied))
	case res.pushToRefused <= 0:
		problems = append(problems, companionDevice+": not refused after the push")
	case res.afterRefusal > 0:
		problems = append(problems, fmt.Sprintf("%s: %d readings reached the broker after it was refused", companionDevice, res.afterRefusal))
	}
	return problems
}

func fmtDur(d time.Duration) string {
	if d <= 0 {
		return "-"
	}
	return d.Round(time.Millisecond).String()
}

// randomHex returns n random bytes, hex-encoded: demo passwords and ids.
func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}
