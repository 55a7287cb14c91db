// Package audit records security-relevant events — refusals, policy
// changes, pairing, key rotation, data exports and erasures, factory
// resets, denied admin requests — as JSON lines in a size-bounded,
// append-only file under the state directory, and to slog.
//
// # Contract: no secrets
//
// An Event has only typed string fields (kind, cause, device, user, port,
// detail); there is no free-form map and no field for keys, tokens or
// passwords, so a secret can only arrive by mistake, in the wrong field.
// Every field is then cleaned before it is written anywhere:
//
//   - every value registered with Redactor.Add (the daemon registers each
//     device's K1/K2, the client secret, MQTT passwords and the access
//     tokens it fetches) is replaced by "[redacted]", wherever it appears;
//   - secret-shaped text is replaced too: JWTs, "Bearer …", "name=value" or
//     "name: value" where the name is k1, k2, token, password, secret,
//     authorization, apikey (and variants), and runs of 32 or more
//     base64/hex characters;
//   - control characters become spaces (one event, one line);
//   - each field is clipped (cause 64 bytes, device 256, user and port 128,
//     detail 200), so a caller cannot dump a body or a file into the log.
//
// The shape rules are a second net, not a licence: callers pass ids and
// short sentences, never values received from devices or the network.
//
// # Bounds
//
// The file rotates at MaxBytes into at most Keep files in all (default
// 2 × 4 MiB). Noisy kinds (refusals and denials) are rate-limited per
// (kind, cause): the first record is written at once, then at most one per
// Interval carrying how many were suppressed in between; Close writes the
// remaining counts. Rare kinds (policy_applied, pairing, key_rotation,
// export, erase, factory_reset) are never suppressed.
//
// Imported by the daemon and the admin server.
package audit

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"time"
	"unicode/utf8"
)

// Kind is what happened.
type Kind string

// Kinds.
const (
	UnknownDevice Kind = "unknown_device"
	ACLDenied     Kind = "acl_denied"
	BadSignature  Kind = "bad_signature"
	PolicyApplied Kind = "policy_applied"
	PolicyRefused Kind = "policy_refused"
	Pairing       Kind = "pairing"
	KeyRotation   Kind = "key_rotation"
	Export        Kind = "export"
	Erase         Kind = "erase"
	FactoryReset  Kind = "factory_reset"
	AdminDenied   Kind = "admin_denied"
)

// noisy kinds are rate-limited per (kind, cause).
func (k Kind) noisy() bool {
	switch k {
	case UnknownDevice, ACLDenied, BadSignature, PolicyRefused, AdminDenied:
		return true
	}
	return false
}

// Event is one audited fact. See the package comment for what each field
// may hold; none may hold a secret.
type Event struct {
	Kind   Kind
	Cause  string // short machine-readable reason: "not_registered", "rollback"
	Device string // device id
	User   string // user name or "uid=N"
	Port   string // radio port, listener or socket
	Detail string // a short human sentence
}

// Field limits, in bytes.
const (
	maxCause  = 64
	maxDevice = 256
	maxUser   = 128
	maxPort   = 128
	maxDetail = 200
)

// Options configures New.
type Options struct {
	// Path is the audit file, e.g. state_dir/audit.log; "" = slog only.
	Path string
	// MaxBytes is the size at which the file rotates; default 4 MiB.
	MaxBytes int64
	// Keep is how many files exist at most, the live one included
	// (path, path.1, ...); default 2.
	Keep int
	// Interval is the rate limit per (kind, cause) of noisy kinds; default
	// 30 s.
	Interval time.Duration
	Logger   *slog.Logger // nil = discard
	Redactor *Redactor    // nil = shape rules only
	Now      func() time.Time
}

// Logger writes audit records. A nil *Logger discards them, so optional
// wiring needs no checks.
type Logger struct {
	opts Options
	log  *slog.Logger

	mu     sync.Mutex
	f      *os.File
	size   int64
	causes map[string]*causeState
	closed bool
	errLog time.Time // last time a write error was logged
}

type causeState struct {
	last       time.Time
	suppressed int
	kind       Kind
	cause      string
}

// maxCauses bounds the rate-limit table; causes come from a fixed set in
// practice, this guards against a caller putting ids in Cause.
const maxCauses = 1024

