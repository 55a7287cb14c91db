package modbus

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"slices"
	"sync"
	"time"

	"github.com/tarm/serial"

	"github.com/edgegate/edgegate/internal/backoff"
	"github.com/edgegate/edgegate/internal/logx"
	"github.com/edgegate/edgegate/internal/pipeline"
	"github.com/edgegate/edgegate/internal/reading"
)

const (
	// pendingReadings is how many polled readings may wait for the
	// pipeline per line; beyond that a new one is dropped (counted): the
	// next poll reads the register again, and the bus must keep serving
	// writes while the pipeline is slow.
	pendingReadings = 16
	// pendingWrites is how many WriteAttr calls may queue per line.
	pendingWrites = 16
	// ttyReadStep is the tty's read timeout (VTIME has 100 ms steps): a
	// read returns as soon as a byte arrives, or after this with none, so
	// a request's own timeout is kept to within one step.
	ttyReadStep = 100 * time.Millisecond
)

// conn is the part of a serial port the bus uses (tarm/serial's Port).
type conn interface {
	io.ReadWriteCloser
	Flush() error
}

type writeJob struct {
	ctx   context.Context // the caller's: a job it gave up on is not carried out
	slave *slave
	reg   Register
	req   Request
	done  chan writeResult
}

type writeResult struct {
	value any
	err   error
}

// block is one read request of a poll: adjacent entries of one table
// merged, up to the function's quantity limit.
type block struct {
	fn    byte
	addr  uint16
	count uint16
	regs  []Register
}

type slave struct {
	cfg    DeviceConfig
	line   *line
	blocks []block
	next   time.Time        // used by the bus goroutine only
	dead   *backoff.Backoff // stretches the period of a slave that never answers; nil: off

	mu sync.Mutex
	st DeviceStatus
}

func newSlave(dc DeviceConfig, l *line) *slave {
	s := &slave{cfg: dc, line: l, st: DeviceStatus{Device: dc.Device, Line: l.cfg.Path, Unit: dc.Unit,
		Errors: map[string]uint64{}, Values: map[string]any{}}}
	s.blocks = planBlocks(dc.Registers)
	if l.opts.MaxSilentBackoff > 0 {
		s.dead = backoff.New(dc.Period, max(dc.Period, l.opts.MaxSilentBackoff))
	}
	return s
}

// planBlocks groups the register map into as few read requests as it
// can without reading an address the map does not name (a slave may
// answer an exception for a gap).
func planBlocks(regs []Register) []block {
	sorted := slices.Clone(regs)
	slices.SortStableFunc(sorted, func(a, b Register) int {
		if a.readFunc() != b.readFunc() {
			return int(a.readFunc()) - int(b.readFunc())
		}
		return int(a.Addr) - int(b.Addr)
	})
	var out []block
	for _, r := range sorted {
		fn, end := r.readFunc(), int(r.Addr)+r.Count()
		limit := MaxReadRegs
		if r.isBit() {
			limit = MaxReadBits
		}
		if n := len(out); n > 0 {
			b := &out[n-1]
			bend := int(b.addr) + int(b.count)
			if b.fn == fn && int(r.Addr) <= bend && max(end, bend)-int(b.addr) <= limit {
				b.count = uint16(max(end, bend) - int(b.addr))
				b.regs = append(b.regs, r)
				continue
			}
		}
		out = append(out, block{fn: fn, addr: r.Addr, count: uint16(r.Count()), regs: []Register{r}})
	}
	return out
}

type line struct {
	cfg     LineConfig
	sub     Submitter
	opts    Options
	log     *slog.Logger
	limited *logx.Limiter
	c       *counters
	slaves  []*slave
	writes  chan *writeJob
	out     chan pipeline.Message
	stopped chan struct{} // closed when run returns

	// Used by the bus goroutine only.
	cursor   int       // round-robin: the next slave to consider first
	lastByte time.Time // end of the last frame on the bus
	silence  time.Duration
	buf      []byte
}

func newLine(lc LineConfig, sub Submitter, opts Options, log *slog.Logger, limited *logx.Limiter, c *counters) *line {
	// 3.5 character times between frames (Modbus over Serial Line §2.5.1.1:
	// 11 bits a character); above 19200 baud a fixed 1.75 ms.
	silence := time.Duration(float64(time.Second) * 3.5 * 11 / float64(lc.Baud))
	if lc.Baud > 19200 {
		silence = 1750 * time.Microsecond
	}
	return &line{cfg: lc, sub: sub, opts: opts, log: log, limited: limited, c: c,
		writes: make(chan *writeJob, pendingWrites), out: make(chan pipeline.Message, pendingReadings),
		stopped: make(chan struct{}),
		silence: silence, buf: make([]byte, 0, MaxFrameBytes+8)}
}

