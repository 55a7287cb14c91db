package admin

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/audit"
)

type fakeBackend struct {
	mu      sync.Mutex
	status  Status
	records map[string][]string // device -> NDJSON lines
	owners  map[string][]string // owner -> devices
	failAt  int                 // export fails after this many records (0: never)
	erased  []string
	resets  int
}

func (f *fakeBackend) Status(context.Context) Status { return f.status }

func (f *fakeBackend) devices(sel Selector) ([]string, error) {
	if sel.Device != "" {
		if _, ok := f.records[sel.Device]; !ok {
			return nil, fmt.Errorf("device %s: %w", sel.Device, ErrNotFound)
		}
		return []string{sel.Device}, nil
	}
	d, ok := f.owners[sel.Owner]
	if !ok {
		return nil, fmt.Errorf("owner %s: %w", sel.Owner, ErrNotFound)
	}
	return d, nil
}

func (f *fakeBackend) Export(_ context.Context, sel Selector, w io.Writer) (ExportReport, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	devs, err := f.devices(sel)
	if err != nil {
		return ExportReport{}, err
	}
	rep := ExportReport{Selector: sel, Devices: devs}
	for _, d := range devs {
		for _, l := range f.records[d] {
			if f.failAt > 0 && rep.Records == f.failAt {
				return rep, errors.New("store read failed")
			}
			if _, err := io.WriteString(w, l+"\n"); err != nil {
				return rep, err
			}
			rep.Records++
		}
	}
	return rep, nil
}

func (f *fakeBackend) Erase(_ context.Context, sel Selector) (EraseReport, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	devs, err := f.devices(sel)
	if err != nil {
		return EraseReport{}, err
	}
	rep := EraseReport{Selector: sel}
	for _, d := range devs {
		rep.Devices = append(rep.Devices, DeviceErasure{Device: d, Queued: len(f.records[d]), KeyDestroyed: true, Compacted: true})
		f.erased = append(f.erased, d)
		delete(f.records, d)
	}
	return rep, nil
}

func (f *fakeBackend) FactoryReset(context.Context) error {
	f.mu.Lock()
	f.resets++
	f.mu.Unlock()
	return nil
}

func (f *fakeBackend) Reload(context.Context) error { return nil }

type fakeAudit struct {
	mu     sync.Mutex
	events []audit.Event
}

func (a *fakeAudit) Record(_ context.Context, e audit.Event) {
	a.mu.Lock()
	a.events = append(a.events, e)
	a.mu.Unlock()
}

func (a *fakeAudit) kinds() []audit.Kind {
	a.mu.Lock()
	defer a.mu.Unlock()
	var out []audit.Kind
	for _, e := range a.events {
		out = append(out, e.Kind)
	}
	return out
}

var testNow = time.Date(2026, 3, 4, 12, 0, 0, 0, time.UTC)

func sampleStatus() Status {
	return Status{
		GatewayID: "gw-demo-01", Version: "1.4.0", IdentityThumbprint: "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs",
		Paired: true, Now: testNow,
		Policy: PolicyStatus{Version: 12, Source: "push", AppliedAt: testNow.Add(-3 * time.Minute),
			ExpiresAt:   testNow.Add(6*24*time.Hour + 23*time.Hour),
			LastRefusal: &Refusal{At: testNow.Add(-2 * time.Hour), Reason: "rollback", Version: 11}},
		Stages: []StageStatus{
			{Name: "radio /dev/ttyUSB0", Healthy: true, Detail: "mysensors, 115200 baud"},
			{Name: "local broker", Healthy: true, Detail: "127.0.0.1:1883"},
			{Name: "central connection", Healthy: false, Detail: "token fetch: 401"},
			{Name: "access token", Healthy: true, Expires: testNow.Add(20 * time.Minute)},
		},
		Queue: QueueStatus{Depth: 1234, DeadLetters: 3, DiskBytes: 12_900_000, QuotaBytes: 512 << 20,
			Brokers: []BrokerQueue{{Broker: "https://broker.a.example/v2", Depth: 1234, Bytes: 1_200_000, Oldest: testNow.Add(-3 * time.Hour)}}},
		Devices: []DeviceStatus{
			{ID: "th-kitchen", Owner: "alice", LastSeen: testNow.Add(-12 * time.Second), Ingested: 12345, Refused: 0},
			{ID: "meter-bob", Owner: "bob"},
		},
		PendingNodes: []RadioNode{{Port: "/dev/ttyUSB0", Node: 7, Children: []int{1, 2}, Sketch: "TempHum 1.0", LastSeen: testNow.Add(-5 * time.Minute)}},
	}
}

