package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwk"
	"github.com/lestrrat-go/jwx/v2/jws"
	"github.com/lestrrat-go/jwx/v2/jwt"

	"github.com/edgegate/edgegate/internal/envelope"
)

// lightSink is the NGSI v2 endpoint the gateway rows of `edgegate-bench
// peers` deliver to: the same HTTPS listener as Telegraf's sink
// (httptest's TLS server, one handler), doing per reading the same kind of
// work as that sink's decode: find the entity id and the "n" and "t0"
// values, count them, answer. The full simulated Orion (centralsim) parses
// every request with NGSI validation and verifies every signature; on the
// shared cores that made the gateway rows' sink cost 10× Telegraf's, so
// the rows compared sinks, not systems (issue 20). centralsim still issues
// the gateway's token; `make bench` still delivers to centralsim.
//
// It serves what the uplink sends (internal/uplink):
//   - POST {base}/v2/op/update, batch mode (internal/uplink/batch.go);
//   - PATCH {base}/v2/entities/{id}/attrs, filter mode, with base the
//     filter's prefix (/orion-filter/<broker>, as centralsim.BrokerURL).
//
// and answers as Orion does on success: 204 No Content, no body
// (telefonicaid/fiware-orion doc/manuals/orion-api.md, "Update Existing
// Entity Attributes `PATCH /v2/entities/{entityId}/attrs`" and "Update
// `POST /v2/op/update`": "Successful operation uses 204 No Content").
//
// Signatures are still proven, on a deterministic sample: every
// sampleEvery-th reading received of each device in a phase (its 1st,
// 101st, ...) is
// verified with the envelope code centralsim uses (envelope.VerifyAttrsWith
// with the device's K1/K2 key), and the verdict counted in the sink
// (verified / invalid). The sample's cost per reading is the same small
// fraction for every gateway row.
type lightSink struct {
	srv         *httptest.Server
	s           *sink
	keys        map[string][]envelope.Key
	jwks        jwk.Set
	sampleEvery int

	requests     atomic.Int64
	bad          atomic.Int64 // requests that did not decode (answered 400)
	unauthorized atomic.Int64 // requests without a token the sim issued (answered 401)

	mu       sync.Mutex
	tokens   map[string]bool // bearer tokens verified once against the sim's key set
	received map[string]int  // readings received per device: the sample's clock
}

// lightSinkSampleEvery is the verified share: one reading in 100 per
// device.
const lightSinkSampleEvery = 100

// startLightSink serves the sink on loopback. jwksURL is the simulated
// realm's key set (fetched once, over client), which the bearer tokens
// must verify against.
func startLightSink(ctx context.Context, s *sink, devs []device, jwksURL string, client *http.Client) (*lightSink, error) {
	ls := &lightSink{s: s, keys: map[string][]envelope.Key{}, sampleEvery: lightSinkSampleEvery,
		tokens: map[string]bool{}, received: map[string]int{}}
	for _, d := range devs {
		k, err := envelope.DeriveHS256(d.ID, d.K1, d.K2)
		if err != nil {
			return nil, fmt.Errorf("device %s key: %w", d.ID, err)
		}
		ls.keys[d.ID] = []envelope.Key{k}
	}
	if jwksURL != "" {
		set, err := jwk.Fetch(ctx, jwksURL, jwk.WithHTTPClient(client))
		if err != nil {
			return nil, fmt.Errorf("light sink: realm keys: %w", err)
		}
		ls.jwks = set
	}
	// As Telegraf's sink (startTelegrafSink): httptest's TLS server.
	ls.srv = httptest.NewTLSServer(http.HandlerFunc(ls.serve))
	return ls, nil
}

func (ls *lightSink) close() { ls.srv.Close() }

// resetSample restarts the sample's clock: each phase verifies each
// device's first reading, then one in sampleEvery.
func (ls *lightSink) resetSample() {
	ls.mu.Lock()
	clear(ls.received)
	ls.mu.Unlock()
}

// caPEM is the sink's certificate, which the gateway's uplink trusts.
func (ls *lightSink) caPEM() []byte { return (&telegrafSink{srv: ls.srv}).caPEM() }

// filterURL and batchURL are the brokers' base URLs for the gateway's
// devices: what centralsim's BrokerURL and DirectBrokerURL are.
func (ls *lightSink) filterURL() string { return ls.srv.URL + "/orion-filter/orion-1" }
func (ls *lightSink) batchURL() string  { return ls.srv.URL + "/orion" }

