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
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		}
		connected, err := s.pushSession(ctx)
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
func (s *Syncer) pushSession(ctx context.Context) (connected bool, err error) {
	tctx, cancel := context.WithTimeout(ctx, tokenWait)
	tok, err := s.o.Tokens.Token(tctx)
	cancel()
	if err != nil {
		return false, err
	}
	lost := make(chan error, 1)
	opts := paho.NewClientOptions().
		AddBroker(s.o.MQTTURL).
		SetClientID("edgegate-" + s.o.Gateway).
		SetUsername(s.o.MQTTUsername).
		SetPassword(tok).
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
			s.o.Tokens.Invalidate(tok)
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
	if s.verifier == nil {
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
