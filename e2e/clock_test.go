package e2e

import (
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/testkit"
)

// TestClockJumps: the gateway's wall clock jumps forward two hours, then
// back four, then returns (as a Raspberry Pi's clock does when time sync
// corrects it), under load. Tokens are refetched as needed; nothing
// acknowledged is lost, nothing is refused, and the daemon stays up.
func TestClockJumps(t *testing.T) {
	a, b := dev("cj-1", "alice"), dev("cj-2", "alice")
	sim := startSim(t, a, b)
	dir := t.TempDir()
	offset := filepath.Join(dir, "clock-offset")
	os.WriteFile(offset, []byte("0s"), 0o600)
	t.Setenv("EDGEGATE_CLOCK_OFFSET_FILE", offset)
	g := startGateway(t, writeGatewayConfig(t, dir, sim, gatewayConfig{}, a, b))

	var mu sync.Mutex
	acked := map[string][]int{}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var sent atomic.Int64
	for _, d := range []testDevice{a, b} {
		p := newPublisher(t, "tcp://"+g.MQTT, d)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 1; i <= 2000; i++ {
				select {
				case <-stop:
					return
				case <-time.After(20 * time.Millisecond):
				}
				if p.publish(i) {
					sent.Add(1)
					mu.Lock()
					acked[d.ID] = append(acked[d.ID], i)
					mu.Unlock()
				}
			}
		}()
	}
	for _, jump := range []string{"2h", "-2h", "0s"} {
		fetches := scrape(t, g.Metrics, `edgegate_token_fetches_total{result="ok"}`)
		os.WriteFile(offset, []byte(jump), 0o600)
		// The daemon re-reads the offset at most once a second and says
		// nothing when it does (readings carry the device's or the
		// receive time, not the shifted clock): no condition to poll. The
		// +2h jump is proven below by the token refetch it forces.
		time.Sleep(1500 * time.Millisecond)
		before := sent.Load()
		testkit.Eventually(t, 15*time.Second, "readings acknowledged after the clock jumped "+jump, func() bool {
			return sent.Load() >= before+40
		})
		if jump == "2h" {
			// The cached access token (1 minute) is expired two hours on.
			testkit.Eventually(t, 10*time.Second, "a fresh token after the jump", func() bool {
				return scrape(t, g.Metrics, `edgegate_token_fetches_total{result="ok"}`) != fetches
			})
		}
	}
	close(stop)
	wg.Wait()
	testkit.Eventually(t, 30*time.Second, "every acknowledged reading at the broker", func() bool {
		d := delivered(sim)
		mu.Lock()
		defer mu.Unlock()
		for dev, ns := range acked {
			for _, n := range ns {
				if d[dev][n] == 0 {
					return false
				}
			}
		}
		return true
	})
	select {
	case <-g.done:
		t.Fatal("the daemon died during the clock jumps")
	default:
	}
	if err := g.term(); err != nil {
		t.Fatalf("SIGTERM exit = %v", err)
	}
	t.Logf("%d readings acknowledged across clock jumps of +2h, -2h, back; all delivered", sent.Load())
}
