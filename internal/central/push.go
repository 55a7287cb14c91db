package central

import (
	"context"
	"crypto/tls"
	"fmt"
	"github.com/edgegate/edgegate/mqtt"
	"net"
	"time"

	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"

	centralsync "github.com/edgegate/edgegate/sync"
)

// The push channel, as sync/push.go subscribes to it: MQTT over TLS,
// username = the gateway's OAuth client id, password = its access token
// (verified like the API's, azp must be the username); a gateway may
// subscribe only to edgegate/gateways/{its id}/policy; clients never
// publish. Each new bundle is published there retained, QoS 1, so a
// gateway that reconnects gets the newest at once.
type pushBroker struct {
	srv *mochi.Server
	url string
}

// StartPush starts the embedded broker on addr with cert and republishes
// every stored bundle (retained messages do not survive a restart).
func (s *Service) StartPush(addr string, cert tls.Certificate) (string, error) {
	srv := mochi.New(&mochi.Options{InlineClient: true, Logger: s.log.With("component", "central-mqtt")})
	if err := srv.AddHook(&pushAuthHook{s: s}, nil); err != nil {
		return "", fmt.Errorf("push broker: %w", err)
	}
	tcp := listeners.NewTCP(listeners.Config{ID: "central-push", Address: addr,
		TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}})
	if err := srv.AddListener(tcp); err != nil {
		return "", fmt.Errorf("push broker: listen %s: %w", addr, err)
	}
	if err := srv.Serve(); err != nil {
		srv.Close()
		return "", fmt.Errorf("push broker: %w", err)
	}
	host, port, _ := net.SplitHostPort(tcp.Address())
	if ip := net.ParseIP(host); ip == nil || ip.IsUnspecified() {
		host = "127.0.0.1"
	}
	pb := &pushBroker{srv: srv, url: "tls://" + net.JoinHostPort(host, port)}
	s.push = pb
	if recs, err := s.store.Gateways(context.Background()); err == nil {
		for _, r := range recs {
			if r.Bundle != "" {
				_ = s.push.publish(r.ID, r.Bundle)
			}
		}
	}
	s.log.Info("push broker listening", "url", pb.url)
	return pb.url, nil
}

// publisher publishes a gateway's bundle retained on its push topic.
type publisher interface {
	publish(gw, bundle string) error
	close()
}

func (p *pushBroker) close() { _ = mqtt.CloseServer(p.srv, "central-push") }

func (p *pushBroker) publish(gw, bundle string) error {
	if err := p.srv.Publish(centralsync.PushTopic(gw), []byte(bundle), true, 1); err != nil {
		return fmt.Errorf("publish to %s: %w", centralsync.PushTopic(gw), err)
	}
	return nil
}

func gatewayOfTopic(topic string) (string, bool) {
	gw, ok := centralsync.GatewayOfTopic(topic)
	return gw, ok && gatewayIDRE.MatchString(gw)
}

type pushAuthHook struct {
	mochi.HookBase
	s *Service
}

func (h *pushAuthHook) ID() string { return "edgegate-central-auth" }

func (h *pushAuthHook) Provides(b byte) bool {
	return b == mochi.OnConnectAuthenticate || b == mochi.OnACLCheck
}

func (h *pushAuthHook) OnConnectAuthenticate(cl *mochi.Client, pk packets.Packet) bool {
	user := string(pk.Connect.Username)
	azp, err := h.s.tokens.account(string(pk.Connect.Password))
	if err == nil && (user == "" || azp != user) {
		err = fmt.Errorf("token was issued to %q, not to %q", azp, clip(user))
	}
	if err != nil {
		h.s.log.Info("push broker refused a connection", "username", clip(user), "remote", cl.Net.Remote, "err", err)
		return false
	}
	return true
}

func (h *pushAuthHook) OnACLCheck(cl *mochi.Client, topic string, write bool) bool {
	account := string(cl.Properties.Username)
	if write {
		h.s.log.Info("push broker refused a publish", "account", account, "topic", clip(topic))
		return false
	}
	gw, ok := gatewayOfTopic(topic)
	var err error
	if !ok {
		err = fmt.Errorf("not a gateway policy topic")
	} else {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		err = h.s.authorize(ctx, gw, account)
		cancel()
	}
	if err != nil {
		h.s.log.Info("push broker refused a subscription", "account", account, "topic", clip(topic), "err", err)
		return false
	}
	return true
}
