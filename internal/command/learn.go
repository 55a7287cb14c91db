package command

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"strings"

	"github.com/edgegate/edgegate/internal/envelope"
	"github.com/edgegate/edgegate/internal/logx"
	"github.com/edgegate/edgegate/internal/reading"
	"github.com/edgegate/edgegate/policy"
)

// Learning reads each commandable device's entity back through the broker
// filter, as the gateway's account: GET {broker}/v2/entities/{id}?type=T,
// the one read route the stock filter has (OrionBrokerFilter
// OrionController.queryV2: `type` is required and only type, attrs,
// limit, offset and details are forwarded to Orion — so Orion's builtin
// dateModified, which needs `metadata=dateModified`, is out of reach;
// hence the signature convention rather than modification times). The
// filter lets the account read a device it owns or holds a READ_ACCESS,
// READ_WRITE or MODIFY delegation of (AccessTokenAuthenticationFilter
// checkAuthorizationWithAccessToken).
//
// Polling needs nothing from the platform; its cost is bounded by
// commands.poll_budget reads per commands.poll_interval. Where the
// platform offers an Orion subscription and a way for its notifications
// to reach the gateway (behind NAT: an MQTT broker both reach, or an
// HTTPS endpoint), subscribe.go learns sooner; a notification only makes
// the gateway poll that device now.

// maxEntityBytes bounds one entity read back.
const maxEntityBytes = 1 << 20

// errEntity is a read of one device that failed on its own (refused, no
// such entity, a malformed answer): logged, not a platform outage.
type errEntity struct{ err error }

func (e errEntity) Error() string { return e.err.Error() }
func (e errEntity) Unwrap() error { return e.err }

// pollRound reads at most PollBudget commandable devices, round-robin.
// An error is a platform outage (network, 5xx, no token): the round
// stops and Run backs off.
func (s *Service) pollRound(ctx context.Context) error {
	if s.o.Tokens == nil {
		return nil
	}
	var devs []*policy.Device
	now := s.o.Now()
	for _, d := range s.o.Policy.Current().Devices() {
		// A device with a live subscription is read only every safety
		// interval (subscribe.go).
		if d.Commandable() && (s.subs == nil || !s.subs.skipPoll(d.ID, now)) {
			devs = append(devs, d)
		}
	}
	if len(devs) == 0 {
		return nil
	}
	n := min(len(devs), s.o.PollBudget)
	s.mu.Lock()
	start := s.cursor % len(devs)
	s.cursor = (start + n) % len(devs)
	s.mu.Unlock()
	for i := 0; i < n; i++ {
		d := devs[(start+i)%len(devs)]
		err := s.poll(ctx, d)
		if err == nil && s.subs != nil {
			s.subs.polled(d.ID, now)
		}
		s.countPoll(err)
		var one errEntity
		switch {
		case err == nil:
		case errors.As(err, &one):
			s.limited.Log(ctx, slog.LevelWarn, "entity:"+d.ID, "could not read the actuator's entity back", "device", d.ID, "err", err)
		default:
			return err
		}
	}
	return nil
}

// attrDoc is one attribute of an entity in NGSI v2 normalized form.
type attrDoc struct {
	Type     string          `json:"type"`
	Value    json.RawMessage `json:"value"`
	Metadata json.RawMessage `json:"metadata"`
}

// poll reads one device's entity and learns its new targets.
func (s *Service) poll(ctx context.Context, d *policy.Device) error {
	body, err := s.get(ctx, d)
	if err != nil {
		return err
	}
	found, err := readEntity(body, d, s.o.SignatureMeta)
	if err != nil {
		return errEntity{fmt.Errorf("entity of %s: %w", d.ID, err)}
	}
	now := s.o.Now()
	for _, f := range found {
		if f.reported {
			// The gateway's own signed state: no new target; it confirms
			// a command with this value.
			s.confirm(d.ID, f.attr, f.value, now)
			continue
		}
		learned, err := s.learn(d.ID, f.attr, f.typ, f.value, f.mark, "platform", now)
		if err != nil {
			return err // the store failing is worth backing off for
		}
		if learned {
			s.count(func(st *Stats) { st.Learned++ })
			s.log.Info("command learned from the platform", "device", d.ID, "attr", f.attr)
		}
	}
	return nil
}

// found is one writable attribute of an entity read back: a target
// someone set, or (reported) the state the gateway signed.
type found struct {
	attr, typ string
	value     json.RawMessage // compact
	mark      string
	reported  bool
}

// maxValueBytes bounds one target value.
const maxValueBytes = 64 << 10

