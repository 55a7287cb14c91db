package audit

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

func readRecords(t *testing.T, path string) []map[string]any {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []map[string]any
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var m map[string]any
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			t.Fatalf("line %q: %v", sc.Text(), err)
		}
		out = append(out, m)
	}
	return out
}

func TestRecordWritesJSONLines(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "audit.log")
	var slogBuf bytes.Buffer
	l, err := New(Options{Path: path, Logger: slog.New(slog.NewJSONHandler(&slogBuf, nil))})
	if err != nil {
		t.Fatal(err)
	}
	l.Record(context.Background(), Event{Kind: Erase, Device: "th-kitchen", User: "uid=0", Detail: "3 queued, 1 dead letter"})
	l.Record(context.Background(), Event{Kind: UnknownDevice, Cause: "not_registered", Device: "rogue-7", Port: "/dev/ttyUSB0"})
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	recs := readRecords(t, path)
	if len(recs) != 2 {
		t.Fatalf("%d records, want 2", len(recs))
	}
	if recs[0]["kind"] != "erase" || recs[0]["device"] != "th-kitchen" || recs[0]["user"] != "uid=0" || recs[0]["time"] == nil {
		t.Errorf("record 0 = %v", recs[0])
	}
	if recs[1]["cause"] != "not_registered" || recs[1]["port"] != "/dev/ttyUSB0" {
		t.Errorf("record 1 = %v", recs[1])
	}
	if !strings.Contains(slogBuf.String(), `"kind":"unknown_device"`) {
		t.Errorf("slog output = %s", slogBuf.String())
	}
	st, _ := os.Stat(path)
	if st.Mode().Perm() != 0o600 {
		t.Errorf("mode = %04o, want 0600", st.Mode().Perm())
	}
	// After Close: dropped, no panic. A nil Logger discards.
	l.Record(context.Background(), Event{Kind: Erase})
	var nl *Logger
	nl.Record(context.Background(), Event{Kind: Erase})
	if err := nl.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestRotationIsBounded(t *testing.T) {
	for _, keep := range []int{1, 2, 3} {
		dir := t.TempDir()
		path := filepath.Join(dir, "audit.log")
		const maxBytes = 4 << 10
		l, err := New(Options{Path: path, MaxBytes: maxBytes, Keep: keep})
		if err != nil {
			t.Fatal(err)
		}
		for i := range 600 {
			// Rare kind: never rate-limited.
			l.Record(context.Background(), Event{Kind: PolicyApplied, Cause: "push", Detail: strings.Repeat("v", i%150)})
		}
		if err := l.Close(); err != nil {
			t.Fatal(err)
		}
		entries, _ := os.ReadDir(dir)
		if len(entries) != keep {
			t.Errorf("keep=%d: %d files, want %d", keep, len(entries), keep)
		}
		for _, e := range entries {
			fi, _ := e.Info()
			if fi.Size() > maxBytes {
				t.Errorf("keep=%d: %s is %d bytes, over %d", keep, e.Name(), fi.Size(), maxBytes)
			}
			if fi.Size() == 0 {
				t.Errorf("keep=%d: %s is empty", keep, e.Name())
			}
		}
		// The newest record is in the live file, whole.
		recs := readRecords(t, path)
		if len(recs) == 0 || recs[len(recs)-1]["kind"] != "policy_applied" {
			t.Errorf("keep=%d: live file ends with %v", keep, recs)
		}
	}
}

func TestRateLimitPerKindAndCause(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "audit.log")
	c := &clock{t: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)}
	l, err := New(Options{Path: path, Interval: 10 * time.Second, Now: c.now})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for range 50 {
		l.Record(ctx, Event{Kind: UnknownDevice, Cause: "not_registered", Device: "rogue-7"})
		l.Record(ctx, Event{Kind: ACLDenied, Cause: "publish", Device: "rogue-7"})
		l.Record(ctx, Event{Kind: Export, Device: "th-kitchen"}) // never limited
		c.add(100 * time.Millisecond)
	}
	// 5 s in: still limited.
	c.add(6 * time.Second) // now 11 s after the first
	l.Record(ctx, Event{Kind: UnknownDevice, Cause: "not_registered", Device: "rogue-8"})
	l.Record(ctx, Event{Kind: UnknownDevice, Cause: "not_registered", Device: "rogue-9"}) // suppressed, flushed at Close
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	var unknown, acl, export int
	var suppressed []float64
	for _, r := range readRecords(t, path) {
		switch r["kind"] {
		case "unknown_device":
			unknown++
			if s, ok := r["suppressed"].(float64); ok {
				suppressed = append(suppressed, s)
			}
		case "acl_denied":
			acl++
		case "export":
			export++
		}
	}
	// first + the one after the interval (49 suppressed) + Close's summary (1).
	if unknown != 3 || len(suppressed) != 2 || suppressed[0] != 49 || suppressed[1] != 1 {
		t.Errorf("unknown_device records = %d, suppressed %v; want 3, [49 1]", unknown, suppressed)
	}
	// acl_denied: first record, then Close's summary of 49.
	if acl != 2 {
		t.Errorf("acl_denied records = %d, want 2", acl)
	}
	if export != 50 {
		t.Errorf("export records = %d, want 50", export)
	}
}