// run owns the line until ctx is done: open, serve, on failure reopen
// with backoff. Its submit goroutine ends before it returns.
func (l *line) run(ctx context.Context) {
	defer close(l.stopped)
	var wg sync.WaitGroup
	wg.Go(func() { l.submitLoop(ctx) })
	defer wg.Wait()
	bo := backoff.New(l.opts.MinBackoff, l.opts.MaxBackoff)
	for ctx.Err() == nil {
		sp, err := l.open()
		if err != nil {
			l.limited.Log(ctx, slog.LevelWarn, "open:"+l.cfg.Path, "modbus line unavailable; retrying", "err", err)
			if l.waitDown(ctx, bo) != nil {
				return
			}
			continue
		}
		l.log.Info("modbus line open", "baud", l.cfg.Baud, "parity", l.cfg.Parity, "stop_bits", l.cfg.StopBits,
			"devices", len(l.slaves))
		start := time.Now()
		err = l.serve(ctx, sp)
		l.closePort(sp)
		if ctx.Err() != nil {
			return
		}
		l.limited.Log(ctx, slog.LevelWarn, "gone:"+l.cfg.Path, "modbus line lost; reopening", "err", err)
		if time.Since(start) > 5*time.Second {
			bo.Reset()
		}
		if l.waitDown(ctx, bo) != nil {
			return
		}
	}
}

// waitDown waits out a backoff while the line is closed, refusing the
// writes that arrive meanwhile rather than keeping their callers waiting.
func (l *line) waitDown(ctx context.Context, bo *backoff.Backoff) error {
	bo.Fail()
	t := time.NewTimer(max(bo.Remaining(), 0))
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
			return nil
		case j := <-l.writes:
			j.done <- writeResult{err: ErrLineDown}
		}
	}
}

func (l *line) open() (conn, error) {
	par := serial.ParityEven
	switch l.cfg.Parity {
	case ParityNone:
		par = serial.ParityNone
	case ParityOdd:
		par = serial.ParityOdd
	}
	stop := serial.Stop1
	if l.cfg.StopBits == 2 {
		stop = serial.Stop2
	}
	sp, err := serial.OpenPort(&serial.Config{Name: l.cfg.Path, Baud: l.cfg.Baud, Size: 8, Parity: par, StopBits: stop,
		ReadTimeout: ttyReadStep})
	if err != nil {
		return nil, fmt.Errorf("open serial port %q: %w", l.cfg.Path, err)
	}
	return sp, nil
}

// closePort closes sp within CloseTimeout (a tty close may wait for its
// output to drain); one that overruns finishes on its own goroutine.
func (l *line) closePort(sp conn) {
	done := make(chan error, 1)
	go func() { done <- sp.Close() }()
	t := time.NewTimer(l.opts.CloseTimeout)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
		l.log.Warn("closing modbus line takes too long; leaving it to finish", "timeout", l.opts.CloseTimeout)
	}
}

// serve runs the bus until ctx ends or the port fails: one request at a
// time; queued writes first, then the due slaves in round-robin order.
func (l *line) serve(ctx context.Context, sp conn) error {
	now := time.Now()
	for i, s := range l.slaves {
		// Spread the first polls a little so that slaves with the same
		// period do not stay bunched.
		s.next = now.Add(time.Duration(i) * l.silence)
	}
	for {
		j, s, err := l.nextJob(ctx)
		if err != nil {
			return nil // ctx done
		}
		if j != nil {
			if err := j.ctx.Err(); err != nil {
				// The caller gave up while the job queued: a command must
				// not reach the device after its sender stopped waiting.
				j.done <- writeResult{err: err}
				continue
			}
			v, err := l.write(ctx, sp, j)
			j.done <- writeResult{value: v, err: err}
			if isPortErr(err) {
				return err
			}
			continue
		}
		if err := l.poll(ctx, sp, s); isPortErr(err) {
			return err
		}
	}
}

