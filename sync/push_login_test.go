package centralsync

import (
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
)

// credsCentral is the companion's push-credentials endpoint in front of
// polCentral: status 0 answers 404 (a companion on its embedded broker).
type credsCentral struct {
	*polCentral
	status atomic.Int64
	gets   atomic.Int64
}

const polPushPassword = "push-pw-CANARY-19ad"

func (c *credsCentral) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path != PushCredentialsPath(polGateway) {
		c.polCentral.ServeHTTP(w, r)
		return
	}
	c.gets.Add(1)
	if strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ") != polToken {
		http.Error(w, "no", http.StatusUnauthorized)
		return
	}
	switch st := int(c.status.Load()); st {
	case 0:
		http.NotFound(w, r)
	case 200:
		json.NewEncoder(w).Encode(PushCredentials{Username: "edgegate-gw-" + polGateway, Password: polPushPassword, ClientID: "edgegate-" + polGateway})
	default:
		http.Error(w, "unavailable", st)
	}
}

// TestPushLogin: how the push loop logs in to central's broker. A
// companion on its embedded broker (404) means the token is the
// password, asked once per loop; a companion pushing through an external
// broker hands out credentials that the gateway keeps in its encrypted
// store (across restarts, without asking again) until the broker refuses
// them; a companion that fails gives no fallback to the token.
func TestPushLogin(t *testing.T) {
	e := newPolEnv(t)
	c := &credsCentral{polCentral: e.central}
	e.srv = e.tlsServer(c)
	ctx := context.Background()

	s := e.syncer(nil)
	var l pushLogin
	for range 2 {
		user, pass, cid, creds, err := s.login(ctx, &l)
		if err != nil || creds || pass != polToken || user != s.o.MQTTUsername || cid != "edgegate-"+polGateway {
			t.Fatalf("embedded companion: login %q/%q %q creds=%v err=%v", user, clipTest(pass, ""), cid, creds, err)
		}
	}
	if n := c.gets.Load(); n != 1 {
		t.Fatalf("embedded companion asked %d times for credentials, want once per loop", n)
	}

	c.status.Store(503)
	if _, _, _, _, err := s.login(ctx, &pushLogin{}); err == nil {
		t.Fatal("a failing companion: login fell back to the token")
	}

	c.status.Store(200)
	l = pushLogin{}
	user, pass, cid, creds, err := s.login(ctx, &l)
	if err != nil || !creds || user != "edgegate-gw-"+polGateway || pass != polPushPassword || cid != "edgegate-"+polGateway {
		t.Fatalf("external broker: login %q %q creds=%v err=%v", user, cid, creds, err)
	}
	asked := c.gets.Load()
	e.restart()
	s = e.syncer(nil)
	if _, pass, _, creds, err := s.login(ctx, &pushLogin{}); err != nil || !creds || pass != polPushPassword {
		t.Fatalf("after a restart: creds=%v err=%v", creds, err)
	}
	if c.gets.Load() != asked {
		t.Fatal("after a restart the gateway asked again instead of using its stored credentials")
	}
	l = pushLogin{}
	s.login(ctx, &l)
	s.forget(&l) // the broker refused them
	if _, _, _, creds, err := s.login(ctx, &l); err != nil || !creds || c.gets.Load() != asked+1 {
		t.Fatalf("after a refusal: creds=%v err=%v, asked %d times (want %d)", creds, err, c.gets.Load(), asked+1)
	}
}
