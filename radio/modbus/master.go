package modbus

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/edgegate/edgegate/internal/logx"
	"github.com/edgegate/edgegate/internal/metrics"
	"github.com/edgegate/edgegate/internal/pipeline"
)

// Submitter is what the master needs of the pipeline.
type Submitter interface {
	Submit(ctx context.Context, msg pipeline.Message) (pipeline.Outcome, error)
}

// SourceKind is the reading.Source.Kind of polled readings (and the
// "source" label of edgegate_readings_ingested_total).
const SourceKind = "modbus"

// Error causes (the "cause" label of edgegate_modbus_errors_total and the
// keys of DeviceStatus.Errors).
const (
	CauseTimeout   = "timeout"
	CauseCRC       = "crc"
	CauseException = "exception"
	CauseFrame     = "frame"
	CauseIO        = "io"
	CauseDropped   = "dropped" // a polled reading the pipeline could not take in time
)

// Errors of WriteAttr a caller branches on.
var (
	ErrUnknownDevice = errors.New("modbus: no such device on any line")
	ErrUnknownAttr   = errors.New("modbus: no such attribute in the device's register map")
	ErrNotWritable   = errors.New("modbus: attribute is not writable")
	ErrLineDown      = errors.New("modbus: the serial line is not open")
	// ErrValue: the value cannot be written to the register (wrong kind,
	// out of the type's range).
	ErrValue = errors.New("modbus: value not valid for the register")
)

// Parity names of LineConfig.Parity.
const (
	ParityNone = "none"
	ParityEven = "even"
	ParityOdd  = "odd"
)

// LineConfig is one serial line (an RS-485 bus) and the slaves on it.
type LineConfig struct {
	Path     string // e.g. /dev/ttyUSB1 or /dev/serial/by-id/...
	Baud     int    // default 19200 (Modbus over Serial Line §3.3.1: the default rate)
	Parity   string // default even (§2.5.1: "the default parity mode must be even")
	StopBits int    // 1 or 2; default 1, 2 with parity none (§2.5.1)
	// Timeout is the default per-request answer timeout (default 500ms).
	Timeout time.Duration
	Devices []DeviceConfig
}

// DeviceConfig is one slave and the registry device its readings belong to.
type DeviceConfig struct {
	Device    string        // the registered device (NGSI entity id)
	Unit      int           // slave address 1..247
	Period    time.Duration // between polls (default 10s)
	Timeout   time.Duration // per request; 0: the line's
	Registers []Register
}

// Options configures a Master.
type Options struct {
	Logger  *slog.Logger
	Metrics *metrics.Metrics // may be nil
	Now     func() time.Time
	// MinBackoff and MaxBackoff bound the waits between attempts to open
	// a line and between Submit retries (defaults 500ms and 5s).
	MinBackoff, MaxBackoff time.Duration
	// CloseTimeout bounds closing a port (default 2s).
	CloseTimeout time.Duration
	// MaxSilentBackoff caps how far the polls of a slave that does not
	// answer at all are spread out (doubling from its period, jittered),
	// so that a dead slave costs the bus less than one timeout per
	// period; an answer restores its period. 0: 1 minute; negative: off
	// (a silent slave is polled every period, round-robin still bounding
	// what it costs the others).
	MaxSilentBackoff time.Duration
}

// DeviceStatus is the state and counters of one slave.
type DeviceStatus struct {
	Device    string            `json:"device"`
	Line      string            `json:"line"`
	Unit      int               `json:"unit"`
	Polls     uint64            `json:"polls"`     // polls that produced a reading
	Submitted uint64            `json:"submitted"` // readings the pipeline queued
	Refused   uint64            `json:"refused"`   // readings the pipeline refused (unregistered device, ...)
	Writes    uint64            `json:"writes"`    // confirmed writes
	Errors    map[string]uint64 `json:"errors,omitempty"`
	LastOK    time.Time         `json:"last_ok,omitzero"`
	LastError string            `json:"last_error,omitempty"`
	// Values are the last values read, by attribute.
	Values map[string]any `json:"values,omitempty"`
}