// serve starts a server on a socket in a fresh directory and returns a
// client for it.
func serve(t *testing.T, be Backend, opts ServerOptions) (*Client, *Server) {
	t.Helper()
	dir, err := os.MkdirTemp("", "edgegate-admin-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	opts.Backend = be
	if opts.Socket == "" {
		opts.Socket = filepath.Join(dir, "run", "admin.sock")
	}
	srv, err := Listen(opts)
	if err != nil {
		t.Fatalf("Listen = %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Run(ctx) }()
	c := NewClient(opts.Socket)
	t.Cleanup(func() {
		c.CloseIdle()
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run = %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Error("Run did not return")
		}
		if _, err := os.Stat(opts.Socket); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("socket left behind: %v", err)
		}
	})
	return c, srv
}

func tctx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestStatusRoundTrip(t *testing.T) {
	be := &fakeBackend{status: sampleStatus()}
	c, srv := serve(t, be, ServerOptions{})
	st, err := c.Status(tctx(t))
	if err != nil {
		t.Fatalf("Status = %v", err)
	}
	want := sampleStatus()
	want.fill()
	gj, _ := json.Marshal(st)
	wj, _ := json.Marshal(want)
	if !bytes.Equal(gj, wj) {
		t.Errorf("Status =\n%s\nwant\n%s", gj, wj)
	}
	if st.Policy.AgeSeconds != 180 || st.Queue.Brokers[0].OldestAgeSeconds != 3*3600 {
		t.Errorf("ages = %v, %v; want 180, 10800", st.Policy.AgeSeconds, st.Queue.Brokers[0].OldestAgeSeconds)
	}
	fi, err := os.Stat(srv.Addr())
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o660 {
		t.Errorf("socket mode = %v, want socket 0660", fi.Mode())
	}
	// JSON field names are the API.
	for _, k := range []string{`"gateway_id"`, `"identity_thumbprint"`, `"paired"`, `"applied_at"`, `"expires_at"`,
		`"age_seconds"`, `"last_refusal"`, `"stages"`, `"healthy"`, `"dead_letters"`, `"disk_bytes"`, `"quota_bytes"`,
		`"oldest_age_seconds"`, `"last_seen"`, `"ingested"`, `"refused"`, `"pending_radio_nodes"`, `"children"`, `"sketch"`} {
		if !bytes.Contains(gj, []byte(k)) {
			t.Errorf("status JSON lacks %s", k)
		}
	}
}

func TestWriteStatusReadsWell(t *testing.T) {
	var b strings.Builder
	if err := WriteStatus(&b, sampleStatus()); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	t.Log("\n" + out)
	lines := strings.Split(out, "\n")
	find := func(substr string) string {
		for _, l := range lines {
			if strings.Contains(l, substr) {
				return l
			}
		}
		t.Errorf("no line with %q in:\n%s", substr, out)
		return ""
	}
	checks := []struct{ line, want string }{
		{"Gateway", "gw-demo-01 (edgegate 1.4.0)"},
		{"Identity", "NzbLsXh8uDCcd-6M..., paired"},
		{"Policy", "v12 from push, applied 3m ago, expires in 6d 23h"},
		{"last refused", "2h ago: rollback (v11)"},
		{"central connection", "!! FAIL"},
		{"local broker", "ok"},
		{"access token", "expires in 20m"},
		{"Queue", "1,234 readings, 12.3 MiB on disk of 512.0 MiB (2%)"},
		{"broker.a.example", "oldest 3h ago"},
		{"th-kitchen", "12s ago"},
		{"th-kitchen", "12,345"},
		{"meter-bob", "never"},
		{"TempHum", "1,2"},
		{"3 problems", "!!"},
		{"   central connection unhealthy: token fetch: 401", "!!"},
		{"   3 dead letters", "!!"},
	}
	for _, c := range checks {
		if l := find(c.line); !strings.Contains(l, c.want) {
			t.Errorf("line %q lacks %q", l, c.want)
		}
	}
	if l := find("broker.a.example"); !strings.HasPrefix(l, "!!") {
		t.Errorf("a 3 h backlog is not marked: %q", l)
	}
	if l := find("local broker"); strings.Contains(l, "!!") {
		t.Errorf("a healthy stage is marked: %q", l)
	}
	// Columns line up: the device table's columns start at the same offset.
	h, d := find("LAST SEEN"), find("th-kitchen")
	if strings.Index(h, "OWNER") != strings.Index(d, "alice") {
		t.Errorf("device table not aligned:\n%s\n%s", h, d)
	}
	for _, l := range lines {
		if len(l) > 100 {
			t.Errorf("line longer than 100 columns: %q", l)
		}
	}

	healthy := sampleStatus()
	healthy.Stages[2].Healthy = true
	healthy.Queue.DeadLetters = 0
	healthy.Queue.Brokers[0].Oldest = testNow.Add(-time.Minute)
	b.Reset()
	_ = WriteStatus(&b, healthy)
	if !strings.Contains(b.String(), "No problems.") || strings.Contains(b.String(), "!!") {
		t.Errorf("healthy status:\n%s", b.String())
	}
}

func TestFormatHelpers(t *testing.T) {
	for _, tt := range []struct {
		got, want string
	}{
		{Ago(500 * time.Millisecond), "just now"},
		{Ago(42 * time.Second), "42s ago"},
		{Ago(3*time.Minute + 10*time.Second), "3m ago"},
		{Ago(65 * time.Minute), "1h 5m ago"},
		{Ago(50 * time.Hour), "2d 2h ago"},
		{Bytes(512), "512 B"},
		{Bytes(12_900_000), "12.3 MiB"},
		{Bytes(3 << 30), "3.0 GiB"},
		{Count(0), "0"},
		{Count(1234567), "1,234,567"},
	} {
		if tt.got != tt.want {
			t.Errorf("got %q, want %q", tt.got, tt.want)
		}
	}
}

func TestExportRoundTrip(t *testing.T) {
	be := &fakeBackend{
		records: map[string][]string{
			"th-kitchen": {`{"device":"th-kitchen","seq":1,"body":{"temperature":21.5}}`, `{"device":"th-kitchen","seq":2}`},
			"th-garden":  {`{"device":"th-garden","seq":1}`},
		},
		owners: map[string][]string{"alice": {"th-kitchen", "th-garden"}},
	}
	aud := &fakeAudit{}
	c, _ := serve(t, be, ServerOptions{Audit: aud})
	var buf bytes.Buffer
	rep, err := c.Export(tctx(t), Selector{Owner: "alice"}, &buf)
	if err != nil {
		t.Fatalf("Export = %v", err)
	}
	if rep.Records != 3 || !slices.Equal(rep.Devices, []string{"th-kitchen", "th-garden"}) {
		t.Errorf("report = %+v", rep)
	}
	text := buf.String()
	sc := bufio.NewScanner(strings.NewReader(text))
	var n int
	for sc.Scan() {
		var m map[string]any
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			t.Errorf("line %q: %v", sc.Text(), err)
		}
		n++
	}
	if n != 3 || !strings.Contains(text, `"temperature":21.5`) {
		t.Errorf("export = %d lines:\n%s", n, text)
	}
	if _, err := c.Export(tctx(t), Selector{Device: "nobody"}, io.Discard); !errors.Is(err, ErrNotFound) {
		t.Errorf("Export(nobody) = %v, want ErrNotFound", err)
	}
	if _, err := c.Export(tctx(t), Selector{Device: "a", Owner: "b"}, io.Discard); !errors.Is(err, ErrBadSelector) {
		t.Errorf("Export(both) = %v, want ErrBadSelector", err)
	}
	// A failure after the stream began reaches the client through the trailer.
	be.failAt = 1
	buf.Reset()
	if _, err := c.Export(tctx(t), Selector{Device: "th-kitchen"}, &buf); err == nil || !strings.Contains(err.Error(), "store read failed") {
		t.Errorf("Export with a failing store = %v", err)
	}
	if got := aud.kinds(); !slices.Contains(got, audit.Export) {
		t.Errorf("audited %v, want an export", got)
	}
}

