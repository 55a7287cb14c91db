// Package queue is the durable, encrypted queue between signing and the
// uplink, on badger/v4.
//
// A reading is acknowledged to its source only after Append returns, which
// is after the batch that carried it was synced to disk (group commit: one
// fsync for many readings). It leaves the queue only through Delete, after the
// broker answered 2xx, or DeadLetter. Readings are kept in lanes, one per
// (broker, device), oldest first, so the uplink can deliver each device's
// readings in order while serving devices fairly.
package queue

import (
	"errors"
	"time"
)

// Errors callers branch on.
var (
	// ErrQuota: the store reached its disk quota; the reading was not queued
	// and must not be acknowledged to its source.
	ErrQuota = errors.New("queue: disk quota reached")
	// ErrClosed: the queue is shutting down; the reading was not queued.
	ErrClosed = errors.New("queue: closed")
	// ErrNotYet: a wait of Enqueue returned before the committer answered,
	// its context done (the error wraps ctx.Err() too). Nothing was
	// consumed: the reading may still be committed, and a later wait gets
	// its outcome. A wait given a context that is already done polls: it
	// answers at once, the outcome if the commit is done, else ErrNotYet
	// (mqtt's acker polls the next reading before it blocks on it, to
	// write the PUBACKs it holds first).
	ErrNotYet = errors.New("queue: not committed yet")
)

// Entry is a reading on its way into the queue.
type Entry struct {
	Broker      string // broker URI the reading is bound to
	Device      string // device (entity) id
	Type        string // entity type
	Service     string // optional Fiware-Service
	ServicePath string // optional Fiware-ServicePath
	// Seal is called by the committer with the device's next sequence number
	// and returns the body to store (the NGSI update with its signature). It
	// runs inside the commit because the sequence number is part of the
	// signed content. An error refuses this entry only.
	Seal func(seq uint64) ([]byte, error)
	// DeviceSeq, when not 0, is the device's own sequence number of the
	// reading. The committer refuses the entry with ErrDuplicate when
	// (DeviceSeq, DeviceDigest) is among the device's recently accepted
	// ones, and with ErrReplay when DeviceSeq is otherwise not above the
	// highest accepted; it stores the new high-water mark in the same
	// transaction as the item (see devseq.go).
	DeviceSeq uint64
	// DeviceDigest names the content sent under DeviceSeq (e.g. the first
	// 8 bytes of SHA-256 of the device's JWS), to tell a redelivery from a
	// replay of different content.
	DeviceDigest [8]byte
}

// Item is a queued reading.
type Item struct {
	Broker      string
	Device      string
	Type        string
	Service     string
	ServicePath string
	Seq         uint64
	Enqueued    time.Time
	Body        []byte
}

// Lane is the per-(broker, device) FIFO of queued readings.
type Lane struct {
	Broker string
	Device string
}

// DeadLetter is a reading the broker refused permanently.
type DeadLetter struct {
	Item
	Reason string
	At     time.Time
}

// BrokerStats describes the backlog for one broker.
type BrokerStats struct {
	Broker string    `json:"broker"`
	Depth  int       `json:"depth"`
	Bytes  int64     `json:"bytes"`
	Oldest time.Time `json:"oldest,omitzero"`
}

// Stats describes the queue as a whole.
type Stats struct {
	Brokers     []BrokerStats `json:"brokers"`
	Depth       int           `json:"depth"`
	DeadLetters int           `json:"dead_letters"`
	DiskBytes   int64         `json:"disk_bytes"`
	QuotaBytes  int64         `json:"quota_bytes"`
}
