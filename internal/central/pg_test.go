package central

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// pgServer is a real PostgreSQL (the Debian package's binaries) started by
// the test: initdb in a temp dir, postgres on a loopback port, password
// authentication, stopped by its PID at the end.
type pgServer struct {
	dsn  string // holds the password: never logged
	port int
}

const pgPassword = "pg-CANARY-5e1d0a77"

var pgNextDB sync.Mutex

// pgBin finds the Debian package's binary directory.
func pgBin(t testing.TB) string {
	t.Helper()
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	for i := len(dirs) - 1; i >= 0; i-- {
		if _, err := os.Stat(filepath.Join(dirs[i], "initdb")); err == nil {
			return dirs[i]
		}
	}
	if p, err := exec.LookPath("initdb"); err == nil {
		return filepath.Dir(p)
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("PostgreSQL binaries (initdb, postgres) not found: install the postgresql package (.ci/run does)")
	}
	t.Skip("PostgreSQL binaries not installed (apt-get install postgresql); required under CI=true")
	return ""
}

// startPostgres starts a server for this test. initdb refuses root: as
// root the server runs as nobody.
func startPostgres(t testing.TB) *pgServer {
	t.Helper()
	bin := pgBin(t)
	dir, err := os.MkdirTemp("", "edgegate-pg-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	var cred *syscall.Credential
	if os.Geteuid() == 0 {
		u, err := user.Lookup("nobody")
		if err != nil {
			t.Fatalf("running as root and no user nobody to run PostgreSQL as: %v", err)
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		cred = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
		if err := os.Chown(dir, uid, gid); err != nil {
			t.Fatal(err)
		}
	}
	run := func(name string, args ...string) *exec.Cmd {
		c := exec.Command(filepath.Join(bin, name), args...)
		c.Dir = dir
		c.Env = []string{"LC_ALL=C", "PATH=" + bin + ":/usr/bin:/bin"}
		if cred != nil {
			c.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
		}
		return c
	}
	pw := filepath.Join(dir, "pw")
	if err := os.WriteFile(pw, []byte(pgPassword+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if cred != nil {
		os.Chown(pw, int(cred.Uid), int(cred.Gid))
	}
	data := filepath.Join(dir, "data")
	if out, err := run("initdb", "-D", data, "-U", "edgegate", "--pwfile", pw, "--auth", "scram-sha-256",
		"--no-sync", "-E", "UTF8", "--locale", "C").CombinedOutput(); err != nil {
		t.Fatalf("initdb: %v\n%s", err, out)
	}
	os.Remove(pw)
	for attempt := 0; ; attempt++ {
		port := freePort(t)
		var out bytes.Buffer
		srv := run("postgres", "-D", data, "-p", strconv.Itoa(port), "-k", dir, "-c", "listen_addresses=127.0.0.1",
			"-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off", "-c", "max_connections=60")
		srv.Stdout, srv.Stderr = &out, &out
		if err := srv.Start(); err != nil {
			t.Fatalf("postgres: %v", err)
		}
		exited := make(chan error, 1)
		go func() { exited <- srv.Wait() }()
		s := &pgServer{port: port,
			dsn: fmt.Sprintf("postgres://edgegate:%s@127.0.0.1:%d/postgres?sslmode=disable", pgPassword, port)}
		ready := false
		for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); {
			select {
			case err := <-exited:
				if attempt < 3 && strings.Contains(out.String(), "could not bind") {
					goto retry
				}
				t.Fatalf("postgres exited: %v\n%s", err, out.String())
			default:
			}
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			c, err := pgx.Connect(ctx, s.dsn)
			cancel()
			if err == nil {
				c.Close(context.Background())
				ready = true
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if !ready {
			srv.Process.Kill()
			t.Fatalf("postgres not ready within 30s\n%s", out.String())
		}
		t.Cleanup(func() {
			// Fast shutdown by PID (SIGINT), then wait; SIGKILL if it hangs.
			srv.Process.Signal(syscall.SIGINT)
			select {
			case <-exited:
			case <-time.After(15 * time.Second):
				srv.Process.Kill()
				<-exited
			}
		})
		return s
	retry:
	}
}

func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// database creates an empty database on the server and returns its DSN.
func (s *pgServer) database(t testing.TB) string {
	t.Helper()
	pgNextDB.Lock()
	defer pgNextDB.Unlock()
	name := fmt.Sprintf("t_%d", time.Now().UnixNano())
	c, err := pgx.Connect(context.Background(), s.dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(context.Background())
	if _, err := c.Exec(context.Background(), "CREATE DATABASE "+name); err != nil {
		t.Fatal(err)
	}
	return strings.Replace(s.dsn, "/postgres?", "/"+name+"?", 1)
}

var (
	sharedPGOnce sync.Once
	sharedPG     *pgServer
	sharedPGStop func()
)

// testPG is one server per package run (starting one costs ~1 s), each
// caller getting its own database. It is stopped by TestMain.
func testPG(t testing.TB) string {
	t.Helper()
	pgBin(t) // skip (or fail under CI) before the once
	sharedPGOnce.Do(func() {
		// A sub-test's Cleanup would stop the server after the first test;
		// run the start under a holder test whose cleanups TestMain runs.
		h := &holder{}
		sharedPG = startPostgres(holderT{TB: t, h: h})
		sharedPGStop = h.run
	})
	if sharedPG == nil {
		t.Fatal("postgres did not start (see the first test's failure)")
	}
	return sharedPG.database(t)
}

type holder struct {
	mu  sync.Mutex
	fns []func()
}

func (h *holder) run() {
	h.mu.Lock()
	defer h.mu.Unlock()
	for i := len(h.fns) - 1; i >= 0; i-- {
		h.fns[i]()
	}
	h.fns = nil
}

// holderT routes Cleanup to a holder so the server outlives one test;
// Fatal and friends still go to the test that started it.
type holderT struct {
	testing.TB
	h *holder
}

func (h holderT) Cleanup(f func()) { h.h.mu.Lock(); h.h.fns = append(h.h.fns, f); h.h.mu.Unlock() }

func TestMain(m *testing.M) {
	code := m.Run()
	if sharedPGStop != nil {
		sharedPGStop()
	}
	os.Exit(code)
}