func TestEraseAndFactoryReset(t *testing.T) {
	be := &fakeBackend{records: map[string][]string{"th-kitchen": {"{}", "{}"}}}
	aud := &fakeAudit{}
	c, srv := serve(t, be, ServerOptions{Audit: aud})
	rep, err := c.Erase(tctx(t), Selector{Device: "th-kitchen"})
	if err != nil {
		t.Fatalf("Erase = %v", err)
	}
	if len(rep.Devices) != 1 || rep.Devices[0].Queued != 2 || !rep.Devices[0].KeyDestroyed {
		t.Errorf("EraseReport = %+v", rep)
	}
	if err := c.FactoryReset(tctx(t)); err != nil {
		t.Fatal(err)
	}
	if be.resets != 1 {
		t.Errorf("resets = %d", be.resets)
	}
	// Without the confirmation body: refused.
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", srv.Addr())
	}}}
	defer hc.CloseIdleConnections()
	req, _ := http.NewRequestWithContext(tctx(t), http.MethodPost, "http://x/v1/factory-reset", strings.NewReader("{}"))
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest || be.resets != 1 {
		t.Errorf("unconfirmed factory reset = %d, resets %d", resp.StatusCode, be.resets)
	}
	if got := aud.kinds(); !slices.Equal(got, []audit.Kind{audit.Erase, audit.FactoryReset}) {
		t.Errorf("audited %v", got)
	}
}

