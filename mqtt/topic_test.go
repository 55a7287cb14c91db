package mqtt

import "testing"

func TestTopic(t *testing.T) {
	tp, err := ParseTopic("devices/{device}/telemetry")
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		topic, device string
		ok            bool
	}{
		{"devices/th-1/telemetry", "th-1", true},
		{"devices//telemetry", "", false},
		{"devices/th-1/telemetry/x", "", false},
		{"devices/th-1", "", false},
		{"device/th-1/telemetry", "", false},
		{"devices/a/b/telemetry", "", false},
		{"", "", false},
	}
	for _, tt := range tests {
		d, ok := tp.Match(tt.topic)
		if d != tt.device || ok != tt.ok {
			t.Errorf("Match(%q) = %q, %v; want %q, %v", tt.topic, d, ok, tt.device, tt.ok)
		}
	}
	if f := tp.Filter(); f != "devices/+/telemetry" {
		t.Errorf("Filter() = %q", f)
	}
	if got := tp.For("x"); got != "devices/x/telemetry" {
		t.Errorf("For(x) = %q", got)
	}
	last, err := ParseTopic("sensors/{device}")
	if err != nil {
		t.Fatal(err)
	}
	if d, ok := last.Match("sensors/abc"); !ok || d != "abc" {
		t.Errorf("Match(sensors/abc) = %q, %v", d, ok)
	}
	for _, bad := range []string{"devices/+/{device}", "devices/telemetry", "{device}/{device}", "a/#/{device}"} {
		if _, err := ParseTopic(bad); err == nil {
			t.Errorf("ParseTopic(%q) = nil error", bad)
		}
	}
}
