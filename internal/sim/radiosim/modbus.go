package radiosim

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"sync"
	"time"

	"github.com/creack/pty"

	"github.com/edgegate/edgegate/radio/modbus"
)

// ModbusOptions configures a simulated Modbus RTU bus.
type ModbusOptions struct {
	// Link is where the bus appears: a symlink to the pty's slave, as an
	// RS-485 adapter appears at /dev/serial/by-id/... .
	Link   string
	Logger *slog.Logger
}

// ModbusStats counts what the simulated slaves heard and answered.
type ModbusStats struct {
	Requests   map[int]int // by unit: well-formed requests addressed to it
	Answered   map[int]int // by unit
	Exceptions map[int]int // by unit
	Writes     map[int]int // by unit: writes applied
	BadFrames  int         // bytes dropped: bad CRC or unframeable
}

// ModbusUnit is one simulated slave: its four tables, and faults to
// inject. Only addresses that were set exist; a read or write touching
// another answers exception 0x02 (illegal data address), as a real device
// answers for an address outside its map (Application Protocol §7).
type ModbusUnit struct {
	mu       sync.Mutex
	holding  map[uint16]uint16
	input    map[uint16]uint16
	coils    map[uint16]bool
	discrete map[uint16]bool
	silent   bool
	corrupt  bool
	delay    time.Duration
	raw      []byte // when set, sent instead of every answer (a hostile or broken slave)
}

// ModbusSim is a bus of simulated Modbus RTU slaves on a pseudo-terminal:
// the master opens the link through tarm/serial exactly as it would an
// RS-485 adapter. It copies Modbus over Serial Line V1.02 and the
// Application Protocol V1.1b3: requests to a unit it does not hold go
// unanswered (§2.4.1: only the addressed slave replies); a request with a
// bad CRC is ignored (§2.5.1.2); exception 0x01 answers an unknown
// function, 0x02 an address outside the unit's map, 0x03 a quantity out
// of range (§7). It leaves out: broadcast (unit 0) writes, which it
// ignores; functions other than 0x01–0x06, 0x0F and 0x10; the 3.5-character
// timing (it frames requests by their length, and takes a 20 ms gap as the
// end of bytes it cannot frame); device-specific value ranges (no 0x03
// for a value a real device would refuse).
type ModbusSim struct {
	opts   ModbusOptions
	log    *slog.Logger
	master *os.File
	slave  *os.File
	once   sync.Once

	mu    sync.Mutex
	units map[int]*ModbusUnit
	stats ModbusStats
}

