package main

import (
	"bytes"
	"context"
	"encoding/json"
	"encoding/pem"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/envelope"
	"github.com/edgegate/edgegate/internal/reading"
)

const (
	verifyToken1 = "TOKCANARY-verify-0123456789"
	verifyK1     = "K1CANARY-verify"
	verifyK2     = "K2CANARY-verify"
)

// storedEntity builds th-1 as stock Orion would hold it after two
// gateway-signed readings: the IoT Directory's attributes, then reading
// 1 (humidity, temperature) and reading 2 (humidity only) merged by
// attribute, their metadata kept.
func storedEntity(t *testing.T) map[string]any {
	t.Helper()
	key, err := envelope.DeriveHS256("th-1", verifyK1, verifyK2)
	if err != nil {
		t.Fatal(err)
	}
	e := map[string]any{"id": "th-1", "type": "Thermometer",
		"latitude": map[string]any{"type": "float", "value": "", "metadata": map[string]any{}}}
	at := time.Date(2026, 12, 3, 6, 0, 0, 0, time.UTC)
	// In order: reading 2 overwrites reading 1's humidity (a map here
	// made the test fail whenever Go iterated it 2 before 1).
	for i, attrs := range [][]reading.Attribute{
		{{Name: "humidity", Type: "Number", Value: 40.0}, {Name: "temperature", Type: "Number", Value: 21.5}},
		{{Name: "humidity", Type: "Number", Value: 41.0}},
	} {
		seq := uint64(i + 1)
		r := reading.Reading{Device: "th-1", Time: at.Add(time.Duration(seq) * time.Minute), Attrs: attrs}
		c := envelope.ClaimsOf("gw-1", seq, &r)
		jws, err := envelope.Seal(key, c)
		if err != nil {
			t.Fatal(err)
		}
		body, err := envelope.Body(c, jws, "")
		if err != nil {
			t.Fatal(err)
		}
		var upd map[string]map[string]any
		if err := json.Unmarshal(body, &upd); err != nil {
			t.Fatal(err)
		}
		for n, a := range upd {
			if seq == 1 || n == "humidity" {
				e[n] = a
			}
		}
	}
	return e
}

// filterBroker answers GET /v2/entities/{id}?type=T as the filter routes
// it: 401 without the right bearer token (login.ko.accesstokennotvalid).
type filterBroker struct {
	*httptest.Server
	mu     sync.Mutex
	entity map[string]any
}

func newFilterBroker(t *testing.T) *filterBroker {
	fb := &filterBroker{entity: storedEntity(t)}
	fb.Server = httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer "+verifyToken1 {
			w.WriteHeader(http.StatusUnauthorized)
			w.Write([]byte(`{"result":false,"message":"The passed access token is not valid"}`))
			return
		}
		if r.Method != http.MethodGet || r.URL.Path != "/orion-filter/orion-1/v2/entities/th-1" || r.URL.Query().Get("type") != "Thermometer" {
			w.WriteHeader(http.StatusNotFound)
			w.Write([]byte(`{"description":"The requested entity has not been found. Check type and id","error":"NotFound"}`))
			return
		}
		fb.mu.Lock()
		defer fb.mu.Unlock()
		json.NewEncoder(w).Encode(fb.entity)
	}))
	t.Cleanup(fb.Close)
	return fb
}

func writeTemp(t *testing.T, name string, data []byte) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func exitCode(err error) int {
	var ee *exitError
	if errors.As(err, &ee) {
		return ee.Code
	}
	if err != nil {
		return -1
	}
	return 0
}

