package command

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/edgegate/edgegate/internal/reading"
	"github.com/edgegate/edgegate/policy"
	"github.com/edgegate/edgegate/radio"
)

// The links a command can take: the device's MQTT command topic on the
// embedded broker, a set to a MySensors node, a Modbus write.

// Broker is what the MQTT link needs of the embedded broker (mqtt.Broker).
type Broker interface {
	PublishCommand(device, attr string, payload []byte) error
	ClearCommand(device, attr string)
}

// MQTT delivers on the device's command topic, retained, so that a device
// connecting later still gets the newest command; the device confirms by
// publishing its new state as a reading, which reaches the platform like
// any other and confirms the command there.
type MQTT struct{ Broker Broker }

// Deliver publishes the signed command.
func (m MQTT) Deliver(_ context.Context, dev *policy.Device, cmd Signed) (Result, error) {
	msg, err := cmd.Message()
	if err != nil {
		return Result{}, fmt.Errorf("%w: %w", ErrPermanent, err)
	}
	if err := m.Broker.PublishCommand(dev.ID, cmd.Attr, msg); err != nil {
		return Result{}, err
	}
	return Result{}, nil
}

// Clear drops the retained command.
func (m MQTT) Clear(device, attr string) { m.Broker.ClearCommand(device, attr) }

// TryClear drops the retained command and reports a clear the broker did
// not take (an external Mosquitto not connected yet: mqtt.Client), so the
// service tries again; a broker that cannot fail it (the embedded one)
// just clears.
func (m MQTT) TryClear(device, attr string) error {
	if tc, ok := m.Broker.(interface {
		TryClearCommand(device, attr string) error
	}); ok {
		return tc.TryClearCommand(device, attr)
	}
	m.Broker.ClearCommand(device, attr)
	return nil
}

// Radio is what the MySensors link needs of the radio (radio.Manager).
type Radio interface {
	SendSet(ctx context.Context, path string, node, child int, attr string, value any, tries int, ackTimeout time.Duration) ([]byte, error)
}

// MySensors delivers a set with the ack flag to the device's bound node
// and child, sent again (Tries in all) until the node echoes it; the echo
// is the device's confirmation, written back as its reported state.
// MySensors frames carry no signature: the node trusts its radio network
// (docs/actuators.md).
type MySensors struct {
	Radio      Radio
	Tries      int
	AckTimeout time.Duration
}

// Deliver sends the set and waits for the echo.
func (m MySensors) Deliver(ctx context.Context, dev *policy.Device, cmd Signed) (Result, error) {
	b := dev.Radio
	if b == nil || b.Node < 0 || b.Child < 0 {
		return Result{}, fmt.Errorf("%w: %s is not bound to one MySensors node and child (device bind --radio-node N --radio-child C)", ErrPermanent, dev.ID)
	}
	var v any
	if err := json.Unmarshal(cmd.Value, &v); err != nil {
		return Result{}, fmt.Errorf("%w: %w", ErrPermanent, err)
	}
	tries, wait := max(1, m.Tries), m.AckTimeout
	if wait <= 0 {
		wait = 2 * time.Second
	}
	reported, err := m.Radio.SendSet(ctx, b.Port, b.Node, b.Child, cmd.Attr, v, tries, wait)
	if errors.Is(err, radio.ErrNotWritable) {
		return Result{}, fmt.Errorf("%w: %w", ErrPermanent, err)
	}
	if err != nil {
		return Result{}, err
	}
	return Result{Acked: true, Reported: reported,
		Source: reading.Source{Kind: "radio", Port: b.Port, Node: strconv.Itoa(b.Node) + "/" + strconv.Itoa(b.Child)}}, nil
}

// AttrWriter is a link that writes one attribute of a device and reads it
// back: the Modbus master (radio/modbus) satisfies it. A writer that also
// has Permanent(error) bool tells which failures no retry can cure.
type AttrWriter interface {
	WriteAttr(ctx context.Context, device, attr string, value any) (reported any, err error)
}

// Modbus delivers through an AttrWriter; the value read back is the
// device's reported state.
type Modbus struct{ Writer AttrWriter }

// Deliver writes the value and reports what the device holds after it.
func (m Modbus) Deliver(ctx context.Context, dev *policy.Device, cmd Signed) (Result, error) {
	var v any
	if err := json.Unmarshal(cmd.Value, &v); err != nil {
		return Result{}, fmt.Errorf("%w: %w", ErrPermanent, err)
	}
	got, err := m.Writer.WriteAttr(ctx, dev.ID, cmd.Attr, v)
	if err != nil {
		if p, ok := m.Writer.(interface{ Permanent(error) bool }); ok && p.Permanent(err) {
			return Result{}, fmt.Errorf("%w: %w", ErrPermanent, err)
		}
		return Result{}, err
	}
	payload, err := json.Marshal(map[string]any{cmd.Attr: map[string]any{"value": got, "type": cmd.Type}})
	if err != nil {
		return Result{}, fmt.Errorf("%w: %w", ErrPermanent, err)
	}
	return Result{Acked: true, Reported: payload, Source: reading.Source{Kind: "modbus"}}, nil
}

// Local takes a command a local-broker application published on a
// device's command topic (commands.local_control; the broker checked the
// user may write the device): a bare JSON value or {"value":…,"type":…}.
// It is signed, kept and delivered like a command from the platform, and
// supersedes an older one.
func (s *Service) Local(user, device, attr string, payload []byte) error {
	d, ok := s.o.Policy.Current().Device(device)
	if !ok || !d.Commandable() || !d.Writes(attr) {
		return fmt.Errorf("device %s has no writable attribute %q", device, attr)
	}
	if len(payload) > 64<<10 {
		return fmt.Errorf("command of %d bytes, at most 64 KiB", len(payload))
	}
	value, typ := json.RawMessage(bytes.TrimSpace(payload)), ""
	var obj struct {
		Value json.RawMessage `json:"value"`
		Type  string          `json:"type"`
	}
	if len(value) > 0 && value[0] == '{' && json.Unmarshal(value, &obj) == nil && len(obj.Value) > 0 {
		value, typ = obj.Value, obj.Type
	}
	var v any
	if err := json.Unmarshal(value, &v); err != nil {
		return fmt.Errorf("command payload is not JSON: %w", err)
	}
	if typ == "" {
		typ = defaultType(value)
	}
	if !reading.ValidID(typ) {
		return fmt.Errorf("command type %q is not a valid NGSI type", typ)
	}
	if _, err := s.learn(device, attr, typ, compact(value), "", "local:"+user, s.o.Now()); err != nil {
		return err
	}
	s.count(func(st *Stats) { st.Local++ })
	s.log.Info("command taken from a local application", "device", device, "attr", attr, "user", user)
	s.Nudge()
	return nil
}