// nextJob waits for the next thing to do on the bus: a queued write, or
// the first due slave at or after the round-robin cursor. Serving the
// slaves in turn means a slow or silent one costs the others at most one
// of its timeouts per round, whatever its period.
func (l *line) nextJob(ctx context.Context) (*writeJob, *slave, error) {
	for {
		select {
		case j := <-l.writes:
			return j, nil, nil
		default:
		}
		now := time.Now()
		n := len(l.slaves)
		var earliest time.Time
		for k := range n {
			i := (l.cursor + k) % n
			s := l.slaves[i]
			if !s.next.After(now) {
				l.cursor = (i + 1) % n
				return nil, s, nil
			}
			if earliest.IsZero() || s.next.Before(earliest) {
				earliest = s.next
			}
		}
		t := time.NewTimer(earliest.Sub(now))
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, nil, ctx.Err()
		case j := <-l.writes:
			t.Stop()
			return j, nil, nil
		case <-t.C:
		}
	}
}

// portErr marks an error of the port itself (write or read failed): the
// line is reopened.
type portErr struct{ err error }

func (e portErr) Error() string { return e.err.Error() }
func (e portErr) Unwrap() error { return e.err }

func isPortErr(err error) bool {
	var pe portErr
	return errors.As(err, &pe)
}

// transact sends req and reads its answer within timeout.
func (l *line) transact(ctx context.Context, sp conn, req Request, timeout time.Duration) (Response, error) {
	frame, err := AppendRequest(l.buf[:0], req)
	if err != nil {
		return Response{}, err
	}
	// The inter-frame silence before a new request, then drop whatever
	// is left of an earlier answer (a late reply after a timeout).
	if wait := l.silence - time.Since(l.lastByte); wait > 0 {
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return Response{}, ctx.Err()
		case <-t.C:
		}
	}
	_ = sp.Flush()
	if _, err := sp.Write(frame); err != nil {
		return Response{}, portErr{fmt.Errorf("write to %s: %w", l.cfg.Path, err)}
	}
	// The request's own transmission time counts toward the timeout's
	// start, as on a real bus the slave answers only once it has it all.
	deadline := time.Now().Add(timeout + time.Duration(len(frame))*l.silence/3)
	buf := l.buf[:0]
	var chunk [MaxFrameBytes]byte
	want := 0
	fastEOF := 0
	for {
		if want = ResponseLen(req, buf); want > 0 && len(buf) >= want {
			break
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			l.lastByte = time.Now()
			return Response{}, fmt.Errorf("unit %d function %#02x: %w after %s (%d bytes)", req.Unit, req.Func, ErrTimeout, timeout, len(buf))
		}
		room := len(chunk)
		if want > 0 {
			room = min(room, want-len(buf))
		}
		t0 := time.Now()
		n, err := sp.Read(chunk[:room])
		buf = append(buf, chunk[:n]...)
		switch {
		case err == nil:
		case errors.Is(err, io.EOF) && n == 0:
			// tarm/serial's "read timeout, no data"; a hung-up tty (adapter
			// unplugged) returns the same at once, forever.
			if time.Since(t0) < ttyReadStep/2 {
				if fastEOF++; fastEOF >= 3 {
					return Response{}, portErr{fmt.Errorf("read %s: tty hung up (adapter unplugged)", l.cfg.Path)}
				}
			} else {
				fastEOF = 0
			}
		case errors.Is(err, io.EOF):
		default:
			return Response{}, portErr{fmt.Errorf("read %s: %w", l.cfg.Path, err)}
		}
		if len(buf) > MaxFrameBytes+4 {
			break
		}
	}
	l.lastByte = time.Now()
	return DecodeResponse(req, buf[:want])
}

