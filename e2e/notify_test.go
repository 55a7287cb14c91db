package e2e

import (
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/edgegate/edgegate/internal/mosquittotest"
	"github.com/edgegate/edgegate/internal/sim/centralsim"
	"github.com/edgegate/edgegate/internal/testkit"
	"github.com/edgegate/edgegate/internal/uplink"
)

// TestCommandsThroughSubscription runs the built daemon with
// commands.notify.mode mqtt: it subscribes through the simulated filter
// (Orion notifying a real Mosquitto with the subscription's user and
// passwd), an owner's PATCH reaches the MQTT light within seconds although
// commands.poll_interval is an hour, `edgegate status` says how commands
// are learned, and SIGTERM deletes the subscription. The broker password
// never reaches the log.
func TestCommandsThroughSubscription(t *testing.T) {
	const notifyPass = "notify-canary-pw-71c"
	dir := t.TempDir()
	pwFile := filepath.Join(dir, "mosquitto.passwd")
	if out, err := exec.Command("mosquitto_passwd", "-c", "-b", pwFile, "gw-notify", notifyPass).CombinedOutput(); err != nil {
		t.Fatalf("mosquitto_passwd: %v %s", err, out)
	}
	mb := mosquittotest.Start(t, "", "allow_anonymous false", "password_file "+pwFile)

	light := testDevice{ID: "light-e2e", Type: "Light", Owner: "alice", K1: "k1-canary-light-e2e", K2: "k2-canary-light-e2e"}
	sim := startSimWith(t, func(o *centralsim.Options) { o.Devices[0].Attrs = []string{"power"} }, light)
	if err := os.WriteFile(filepath.Join(dir, "notify.pw"), []byte(notifyPass+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfgPath := writeGatewayConfig(t, dir, sim, gatewayConfig{Extra: `commands:
  enabled: true
  poll_interval: 1h
  notify:
    mode: mqtt
    safety_interval: 1h
    mqtt:
      url: ` + mb.URL + `
      topic_prefix: edgegate/notify
      username: gw-notify
      password_file: notify.pw
`}, light)
	// The light is an actuator (devices[].kind), which writeGatewayConfig
	// does not write.
	devs := filepath.Join(dir, "devices.yaml")
	b, err := os.ReadFile(devs)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(devs, append(b, "    kind: actuator\n"...), 0o600); err != nil {
		t.Fatal(err)
	}
	g := startGateway(t, cfgPath)

	// The light listens on its command topic.
	c, err := connect("tcp://"+g.MQTT, "light-e2e-dev", light.ID, devicePassword(t, light))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Disconnect(100)
	var mu sync.Mutex
	var got []string
	if tok := c.Subscribe("devices/"+light.ID+"/cmd/+", 1, func(_ paho.Client, m paho.Message) {
		mu.Lock()
		got = append(got, string(m.Payload()))
		mu.Unlock()
	}); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe: %v", tok.Error())
	}

	testkit.Eventually(t, 20*time.Second, "the gateway's subscription at Orion", func() bool {
		subs := sim.Subscriptions()
		return len(subs) == 1 && subs[0].MQTTUser == "gw-notify" && subs[0].Entities[0] == light.ID
	})
	sock := filepath.Join(dir, "state", "admin.sock")
	testkit.Eventually(t, 10*time.Second, "status saying the subscription is live", func() bool {
		return strings.Contains(run(t, 0, "status", "--socket", sock), "learning: subscription (mqtt) live for 1 of 1 devices")
	})

	tok, err := sim.IssueAccessToken("alice", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	req, _ := http.NewRequest(http.MethodPatch, sim.BrokerURL()+"/v2/entities/"+light.ID+"/attrs", strings.NewReader(`{"power":{"value":"on","type":"Text"}}`))
	req.Header.Set("Authorization", "Bearer "+tok)
	req.Header.Set("Content-Type", "application/json")
	resp, err := uplink.NewHTTPClient(sim.CAPool(), 5*time.Second, 1).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 204 {
		t.Fatalf("PATCH: %d", resp.StatusCode)
	}
	start := time.Now()
	testkit.Eventually(t, 15*time.Second, "the command at the light", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(got) > 0 && strings.Contains(got[0], `"value":"on"`)
	})
	t.Logf("owner's PATCH to the light's command: %v (poll interval 1h)", time.Since(start).Round(time.Millisecond))

	if err := g.term(); err != nil {
		t.Fatalf("daemon exit: %v", err)
	}
	if subs := sim.Subscriptions(); len(subs) != 0 {
		t.Errorf("subscriptions left after SIGTERM: %+v", subs)
	}
	if strings.Contains(g.log.String(), notifyPass) {
		t.Error("the notification broker's password reached the daemon's log")
	}
}
