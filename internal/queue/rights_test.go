package queue

import (
	"bytes"
	"crypto/cipher"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/dgraph-io/badger/v4"
)

const rightsCanary = "CANARY-b41f07-personal-data"

// canaryForms are the encodings a leak could take.
func canaryForms(c string) [][]byte {
	return [][]byte{
		[]byte(c),
		[]byte(base64.StdEncoding.EncodeToString([]byte(c))),
		[]byte(base64.RawURLEncoding.EncodeToString([]byte(c))),
		[]byte(hex.EncodeToString([]byte(c))),
		[]byte(strings.ToUpper(hex.EncodeToString([]byte(c)))),
	}
}

func containsAny(b []byte, forms [][]byte) bool {
	for _, f := range forms {
		if bytes.Contains(b, f) {
			return true
		}
	}
	return false
}

func canaryEntry(broker, device string, size int) Entry {
	e := entry(broker, device)
	e.Seal = func(seq uint64) ([]byte, error) {
		b := fmt.Appendf(nil, `{"seq":%d,"secret":%q,"pad":"`, seq, rightsCanary)
		for len(b) < size {
			b = append(b, rightsCanary...)
		}
		return append(b, `"}`...), nil
	}
	return e
}

func exportAll(t *testing.T, q *Queue, device string) []Held {
	t.Helper()
	var out []Held
	if err := q.ExportDevice(tctx(t), device, func(h Held) error { out = append(out, h); return nil }); err != nil {
		t.Fatalf("ExportDevice(%s) = %v", device, err)
	}
	return out
}

func TestExportDevice(t *testing.T) {
	q := start(t, Options{})
	const ba, bb = "https://a.example", "https://b.example"
	var want []Item
	for range 3 {
		want = append(want, mustAppend(t, q, entry(ba, "alice-1")))
		want = append(want, mustAppend(t, q, entry(bb, "alice-1")))
		mustAppend(t, q, entry(ba, "bob-1"))
	}
	if err := q.DeadLetter(want[0], "422 unprocessable"); err != nil {
		t.Fatal(err)
	}
	got := exportAll(t, q.Queue, "alice-1")
	if len(got) != len(want) {
		t.Fatalf("ExportDevice = %d records, want %d", len(got), len(want))
	}
	var dead int
	for _, h := range got {
		if h.Device != "alice-1" {
			t.Errorf("exported a record of %s", h.Device)
		}
		i := slices.IndexFunc(want, func(it Item) bool { return it.Broker == h.Broker && it.Seq == h.Seq })
		if i < 0 {
			t.Errorf("exported %s/%d, not appended", h.Broker, h.Seq)
			continue
		}
		if !bytes.Equal(h.Body, want[i].Body) || h.Type != want[i].Type || !h.Enqueued.Equal(want[i].Enqueued) {
			t.Errorf("exported %s/%d = %q %q %v, want %q %q %v", h.Broker, h.Seq, h.Body, h.Type, h.Enqueued,
				want[i].Body, want[i].Type, want[i].Enqueued)
		}
		if h.Dead {
			dead++
			if h.Reason != "422 unprocessable" || h.At.IsZero() {
				t.Errorf("dead letter reason, at = %q, %v", h.Reason, h.At)
			}
		}
	}
	if dead != 1 {
		t.Errorf("exported %d dead letters, want 1", dead)
	}
	// Dead letters decrypt transparently too.
	var dl []DeadLetter
	if err := q.DeadLetters(tctx(t), func(d DeadLetter) error { dl = append(dl, d); return nil }); err != nil {
		t.Fatal(err)
	}
	if len(dl) != 1 || !bytes.Equal(dl[0].Body, want[0].Body) {
		t.Errorf("DeadLetters = %+v", dl)
	}
	if err := q.ExportDevice(tctx(t), "bad/id", func(Held) error { return nil }); err == nil {
		t.Error("ExportDevice(bad/id) = nil, want error")
	}
}

