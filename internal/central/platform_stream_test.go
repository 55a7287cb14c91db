package central

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
)

// rowsServer answers the ownership list with n generated IOTID rows,
// written as they are generated (as list/index.php echoes row by row), and
// counts the bytes it sent.
func rowsServer(t *testing.T, n int, sent *atomic.Int64) *httptest.Server {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		bw := bufio.NewWriterSize(w, 64<<10)
		c := 0
		write := func(s string) { k, _ := bw.WriteString(s); c += k }
		write("[\n")
		for i := range n {
			if i > 0 {
				write(",")
			}
			write(fmt.Sprintf(`{"username":"owner-%d","elementId":"Organization:orion-1:dev-%07d","elementType":"IOTID","elementName":"dev-%07d",`+
				`"elementUrl":null,"elementDetails":{"k1":"k1-%032d","k2":"k2-%032d","contextbroker":"orion-1","edgegateway_type":"linux_edgegate",`+
				`"edgegateway_uri":"gw-%05d"},"created":"2026-12-01 10:00:00"}`+"\n", i%5000, i, i, i, i, i%10000))
		}
		write("]\n")
		bw.Flush()
		sent.Store(int64(c))
	}))
	t.Cleanup(srv.Close)
	return srv
}

func rowsToken(context.Context) (string, error) { return "tok", nil }

// TestPlatformAnswerStreamed: 300,000 ownership rows (an answer larger
// than the old 64 MiB cap) are decoded one at a time: the heap in use
// while decoding stays a small fraction of the answer.
func TestPlatformAnswerStreamed(t *testing.T) {
	const n = 300_000
	var sent atomic.Int64
	srv := rowsServer(t, n, &sent)
	p := NewPlatform(srv.URL, "", srv.Client(), rowsToken, 1, 0)
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	base, peak := ms.HeapInuse, ms.HeapInuse
	rows, gws := 0, map[string]bool{}
	err := getArray(context.Background(), p, srv.URL+"/ownership-api/v1/list/?type=IOTID", false, func(r OwnershipRow) {
		rows++
		gws[detailString(mustDetails(t, r), "edgegateway_uri")] = true
		if rows%5000 == 0 {
			runtime.ReadMemStats(&ms)
			peak = max(peak, ms.HeapInuse)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	if rows != n || len(gws) != 10000 {
		t.Fatalf("decoded %d rows for %d gateways, want %d for 10000", rows, len(gws), n)
	}
	if sent.Load() <= 64<<20 {
		t.Fatalf("the answer is only %d bytes: not past the old cap", sent.Load())
	}
	grew := int64(peak) - int64(base)
	t.Logf("answer %d MiB, heap in use grew by at most %d MiB while decoding", sent.Load()>>20, grew>>20)
	if grew > 48<<20 {
		t.Fatalf("heap in use grew by %d MiB decoding a %d MiB answer: not streamed", grew>>20, sent.Load()>>20)
	}
}

func mustDetails(t *testing.T, r OwnershipRow) map[string]any {
	det, err := parseDetails(r.ElementDetails)
	if err != nil {
		t.Fatal(err)
	}
	return det
}

// TestPlatformAnswerOverCapRefused: an answer over platform.max_answer is
// refused with an error naming the setting, not truncated to what fit.
func TestPlatformAnswerOverCapRefused(t *testing.T) {
	var sent atomic.Int64
	srv := rowsServer(t, 10_000, &sent) // ~3.5 MiB
	p := NewPlatform(srv.URL, "", srv.Client(), rowsToken, 1, 1<<20)
	rows := 0
	err := getArray(context.Background(), p, srv.URL+"/ownership-api/v1/list/?type=IOTID", false, func(OwnershipRow) { rows++ })
	if !errors.Is(err, ErrAnswerTooLarge) || !strings.Contains(err.Error(), "platform.max_answer") {
		t.Fatalf("answer over the cap: %v", err)
	}
	if strings.Contains(err.Error(), "k1-") || strings.Contains(err.Error(), "tok") {
		t.Fatalf("the error quotes the answer or the token: %v", err)
	}
	// Exactly at the cap is accepted.
	var exact atomic.Int64
	small := rowsServer(t, 100, &exact)
	resp, _ := small.Client().Get(small.URL)
	resp.Body.Close()
	p = NewPlatform(small.URL, "", small.Client(), rowsToken, 1, exact.Load())
	rows = 0
	if err := getArray(context.Background(), p, small.URL, false, func(OwnershipRow) { rows++ }); err != nil || rows != 100 {
		t.Fatalf("answer of exactly max_answer bytes: %d rows, %v", rows, err)
	}
}

// TestTruncatedPlatformAnswerRefused: an ownership list or an IoT
// Directory device list cut short refuses the round: the bundles in force
// keep their devices, and the refusal is counted.
func TestTruncatedPlatformAnswerRefused(t *testing.T) {
	e := newEnv(t, nil)
	e.insert("alice", "th-1", "gw-a")
	e.insert("alice", "th-2", "gw-a")
	ctx := context.Background()
	if _, err := e.svc.Refresh(ctx, false); err != nil {
		t.Fatal(err)
	}
	before, _, _ := e.svc.Store().Gateway(ctx, "gw-a")
	e.sim.RemoveDevice("th-1") // a real change, so that a round would publish
	for i, fault := range []string{"ownership-truncated", "directory-truncated"} {
		e.fault.Store(fault)
		_, err := e.svc.Refresh(ctx, false)
		if err == nil || !strings.Contains(err.Error(), "cut short") {
			t.Fatalf("%s: round not refused as cut short: %v", fault, err)
		}
		after, _, _ := e.svc.Store().Gateway(ctx, "gw-a")
		if after.Version != before.Version {
			t.Fatalf("%s: a bundle was published from a truncated answer: v%d → v%d", fault, before.Version, after.Version)
		}
		_, body := e.do("GET", MetricsPath, "", nil, nil)
		if m := fmt.Sprintf(`edgegate_central_platform_rounds_total{result="refused"} %d`, i+1); !strings.Contains(string(body), m) {
			t.Errorf("metrics lack %s", m)
		}
	}
	e.fault.Store("")
	if _, err := e.svc.Refresh(ctx, false); err != nil {
		t.Fatal(err)
	}
	after, _, _ := e.svc.Store().Gateway(ctx, "gw-a")
	if after.Version <= before.Version {
		t.Fatalf("no new version once the platform answered whole: v%d", after.Version)
	}
}
