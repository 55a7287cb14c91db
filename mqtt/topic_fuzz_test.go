package mqtt

import (
	"strings"
	"testing"
)

// FuzzTopicMatch: for any pattern that compiles and any topic a device
// publishes to (including the zero-length topic), Match never panics, a
// matched device id is one non-empty level, and For gives the topic back:
// no topic can be attributed to a device other than the one it names.
func FuzzTopicMatch(f *testing.F) {
	for _, s := range [][2]string{
		{"devices/{device}/telemetry", "devices/th-1/telemetry"},
		{"devices/{device}/telemetry", ""},
		{"devices/{device}/telemetry", "devices//telemetry"},
		{"devices/{device}/telemetry", "devices/a/b/telemetry"},
		{"devices/{device}/telemetry", "devices/+/telemetry"},
		{"devices/{device}/telemetry", "devices/#"},
		{"{device}", "x"},
		{"{device}", ""},
		{"{device}/", "x/"},
		{"/{device}", "/x"},
		{"a/{device}/{device}", "a/b/c"},
		{"", ""},
	} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, pattern, topic string) {
		tp, err := ParseTopic(pattern)
		if err != nil {
			return
		}
		dev, ok := tp.Match(topic)
		if !ok {
			return
		}
		if dev == "" || strings.Contains(dev, "/") {
			t.Fatalf("Match(%q) on %q = %q", topic, pattern, dev)
		}
		if got := tp.For(dev); got != topic {
			t.Fatalf("For(Match(%q)) = %q on pattern %q", topic, got, pattern)
		}
	})
}
