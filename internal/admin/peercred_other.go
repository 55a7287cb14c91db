//go:build !linux

package admin

import (
	"errors"
	"net"
)

// Peer is who is on the other end of a unix socket connection.
type Peer struct {
	PID    int32
	UID    uint32
	GID    uint32
	Groups []uint32
}

// peerOf is Linux-only: elsewhere every peer is refused.
func peerOf(net.Conn) (Peer, error) {
	return Peer{}, errors.New("peer credentials: not supported on this system")
}
