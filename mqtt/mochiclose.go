package mqtt

import (
	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// CloseServer shuts a mochi server down without its lock-order bug (v2.7.9):
// Server.Close closes each listener's clients through
// Clients.GetByListener, which takes the clients' read lock and then again
// in Len; a client disconnecting in between waits for the write lock, the
// second read lock waits behind it, and the shutdown hangs for good (seen
// in a test that hung 13 minutes in Close). Here each listener is closed
// first with a closer that reads the clients once (GetAll); a listener
// runs its closer only once, so Server.Close's own pass finds nothing to
// do and only stops the hooks.
func CloseServer(srv *mochi.Server, listenerIDs ...string) error {
	for _, id := range listenerIDs {
		srv.Listeners.Close(id, func(id string) {
			for _, cl := range srv.Clients.GetAll() {
				if cl.Net.Listener == id && !cl.Closed() {
					_ = srv.DisconnectClient(cl, packets.ErrServerShuttingDown)
				}
			}
		})
	}
	return srv.Close()
}
