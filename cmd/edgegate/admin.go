package main

// The administration commands, clients of the daemon's admin socket:
//
//	edgegate status [--json] [--socket PATH]
//	edgegate doctor [--socket PATH] [--config FILE] [--unit PATH]
//	edgegate data export --device ID | --owner USER [--output FILE] [--socket PATH]
//	edgegate data erase --device ID | --owner USER [--yes] [--socket PATH]
//	edgegate factory-reset [--yes] [--socket PATH]

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/edgegate/edgegate/internal/admin"
	"github.com/edgegate/edgegate/internal/config"
	"github.com/edgegate/edgegate/internal/daemon"
)

const adminUsage = `usage:
  edgegate status [--json] [--socket PATH]
  edgegate doctor [--socket PATH] [--config FILE] [--unit PATH]
  edgegate data export --device ID | --owner USER [--output FILE] [--socket PATH]
  edgegate data erase --device ID | --owner USER [--yes] [--socket PATH]
  edgegate factory-reset [--yes] [--socket PATH]
`

// adminError turns a client error into a message that says what to do.
func adminError(err error, socket string) error {
	switch {
	case errors.Is(err, admin.ErrForbidden):
		return fmt.Errorf("%w\n  run it as root, or join the group %s: sudo usermod -aG %s $USER (then log in again)",
			err, admin.Group, admin.Group)
	case errors.Is(err, admin.ErrUnavailable):
		return fmt.Errorf("%w\n  is it running? systemctl status edgegate (socket %s; --socket to use another)", err, socket)
	}
	return err
}

func runStatus(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	fs.SetOutput(stderr)
	asJSON := fs.Bool("json", false, "print the status as JSON (for scripts)")
	socket := fs.String("socket", admin.DefaultSocket, "the daemon's admin socket")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return &exitError{Code: 2, Err: fmt.Errorf("status takes no arguments: %q", fs.Args())}
	}
	c := admin.NewClient(*socket)
	defer c.CloseIdle()
	st, err := c.Status(ctx)
	if err != nil {
		return adminError(err, *socket)
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(st)
	}
	return admin.WriteStatus(stdout, st)
}

// selectorFlags adds --device and --owner to fs.
func selectorFlags(fs *flag.FlagSet) *admin.Selector {
	var sel admin.Selector
	fs.StringVar(&sel.Device, "device", "", "the device id")
	fs.StringVar(&sel.Owner, "owner", "", "every device of this owner (user name)")
	return &sel
}

func runData(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, adminUsage)
		//lint:ignore ST1005 the "..." is part of the usage line, not punctuation
		return &exitError{Code: 2, Err: errors.New("usage: edgegate data export|erase ...")}
	}
	switch args[0] {
	case "export":
		return runDataExport(ctx, args[1:], stdout, stderr)
	case "erase":
		return runDataErase(ctx, args[1:], stdin, stdout, stderr)
	}
	return &exitError{Code: 2, Err: fmt.Errorf("unknown data command %q (export, erase)", args[0])}
}

func runDataExport(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("data export", flag.ContinueOnError)
	fs.SetOutput(stderr)
	sel := selectorFlags(fs)
	output := fs.String("output", "", "write to FILE (created, mode 0600) instead of standard output")
	socket := fs.String("socket", admin.DefaultSocket, "the daemon's admin socket")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if err := sel.Validate(); err != nil {
		return &exitError{Code: 2, Err: err}
	}
	var out io.Writer = stdout
	var file *os.File
	if *output != "" {
		// Personal data: private, and never over an existing file.
		f, err := os.OpenFile(*output, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return fmt.Errorf("create --output: %w", err)
		}
		file, out = f, f
	}
	// The bar goes to stderr only when a person watches it there and the
	// data itself does not go to the same terminal.
	var bar *progress
	if isTerminal(stderr) && (file != nil || !isTerminal(stdout)) {
		bar = newProgress(stderr, "exporting "+sel.String())
		out = io.MultiWriter(out, bar)
	}
	c := admin.NewClient(*socket)
	defer c.CloseIdle()
	rep, err := c.Export(ctx, *sel, out)
	if bar != nil {
		bar.done()
	}
	if file != nil {
		if cerr := file.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			os.Remove(*output) // an incomplete export is not an export
		}
	}
	if err != nil {
		return adminError(err, *socket)
	}
	dest := "standard output"
	if file != nil {
		dest = *output
	}
	fmt.Fprintf(stderr, "exported %s of %s (%s) to %s\n", admin.Count(rep.Records)+" records",
		admin.Plural(len(rep.Devices), "device", "devices"), strings.Join(rep.Devices, ", "), dest)
	return nil
}

