package main

import (
	"fmt"
	"log/slog"
	"math"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"time"

	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/hooks/auth"
	"github.com/mochi-mqtt/server/v2/listeners"
)

// startMochi runs a plain mochi broker (the library the embedded broker is
// built on, same version, same capabilities) with every login allowed: the
// limit the embedded broker's own delivery puts on the gateway. Past
// writesPending messages queued to one client, mochi drops what it would
// deliver to it.
func startMochi(writesPending int32) (*mochi.Server, string, error) {
	caps := mochi.NewDefaultServerCapabilities()
	caps.ReceiveMaximum = 64
	caps.MaximumClientWritesPending = writesPending
	// Past MaximumInflight unacknowledged QoS 1 messages to one client
	// (8,192 by default) mochi drops too ("client store quota reached"):
	// as deep as the pending writes, up to the 65,535 packet ids.
	if writesPending > int32(caps.MaximumInflight) {
		caps.MaximumInflight = uint16(min(writesPending, math.MaxUint16))
	}
	srv := mochi.New(&mochi.Options{Capabilities: caps, Logger: slog.New(slog.DiscardHandler)})
	if err := srv.AddHook(new(auth.AllowHook), nil); err != nil {
		return nil, "", err
	}
	l := listeners.NewTCP(listeners.Config{ID: "bench", Address: "127.0.0.1:0"})
	if err := srv.AddListener(l); err != nil {
		return nil, "", err
	}
	if err := srv.Serve(); err != nil {
		return nil, "", err
	}
	return srv, "tcp://" + l.Address(), nil
}

// mosquittoProc is a Mosquitto we started.
type mosquittoProc struct {
	cmd  *exec.Cmd
	done chan struct{}
	URL  string
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// startMosquitto runs mosquitto on a free loopback port, anonymous,
// persistence off (Debian's default), with the queue limits the README
// recommends for external mode.
func startMosquitto(dir string) (*mosquittoProc, error) {
	bin, err := exec.LookPath("mosquitto")
	if err != nil {
		bin = "/usr/sbin/mosquitto"
		if _, err := os.Stat(bin); err != nil {
			return nil, fmt.Errorf("mosquitto not installed")
		}
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	conf := fmt.Sprintf("listener %d 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 100000\nmax_inflight_messages 512\nlog_dest none\n", port)
	cf := filepath.Join(dir, "mosquitto.conf")
	if err := os.WriteFile(cf, []byte(conf), 0o600); err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, "-c", cf)
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	m := &mosquittoProc{cmd: cmd, done: make(chan struct{}), URL: "tcp://127.0.0.1:" + strconv.Itoa(port)}
	go func() { _ = cmd.Wait(); close(m.done) }()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if c, err := net.DialTimeout("tcp", "127.0.0.1:"+strconv.Itoa(port), time.Second); err == nil {
			c.Close()
			return m, nil
		}
		select {
		case <-m.done:
			return nil, fmt.Errorf("mosquitto exited at start")
		case <-time.After(50 * time.Millisecond):
		}
	}
	m.stop()
	return nil, fmt.Errorf("mosquitto not listening within 10s")
}

func (m *mosquittoProc) pid() int { return m.cmd.Process.Pid }

func (m *mosquittoProc) stop() {
	_ = m.cmd.Process.Signal(os.Interrupt)
	select {
	case <-m.done:
	case <-time.After(10 * time.Second):
		_ = m.cmd.Process.Kill()
		<-m.done
	}
}
