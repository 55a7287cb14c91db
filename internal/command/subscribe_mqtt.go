package command

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"strings"
	"sync/atomic"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
)

// MQTTNotify takes Orion's notifications from an MQTT broker that both
// Orion and the gateway reach (commands.notify.mode mqtt). Orion publishes
// each device's notifications on TopicPrefix/<device> at QoS 1
// (notification.mqtt of the subscription, fiware-orion
// doc/manuals/user/mqtt_notifications.md); the gateway subscribes to
// TopicPrefix/+. Anyone else able to publish there can only make the
// gateway read an entity again (subscribe.go): notifications are hints.
type MQTTNotify struct {
	// URL is where the gateway connects (tcp://, ssl://, mqtt://, mqtts://).
	URL string
	// OrionURL is where Orion publishes: mqtt://host:port (Orion 3.12
	// speaks no MQTT over TLS); "" means URL with the mqtt scheme.
	OrionURL    string
	TopicPrefix string
	// Username and Password log the gateway in and go to Orion as the
	// subscription's user and passwd (Orion shows it masked); never logged.
	Username, Password string
	TLS                *tls.Config
	ClientID           string
	Logger             *slog.Logger

	live atomic.Bool
}

// Name implements NotifyTransport.
func (m *MQTTNotify) Name() string { return "mqtt" }

// Live implements NotifyTransport: connected and subscribed.
func (m *MQTTNotify) Live() bool { return m.live.Load() }

func (m *MQTTNotify) orionURL() string {
	if m.OrionURL != "" {
		return m.OrionURL
	}
	u, err := url.Parse(m.URL)
	if err != nil {
		return m.URL
	}
	return "mqtt://" + u.Host
}

// Target implements NotifyTransport.
func (m *MQTTNotify) Target(device string) map[string]any {
	mq := map[string]any{"url": m.orionURL(), "topic": m.TopicPrefix + "/" + device, "qos": 1}
	if m.Username != "" {
		mq["user"], mq["passwd"] = m.Username, m.Password
	}
	return map[string]any{"mqtt": mq}
}

// Run implements NotifyTransport: a paho client that reconnects by
// itself, subscribes on every connection (clean session: what was missed
// is recovered by resync, a read of every device) and passes each message
// on. Every paho wait is bounded.
func (m *MQTTNotify) Run(ctx context.Context, hint func([]byte), resync func()) error {
	if m.TopicPrefix == "" || strings.ContainsAny(m.TopicPrefix, "+#") {
		return fmt.Errorf("notify topic prefix %q: must be a topic without wildcards", m.TopicPrefix)
	}
	log := m.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	filter := m.TopicPrefix + "/+"
	o := paho.NewClientOptions().AddBroker(m.URL).SetClientID(m.ClientID).SetCleanSession(true).
		SetAutoReconnect(true).SetConnectRetry(true).SetConnectRetryInterval(2 * time.Second).
		SetMaxReconnectInterval(30 * time.Second).SetConnectTimeout(10 * time.Second).SetKeepAlive(30 * time.Second)
	// Messages are handled in order on paho's goroutine: hint never
	// blocks (a map under a lock and a non-blocking wake), so a flood
	// costs no goroutine per message.
	if m.Username != "" {
		o.SetUsername(m.Username).SetPassword(m.Password)
	}
	if m.TLS != nil {
		o.SetTLSConfig(m.TLS)
	}
	o.SetConnectionLostHandler(func(_ paho.Client, err error) {
		m.live.Store(false)
		log.Warn("lost the notification broker; learning commands by polling until it is back", "err", err)
	})
	o.SetOnConnectHandler(func(c paho.Client) {
		tok := c.Subscribe(filter, 1, func(_ paho.Client, msg paho.Message) {
			hint(append([]byte(nil), msg.Payload()...))
		})
		// Not on paho's own goroutine's time: the wait is bounded, and
		// a failure is retried by reconnecting.
		go func() {
			if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
				log.Warn("could not subscribe on the notification broker", "topic", filter, "err", tok.Error())
				c.Disconnect(100)
				return
			}
			if st, ok := tok.(*paho.SubscribeToken); ok && st.Result()[filter] == 0x80 {
				log.Warn("the notification broker refused the subscription", "topic", filter)
				return
			}
			m.live.Store(true)
			resync()
		}()
	})
	c := paho.NewClient(o)
	tok := c.Connect() // with ConnectRetry it keeps trying in the background
	select {
	case <-ctx.Done():
	case <-tok.Done():
		if err := tok.Error(); err != nil && !errors.Is(err, context.Canceled) {
			return fmt.Errorf("connect to the notification broker: %w", err)
		}
		<-ctx.Done()
	}
	m.live.Store(false)
	c.Disconnect(250)
	return nil
}