func runDataErase(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("data erase", flag.ContinueOnError)
	fs.SetOutput(stderr)
	sel := selectorFlags(fs)
	yes := fs.Bool("yes", false, "do not ask for confirmation")
	socket := fs.String("socket", admin.DefaultSocket, "the daemon's admin socket")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if err := sel.Validate(); err != nil {
		return &exitError{Code: 2, Err: err}
	}
	if !*yes {
		id := sel.Device + sel.Owner
		fmt.Fprintf(stderr, "This erases everything the gateway holds for %s: queued readings, dead letters and\n"+
			"their encryption keys. It cannot be undone.\nType %q to confirm: ", sel, id)
		if !confirmed(stdin, id) {
			return &exitError{Code: 1, Err: errors.New("not confirmed; nothing erased")}
		}
	}
	c := admin.NewClient(*socket)
	defer c.CloseIdle()
	rep, err := c.Erase(ctx, *sel)
	if err != nil {
		return adminError(err, *socket)
	}
	if len(rep.Devices) == 0 {
		fmt.Fprintf(stdout, "nothing held for %s\n", sel)
		return nil
	}
	for _, d := range rep.Devices {
		fmt.Fprintf(stdout, "erased %s: %s, %s", d.Device,
			admin.Plural(d.Queued, "queued reading", "queued readings"), admin.Plural(d.DeadLetters, "dead letter", "dead letters"))
		if d.KeyDestroyed {
			fmt.Fprint(stdout, "; data key destroyed")
		}
		if d.Compacted {
			fmt.Fprint(stdout, "; store compacted")
		}
		fmt.Fprintln(stdout)
		if d.Unsealed > 0 {
			fmt.Fprintf(stdout, "  note: %s predate per-device keys: deleted, but old store files may hold them until compaction\n",
				admin.Plural(d.Unsealed, "reading", "readings"))
		}
	}
	return nil
}

func runFactoryReset(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("factory-reset", flag.ContinueOnError)
	fs.SetOutput(stderr)
	yes := fs.Bool("yes", false, "do not ask for confirmation")
	socket := fs.String("socket", admin.DefaultSocket, "the daemon's admin socket")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if !*yes {
		fmt.Fprint(stderr, "This erases every reading, key, policy and pairing of this gateway. It cannot be undone.\n"+
			"The policy's version floor is kept, so no older policy is accepted after it.\n"+
			"Type \"factory-reset\" to confirm: ")
		if !confirmed(stdin, "factory-reset") {
			return &exitError{Code: 1, Err: errors.New("not confirmed; nothing changed")}
		}
	}
	c := admin.NewClient(*socket)
	defer c.CloseIdle()
	if err := c.FactoryReset(ctx); err != nil {
		return adminError(err, *socket)
	}
	fmt.Fprintln(stdout, "factory reset done: the gateway holds no data and is no longer paired")
	return nil
}

