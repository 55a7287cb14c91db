// Package radio makes serial radio links first-class sources of readings:
// a radio module on a UART (/dev/ttyUSB0, /dev/ttyACM0, /dev/ttyAMA0,
// /dev/serial/by-id/...) feeds the same pipeline as the MQTT link (policy,
// signing, durable queue, uplink) through pipeline.Submit. Only the daemon
// wiring (cmd/edgegate) imports it.
//
// # Ports
//
// A Manager runs one goroutine per configured port (PortConfig: path,
// baud, codec, read timeout). Ports are opened with github.com/tarm/serial.
// A port missing at start or unplugged while running is retried with
// jittered backoff (Options.MinBackoff..MaxBackoff) and resumes when a
// device comes back at the same path; one bad port never holds up another.
//
// tarm/serial on Linux sets VMIN=0/VTIME, so a read returns (0, io.EOF)
// when the timeout passes with no data: that is "no data", not "port
// gone". A hung-up tty (USB radio pulled, pty master closed) returns the
// same (0, io.EOF), but at once and forever, and its device node goes
// away. A port is therefore declared gone on a read or write error other
// than that EOF, on three consecutive (0, EOF) reads that return in less
// than half the read timeout, or when its path no longer names the device
// it opened (checked at most once a second while idle). Shutdown is bounded:
// reads return within ReadTimeout, and Close — which on a tty may wait for
// output to drain — is given Options.CloseTimeout.
//
// # Framing
//
// Both codecs are line based. A LineSplitter frames whatever each read
// returned (never assuming one read is one frame); a line over the codec's
// limit — MaxMySensorsLine (256 bytes) or MaxJSONLine (64 KiB) — is
// reported once and skipped to the next newline, where the stream
// resynchronises. Bad frames (over-long, invalid UTF-8 or control bytes,
// wrong field counts, out-of-range ids or values) are counted
// (PortStatus.FramesBad, edgegate_readings_refused_total{reason="bad_frame"})
// and logged, rate-limited, with the port, line number, stream offset and
// a clipped hex dump of the bytes.
//
// # MySensors (codec "mysensors")
//
// Serial gateway API v2, one message per line:
//
//	node-id;child-sensor-id;command;ack;type;payload\n
//
// The gateway daemon is the controller. Presentations record each node's
// children and sensor types; set messages become readings; internal
// messages are answered as a controller must (I_ID_REQUEST with a fresh id
// persisted in Options.StateDir before it is sent, I_TIME, I_CONFIG "M",
// req from the last value, I_DISCOVER after I_GATEWAY_READY); battery
// level becomes the attribute batteryLevel; sketch name and version and
// heartbeats are recorded for the pending list; the gateway's own log
// lines (0;255;3;0;9;...) are logged at debug level, never readings. A
// line with ack=1 is the echo of a message the controller sent and is not
// a reading; the controller never acks (the gateway firmware acks messages
// addressed to it). See msController for the sources.
//
// A set becomes one attribute named after its V_ type (V_TEMP
// "temperature", V_HUM "humidity", V_STATUS "status" as a Boolean, ...; see
// vtypes), typed Number, Boolean or Text, and is submitted as
//
//	pipeline.Message{Device: <bound device>,
//	    Source:  reading.Source{Kind: "radio", Port: <path>, Node: "12/1"},
//	    Payload: {"temperature":{"value":21.5,"type":"Number"}}}
//
// Binding: a set from node N child C goes to BindRadio(port, N, C), else
// BindRadio(port, N, -1); battery level uses child 255 the same way.
// Readings of unbound nodes are refused (reason "unbound_node", counted,
// rate-limited log) and the node is listed by Manager.Pending with its
// children, sketch and last-seen time, for an installer to register.
//
// Node identity (issue 17): a node id is the only thing a MySensors frame
// says about who sent it, so ids are guarded on both sides. I_ID_REQUEST
// never hands out an id already handed out or seen on the port (persisted
// in the state file before the answer is sent) nor one the policy binds to
// a device on any port (Binder with NodeBinder: policy.Engine). A frame
// from a node id the policy binds on another port only is refused (reason
// "node_bound_other_port", counted, logged with the fix), before any
// whole-port binding of this port is consulted.
//
// Binding a new node, as an installer: power it up; it asks for an id and
// gets a free one, presents itself and shows in `edgegate status` as a
// pending node (port, node id, children, sketch). Then register it with
//
//	edgegate device add --config FILE --type TYPE --radio-port P --radio-node N [--radio-child C] ID
//
// or, for a device the platform already knows,
//
//	edgegate device bind --config FILE --type TYPE --radio-port P --radio-node N --radio-child C ID
//
// (policy.source config: add devices[].radio {port, node, child} instead).
// Its readings flow once the new policy is in force. A node moved to
// another radio gateway (port) keeps being refused until it is bound to
// the new port.
//
// # JSON lines (codec "jsonlines")
//
// For custom radios: one JSON object per line, at most MaxJSONLine bytes,
// no other top-level keys:
//
//	{"device":"th-1","seq":12,"time":"2024-05-01T10:00:00Z","attrs":{"temperature":21.5}}
//
// device is the NGSI entity id; seq (optional) is the device's own frame
// counter — a line repeating the previous seq of that device is a radio
// retransmission and is dropped; time (optional, RFC 3339) is the
// observation time, else the receive time; attrs is a JSON object in
// either form reading.Parse accepts (flat {"temperature":21.5} or NGSI-like
// {"temperature":{"value":21.5,"type":"Number"}}).
//
// A JSON-lines port trusts a line to name its device only if that device
// is bound to this port: when the Binder implements DeviceBinder, its
// RadioPort(device) must be this port's path; otherwise the only device
// accepted is the one BindRadio(port, -1, -1) names (a radio dedicated to
// one device). Other devices are refused as unbound and listed as pending
// (Node -1, Device set). A device that is bound but not registered is
// refused by the pipeline itself.
//
// # Pipeline back-pressure
//
// Readings go to the pipeline in order on a per-port goroutine. When Submit
// fails (quota, store trouble) the reading is held and retried with
// backoff — a serial link cannot make a node resend — while up to 64 more
// wait; beyond that the port stops reading and the kernel's tty buffer
// takes the rest. Readings still held at shutdown are counted as dropped.
//
// # Simulator
//
// internal/sim/radiosim (also simulated Modbus slaves, for radio/modbus) is a simulated MySensors serial gateway with nodes behind it, on a
// pseudo-terminal behind a symlink; it can be unplugged and replugged. It
// backs `edgegate-sim radio-sim`, the demo and the tests.
package radio