func TestStaleAndLiveSocket(t *testing.T) {
	be := &fakeBackend{status: sampleStatus()}
	c, srv := serve(t, be, ServerOptions{})
	// A second daemon on the same socket is refused.
	if _, err := Listen(ServerOptions{Socket: srv.Addr(), Backend: be}); err == nil || !strings.Contains(err.Error(), "another") {
		t.Errorf("second Listen = %v", err)
	}
	if _, err := c.Status(tctx(t)); err != nil {
		t.Errorf("Status after refused second Listen = %v", err)
	}
	// A stale socket (nobody listening) is replaced.
	dir := t.TempDir()
	path := filepath.Join(dir, "admin.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false)
	ln.Close()
	s2, err := Listen(ServerOptions{Socket: path, Backend: be})
	if err != nil {
		t.Fatalf("Listen over a stale socket = %v", err)
	}
	s2.Close()
	// No daemon: a clear error.
	if _, err := NewClient(path).Status(tctx(t)); !errors.Is(err, ErrUnavailable) {
		t.Errorf("Status without daemon = %v, want ErrUnavailable", err)
	}
}

func TestAccess(t *testing.T) {
	a := Access{UIDs: []uint32{0, 998}, GID: 997, HasGID: true}
	for _, tt := range []struct {
		name string
		p    Peer
		want bool
	}{
		{"root", Peer{UID: 0, GID: 0}, true},
		{"daemon user", Peer{UID: 998, GID: 998}, true},
		{"primary group", Peer{UID: 1000, GID: 997}, true},
		{"supplementary group", Peer{UID: 1000, GID: 1000, Groups: []uint32{24, 997}}, true},
		{"other user", Peer{UID: 1000, GID: 1000, Groups: []uint32{24, 27}}, false},
		{"nobody", Peer{UID: 65534, GID: 65534}, false},
	} {
		if got := a.Allows(tt.p); got != tt.want {
			t.Errorf("Allows(%s) = %v, want %v", tt.name, got, tt.want)
		}
	}
	if (Access{UIDs: []uint32{0}}).Allows(Peer{UID: 5, GID: 0, Groups: []uint32{0}}) {
		t.Error("no group configured: gid 0 admitted")
	}
}

func TestParseStatusGroups(t *testing.T) {
	for _, tt := range []struct {
		in   string
		want []uint32
		ok   bool
	}{
		{"Name:\tbash\nUid:\t1000\t1000\t1000\t1000\nGroups:\t4 24 997 \nNgid:\t0\n", []uint32{4, 24, 997}, true},
		{"Name:\tx\nGroups:\t\n", []uint32{}, true},
		{"Name:\tx\n", nil, false},
		{"Groups:\t4 x\n", nil, false},
	} {
		got, err := parseStatusGroups(strings.NewReader(tt.in))
		if (err == nil) != tt.ok || !slices.Equal(got, tt.want) {
			t.Errorf("parseStatusGroups(%q) = %v, %v; want %v", tt.in, got, err, tt.want)
		}
	}
}

// TestPeerCredentials: the kernel's view of our own process.
func TestPeerCredentials(t *testing.T) {
	path := filepath.Join(t.TempDir(), "p.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	got := make(chan Peer, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			close(got)
			return
		}
		defer c.Close()
		p, err := peerOf(c)
		if err != nil {
			t.Error(err)
		}
		got <- p
	}()
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	select {
	case p := <-got:
		if p.UID != uint32(os.Getuid()) || p.GID != uint32(os.Getgid()) || p.PID != int32(os.Getpid()) {
			t.Errorf("peer = %+v, want uid %d gid %d pid %d", p, os.Getuid(), os.Getgid(), os.Getpid())
		}
		want, _ := os.Getgroups()
		for _, g := range want {
			if !slices.Contains(p.Groups, uint32(g)) {
				t.Errorf("peer groups %v lack %d", p.Groups, g)
			}
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no connection")
	}
}

const helperEnv = "EDGEGATE_ADMIN_HELPER_SOCKET"

// TestHelperPeer is the child of TestPeerNotAllowed: it asks for the
// status and prints the outcome.
func TestHelperPeer(t *testing.T) {
	sock := os.Getenv(helperEnv)
	if sock == "" {
		t.Skip("helper process for TestPeerNotAllowed")
	}
	_, err := NewClient(sock).Status(context.Background())
	switch {
	case errors.Is(err, ErrForbidden):
		fmt.Println("RESULT forbidden:", err)
	case err != nil:
		fmt.Println("RESULT error:", err)
	default:
		fmt.Println("RESULT allowed")
	}
}

// TestPeerNotAllowed runs the client as uid 65534 against a socket the
// kernel lets it connect to (mode opened up to 0666 for the test): the
// daemon's own check must refuse it with 403 and audit it.
func TestPeerNotAllowed(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root to run a client as another uid")
	}
	be := &fakeBackend{status: sampleStatus()}
	aud := &fakeAudit{}
	access := Access{UIDs: []uint32{0}}
	c, srv := serve(t, be, ServerOptions{Audit: aud, Access: &access})
	dir := filepath.Dir(srv.Addr())
	for _, p := range []string{filepath.Dir(dir), dir} {
		if err := os.Chmod(p, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chmod(srv.Addr(), 0o666); err != nil {
		t.Fatal(err)
	}
	// The test binary lives in a private build directory: copy it where
	// uid 65534 can run it.
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(filepath.Dir(dir), "admin.test")
	data, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, data, 0o755); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "-test.run=^TestHelperPeer$", "-test.v")
	cmd.Env = append(os.Environ(), helperEnv+"="+srv.Addr())
	cmd.Dir = filepath.Dir(dir)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534, Groups: []uint32{}}}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("helper: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "RESULT forbidden: permission denied: uid 65534") {
		t.Errorf("uid 65534 got:\n%s", out)
	}
	aud.mu.Lock()
	var denied []audit.Event
	for _, e := range aud.events {
		if e.Kind == audit.AdminDenied {
			denied = append(denied, e)
		}
	}
	aud.mu.Unlock()
	if len(denied) != 1 || denied[0].User != "uid=65534" || denied[0].Cause != "not_allowed" {
		t.Errorf("audited denials = %+v", denied)
	}
	// Root still gets in.
	if _, err := c.Status(tctx(t)); err != nil {
		t.Errorf("root Status = %v", err)
	}
}

