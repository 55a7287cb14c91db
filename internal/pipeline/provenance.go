package pipeline

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/edgegate/edgegate/internal/envelope"
	"github.com/edgegate/edgegate/internal/queue"
	"github.com/edgegate/edgegate/internal/reading"
	"github.com/edgegate/edgegate/policy"
)

// ErrNoSigningKey: the gateway does not hold the private key of a
// gateway-signed device (policy.SigningGateway); the reading was not
// queued and must not be acknowledged.
var ErrNoSigningKey = errors.New("no signing key held for the device")

// plausibleClock is the earliest time the gateway's clock is taken to be
// set: before it, the time window checks are skipped.
var plausibleClock = time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)

// outsideWindow says why t is outside the accepted window ("" = inside).
func (p *Pipeline) outsideWindow(t time.Time) string {
	if p.skew <= 0 && p.maxAge <= 0 {
		return ""
	}
	now := p.now()
	if now.Before(plausibleClock) {
		return ""
	}
	if p.skew > 0 && t.After(now.Add(p.skew)) {
		return fmt.Sprintf("observed at %s, more than %s after the gateway's clock", t.UTC().Format(time.RFC3339), p.skew)
	}
	if p.maxAge > 0 && t.Before(now.Add(-p.maxAge)) {
		return fmt.Sprintf("observed at %s, more than %s ago", t.UTC().Format(time.RFC3339), p.maxAge)
	}
	return ""
}

// digestOf names a payload for redelivery detection.
func digestOf(b []byte) [8]byte {
	h := sha256.Sum256(b)
	return [8]byte(h[:8])
}

// startDeviceSigned takes a reading the device signed itself: the payload
// is a compact JWS of envelope claims, verified with the device's
// registered public keys (the key chosen by kid, the algorithm pinned to
// the key). The NGSI attributes come from the verified claims and the
// device's own JWS is forwarded untouched as the signature metadata of
// every attribute.
func (p *Pipeline) startDeviceSigned(ctx context.Context, msg Message, dev *policy.Device) Pending {
	payload := bytes.TrimSpace(msg.Payload)
	if len(payload) > reading.MaxPayloadBytes {
		p.refuse(ctx, ReasonTooLarge, msg, fmt.Sprintf("payload of %d bytes, at most %d", len(payload), reading.MaxPayloadBytes))
		return done(Refused, nil)
	}
	if len(payload) > 0 && payload[0] == '{' {
		p.refuse(ctx, ReasonBadSignature, msg, "unsigned reading from a device that signs its readings")
		return done(Refused, nil)
	}
	compact := string(payload)
	claims, err := envelope.OpenWith(compact, dev.PublicKeys())
	if err != nil {
		p.refuse(ctx, ReasonBadSignature, msg, err.Error())
		return done(Refused, nil)
	}
	if claims.Device != dev.ID {
		p.refuse(ctx, ReasonBadSignature, msg, fmt.Sprintf("signed for device %q", claims.Device))
		return done(Refused, nil)
	}
	if claims.Seq == 0 {
		p.refuse(ctx, ReasonInvalid, msg, "device-signed reading without a seq (it must start at 1)")
		return done(Refused, nil)
	}
	if claims.Time.IsZero() {
		p.refuse(ctx, ReasonInvalid, msg, "device-signed reading without a time")
		return done(Refused, nil)
	}
	r := reading.Reading{Device: dev.ID, Source: msg.Source, Time: claims.Time.UTC(), Attrs: make([]reading.Attribute, 0, len(claims.Attrs))}
	for name, a := range claims.Attrs {
		r.Attrs = append(r.Attrs, reading.Attribute{Name: name, Type: a.Type, Value: a.Value})
	}
	slices.SortFunc(r.Attrs, func(a, b reading.Attribute) int { return strings.Compare(a.Name, b.Name) })
	// At render: the device's JWS still signs the dropped attributes, and
	// each attribute sent carries it, so the others still verify one by
	// one (envelope.VerifyEntity).
	if !p.dropInvalid(ctx, msg, &r) {
		return done(Refused, nil)
	}
	if len(r.Attrs) < len(claims.Attrs) {
		sent := make(map[string]envelope.Attr, len(r.Attrs))
		for _, a := range r.Attrs {
			sent[a.Name] = claims.Attrs[a.Name]
		}
		claims.Attrs = sent // only for PackBody: compact is the device's, untouched
	}
	if err := r.Validate(); err != nil {
		p.refuse(ctx, reasonOf(err), msg, err.Error())
		return done(Refused, nil)
	}
	if why := p.outsideWindow(r.Time); why != "" {
		p.refuse(ctx, ReasonStale, msg, why)
		return done(Refused, nil)
	}
	var sealErr error
	entry := queue.Entry{
		Broker: dev.Broker, Device: dev.ID, Type: dev.Type,
		Service: dev.Service, ServicePath: dev.ServicePath,
		DeviceSeq: claims.Seq, DeviceDigest: digestOf(payload),
		Seal: func(uint64) ([]byte, error) {
			// The gateway's seq orders the queue; the signed seq is the
			// device's own.
			body, err := envelope.PackBody(claims, compact, p.sigAttr)
			if err != nil {
				sealErr = err
			}
			return body, err
		},
	}
	return p.enqueue(ctx, msg, dev, entry, &sealErr)
}