// confirmed reads one line and compares it, trimmed, with want.
func confirmed(stdin io.Reader, want string) bool {
	line, err := bufio.NewReader(io.LimitReader(stdin, 4<<10)).ReadString('\n')
	if err != nil && line == "" {
		return false
	}
	return strings.TrimSpace(line) == want
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// progress is a one-line indeterminate progress bar (the total is unknown
// until the daemon's report): records and bytes so far, redrawn at most
// ten times a second.
type progress struct {
	w       io.Writer
	label   string
	records int
	bytes   int64
	last    time.Time
	tick    int
}

func newProgress(w io.Writer, label string) *progress { return &progress{w: w, label: label} }

func (p *progress) Write(b []byte) (int, error) {
	for _, c := range b {
		if c == '\n' {
			p.records++
		}
	}
	p.bytes += int64(len(b))
	if now := time.Now(); now.Sub(p.last) >= 100*time.Millisecond {
		p.last = now
		p.draw()
	}
	return len(b), nil
}

func (p *progress) draw() {
	const width = 12
	pos := p.tick % (2 * (width - 3))
	if pos >= width-3 {
		pos = 2*(width-3) - pos
	}
	p.tick++
	bar := strings.Repeat(" ", pos) + "<=>" + strings.Repeat(" ", width-3-pos)
	fmt.Fprintf(p.w, "\r%s [%s] %s records, %s\x1b[K", p.label, bar, admin.Count(p.records), admin.Bytes(p.bytes))
}

func (p *progress) done() { fmt.Fprint(p.w, "\r\x1b[K") }

// ---- doctor ----

// Check outcomes.
const (
	checkPass = "PASS"
	checkFail = "FAIL"
	checkSkip = "SKIP"
)

// checkResult is one line of the doctor's report.
type checkResult struct {
	Status string
	Detail string
	Fix    string // how to fix a failure
}

// doctorCheck is one named check; tests inject their own.
type doctorCheck struct {
	Name string
	Run  func(ctx context.Context, env *doctorEnv) checkResult
}

// doctorEnv is what the checks look at; every outside effect goes through
// it so tests can replace it.
type doctorEnv struct {
	cfg      *config.Config
	cfgPath  string
	cfgErr   error
	unit     string // "" = the installed unit, if any
	client   *admin.Client
	lookPath func(string) (string, error)
	command  func(ctx context.Context, name string, args ...string) ([]byte, error)
	getenv   func(string) string

	status    *admin.Status
	statusErr error
	fetched   bool
}

// daemonStatus fetches the status once for every check that needs it.
func (e *doctorEnv) daemonStatus(ctx context.Context) (*admin.Status, error) {
	if !e.fetched {
		e.fetched = true
		st, err := e.client.Status(ctx)
		if err == nil {
			e.status = &st
		}
		e.statusErr = err
	}
	return e.status, e.statusErr
}

func fail(detail, fix string) checkResult {
	return checkResult{Status: checkFail, Detail: detail, Fix: fix}
}
func pass(detail string) checkResult { return checkResult{Status: checkPass, Detail: detail} }
func skip(detail string) checkResult { return checkResult{Status: checkSkip, Detail: detail} }

func defaultDoctorChecks() []doctorCheck {
	return []doctorCheck{
		{"configuration", checkConfig},
		{"unit hardening", checkUnit},
		{"TLS trust", checkTLS},
		{"credentials", checkCredentials},
		{"store", checkStore},
		{"pairing", checkPairing},
		{"MQTT accounts", checkMQTTAccounts},
		{"clock sync", checkClock},
		{"free disk", checkDisk},
	}
}

func runDoctor(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("doctor", flag.ContinueOnError)
	fs.SetOutput(stderr)
	socket := fs.String("socket", admin.DefaultSocket, "the daemon's admin socket")
	cfgPath := fs.String("config", "/etc/edgegate/edgegate.yaml", "configuration file")
	unit := fs.String("unit", "", "systemd unit file to check (default: the installed edgegate.service)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	env := &doctorEnv{cfgPath: *cfgPath, unit: *unit, client: admin.NewClient(*socket),
		lookPath: exec.LookPath, getenv: os.Getenv,
		command: func(ctx context.Context, name string, args ...string) ([]byte, error) {
			ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			defer cancel()
			return exec.CommandContext(ctx, name, args...).CombinedOutput()
		}}
	defer env.client.CloseIdle()
	env.cfg, env.cfgErr = config.Load(*cfgPath)
	return doctor(ctx, env, defaultDoctorChecks(), stdout)
}

// doctor runs checks in order, prints one line each (and the fix under a
// failure), and fails when any check failed.
func doctor(ctx context.Context, env *doctorEnv, checks []doctorCheck, stdout io.Writer) error {
	width := 0
	for _, c := range checks {
		width = max(width, len(c.Name))
	}
	failed := 0
	for _, c := range checks {
		r := c.Run(ctx, env)
		if r.Status == "" {
			r.Status = checkFail
		}
		fmt.Fprintf(stdout, "%s  %-*s  %s\n", r.Status, width, c.Name, oneLineOf(r.Detail))
		if r.Status == checkFail {
			failed++
			prefix := "fix:"
			for l := range strings.SplitSeq(r.Fix, "\n") {
				if l != "" {
					fmt.Fprintf(stdout, "      %-*s  %-4s %s\n", width, "", prefix, l)
					prefix = ""
				}
			}
		}
	}
	if failed > 0 {
		return &exitError{Code: 1, Err: fmt.Errorf("%s failed", admin.Plural(failed, "check", "checks"))}
	}
	fmt.Fprintln(stdout, "all checks passed")
	return nil
}

func oneLineOf(s string) string {
	s = strings.Join(strings.Fields(s), " ")
	if len(s) > 160 {
		s = s[:157] + "..."
	}
	return s
}

func checkConfig(_ context.Context, env *doctorEnv) checkResult {
	if env.cfgErr != nil {
		return fail(env.cfgErr.Error(), "correct "+env.cfgPath+", then: edgegate config check --config "+env.cfgPath)
	}
	return pass(env.cfgPath + " is valid")
}

// unitPaths are where the package installs the unit.
var unitPaths = []string{"/etc/systemd/system/edgegate.service", "/lib/systemd/system/edgegate.service", "/usr/lib/systemd/system/edgegate.service"}

var exposureRE = regexp.MustCompile(`Overall exposure level for \S+: ([0-9.]+) (\S+)`)

// parseExposure reads systemd-analyze security's verdict.
func parseExposure(out string) (float64, string, error) {
	m := exposureRE.FindStringSubmatch(out)
	if m == nil {
		return 0, "", errors.New("no overall exposure level in the output")
	}
	v, err := strconv.ParseFloat(m[1], 64)
	return v, m[2], err
}

// maxExposure: systemd rates up to 4.9 "OK"; above that the unit has lost
// hardening that the packaged one has (it scores about 1.4).
const maxExposure = 4.9

func checkUnit(ctx context.Context, env *doctorEnv) checkResult {
	unit := env.unit
	if unit == "" {
		for _, p := range unitPaths {
			if _, err := os.Stat(p); err == nil {
				unit = p
				break
			}
		}
		if unit == "" {
			return skip("no installed edgegate.service (looked in /etc, /lib, /usr/lib); --unit FILE to check one")
		}
	} else if _, err := os.Stat(unit); err != nil {
		return fail(err.Error(), "give the path of the unit file: --unit /lib/systemd/system/edgegate.service")
	}
	if _, err := env.lookPath("systemd-analyze"); err != nil {
		return skip("systemd-analyze not installed")
	}
	out, err := env.command(ctx, "systemd-analyze", "security", "--offline=true", "--no-pager", unit)
	v, verdict, perr := parseExposure(string(out))
	if perr != nil {
		detail := perr.Error()
		if err != nil {
			detail = err.Error() + ": " + lastLine(string(out))
		}
		return fail(detail, "run: systemd-analyze security --offline=true "+unit)
	}
	if v > maxExposure {
		return fail(fmt.Sprintf("%s: exposure %.1f %s (the packaged unit scores about 1.4)", unit, v, verdict),
			"restore the hardening of the packaged unit (drop-ins in /etc/systemd/system/edgegate.service.d/ may weaken it);\n"+
				"see what is exposed: systemd-analyze security --offline=true "+unit)
	}
	return pass(fmt.Sprintf("%s: exposure %.1f %s", unit, v, verdict))
}

func lastLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		return s[i+1:]
	}
	return s
}

