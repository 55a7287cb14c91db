package command

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"math"
	"math/rand/v2"
	"time"

	"github.com/edgegate/edgegate/internal/backoff"
	"github.com/edgegate/edgegate/internal/envelope"
	"github.com/edgegate/edgegate/internal/pipeline"
	"github.com/edgegate/edgegate/policy"
)

// confirm marks the command of attr confirmed when the platform shows its
// value signed by the gateway: the device's reported state arrived.
func (s *Service) confirm(device, attr string, value json.RawMessage, now time.Time) {
	r, err := s.record(device)
	if err != nil {
		return
	}
	s.mu.Lock()
	c := r.Attrs[attr]
	var cmd Command
	if c != nil {
		cmd = *c
	}
	s.mu.Unlock()
	if c == nil || (cmd.State != Sent && cmd.State != Delivered) || !sameJSON(cmd.Value, value) {
		return
	}
	if err := s.settle(device, attr, cmd.Seq, Confirmed, "", false, now); err != nil {
		s.log.Warn("record a command confirmed", "device", device, "err", err)
		return
	}
	s.count(func(st *Stats) { st.Confirmed++ })
	s.clear(device, attr)
	s.log.Info("command confirmed: the platform shows the device's reported state", "device", device, "attr", attr, "seq", cmd.Seq)
}

// sameJSON compares two JSON values as values; numbers within Orion's
// rendering precision.
func sameJSON(a, b json.RawMessage) bool {
	var x, y any
	if json.Unmarshal(a, &x) != nil || json.Unmarshal(b, &y) != nil {
		return false
	}
	return sameValue(x, y)
}

func sameValue(x, y any) bool {
	switch xv := x.(type) {
	case float64:
		yv, ok := y.(float64)
		return ok && math.Abs(xv-yv) <= 1e-9*math.Max(1, math.Abs(xv))
	case map[string]any:
		yv, ok := y.(map[string]any)
		if !ok || len(xv) != len(yv) {
			return false
		}
		for k, v := range xv {
			if !sameValue(v, yv[k]) {
				return false
			}
		}
		return true
	case []any:
		yv, ok := y.([]any)
		if !ok || len(xv) != len(yv) {
			return false
		}
		for i := range xv {
			if !sameValue(xv[i], yv[i]) {
				return false
			}
		}
		return true
	default:
		return x == y
	}
}

// deliverAll sends every open command of the devices in the policy,
// oldest learned first; each attempt is bounded by the deliverer.
func (s *Service) deliverAll(ctx context.Context) {
	s.sweepRetained(ctx)
	pol := s.o.Policy.Current()
	for _, d := range pol.Devices() {
		if ctx.Err() != nil {
			return
		}
		r, err := s.record(d.ID)
		if err != nil {
			s.limited.Log(ctx, slog.LevelError, "record:"+d.ID, "read the device's commands", "device", d.ID, "err", err)
			continue
		}
		s.mu.Lock()
		var open, unreported []Command
		for _, c := range r.Attrs {
			switch {
			case c.State.open():
				open = append(open, *c)
			case c.State == Delivered && len(c.Reported) > 0:
				unreported = append(unreported, *c)
			}
		}
		s.mu.Unlock()
		for _, c := range unreported {
			s.report(ctx, d, c)
		}
		for _, c := range sortBySeq(open) {
			s.deliverOne(ctx, d, c)
		}
	}
}

func sortBySeq(cs []Command) []Command {
	for i := 1; i < len(cs); i++ {
		for j := i; j > 0 && cs[j].Seq < cs[j-1].Seq; j-- {
			cs[j], cs[j-1] = cs[j-1], cs[j]
		}
	}
	return cs
}

