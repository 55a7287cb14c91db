package mqtt

import (
	"context"
	"io"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/edgegate/edgegate/internal/pipeline"
)

// instantCommit settles every reading at once: what the broker's own path
// costs per PUBLISH, without the pipeline, the queue and the disk.
type instantCommit struct{ *pipeline.Pipeline }

func (instantCommit) Start(context.Context, pipeline.Message) pipeline.Pending {
	return func(context.Context) (pipeline.Outcome, error) { return pipeline.Queued, nil }
}

// BenchmarkBrokerPublishQoS1 is the embedded broker's path per QoS 1
// PUBLISH (read, hooks, hand-over, PUBACK) over loopback TCP: three devices,
// each with up to 8 publishes in flight, every PUBACK checked in order.
// cpu-ns/op is the process's user+system CPU per publish, the raw clients
// included (docs/performance.md, "Embedded broker").
func BenchmarkBrokerPublishQoS1(b *testing.B) {
	e := newAccessEnvWith(b, func(p *pipeline.Pipeline) Submitter { return instantCommit{p} })
	devs := []string{"a1", "a2", "b1"}
	conns := make([]*rawConn, len(devs))
	for i, id := range devs {
		c, code := e.wireConnect(wireOpts{user: id, password: e.devicePassword(id), id: "bench-" + id, clean: true})
		if code != 0 {
			b.Fatalf("device %s refused: CONNACK %d", id, code)
		}
		conns[i] = c
	}
	per := b.N/len(devs) + 1
	const window = 8
	var ru0, ru1 syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru0)
	b.ResetTimer()
	var wg sync.WaitGroup
	for i, c := range conns {
		pk := encode(b, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1},
			TopicName: "devices/" + devs[i] + "/telemetry", PacketID: 1, Payload: []byte(sample)})
		idAt := len(pk) - len(sample) - 2 // the packet id precedes the payload
		tokens := make(chan struct{}, window)
		wg.Go(func() { // PUBACKs, in publish order
			_ = c.SetReadDeadline(time.Now().Add(5 * time.Minute))
			var ack [4]byte
			for n := range per {
				if _, err := io.ReadFull(c.br, ack[:]); err != nil {
					b.Errorf("%s: PUBACK %d: %v", devs[i], n, err)
					return
				}
				if want := uint16(n%65535 + 1); ack[0] != 0x40 || ack[1] != 2 || uint16(ack[2])<<8|uint16(ack[3]) != want {
					b.Errorf("%s: PUBACK %d is % x, want id %d", devs[i], n, ack, want)
					return
				}
				<-tokens
			}
		})
		wg.Go(func() {
			for n := range per {
				tokens <- struct{}{}
				id := uint16(n%65535 + 1)
				pk[idAt], pk[idAt+1] = byte(id>>8), byte(id)
				if _, err := c.Write(pk); err != nil {
					b.Errorf("%s: publish %d: %v", devs[i], n, err)
					return
				}
			}
		})
	}
	wg.Wait()
	b.StopTimer()
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru1)
	cpu := time.Duration(ru1.Utime.Nano()-ru0.Utime.Nano()) + time.Duration(ru1.Stime.Nano()-ru0.Stime.Nano())
	b.ReportMetric(float64(cpu.Nanoseconds())/float64(per*len(devs)), "cpu-ns/op")
}
