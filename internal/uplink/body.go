package uplink

import (
	"bytes"
	"errors"
	"io"
	"sync"
	"sync/atomic"
)

// Request bodies, reused.
//
// An op/update body is up to BatchBytes (512 KiB) rendered per request:
// 16 % of the bytes the daemon allocated in a 50-device burst of the
// embedded row, and so of its garbage collections
// (docs/bench/profiles/split-embedded-batch-burst.allocs). A PATCH body
// (~2.5 KB) was rendered into a slice grown from nothing: 7.4 KB
// allocated per reading, 24 % of filter mode's bytes
// (split-mosquitto-filter-burst.allocs). The buffers are lent from a pool,
// sized to the rendered length, and come back once nothing can read them
// any more.
//
// When that is. net/http's RoundTrip "must always close the body,
// including on errors, but depending on the implementation may do so in a
// separate goroutine even after RoundTrip returns", and it may open the
// body again through GetBody to retry on a fresh connection. So a body is
// counted: one reference for the request's sender until it has its
// answer (release), one for each reader handed out until it is closed.
// The buffer goes back when the count reaches zero, never before; a
// GetBody after that gets an error (the request then fails as any network
// error, and is retried), never another request's bytes. A reader that is
// never closed keeps its buffer out of the pool, for the collector.
type bodyPool struct {
	pool     sync.Pool
	returned atomic.Int64 // bodies put back (for tests)
}

// sharedBody is one rendered body and its references.
type sharedBody struct {
	buf  []byte
	refs atomic.Int32
	home *bodyPool
}

// errBodyReleased is what a GetBody called after the request was done
// with its body gets.
var errBodyReleased = errors.New("uplink: request body already released")

// get lends a body with one reference, its sender's; buf is empty, with
// at least sizeHint bytes of room.
func (p *bodyPool) get(sizeHint int) *sharedBody {
	b, _ := p.pool.Get().(*sharedBody)
	if b == nil {
		b = &sharedBody{home: p}
	}
	if cap(b.buf) < sizeHint {
		// A quarter more: batches vary in size, and a buffer that fits
		// only the one it was made for is made again for the next
		// larger one (35 of 131 MB still allocated in a burst without).
		b.buf = make([]byte, 0, sizeHint+sizeHint/4)
	}
	b.buf = b.buf[:0]
	b.refs.Store(1)
	return b
}

// open returns a reader of the body, with a reference of its own.
func (b *sharedBody) open() (io.ReadCloser, error) {
	for {
		n := b.refs.Load()
		if n <= 0 {
			return nil, errBodyReleased
		}
		if b.refs.CompareAndSwap(n, n+1) {
			return &bodyReader{r: bytes.NewReader(b.buf), body: b}, nil
		}
	}
}

// release drops one reference; the last puts the buffer back.
func (b *sharedBody) release() {
	if b.refs.Add(-1) == 0 {
		b.home.returned.Add(1)
		b.home.pool.Put(b)
	}
}

// bodyReader reads a shared body until closed; after Close it reads
// nothing (EOF), whatever the buffer then holds. A Close that comes while
// a read is under way (from another goroutine) leaves the release to that
// read's end, so the buffer is never lent again while it is being sent.
type bodyReader struct {
	r    *bytes.Reader
	body *sharedBody

	mu       sync.Mutex
	reading  bool
	closed   bool
	released bool
}

// begin marks a read under way, unless the reader is closed.
func (r *bodyReader) begin() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return false
	}
	r.reading = true
	return true
}

// end ends a read; it releases the body if a Close came meanwhile.
func (r *bodyReader) end() {
	r.mu.Lock()
	r.reading = false
	rel := r.closed && !r.released
	r.released = r.released || rel
	r.mu.Unlock()
	if rel {
		r.body.release()
	}
}

func (r *bodyReader) Read(p []byte) (int, error) {
	if !r.begin() {
		return 0, io.EOF
	}
	defer r.end()
	return r.r.Read(p)
}

// WriteTo lets io.Copy (the transport's body writer) write the body in
// one call, without a copy buffer.
func (r *bodyReader) WriteTo(w io.Writer) (int64, error) {
	if !r.begin() {
		return 0, nil
	}
	defer r.end()
	return r.r.WriteTo(w)
}

func (r *bodyReader) Close() error {
	r.mu.Lock()
	r.closed = true
	rel := !r.reading && !r.released
	r.released = r.released || rel
	r.mu.Unlock()
	if rel {
		r.body.release()
	}
	return nil
}
