package centralsync

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/eclipse/paho.mqtt.golang/packets"

	"github.com/edgegate/edgegate/internal/backoff"
)

// PushTopic is the topic central ops publish a gateway's policy messages
// on: a compact JWS bundle, or {"type":"sync"} to ask for a poll now.
func PushTopic(gateway string) string { return "edgegate/gateways/" + gateway + "/policy" }

// GatewayOfTopic is the inverse of PushTopic: the gateway segment, when
// topic has PushTopic's form. The caller validates the id (which must
// refuse the MQTT wildcards + and #).
func GatewayOfTopic(topic string) (string, bool) {
	rest, ok := strings.CutPrefix(topic, "edgegate/gateways/")
	if !ok {
		return "", false
	}
	gw, ok := strings.CutSuffix(rest, "/policy")
	if !ok || gw == "" || strings.Contains(gw, "/") {
		return "", false
	}
	return gw, true
}

// ETagMatches implements If-None-Match (RFC 9110 §13.1.2, weak comparison)
// for central's policy endpoint, which the Syncer polls conditionally.
func ETagMatches(header, etag string) bool {
	for _, t := range strings.Split(header, ",") {
		t = strings.TrimPrefix(strings.TrimSpace(t), "W/")
		if t == "*" || t == etag {
			return true
		}
	}
	return false
}

// Push through an external broker (edgegate-central push.mode: external).
// Mosquitto cannot check an SSO token, so the companion gives each
// gateway an account of its own on the operator's broker and hands the
// credentials over its authenticated HTTPS API:
//
//	GET {central}/edgegate/v1/gateways/{gw}/push-credentials
//	    Authorization: Bearer <gateway account token>
//	    200 application/json PushCredentials (Cache-Control: no-store)
//	    404 the companion pushes on its own broker: the password is the
//	        access token, as before.
//
// The gateway keeps them in its encrypted store (StatePushCredentials), so
// that a broker restart does not send the whole fleet to the companion at
// once; it asks again only when the broker refuses them.
const StatePushCredentials = "push-credentials"

// PushCredentials is the gateway's account on central's external broker.
// Password is a secret: it never appears in logs or errors.
type PushCredentials struct {
	Username string `json:"username"`
	Password string `json:"password"`
	// ClientID is the only client id the broker accepts for Username (so
	// that no other account can take the gateway's session over).
	ClientID string `json:"client_id"`
}

// PushCredentialsPath is the companion's path of gw's push credentials.
func PushCredentialsPath(gw string) string {
	return "/edgegate/v1/gateways/" + gw + "/push-credentials"
}

// pushLogin is how the push loop logs in; it lives as long as the loop.
type pushLogin struct {
	creds     *PushCredentials // from the companion, else nil
	tokenMode bool             // the companion answered 404: the password is the token
}

// login returns the username, password and client id of the next session,
// and whether they are the companion's credentials (else a token).
func (s *Syncer) login(ctx context.Context, l *pushLogin) (user, pass, clientID string, creds bool, err error) {
	if s.o.Source == SourceBundle && s.o.CentralURL != "" && !l.tokenMode {
		if l.creds == nil {
			if b, ok, err := s.o.Store.GetState(StatePushCredentials); err == nil && ok {
				var c PushCredentials
				if json.Unmarshal(b, &c) == nil && c.Username != "" && c.Password != "" {
					l.creds = &c
				}
			}
		}
		if l.creds == nil {
			c, found, err := s.fetchPushCredentials(ctx)
			if err != nil {
				return "", "", "", false, err
			}
			if found {
				b, _ := json.Marshal(c)
				if err := s.o.Store.PutState(StatePushCredentials, b); err != nil {
					s.log.Warn("push credentials not kept in the store; asking again at the next connect", "err", err)
				}
				l.creds = &c
			} else {
				l.tokenMode = true
			}
		}
		if l.creds != nil {
			cid := l.creds.ClientID
			if cid == "" {
				cid = "edgegate-" + s.o.Gateway
			}
			return l.creds.Username, l.creds.Password, cid, true, nil
		}
	}
	tctx, cancel := context.WithTimeout(ctx, tokenWait)
	tok, err := s.o.Tokens.Token(tctx)
	cancel()
	if err != nil {
		return "", "", "", false, err
	}
	return s.o.MQTTUsername, tok, "edgegate-" + s.o.Gateway, false, nil
}

// fetchPushCredentials asks the companion; found is false on 404 (it
// pushes on its own broker, with tokens).
func (s *Syncer) fetchPushCredentials(ctx context.Context) (PushCredentials, bool, error) {
	var c PushCredentials
	target := strings.TrimRight(s.o.CentralURL, "/") + PushCredentialsPath(s.o.Gateway)
	rctx, cancel := context.WithTimeout(ctx, defaultHTTPTimeout)
	defer cancel()
	resp, body, err := s.do(rctx, "GET", target, nil, nil)
	if err != nil {
		return c, false, err
	}
	switch {
	case resp.StatusCode == 404:
		return c, false, nil
	case resp.StatusCode != 200:
		return c, false, fmt.Errorf("GET %s: status %d", redactURL(target), resp.StatusCode)
	}
	if err := json.Unmarshal(body, &c); err != nil || c.Username == "" || c.Password == "" {
		return c, false, fmt.Errorf("GET %s: not push credentials", redactURL(target))
	}
	return c, true, nil
}