func checkTLS(ctx context.Context, env *doctorEnv) checkResult {
	if env.cfg == nil {
		return skip("no valid configuration")
	}
	u := env.cfg.Central.TokenURL
	if u == "" {
		return skip("central.token_url not set")
	}
	tcfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if ca := env.cfg.Central.CAFile; ca != "" {
		pem, err := os.ReadFile(ca)
		if err != nil {
			return fail(err.Error(), "central.ca_file must name a readable PEM file")
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return fail(ca+" holds no PEM certificate", "put the central service's CA certificate (PEM) in central.ca_file")
		}
		tcfg.RootCAs = pool
	}
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: tcfg, Proxy: http.ProxyFromEnvironment}}
	defer hc.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodHead, u, nil)
	if err != nil {
		return fail(err.Error(), "central.token_url must be an https URL")
	}
	resp, err := hc.Do(req)
	if err != nil {
		var ua x509.UnknownAuthorityError
		var hn x509.HostnameError
		var ci x509.CertificateInvalidError
		switch {
		case errors.As(err, &ua):
			return fail("the central service's certificate is not trusted: "+err.Error(),
				"set central.ca_file to the CA that issued it, or install that CA in the system store")
		case errors.As(err, &hn):
			return fail(err.Error(), "central.token_url must use the host name on the certificate")
		case errors.As(err, &ci):
			return fail(err.Error(), "the certificate is expired or not yet valid: check the clock (see clock sync), or renew it")
		}
		return fail(err.Error(), "check the network and central.token_url ("+u+")")
	}
	resp.Body.Close()
	// Any HTTP answer (405 to a HEAD on a token endpoint is normal) proves
	// the TLS handshake with the configured trust.
	return pass(fmt.Sprintf("%s answered HTTP %d over a trusted TLS connection", u, resp.StatusCode))
}

