package radiosim

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"math"
	"math/rand/v2"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/creack/pty"
	"github.com/edgegate/edgegate/radio"
	"golang.org/x/sys/unix"
)

// Options configures a simulated MySensors serial gateway.
type Options struct {
	// Link is where the gateway side appears: a symlink to the pty's
	// slave, like /dev/serial/by-id/... . An existing symlink there is
	// replaced; any other file is an error.
	Link string
	// Nodes is the number of sensor nodes behind the gateway (default 1).
	// Each presents a temperature (child 0) and a humidity (child 1)
	// sensor and sends both every Interval, its battery level every 5th
	// time.
	Nodes int
	// FirstID is the id of the first node (default 1); nodes get
	// consecutive ids.
	FirstID int
	// AutoID is how many of the nodes (the last ones) start without an id
	// and ask the controller for one (I_ID_REQUEST). Default: 1 when Nodes
	// > 1, else 0. Use -1 for none.
	AutoID int
	// Interval between readings (default 1s).
	Interval time.Duration
	// Garbage mixes hostile traffic in: random bytes, invalid UTF-8,
	// over-long lines, wrong field counts, out-of-range ids and values.
	Garbage bool
	// Silent sends nothing on its own (no startup, no nodes): the test
	// drives the link with Inject.
	Silent bool
	// HearController, with Silent, still reads what the controller sends
	// and counts it in Stats (e.g. AssignedIDs), without answering.
	HearController bool
	// Relay gives every node a relay on child RelayChild (S_BINARY,
	// V_STATUS) that applies a set the controller sends with the ack flag
	// and echoes it back with ack=1, as a MySensors node does.
	Relay bool
	// DropSets ignores the first DropSets sets to a relay (frames lost on
	// the air): the controller must send them again.
	DropSets int
	// Seed makes the values and the garbage reproducible (0: random).
	Seed   uint64
	Logger *slog.Logger
}

// Stats counts what the simulated gateway heard from the controller.
type Stats struct {
	Lines          int   // lines written to the link
	Garbage        int   // hostile chunks written
	WritesDropped  int   // lines dropped: link unplugged or not read
	AssignedIDs    []int // I_ID_RESPONSE payloads received
	TimeAnswers    int
	ConfigAnswers  int
	ReqAnswers     int // sets from the controller (answers to req)
	Discovers      int // I_DISCOVER broadcasts received
	PresentAsks    int // I_PRESENTATION requests received
	ControllerBad  int // lines from the controller that did not decode
	LastTimeAnswer int64
	// RelaySets are the sets the relays applied, "node/child=payload", in
	// order; RelayDropped those ignored (Options.DropSets).
	RelaySets    []string
	RelayDropped int
}

// RelayChild is the child id of a node's relay (Options.Relay).
const RelayChild = 2

// Sim is a simulated MySensors serial gateway with nodes behind it, on a
// pseudo-terminal: the gateway daemon opens the link path as a serial port
// through tarm/serial, exactly as it would a USB radio. It can be unplugged
// and replugged behind the same path. Used by `edgegate-sim radio-sim`, the
// demo and the tests.
type Sim struct {
	opts Options
	log  *slog.Logger
	rnd  *rand.Rand

	ctrl     chan simHeard
	replug   chan struct{}
	wg       sync.WaitGroup // pty readers
	closeOne sync.Once

	mu    sync.Mutex
	cur   *simPTY // nil while unplugged or closed
	gen   int
	stats Stats
}

type simPTY struct {
	master, slave *os.File
	gen           int
}

type simHeard struct {
	gen  int
	line []byte
}

type simNode struct {
	id        int // 0: has none yet
	presented bool
	temp, hum float64
	battery   int
}

// New creates the pty pair and the link. Run speaks; Close (or the end
// of Run) removes the link and closes the pty.
func New(opts Options) (*Sim, error) {
	if opts.Link == "" {
		return nil, errors.New("radio sim: a link path is required")
	}
	if opts.Nodes <= 0 {
		opts.Nodes = 1
	}
	if opts.Nodes > radio.MaxNodeID {
		return nil, fmt.Errorf("radio sim: at most %d nodes: %d", radio.MaxNodeID, opts.Nodes)
	}
	if opts.FirstID <= 0 {
		opts.FirstID = 1
	}
	if opts.AutoID == 0 && opts.Nodes > 1 {
		opts.AutoID = 1
	}
	opts.AutoID = max(0, min(opts.AutoID, opts.Nodes))
	if opts.FirstID+opts.Nodes-opts.AutoID-1 > radio.MaxNodeID {
		return nil, fmt.Errorf("radio sim: node ids above %d", radio.MaxNodeID)
	}
	if opts.Interval <= 0 {
		opts.Interval = time.Second
	}
	seed := opts.Seed
	if seed == 0 {
		seed = rand.Uint64()
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Sim{opts: opts, log: log.With("component", "radio-sim", "link", opts.Link),
		rnd: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)), ctrl: make(chan simHeard, 64),
		replug: make(chan struct{}, 1)}
	if err := s.plug(); err != nil {
		return nil, err
	}
	return s, nil
}

