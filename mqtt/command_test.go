package mqtt

import "testing"

func TestCommandTopic(t *testing.T) {
	tel, _ := ParseTopic("devices/{device}/telemetry")
	bare, _ := ParseTopic("site/{device}")
	clash, _ := ParseTopic("x/{device}/cmd")
	for _, tt := range []struct {
		name    string
		t       Topic
		dev     string
		attr    string
		want    string
		matches []string // further topics/filters that name dev's commands
		not     []string // never command topics
	}{
		{"telemetry pattern", tel, "th-1", "status", "devices/th-1/cmd/status",
			[]string{"devices/th-1/cmd/+", "devices/th-1/cmd/#"},
			[]string{"devices/th-1/telemetry", "devices/+/cmd/status", "devices/#", "devices/th-1/cmd", "devices/th-1/cmd/a/b", "devices//cmd/x", "other/th-1/cmd/x", "devices/th-1/cmd/", "devices/th-1/cmd/a+"}},
		{"device last", bare, "n1", "power", "site/n1/cmd/power", nil, []string{"site/n1", "site/+/cmd/power"}},
		{"reading pattern ending in cmd", clash, "d", "v", "x/d/command/v", nil, []string{"x/d/cmd", "x/d/cmd/v"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got := tt.t.Command(tt.dev, tt.attr)
			if got != tt.want {
				t.Fatalf("Command(%q, %q) = %q, want %q", tt.dev, tt.attr, got, tt.want)
			}
			for _, s := range append([]string{got}, tt.matches...) {
				if d, ok := tt.t.MatchCommand(s); !ok || d != tt.dev {
					t.Errorf("MatchCommand(%q) = %q, %v; want %q", s, d, ok, tt.dev)
				}
				if _, ok := tt.t.Match(s); ok {
					t.Errorf("command topic %q is also a reading topic", s)
				}
			}
			for _, s := range tt.not {
				if d, ok := tt.t.MatchCommand(s); ok {
					t.Errorf("MatchCommand(%q) = %q, want no match", s, d)
				}
			}
		})
	}
}

// FuzzCommandTopic: no topic is both a reading topic and a command topic,
// and a command topic names a device without wildcards.
func FuzzCommandTopic(f *testing.F) {
	for _, s := range []string{"devices/a/cmd/b", "devices/a/telemetry", "devices/+/cmd/#", "devices/a/cmd/#", "a/b/c/d"} {
		f.Add(s)
	}
	tel, _ := ParseTopic("devices/{device}/telemetry")
	f.Fuzz(func(t *testing.T, s string) {
		d, ok := tel.MatchCommand(s)
		if !ok {
			return
		}
		if _, r := tel.Match(s); r {
			t.Fatalf("%q is a reading and a command topic", s)
		}
		if d == "" || d == "+" || d == "#" {
			t.Fatalf("%q names device %q", s, d)
		}
	})
}