func (s *Service) deliverOne(ctx context.Context, d *policy.Device, c Command) {
	now := s.o.Now()
	switch {
	case !now.Before(c.Expires):
		if err := s.settle(d.ID, c.Attr, c.Seq, Expired, "not delivered within commands.ttl", false, now); err == nil {
			s.count(func(st *Stats) { st.Expired++ })
			s.log.Warn("command expired before it could be delivered; it will not be sent", "device", d.ID, "attr", c.Attr, "seq", c.Seq)
			if c.State == Sent || s.held(d.ID, c.Attr) {
				s.clear(d.ID, c.Attr)
			}
		}
		return
	case !d.Commandable() || !d.Writes(c.Attr):
		if err := s.settle(d.ID, c.Attr, c.Seq, Dropped, "the policy no longer lets the platform set this attribute", false, now); err == nil {
			s.count(func(st *Stats) { st.Dropped++ })
			s.clear(d.ID, c.Attr)
		}
		return
	case c.State == Sent:
		// Handed to a link that holds it (MQTT retained); after a restart
		// the broker holds nothing: hand it over again, same seq.
		s.mu.Lock()
		held := s.holding[d.ID+"/"+c.Attr]
		s.mu.Unlock()
		if held {
			return
		}
	}
	key := d.ID + "/" + c.Attr
	s.mu.Lock()
	ra, waiting := s.retry[key]
	s.mu.Unlock()
	if waiting && ra.seq == c.Seq && now.Before(ra.at) {
		return
	}
	var dl Deliverer
	if s.o.Route != nil {
		dl = s.o.Route(d)
	}
	if dl == nil {
		return // no link for it (yet): it waits, within its TTL
	}
	signed, err := s.sign(d, c)
	if err != nil {
		_ = s.settle(d.ID, c.Attr, c.Seq, Dropped, "cannot sign: "+err.Error(), false, now)
		s.count(func(st *Stats) { st.Dropped++ })
		return
	}
	if _, ok := dl.(Clearer); ok {
		// A link that holds what it is given (MQTT retained): marked held
		// before the publish, so that no crash or failed clear can leave a
		// retained command nobody will clear (confirm.go).
		if err := s.hold(d.ID, c.Attr); err != nil {
			s.limited.Log(ctx, slog.LevelError, "record:"+d.ID, "record a command held by its link", "device", d.ID, "err", err)
			return
		}
	}
	// The attempt ends at the command's expiry at the latest, and at once
	// if the device is revoked or re-registered meanwhile (Forget).
	// Checked and registered under one lock: Forget marks the command
	// dropped and then cancels what is registered, so either this sees it
	// dropped or Forget cancels this attempt.
	dctx, cancel := context.WithDeadline(ctx, c.Expires)
	s.mu.Lock()
	if r := s.recs[d.ID]; r == nil || r.Attrs[c.Attr] == nil || r.Attrs[c.Attr].Seq != c.Seq || !r.Attrs[c.Attr].State.open() {
		s.mu.Unlock()
		cancel()
		return // replaced, expired or dropped since deliverAll listed it
	}
	s.sending[d.ID] = cancel
	s.mu.Unlock()
	res, err := dl.Deliver(dctx, d, signed)
	aborted := dctx.Err() != nil // before cancel, which sets it
	s.mu.Lock()
	delete(s.sending, d.ID)
	s.mu.Unlock()
	cancel()
	if ctx.Err() != nil {
		return
	}
	if err != nil && aborted {
		// Expired or forgotten during the attempt: the next round settles
		// an expired one; a forgotten one is dropped already.
		return
	}
	if err != nil {
		s.count(func(st *Stats) { st.SendErrors++ })
		if errors.Is(err, ErrPermanent) {
			if serr := s.settle(d.ID, c.Attr, c.Seq, Dropped, err.Error(), true, now); serr == nil {
				s.count(func(st *Stats) { st.Dropped++ })
			}
			s.log.Warn("command dropped: the device's link cannot take it", "device", d.ID, "attr", c.Attr, "err", err)
			return
		}
		_ = s.settle(d.ID, c.Attr, c.Seq, c.State, err.Error(), true, now)
		s.mu.Lock()
		next := s.o.PollInterval
		if waiting && ra.seq == c.Seq {
			next = min(2*ra.wait, s.o.MaxBackoff)
		}
		s.retry[key] = retryAt{seq: c.Seq, at: now.Add(backoff.Spread(next, rand.Float64())), wait: next}
		s.mu.Unlock()
		s.limited.Log(ctx, slog.LevelWarn, "deliver:"+d.ID, "command not delivered yet; retrying within its TTL",
			"device", d.ID, "attr", c.Attr, "seq", c.Seq, "err", err)
		return
	}
	state := Sent
	if res.Acked {
		state = Delivered
	}
	s.mu.Lock()
	delete(s.retry, key)
	s.mu.Unlock()
	if state == Delivered {
		err = s.delivered(d.ID, c.Attr, c.Seq, res, now)
	} else {
		err = s.settle(d.ID, c.Attr, c.Seq, state, "", true, now)
	}
	if err != nil {
		s.log.Error("record a command delivered", "device", d.ID, "err", err)
		return
	}
	s.mu.Lock()
	if state == Sent {
		s.holding[d.ID+"/"+c.Attr] = true
		s.stats.Sent++
	} else {
		s.stats.Delivered++
	}
	s.mu.Unlock()
	s.log.Info("command delivered", "device", d.ID, "attr", c.Attr, "seq", c.Seq, "state", state)
	if len(res.Reported) > 0 {
		c.Reported, c.Source = res.Reported, res.Source
		s.report(ctx, d, c)
	}
}

// writeBack queues the device's confirmation as a reading, once report
// found no newer target at the platform: the pipeline signs it and the
// uplink writes it to the same attribute, where it verifies, so the next
// read sees the reported state and no new target.
// Until the pipeline queued it, it stays in the command's record and is
// tried again every round (a full store, a crash in between).
func (s *Service) writeBack(ctx context.Context, d *policy.Device, c Command) {
	out, err := s.o.Submit.Submit(ctx, pipeline.Message{Device: d.ID, Source: c.Source, Payload: c.Reported, Received: s.o.Now()})
	if err != nil || (out != pipeline.Queued && out != pipeline.Refused && out != pipeline.Duplicate) {
		s.count(func(st *Stats) { st.WriteBackFailures++ })
		s.limited.Log(ctx, slog.LevelWarn, "writeback:"+d.ID, "the device's reported state is not queued for the platform yet; retrying",
			"device", d.ID, "outcome", out, "err", err)
		return
	}
	if out == pipeline.Queued {
		s.count(func(st *Stats) { st.WriteBacks++ })
	} else {
		// Refused for good (the pipeline logged and counted why): trying
		// again cannot help.
		s.count(func(st *Stats) { st.WriteBackFailures++ })
	}
	if err := s.writtenBack(d.ID, c.Attr, c.Seq); err != nil {
		s.log.Warn("record a write-back", "device", d.ID, "err", err)
	}
}

// sign seals the command with the device's HS256 key (from K1/K2, which
// every device holds).
func (s *Service) sign(d *policy.Device, c Command) (Signed, error) {
	var v any
	if err := json.Unmarshal(c.Value, &v); err != nil {
		return Signed{}, err
	}
	jws, err := envelope.Seal(d.Key(), envelope.Claims{Version: envelope.Version, Gateway: s.o.Gateway, Device: d.ID,
		Seq: c.Seq, Time: c.Learned.UTC(), Attrs: map[string]envelope.Attr{c.Attr: {Type: c.Type, Value: v}},
		Kind: envelope.KindCommand})
	if err != nil {
		return Signed{}, err
	}
	return Signed{Command: c, JWS: jws}, nil
}