// TestLegacyValuesReadable: values written before data keys (version 1)
// are still read, dead-lettered and erased.
func TestLegacyValuesReadable(t *testing.T) {
	dir := t.TempDir()
	const broker = "https://a.example"
	q, err := Open(Options{Dir: dir, Key: testKey})
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now().Round(0)
	err = q.db.Update(func(txn *badger.Txn) error {
		for seq := uint64(1); seq <= 3; seq++ {
			it := Item{Broker: broker, Device: "old", Type: "T", Seq: seq, Enqueued: now, Body: fmt.Appendf(nil, "v1-%d", seq)}
			if err := txn.Set(itemKey(prefixQueue, broker, "old", seq), encodeItem(&it)); err != nil {
				return err
			}
		}
		return txn.Set(seqKey("old"), binary.BigEndian.AppendUint64(nil, 3))
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}

	r := start(t, Options{Dir: dir})
	items := peekAll(t, r.Queue, Lane{broker, "old"})
	if got := seqs(items); !slices.Equal(got, upTo(3)) || string(items[0].Body) != "v1-1" {
		t.Fatalf("Peek of version 1 items = %v %q", got, items[0].Body)
	}
	if it := mustAppend(t, r, entry(broker, "old")); it.Seq != 4 {
		t.Errorf("seq after legacy items = %d, want 4", it.Seq)
	}
	items = peekAll(t, r.Queue, Lane{broker, "old"})
	if got := seqs(items); !slices.Equal(got, upTo(4)) {
		t.Fatalf("Peek of mixed versions = %v", got)
	}
	if err := r.DeadLetter(items[0], "gone"); err != nil {
		t.Fatal(err)
	}
	if h := exportAll(t, r.Queue, "old"); len(h) != 4 {
		t.Errorf("ExportDevice = %d records, want 4", len(h))
	}
	rep, err := r.EraseDevice("old")
	if err != nil {
		t.Fatal(err)
	}
	// Items 2 and 3 are version 1; the dead letter was re-sealed.
	if rep.Queued != 3 || rep.DeadLetters != 1 || rep.Unsealed != 2 || !rep.KeyDestroyed {
		t.Errorf("EraseDevice = %+v, want 3 queued, 1 dead, 2 unsealed, key destroyed", rep)
	}
}

// TestEraseDeviceShreds: a canary written through the queue never reaches
// a file in plaintext (nor base64 or hex), and after EraseDevice it cannot
// be recovered even by someone who holds the store key and copied the
// sealed values before the erasure.
func TestEraseDeviceShreds(t *testing.T) {
	dir := t.TempDir()
	const ba, bb = "https://a.example", "https://b.example"
	const victim, keeper = "victim-1", "keeper-1"
	q := start(t, Options{Dir: dir})
	for i := range 12 {
		size := 200
		if i%4 == 3 {
			size = 4 << 10 // above the value threshold: lands in the value log
		}
		mustAppend(t, q, canaryEntry(ba, victim, size))
		mustAppend(t, q, canaryEntry(bb, victim, size))
		mustAppend(t, q, entry(ba, keeper))
	}
	items := peekAll(t, q.Queue, Lane{ba, victim})
	if err := q.DeadLetter(items[0], "404 "+rightsCanary); err != nil {
		t.Fatal(err)
	}

	// What an attacker with the store key could copy before the erasure:
	// every version of every value of the victim, and its data key.
	var remnants []struct {
		fam byte
		seq uint64
		val []byte
	}
	err := q.db.View(func(txn *badger.Txn) error {
		io := badger.DefaultIteratorOptions
		io.AllVersions = true
		it := txn.NewIterator(io)
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			k := it.Item().Key()
			if k[0] != 'q' && k[0] != 'd' {
				continue
			}
			_, d, seq, err := parseItemKey(k)
			if err != nil || d != victim || it.Item().IsDeletedOrExpired() {
				continue
			}
			v, err := it.Item().ValueCopy(nil)
			if err != nil {
				return err
			}
			if containsAny(v, canaryForms(rightsCanary)) {
				t.Errorf("value %x holds the canary in the clear", k)
			}
			remnants = append(remnants, struct {
				fam byte
				seq uint64
				val []byte
			}{k[0], seq, v})
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	// 24 live values, plus the superseded version of the dead-lettered item.
	if len(remnants) < 24 {
		t.Fatalf("captured %d victim values, want at least 24", len(remnants))
	}
	oldKey, err := q.readKey(victim)
	if err != nil {
		t.Fatal(err)
	}
	// Sanity: with the key, the remnants do open (so the check below is not vacuous).
	if _, err := openRemnant(remnants[0].val, remnants[0].fam, victim, remnants[0].seq, oldKey); err != nil {
		t.Fatalf("remnant does not open with its key: %v", err)
	}
	lastBefore, _ := q.LastSeq(victim)

	rep, err := q.EraseDevice(victim)
	if err != nil {
		t.Fatalf("EraseDevice = %v", err)
	}
	if rep.Queued != 23 || rep.DeadLetters != 1 || rep.Unsealed != 0 || !rep.KeyDestroyed || !rep.Compacted {
		t.Errorf("EraseDevice = %+v, want 23 queued, 1 dead letter, key destroyed, compacted", rep)
	}
	if h := exportAll(t, q.Queue, victim); len(h) != 0 {
		t.Errorf("ExportDevice after erase = %d records", len(h))
	}
	if l := q.Lanes(ba); !slices.Equal(l, []Lane{{ba, keeper}}) {
		t.Errorf("Lanes(a) after erase = %v", l)
	}
	if st := q.Stats(); st.Depth != 12 || st.DeadLetters != 0 {
		t.Errorf("Stats after erase = depth %d, dead %d; want 12, 0", st.Depth, st.DeadLetters)
	}
	if _, err := q.readKey(victim); !errors.Is(err, ErrDataKeyMissing) {
		t.Errorf("readKey after erase = %v, want ErrDataKeyMissing", err)
	}
	// Counters stay; a new reading gets the next seq and a new key.
	if it := mustAppend(t, q, entry(ba, victim)); it.Seq != lastBefore+1 {
		t.Errorf("seq after erase = %d, want %d", it.Seq, lastBefore+1)
	}
	if _, err := q.EraseDevice(victim); err != nil {
		t.Fatal(err)
	}
	q.stop(t)

	// 1. No file holds the canary in any form.
	var files int
	err = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		files++
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		if containsAny(b, canaryForms(rightsCanary)) {
			t.Errorf("canary in %s", p)
		}
		return nil
	})
	if err != nil || files == 0 {
		t.Fatalf("walk = %v, %d files", err, files)
	}

	// 2. With the store key: no key or value (any version, deleted ones
	// included) holds the canary, and no 32-byte window of anything left
	// in the store opens a captured remnant.
	q2, err := Open(Options{Dir: dir, Key: testKey})
	if err != nil {
		t.Fatal(err)
	}
	defer q2.Close()
	var candidates [][]byte
	var victimKeys int
	err = q2.db.View(func(txn *badger.Txn) error {
		io := badger.DefaultIteratorOptions
		io.AllVersions = true
		it := txn.NewIterator(io)
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			k := it.Item().KeyCopy(nil)
			v, err := it.Item().ValueCopy(nil)
			if err != nil {
				return err
			}
			if containsAny(k, canaryForms(rightsCanary)) || containsAny(v, canaryForms(rightsCanary)) {
				t.Errorf("key %q holds the canary after erase", k)
			}
			if bytes.Equal(k, dataKeyKey(victim)) && !it.Item().IsDeletedOrExpired() {
				victimKeys++
			}
			for i := 0; i+dataKeySize <= len(v); i++ {
				candidates = append(candidates, v[i:i+dataKeySize])
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if victimKeys != 0 {
		t.Errorf("%d live data keys of the erased device after a second erase", victimKeys)
	}
	if len(candidates) == 0 {
		t.Fatal("no candidate keys: the scan saw nothing")
	}
	for _, c := range candidates {
		dk, err := newDataKey(append([]byte(nil), c...), true)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range remnants {
			if _, err := openRemnant(r.val, r.fam, victim, r.seq, dk.aead); err == nil {
				t.Fatalf("remnant %c/%d opened with a key left in the store", r.fam, r.seq)
			}
		}
	}
	// The other device is untouched.
	if h := exportAll(t, q2, keeper); len(h) != 12 {
		t.Errorf("keeper after erase = %d records, want 12", len(h))
	}
}

// openRemnant decrypts a captured version 2 value.
func openRemnant(val []byte, fam byte, device string, seq uint64, aead cipher.AEAD) ([]byte, error) {
	off := 9
	if fam == 'd' {
		off = 17
	}
	_, rest, err := readString(val[off:])
	if err != nil {
		return nil, err
	}
	return openSealed(val, len(val)-len(rest), fam, device, seq, aead)
}

func TestEraseDeviceValidation(t *testing.T) {
	q := start(t, Options{})
	if _, err := q.EraseDevice("a/b"); err == nil {
		t.Error("EraseDevice(a/b) = nil, want error")
	}
	rep, err := q.EraseDevice("nobody")
	if err != nil || rep.Queued != 0 || rep.KeyDestroyed {
		t.Errorf("EraseDevice(nobody) = %+v, %v", rep, err)
	}
	// State writes still work after (and around) an erase.
	if err := q.PutState("x", []byte("y")); err != nil {
		t.Fatal(err)
	}
}
