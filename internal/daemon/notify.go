package daemon

import (
	"crypto/tls"
	"fmt"
	"log/slog"
	"strings"

	"github.com/edgegate/edgegate/internal/command"
	"github.com/edgegate/edgegate/internal/config"
)

// notifyOptions builds the Orion-subscription side of the downlink
// (commands.notify, docs/actuators.md): nil for mode none (polling only).
// Secrets read here are registered with redact before anything could log
// them.
func notifyOptions(c config.Commands, gateway string, redact func(...string), log *slog.Logger) (*command.NotifyOptions, error) {
	n := c.Notify
	var tr command.NotifyTransport
	switch n.Mode {
	case config.NotifyModeMQTT:
		m := &command.MQTTNotify{URL: n.MQTT.URL, OrionURL: n.MQTT.OrionURL, TopicPrefix: n.MQTT.TopicPrefix,
			Username: n.MQTT.Username, ClientID: "edgegate-notify-" + shortID(gateway), Logger: log}
		if n.MQTT.PasswordFile != "" {
			p, err := readSecretFile(n.MQTT.PasswordFile)
			if err != nil {
				return nil, fmt.Errorf("read commands.notify.mqtt.password_file: %w", err)
			}
			redact(p)
			m.Password = p
		}
		if strings.HasPrefix(n.MQTT.URL, "ssl://") || strings.HasPrefix(n.MQTT.URL, "mqtts://") {
			pool, err := loadPool(n.MQTT.CAFile)
			if err != nil {
				return nil, fmt.Errorf("load commands.notify.mqtt.ca_file: %w", err)
			}
			m.TLS = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
		}
		tr = m
	case config.NotifyModeHTTP:
		cert, err := tls.LoadX509KeyPair(n.HTTP.CertFile, n.HTTP.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("load commands.notify.http.cert_file and key_file: %w", err)
		}
		tr = &command.HTTPNotify{Listen: n.HTTP.Listen, PublicURL: n.HTTP.PublicURL, Logger: log,
			TLS: &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}}
	default:
		return nil, nil
	}
	return &command.NotifyOptions{Transport: tr, Expires: n.Expires, SafetyInterval: n.SafetyInterval, ReprobeMax: n.Reprobe}, nil
}

// shortID keeps a client id short (MQTT 3.1.1 servers may refuse over 23
// bytes; Mosquitto takes more, but a gateway id is a long thumbprint).
func shortID(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return id
}