// Link is the path the gateway side is reachable at.
func (s *Sim) Link() string { return s.opts.Link }

// plug creates a pty pair and points the link at its slave.
func (s *Sim) plug() error {
	if fi, err := os.Lstat(s.opts.Link); err == nil && fi.Mode()&fs.ModeSymlink == 0 {
		return fmt.Errorf("radio sim: %s exists and is not a symlink", s.opts.Link)
	}
	master, slave, err := pty.Open()
	if err != nil {
		return fmt.Errorf("radio sim: open pty: %w", err)
	}
	// Raw mode before the gateway opens it, so nothing is echoed back.
	if err := makeRaw(slave); err != nil {
		master.Close()
		slave.Close()
		return err
	}
	tmp := s.opts.Link + ".sim-tmp"
	os.Remove(tmp)
	if err := os.Symlink(slave.Name(), tmp); err != nil {
		master.Close()
		slave.Close()
		return fmt.Errorf("radio sim: link %s: %w", s.opts.Link, err)
	}
	if err := os.Rename(tmp, s.opts.Link); err != nil {
		os.Remove(tmp)
		master.Close()
		slave.Close()
		return fmt.Errorf("radio sim: link %s: %w", s.opts.Link, err)
	}
	s.mu.Lock()
	s.gen++
	p := &simPTY{master: master, slave: slave, gen: s.gen}
	s.cur = p
	s.mu.Unlock()
	s.wg.Go(func() { s.read(p) })
	s.log.Debug("pty plugged", "slave", slave.Name())
	return nil
}

func makeRaw(f *os.File) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return fmt.Errorf("radio sim: raw mode: %w", err)
	}
	var opErr error
	err = rc.Control(func(fd uintptr) {
		t, err := unix.IoctlGetTermios(int(fd), unix.TCGETS)
		if err != nil {
			opErr = err
			return
		}
		t.Iflag &^= unix.IGNBRK | unix.BRKINT | unix.PARMRK | unix.ISTRIP | unix.INLCR | unix.IGNCR | unix.ICRNL | unix.IXON
		t.Oflag &^= unix.OPOST
		t.Lflag &^= unix.ECHO | unix.ECHONL | unix.ICANON | unix.ISIG | unix.IEXTEN
		t.Cflag &^= unix.CSIZE | unix.PARENB
		t.Cflag |= unix.CS8
		opErr = unix.IoctlSetTermios(int(fd), unix.TCSETS, t)
	})
	if err == nil {
		err = opErr
	}
	if err != nil {
		return fmt.Errorf("radio sim: raw mode: %w", err)
	}
	return nil
}

// read forwards what the controller writes to the Run goroutine; it ends
// when the pty's master is closed.
func (s *Sim) read(p *simPTY) {
	split := radio.NewLineSplitter(radio.MaxMySensorsLine)
	buf := make([]byte, 1024)
	for {
		n, err := p.master.Read(buf)
		split.Feed(buf[:n], func(l radio.Line) {
			if l.Err != nil {
				return
			}
			select {
			case s.ctrl <- simHeard{gen: p.gen, line: append([]byte(nil), l.Bytes...)}:
			default: // Run is not keeping up; a real radio would lose it too
			}
		})
		if err != nil {
			return
		}
	}
}

// Unplug closes the pty and removes the link, as pulling the USB radio
// does: the gateway's reads hang up and the path disappears.
func (s *Sim) Unplug() error {
	s.mu.Lock()
	p := s.cur
	s.cur = nil
	s.mu.Unlock()
	if p == nil {
		return nil
	}
	err := os.Remove(s.opts.Link)
	p.master.Close()
	p.slave.Close()
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("radio sim: unplug: %w", err)
	}
	return nil
}

// Replug creates a new pty behind the same link; the simulated gateway
// starts up again (startup messages, presentations).
func (s *Sim) Replug() error {
	if err := s.Unplug(); err != nil {
		return err
	}
	if err := s.plug(); err != nil {
		return err
	}
	select {
	case s.replug <- struct{}{}:
	default:
	}
	return nil
}

// Inject writes raw bytes to the link, as the gateway would send them.
func (s *Sim) Inject(b []byte) error {
	s.mu.Lock()
	p := s.cur
	s.mu.Unlock()
	if p == nil {
		return errors.New("radio sim: unplugged")
	}
	if err := p.master.SetWriteDeadline(time.Now().Add(time.Second)); err != nil {
		return fmt.Errorf("radio sim: write: %w", err)
	}
	if _, err := p.master.Write(b); err != nil {
		return fmt.Errorf("radio sim: write: %w", err)
	}
	return nil
}

