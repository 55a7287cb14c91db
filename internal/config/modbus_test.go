package config

import (
	"os"
	"strings"
	"testing"
	"time"
)

const modbusDevice = `
devices:
  - {id: meter-1, type: EnergyMeter, owner: alice, k1: a, k2: b, broker: https://b.example/orion-1}
`

const modbusGood = `
radio:
  modbus:
    - path: /dev/ttyUSB1
      baud: 9600
      parity: none
      devices:
        - device: meter-1
          unit: 1
          period: 5s
          registers:
            - {attribute: voltage, function: input, address: 0, type: float32, word_order: little, unit: V}
            - {attribute: current, function: holding, address: 6, type: int16, scale: 0.01, offset: -1}
            - {attribute: relay, function: coil, address: 0, writable: true}
`

func TestModbusConfigLoads(t *testing.T) {
	dir := t.TempDir()
	c, err := Load(writeFile(t, dir, "edgegate.yaml", base+modbusDevice+modbusGood, 0o600))
	if err != nil {
		t.Fatalf("Load = %v", err)
	}
	l := c.Radio.Modbus[0]
	d := l.Devices[0]
	if l.Path != "/dev/ttyUSB1" || l.Baud != 9600 || l.Parity != "none" || d.Device != "meter-1" || d.Unit != 1 || d.Period != 5*time.Second {
		t.Errorf("line = %+v", l)
	}
	r := d.Registers[1]
	if r.Scale.Or1() != 0.01 || r.Offset != -1 || r.Type != "int16" || r.Address != 6 {
		t.Errorf("register 1 = %+v", r)
	}
	if d.Registers[0].Scale.Or1() != 1 || !d.Registers[2].Writable {
		t.Errorf("registers = %+v", d.Registers)
	}
}

// A malformed register map is refused with the key named, every problem
// at once.
func TestModbusConfigNamesTheKey(t *testing.T) {
	const reg0 = "address: 0, type: float32, word_order: little"
	tests := []struct {
		name, from, to, want string
	}{
		{"type", "type: float32", "type: float64",
			`radio.modbus[0].devices[0].registers[0].type is not one of int16, uint16, int32, uint32, float32: "float64"`},
		{"function", "function: input", "function: inputs",
			`radio.modbus[0].devices[0].registers[0].function is not one of holding, input, coil, discrete: "inputs"`},
		{"word order", "word_order: little", "word_order: middle",
			`radio.modbus[0].devices[0].registers[0].word_order must be big or little: "middle"`},
		{"address", reg0, "address: 65535, type: float32, word_order: little",
			`radio.modbus[0].devices[0].registers[0].address must be a protocol address between 0 and 65535`},
		{"unit", "unit: 1", "unit: 0", `radio.modbus[0].devices[0].unit must be a slave address between 1 and 247: "0"`},
		{"period", "period: 5s", "period: 10ms", `radio.modbus[0].devices[0].period must be between 100ms and 24h: "10ms"`},
		{"parity", "parity: none", "parity: mark", `radio.modbus[0].parity must be none, even or odd: "mark"`},
		{"baud", "baud: 9600", "baud: 9601", `radio.modbus[0].baud must be one of`},
		{"device", "device: meter-1", "device: meter-2",
			`radio.modbus[0].devices[0].device must be one of devices[].id (policy.source is config): "meter-2"`},
		{"writable", "writable: true}", "writable: true}\n            - {attribute: x, function: discrete, address: 1, writable: true}",
			`radio.modbus[0].devices[0].registers[3].writable only a holding register or a coil can be written`},
		{"scale", "scale: 0.01", "scale: 0", `radio.modbus[0].devices[0].registers[1].scale has a bad value (a number expected): must be a finite number other than 0 (absent: 1): "0"`},
		{"attribute twice", "attribute: current", "attribute: voltage",
			`radio.modbus[0].devices[0].registers[1].attribute is mapped twice: "voltage"`},
		{"unknown key", "unit: V", "units: V", `radio.modbus[0].devices[0].registers[0].units is not a known key`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if !strings.Contains(modbusGood, tt.from) {
				t.Fatalf("test edit %q not found", tt.from)
			}
			body := base + modbusDevice + strings.Replace(modbusGood, tt.from, tt.to, 1)
			_, err := Load(writeFile(t, t.TempDir(), "edgegate.yaml", body, 0o600))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("Load = %v\nwant an error containing %s", err, tt.want)
			}
		})
	}
}

func TestModbusLineRules(t *testing.T) {
	c := Default()
	c.Central = Central{TokenURL: "https://127.0.0.1:1/token", ClientID: "gw", ClientSecretFile: "/s"}
	c.Policy.Source = PolicyOwnership // devices come from the platform: no devices[] check
	c.Policy.Ownership = Ownership{URL: "https://o.example", Username: "gw", MaxAge: time.Hour, Brokers: map[string]string{"orion-1": "https://b.example"}}
	c.Radio.Ports = []RadioPort{{Path: "/dev/ttyUSB0"}}
	reg := []ModbusRegister{{Attribute: "x", Function: "holding", Type: "uint16"}}
	c.Radio.Modbus = []ModbusLine{
		{Path: "/dev/ttyUSB0", Devices: []ModbusDevice{{Device: "a", Unit: 1, Registers: reg}, {Device: "b", Unit: 1, Registers: reg}}},
		{Path: "/dev/ttyUSB2", StopBits: 3, Timeout: time.Minute, Devices: []ModbusDevice{{Device: "a", Unit: 2}}},
		{Path: "/dev/ttyUSB2"},
	}
	err := c.Validate()
	for _, want := range []string{
		`radio.modbus[0].path is also a radio.ports path`,
		`radio.modbus[0].devices[1].unit is used twice on this line`,
		`radio.modbus[1].stop_bits must be 1 or 2`,
		`radio.modbus[1].timeout must be between 10ms and 10s`,
		`radio.modbus[1].devices[0].device is given twice`,
		`radio.modbus[1].devices[0].registers must map at least one attribute`,
		`radio.modbus[2].path is given twice`,
		`radio.modbus[2].devices must list at least one slave`,
	} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Validate = %v\nwant %s", err, want)
		}
	}
}

// The worked example of docs/modbus.md loads as written.
func TestModbusDocExampleLoads(t *testing.T) {
	page, err := os.ReadFile("../../docs/modbus.md")
	if err != nil {
		t.Fatal(err)
	}
	_, rest, ok := strings.Cut(string(page), "```yaml\n")
	example, _, ok2 := strings.Cut(rest, "```")
	if !ok || !ok2 {
		t.Fatal("docs/modbus.md has no yaml block")
	}
	devs := `
devices:
  - {id: meter-kitchen, type: EnergyMeter, owner: alice, k1: a, k2: b, broker: https://b.example/orion-1}
  - {id: relay-kitchen, type: Relay, owner: alice, k1: c, k2: d, broker: https://b.example/orion-1}
`
	c, err := Load(writeFile(t, t.TempDir(), "edgegate.yaml", base+devs+example, 0o600))
	if err != nil {
		t.Fatalf("the docs example does not load: %v", err)
	}
	if l := c.Radio.Modbus; len(l) != 1 || len(l[0].Devices) != 2 || len(l[0].Devices[0].Registers) != 5 {
		t.Errorf("radio.modbus = %+v", l)
	}
}
