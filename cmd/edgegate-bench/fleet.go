package main

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/eclipse/paho.mqtt.golang/packets"

	"github.com/edgegate/edgegate/internal/envelope"
)

// device is one simulated device, registered at the gateway and the sim.
type device struct {
	ID, Type, Owner, K1, K2 string
}

func makeDevices(n int) []device {
	out := make([]device, n)
	for i := range out {
		id := fmt.Sprintf("bench-%03d", i)
		out[i] = device{ID: id, Type: "BenchSensor", Owner: "alice", K1: "k1-bench-" + id, K2: "k2-bench-" + id}
	}
	return out
}

// fleet is M connected MQTT clients, one per device.
type fleet struct {
	devs    []device
	clients []paho.Client
	acks    []*ackOrder // each client's PUBACK order
	// base numbers the next publish's readings: device i's k-th reading
	// carries "n" = base + k*m + i (m devices), so that a sink can tell
	// the phases of a run apart (`edgegate-bench peers` advances it).
	base int64
}

// connectFleet connects every device to url; withCreds logs in with the
// device id and its derived password (embedded broker).
func connectFleet(url string, devs []device, withCreds bool) (*fleet, error) {
	f := &fleet{devs: devs}
	for _, d := range devs {
		o := paho.NewClientOptions().AddBroker(url).SetClientID("pub-" + d.ID + "-" + strconv.FormatInt(time.Now().UnixNano(), 36)).
			SetConnectTimeout(5 * time.Second).SetAutoReconnect(false).SetWriteTimeout(10 * time.Second).
			SetProtocolVersion(4).SetCleanSession(true).SetKeepAlive(60 * time.Second)
		ao := newAckOrder()
		o.SetStore(ao)
		if withCreds {
			pw, err := envelope.DeriveMQTTPassword(d.ID, d.K1, d.K2)
			if err != nil {
				f.close()
				return nil, err
			}
			o.SetUsername(d.ID).SetPassword(pw)
		}
		c := paho.NewClient(o)
		tok := c.Connect()
		if !tok.WaitTimeout(10 * time.Second) {
			f.close()
			return nil, fmt.Errorf("connect %s: timed out", d.ID)
		}
		if err := tok.Error(); err != nil {
			f.close()
			return nil, fmt.Errorf("connect %s: %w", d.ID, err)
		}
		f.clients = append(f.clients, c)
		f.acks = append(f.acks, ao)
	}
	return f, nil
}

func (f *fleet) close() {
	for _, c := range f.clients {
		c.Disconnect(100)
	}
	f.clients = nil
}

// payload is a flat reading with the publish time in unix nanos.
func payload(n int) []byte {
	return fmt.Appendf(nil, `{"temperature":{"value":%d.5,"type":"Number"},"humidity":%d,"n":%d,"t0":%d}`,
		20+n%10, 40+n%20, n, time.Now().UnixNano())
}

type publishResult struct {
	Sent, Acked, Failed int
	Elapsed             time.Duration
	PerDevice           []int // sent, by device
	// AcksOutOfOrder counts PUBACKs that arrived before the PUBACK of an
	// earlier publish on the same connection.
	AcksOutOfOrder int
}

// publish sends total readings, spread evenly over the devices, QoS 1,
// with at most window unacknowledged per device. rate > 0 paces the
// fleet to that many readings per second (open loop: the schedule does not
// slip when the gateway is slow, but the window still bounds what is in
// flight); rate 0 is as fast as the acknowledgements allow. maxDur bounds
// the whole run.
func (f *fleet) publish(ctx context.Context, total int, rate float64, window int, maxDur time.Duration) publishResult {
	ctx, cancel := context.WithTimeout(ctx, maxDur)
	defer cancel()
	m := len(f.clients)
	var sent, acked, failed atomic.Int64
	perDev := make([]int, m)
	var ooo0 int64
	for _, a := range f.acks {
		ooo0 += a.outOfOrder()
	}
	start := time.Now()
	var wg sync.WaitGroup
	for i, c := range f.clients {
		share := total / m
		if i < total%m {
			share++
		}
		topic := "devices/" + f.devs[i].ID + "/telemetry"
		var interval time.Duration
		if rate > 0 {
			interval = time.Duration(float64(time.Second) * float64(m) / rate)
		}
		offset := time.Duration(i) * interval / time.Duration(max(m, 1))
		wg.Go(func() {
			toks := make(chan paho.Token, window)
			var inner sync.WaitGroup
			inner.Go(func() {
				for tok := range toks {
					if tok.WaitTimeout(30*time.Second) && tok.Error() == nil {
						acked.Add(1)
					} else {
						failed.Add(1)
					}
				}
			})
			defer func() { close(toks); inner.Wait() }()
			n := 0
			defer func() { perDev[i] = n }()
			for k := 0; k < share; k++ {
				if interval > 0 {
					due := start.Add(offset + time.Duration(k)*interval)
					if d := time.Until(due); d > 0 {
						t := time.NewTimer(d)
						select {
						case <-t.C:
						case <-ctx.Done():
							t.Stop()
							return
						}
					}
				}
				if ctx.Err() != nil {
					return
				}
				tok := c.Publish(topic, 1, false, payload(int(f.base)+k*m+i))
				sent.Add(1)
				n++
				select {
				case toks <- tok:
				case <-ctx.Done():
					return
				}
			}
		})
	}
	wg.Wait()
	var ooo int64
	for _, a := range f.acks {
		ooo += a.outOfOrder()
	}
	return publishResult{Sent: int(sent.Load()), Acked: int(acked.Load()), Failed: int(failed.Load()), Elapsed: time.Since(start),
		PerDevice: perDev, AcksOutOfOrder: int(ooo - ooo0)}
}