// Stats returns what the simulated gateway sent and heard so far.
func (s *Sim) Stats() Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.stats
	st.AssignedIDs = append([]int(nil), s.stats.AssignedIDs...)
	st.RelaySets = append([]string(nil), s.stats.RelaySets...)
	return st
}

// Close removes the link, closes the pty and waits for its reader.
func (s *Sim) Close() error {
	var err error
	s.closeOne.Do(func() {
		err = s.Unplug()
		s.wg.Wait()
	})
	return err
}

// Run speaks MySensors until ctx is done, then closes the sim.
func (s *Sim) Run(ctx context.Context) error {
	defer s.Close()
	nodes := make([]*simNode, s.opts.Nodes)
	static := s.opts.Nodes - s.opts.AutoID
	for i := range nodes {
		n := &simNode{temp: 19 + s.rnd.Float64()*4, hum: 40 + s.rnd.Float64()*20, battery: 100 - i}
		if i < static {
			n.id = s.opts.FirstID + i
		}
		nodes[i] = n
	}
	if s.opts.Silent && !s.opts.HearController {
		<-ctx.Done()
		return nil
	}
	if s.opts.Silent {
		for {
			select {
			case <-ctx.Done():
				return nil
			case h := <-s.ctrl:
				s.heard(h, nodes)
			}
		}
	}
	s.startup(nodes)
	tick := time.NewTicker(s.opts.Interval)
	defer tick.Stop()
	ticks := 0
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-s.replug:
			for _, n := range nodes {
				n.presented = false
			}
			s.startup(nodes)
		case h := <-s.ctrl:
			s.heard(h, nodes)
		case <-tick.C:
			ticks++
			s.tick(ticks, nodes)
		}
	}
}

func (s *Sim) startup(nodes []*simNode) {
	for _, l := range []string{
		"0;255;3;0;9;0 MCO:BGN:INIT GW,CP=RNNGA---,FQ=16,REL=255,VER=2.3.2",
		"0;255;3;0;9;4 TSM:INIT",
		"0;255;3;0;9;10 TSM:INIT:TSP OK",
		"0;255;3;0;9;12 TSM:INIT:GW MODE",
		"0;255;3;0;9;15 TSM:READY:ID=0,PAR=0,DIS=0",
		"0;255;3;0;9;18 MCO:REG:NOT NEEDED",
		"0;255;3;0;14;Gateway startup complete.",
		"0;255;0;0;18;2.3.2",
		"0;255;3;0;9;22 MCO:BGN:STP",
		"0;255;3;0;9;28 MCO:BGN:INIT OK,TSP=1",
	} {
		s.send(l)
	}
	for _, n := range nodes {
		if n.id == 0 {
			s.send("255;255;3;0;3;")
		} else {
			s.present(n)
		}
	}
}

func (s *Sim) present(n *simNode) {
	id := strconv.Itoa(n.id)
	for _, l := range []string{
		id + ";255;0;0;17;2.3.2",
		id + ";255;3;0;11;TempHum",
		id + ";255;3;0;12;1.0",
		id + ";0;0;0;6;Temperature",
		id + ";1;0;0;7;Humidity",
	} {
		s.send(l)
	}
	if s.opts.Relay {
		s.send(id + ";" + strconv.Itoa(RelayChild) + ";0;0;3;Relay") // S_BINARY
	}
	for _, l := range []string{
		id + ";255;3;0;6;0",
		id + ";255;3;0;1;",
	} {
		s.send(l)
	}
	n.presented = true
}

func (s *Sim) tick(ticks int, nodes []*simNode) {
	for _, n := range nodes {
		if n.id == 0 {
			if ticks%5 == 0 {
				s.send("255;255;3;0;3;") // still no id: ask again
			}
			continue
		}
		id := strconv.Itoa(n.id)
		n.temp += (s.rnd.Float64() - 0.5) * 0.4
		n.hum = math.Max(0, math.Min(100, n.hum+(s.rnd.Float64()-0.5)))
		s.send(id + ";0;1;0;0;" + strconv.FormatFloat(n.temp, 'f', 1, 64))
		s.send(id + ";1;1;0;1;" + strconv.FormatFloat(n.hum, 'f', 1, 64))
		if ticks%5 == 0 {
			if n.battery > 0 {
				n.battery--
			}
			s.send(id + ";255;3;0;0;" + strconv.Itoa(n.battery))
		}
		if ticks%10 == 0 {
			s.send(id + ";255;3;0;22;" + strconv.Itoa(ticks*int(s.opts.Interval/time.Millisecond)))
		}
		if ticks == 3 {
			s.send(id + ";0;2;0;0;") // req: what does the controller know?
		}
	}
	if s.opts.Garbage && s.rnd.IntN(2) == 0 {
		s.garbage(nodes)
	}
}