func (ls *lightSink) serve(w http.ResponseWriter, r *http.Request) {
	now := time.Now()
	if !ls.authorized(r.Header.Get("Authorization")) {
		ls.unauthorized.Add(1)
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusUnauthorized)
		return
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, 64<<20))
	if err != nil {
		ls.bad.Add(1)
		http.Error(w, "body: "+err.Error(), http.StatusRequestEntityTooLarge)
		return
	}
	var rs []lightReading
	switch {
	case r.Method == http.MethodPost && strings.HasSuffix(r.URL.Path, "/v2/op/update"):
		rs, err = decodeOpUpdate(body)
	case r.Method == http.MethodPatch && strings.HasSuffix(r.URL.Path, "/attrs"):
		id, ok := entityOfPath(r.URL.Path)
		if !ok {
			err = fmt.Errorf("path %q is not /v2/entities/{id}/attrs", r.URL.Path)
			break
		}
		var x lightReading
		x, err = decodeAttrs(body, id)
		rs = []lightReading{x}
	default:
		err = fmt.Errorf("%s %s is not an update this sink serves", r.Method, r.URL.Path)
	}
	if err != nil {
		ls.bad.Add(1)
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	ls.requests.Add(1)
	for _, x := range ls.sample(rs) {
		ok, detail := ls.verify(x)
		ls.s.addVerdict(ok, detail)
	}
	for _, x := range rs {
		ls.s.add(now, x.Device, x.N, x.HasN, x.T0)
	}
	w.WriteHeader(http.StatusNoContent)
}

// authorized accepts the bearer tokens the simulated realm issued. Each
// distinct token is verified once (signature against the realm's key set,
// expiry) and remembered: the gateway reuses one token for its lifetime
// (30 min here), so every request after the first costs a map lookup, as
// the presence check Telegraf's sink does not even need; it does not
// depend on the mode or the request rate, so it biases no row.
func (ls *lightSink) authorized(h string) bool {
	tok, ok := strings.CutPrefix(h, "Bearer ")
	if !ok || tok == "" {
		return false
	}
	ls.mu.Lock()
	good, seen := ls.tokens[tok]
	ls.mu.Unlock()
	if seen {
		return good
	}
	good = ls.jwks != nil && verifyRealmToken(tok, ls.jwks) == nil
	ls.mu.Lock()
	if len(ls.tokens) < 1024 { // bounded: a client minting tokens per request
		ls.tokens[tok] = good
	}
	ls.mu.Unlock()
	return good
}

// verifyRealmToken checks an access token's signature with the key its
// "kid" names (the algorithm the key's, as centralsim's filter pins it)
// and its expiry.
func verifyRealmToken(tok string, set jwk.Set) error {
	_, err := jwt.Parse([]byte(tok), jwt.WithKeySet(set, jws.WithInferAlgorithmFromKey(true)),
		jwt.WithValidate(true), jwt.WithRequiredClaim("exp"))
	return err
}

// sample picks the readings to verify: each device's 1st, (1+every)-th,
// ... reading received.
func (ls *lightSink) sample(rs []lightReading) []lightReading {
	var out []lightReading
	ls.mu.Lock()
	defer ls.mu.Unlock()
	for _, x := range rs {
		k := ls.received[x.Device]
		ls.received[x.Device] = k + 1
		if k%ls.sampleEvery == 0 {
			out = append(out, x)
		}
	}
	return out
}

// verify checks one reading's signatures as centralsim does (every
// attribute carries the compact JWS of the reading as metadata; it must
// open with the device's key, name this entity and sign each attribute's
// type and value).
func (ls *lightSink) verify(x lightReading) (bool, string) {
	keys, ok := ls.keys[x.Device]
	if !ok {
		return false, fmt.Sprintf("device %q is not registered", x.Device)
	}
	c, err := envelope.VerifyAttrsWith(x.Raw, keys, envelope.DefaultSignatureAttr)
	if err != nil {
		return false, fmt.Sprintf("device %s: %v", x.Device, err)
	}
	if c.Device != x.Device {
		return false, fmt.Sprintf("entity %q carries a reading of device %q", x.Device, c.Device)
	}
	return true, ""
}

// lightReading is one reading as the light sink counts it; Raw is its
// NGSI text (the entity of a batch, the attributes of a PATCH), valid
// only while the request is served.
type lightReading struct {
	Device string
	N      int64
	HasN   bool
	T0     int64
	Raw    []byte
}