// poll reads every block of s and submits one reading with what it got.
// A timeout ends the poll (a silent slave costs one timeout, not one per
// block); other errors skip their block only.
func (l *line) poll(ctx context.Context, sp conn, s *slave) error {
	start := time.Now()
	s.next = start.Add(s.cfg.Period)
	vals := map[string]any{}
	var lastErr error
	for i, b := range s.blocks {
		res, err := l.transact(ctx, sp, Request{Unit: byte(s.cfg.Unit), Func: b.fn, Addr: b.addr, Count: b.count}, s.cfg.Timeout)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			lastErr = err
			if isPortErr(err) {
				s.fail(ctx, CauseIO, err)
				return err
			}
			s.fail(ctx, causeOf(err), err)
			if errors.Is(err, ErrTimeout) {
				if i == 0 && s.dead != nil {
					// Not a word from it: poll it less often, up to the
					// backoff's cap, until it answers again.
					s.next = start.Add(max(s.cfg.Period, s.dead.Fail()))
				}
				break
			}
			continue
		}
		if s.dead != nil {
			s.dead.Reset()
		}
		for _, r := range b.regs {
			off := int(r.Addr) - int(b.addr)
			if r.isBit() {
				vals[r.Attr] = res.Bits[off]
				continue
			}
			v, err := r.decodeRegs(res.Regs[off : off+r.Count()])
			if err != nil {
				lastErr = err
				s.fail(ctx, CauseFrame, err)
				continue
			}
			vals[r.Attr] = v
		}
	}
	if len(vals) == 0 {
		return lastErr
	}
	body, err := payload(vals)
	if err != nil {
		return err
	}
	s.ok(vals)
	l.c.polls.WithLabelValues(s.cfg.Device).Inc()
	msg := pipeline.Message{Device: s.cfg.Device, Payload: body, Received: l.opts.Now(),
		Source: reading.Source{Kind: SourceKind, Port: l.cfg.Path, Node: unitLabel(s.cfg.Unit)}}
	select {
	case l.out <- msg:
	default:
		s.fail(ctx, CauseDropped, errors.New("the pipeline is not keeping up; reading dropped (the next poll reads again)"))
	}
	return nil
}

// write executes a write job and reads the value back.
func (l *line) write(ctx context.Context, sp conn, j *writeJob) (any, error) {
	s := j.slave
	if _, err := l.transact(ctx, sp, j.req, s.cfg.Timeout); err != nil {
		s.fail(ctx, causeOf(err), err)
		return nil, err
	}
	r := j.reg
	res, err := l.transact(ctx, sp, Request{Unit: byte(s.cfg.Unit), Func: r.readFunc(), Addr: r.Addr, Count: uint16(r.Count())}, s.cfg.Timeout)
	if err != nil {
		s.fail(ctx, causeOf(err), err)
		return nil, fmt.Errorf("written, but the read-back failed: %w", err)
	}
	var v any
	if r.isBit() {
		v = res.Bits[0]
	} else if v, err = r.decodeRegs(res.Regs); err != nil {
		return nil, err
	}
	s.mu.Lock()
	s.st.Writes++
	s.st.Values[r.Attr] = v
	s.mu.Unlock()
	return v, nil
}

// submitLoop hands the polled readings to the pipeline in order, holding
// and retrying one the pipeline could not take (quota, store trouble).
func (l *line) submitLoop(ctx context.Context) {
	bo := backoff.New(l.opts.MinBackoff, l.opts.MaxBackoff)
	for {
		var msg pipeline.Message
		select {
		case <-ctx.Done():
			return
		case msg = <-l.out:
		}
		for {
			out, err := l.sub.Submit(ctx, msg)
			if err == nil {
				bo.Reset()
				if s := l.slaveOf(msg.Device); s != nil {
					s.mu.Lock()
					if out == pipeline.Refused {
						s.st.Refused++
					} else {
						s.st.Submitted++
					}
					s.mu.Unlock()
				}
				break
			}
			l.limited.Log(ctx, slog.LevelWarn, "hold:"+l.cfg.Path, "modbus reading not queued; holding it and retrying",
				"device", msg.Device, "err", err)
			if bo.Wait(ctx) != nil {
				return
			}
		}
	}
}

func (l *line) slaveOf(device string) *slave {
	for _, s := range l.slaves {
		if s.cfg.Device == device {
			return s
		}
	}
	return nil
}

func (s *slave) fail(ctx context.Context, cause string, err error) {
	s.mu.Lock()
	s.st.Errors[cause]++
	s.st.LastError = err.Error()
	s.mu.Unlock()
	s.line.c.errors.WithLabelValues(s.cfg.Device, cause).Inc()
	s.line.limited.Log(ctx, slog.LevelWarn, "modbus:"+s.cfg.Device+":"+cause, "modbus request failed",
		"device", s.cfg.Device, "unit", s.cfg.Unit, "cause", cause, "err", err)
}

func (s *slave) ok(vals map[string]any) {
	s.mu.Lock()
	s.st.Polls++
	s.st.LastOK = time.Now()
	maps.Copy(s.st.Values, vals)
	s.mu.Unlock()
}

func (s *slave) status() DeviceStatus {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.st
	st.Errors = maps.Clone(s.st.Errors)
	st.Values = maps.Clone(s.st.Values)
	return st
}