// NewModbus creates the pty and the link; Run answers; Close removes both.
func NewModbus(opts ModbusOptions) (*ModbusSim, error) {
	if opts.Link == "" {
		return nil, errors.New("modbus sim: a link path is required")
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if fi, err := os.Lstat(opts.Link); err == nil && fi.Mode()&fs.ModeSymlink == 0 {
		return nil, fmt.Errorf("modbus sim: %s exists and is not a symlink", opts.Link)
	}
	master, slave, err := pty.Open()
	if err != nil {
		return nil, fmt.Errorf("modbus sim: open pty: %w", err)
	}
	if err := makeRaw(slave); err != nil {
		master.Close()
		slave.Close()
		return nil, err
	}
	os.Remove(opts.Link)
	if err := os.Symlink(slave.Name(), opts.Link); err != nil {
		master.Close()
		slave.Close()
		return nil, fmt.Errorf("modbus sim: link %s: %w", opts.Link, err)
	}
	return &ModbusSim{opts: opts, log: log.With("component", "modbus-sim", "link", opts.Link), master: master, slave: slave,
		units: map[int]*ModbusUnit{},
		stats: ModbusStats{Requests: map[int]int{}, Answered: map[int]int{}, Exceptions: map[int]int{}, Writes: map[int]int{}}}, nil
}

// Link is the path the master opens.
func (s *ModbusSim) Link() string { return s.opts.Link }

// Unit returns the slave at address unit, creating it.
func (s *ModbusSim) Unit(unit int) *ModbusUnit {
	s.mu.Lock()
	defer s.mu.Unlock()
	u := s.units[unit]
	if u == nil {
		u = &ModbusUnit{holding: map[uint16]uint16{}, input: map[uint16]uint16{}, coils: map[uint16]bool{}, discrete: map[uint16]bool{}}
		s.units[unit] = u
	}
	return u
}

// Stats returns a copy of the counters.
func (s *ModbusSim) Stats() ModbusStats {
	s.mu.Lock()
	defer s.mu.Unlock()
	cp := func(m map[int]int) map[int]int {
		out := make(map[int]int, len(m))
		for k, v := range m {
			out[k] = v
		}
		return out
	}
	return ModbusStats{Requests: cp(s.stats.Requests), Answered: cp(s.stats.Answered), Exceptions: cp(s.stats.Exceptions),
		Writes: cp(s.stats.Writes), BadFrames: s.stats.BadFrames}
}

// SetHolding sets holding registers from addr on.
func (u *ModbusUnit) SetHolding(addr uint16, vals ...uint16) { u.set(u.holding, addr, vals) }

// SetInput sets input registers from addr on.
func (u *ModbusUnit) SetInput(addr uint16, vals ...uint16) { u.set(u.input, addr, vals) }

// SetCoils sets coils from addr on.
func (u *ModbusUnit) SetCoils(addr uint16, vals ...bool) { u.setBits(u.coils, addr, vals) }

// SetDiscrete sets discrete inputs from addr on.
func (u *ModbusUnit) SetDiscrete(addr uint16, vals ...bool) { u.setBits(u.discrete, addr, vals) }

// Holding returns a holding register (0 if absent).
func (u *ModbusUnit) Holding(addr uint16) uint16 {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.holding[addr]
}

// Coil returns a coil (false if absent).
func (u *ModbusUnit) Coil(addr uint16) bool {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.coils[addr]
}

// SetSilent makes the unit ignore every request (a slave powered off or
// miswired): the master's requests to it time out.
func (u *ModbusUnit) SetSilent(v bool) { u.mu.Lock(); u.silent = v; u.mu.Unlock() }

// SetCorruptCRC makes the unit answer with a wrong CRC (line noise).
func (u *ModbusUnit) SetCorruptCRC(v bool) { u.mu.Lock(); u.corrupt = v; u.mu.Unlock() }

// SetRawAnswer makes the unit answer every request with b instead (nil:
// answer properly): line noise, another unit's frame, a lying length.
func (u *ModbusUnit) SetRawAnswer(b []byte) {
	u.mu.Lock()
	u.raw = append([]byte(nil), b...)
	u.mu.Unlock()
}

// SetDelay makes the unit answer after d (a slow slave).
func (u *ModbusUnit) SetDelay(d time.Duration) { u.mu.Lock(); u.delay = d; u.mu.Unlock() }

func (u *ModbusUnit) set(m map[uint16]uint16, addr uint16, vals []uint16) {
	u.mu.Lock()
	defer u.mu.Unlock()
	for i, v := range vals {
		m[addr+uint16(i)] = v
	}
}

func (u *ModbusUnit) setBits(m map[uint16]bool, addr uint16, vals []bool) {
	u.mu.Lock()
	defer u.mu.Unlock()
	for i, v := range vals {
		m[addr+uint16(i)] = v
	}
}

// Close removes the link and closes the pty.
func (s *ModbusSim) Close() error {
	var err error
	s.once.Do(func() {
		err = os.Remove(s.opts.Link)
		s.master.Close()
		s.slave.Close()
		if errors.Is(err, fs.ErrNotExist) {
			err = nil
		}
	})
	return err
}

// Run answers requests until ctx is done, then closes the sim. Framing
// follows the request's function (modbus.RequestLen); bytes it cannot
// frame, or a frame with a bad CRC, are dropped once the line has been
// silent for a moment, as a slave resynchronises on the inter-frame gap.
func (s *ModbusSim) Run(ctx context.Context) error {
	stop := context.AfterFunc(ctx, func() { s.Close() })
	defer stop()
	defer s.Close()
	var buf []byte
	chunk := make([]byte, 512)
	for {
		// A short deadline stands for the 3.5-character silence.
		if err := s.master.SetReadDeadline(time.Now().Add(20 * time.Millisecond)); err != nil {
			return nil // closed
		}
		n, err := s.master.Read(chunk)
		buf = append(buf, chunk[:n]...)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if errors.Is(err, os.ErrDeadlineExceeded) {
				if len(buf) > 0 {
					s.bad()
					buf = buf[:0]
				}
				continue
			}
			return nil // pty closed
		}
		for len(buf) > 0 {
			want := modbus.RequestLen(buf)
			if want < 0 || want > modbus.MaxFrameBytes {
				break // unframeable: dropped at the next silence
			}
			if want == 0 || len(buf) < want {
				break
			}
			s.handle(buf[:want])
			buf = append(buf[:0], buf[want:]...)
		}
	}
}

func (s *ModbusSim) bad() {
	s.mu.Lock()
	s.stats.BadFrames++
	s.mu.Unlock()
}