func checkCredentials(_ context.Context, env *doctorEnv) checkResult {
	if env.cfg == nil {
		return skip("no valid configuration")
	}
	var notes, problems, fixes []string
	private := func(what, path string, mask fs.FileMode) {
		if path == "" {
			return
		}
		st, err := os.Stat(path)
		if err != nil {
			problems = append(problems, fmt.Sprintf("%s: %v", what, err))
			fixes = append(fixes, fmt.Sprintf("create %s (%s) with mode 0600", path, what))
			return
		}
		if st.Mode().Perm()&mask != 0 {
			problems = append(problems, fmt.Sprintf("%s %s has mode %04o", what, path, st.Mode().Perm()))
			fixes = append(fixes, fmt.Sprintf("chmod 600 %s", path))
			return
		}
		notes = append(notes, fmt.Sprintf("%s %04o", what, st.Mode().Perm()))
	}
	private("client secret", env.cfg.Central.ClientSecretFile, 0o077)
	private("devices file", env.cfg.DevicesFile, 0o007)

	// The store key: a systemd credential in the credstore, else the key file.
	switch src := storeKeySource(env); {
	case strings.HasPrefix(src, "!"):
		problems = append(problems, src[1:])
		fixes = append(fixes, "chmod 600 "+env.cfg.KeyFile())
	default:
		notes = append(notes, "store key: "+src)
	}
	if len(problems) > 0 {
		return fail(strings.Join(problems, "; "), strings.Join(fixes, "\n"))
	}
	return pass(strings.Join(notes, ", "))
}

// storeKeySource says where the daemon will find its store key; a leading
// "!" marks a problem.
func storeKeySource(env *doctorEnv) string {
	if name := env.cfg.Store.Credential; name != "" {
		if d := env.getenv("CREDENTIALS_DIRECTORY"); d != "" {
			if _, err := os.Stat(d + "/" + name); err == nil {
				return "systemd credential " + name
			}
		}
		for _, dir := range []string{"/etc/credstore.encrypted", "/etc/credstore", "/run/credstore.encrypted", "/run/credstore"} {
			if _, err := os.Stat(dir + "/" + name); err == nil {
				return "systemd credential " + dir + "/" + name
			}
		}
	}
	kf := env.cfg.KeyFile()
	st, err := os.Stat(kf)
	if err != nil {
		return "key file " + kf + " (generated at first start)"
	}
	if st.Mode().Perm()&0o077 != 0 {
		return fmt.Sprintf("!store key file %s has mode %04o; the daemon refuses it", kf, st.Mode().Perm())
	}
	return "key file " + kf + " (0600)"
}

func checkStore(ctx context.Context, env *doctorEnv) checkResult {
	st, err := env.daemonStatus(ctx)
	if err != nil {
		fix := "start the daemon: systemctl start edgegate; its log: journalctl -u edgegate"
		if errors.Is(err, admin.ErrForbidden) {
			fix = "run doctor as root, or join the group " + admin.Group
		}
		return fail(err.Error(), fix)
	}
	q := st.Queue
	detail := fmt.Sprintf("daemon reachable; %s queued, %s dead letters, %s on disk", admin.Count(q.Depth),
		admin.Count(q.DeadLetters), admin.Bytes(q.DiskBytes))
	if q.QuotaBytes > 0 {
		detail += " of " + admin.Bytes(q.QuotaBytes)
		if q.DiskBytes >= q.QuotaBytes {
			return fail(detail+": quota reached, new readings are held",
				"restore the uplink so the backlog drains, or raise store.quota")
		}
	}
	return pass(detail)
}

func checkPairing(ctx context.Context, env *doctorEnv) checkResult {
	st, err := env.daemonStatus(ctx)
	if err != nil {
		return skip("daemon not reachable (see store)")
	}
	if !st.Paired {
		return fail("not paired with a central service", "pair it: edgegate pair --central URL")
	}
	return pass("paired as " + st.GatewayID)
}

