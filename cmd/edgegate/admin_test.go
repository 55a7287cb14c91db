package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/admin"
	"github.com/edgegate/edgegate/internal/config"
	"github.com/edgegate/edgegate/internal/daemon"
	"github.com/edgegate/edgegate/internal/envelope"
	"github.com/edgegate/edgegate/internal/queue"
	"github.com/edgegate/edgegate/internal/reading"
)

type cliBackend struct {
	mu     sync.Mutex
	st     admin.Status
	lines  map[string][]string
	erased []string
	resets int
}

func (b *cliBackend) Status(context.Context) admin.Status { return b.st }

func (b *cliBackend) Export(_ context.Context, sel admin.Selector, w io.Writer) (admin.ExportReport, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	l, ok := b.lines[sel.Device]
	if !ok {
		return admin.ExportReport{}, admin.ErrNotFound
	}
	for _, s := range l {
		if _, err := io.WriteString(w, s+"\n"); err != nil {
			return admin.ExportReport{}, err
		}
	}
	return admin.ExportReport{Selector: sel, Devices: []string{sel.Device}, Records: len(l)}, nil
}

func (b *cliBackend) Erase(_ context.Context, sel admin.Selector) (admin.EraseReport, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	n := len(b.lines[sel.Device])
	delete(b.lines, sel.Device)
	b.erased = append(b.erased, sel.Device)
	return admin.EraseReport{Selector: sel, Devices: []admin.DeviceErasure{
		{Device: sel.Device, Queued: n, DeadLetters: 1, KeyDestroyed: true, Compacted: true}}}, nil
}

func (b *cliBackend) FactoryReset(context.Context) error {
	b.mu.Lock()
	b.resets++
	b.mu.Unlock()
	return nil
}

func (b *cliBackend) Reload(context.Context) error { return nil }

func adminFixture(t *testing.T) (*cliBackend, string) {
	t.Helper()
	now := time.Now()
	be := &cliBackend{
		st: admin.Status{GatewayID: "gw-test", Version: "dev", Paired: false, Now: now,
			Policy: admin.PolicyStatus{Version: 3, Source: "pull", AppliedAt: now.Add(-90 * time.Second)},
			Stages: []admin.StageStatus{{Name: "local broker", Healthy: true, Detail: "127.0.0.1:1883"}},
			Queue: admin.QueueStatus{Depth: 2, DiskBytes: 3 << 20, QuotaBytes: 512 << 20,
				Brokers: []admin.BrokerQueue{{Broker: "https://b.example/v2", Depth: 2, Bytes: 800, Oldest: now.Add(-2 * time.Minute)}}},
			Devices: []admin.DeviceStatus{{ID: "th-kitchen", Owner: "alice", LastSeen: now.Add(-5 * time.Second), Ingested: 7}},
		},
		lines: map[string][]string{"th-kitchen": {`{"device":"th-kitchen","seq":1}`, `{"device":"th-kitchen","seq":2}`}},
	}
	sock := filepath.Join(t.TempDir(), "admin.sock")
	srv, err := admin.Listen(admin.ServerOptions{Socket: sock, Backend: be})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Error("admin server did not stop")
		}
	})
	return be, sock
}

func cliCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestRunStatusHumanAndJSON(t *testing.T) {
	_, sock := adminFixture(t)
	var out, errb bytes.Buffer
	if err := runStatus(cliCtx(t), []string{"--socket", sock}, &out, &errb); err != nil {
		t.Fatalf("runStatus = %v (%s)", err, errb.String())
	}
	text := out.String()
	for _, want := range []string{
		"Gateway   gw-test (edgegate dev)",
		"!! NOT PAIRED",
		"Policy    v3 from pull, applied 1m ago, no expiry",
		"ok  local broker  127.0.0.1:1883",
		"Queue  2 readings, 3.0 MiB on disk of 512.0 MiB (0%)",
		"https://b.example/v2  2  800 B  oldest 2m ago",
		"th-kitchen  alice  5s ago",
		"Commands  off (commands.enabled)",
		"!! 1 problem:",
		"not paired with the central service (run: edgegate pair)",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("status output lacks %q:\n%s", want, text)
		}
	}

	out.Reset()
	if err := runStatus(cliCtx(t), []string{"--json", "--socket", sock}, &out, &errb); err != nil {
		t.Fatal(err)
	}
	var st admin.Status
	if err := json.Unmarshal(out.Bytes(), &st); err != nil {
		t.Fatalf("--json output: %v\n%s", err, out.String())
	}
	if st.GatewayID != "gw-test" || st.Queue.Depth != 2 || st.Devices[0].ID != "th-kitchen" {
		t.Errorf("--json = %+v", st)
	}
}

