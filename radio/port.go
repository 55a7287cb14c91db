package radio

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/tarm/serial"

	"github.com/edgegate/edgegate/internal/backoff"
	"github.com/edgegate/edgegate/internal/logx"
	"github.com/edgegate/edgegate/internal/metrics"
	"github.com/edgegate/edgegate/internal/pipeline"
	"github.com/edgegate/edgegate/internal/reading"
)

// Sizes of a port's buffers.
const (
	readBufSize    = 4096
	pendingReads   = 64 // readings waiting for the pipeline per port
	pendingReplies = 32 // controller replies waiting for the writer
	maxJSONDevices = 1024
	// fastEOFs is how many consecutive (0, EOF) reads returning well
	// before the read timeout mean the tty was hung up (unplugged): a
	// hung-up tty returns (0, EOF) at once, forever.
	fastEOFs = 3
	// identityEvery is how often an idle port checks that its path still
	// names the device it opened.
	identityEvery = time.Second
)

var errHangup = errors.New("tty hung up (device unplugged)")

type port struct {
	cfg     PortConfig
	sub     Submitter
	bind    Binder
	ids     *nodeIDs
	log     *slog.Logger
	limited *logx.Limiter
	m       *metrics.Metrics
	now     func() time.Time
	opts    Options

	ctrl     *msController // MySensors only
	split    *LineSplitter
	readings chan pipeline.Message

	// Used by the reader goroutine only.
	res     msResult
	writes  chan []byte
	readCtx context.Context
	onLine  func(Line)
	labels  [256]string

	mu       sync.Mutex
	st       PortStatus
	jsonPend map[string]*PendingNode // JSON lines: unbound devices heard
	lastSeq  map[string]uint64       // JSON lines: previous seq per device
	// The downlink (downlink.go): sets to send, and the sets waiting for
	// their echo by node<<16|child<<8|type.
	cmds     chan []byte
	echoWait map[int]chan []byte
}

func newPort(pc PortConfig, sub Submitter, bind Binder, ids *nodeIDs, opts Options, log *slog.Logger, limited *logx.Limiter) *port {
	p := &port{
		cfg: pc, sub: sub, bind: bind, ids: ids, log: log, limited: limited, m: opts.Metrics,
		now: opts.Now, opts: opts, readings: make(chan pipeline.Message, pendingReads),
		st:       PortStatus{Path: pc.Path, Codec: pc.Codec},
		jsonPend: map[string]*PendingNode{}, lastSeq: map[string]uint64{},
		cmds: make(chan []byte), // unbuffered: a set is handed over only to a running session, never left for a later one
	}
	if pc.Codec == CodecMySensors {
		p.ctrl = newMSController(pc.Path, ids, opts.Now)
		if nb, ok := bind.(NodeBinder); ok {
			p.ctrl.bound = func(node int) bool { return len(nb.RadioNodePorts(node)) > 0 }
		}
		p.split = NewLineSplitter(MaxMySensorsLine)
	} else {
		p.split = NewLineSplitter(MaxJSONLine)
	}
	p.onLine = p.frame
	return p
}

// run owns the port until ctx is done: open, serve, and on failure reopen
// with backoff. Its submit goroutine ends before it returns.
func (p *port) run(ctx context.Context) {
	var wg sync.WaitGroup
	wg.Go(func() { p.submitLoop(ctx) })
	defer wg.Wait()

	bo := backoff.New(p.opts.MinBackoff, p.opts.MaxBackoff)
	opened := 0
	for ctx.Err() == nil {
		sp, id, err := p.open()
		if err != nil {
			p.fail(err)
			p.limited.Log(ctx, slog.LevelWarn, "open:"+p.cfg.Path, "radio port unavailable; retrying", "err", err)
			if bo.Wait(ctx) != nil {
				return
			}
			continue
		}
		opened++
		p.mu.Lock()
		p.st.Open, p.st.OpenedAt = true, p.now()
		if opened > 1 {
			p.st.Reconnects++
		}
		p.mu.Unlock()
		p.log.Info("radio port open", "codec", p.cfg.Codec, "baud", p.cfg.Baud)
		start := time.Now()
		err = p.session(ctx, sp, id)
		p.closePort(sp)
		p.mu.Lock()
		p.st.Open = false
		p.mu.Unlock()
		if ctx.Err() != nil {
			return
		}
		p.fail(err)
		p.limited.Log(ctx, slog.LevelWarn, "gone:"+p.cfg.Path, "radio port lost; reopening", "err", err)
		// A session that worked for a while resets the backoff, so a port
		// unplugged now and then comes back at once, not after the wait
		// its earlier flaps built up.
		if time.Since(start) > min(5*time.Second, p.opts.MaxBackoff) {
			bo.Reset()
		}
		if bo.Wait(ctx) != nil {
			return
		}
	}
}

