// Package mqtt is the gateway's local MQTT link: the broker embedded in the
// daemon, and the ingest client (paho) for an external broker such as
// Mosquitto. Both hand readings to the same pipeline and acknowledge a
// reading to its sender only once it is durably queued or refused for good.
//
// Why the embedded broker ingests through a publish hook and not through a
// paho client: with a client in between, the broker would PUBACK the device
// as soon as the message is in its memory, and a crash before the client
// committed it would lose an acknowledged reading. The hook runs before the
// broker sends its PUBACK, so the acknowledgement means "on disk".
//
// paho's package is named mqtt too; it is imported here as paho.
package mqtt

import (
	"fmt"
	"strings"
)

// Topic is a compiled topic pattern with one {device} level, such as
// devices/{device}/telemetry.
type Topic struct {
	levels []string
	device int
}

// ParseTopic compiles a pattern; it must hold {device} exactly once as a
// whole level and no wildcards.
func ParseTopic(pattern string) (Topic, error) {
	levels := strings.Split(pattern, "/")
	t := Topic{levels: levels, device: -1}
	for i, l := range levels {
		switch {
		case l == "{device}":
			if t.device >= 0 {
				return Topic{}, fmt.Errorf("parse topic %q: {device} appears twice", pattern)
			}
			t.device = i
		case strings.ContainsAny(l, "+#{}"):
			return Topic{}, fmt.Errorf("parse topic %q: level %q has a wildcard or brace", pattern, l)
		}
	}
	if t.device < 0 {
		return Topic{}, fmt.Errorf("parse topic %q: no {device} level", pattern)
	}
	return t, nil
}

// Match returns the device id of a topic that has the pattern's shape.
func (t Topic) Match(topic string) (device string, ok bool) {
	rest := topic
	for i, l := range t.levels {
		var level string
		last := i == len(t.levels)-1
		if last {
			level, rest = rest, ""
			if strings.IndexByte(level, '/') >= 0 {
				return "", false
			}
		} else {
			j := strings.IndexByte(rest, '/')
			if j < 0 {
				return "", false
			}
			level, rest = rest[:j], rest[j+1:]
		}
		if i == t.device {
			if level == "" {
				return "", false
			}
			device = level
		} else if level != l {
			return "", false
		}
	}
	return device, true
}

// Filter is the subscription filter that matches every device's topic.
func (t Topic) Filter() string {
	out := make([]string, len(t.levels))
	copy(out, t.levels)
	out[t.device] = "+"
	return strings.Join(out, "/")
}

// For returns the topic of one device.
func (t Topic) For(device string) string {
	out := make([]string, len(t.levels))
	copy(out, t.levels)
	out[t.device] = device
	return strings.Join(out, "/")
}

// The command topics of a device (the downlink, internal/command): the
// reading pattern's levels up to and including {device}, then "cmd", then
// the attribute — devices/{device}/telemetry gives devices/th-1/cmd/status.
// One topic per attribute, so that each holds its own newest command
// retained. Should the reading pattern itself end in {device}/cmd, the
// command level is "command", so that a reading topic is never a command
// topic. Only the device itself may subscribe to its command topics
// (devices/th-1/cmd/+, devices/th-1/cmd/#, devices/th-1/#), and only the
// gateway publishes there (access.go).
func (t Topic) commandLevel() string {
	if rest := t.levels[t.device+1:]; len(rest) == 1 && rest[0] == "cmd" {
		return "command"
	}
	return "cmd"
}

// Command returns the command topic of one attribute of device.
func (t Topic) Command(device, attr string) string {
	out := make([]string, 0, t.device+3)
	out = append(out, t.levels[:t.device]...)
	out = append(out, device, t.commandLevel(), attr)
	return strings.Join(out, "/")
}

// MatchCommand returns the device whose command topic, or command topic
// filter, topic is: prefix/{device}/cmd/{attr}, where a filter may have a
// wildcard for the attribute level, or prefix/{device}/cmd/#. The device
// level is never a wildcard.
func (t Topic) MatchCommand(topic string) (device string, ok bool) {
	levels := strings.Split(topic, "/")
	if len(levels) != t.device+3 || levels[t.device+1] != t.commandLevel() {
		return "", false
	}
	for i := 0; i < t.device; i++ {
		if levels[i] != t.levels[i] {
			return "", false
		}
	}
	dev, attr := levels[t.device], levels[t.device+2]
	if dev == "" || strings.ContainsAny(dev, "+#") || attr == "" || (len(attr) > 1 && strings.ContainsAny(attr, "+#")) {
		return "", false
	}
	return dev, true
}
