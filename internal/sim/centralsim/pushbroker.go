package centralsim

import (
	"crypto/tls"
	"fmt"
	"github.com/edgegate/edgegate/mqtt"
	"net"

	centralsync "github.com/edgegate/edgegate/sync"
	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"
)

// The push channel of policy sync: an MQTT broker (mochi-mqtt) on a TLS
// listener with the HTTPS server's certificate (same CA).
//
//   - CONNECT: username = an OAuth client id, password = a valid access
//     token issued to that client (verified as the filter does; azp must
//     be the username). Anything else is refused at CONNECT. The token is
//     checked at CONNECT only: a session outlives its token's expiry.
//   - SUBSCRIBE: only to edgegate/gateways/{gw}/policy, exact, where gw is
//     the gateway the client is the account of (Options.Gateways, or bound
//     on first use as for the HTTP endpoints). Wildcards are refused: a
//     pushed bundle holds K1/K2 and must reach its gateway only.
//   - PUBLISH by clients: refused; only ops publish, through Push. A
//     CONNECT carrying a will is refused too (a will is a publish).
//   - A client id whose session (connected or kept) belongs to another
//     account is refused at CONNECT (0x05).
//
// Push(gw, true) sends the current compact JWS bundle; Push(gw, false) a
// nudge {"type":"sync"} after which the gateway polls. QoS 1, not retained:
// a gateway that is offline catches up by polling when it reconnects.

// NudgePayload is what Push sends when bundle is false.
const NudgePayload = `{"type":"sync"}`

// PushTopic is the topic gateway gw subscribes to.
func PushTopic(gw string) string { return centralsync.PushTopic(gw) }

// gatewayOfTopic is the inverse of PushTopic; wildcards never match.
func gatewayOfTopic(topic string) (string, bool) {
	gw, ok := centralsync.GatewayOfTopic(topic)
	return gw, ok && gatewayIDRE.MatchString(gw)
}

type pushBroker struct {
	srv *mochi.Server
	url string
}

func (s *Server) startPushBroker(cert tls.Certificate) (*pushBroker, error) {
	srv := mochi.New(&mochi.Options{
		InlineClient: true, // Push publishes through it, past the ACL
		Logger:       s.opts.Logger.With("component", "central-mqtt"),
	})
	if err := srv.AddHook(&pushAuthHook{s: s, srv: srv}, nil); err != nil {
		return nil, fmt.Errorf("push broker: %w", err)
	}
	tcp := listeners.NewTCP(listeners.Config{ID: "central-push", Address: s.opts.MQTTListen, TLSConfig: tlsConfig(cert)})
	if err := srv.AddListener(tcp); err != nil {
		return nil, fmt.Errorf("push broker: listen %s: %w", s.opts.MQTTListen, err)
	}
	if err := srv.Serve(); err != nil {
		srv.Close()
		return nil, fmt.Errorf("push broker: %w", err)
	}
	host, port, _ := net.SplitHostPort(tcp.Address())
	if ip := net.ParseIP(host); ip == nil || ip.IsUnspecified() {
		host = "127.0.0.1"
	}
	p := &pushBroker{srv: srv, url: "tls://" + net.JoinHostPort(host, port)}
	s.log.Info("central-sim push broker listening", "url", p.url)
	return p, nil
}

func (p *pushBroker) close() { _ = mqtt.CloseServer(p.srv, "central-push") }

// MQTTURL is the push broker's URL, "tls://127.0.0.1:port"; empty when it
// is not running.
func (s *Server) MQTTURL() string {
	if s.push == nil {
		return ""
	}
	return s.push.url
}

// Push publishes to gw's push topic (QoS 1, not retained) its current
// bundle (bundle true) or a nudge to poll.
func (s *Server) Push(gw string, bundle bool) error {
	if s.push == nil {
		return ErrPushDisabled
	}
	if !gatewayIDRE.MatchString(gw) {
		return fmt.Errorf("centralsim: push: gateway id must match %s: %q", gatewayIDRE, gw)
	}
	payload := []byte(NudgePayload)
	if bundle {
		compact, err := s.PublishBundle(gw)
		if err != nil {
			return fmt.Errorf("centralsim: push: %w", err)
		}
		payload = []byte(compact)
	}
	if err := s.push.srv.Publish(PushTopic(gw), payload, false, 1); err != nil {
		return fmt.Errorf("centralsim: push: %w", err)
	}
	s.log.Info("policy push", "gateway", gw, "bundle", bundle)
	return nil
}

// pushAuthHook authenticates gateways with their access tokens and keeps
// each on its own topic.
type pushAuthHook struct {
	mochi.HookBase
	s   *Server
	srv *mochi.Server // its sessions; nil in unit tests of the hook
}

func (h *pushAuthHook) ID() string { return "central-sim-auth" }

func (h *pushAuthHook) Provides(b byte) bool {
	return b == mochi.OnConnectAuthenticate || b == mochi.OnACLCheck
}

func (h *pushAuthHook) OnConnectAuthenticate(cl *mochi.Client, pk packets.Packet) bool {
	client := string(pk.Connect.Username)
	_, azp, err := h.s.verifyToken(string(pk.Connect.Password))
	switch {
	case err != nil:
	case client == "" || azp != client:
		err = fmt.Errorf("token was issued to %q, not to %q", azp, client)
	default:
		if _, known := h.s.clients[client]; !known {
			err = fmt.Errorf("%q is not a client", client)
		}
	}
	if err == nil && h.srv != nil {
		// A client id is bound to the account whose session holds it:
		// another account would inherit its subscription and the bundles
		// (K1/K2) in flight to it, which mochi resends without OnACLCheck.
		if existing, ok := h.srv.Clients.Get(cl.ID); ok && string(existing.Properties.Username) != client {
			err = fmt.Errorf("client id %q belongs to another account's session", cl.ID)
		}
	}
	if err == nil && pk.Connect.WillFlag {
		// A will is a publish, and clients publish nothing here: mochi
		// would publish it at disconnect without OnACLCheck (server.go
		// sendLWT), onto another gateway's policy topic. Refused with
		// CONNACK 0x05 not authorized rather than silently dropped.
		err = fmt.Errorf("a will (topic %q) but clients may not publish", pk.Connect.WillTopic)
	}
	if err != nil {
		h.s.log.Info("push broker refused a connection", "client", client, "remote", cl.Net.Remote, "err", err)
		return false
	}
	return true
}

func (h *pushAuthHook) OnACLCheck(cl *mochi.Client, topic string, write bool) bool {
	client := string(cl.Properties.Username)
	if write {
		h.s.log.Info("push broker refused a publish", "client", client, "topic", topic)
		return false
	}
	gw, ok := gatewayOfTopic(topic)
	var err error
	if !ok {
		err = fmt.Errorf("not a gateway policy topic")
	} else {
		h.s.mu.Lock()
		err = h.s.authorizeGatewayLocked(client, gw)
		h.s.mu.Unlock()
	}
	if err != nil {
		h.s.log.Info("push broker refused a subscription", "client", client, "topic", topic, "err", err)
		return false
	}
	return true
}