// entityOfPath is the {id} of .../v2/entities/{id}/attrs.
func entityOfPath(p string) (string, bool) {
	rest, ok := strings.CutSuffix(p, "/attrs")
	if !ok {
		return "", false
	}
	i := strings.LastIndex(rest, "/v2/entities/")
	if i < 0 {
		return "", false
	}
	id := rest[i+len("/v2/entities/"):]
	if id == "" || strings.Contains(id, "/") {
		return "", false
	}
	return id, true
}

// decodeOpUpdate reads a POST /v2/op/update body:
// {"actionType": ..., "entities": [{"id": ..., "type": ..., <attrs>}, ...]}.
func decodeOpUpdate(body []byte) ([]lightReading, error) {
	sc := jscan{b: body}
	var out []lightReading
	sawEntities := false
	err := sc.object(func(key []byte) error {
		if string(key) != "entities" {
			return sc.skip()
		}
		sawEntities = true
		return sc.array(func() error {
			sc.ws()
			start := sc.i
			var x lightReading
			err := sc.object(func(key []byte) error {
				switch string(key) {
				case "id":
					s, err := sc.str()
					if err != nil {
						return err
					}
					x.Device, err = unquoteRaw(s)
					return err
				case "n", "t0":
					return readAttrNum(&sc, string(key), &x)
				}
				return sc.skip()
			})
			if err != nil {
				return err
			}
			if x.Device == "" {
				return fmt.Errorf("op/update: entity at byte %d has no \"id\"", start)
			}
			x.Raw = body[start:sc.i]
			out = append(out, x)
			return nil
		})
	})
	if err == nil {
		err = sc.end()
	}
	if err != nil {
		return nil, fmt.Errorf("op/update: %w", err)
	}
	if !sawEntities {
		return nil, errors.New(`op/update: no "entities" array`)
	}
	return out, nil
}

// decodeAttrs reads a PATCH /v2/entities/{id}/attrs body: an object of
// attributes.
func decodeAttrs(body []byte, id string) (lightReading, error) {
	sc := jscan{b: body}
	x := lightReading{Device: id, Raw: body}
	err := sc.object(func(key []byte) error {
		switch string(key) {
		case "n", "t0":
			return readAttrNum(&sc, string(key), &x)
		}
		return sc.skip()
	})
	if err == nil {
		err = sc.end()
	}
	if err != nil {
		return lightReading{}, fmt.Errorf("attrs of %s: %w", id, err)
	}
	return x, nil
}

// readAttrNum reads an NGSI attribute {"value": N, ...} into x's n or t0.
func readAttrNum(sc *jscan, name string, x *lightReading) error {
	return sc.object(func(key []byte) error {
		if string(key) != "value" {
			return sc.skip()
		}
		lit, err := sc.literal()
		if err != nil {
			return fmt.Errorf("attribute %q: %w", name, err)
		}
		v, err := parseNum(lit)
		if err != nil {
			return fmt.Errorf("attribute %q: value %q is not a number", name, logClip(lit))
		}
		if name == "n" {
			x.N, x.HasN = v, true
		} else {
			x.T0 = v
		}
		return nil
	})
}

// parseNum reads an integer; a float (1.7e18) is truncated, as the sink's
// attrNum does.
func parseNum(b []byte) (int64, error) {
	if v, err := strconv.ParseInt(string(b), 10, 64); err == nil {
		return v, nil
	}
	f, err := strconv.ParseFloat(string(b), 64)
	return int64(f), err
}

func logClip(b []byte) string {
	if len(b) > 40 {
		return string(b[:40]) + "…"
	}
	return string(b)
}

// unquoteRaw turns a string's raw content (between the quotes) into the
// string: as is unless it holds escapes.
func unquoteRaw(raw []byte) (string, error) {
	if bytes.IndexByte(raw, '\\') < 0 {
		return string(raw), nil
	}
	s, err := strconv.Unquote(`"` + string(raw) + `"`)
	if err != nil {
		return "", fmt.Errorf("string %q: %w", logClip(raw), err)
	}
	return s, nil
}

// jscan is a one-pass JSON walker: it visits the members the caller asks
// for and skips the rest without building them, so that a reading costs a
// scan of its bytes (its signatures are most of them) and no allocation
// beyond the id. It checks the structure (strings, brackets, separators)
// and names the byte of the first fault; it does not check escapes or
// number syntax inside skipped values.
type jscan struct {
	b     []byte
	i     int
	depth int
}

