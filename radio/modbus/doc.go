// Package modbus is a Modbus RTU master on a serial line (RS-485): it
// polls the registers of the slaves configured on each line and hands
// every poll to the pipeline as a reading of the slave's registered device
// — the same pipeline.Message path as the radio ports, so the ownership
// policy, signing, the durable queue and the uplink apply unchanged — and
// it writes coils and holding registers for the actuator path
// (Master.WriteAttr). Only the daemon wiring (internal/daemon) imports it.
//
// # Why our own RTU framing
//
// github.com/simonvetter/modbus (v1.6.4) was evaluated first: its RTU
// client opens the device itself from an "rtu://" URL through
// github.com/goburrow/serial, a second serial library next to the
// tarm/serial every other port uses, and cannot be handed a port we
// opened. RTU framing is small, so it is here (frame.go): CRC-16/MODBUS,
// functions 0x01–0x06, 0x0F and 0x10, exception responses as
// *ExceptionError, answers framed by their expected length (ResponseLen)
// rather than by the 3.5-character silence, which a tty's 100 ms read
// timeout cannot measure; the master still keeps that silence before each
// request. The decoders are fuzzed (FuzzDecodeResponse, FuzzDecodeRequest).
//
// # Lines and scheduling
//
// One goroutine owns each line: one request at a time on the bus. Queued
// writes go first; then the due slaves are served in round-robin order
// from the one after the last served, so a slave that times out costs the
// others at most one timeout per round, whatever its period; and a slave
// that does not answer at all is polled less and less often
// (Options.MaxSilentBackoff, 1 minute) until it answers. A poll reads
// the register map in as few requests as it can without reading an
// address the map does not name; a timeout ends that slave's poll (a
// silent slave costs one timeout, not one per block); a CRC error, an
// exception or a malformed answer skips its block. Every failure is
// counted per device and cause (edgegate_modbus_errors_total{device,cause}:
// timeout, crc, exception, frame, io, dropped; DeviceStatus.Errors) and
// logged at most every 30 s per device and cause. Before each request the
// input is flushed, so a late answer to an earlier request is never taken
// for the next one's.
//
// A line missing at start or unplugged is reopened with backoff; writes
// that arrive while it is down fail at once with ErrLineDown. Polled
// readings wait for the pipeline in a short per-line queue; when it is
// full a new reading is dropped and counted (cause "dropped") instead of
// stalling the bus: nothing was acknowledged to anyone, and the next poll
// reads the registers again.
//
// # Readings
//
// A poll of device D (unit U on line P) becomes
//
//	pipeline.Message{Device: D,
//	    Source:  reading.Source{Kind: "modbus", Port: P, Node: "U"},
//	    Payload: {"power":{"value":1234.5,"type":"Number"},"relay":{"value":true,"type":"Boolean"}}}
//
// with value = raw·scale + offset for registers (int16, uint16, int32,
// uint32, float32; 32-bit values in big or little word order) and a
// Boolean for coils and discrete inputs. Which devices a line carries is
// the gateway's configuration (radio.modbus); whether their readings are
// taken in is the policy's, as for any source.
package modbus