// checkMQTTAccounts: in external mode, the broker's accounts and ACLs must
// be the gateway's (mqtt.external.accounts: dynsec) and match the policy;
// the daemon reads them back from Mosquitto for its status.
func checkMQTTAccounts(ctx context.Context, env *doctorEnv) checkResult {
	if env.cfg == nil {
		return skip("no valid configuration")
	}
	if env.cfg.MQTT.Mode != config.ModeExternal {
		return pass("the embedded broker enforces the ownership policy itself")
	}
	if env.cfg.MQTT.External.Accounts != config.AccountsDynsec {
		return fail("Mosquitto's accounts and ACLs are kept by hand: nothing ties them to the ownership policy",
			"set mqtt.external.accounts: dynsec and load Mosquitto's dynamic-security plugin\n"+
				"(see mqtt.external in the configuration template), then: systemctl restart edgegate")
	}
	st, err := env.daemonStatus(ctx)
	if err != nil {
		return skip("daemon not reachable: the broker's accounts cannot be compared with the policy")
	}
	for _, sg := range st.Stages {
		if sg.Name != daemon.AccountsStage {
			continue
		}
		if sg.Healthy {
			return pass(sg.Detail)
		}
		return fail("the broker's rules and the policy disagree: "+sg.Detail,
			"the daemon repairs them at the next policy change or within mqtt.external.accounts_interval;\n"+
				"if this persists, check that the admin account is a dynsec administrator: journalctl -u edgegate")
	}
	return fail("the daemon does not report the broker's accounts", "restart it after a configuration change: systemctl restart edgegate")
}

func checkClock(ctx context.Context, env *doctorEnv) checkResult {
	const fix = "enable time synchronisation: timedatectl set-ntp true (a Raspberry Pi has no real-time clock;\n" +
		"tokens, certificates and policy expiry depend on the time)"
	if _, err := env.lookPath("timedatectl"); err == nil {
		out, err := env.command(ctx, "timedatectl", "show", "-p", "NTPSynchronized", "--value")
		switch v := strings.TrimSpace(string(out)); {
		case err == nil && v == "yes":
			return pass("synchronised (timedatectl)")
		case err == nil && v == "no":
			return fail("not synchronised (timedatectl)", fix)
		}
		// timedated not reachable (no systemd, a container): ask the kernel.
	}
	var tx unix.Timex
	state, err := unix.Adjtimex(&tx)
	if err != nil {
		return skip("cannot read the kernel clock state: " + err.Error())
	}
	if tx.Status&unix.STA_UNSYNC != 0 || state == unix.TIME_ERROR {
		return fail("the kernel reports the clock unsynchronised (adjtimex)", fix)
	}
	return pass("synchronised (adjtimex)")
}

// Free-disk thresholds of the state directory's file system.
const (
	minFreeRatio = 0.10
	minFreeBytes = 100 << 20
)

func checkDisk(_ context.Context, env *doctorEnv) checkResult {
	dir := "/var/lib/edgegate"
	if env.cfg != nil && env.cfg.StateDir != "" {
		dir = env.cfg.StateDir
	}
	var s unix.Statfs_t
	if err := unix.Statfs(dir, &s); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return skip(dir + " does not exist yet")
		}
		return fail(err.Error(), "check state_dir ("+dir+")")
	}
	free := int64(s.Bavail) * int64(s.Bsize)
	total := int64(s.Blocks) * int64(s.Bsize)
	return diskVerdict(dir, free, total)
}

func diskVerdict(dir string, free, total int64) checkResult {
	detail := fmt.Sprintf("%s: %s free of %s", dir, admin.Bytes(free), admin.Bytes(total))
	if total > 0 && (float64(free) < minFreeRatio*float64(total) || free < minFreeBytes) {
		return fail(detail, "free space on that file system (old logs: journalctl --vacuum-size=50M),\n"+
			"or lower store.quota so the queue stops before the disk is full")
	}
	return pass(detail)
}

// checkPlatformDevices lists the devices the platform gives the account
// that the running daemon cannot serve (no entity type anywhere, delegated
// without K1/K2), with the command that fixes each. Only the daemon knows
// them (from its last sync); without it, say so. They do not make the file
// invalid: the exit status stays 0.
func checkPlatformDevices(socket string, stdout io.Writer) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c := admin.NewClient(socket)
	defer c.CloseIdle()
	st, err := c.Status(ctx)
	if err != nil {
		fmt.Fprintf(stdout, "platform devices: not checked, the daemon is not reachable at %s (edgegate status lists devices it cannot serve)\n", socket)
		return
	}
	if len(st.Policy.Unusable) == 0 {
		fmt.Fprintln(stdout, "platform devices: every device of the last sync is served")
		return
	}
	fmt.Fprintf(stdout, "platform devices: %s not served:\n", admin.Plural(len(st.Policy.Unusable), "device", "devices"))
	for _, u := range st.Policy.Unusable {
		fmt.Fprintf(stdout, "!! %s: missing %s\n   fix: %s\n", u.ID, strings.Join(u.Missing, ", "), u.Fix)
	}
}