func TestVerifyFromBroker(t *testing.T) {
	t.Setenv("EDGEGATE_K1", verifyK1)
	t.Setenv("EDGEGATE_K2", verifyK2)
	fb := newFilterBroker(t)
	ca := writeTemp(t, "ca.pem", pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: fb.Certificate().Raw}))
	tokFile := writeTemp(t, "token", []byte(verifyToken1+"\n"))
	args := []string{"--broker", fb.URL + "/orion-filter/orion-1", "--device", "th-1", "--type", "Thermometer",
		"--token-file", tokFile, "--ca", ca}
	run := func(args ...string) (string, error) {
		var out, errb bytes.Buffer
		err := runVerify(context.Background(), args, strings.NewReader(""), &out, &errb)
		all := out.String() + errb.String()
		if err != nil {
			all += err.Error()
		}
		for _, secret := range []string{verifyToken1, verifyK1, verifyK2} {
			if strings.Contains(all, secret) {
				t.Errorf("output contains a secret:\n%s", all)
			}
		}
		return out.String(), err
	}

	out, err := run(args...)
	if err != nil {
		t.Fatalf("verify --broker = %v\n%s", err, out)
	}
	t.Log("\n" + out)
	for _, want := range []string{
		`(?m)^humidity +verified +seq 2 +observed 2026-12-03T06:02:00Z +gateway gw-1$`,
		`(?m)^temperature +verified +seq 1 +observed 2026-12-03T06:01:00Z`,
		`(?m)^latitude +unsigned`,
		`entity th-1 \(Thermometer\): 2 verified, 1 unsigned, 0 tampered, 0 wrong key, 0 malformed`,
	} {
		if !regexp.MustCompile(want).MatchString(out) {
			t.Errorf("output lacks %s:\n%s", want, out)
		}
	}

	// Saved for an offline check.
	saved, _ := json.Marshal(fb.entity)
	if out, err := run("--entity", writeTemp(t, "entity.json", saved)); err != nil || !strings.Contains(out, "2 verified") {
		t.Errorf("verify --entity = %v\n%s", err, out)
	}

	// A value changed at the broker: that attribute is tampered, exit 1.
	fb.mu.Lock()
	fb.entity["temperature"].(map[string]any)["value"] = 30.0
	fb.mu.Unlock()
	out, err = run(args...)
	if exitCode(err) != 1 || !regexp.MustCompile(`(?m)^temperature +tampered +seq 1`).MatchString(out) ||
		!regexp.MustCompile(`(?m)^humidity +verified`).MatchString(out) {
		t.Errorf("tampered entity: exit %d (%v)\n%s", exitCode(err), err, out)
	}

	// Verified with another device's keys: wrong key.
	t.Setenv("EDGEGATE_K1", "other-k1")
	out, err = run(args...)
	if exitCode(err) != 1 || !regexp.MustCompile(`(?m)^humidity +wrong_key`).MatchString(out) {
		t.Errorf("other keys: exit %d (%v)\n%s", exitCode(err), err, out)
	}
	t.Setenv("EDGEGATE_K1", verifyK1)

	// A refused token: a fetch error naming the answer, not the token.
	bad := writeTemp(t, "bad", []byte("TOKCANARY-wrong"))
	_, err = run("--broker", fb.URL+"/orion-filter/orion-1", "--device", "th-1", "--type", "Thermometer", "--token-file", bad, "--ca", ca)
	if exitCode(err) != 2 || !strings.Contains(err.Error(), "401") || strings.Contains(err.Error(), "TOKCANARY-wrong") {
		t.Errorf("refused token: %v", err)
	}
	// Usage errors.
	for _, a := range [][]string{
		{"--broker", fb.URL, "--type", "T", "--token-file", tokFile},
		{"--broker", fb.URL, "--device", "th-1", "--type", "T"},
		{"--broker", "http://plain.example", "--device", "th-1", "--type", "T", "--token-file", tokFile},
	} {
		if _, err := run(a...); exitCode(err) != 2 {
			t.Errorf("verify %q = %v, want exit 2", a, err)
		}
	}
}

// The update body the gateway sends verifies as before, from a file or
// stdin, and a bare compact JWS too.
func TestVerifyUpdateBodyAndJWS(t *testing.T) {
	t.Setenv("EDGEGATE_K1", verifyK1)
	t.Setenv("EDGEGATE_K2", verifyK2)
	key, _ := envelope.DeriveHS256("th-1", verifyK1, verifyK2)
	r := reading.Reading{Device: "th-1", Time: time.Date(2026, 12, 3, 6, 0, 0, 0, time.UTC),
		Attrs: []reading.Attribute{{Name: "temperature", Type: "Number", Value: 21.5}}}
	c := envelope.ClaimsOf("gw-1", 9, &r)
	jws, _ := envelope.Seal(key, c)
	body, _ := envelope.Body(c, jws, "")
	for name, in := range map[string]string{"body": string(body), "jws": jws} {
		var out bytes.Buffer
		if err := runVerify(context.Background(), nil, strings.NewReader(in), &out, &out); err != nil || !strings.Contains(out.String(), "valid: reading of device th-1, seq 9") {
			t.Errorf("%s: verify = %v\n%s", name, err, out.String())
		}
	}
	tampered := strings.Replace(string(body), "21.5", "25", 1)
	var out bytes.Buffer
	if err := runVerify(context.Background(), nil, strings.NewReader(tampered), &out, &out); exitCode(err) != 1 {
		t.Errorf("tampered body: %v\n%s", err, out.String())
	}
}
