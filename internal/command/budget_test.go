package command

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"github.com/edgegate/edgegate/internal/pipeline"
	"github.com/edgegate/edgegate/internal/queue"
	"github.com/edgegate/edgegate/policy"
)

type staticTokens struct{}

func (staticTokens) Token(context.Context) (string, error) { return "tok", nil }
func (staticTokens) Invalidate(string)                     {}

type noSubmit struct{}

func (noSubmit) Submit(context.Context, pipeline.Message) (pipeline.Outcome, error) {
	return pipeline.Queued, nil
}

// At most poll_budget entities are read per round, round-robin, so every
// actuator is read in turn; sensors are never read.
func TestPollBudgetRoundRobin(t *testing.T) {
	var mu sync.Mutex
	reads := map[string]int{}
	// The filter's GET route as the gateway uses it (OrionController.queryV2:
	// type required), answering each entity with nothing to do.
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id := strings.TrimPrefix(r.URL.Path, "/f/v2/entities/")
		if r.Method != http.MethodGet || r.URL.Query().Get("type") == "" || r.Header.Get("Authorization") != "Bearer tok" {
			http.Error(w, "bad request", http.StatusBadRequest)
			return
		}
		mu.Lock()
		reads[id]++
		mu.Unlock()
		fmt.Fprintf(w, `{"id":%q,"type":"T","status":{"type":"Text","value":""}}`, id)
	}))
	defer srv.Close()
	var regs []policy.Registration
	for i, kind := range []string{policy.KindActuator, policy.KindActuator, policy.KindSensor, policy.KindActuator} {
		id := fmt.Sprintf("d%d", i)
		regs = append(regs, policy.Registration{ID: id, Type: "T", Owner: "alice", Broker: srv.URL + "/f",
			K1: "k1-" + id + "-0123", K2: "k2-" + id + "-0123", Kind: kind})
	}
	pol, err := policy.New(0, "config", regs)
	if err != nil {
		t.Fatal(err)
	}
	q, err := queue.Open(queue.Options{Dir: t.TempDir(), Key: bytes.Repeat([]byte{5}, 32)})
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	s, err := New(Options{Store: q, Policy: policy.NewEngine(pol), Tokens: staticTokens{}, HTTPClient: srv.Client(),
		Submit: noSubmit{}, PollBudget: 2})
	if err != nil {
		t.Fatal(err)
	}
	want := []map[string]int{
		{"d0": 1, "d1": 1},
		{"d0": 2, "d1": 1, "d3": 1},
		{"d0": 2, "d1": 2, "d3": 2},
		{"d0": 3, "d1": 3, "d3": 2},
	}
	for round, w := range want {
		if err := s.pollRound(context.Background()); err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		mu.Lock()
		got := fmt.Sprint(reads)
		mu.Unlock()
		if got != fmt.Sprint(w) {
			t.Fatalf("after round %d reads = %s, want %s", round+1, got, fmt.Sprint(w))
		}
	}
}
