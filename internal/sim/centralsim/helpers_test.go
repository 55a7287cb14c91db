package centralsim

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"sort"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/envelope"
)

// signedBody renders a reading as the gateway writes it through the stock
// filter: each attribute of the reading carries the compact JWS of the
// whole reading as metadata "signature", and its observation time as
// metadata TimeInstant.
func signedBody(t *testing.T, c envelope.Claims, compact string) []byte {
	t.Helper()
	return signedBodyAs(t, c, compact, envelope.DefaultSignatureAttr)
}

// signedBodyAs is signedBody with the signature metadata named sigName.
func signedBodyAs(t *testing.T, c envelope.Claims, compact, sigName string) []byte {
	t.Helper()
	out := map[string]any{}
	names := make([]string, 0, len(c.Attrs))
	for n := range c.Attrs {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		a := c.Attrs[n]
		out[n] = map[string]any{
			"type":  a.Type,
			"value": a.Value,
			"metadata": map[string]any{
				sigName:       map[string]any{"type": "string", "value": compact},
				"TimeInstant": map[string]any{"type": "DateTime", "value": c.Time.UTC().Format(time.RFC3339Nano)},
			},
		}
	}
	b, err := json.Marshal(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// doHeaders is do with explicit request headers (nil body: no body).
func (f *fixture) doHeaders(t *testing.T, method, rawURL string, h http.Header, body []byte) response {
	t.Helper()
	req, err := http.NewRequest(method, rawURL, nil)
	if err != nil {
		t.Fatal(err)
	}
	if body != nil {
		req, err = http.NewRequest(method, rawURL, bytesReader(body))
		if err != nil {
			t.Fatal(err)
		}
	}
	for k, vs := range h {
		for _, v := range vs {
			req.Header.Add(k, v)
		}
	}
	resp, err := f.http.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, rawURL, err)
	}
	defer resp.Body.Close()
	b, err := readAll(resp)
	if err != nil {
		t.Fatal(err)
	}
	return response{status: resp.StatusCode, header: resp.Header, body: b}
}

// orionErr decodes an Orion error body.
func orionErr(t *testing.T, r response) orionError {
	t.Helper()
	var oe orionError
	if err := json.Unmarshal(r.body, &oe); err != nil || oe.Error == "" {
		t.Fatalf("body %s is not an Orion error (%v)", r.body, err)
	}
	return oe
}

// springErr decodes a Spring Boot error body.
func springErr(t *testing.T, r response) (status int, msg string) {
	t.Helper()
	var m struct {
		Status  int    `json:"status"`
		Message string `json:"message"`
	}
	if err := json.Unmarshal(r.body, &m); err != nil || m.Status == 0 {
		t.Fatalf("body %s is not a Spring error (%v)", r.body, err)
	}
	return m.Status, m.Message
}

func bytesReader(b []byte) *bytes.Reader { return bytes.NewReader(b) }

func readAll(resp *http.Response) ([]byte, error) { return io.ReadAll(resp.Body) }

// readBackVerdict checks an entity as the broker returns it: every
// attribute that carries a signature metadata must verify (verdictOf).
func readBackVerdict(t *testing.T, f *fixture, doc []byte, id string) verdict {
	t.Helper()
	names, vals, ok := orderedMembers(doc)
	if !ok {
		t.Fatalf("entity %s is not an object", doc)
	}
	var signed []orionAttr
	for i, n := range names {
		if n == "id" || n == "type" || !bytes.Contains(vals[i], []byte(`"signature"`)) {
			continue
		}
		a, msg := parseOrionAttr(n, vals[i])
		if msg != "" {
			t.Fatalf("attribute %s read back: %s", n, msg)
		}
		signed = append(signed, a)
	}
	if len(signed) == 0 {
		t.Fatalf("no signed attribute in %s", doc)
	}
	f.sim.mu.Lock()
	dev := f.sim.devices[id]
	f.sim.mu.Unlock()
	return f.sim.verdictOf(dev, id, signed)
}