// TestNoSecretEverWritten: secrets passed by mistake, in any field, never
// reach the file or slog, in clear, base64 or hex.
func TestNoSecretEverWritten(t *testing.T) {
	const (
		k1       = "K1-CANARY-7c1e55d0-4b7a-4f7e-9d1a-0e6f3b2a9c11"
		k2       = "K2-CANARY-0a9b8c7d-6e5f-4a3b-2c1d-0e9f8a7b6c5d"
		password = "pw-CANARY-hunter2!"
		secret   = "client-secret-CANARY-9f9f9f"
		token    = "eyJhbGciOiJSUzI1NiIsImtpZCI6IkNBTkFSWSJ9.eyJzdWIiOiJhbGljZSIsIkNBTkFSWSI6dHJ1ZX0.c2lnbmF0dXJlLUNBTkFSWS1zaWduYXR1cmU"
	)
	// An unregistered secret caught by shape only.
	const shapeOnly = "Zm9vYmFyQ0FOQVJZZm9vYmFyQ0FOQVJZZm9vYmFyQ0FOQVJZ"
	rd := NewRedactor()
	rd.Add(k1, k2, password, secret)
	dir := t.TempDir()
	path := filepath.Join(dir, "audit.log")
	var slogBuf bytes.Buffer
	l, err := New(Options{Path: path, Redactor: rd, Logger: slog.New(slog.NewTextHandler(&slogBuf, nil))})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	values := []string{k1, k2, password, secret, token, shapeOnly,
		"k1=" + k1, "password: " + password, "Authorization: Bearer " + token, "K2=\"" + k2 + "\"",
		"login failed with token=" + token + " and\nnewline", strings.Repeat("x", 10000) + k1,
		base64.StdEncoding.EncodeToString([]byte(k1)), "prefix" + k1 + "suffix"}
	for i, v := range values {
		kind := []Kind{Pairing, KeyRotation, Export, Erase, FactoryReset}[i%5]
		l.Record(ctx, Event{Kind: kind, Cause: v})
		l.Record(ctx, Event{Kind: kind, Device: v})
		l.Record(ctx, Event{Kind: kind, User: v})
		l.Record(ctx, Event{Kind: kind, Port: v})
		l.Record(ctx, Event{Kind: kind, Detail: v})
		l.Record(ctx, Event{Kind: Kind(v)})
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	file, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for where, out := range map[string]string{"file": string(file), "slog": slogBuf.String()} {
		if strings.Contains(out, "CANARY") {
			i := strings.Index(out, "CANARY")
			t.Errorf("%s holds a canary: …%s…", where, out[max(0, i-80):min(len(out), i+40)])
		}
		for _, s := range []string{k1, k2, password, secret, token, shapeOnly} {
			for _, form := range []string{s, base64.StdEncoding.EncodeToString([]byte(s)), base64.RawURLEncoding.EncodeToString([]byte(s))} {
				if strings.Contains(out, form[:min(len(form), 16)]) {
					t.Errorf("%s holds %q (a form of a secret)", where, form[:16])
				}
			}
		}
		if !strings.Contains(out, "[redacted]") {
			t.Errorf("%s: nothing marked redacted", where)
		}
	}
	// Lines stay lines, fields stay bounded.
	for _, r := range readRecords(t, path) {
		for k, v := range r {
			if s, ok := v.(string); ok && len(s) > maxDevice+8 {
				t.Errorf("field %s is %d bytes", k, len(s))
			}
		}
	}
}

func TestCleanKeepsOrdinaryText(t *testing.T) {
	tests := []struct{ in, want string }{
		{"th-kitchen", "th-kitchen"},
		{"policy version 12 from push", "policy version 12 from push"},
		{"/dev/ttyUSB0", "/dev/ttyUSB0"},
		{"token expired", "token expired"},
		{"a\nb\tc", "a b c"},
		{"uid=1000", "uid=1000"},
	}
	for _, tt := range tests {
		if got := clean(nil, tt.in, 200); got != tt.want {
			t.Errorf("clean(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
	if got := clean(nil, strings.Repeat("ab ", 100), 20); len(got) > 20 || !strings.HasSuffix(got, "…") {
		t.Errorf("clip = %q", got)
	}
}