func (s *ModbusSim) handle(frame []byte) {
	req, err := modbus.DecodeRequest(frame)
	var ex *modbus.ExceptionError
	if err != nil && !errors.As(err, &ex) {
		s.bad()
		return
	}
	unit := int(frame[0])
	s.mu.Lock()
	u := s.units[unit]
	if u != nil {
		s.stats.Requests[unit]++
	}
	s.mu.Unlock()
	if u == nil {
		return // nobody at that address: no answer
	}
	var out []byte
	if ex != nil {
		out = modbus.AppendException(nil, frame[0], ex.Func, ex.Code)
	} else {
		out = u.answer(req)
	}
	u.mu.Lock()
	silent, corrupt, delay, raw := u.silent, u.corrupt, u.delay, u.raw
	u.mu.Unlock()
	if silent {
		return
	}
	if len(raw) > 0 {
		out = append([]byte(nil), raw...)
	}
	if corrupt {
		out[len(out)-1] ^= 0xA5
	}
	if delay > 0 {
		time.Sleep(delay) // the slave's own processing time, on the bus's goroutine like a real one
	}
	s.mu.Lock()
	s.stats.Answered[unit]++
	if len(out) > 1 && out[1]&0x80 != 0 {
		s.stats.Exceptions[unit]++
	}
	if ex == nil && len(raw) == 0 && out[1]&0x80 == 0 && req.Func >= modbus.FuncWriteSingleCoil {
		s.stats.Writes[unit]++
	}
	s.mu.Unlock()
	if err := s.master.SetWriteDeadline(time.Now().Add(time.Second)); err == nil {
		if _, err := s.master.Write(out); err != nil {
			s.log.Debug("answer not written", "err", err)
		}
	}
}

// answer applies req to the unit's tables and encodes the answer.
func (u *ModbusUnit) answer(req modbus.Request) []byte {
	u.mu.Lock()
	defer u.mu.Unlock()
	exc := func(code byte) []byte { return modbus.AppendException(nil, req.Unit, req.Func, code) }
	res := modbus.Response{Unit: req.Unit, Func: req.Func, Addr: req.Addr, Value: req.Value, Count: req.Count}
	regs := func(m map[uint16]uint16) bool {
		for i := range req.Count {
			v, ok := m[req.Addr+i]
			if !ok {
				return false
			}
			res.Regs = append(res.Regs, v)
		}
		return true
	}
	bits := func(m map[uint16]bool) bool {
		for i := range req.Count {
			v, ok := m[req.Addr+i]
			if !ok {
				return false
			}
			res.Bits = append(res.Bits, v)
		}
		return true
	}
	has := func(m map[uint16]uint16, n uint16) bool {
		for i := range n {
			if _, ok := m[req.Addr+i]; !ok {
				return false
			}
		}
		return true
	}
	switch req.Func {
	case modbus.FuncReadHoldingRegisters:
		if !regs(u.holding) {
			return exc(modbus.ExIllegalDataAddress)
		}
	case modbus.FuncReadInputRegisters:
		if !regs(u.input) {
			return exc(modbus.ExIllegalDataAddress)
		}
	case modbus.FuncReadCoils:
		if !bits(u.coils) {
			return exc(modbus.ExIllegalDataAddress)
		}
	case modbus.FuncReadDiscreteInputs:
		if !bits(u.discrete) {
			return exc(modbus.ExIllegalDataAddress)
		}
	case modbus.FuncWriteSingleCoil:
		if _, ok := u.coils[req.Addr]; !ok {
			return exc(modbus.ExIllegalDataAddress)
		}
		u.coils[req.Addr] = req.Value == 0xFF00
	case modbus.FuncWriteSingleRegister:
		if !has(u.holding, 1) {
			return exc(modbus.ExIllegalDataAddress)
		}
		u.holding[req.Addr] = req.Value
	case modbus.FuncWriteMultipleRegisters:
		if !has(u.holding, req.Count) {
			return exc(modbus.ExIllegalDataAddress)
		}
		for i, v := range req.Regs {
			u.holding[req.Addr+uint16(i)] = v
		}
	case modbus.FuncWriteMultipleCoils:
		for i := range req.Count {
			if _, ok := u.coils[req.Addr+i]; !ok {
				return exc(modbus.ExIllegalDataAddress)
			}
		}
		for i, v := range req.Coils {
			u.coils[req.Addr+uint16(i)] = v
		}
	default:
		return exc(modbus.ExIllegalFunction)
	}
	return modbus.AppendResponse(nil, res)
}
