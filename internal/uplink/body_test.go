package uplink

import (
	"bytes"
	"errors"
	"io"
	"testing"
	"time"
)

// A body goes back to the pool only when its sender released it and every
// reader the transport opened was closed, in either order; a reader reads
// nothing after Close, and GetBody after the last release is refused.
func TestSharedBodyComesBackOnlyWhenUnused(t *testing.T) {
	var p bodyPool
	b := p.get(16)
	b.buf = append(b.buf, `{"actionType":"append"}`...)
	r1, err := b.open() // the request's Body
	if err != nil {
		t.Fatal(err)
	}
	r2, err := b.open() // a GetBody retry
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(r2)
	if err != nil || string(got) != `{"actionType":"append"}` {
		t.Fatalf("read %q, %v", got, err)
	}
	b.release() // RoundTrip returned; the transport still holds r1 and r2
	r2.Close()
	if n := p.returned.Load(); n != 0 {
		t.Fatalf("put back with a reader still open (%d)", n)
	}
	r1.Close()
	r1.Close() // a second Close releases nothing more
	if n := p.returned.Load(); n != 1 {
		t.Fatalf("put back %d times after the last reader closed, want 1", n)
	}
	if n, err := r1.Read(make([]byte, 8)); n != 0 || err != io.EOF {
		t.Fatalf("read after Close: %d, %v; want 0, EOF", n, err)
	}
	if _, err := b.open(); !errors.Is(err, errBodyReleased) {
		t.Fatalf("GetBody after release: %v, want errBodyReleased", err)
	}
}

// blockingWriter holds a write until released, as a slow connection does.
type blockingWriter struct {
	started, release chan struct{}
	got              bytes.Buffer
}

func (w *blockingWriter) Write(p []byte) (int, error) {
	close(w.started)
	<-w.release
	return w.got.Write(p)
}

// A Close from another goroutine while the body is being written (the
// transport closing the request body on an error) must not put the buffer
// back before the write ends: it would be lent to the next request and
// written over while this one still sends it.
func TestSharedBodyCloseDuringWriteWaitsForIt(t *testing.T) {
	var p bodyPool
	b := p.get(0)
	b.buf = append(b.buf, "0123456789"...)
	r, err := b.open()
	if err != nil {
		t.Fatal(err)
	}
	b.release()
	w := &blockingWriter{started: make(chan struct{}), release: make(chan struct{})}
	done := make(chan error, 1)
	go func() {
		_, err := r.(io.WriterTo).WriteTo(w)
		done <- err
	}()
	<-w.started
	r.Close()
	if n := p.returned.Load(); n != 0 {
		t.Fatalf("put back while the write was under way (%d)", n)
	}
	close(w.release)
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the write did not end")
	}
	if w.got.String() != "0123456789" {
		t.Fatalf("wrote %q", w.got.String())
	}
	if n := p.returned.Load(); n != 1 {
		t.Fatalf("put back %d times after the write ended, want 1", n)
	}
}