const jscanMaxDepth = 64

func (s *jscan) errf(format string, args ...any) error {
	return fmt.Errorf("byte %d: "+format, append([]any{s.i}, args...)...)
}

func (s *jscan) ws() {
	for s.i < len(s.b) {
		switch s.b[s.i] {
		case ' ', '\t', '\n', '\r':
			s.i++
		default:
			return
		}
	}
}

// end checks that only white space follows.
func (s *jscan) end() error {
	s.ws()
	if s.i != len(s.b) {
		return s.errf("data after the JSON value")
	}
	return nil
}

// str reads a string; it returns its raw content (escapes kept).
func (s *jscan) str() ([]byte, error) {
	s.ws()
	if s.i >= len(s.b) || s.b[s.i] != '"' {
		return nil, s.errf("want a string")
	}
	start := s.i + 1
	j := start
	for {
		k := bytes.IndexAny(s.b[j:], "\"\\")
		if k < 0 {
			s.i = len(s.b)
			return nil, s.errf("unterminated string")
		}
		j += k
		if s.b[j] == '\\' {
			j += 2
			if j > len(s.b) {
				s.i = len(s.b)
				return nil, s.errf("unterminated string")
			}
			continue
		}
		s.i = j + 1
		return s.b[start:j], nil
	}
}

// literal reads a number, true, false or null.
func (s *jscan) literal() ([]byte, error) {
	s.ws()
	start := s.i
	for s.i < len(s.b) {
		c := s.b[s.i]
		if c >= '0' && c <= '9' || c >= 'a' && c <= 'z' || c == '-' || c == '+' || c == '.' || c == 'E' {
			s.i++
			continue
		}
		break
	}
	if s.i == start {
		return nil, s.errf("want a value")
	}
	return s.b[start:s.i], nil
}

// skip passes over one value.
func (s *jscan) skip() error {
	s.ws()
	if s.i >= len(s.b) {
		return s.errf("want a value, got the end")
	}
	switch s.b[s.i] {
	case '{':
		return s.object(func([]byte) error { return s.skip() })
	case '[':
		return s.array(s.skip)
	case '"':
		_, err := s.str()
		return err
	}
	_, err := s.literal()
	return err
}

// object walks an object: for each member it reads the key and the colon
// and calls member, which must consume the value.
func (s *jscan) object(member func(key []byte) error) error {
	s.ws()
	if s.i >= len(s.b) || s.b[s.i] != '{' {
		return s.errf("want an object")
	}
	if s.depth++; s.depth > jscanMaxDepth {
		return s.errf("nested deeper than %d", jscanMaxDepth)
	}
	defer func() { s.depth-- }()
	s.i++
	s.ws()
	if s.i < len(s.b) && s.b[s.i] == '}' {
		s.i++
		return nil
	}
	for {
		key, err := s.str()
		if err != nil {
			return err
		}
		s.ws()
		if s.i >= len(s.b) || s.b[s.i] != ':' {
			return s.errf("want ':' after key %q", logClip(key))
		}
		s.i++
		if err := member(key); err != nil {
			return err
		}
		s.ws()
		if s.i >= len(s.b) {
			return s.errf("unterminated object")
		}
		switch s.b[s.i] {
		case ',':
			s.i++
		case '}':
			s.i++
			return nil
		default:
			return s.errf("want ',' or '}' in an object")
		}
	}
}

// array walks an array, calling elem for each element (it must consume
// it).
func (s *jscan) array(elem func() error) error {
	s.ws()
	if s.i >= len(s.b) || s.b[s.i] != '[' {
		return s.errf("want an array")
	}
	if s.depth++; s.depth > jscanMaxDepth {
		return s.errf("nested deeper than %d", jscanMaxDepth)
	}
	defer func() { s.depth-- }()
	s.i++
	s.ws()
	if s.i < len(s.b) && s.b[s.i] == ']' {
		s.i++
		return nil
	}
	for {
		if err := elem(); err != nil {
			return err
		}
		s.ws()
		if s.i >= len(s.b) {
			return s.errf("unterminated array")
		}
		switch s.b[s.i] {
		case ',':
			s.i++
		case ']':
			s.i++
			return nil
		default:
			return s.errf("want ',' or ']' in an array")
		}
	}
}