// garbage writes one piece of hostile traffic, always ending in a newline
// so that the next good line is framed again.
func (s *Sim) garbage(nodes []*simNode) {
	var b []byte
	switch s.rnd.IntN(7) {
	case 0: // random bytes, control and high bytes included
		b = make([]byte, 1+s.rnd.IntN(40))
		for i := range b {
			b[i] = byte(s.rnd.IntN(256))
			if b[i] == '\n' {
				b[i] = 0
			}
		}
	case 1: // over-long line
		b = make([]byte, radio.MaxMySensorsLine+1+s.rnd.IntN(200))
		for i := range b {
			b[i] = 'A' + byte(i%26)
		}
	case 2:
		b = []byte("1;0;1;0") // wrong field count
	case 3:
		b = []byte("300;0;1;0;0;21.5") // node id out of range
	case 4:
		b = []byte(strconv.Itoa(max(1, nodes[0].id)) + ";0;1;0;0;hot") // not a number
	case 5:
		b = []byte("1;0;1;0;0;2\xff\xfe1") // invalid UTF-8
	case 6:
		b = []byte(strconv.Itoa(max(1, nodes[0].id)) + ";1;1;0;1;140") // humidity out of range
	}
	b = append(b, '\n')
	s.mu.Lock()
	s.stats.Garbage++
	s.mu.Unlock()
	s.write(b)
}

func (s *Sim) heard(h simHeard, nodes []*simNode) {
	s.mu.Lock()
	stale := h.gen != s.gen
	s.mu.Unlock()
	if stale {
		return
	}
	m, err := radio.DecodeMySensors(h.line)
	if err != nil {
		s.mu.Lock()
		s.stats.ControllerBad++
		s.mu.Unlock()
		return
	}
	switch {
	case m.Command == radio.CmdInternal && m.Type == radio.IIDResponse:
		id, err := strconv.Atoi(string(m.Payload))
		if err != nil || id < 1 || id > radio.MaxNodeID {
			return
		}
		s.mu.Lock()
		s.stats.AssignedIDs = append(s.stats.AssignedIDs, id)
		s.mu.Unlock()
		for _, n := range nodes {
			if n.id == 0 {
				n.id = id
				s.present(n)
				break
			}
		}
	case m.Command == radio.CmdInternal && m.Type == radio.ITime:
		secs, _ := strconv.ParseInt(string(m.Payload), 10, 64)
		s.mu.Lock()
		s.stats.TimeAnswers++
		s.stats.LastTimeAnswer = secs
		s.mu.Unlock()
	case m.Command == radio.CmdInternal && m.Type == radio.IConfig:
		s.mu.Lock()
		s.stats.ConfigAnswers++
		s.mu.Unlock()
	case m.Command == radio.CmdInternal && m.Type == radio.IDiscoverRequest:
		s.mu.Lock()
		s.stats.Discovers++
		s.mu.Unlock()
		for _, n := range nodes {
			if n.id != 0 {
				s.send(strconv.Itoa(n.id) + ";255;3;0;21;0")
			}
		}
	case m.Command == radio.CmdInternal && m.Type == radio.IPresentation:
		s.mu.Lock()
		s.stats.PresentAsks++
		s.mu.Unlock()
		for _, n := range nodes {
			if n.id == m.Node {
				s.present(n)
			}
		}
	case m.Command == radio.CmdSet && m.Ack && s.opts.Relay && m.Child == RelayChild && m.Type == 2:
		s.mu.Lock()
		if s.stats.RelayDropped < s.opts.DropSets {
			s.stats.RelayDropped++
			s.mu.Unlock()
			return
		}
		s.stats.RelaySets = append(s.stats.RelaySets, fmt.Sprintf("%d/%d=%s", m.Node, m.Child, m.Payload))
		s.mu.Unlock()
		// The echo: the same message back with the ack flag.
		s.write(radio.AppendMySensors(nil, m))
	case m.Command == radio.CmdSet:
		s.mu.Lock()
		s.stats.ReqAnswers++
		s.mu.Unlock()
	}
}

func (s *Sim) send(line string) {
	s.write(append([]byte(line), '\n'))
}

// write sends b to the link, dropping it when unplugged or when nobody
// reads the link for a while (a real gateway's UART does not wait either).
func (s *Sim) write(b []byte) {
	s.mu.Lock()
	p := s.cur
	s.mu.Unlock()
	ok := false
	if p != nil && p.master.SetWriteDeadline(time.Now().Add(200*time.Millisecond)) == nil {
		_, err := p.master.Write(b)
		ok = err == nil
	}
	s.mu.Lock()
	if ok {
		s.stats.Lines++
	} else {
		s.stats.WritesDropped++
	}
	s.mu.Unlock()
}
