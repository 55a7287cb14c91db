package admin

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Peer is who is on the other end of a unix socket connection, as the
// kernel recorded it at connect time.
type Peer struct {
	PID    int32
	UID    uint32
	GID    uint32
	Groups []uint32 // supplementary groups; nil if unknown
}

// peerOf reads the peer credentials of a unix connection: SO_PEERCRED for
// pid, uid and gid; SO_PEERGROUPS (Linux 4.13) for the supplementary
// groups, falling back to the Groups: line of /proc/<pid>/status. The
// fallback races with pid reuse and fails under ProtectProc=invisible
// (the daemon cannot see other users' processes), which is why the socket
// option comes first: it is the connect-time snapshot, like SO_PEERCRED.
func peerOf(c net.Conn) (Peer, error) {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return Peer{}, fmt.Errorf("peer credentials: %T is not a unix connection", c)
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return Peer{}, fmt.Errorf("peer credentials: %w", err)
	}
	var p Peer
	var cerr error
	err = raw.Control(func(fd uintptr) {
		cred, err := unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
		if err != nil {
			cerr = err
			return
		}
		p = Peer{PID: cred.Pid, UID: cred.Uid, GID: cred.Gid}
		p.Groups, _ = peerGroups(int(fd))
	})
	if err == nil {
		err = cerr
	}
	if err != nil {
		return Peer{}, fmt.Errorf("peer credentials: %w", err)
	}
	if p.Groups == nil && p.PID > 0 {
		if f, err := os.Open(fmt.Sprintf("/proc/%d/status", p.PID)); err == nil {
			p.Groups, _ = parseStatusGroups(f)
			f.Close()
		}
	}
	return p, nil
}

// peerGroups is getsockopt(SO_PEERGROUPS), which x/sys/unix has no helper
// for: an array of gid_t, ERANGE with the needed length when too small.
func peerGroups(fd int) ([]uint32, error) {
	buf := make([]uint32, 64)
	for range 3 {
		n := uint32(len(buf) * 4)
		_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), unix.SOL_SOCKET, unix.SO_PEERGROUPS,
			uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&n)), 0)
		switch errno {
		case 0:
			return buf[: n/4 : n/4], nil
		case unix.ERANGE:
			buf = make([]uint32, n/4+1)
		default:
			return nil, errno
		}
	}
	return nil, unix.ERANGE
}

// parseStatusGroups reads the "Groups:" line of /proc/<pid>/status.
func parseStatusGroups(r interface{ Read([]byte) (int, error) }) ([]uint32, error) {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		line := sc.Bytes()
		rest, ok := bytes.CutPrefix(line, []byte("Groups:"))
		if !ok {
			continue
		}
		out := []uint32{}
		for _, f := range bytes.Fields(rest) {
			g, err := strconv.ParseUint(string(f), 10, 32)
			if err != nil {
				return nil, fmt.Errorf("groups %q: %w", f, err)
			}
			out = append(out, uint32(g))
		}
		return out, nil
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	return nil, errors.New("no Groups: line")
}