// New opens (creating if needed, mode 0600) the audit file.
func New(opts Options) (*Logger, error) {
	if opts.MaxBytes <= 0 {
		opts.MaxBytes = 4 << 20
	}
	if opts.Keep <= 0 {
		opts.Keep = 2
	}
	if opts.Interval <= 0 {
		opts.Interval = 30 * time.Second
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	l := &Logger{opts: opts, log: log.With("component", "audit"), causes: make(map[string]*causeState)}
	if opts.Path != "" {
		if err := os.MkdirAll(filepath.Dir(opts.Path), 0o700); err != nil {
			return nil, fmt.Errorf("open audit log: %w", err)
		}
		if err := l.open(); err != nil {
			return nil, err
		}
	}
	return l, nil
}

func (l *Logger) open() error {
	f, err := os.OpenFile(l.opts.Path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("open audit log: %w", err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return fmt.Errorf("open audit log: %w", err)
	}
	l.f, l.size = f, st.Size()
	return nil
}

// record is the JSON line.
type record struct {
	Time       string `json:"time"`
	Kind       Kind   `json:"kind"`
	Cause      string `json:"cause,omitempty"`
	Device     string `json:"device,omitempty"`
	User       string `json:"user,omitempty"`
	Port       string `json:"port,omitempty"`
	Detail     string `json:"detail,omitempty"`
	Suppressed int    `json:"suppressed,omitempty"`
}

// Record writes e, unless its (kind, cause) is being rate-limited. It never
// fails: a write error is logged (at most once a minute) and the record is
// dropped from the file, not from slog.
func (l *Logger) Record(ctx context.Context, e Event) {
	if l == nil {
		return
	}
	rd := l.opts.Redactor
	r := record{
		Kind:   Kind(clean(rd, string(e.Kind), 32)),
		Cause:  clean(rd, e.Cause, maxCause),
		Device: clean(rd, e.Device, maxDevice),
		User:   clean(rd, e.User, maxUser),
		Port:   clean(rd, e.Port, maxPort),
		Detail: clean(rd, e.Detail, maxDetail),
	}
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return
	}
	now := l.opts.Now()
	if r.Kind.noisy() {
		key := string(r.Kind) + "\x00" + r.Cause
		st := l.causes[key]
		if st == nil {
			if len(l.causes) >= maxCauses {
				l.sweep(now)
			}
			st = &causeState{kind: r.Kind, cause: r.Cause}
			l.causes[key] = st
		} else if now.Sub(st.last) < l.opts.Interval {
			st.suppressed++
			l.mu.Unlock()
			return
		}
		r.Suppressed, st.suppressed, st.last = st.suppressed, 0, now
	}
	r.Time = now.UTC().Format(time.RFC3339Nano)
	l.writeLocked(ctx, r)
	l.mu.Unlock()
}

// sweep drops idle causes, writing their suppressed counts first.
func (l *Logger) sweep(now time.Time) {
	for k, st := range l.causes {
		if now.Sub(st.last) >= l.opts.Interval || len(l.causes) >= maxCauses {
			l.flushCause(st, now)
			delete(l.causes, k)
		}
	}
}

func (l *Logger) flushCause(st *causeState, now time.Time) {
	if st.suppressed == 0 {
		return
	}
	l.writeLocked(context.Background(), record{Time: now.UTC().Format(time.RFC3339Nano), Kind: st.kind,
		Cause: st.cause, Detail: "suppressed records since the last one", Suppressed: st.suppressed})
	st.suppressed = 0
}

func (l *Logger) writeLocked(ctx context.Context, r record) {
	level := slog.LevelInfo
	if r.Kind.noisy() {
		level = slog.LevelWarn
	}
	attrs := []slog.Attr{slog.String("kind", string(r.Kind))}
	for _, kv := range [][2]string{{"cause", r.Cause}, {"device", r.Device}, {"user", r.User}, {"port", r.Port}, {"detail", r.Detail}} {
		if kv[1] != "" {
			attrs = append(attrs, slog.String(kv[0], kv[1]))
		}
	}
	if r.Suppressed > 0 {
		attrs = append(attrs, slog.Int("suppressed", r.Suppressed))
	}
	l.log.LogAttrs(ctx, level, "audit", attrs...)

	if l.f == nil {
		return
	}
	line, err := json.Marshal(r)
	if err != nil {
		return // cannot happen: strings only
	}
	line = append(line, '\n')
	if l.size+int64(len(line)) > l.opts.MaxBytes && l.size > 0 {
		if err := l.rotate(); err != nil {
			l.writeFailed(err)
			if l.f == nil {
				return
			}
		}
	}
	n, err := l.f.Write(line)
	l.size += int64(n)
	if err != nil {
		l.writeFailed(err)
	}
}

func (l *Logger) writeFailed(err error) {
	now := l.opts.Now()
	if now.Sub(l.errLog) >= time.Minute {
		l.errLog = now
		l.log.Error("write audit log", "path", l.opts.Path, "err", err)
	}
}

// rotate shifts path.(i) to path.(i+1), dropping the oldest, so that at
// most Keep files exist.
func (l *Logger) rotate() error {
	if err := l.f.Close(); err != nil {
		l.writeFailed(err)
	}
	l.f = nil
	p := l.opts.Path
	if l.opts.Keep == 1 {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
		return l.open()
	}
	_ = os.Remove(fmt.Sprintf("%s.%d", p, l.opts.Keep-1))
	for i := l.opts.Keep - 2; i >= 1; i-- {
		if err := os.Rename(fmt.Sprintf("%s.%d", p, i), fmt.Sprintf("%s.%d", p, i+1)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
	}
	if err := os.Rename(p, p+".1"); err != nil {
		return err
	}
	return l.open()
}

// Close writes the counts still suppressed and closes the file. Records
// after Close are dropped.
func (l *Logger) Close() error {
	if l == nil {
		return nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return nil
	}
	now := l.opts.Now()
	for _, st := range l.causes {
		l.flushCause(st, now)
	}
	l.closed = true
	if l.f == nil {
		return nil
	}
	err := l.f.Sync()
	if cerr := l.f.Close(); err == nil {
		err = cerr
	}
	l.f = nil
	if err != nil {
		return fmt.Errorf("close audit log: %w", err)
	}
	return nil
}

// Redactor holds secret values to scrub from audit records. Safe for
// concurrent use.
type Redactor struct {
	mu      sync.RWMutex
	secrets map[string]struct{}
}

// NewRedactor returns an empty Redactor.
func NewRedactor() *Redactor { return &Redactor{secrets: make(map[string]struct{})} }

// minSecret: shorter values are not registered; replacing every "1234"
// would make records unreadable while hiding nothing worth hiding.
const minSecret = 6

// maxSecrets bounds the set (tokens are registered as they are fetched).
const maxSecrets = 4096

// Add registers secrets. Values shorter than 6 bytes are ignored.
func (r *Redactor) Add(secrets ...string) {
	if r == nil {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, s := range secrets {
		if len(s) < minSecret {
			continue
		}
		if len(r.secrets) >= maxSecrets {
			clear(r.secrets) // the shape rules still catch tokens
		}
		r.secrets[s] = struct{}{}
	}
}

// Remove forgets secrets (a rotated key, an expired token).
func (r *Redactor) Remove(secrets ...string) {
	if r == nil {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, s := range secrets {
		delete(r.secrets, s)
	}
}

func (r *Redactor) scrub(s string) string {
	if r == nil || s == "" {
		return s
	}
	r.mu.RLock()
	defer r.mu.RUnlock()
	for sec := range r.secrets {
		if strings.Contains(s, sec) {
			s = strings.ReplaceAll(s, sec, redacted)
		}
	}
	return s
}

const redacted = "[redacted]"

var (
	reJWT    = regexp.MustCompile(`eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*(\.[A-Za-z0-9_-]*)?`)
	reBearer = regexp.MustCompile(`(?i)\b(bearer|basic)\s+\S+`)
	reNamed  = regexp.MustCompile(`(?i)\b([a-z_-]*(k1|k2|token|passw(or)?d|pwd|secret|authorization|api_?key|credential|private_?key)[a-z_-]*)(\s*[:=]\s*)("[^"]*"|'[^']*'|\S+)`)
	reLong   = regexp.MustCompile(`[A-Za-z0-9+/_=]{32,}`)
)

// clean applies the contract to one field: registered secrets, secret
// shapes, control characters, valid UTF-8, length.
func clean(rd *Redactor, s string, limit int) string {
	if s == "" {
		return ""
	}
	// Clip generously first, so the regexps never see megabytes. A secret
	// cut in two at 16 KiB would need the 16 KiB before it to shrink below
	// the field limit to reach the output.
	if len(s) > 16<<10 {
		s = s[:16<<10]
	}
	s = strings.ToValidUTF8(s, "?")
	s = strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f || (r >= 0x80 && r < 0xa0) || r == '\u2028' || r == '\u2029' {
			return ' '
		}
		return r
	}, s)
	s = rd.scrub(s)
	s = reJWT.ReplaceAllString(s, redacted)
	s = reBearer.ReplaceAllString(s, "$1 "+redacted)
	s = reNamed.ReplaceAllString(s, "$1$4"+redacted)
	s = reLong.ReplaceAllString(s, redacted)
	if len(s) > limit {
		cut := limit - len("…")
		for cut > 0 && !utf8.RuneStart(s[cut]) {
			cut--
		}
		s = s[:cut] + "…"
	}
	return s
}