func TestRunStatusWithoutDaemon(t *testing.T) {
	var out, errb bytes.Buffer
	err := runStatus(cliCtx(t), []string{"--socket", filepath.Join(t.TempDir(), "none.sock")}, &out, &errb)
	if !errors.Is(err, admin.ErrUnavailable) || !strings.Contains(err.Error(), "systemctl status edgegate") {
		t.Errorf("runStatus without daemon = %v", err)
	}
}

func TestRunDataExportAndErase(t *testing.T) {
	be, sock := adminFixture(t)
	file := filepath.Join(t.TempDir(), "export.ndjson")
	var out, errb bytes.Buffer
	err := runData(cliCtx(t), []string{"export", "--device", "th-kitchen", "--output", file, "--socket", sock}, nil, &out, &errb)
	if err != nil {
		t.Fatalf("export = %v (%s)", err, errb.String())
	}
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Count(string(b), "\n"); got != 2 || !strings.Contains(string(b), `"seq":2`) {
		t.Errorf("export file:\n%s", b)
	}
	if fi, _ := os.Stat(file); fi.Mode().Perm() != 0o600 {
		t.Errorf("export file mode = %04o, want 0600", fi.Mode().Perm())
	}
	if !strings.Contains(errb.String(), "exported 2 records of 1 device (th-kitchen) to "+file) {
		t.Errorf("export summary = %q", errb.String())
	}
	// Never over an existing file.
	if err := runData(cliCtx(t), []string{"export", "--device", "th-kitchen", "--output", file, "--socket", sock}, nil, &out, &errb); err == nil {
		t.Error("export over an existing file = nil")
	}
	// To stdout; bad selectors are usage errors.
	out.Reset()
	if err := runData(cliCtx(t), []string{"export", "--device", "th-kitchen", "--socket", sock}, nil, &out, &errb); err != nil || strings.Count(out.String(), "\n") != 2 {
		t.Errorf("export to stdout = %v, %q", err, out.String())
	}
	var ee *exitError
	if err := runData(cliCtx(t), []string{"export", "--socket", sock}, nil, &out, &errb); !errors.As(err, &ee) || ee.Code != 2 {
		t.Errorf("export without selector = %v", err)
	}

	// Erase: a wrong confirmation erases nothing.
	out.Reset()
	errb.Reset()
	err = runData(cliCtx(t), []string{"erase", "--device", "th-kitchen", "--socket", sock}, strings.NewReader("th-kitche\n"), &out, &errb)
	if err == nil || len(be.erased) != 0 {
		t.Errorf("erase with a wrong confirmation = %v, erased %v", err, be.erased)
	}
	if !strings.Contains(errb.String(), `Type "th-kitchen" to confirm`) {
		t.Errorf("prompt = %q", errb.String())
	}
	err = runData(cliCtx(t), []string{"erase", "--device", "th-kitchen", "--socket", sock}, strings.NewReader("th-kitchen\n"), &out, &errb)
	if err != nil {
		t.Fatalf("erase = %v", err)
	}
	if want := "erased th-kitchen: 2 queued readings, 1 dead letter; data key destroyed; store compacted\n"; out.String() != want {
		t.Errorf("erase output = %q, want %q", out.String(), want)
	}
	out.Reset()
	if err := runData(cliCtx(t), []string{"erase", "--device", "th-garden", "--yes", "--socket", sock}, strings.NewReader(""), &out, &errb); err != nil {
		t.Errorf("erase --yes = %v", err)
	}
	if len(be.erased) != 2 {
		t.Errorf("erased = %v", be.erased)
	}
}

