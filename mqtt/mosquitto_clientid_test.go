package mqtt

import (
	"os"
	"os/exec"
	"regexp"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/edgegate/edgegate/internal/mosquittotest"
)

// TestMosquittoClientIDTakeover is the external-mode side of "a client id
// belongs to one principal": Mosquitto binds a session to its client id,
// not to the account, so device b1 presenting a1's client id would end
// a1's connection and take its session. packaging/mosquitto/
// edgegate-dynsec.conf sets use_username_as_clientid, which makes every
// account's client id its user name; this test runs Mosquitto with that
// line and without it, so it fails if the shipped setting stops working.
func TestMosquittoClientIDTakeover(t *testing.T) {
	shipped, err := os.ReadFile("../packaging/mosquitto/edgegate-dynsec.conf")
	if err != nil || !regexp.MustCompile(`(?m)^use_username_as_clientid true$`).Match(shipped) {
		t.Fatalf("packaging/mosquitto/edgegate-dynsec.conf must set use_username_as_clientid true (%v)", err)
	}
	for _, tc := range []struct {
		name      string
		conf      []string
		takenOver bool
	}{
		{"stock Mosquitto", nil, true},
		{"edgegate-dynsec.conf", []string{"use_username_as_clientid true"}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const admin = "edgegate"
			mq := mosquittotest.Start(t, admin, tc.conf...)
			host, port, _ := strings.Cut(mq.Addr, ":")
			for _, u := range []string{"a1", "b1"} {
				if out, err := exec.Command("mosquitto_ctrl", "-h", host, "-p", port, "-u", admin, "-P", mosquittotest.AdminPassword,
					"dynsec", "createClient", u, "-p", "pw-"+u+"-0123456789").CombinedOutput(); err != nil {
					t.Fatalf("mosquitto_ctrl createClient %s: %v %s", u, err, out)
				}
			}
			lost := make(chan struct{}, 1)
			connect := func(user string, onLost func()) paho.Client {
				o := paho.NewClientOptions().AddBroker(mq.URL).SetClientID("a1").SetUsername(user).
					SetPassword("pw-" + user + "-0123456789").SetCleanSession(false).SetAutoReconnect(false).
					SetConnectionLostHandler(func(paho.Client, error) {
						if onLost != nil {
							onLost()
						}
					})
				c := paho.NewClient(o)
				if err := waitToken(c.Connect(), 5*time.Second); err != nil {
					t.Fatalf("%s: %v", user, err)
				}
				return c
			}
			a1 := connect("a1", func() { lost <- struct{}{} })
			defer a1.Disconnect(0)
			b1 := connect("b1", nil) // the attack: a1's client id, b1's account
			defer b1.Disconnect(0)
			select {
			case <-lost:
				if !tc.takenOver {
					t.Fatal("b1 presenting a1's client id ended a1's session")
				}
			case <-time.After(2 * time.Second):
				if tc.takenOver {
					t.Fatal("stock Mosquitto no longer hands a client id to another account: revisit the shipped setting")
				}
			}
		})
	}
}
