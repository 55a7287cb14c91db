package policy

import (
	"errors"
	"testing"
)

func TestCommandableAttributes(t *testing.T) {
	act := reg("relay", "alice")
	act.Kind = KindActuator
	some := reg("valve", "alice")
	some.Kind, some.Writable = KindActuator, []string{"open"}
	sensor := reg("th", "alice")
	sensorW := reg("th-w", "alice")
	sensorW.Writable = []string{"setpoint"}
	p, err := New(0, "config", []Registration{act, some, sensor, sensorW})
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		dev, attr   string
		commandable bool
		writes      bool
	}{
		{"relay", "status", true, true},
		{"relay", "latitude", true, false}, // the directory's location, never a command
		{"relay", "longitude", true, false},
		{"valve", "open", true, true},
		{"valve", "status", true, false},
		{"th", "temperature", false, false},
		{"th-w", "setpoint", true, true},
		{"th-w", "temperature", true, false},
	} {
		d, _ := p.Device(tt.dev)
		if d.Commandable() != tt.commandable || d.Writes(tt.attr) != tt.writes {
			t.Errorf("%s: Commandable() = %v, Writes(%q) = %v; want %v, %v", tt.dev, d.Commandable(), tt.attr, d.Writes(tt.attr), tt.commandable, tt.writes)
		}
	}
}

func TestActuatorFieldsChecked(t *testing.T) {
	bad := reg("x", "alice")
	bad.Kind = "switch"
	if _, err := New(0, "config", []Registration{bad}); !errors.Is(err, ErrInvalid) {
		t.Errorf("kind switch: err = %v, want ErrInvalid", err)
	}
	bad = reg("x", "alice")
	bad.Writable = []string{"a b"}
	if _, err := New(0, "config", []Registration{bad}); !errors.Is(err, ErrInvalid) {
		t.Errorf("writable %q: err = %v, want ErrInvalid", "a b", err)
	}
}
