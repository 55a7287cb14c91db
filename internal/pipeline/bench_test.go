package pipeline

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/envelope"
	"github.com/edgegate/edgegate/internal/queue"
	"github.com/edgegate/edgegate/internal/reading"
	"github.com/edgegate/edgegate/policy"
)

// sealingAppender runs the entry's Seal as the committer would, without a
// disk: Submit's CPU cost per reading, signing included.
type sealingAppender struct{ seq uint64 }

func (a *sealingAppender) Append(_ context.Context, e queue.Entry) (queue.Item, error) {
	a.seq++
	body, err := e.Seal(a.seq)
	return queue.Item{Seq: a.seq, Body: body}, err
}

func (a *sealingAppender) Enqueue(ctx context.Context, e queue.Entry) (func(context.Context) (queue.Item, error), error) {
	it, err := a.Append(ctx, e)
	return func(context.Context) (queue.Item, error) { return it, err }, nil
}

// BenchmarkSubmitSigning: Submit per reading (policy, parse or verify,
// sign, render the NGSI body) per signing mode, on one core, without the
// queue's disk write. The difference to hs256 is what the signature costs.
func BenchmarkSubmitSigning(b *testing.B) {
	for _, mode := range []string{"hs256", "gateway-EdDSA", "gateway-ES256", "device-EdDSA", "device-ES256"} {
		b.Run(mode, func(b *testing.B) {
			var (
				eng  *policy.Engine
				ring keyRing
				dk   envelope.Key
			)
			switch mode {
			case "hs256":
				eng = signedPolicy(b, policy.SigningHS256)
			case "gateway-EdDSA", "gateway-ES256":
				k, _ := envelope.GenerateKey(mode[len("gateway-"):])
				eng, ring = signedPolicy(b, policy.SigningGateway, k), keyRing{"th-1": k}
			default:
				dk, _ = envelope.GenerateKey(mode[len("device-"):])
				eng = signedPolicy(b, policy.SigningDevice, dk)
			}
			p := New(eng, &sealingAppender{}, Options{Gateway: "gw-1", SigningKeys: ring})
			payloads := make([][]byte, b.N)
			for i := range payloads {
				if dk.CanSign() { // signed on the device: not the gateway's cost
					jws, _ := envelope.Seal(dk, envelope.Claims{Version: 1, Device: "th-1", Seq: uint64(i + 1), Time: time.Now().UTC(),
						Attrs: map[string]envelope.Attr{"temperature": {Type: "Number", Value: 21.5}, "humidity": {Type: "Number", Value: 40.0}}})
					payloads[i] = []byte(jws)
				} else {
					payloads[i] = fmt.Appendf(nil, `{"temperature": 21.5, "humidity": 40}`)
				}
			}
			src := reading.Source{Kind: "mqtt"}
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				out, err := p.Submit(context.Background(), Message{Device: "th-1", Source: src, Payload: payloads[i]})
				if err != nil || out != Queued {
					b.Fatal(out, err)
				}
			}
		})
	}
}