func (p *port) fail(err error) {
	p.mu.Lock()
	p.st.LastError, p.st.LastErrorAt = err.Error(), p.now()
	p.mu.Unlock()
}

// devID identifies the device node a path resolves to, so that a port can
// tell that its path now names another device (replugged elsewhere, or a
// symlink retargeted).
type devID struct{ dev, ino, rdev uint64 }

func statID(path string) (devID, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return devID{}, err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return devID{}, nil
	}
	return devID{dev: uint64(st.Dev), ino: st.Ino, rdev: uint64(st.Rdev)}, nil
}

func (p *port) open() (*serial.Port, devID, error) {
	id, err := statID(p.cfg.Path)
	if err != nil {
		return nil, id, fmt.Errorf("open serial port %q: %w", p.cfg.Path, err)
	}
	sp, err := serial.OpenPort(&serial.Config{Name: p.cfg.Path, Baud: p.cfg.Baud, ReadTimeout: p.cfg.ReadTimeout})
	if err != nil {
		return nil, id, fmt.Errorf("open serial port %q: %w", p.cfg.Path, err)
	}
	return sp, id, nil
}

// closePort closes sp, waiting at most CloseTimeout: a tty close may block
// while output drains. A close that overruns is left to finish on its own
// goroutine (it ends when the kernel returns) and logged.
func (p *port) closePort(sp *serial.Port) {
	done := make(chan error, 1)
	go func() { done <- sp.Close() }()
	t := time.NewTimer(p.opts.CloseTimeout)
	defer t.Stop()
	select {
	case err := <-done:
		if err != nil {
			p.log.Debug("close radio port", "err", err)
		}
	case <-t.C:
		p.log.Warn("closing radio port takes too long; leaving it to finish", "timeout", p.opts.CloseTimeout)
	}
}

// session reads sp until ctx ends or the port goes away. Replies go out
// through a writer goroutine so that a slow write never stalls reading.
func (p *port) session(ctx context.Context, sp *serial.Port, id devID) error {
	writes := make(chan []byte, pendingReplies)
	werr := make(chan error, 1)
	writerDone := make(chan struct{})
	go func() {
		defer close(writerDone)
		for {
			var b []byte
			select {
			case r, ok := <-writes:
				if !ok {
					return
				}
				b = r
			case b = <-p.cmds: // downlink sets (downlink.go)
			}
			if _, err := sp.Write(b); err != nil {
				werr <- fmt.Errorf("write to %s: %w", p.cfg.Path, err)
				return
			}
		}
	}()
	defer func() {
		close(writes)
		t := time.NewTimer(p.opts.CloseTimeout)
		defer t.Stop()
		select {
		case <-writerDone:
		case <-t.C: // blocked in a write: the close that follows ends it, in time
		}
	}()

	p.writes, p.readCtx = writes, ctx
	p.split.Reset()
	buf := make([]byte, readBufSize)
	fast := 0
	lastCheck := time.Now()
	for {
		if ctx.Err() != nil {
			return nil
		}
		select {
		case err := <-werr:
			return err
		default:
		}
		t0 := time.Now()
		n, err := sp.Read(buf)
		if n > 0 {
			fast = 0
			p.split.Feed(buf[:n], p.onLine)
		}
		switch {
		case err == nil:
		case errors.Is(err, io.EOF) && n == 0:
			// (0, EOF) is tarm/serial's "read timeout, no data" on Linux;
			// a hung-up tty returns the same, but at once.
			if time.Since(t0) < p.cfg.ReadTimeout/2 {
				fast++
				if fast >= fastEOFs {
					return errHangup
				}
			} else {
				fast = 0
			}
			if fast > 0 || time.Since(lastCheck) >= identityEvery {
				lastCheck = time.Now()
				now, err := statID(p.cfg.Path)
				if err != nil {
					return fmt.Errorf("check serial port %q: %w", p.cfg.Path, err)
				}
				if now != id {
					return fmt.Errorf("serial port %q now names another device", p.cfg.Path)
				}
			}
		case errors.Is(err, io.EOF):
		default:
			return fmt.Errorf("read %s: %w", p.cfg.Path, err)
		}
	}
}

// frame handles one line from the splitter (reader goroutine).
func (p *port) frame(l Line) {
	if l.Err != nil {
		p.bad(l, l.Err)
		return
	}
	if p.ctrl != nil {
		p.frameMySensors(l)
	} else {
		p.frameJSON(l)
	}
}

