package command

import (
	"errors"
	"slices"
	"strings"
	"testing"
)

// answerErr: what is tried again soon (the platform failing) and what is
// a refusal (the platform saying no).
func TestAnswerErrClasses(t *testing.T) {
	for _, tt := range []struct {
		status  int
		refused bool
	}{
		{400, true}, {401, true}, {403, true}, {404, true}, {405, true}, {415, true}, {501, true},
		{429, false}, {500, false}, {502, false}, {503, false},
	} {
		err := answerErr("POST /v2/subscriptions", tt.status, []byte(`{"error":"x"}`))
		var r errRefused
		if got := errors.As(err, &r); got != tt.refused {
			t.Errorf("answerErr(%d) refused = %v, want %v (%v)", tt.status, got, tt.refused, err)
		}
	}
}

var notifySeeds = []struct {
	body string
	ids  []string
}{
	{`{"subscriptionId":"5f","data":[{"id":"relay-1","type":"Relay"}]}`, []string{"relay-1"}},
	{`{"subscriptionId":"5f","data":[{"id":"a"},{"id":"b"},{"id":"a"}]}`, []string{"a", "b"}},
	{`{"id":"light-1","type":"Light","power":{"value":"on"}}`, []string{"light-1"}},
	{`{"subscriptionId":"5f","data":[[1,2]]}`, nil},
	{`{"data":[{"id":7}]}`, nil},
	{`not json`, nil},
	{``, nil},
	{`{"data":[` + strings.Repeat(`{"id":"x"},`, 40) + `{"id":"y"}]}`, []string{"x", "y"}},
}

// notifiedIDs reads entity ids only, at most maxNotifyEntities distinct.
func TestNotifiedIDs(t *testing.T) {
	for _, tt := range notifySeeds {
		ids, ok := notifiedIDs([]byte(tt.body))
		if !slices.Equal(ids, tt.ids) || ok != (len(tt.ids) > 0) {
			t.Errorf("notifiedIDs(%.40q) = %q, %v; want %q", tt.body, ids, ok, tt.ids)
		}
	}
	many := `{"data":[`
	for i := range 100 {
		if i > 0 {
			many += ","
		}
		many += `{"id":"d` + strings.Repeat("x", i) + `"}`
	}
	if ids, _ := notifiedIDs([]byte(many + `]}`)); len(ids) != maxNotifyEntities {
		t.Errorf("%d ids from 100 entities, want %d", len(ids), maxNotifyEntities)
	}
	if _, ok := notifiedIDs([]byte(`{"id":"` + strings.Repeat("x", maxNotifyBytes) + `"}`)); ok {
		t.Error("an oversized notification was read")
	}
}

// Any notification body: no panic, bounded output.
func FuzzNotifiedIDs(f *testing.F) {
	for _, s := range notifySeeds {
		f.Add([]byte(s.body))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		ids, ok := notifiedIDs(b)
		if len(ids) > maxNotifyEntities || ok != (len(ids) > 0) {
			t.Fatalf("notifiedIDs = %d ids, ok %v", len(ids), ok)
		}
	})
}