func TestRunFactoryReset(t *testing.T) {
	be, sock := adminFixture(t)
	var out, errb bytes.Buffer
	if err := runFactoryReset(cliCtx(t), []string{"--socket", sock}, strings.NewReader("yes\n"), &out, &errb); err == nil || be.resets != 0 {
		t.Errorf("factory-reset confirmed with yes = %v, resets %d", err, be.resets)
	}
	if err := runFactoryReset(cliCtx(t), []string{"--socket", sock}, strings.NewReader("factory-reset\n"), &out, &errb); err != nil || be.resets != 1 {
		t.Errorf("factory-reset = %v, resets %d", err, be.resets)
	}
}

func TestDoctorReportsFailuresWithFixes(t *testing.T) {
	checks := []doctorCheck{
		{"first", func(context.Context, *doctorEnv) checkResult { return pass("fine") }},
		{"skipped one", func(context.Context, *doctorEnv) checkResult { return skip("not installed") }},
		{"broken", func(context.Context, *doctorEnv) checkResult {
			return fail("the widget is off", "turn it on:\nwidget --on")
		}},
	}
	var out bytes.Buffer
	err := doctor(context.Background(), &doctorEnv{}, checks, &out)
	var ee *exitError
	if !errors.As(err, &ee) || ee.Code != 1 || !strings.Contains(err.Error(), "1 check failed") {
		t.Errorf("doctor with a failing check = %v", err)
	}
	text := out.String()
	for _, want := range []string{
		"PASS  first        fine\n",
		"SKIP  skipped one  not installed\n",
		"FAIL  broken       the widget is off\n",
		"                   fix: turn it on:\n",
		"                        widget --on\n",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("doctor output lacks %q:\n%s", want, text)
		}
	}

	out.Reset()
	if err := doctor(context.Background(), &doctorEnv{}, checks[:2], &out); err != nil {
		t.Errorf("doctor with pass and skip = %v, want nil", err)
	}
	if !strings.Contains(out.String(), "all checks passed") {
		t.Errorf("output = %q", out.String())
	}
}

// TestDoctorDefaultChecksInjected runs the real checks against a fake
// environment: no config, no daemon, commands answered by the test.
func TestDoctorDefaultChecksInjected(t *testing.T) {
	unit := filepath.Join(t.TempDir(), "edgegate.service")
	if err := os.WriteFile(unit, []byte("[Service]\nExecStart=/bin/true\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	env := &doctorEnv{
		cfgPath: "/nonexistent/edgegate.yaml", cfgErr: errors.New("open /nonexistent/edgegate.yaml: no such file"),
		unit: unit, client: admin.NewClient(filepath.Join(t.TempDir(), "none.sock")), getenv: func(string) string { return "" },
		lookPath: func(name string) (string, error) { return "/usr/bin/" + name, nil },
		command: func(_ context.Context, name string, args ...string) ([]byte, error) {
			switch name {
			case "systemd-analyze":
				return []byte("✗ PrivateNetwork= ...\n→ Overall exposure level for edgegate.service: 9.6 UNSAFE 😨\n"), nil
			case "timedatectl":
				return []byte("no\n"), nil
			}
			return nil, fmt.Errorf("unexpected command %s", name)
		},
	}
	var out bytes.Buffer
	err := doctor(context.Background(), env, defaultDoctorChecks(), &out)
	if err == nil {
		t.Fatal("doctor = nil, want failures")
	}
	text := out.String()
	t.Log("\n" + text)
	for _, want := range []string{
		"FAIL  configuration ",
		"fix: correct /nonexistent/edgegate.yaml",
		"FAIL  unit hardening  " + unit + ": exposure 9.6 UNSAFE",
		"SKIP  TLS trust       no valid configuration",
		"FAIL  store ",
		"fix: start the daemon: systemctl start edgegate",
		"SKIP  pairing ",
		"FAIL  clock sync      not synchronised (timedatectl)",
		"fix: enable time synchronisation: timedatectl set-ntp true",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("doctor output lacks %q", want)
		}
	}
}