func (p *port) bad(l Line, err error) {
	p.mu.Lock()
	p.st.FramesBad++
	p.mu.Unlock()
	if p.m != nil {
		p.m.Refused.WithLabelValues(ReasonBadFrame).Inc()
	}
	p.limited.Log(p.readCtx, slog.LevelWarn, "bad:"+p.cfg.Path, "bad radio frame skipped",
		"line", l.No, "offset", l.Offset, "err", err, "hex", clipHex(l.Bytes))
}

func (p *port) frameMySensors(l Line) {
	m, err := DecodeMySensors(l.Bytes)
	if err != nil {
		p.bad(l, err)
		return
	}
	res := &p.res
	res.replies, res.payload = res.replies[:0], res.payload[:0]
	if err := p.ctrl.handle(m, res); err != nil {
		p.bad(l, err)
		return
	}
	p.mu.Lock()
	p.st.FramesOK++
	if res.event == evEcho {
		p.st.Echoes++
	}
	p.mu.Unlock()
	if res.event == evEcho {
		p.echoed(m)
	}
	if res.warn != nil {
		p.limited.Log(p.readCtx, slog.LevelWarn, "state:"+p.cfg.Path, "radio state not saved", "err", res.warn)
	}
	if res.event == evLog && m.Node == 0 {
		p.log.Debug("gateway log", "msg", clipText(m.Payload))
	}
	if len(res.replies) > 0 {
		select {
		case p.writes <- bytes.Clone(res.replies):
		default:
			p.mu.Lock()
			p.st.RepliesLost++
			p.mu.Unlock()
		}
	}
	if res.event != evReading {
		return
	}
	label := p.nodeLabel(m.Node, res.child)
	if other, elsewhere := p.boundElsewhere(m.Node); elsewhere {
		p.refuseOtherPort(label, other)
		return
	}
	dev, ok := p.bind.BindRadio(p.cfg.Path, m.Node, res.child)
	if !ok {
		dev, ok = p.bind.BindRadio(p.cfg.Path, m.Node, -1)
	}
	if !ok {
		p.unbound(label, "")
		return
	}
	p.enqueue(pipeline.Message{Device: dev, Source: reading.Source{Kind: "radio", Port: p.cfg.Path, Node: label},
		Payload: bytes.Clone(res.payload), Received: p.now()})
}

func (p *port) nodeLabel(node, child int) string {
	if p.labels[node] == "" {
		p.labels[node] = strconv.Itoa(node)
	}
	if child == ChildNode {
		return p.labels[node]
	}
	return p.labels[node] + "/" + strconv.Itoa(child)
}

// boundElsewhere reports whether the policy binds node to a device on
// some port but not on this one, and names one such port. Checked before
// BindRadio: a whole-port binding here must not take the frame either.
func (p *port) boundElsewhere(node int) (string, bool) {
	nb, ok := p.bind.(NodeBinder)
	if !ok {
		return "", false
	}
	ports := nb.RadioNodePorts(node)
	if len(ports) == 0 || slices.Contains(ports, p.cfg.Path) {
		return "", false
	}
	return ports[0], true
}

func (p *port) refuseOtherPort(node, other string) {
	p.mu.Lock()
	p.st.Refused++
	p.mu.Unlock()
	if p.m != nil {
		p.m.Refused.WithLabelValues(ReasonNodeOtherPort).Inc()
	}
	if p.opts.OnRefusal != nil {
		p.opts.OnRefusal(ReasonNodeOtherPort, p.cfg.Path, node, other)
	}
	p.limited.Log(p.readCtx, slog.LevelWarn, "otherport:"+p.cfg.Path+":"+node,
		"reading refused: this radio node id is bound to a device on another port; a node on this port may not speak as it",
		"reason", ReasonNodeOtherPort, "node", node, "bound_port", other,
		"fix", "if the node moved, bind it here: edgegate device bind DEVICE --radio-port "+p.cfg.Path+" --radio-node N")
}

func (p *port) unbound(node, device string) {
	p.mu.Lock()
	p.st.Refused++
	p.mu.Unlock()
	if p.m != nil {
		p.m.Refused.WithLabelValues(ReasonUnbound).Inc()
	}
	p.limited.Log(p.readCtx, slog.LevelWarn, "unbound:"+p.cfg.Path+":"+node+device,
		"reading from a radio node bound to no registered device", "reason", ReasonUnbound,
		"node", node, "device", device)
}

