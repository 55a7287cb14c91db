package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/edgegate/edgegate/internal/sim/centralsim"
	"github.com/edgegate/edgegate/internal/sim/radiosim"
)

// The demo's actuator step (docs/actuators.md): a relay on the MySensors
// node 1, child radiosim.RelayChild, registered as alice's device of kind
// actuator, switched from the platform side.

const demoRelay = "relay-attic"

// demoRelayDevice is the relay as the platform registers it.
func demoRelayDevice() centralsim.Device {
	return centralsim.Device{ID: demoRelay, Type: "Relay", Owner: demoAccount, K1: uuidLike(), K2: uuidLike(), Attrs: []string{"status"}}
}

// demoRelayBind is the `edgegate device bind` of the relay: its kind and
// its radio node and child.
func demoRelayBind(cfgPath, link string) []string {
	return []string{"bind", "--config", cfgPath, "--type", "Relay", "--kind", "actuator", "--writable", "status",
		"--radio-port", link, "--radio-node", "1", "--radio-child", fmt.Sprint(radiosim.RelayChild), demoRelay}
}

// demoActuator switches the relay on from the platform side, as alice's
// IoT App would: a PATCH of the relay's entity through the Orion Broker
// Filter with her token. The gateway reads the entity back, sends the node
// a set with the ack flag, and writes the node's echo back to the entity,
// signed. It returns what differs from that outcome.
func demoActuator(ctx context.Context, sim *centralsim.Server, rsim *radiosim.Sim, out *lineWriter) []string {
	const body = `{"status":{"value":true,"type":"Boolean"}}`
	out.printf("▶ actuator: alice's IoT App switches %s on from the platform side", demoRelay)
	tok, err := sim.IssueAccessToken(demoAccount, time.Minute, "nodered")
	if err != nil {
		return []string{"actuator: " + err.Error()}
	}
	url := sim.BrokerURL() + "/v2/entities/" + demoRelay + "/attrs"
	req, err := http.NewRequestWithContext(ctx, http.MethodPatch, url, strings.NewReader(body))
	if err != nil {
		return []string{"actuator: " + err.Error()}
	}
	req.Header.Set("Authorization", "Bearer "+tok)
	req.Header.Set("Content-Type", "application/json")
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: sim.CAPool()}}}
	resp, err := client.Do(req)
	if err != nil {
		return []string{"actuator: PATCH: " + err.Error()}
	}
	answer, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<10))
	resp.Body.Close()
	out.printf("  PATCH %s %s → %d %s", url, body, resp.StatusCode, bytes.TrimSpace(answer))
	if resp.StatusCode != http.StatusNoContent {
		return []string{fmt.Sprintf("actuator: the owner's PATCH was answered %d", resp.StatusCode)}
	}
	var switched, confirmed bool
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	deadline := time.After(20 * time.Second)
	for !switched || !confirmed {
		if !switched && slices.Contains(rsim.Stats().RelaySets, "1/2=1") {
			switched = true
			out.printf("  radio → node 1 child 2: 1;2;1;1;2;1 (set V_STATUS on, ack requested); the node echoed it")
		}
		if !confirmed {
			for _, u := range sim.Updates() {
				if u.Device == demoRelay && u.Verdict == centralsim.VerdictValid && bytes.Contains(u.Attrs["status"], []byte(`true`)) {
					confirmed = true
					var a struct {
						Value any `json:"value"`
					}
					_ = json.Unmarshal(u.Attrs["status"], &a)
					out.printf("  broker ← %s status=%v: the relay's reported state, signature %s (gateway %s, seq %d)", demoRelay, a.Value, u.Verdict, u.Gateway, u.Seq)
					break
				}
			}
		}
		select {
		case <-ctx.Done():
			return nil // interrupted: not judged
		case <-deadline:
			var problems []string
			if !switched {
				problems = append(problems, "actuator: the relay never got the command")
			}
			if !confirmed {
				problems = append(problems, "actuator: the relay's state did not come back signed")
			}
			return problems
		case <-tick.C:
		}
	}
	return nil
}
