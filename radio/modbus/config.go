package modbus

import "github.com/edgegate/edgegate/internal/config"

// LinesFromConfig converts radio.modbus (already validated by config) to
// the master's line configurations.
func LinesFromConfig(cl []config.ModbusLine) []LineConfig {
	out := make([]LineConfig, 0, len(cl))
	for _, l := range cl {
		lc := LineConfig{Path: l.Path, Baud: l.Baud, Parity: l.Parity, StopBits: l.StopBits, Timeout: l.Timeout}
		for _, d := range l.Devices {
			dc := DeviceConfig{Device: d.Device, Unit: d.Unit, Period: d.Period, Timeout: d.Timeout}
			for _, r := range d.Registers {
				reg := Register{Attr: r.Attribute, Table: r.Function, Addr: uint16(r.Address), Type: r.Type,
					Words: r.WordOrder, Scale: r.Scale.Or1(), Offset: r.Offset, Unit: r.Unit, Writable: r.Writable}
				dc.Registers = append(dc.Registers, reg)
			}
			lc.Devices = append(lc.Devices, dc)
		}
		out = append(out, lc)
	}
	return out
}