// Attributes a device sends that its entity lacks (Orion 422
// PartialUpdate) are shown under the device table and as a problem.
func TestWriteStatusMissingAttributes(t *testing.T) {
	st := sampleStatus()
	st.Devices[0].MissingAttrs = []string{"rssi", "voltage"}
	var b strings.Builder
	if err := WriteStatus(&b, st); err != nil {
		t.Fatal(err)
	}
	want := "!! " + st.Devices[0].ID + ": not in its entity at the broker (not stored): rssi, voltage"
	if !strings.Contains(b.String(), want) {
		t.Errorf("status lacks %q:\n%s", want, b.String())
	}
	if !slices.ContainsFunc(Problems(st), func(p string) bool { return strings.Contains(p, "rssi, voltage") }) {
		t.Errorf("Problems = %q, want the missing attributes", Problems(st))
	}
}

// The commands line and one Modbus line per slave: counts by state, errors
// by cause, and a slave that never answered marked and listed as a problem.
func TestWriteStatusCommandsAndModbus(t *testing.T) {
	st := sampleStatus()
	var b strings.Builder
	if err := WriteStatus(&b, st); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(b.String(), "Commands  off (commands.enabled)") || strings.Contains(b.String(), "Modbus") {
		t.Errorf("commands off, no Modbus:\n%s", b.String())
	}
	st.Commands = CommandsStatus{Enabled: true, Pending: 1, Sent: 2, Confirmed: 7, Expired: 1, Dropped: 3, Learned: 14, SendErrors: 2}
	st.Modbus = []ModbusStatus{
		{Device: "meter-1", Line: "/dev/ttyRS485", Unit: 1, Polls: 1234, Writes: 2, Errors: map[string]uint64{"timeout": 3, "crc": 1},
			LastOK: testNow.Add(-5 * time.Second)},
		{Device: "meter-2", Line: "/dev/ttyRS485", Unit: 7, Errors: map[string]uint64{"timeout": 40}, LastError: "timeout after 500ms"},
	}
	b.Reset()
	if err := WriteStatus(&b, st); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	t.Log("\n" + out)
	line := func(substr string) string {
		for _, l := range strings.Split(out, "\n") {
			if strings.Contains(l, substr) {
				return l
			}
		}
		t.Errorf("no line with %q in:\n%s", substr, out)
		return ""
	}
	for _, c := range []struct{ line, want string }{
		{"Commands", "on: 1 pending, 2 sent, 0 delivered, 7 confirmed, 1 expired, 3 dropped"},
		{"since start", "14 learned, 2 send errors, 0 platform read errors"},
		{"Modbus", "(2)"},
		{"meter-1", "/dev/ttyRS485/1"},
		{"meter-1", "1,234"},
		{"meter-1", "crc 1, timeout 3"},
		{"meter-1", "5s ago"},
		{"meter-2", "timeout 40"},
		{"meter-2", "never"},
		{"   modbus device meter-2 (/dev/ttyRS485 unit 7) never answered: timeout after 500ms", "!!"},
	} {
		if l := line(c.line); !strings.Contains(l, c.want) {
			t.Errorf("line %q lacks %q", l, c.want)
		}
	}
	if l := line("meter-2"); !strings.HasPrefix(l, "!!") {
		t.Errorf("a slave that never answered is not marked: %q", l)
	}
	if l := line("meter-1"); strings.HasPrefix(l, "!!") {
		t.Errorf("a working slave is marked: %q", l)
	}
}