// ackOrder is a publisher's paho store that also records the order of its
// PUBACKs. paho keeps an in-flight QoS 1 publish under "o.<id>": Put in
// Publish, i.e. in the publishing goroutine in publish order, and Del when
// its PUBACK is read, in the order PUBACKs arrive (store.go,
// persistOutbound / persistInbound, and client.go Publish, of
// paho.mqtt.golang v1.5.1). A PUBACK whose publish is not the oldest one
// still in flight came out of publish order (MQTT 3.1.1 §4.6).
type ackOrder struct {
	paho.Store
	mu      sync.Mutex
	next    uint64
	seqOf   map[string]uint64 // in-flight key -> publish number
	pending []uint64          // in-flight publish numbers, oldest first (acked ones popped lazily)
	acked   map[uint64]bool
	ooo     int64
}

func newAckOrder() *ackOrder {
	return &ackOrder{Store: paho.NewMemoryStore(), seqOf: map[string]uint64{}, acked: map[uint64]bool{}}
}

func (a *ackOrder) Put(key string, m packets.ControlPacket) {
	if _, pub := m.(*packets.PublishPacket); pub && strings.HasPrefix(key, "o.") {
		a.mu.Lock()
		a.seqOf[key] = a.next
		a.pending = append(a.pending, a.next)
		a.next++
		a.mu.Unlock()
	}
	a.Store.Put(key, m)
}

func (a *ackOrder) Del(key string) {
	a.mu.Lock()
	if seq, ok := a.seqOf[key]; ok {
		delete(a.seqOf, key)
		for len(a.pending) > 0 && a.acked[a.pending[0]] {
			delete(a.acked, a.pending[0])
			a.pending = a.pending[1:]
		}
		if len(a.pending) > 0 && a.pending[0] != seq {
			a.ooo++
			a.acked[seq] = true
		} else if len(a.pending) > 0 {
			a.pending = a.pending[1:]
		}
	}
	a.mu.Unlock()
	a.Store.Del(key)
}

// Reset is the clean session's start: nothing is in flight.
func (a *ackOrder) Reset() {
	a.mu.Lock()
	a.seqOf, a.acked, a.pending = map[string]uint64{}, map[uint64]bool{}, nil
	a.mu.Unlock()
	a.Store.Reset()
}

func (a *ackOrder) outOfOrder() int64 {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.ooo
}

// subscribe connects a plain anonymous subscriber to filter with QoS 1 and
// counts what it receives; onMsg, if not nil, is also called with each
// message, in the order the broker delivered them.
func subscribe(url, filter string, onMsg func(paho.Message)) (paho.Client, *atomic.Int64, *atomic.Int64, error) {
	var n atomic.Int64
	var lastNs atomic.Int64
	o := paho.NewClientOptions().AddBroker(url).SetClientID("bench-sub-" + strconv.FormatInt(time.Now().UnixNano(), 36)).
		SetConnectTimeout(5 * time.Second).SetAutoReconnect(false).SetProtocolVersion(4).SetCleanSession(true).
		SetOrderMatters(onMsg != nil).SetMessageChannelDepth(4096)
	c := paho.NewClient(o)
	if tok := c.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		return nil, nil, nil, errors.Join(errors.New("subscriber connect failed"), tok.Error())
	}
	tok := c.Subscribe(filter, 1, func(_ paho.Client, m paho.Message) {
		n.Add(1)
		lastNs.Store(time.Now().UnixNano())
		if onMsg != nil {
			onMsg(m)
		}
	})
	if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		c.Disconnect(100)
		return nil, nil, nil, errors.Join(errors.New("subscribe failed"), tok.Error())
	}
	return c, &n, &lastNs, nil
}
