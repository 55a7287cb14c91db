package queue

import (
	"bytes"
	"testing"
)

func TestStateSurvivesReopen(t *testing.T) {
	dir := t.TempDir()
	key := bytes.Repeat([]byte{3}, 32)
	q, err := Open(Options{Dir: dir, Key: key})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok, err := q.GetState("policy"); ok || err != nil {
		t.Fatalf("GetState on an empty store = %v, %v", ok, err)
	}
	if err := q.PutState("policy", []byte("v1")); err != nil {
		t.Fatal(err)
	}
	if err := q.PutState("policy", []byte("v2")); err != nil {
		t.Fatal(err)
	}
	if err := q.PutState("gone", []byte("x")); err != nil {
		t.Fatal(err)
	}
	if err := q.DeleteState("gone"); err != nil {
		t.Fatal(err)
	}
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	q, err = Open(Options{Dir: dir, Key: key})
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	v, ok, err := q.GetState("policy")
	if !ok || err != nil || string(v) != "v2" {
		t.Fatalf("GetState(policy) after reopen = %q, %v, %v; want v2", v, ok, err)
	}
	if _, ok, _ := q.GetState("gone"); ok {
		t.Fatal("deleted state came back")
	}
	// State records are not queue items.
	if st := q.Stats(); st.Depth != 0 || len(q.Brokers()) != 0 {
		t.Fatalf("state records show in the queue: %+v", st)
	}
	if err := q.PutState("big", make([]byte, MaxStateBytes+1)); err == nil {
		t.Fatal("oversized state accepted")
	}
}