// Master polls the slaves of every configured line and writes to them.
type Master struct {
	lines   []*line
	devices map[string]*slave
	log     *slog.Logger

	mu      sync.Mutex
	running bool
}

var bauds = []int{1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200, 230400, 460800, 921600}

// New validates the configuration (errors name the line, device and
// register by index) and builds a master. It opens no port: Run does.
func New(lines []LineConfig, sub Submitter, opts Options) (*Master, error) {
	if sub == nil {
		return nil, errors.New("modbus: a Submitter is required")
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With("component", "modbus")
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.MinBackoff <= 0 {
		opts.MinBackoff = 500 * time.Millisecond
	}
	if opts.MaxBackoff < opts.MinBackoff {
		opts.MaxBackoff = max(5*time.Second, opts.MinBackoff)
	}
	if opts.CloseTimeout <= 0 {
		opts.CloseTimeout = 2 * time.Second
	}
	if opts.MaxSilentBackoff == 0 {
		opts.MaxSilentBackoff = time.Minute
	}
	c, err := newCounters(opts.Metrics)
	if err != nil {
		return nil, err
	}
	m := &Master{devices: map[string]*slave{}, log: log}
	limited := logx.NewLimiter(log, 30*time.Second)
	paths := map[string]bool{}
	for i, lc := range lines {
		key := fmt.Sprintf("modbus line %d", i)
		if lc.Path == "" {
			return nil, fmt.Errorf("%s: path is empty", key)
		}
		if paths[lc.Path] {
			return nil, fmt.Errorf("%s: path %q is listed twice", key, lc.Path)
		}
		paths[lc.Path] = true
		if lc.Baud == 0 {
			lc.Baud = 19200
		}
		if !slices.Contains(bauds, lc.Baud) {
			return nil, fmt.Errorf("%s: baud %d is not one of %v", key, lc.Baud, bauds)
		}
		switch lc.Parity {
		case "":
			lc.Parity = ParityEven
		case ParityNone, ParityEven, ParityOdd:
		default:
			return nil, fmt.Errorf("%s: parity %q is not none, even or odd", key, lc.Parity)
		}
		switch lc.StopBits {
		case 0:
			lc.StopBits = 1
			if lc.Parity == ParityNone {
				lc.StopBits = 2
			}
		case 1, 2:
		default:
			return nil, fmt.Errorf("%s: stop bits %d is not 1 or 2", key, lc.StopBits)
		}
		if lc.Timeout == 0 {
			lc.Timeout = 500 * time.Millisecond
		}
		if lc.Timeout < time.Millisecond || lc.Timeout > time.Minute {
			return nil, fmt.Errorf("%s: timeout %s is not in 1ms..1m", key, lc.Timeout)
		}
		if len(lc.Devices) == 0 {
			return nil, fmt.Errorf("%s: no devices", key)
		}
		l := newLine(lc, sub, opts, log.With("line", lc.Path), limited, c)
		units := map[int]bool{}
		for j, dc := range lc.Devices {
			dkey := fmt.Sprintf("%s device %d", key, j)
			if dc.Device == "" {
				return nil, fmt.Errorf("%s: device id is empty", dkey)
			}
			if m.devices[dc.Device] != nil {
				return nil, fmt.Errorf("%s: device %q is listed twice", dkey, dc.Device)
			}
			if dc.Unit < MinUnit || dc.Unit > MaxUnit {
				return nil, fmt.Errorf("%s: unit %d is not in %d..%d", dkey, dc.Unit, MinUnit, MaxUnit)
			}
			if units[dc.Unit] {
				return nil, fmt.Errorf("%s: unit %d is used twice on this line", dkey, dc.Unit)
			}
			units[dc.Unit] = true
			if dc.Period == 0 {
				dc.Period = 10 * time.Second
			}
			if dc.Period < time.Millisecond {
				return nil, fmt.Errorf("%s: period %s is too short", dkey, dc.Period)
			}
			if dc.Timeout == 0 {
				dc.Timeout = lc.Timeout
			}
			if len(dc.Registers) == 0 {
				return nil, fmt.Errorf("%s: no registers", dkey)
			}
			attrs := map[string]bool{}
			for k, r := range dc.Registers {
				if err := r.Check(); err != nil {
					return nil, fmt.Errorf("%s register %d: %w", dkey, k, err)
				}
				if r.Attr == "" || attrs[r.Attr] {
					return nil, fmt.Errorf("%s register %d: attribute name %q is empty or used twice", dkey, k, r.Attr)
				}
				attrs[r.Attr] = true
			}
			s := newSlave(dc, l)
			l.slaves = append(l.slaves, s)
			m.devices[dc.Device] = s
		}
		m.lines = append(m.lines, l)
	}
	return m, nil
}

// Run serves every line, each on its own goroutine, until ctx is done. A
// line that cannot be opened or goes away is retried with backoff and
// never holds up another. Run returns nil once every line has stopped.
func (m *Master) Run(ctx context.Context) error {
	m.mu.Lock()
	if m.running {
		m.mu.Unlock()
		return errors.New("modbus: Run called twice")
	}
	m.running = true
	m.mu.Unlock()
	var wg sync.WaitGroup
	for _, l := range m.lines {
		wg.Go(func() { l.run(ctx) })
	}
	wg.Wait()
	return nil
}

// WriteAttr writes value to a writable attribute of device — a coil
// (function 0x05; value a bool, 0/1 or "on"/"off") or a holding register
// (0x06 for 16-bit types, 0x10 for 32-bit ones; value a number in the
// attribute's units, from which offset and scale are taken back) — then
// reads the register back and returns the value the device now reports
// (bool or float64): the confirmation to write back as the attribute's
// reported state. It waits its turn on the bus (writes go before due
// polls) and gives up when ctx ends. Errors: ErrUnknownDevice,
// ErrUnknownAttr, ErrNotWritable, ErrLineDown, a value the register
// cannot hold, ErrTimeout, ErrCRC, ErrFrame or an *ExceptionError.
func (m *Master) WriteAttr(ctx context.Context, device, attr string, value any) (reported any, err error) {
	s := m.devices[device]
	if s == nil {
		return nil, fmt.Errorf("write %s.%s: %w", device, attr, ErrUnknownDevice)
	}
	i := slices.IndexFunc(s.cfg.Registers, func(r Register) bool { return r.Attr == attr })
	if i < 0 {
		return nil, fmt.Errorf("write %s.%s: %w", device, attr, ErrUnknownAttr)
	}
	reg := s.cfg.Registers[i]
	if !reg.Writable {
		return nil, fmt.Errorf("write %s.%s: %w (set writable: true in its register map)", device, attr, ErrNotWritable)
	}
	req := Request{Unit: byte(s.cfg.Unit), Addr: reg.Addr}
	if reg.Table == TableCoil {
		on, err := toBool(value)
		if err != nil {
			return nil, fmt.Errorf("write %s.%s: %w: %w", device, attr, ErrValue, err)
		}
		req.Func = FuncWriteSingleCoil
		if on {
			req.Value = 0xFF00
		}
	} else {
		f, err := toFloat(value)
		if err != nil {
			return nil, fmt.Errorf("write %s.%s: %w: %w", device, attr, ErrValue, err)
		}
		regs, err := reg.encodeRegs(f)
		if err != nil {
			return nil, fmt.Errorf("write %s.%s: %w: %w", device, attr, ErrValue, err)
		}
		if len(regs) == 1 {
			req.Func, req.Value = FuncWriteSingleRegister, regs[0]
		} else {
			req.Func, req.Count, req.Regs = FuncWriteMultipleRegisters, uint16(len(regs)), regs
		}
	}
	j := &writeJob{ctx: ctx, slave: s, reg: reg, req: req, done: make(chan writeResult, 1)}
	select {
	case s.line.writes <- j:
	case <-s.line.stopped:
		return nil, fmt.Errorf("write %s.%s: %w (stopped)", device, attr, ErrLineDown)
	case <-ctx.Done():
		return nil, fmt.Errorf("write %s.%s: %w", device, attr, ctx.Err())
	}
	select {
	case r := <-j.done:
		if r.err != nil {
			return nil, fmt.Errorf("write %s.%s: %w", device, attr, r.err)
		}
		return r.value, nil
	case <-s.line.stopped:
		return nil, fmt.Errorf("write %s.%s: %w (stopped)", device, attr, ErrLineDown)
	case <-ctx.Done():
		// A job still queued is dropped by the bus goroutine; one already
		// on the wire completes and its answer is dropped (done has room).
		return nil, fmt.Errorf("write %s.%s: %w", device, attr, ctx.Err())
	}
}

// Permanent tells whether a WriteAttr error will repeat on every retry: an
// unknown device or attribute, a register not writable, a value it cannot
// hold, or an exception saying the function, address or value is illegal
// (codes 1–3, Application Protocol §7). A timeout, a CRC error, a line
// down or a busy slave may pass. The command service drops a permanent
// failure instead of retrying it until its TTL.
func (m *Master) Permanent(err error) bool {
	var ex *ExceptionError
	if errors.As(err, &ex) {
		return ex.Code >= 1 && ex.Code <= 3
	}
	for _, e := range []error{ErrUnknownDevice, ErrUnknownAttr, ErrNotWritable, ErrValue} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// Devices lists the devices the master polls, sorted.
func (m *Master) Devices() []string {
	out := make([]string, 0, len(m.devices))
	for id := range m.devices {
		out = append(out, id)
	}
	slices.Sort(out)
	return out
}

// Status reports every slave, in configuration order.
func (m *Master) Status() []DeviceStatus {
	var out []DeviceStatus
	for _, l := range m.lines {
		for _, s := range l.slaves {
			out = append(out, s.status())
		}
	}
	return out
}

// counters are the master's Prometheus metrics, registered on the
// daemon's registry (nil Metrics: counted in DeviceStatus only). The
// device label is bounded: devices come from the configuration, at most
// 247 per line.
type counters struct {
	polls  *prometheus.CounterVec // {device}
	errors *prometheus.CounterVec // {device, cause}
}

func newCounters(m *metrics.Metrics) (*counters, error) {
	c := &counters{
		polls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "edgegate_modbus_polls_total", Help: "Modbus polls that produced a reading, by device.",
		}, []string{"device"}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "edgegate_modbus_errors_total", Help: "Modbus request failures, by device and cause (timeout, crc, exception, frame, io, dropped).",
		}, []string{"device", "cause"}),
	}
	if m == nil || m.Registry == nil {
		return c, nil
	}
	for _, p := range []**prometheus.CounterVec{&c.polls, &c.errors} {
		if err := m.Registry.Register(*p); err != nil {
			var are prometheus.AlreadyRegisteredError
			if !errors.As(err, &are) {
				return nil, fmt.Errorf("modbus: register metrics: %w", err)
			}
			*p = are.ExistingCollector.(*prometheus.CounterVec)
		}
	}
	return c, nil
}

// causeOf classifies a request error for the counters.
func causeOf(err error) string {
	var ex *ExceptionError
	switch {
	case errors.As(err, &ex):
		return CauseException
	case errors.Is(err, ErrTimeout):
		return CauseTimeout
	case errors.Is(err, ErrCRC):
		return CauseCRC
	case errors.Is(err, ErrFrame):
		return CauseFrame
	}
	return CauseIO
}

// payload encodes attribute values as the NGSI-like form reading.Parse
// accepts: {"name":{"value":v,"type":"Number"|"Boolean"}}.
func payload(vals map[string]any) ([]byte, error) {
	type attr struct {
		Value any    `json:"value"`
		Type  string `json:"type"`
	}
	out := make(map[string]attr, len(vals))
	for k, v := range vals {
		t := "Number"
		if _, ok := v.(bool); ok {
			t = "Boolean"
		}
		out[k] = attr{Value: v, Type: t}
	}
	return json.Marshal(out)
}

func unitLabel(u int) string { return strconv.Itoa(u) }