func TestParseExposure(t *testing.T) {
	v, verdict, err := parseExposure("  ✓ UMask= ...\n\n→ Overall exposure level for edgegate.service: 1.4 OK 🙂\n")
	if err != nil || v != 1.4 || verdict != "OK" {
		t.Errorf("parseExposure = %v %q %v", v, verdict, err)
	}
	if _, _, err := parseExposure("Failed to open unit"); err == nil {
		t.Error("parseExposure(garbage) = nil error")
	}
}

func TestDiskVerdict(t *testing.T) {
	for _, tt := range []struct {
		free, total int64
		want        string
	}{
		{50 << 30, 100 << 30, checkPass},
		{5 << 30, 100 << 30, checkFail},  // under 10%
		{90 << 20, 200 << 20, checkFail}, // under 100 MB
		{150 << 20, 1 << 30, checkPass},
	} {
		if got := diskVerdict("/var/lib/edgegate", tt.free, tt.total); got.Status != tt.want {
			t.Errorf("diskVerdict(%d, %d) = %s, want %s", tt.free, tt.total, got.Status, tt.want)
		}
	}
}

// queueBackend is the admin Backend the daemon builds, reduced to the
// store: selector -> devices -> queue.
type queueBackend struct {
	cliBackend
	q *queue.Queue
}

func (b *queueBackend) Export(ctx context.Context, sel admin.Selector, w io.Writer) (admin.ExportReport, error) {
	n, err := b.q.ExportNDJSON(ctx, sel.Device, w)
	return admin.ExportReport{Selector: sel, Devices: []string{sel.Device}, Records: n}, err
}

func (b *queueBackend) Erase(_ context.Context, sel admin.Selector) (admin.EraseReport, error) {
	r, err := b.q.EraseDevice(sel.Device)
	return admin.EraseReport{Selector: sel, Devices: []admin.DeviceErasure{{Device: r.Device, Queued: r.Queued,
		DeadLetters: r.DeadLetters, Unsealed: r.Unsealed, KeyDestroyed: r.KeyDestroyed, Compacted: r.Compacted}}}, err
}