// readEntity finds the writable attributes of d in an entity as Orion
// renders it (normalized), without I/O: each attribute's signature is
// checked with the device's keys (envelope.VerifyEntity); a value the
// gateway signed is the reported state, any other one — but the
// directory's placeholder — a target. Attributes with an invalid type or
// an oversized value are skipped; an entity of another id is an error.
func readEntity(body []byte, d *policy.Device, sigMeta string) ([]found, error) {
	rep, err := envelope.VerifyEntity(body, d.VerifyKeys(), sigMeta)
	if err != nil {
		return nil, err
	}
	if rep.ID != d.ID {
		return nil, fmt.Errorf("the broker answered entity %q", logx.Clip(rep.ID, 64))
	}
	var doc map[string]json.RawMessage
	if err := json.Unmarshal(body, &doc); err != nil {
		return nil, err
	}
	var out []found
	for _, ar := range rep.Attrs {
		if !d.Writes(ar.Name) {
			continue
		}
		var a attrDoc
		if err := json.Unmarshal(doc[ar.Name], &a); err != nil || len(a.Value) == 0 || len(a.Value) > maxValueBytes {
			continue
		}
		if a.Type == "" {
			a.Type = defaultType(a.Value)
		}
		if !reading.ValidID(a.Type) {
			continue
		}
		f := found{attr: ar.Name, typ: a.Type, value: compact(a.Value)}
		switch {
		case ar.Verdict == envelope.Verified:
			f.reported = true
		case isPlaceholder(a.Value):
			continue
		default:
			f.mark = mark(a)
		}
		out = append(out, f)
	}
	return out, nil
}

// defaultType is Orion's type for an attribute given without one.
func defaultType(v json.RawMessage) string {
	var x any
	_ = json.Unmarshal(v, &x)
	switch x.(type) {
	case bool:
		return reading.TypeBoolean
	case float64:
		return reading.TypeNumber
	case string:
		return reading.TypeText
	case nil:
		return "None"
	default:
		return "StructuredValue"
	}
}

// isPlaceholder: the value the IoT Directory gives a new entity's
// attributes (iot-directory common.php insert_ngsi: value ""), and null.
func isPlaceholder(v json.RawMessage) bool {
	t := string(bytes.TrimSpace(v))
	return t == `""` || t == "null"
}

// mark identifies one target as the platform shows it: type, value and
// metadata. The same write read again is the same mark; the same value
// written again after the gateway wrote its state there has other
// metadata (the gateway's signature of that state), hence a new mark.
func mark(a attrDoc) string {
	h := sha256.New()
	for _, part := range [][]byte{[]byte(a.Type), compact(a.Value), compact(a.Metadata)} {
		h.Write(part)
		h.Write([]byte{0})
	}
	return hex.EncodeToString(h.Sum(nil)[:16])
}

func compact(raw json.RawMessage) json.RawMessage {
	var b bytes.Buffer
	if json.Compact(&b, raw) != nil {
		return bytes.Clone(raw)
	}
	return b.Bytes()
}

// get reads the device's entity through the filter with the account's
// token. A 401 is a per-device error (the filter caches refusals for
// minutes); a network error, a 5xx or a 429 is an outage of the platform.
func (s *Service) get(ctx context.Context, d *policy.Device) ([]byte, error) {
	tok, err := s.o.Tokens.Token(ctx)
	if err != nil {
		return nil, fmt.Errorf("access token: %w", err)
	}
	u := strings.TrimRight(d.Broker, "/") + "/v2/entities/" + url.PathEscape(d.ID) + "?type=" + url.QueryEscape(d.Type)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, errEntity{err}
	}
	req.Header.Set("Authorization", "Bearer "+tok)
	req.Header.Set("Accept", "application/json")
	if d.Service != "" {
		req.Header.Set("Fiware-Service", d.Service)
	}
	if d.ServicePath != "" {
		req.Header.Set("Fiware-ServicePath", d.ServicePath)
	}
	resp, err := s.o.HTTPClient.Do(req)
	if err != nil {
		// No URL in the error: url.Error repeats it, and it names the broker only.
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		return nil, fmt.Errorf("GET entity %s: %w", d.ID, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxEntityBytes+1))
	if err != nil {
		return nil, fmt.Errorf("GET entity %s: %w", d.ID, err)
	}
	switch {
	case resp.StatusCode == http.StatusOK && len(body) > maxEntityBytes:
		return nil, errEntity{fmt.Errorf("GET entity %s: over %d bytes", d.ID, maxEntityBytes)}
	case resp.StatusCode == http.StatusOK:
		return body, nil
	case resp.StatusCode == http.StatusUnauthorized:
		// The filter answers 401 both for a bad token and for a device
		// the account may not read (messages.properties
		// login.ko.accesstokennotvalid, login.ko.credentialsnotvalid):
		// only the first is the token's fault.
		if bytes.Contains(body, []byte("access token is not valid")) {
			s.o.Tokens.Invalidate(tok)
		}
		return nil, errEntity{fmt.Errorf("GET entity %s: refused (401): %s", d.ID, clipBody(body))}
	case resp.StatusCode >= 500 || resp.StatusCode == http.StatusTooManyRequests:
		return nil, fmt.Errorf("GET entity %s: %d %s", d.ID, resp.StatusCode, clipBody(body))
	default:
		return nil, errEntity{fmt.Errorf("GET entity %s: %d %s", d.ID, resp.StatusCode, clipBody(body))}
	}
}

func clipBody(b []byte) string { return logx.Clip(strings.TrimSpace(string(b)), 200) }

// countPoll counts one read of an entity through the filter, and whether it
// failed: polls and the reads before a write-back are the same request.
func (s *Service) countPoll(err error) {
	s.count(func(st *Stats) {
		st.Polls++
		if err != nil {
			st.PollErrors++
		}
	})
}