func (p *port) frameJSON(l Line) {
	jl, err := DecodeJSONLine(l.Bytes)
	if err != nil {
		p.bad(l, err)
		return
	}
	now := p.now()
	p.mu.Lock()
	p.st.FramesOK++
	if jl.Seq != nil {
		last, seen := p.lastSeq[jl.Device]
		if seen && last == *jl.Seq {
			// The radio repeated the previous frame (a retransmission).
			p.st.Duplicates++
			p.mu.Unlock()
			return
		}
		if !seen && len(p.lastSeq) >= maxJSONDevices {
			clear(p.lastSeq)
		}
		p.lastSeq[jl.Device] = *jl.Seq
	}
	p.mu.Unlock()
	if !p.boundJSON(jl.Device) {
		p.mu.Lock()
		pn := p.jsonPend[jl.Device]
		if pn == nil {
			if len(p.jsonPend) >= maxJSONDevices {
				clear(p.jsonPend)
			}
			pn = &PendingNode{Port: p.cfg.Path, Node: -1, Device: jl.Device, Battery: -1}
			p.jsonPend[jl.Device] = pn
		}
		pn.LastSeen = now
		p.mu.Unlock()
		p.unbound("", jl.Device)
		return
	}
	p.enqueue(pipeline.Message{Device: jl.Device, Source: reading.Source{Kind: "radio", Port: p.cfg.Path},
		Payload: jl.pipelinePayload(), Received: now})
}

// boundJSON reports whether device may speak through this JSON-lines port:
// its binding names this port (DeviceBinder), or, without that capability,
// it is the device bound to the whole port (BindRadio(port, -1, -1)).
func (p *port) boundJSON(device string) bool {
	if db, ok := p.bind.(DeviceBinder); ok {
		port, ok := db.RadioPort(device)
		return ok && port == p.cfg.Path
	}
	dev, ok := p.bind.BindRadio(p.cfg.Path, -1, -1)
	return ok && dev == device
}

// enqueue hands msg to the submit goroutine, waiting while it is full: the
// serial link has no way to make a node resend.
func (p *port) enqueue(msg pipeline.Message) {
	select {
	case p.readings <- msg:
	case <-p.readCtx.Done():
		p.mu.Lock()
		p.st.Dropped++
		p.mu.Unlock()
	}
}

// submitLoop submits readings in order, retrying one that the pipeline
// could not queue (quota, store failure) with backoff while holding it.
func (p *port) submitLoop(ctx context.Context) {
	bo := backoff.New(p.opts.MinBackoff, p.opts.MaxBackoff)
	for {
		var msg pipeline.Message
		select {
		case <-ctx.Done():
			p.drain(0)
			return
		case msg = <-p.readings:
		}
		for {
			out, err := p.sub.Submit(ctx, msg)
			if err == nil {
				bo.Reset()
				p.mu.Lock()
				switch out {
				case pipeline.Refused:
					p.st.Refused++
				case pipeline.Duplicate:
					p.st.Duplicates++
				default:
					p.st.Submitted++
				}
				p.mu.Unlock()
				break
			}
			p.limited.Log(ctx, slog.LevelWarn, "hold:"+p.cfg.Path, "reading not queued; holding it and retrying",
				"device", msg.Device, "node", msg.Source.Node, "err", err)
			if ctx.Err() != nil || bo.Wait(ctx) != nil {
				p.drain(1)
				return
			}
		}
	}
}

// drain counts the readings lost to shutdown: held ones plus the queued.
func (p *port) drain(held int) {
	n := held
	for {
		select {
		case <-p.readings:
			n++
			continue
		default:
		}
		break
	}
	if n == 0 {
		return
	}
	p.mu.Lock()
	p.st.Dropped += uint64(n)
	p.mu.Unlock()
	p.log.Warn("radio readings dropped at shutdown", "count", n)
}

func (p *port) status() PortStatus {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.st
}

func (p *port) pending() []PendingNode {
	var out []PendingNode
	if p.ctrl != nil {
		for _, n := range p.ctrl.snapshot() {
			if p.nodeBound(n) {
				continue
			}
			out = append(out, PendingNode{Port: p.cfg.Path, Node: n.id, Children: n.children,
				Sketch: n.sketch, SketchVersion: n.sketchVersion, Battery: n.battery, LastSeen: n.lastSeen})
		}
		return out
	}
	p.mu.Lock()
	cands := make([]PendingNode, 0, len(p.jsonPend))
	for _, pn := range p.jsonPend {
		cands = append(cands, *pn)
	}
	p.mu.Unlock()
	for _, pn := range cands {
		if !p.boundJSON(pn.Device) {
			out = append(out, pn)
		}
	}
	slices.SortFunc(out, func(a, b PendingNode) int { return strings.Compare(a.Device, b.Device) })
	return out
}

func (p *port) nodeBound(n nodeInfo) bool {
	if _, ok := p.bind.BindRadio(p.cfg.Path, n.id, -1); ok {
		return true
	}
	if _, ok := p.bind.BindRadio(p.cfg.Path, n.id, ChildNode); ok {
		return true
	}
	for _, c := range n.children {
		if _, ok := p.bind.BindRadio(p.cfg.Path, n.id, c.ID); ok {
			return true
		}
	}
	return false
}