// TestExportThroughSocketRoundTrips: what was appended to the queue comes
// back, decrypted, in the NDJSON of `edgegate data export`; after
// `edgegate data erase` nothing does.
func TestExportThroughSocketRoundTrips(t *testing.T) {
	q, err := queue.Open(queue.Options{Dir: t.TempDir(), Key: bytes.Repeat([]byte{9}, 32)})
	if err != nil {
		t.Fatal(err)
	}
	qctx, qcancel := context.WithCancel(context.Background())
	qdone := make(chan error, 1)
	go func() { qdone <- q.Run(qctx) }()
	defer func() {
		qcancel()
		<-qdone
		q.Close()
	}()
	const canary = "CANARY-export-4411"
	key, err := envelope.DeriveHS256("th-kitchen", "k1", "k2")
	if err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		_, err := q.Append(cliCtx(t), queue.Entry{Broker: "https://b.example/v2", Device: "th-kitchen", Type: "Sensor",
			Seal: func(seq uint64) ([]byte, error) {
				if i == 1 {
					// As the pipeline stores it: packed, the JWS once.
					r := reading.Reading{Device: "th-kitchen", Time: time.Now(), Attrs: []reading.Attribute{
						{Name: "note", Type: "Text", Value: canary}, {Name: "temperature", Type: "Number", Value: 21.0}}}
					c := envelope.ClaimsOf("gw", seq, &r)
					jws, err := envelope.Seal(key, c)
					if err != nil {
						return nil, err
					}
					return envelope.PackBody(c, jws, "")
				}
				return fmt.Appendf(nil, `{"temperature":{"type":"Number","value":%d},"note":{"value":%q}}`, 20+i, canary), nil
			}})
		if err != nil {
			t.Fatal(err)
		}
	}
	be := &queueBackend{q: q}
	sock := filepath.Join(t.TempDir(), "admin.sock")
	srv, err := admin.Listen(admin.ServerOptions{Socket: sock, Backend: be})
	if err != nil {
		t.Fatal(err)
	}
	sctx, scancel := context.WithCancel(context.Background())
	sdone := make(chan error, 1)
	go func() { sdone <- srv.Run(sctx) }()
	defer func() { scancel(); <-sdone }()

	var out, errb bytes.Buffer
	if err := runData(cliCtx(t), []string{"export", "--device", "th-kitchen", "--socket", sock}, nil, &out, &errb); err != nil {
		t.Fatalf("export = %v (%s)", err, errb.String())
	}
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 3 {
		t.Fatalf("export = %d lines:\n%s", len(lines), out.String())
	}
	for i, l := range lines {
		var r queue.ExportRecord
		if err := json.Unmarshal([]byte(l), &r); err != nil {
			t.Fatalf("line %d: %v", i, err)
		}
		if i == 1 {
			// The packed one is exported as the broker receives it.
			if _, err := envelope.VerifyAttrs(r.Body, key, ""); err != nil {
				t.Errorf("line %d: the exported body does not verify: %v (%s)", i, err, r.Body)
			}
		}
		if r.Kind != "queued" || r.Seq != uint64(i+1) || !strings.Contains(string(r.Body), canary) ||
			!strings.Contains(string(r.Body), fmt.Sprintf(`"value":%d`, 20+i)) {
			t.Errorf("line %d = %+v", i, r)
		}
	}
	out.Reset()
	if err := runData(cliCtx(t), []string{"erase", "--device", "th-kitchen", "--yes", "--socket", sock}, nil, &out, &errb); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "erased th-kitchen: 3 queued readings, 0 dead letters; data key destroyed; store compacted") {
		t.Errorf("erase output = %q", out.String())
	}
	out.Reset()
	if err := runData(cliCtx(t), []string{"export", "--device", "th-kitchen", "--socket", sock}, nil, &out, &errb); err != nil || out.Len() != 0 {
		t.Errorf("export after erase = %v, %q", err, out.String())
	}
}

// TestDoctorMQTTAccounts: doctor says when an external broker's rules and
// the policy disagree (the daemon's read-back), or when nothing ties them.
func TestDoctorMQTTAccounts(t *testing.T) {
	ext := func(accounts string) *config.Config {
		c := config.Default()
		c.MQTT.Mode = config.ModeExternal
		c.MQTT.External.Accounts = accounts
		return &c
	}
	withStatus := func(cfg *config.Config, stages ...admin.StageStatus) *doctorEnv {
		return &doctorEnv{cfg: cfg, fetched: true, status: &admin.Status{Stages: stages}}
	}
	emb := config.Default()
	for _, tt := range []struct {
		name string
		env  *doctorEnv
		want string
		text string
	}{
		{"embedded", withStatus(&emb), checkPass, "embedded broker"},
		{"by hand", withStatus(ext(config.AccountsNone)), checkFail, "kept by hand"},
		{"in line", withStatus(ext(config.AccountsDynsec), admin.StageStatus{Name: daemon.AccountsStage, Healthy: true, Detail: "in line with the policy (dynsec)"}), checkPass, "in line"},
		{"drift", withStatus(ext(config.AccountsDynsec), admin.StageStatus{Name: daemon.AccountsStage, Detail: "1 differences from the policy: device a2: role edgegate-dev-a2 has other ACLs than its own topic"}), checkFail, "disagree: 1 differences"},
		{"no daemon", &doctorEnv{cfg: ext(config.AccountsDynsec), fetched: true, statusErr: errors.New("no socket")}, checkSkip, "not reachable"},
	} {
		r := checkMQTTAccounts(context.Background(), tt.env)
		if r.Status != tt.want || !strings.Contains(r.Detail, tt.text) {
			t.Errorf("%s: %s %q, want %s with %q", tt.name, r.Status, r.Detail, tt.want, tt.text)
		}
	}
}
