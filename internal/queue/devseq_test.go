package queue

import (
	"errors"
	"sync"
	"testing"
)

func seqEntry(device string, seq uint64, digest byte) Entry {
	e := entry("https://b.example", device)
	e.DeviceSeq = seq
	e.DeviceDigest = [8]byte{digest}
	return e
}

// TestDeviceSeqReplayDuplicateAndRestart: the committer refuses a device
// seq not above the last accepted (ErrReplay), recognises a redelivery of
// a recent one (ErrDuplicate), and both survive a restart.
func TestDeviceSeqReplayDuplicateAndRestart(t *testing.T) {
	dir := t.TempDir()
	q := start(t, Options{Dir: dir})
	mustAppend(t, q, seqEntry("dev-a", 5, 5))
	mustAppend(t, q, seqEntry("dev-a", 9, 9))
	mustAppend(t, q, seqEntry("dev-b", 1, 1))             // marks are per device
	mustAppend(t, q, entry("https://b.example", "dev-a")) // no device seq: not checked

	check := func(q *running, when string) {
		t.Helper()
		for _, tt := range []struct {
			name string
			e    Entry
			want error
		}{
			{"redelivery of the last", seqEntry("dev-a", 9, 9), ErrDuplicate},
			{"redelivery of an older one", seqEntry("dev-a", 5, 5), ErrDuplicate},
			{"same seq, other content", seqEntry("dev-a", 9, 7), ErrReplay},
			{"re-ordered", seqEntry("dev-a", 7, 7), ErrReplay},
			{"zero-ish", seqEntry("dev-a", 1, 1), ErrReplay},
		} {
			_, err := q.Append(tctx(t), tt.e)
			if !errors.Is(err, tt.want) {
				t.Errorf("%s: Append(%s) = %v, want %v", when, tt.name, err, tt.want)
			}
		}
		if got, err := q.LastDeviceSeq("dev-a"); err != nil || got != 9 {
			t.Errorf("%s: LastDeviceSeq = %d, %v, want 9", when, got, err)
		}
	}
	check(q, "running")
	if n := len(peekAll(t, q.Queue, Lane{Broker: "https://b.example", Device: "dev-a"})); n != 3 {
		t.Fatalf("queued %d items of dev-a, want 3 (refusals queue nothing)", n)
	}
	q.stop(t)

	q = start(t, Options{Dir: dir})
	check(q, "after restart")
	mustAppend(t, q, seqEntry("dev-a", 10, 10))
}

// TestDeviceSeqWithinBatch: concurrent appends of one device with the same
// seq: exactly one is accepted; the same seq with the same digest is a
// duplicate, otherwise a replay.
func TestDeviceSeqWithinBatch(t *testing.T) {
	q := start(t, Options{})
	const n = 32
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			_, errs[i] = q.Append(tctx(t), seqEntry("dev-a", 3, byte(i%2)))
		})
	}
	wg.Wait()
	ok := 0
	for _, err := range errs {
		switch {
		case err == nil:
			ok++
		case errors.Is(err, ErrDuplicate), errors.Is(err, ErrReplay):
		default:
			t.Fatalf("Append = %v", err)
		}
	}
	if ok != 1 {
		t.Fatalf("%d appends of device seq 3 accepted, want 1", ok)
	}
}

// TestDeviceSeqSealErrorAcceptsNothing: an entry refused by its Seal does
// not move the mark.
func TestDeviceSeqSealErrorAcceptsNothing(t *testing.T) {
	q := start(t, Options{})
	e := seqEntry("dev-a", 4, 4)
	e.Seal = func(uint64) ([]byte, error) { return nil, errors.New("boom") }
	if _, err := q.Append(tctx(t), e); err == nil {
		t.Fatal("Append with a failing Seal succeeded")
	}
	mustAppend(t, q, seqEntry("dev-a", 4, 4))
}

func TestDeviceMarkRing(t *testing.T) {
	var m deviceMark
	for i := uint64(1); i <= markRing+5; i++ {
		m = m.accept(i, [8]byte{byte(i)})
	}
	got, err := decodeMark(m.encode())
	if err != nil || got.high != markRing+5 || len(got.recent) != markRing || got.recent[0].seq != markRing+5 {
		t.Fatalf("decodeMark(encode) = %+v, %v", got, err)
	}
	if err := got.check(6, [8]byte{6}); !errors.Is(err, ErrDuplicate) {
		t.Fatalf("check(recent) = %v, want ErrDuplicate", err)
	}
	if err := got.check(5, [8]byte{5}); !errors.Is(err, ErrReplay) {
		t.Fatalf("check(fell out of the ring) = %v, want ErrReplay", err)
	}
	if _, err := decodeMark([]byte{1, 2, 3}); err == nil {
		t.Fatal("decodeMark(short) succeeded")
	}
}