// forget drops credentials the broker refused: the next session asks the
// companion again (it may have re-created the account).
func (s *Syncer) forget(l *pushLogin) {
	l.creds, l.tokenMode = nil, false
	if err := s.o.Store.PutState(StatePushCredentials, []byte("{}")); err != nil {
		s.log.Warn("forget refused push credentials", "err", err)
	}
}

// pushMessage is the JSON form of a push message.
type pushMessage struct {
	Type string `json:"type"`
}

// pushLoop keeps one session with central's broker at a time and
// reconnects with backoff. Each session is a new paho client with a fresh
// token as password, so an expired token is never reused; paho's own
// reconnect is off for that reason.
func (s *Syncer) pushLoop(ctx context.Context) {
	bo := backoff.New(time.Second, 2*time.Minute)
	var login pushLogin
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		}
		connected, err := s.pushSession(ctx, &login)
		if ctx.Err() != nil {
			return
		}
		if connected {
			bo.Reset()
		}
		s.limited.Log(ctx, levelWarn, "push-session", "policy push channel down; reconnecting", "err", err)
		timer.Reset(bo.Fail())
	}
}

// pushSession connects, subscribes, polls once (to catch what was pushed
// while disconnected) and then waits for the connection to end.
func (s *Syncer) pushSession(ctx context.Context, login *pushLogin) (connected bool, err error) {
	user, pass, clientID, creds, err := s.login(ctx, login)
	if err != nil {
		return false, err
	}
	lost := make(chan error, 1)
	opts := paho.NewClientOptions().
		AddBroker(s.o.MQTTURL).
		SetClientID(clientID).
		SetUsername(user).
		SetPassword(pass).
		SetTLSConfig(s.o.MQTTTLS).
		SetCleanSession(true).
		SetAutoReconnect(false).
		SetConnectRetry(false).
		SetConnectTimeout(mqttWait).
		SetWriteTimeout(mqttWait).
		SetKeepAlive(30 * time.Second).
		SetPingTimeout(10 * time.Second).
		SetOrderMatters(false).
		SetConnectionLostHandler(func(_ paho.Client, err error) {
			select {
			case lost <- err:
			default:
			}
		})
	c := paho.NewClient(opts)
	ct := c.Connect()
	if !ct.WaitTimeout(mqttWait) {
		c.Disconnect(0)
		return false, fmt.Errorf("connect to %s: no answer within %s", redactURL(s.o.MQTTURL), mqttWait)
	}
	if err := ct.Error(); err != nil {
		if errors.Is(err, packets.ErrorRefusedNotAuthorised) || errors.Is(err, packets.ErrorRefusedBadUsernameOrPassword) {
			if creds {
				s.forget(login)
			} else {
				s.o.Tokens.Invalidate(pass)
				// A companion that moved to an external broker answers
				// with credentials now.
				login.tokenMode = false
			}
		}
		return false, fmt.Errorf("connect to %s: %w", redactURL(s.o.MQTTURL), err)
	}
	defer c.Disconnect(250) // bounded: at most 250 ms to quiesce
	topic := PushTopic(s.o.Gateway)
	st := c.Subscribe(topic, 1, s.onPush)
	if !st.WaitTimeout(mqttWait) {
		return false, fmt.Errorf("subscribe to %s: no answer within %s", topic, mqttWait)
	}
	if err := st.Error(); err != nil {
		return false, fmt.Errorf("subscribe to %s: %w", topic, err)
	}
	if st, ok := st.(*paho.SubscribeToken); ok && st.Result()[topic] == 0x80 {
		return false, fmt.Errorf("subscribe to %s: refused by the broker", topic)
	}
	s.setPushConnected(true)
	defer s.setPushConnected(false)
	s.log.Info("policy push channel connected", "broker", redactURL(s.o.MQTTURL), "topic", topic)
	s.Nudge()
	select {
	case <-ctx.Done():
		return true, nil
	case err := <-lost:
		return true, fmt.Errorf("connection to %s lost: %w", redactURL(s.o.MQTTURL), err)
	}
}

func (s *Syncer) setPushConnected(v bool) {
	s.mu.Lock()
	s.st.PushConnected = v
	s.mu.Unlock()
}

// onPush runs on paho's goroutine: it only sorts the message and hands it
// over, never blocks.
func (s *Syncer) onPush(_ paho.Client, msg paho.Message) {
	payload := bytes.TrimSpace(msg.Payload())
	if len(payload) > 0 && payload[0] == '{' {
		var pm pushMessage
		if err := json.Unmarshal(payload, &pm); err != nil || pm.Type != "sync" {
			s.limited.Log(context.Background(), slog.LevelInfo, "push-unknown", "push message ignored",
				"type", clip(pm.Type), "bytes", len(payload))
			return
		}
		s.Nudge()
		return
	}
	if s.o.Source != SourceBundle {
		s.limited.Log(context.Background(), slog.LevelInfo, "push-bundle-ignored",
			"pushed bundle ignored: the policy source is not bundle")
		return
	}
	b := append([]byte(nil), payload...)
	select {
	case s.pushed <- b:
	default:
		// Too many at once: a poll fetches the latest instead.
		s.limited.Log(context.Background(), levelWarn, "push-full", "push queue full; polling instead")
		s.Nudge()
	}
}
