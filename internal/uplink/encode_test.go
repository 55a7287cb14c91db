package uplink

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"sync"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/envelope"
	"github.com/edgegate/edgegate/internal/queue"
	"github.com/edgegate/edgegate/internal/reading"
	"github.com/edgegate/edgegate/internal/sim/centralsim"
)

// TestBatchBodyOrion: an op/update built from stored bodies — packed
// (envelope.SealPacked) and, as a store written before packing holds,
// rendered (envelope.SealBody) — several devices, several readings each, every value kind, a
// type that needs escaping — is what the simulated Orion (centralsim,
// after Orion 3.12's parseBatchUpdate.cpp) parses, applies in order and
// verifies: every entity a valid signature, each entity's last values
// stored.
func TestBatchBodyOrion(t *testing.T) {
	type dev struct{ id, typ, k1, k2 string }
	devs := []dev{{"th-1", "Thermometer", "k1-a", "k2-a"}, {"x.y_z-2", "Weather", "k1-b", "k2-b"}}
	var mu sync.Mutex
	var ups []centralsim.Update
	opts := centralsim.Options{OnUpdate: func(u centralsim.Update) {
		mu.Lock()
		ups = append(ups, u)
		mu.Unlock()
	}}
	for _, d := range devs {
		opts.Devices = append(opts.Devices, centralsim.Device{ID: d.id, Type: d.typ, Owner: "alice", K1: d.k1, K2: d.k2,
			Attrs: []string{"label", "on", "pos", "temperature"}})
	}
	sim, err := centralsim.New(opts)
	if err == nil {
		err = sim.Start("127.0.0.1:0")
	}
	if err != nil {
		t.Fatalf("start the simulated Orion: %v", err)
	}
	t.Cleanup(func() { sim.Close() })

	var items, fullItems []queue.Item
	const perDevice = 3
	for _, d := range devs {
		k, err := envelope.DeriveHS256(d.id, d.k1, d.k2)
		if err != nil {
			t.Fatal(err)
		}
		for seq := uint64(1); seq <= perDevice; seq++ {
			r := &reading.Reading{Device: d.id, Time: time.Date(2026, 12, 3, 10, 0, int(seq), 0, time.UTC), Attrs: []reading.Attribute{
				{Name: "label", Type: "Text", Value: fmt.Sprintf("héllo & %d", seq)},
				{Name: "on", Type: "Boolean", Value: seq%2 == 0},
				{Name: "pos", Type: "StructuredValue", Value: map[string]any{"lat": 43.7, "lon": []any{11.2, nil}}},
				{Name: "temperature", Type: "Number", Value: 20 + float64(seq)/4},
			}}
			full, err := envelope.SealBody(k, "gw-1", seq, r, "")
			if err != nil {
				t.Fatal(err)
			}
			packed, err := envelope.SealPacked(k, "gw-1", seq, r, "")
			if err != nil {
				t.Fatal(err)
			}
			// A store upgraded in place holds both: readings queued
			// before packing existed, rendered, and packed ones after.
			body := packed
			if seq == 2 {
				body = full
			}
			items = append(items, queue.Item{Device: d.id, Type: d.typ, Seq: seq, Body: body})
			fullItems = append(fullItems, queue.Item{Device: d.id, Type: d.typ, Seq: seq, Body: full})
		}
	}
	body, err := appendBatchBody(nil, items)
	if err != nil {
		t.Fatal(err)
	}
	if want, err := appendBatchBody(nil, fullItems); err != nil || !bytes.Equal(body, want) {
		t.Fatalf("from packed bodies:\n%s\nfrom rendered ones (%v):\n%s", body, err, want)
	}
	if !json.Valid(body) {
		t.Fatalf("batch body is not JSON: %s", body)
	}
	req, err := http.NewRequest(http.MethodPost, sim.URL()+centralsim.DirectPath+"/v2/op/update", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	client := NewHTTPClient(sim.CAPool(), 5*time.Second, 1)
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	answer, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent {
		t.Fatalf("op/update answered %d %s", resp.StatusCode, answer)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(ups) != len(items) {
		t.Fatalf("Orion recorded %d updates, sent %d entities", len(ups), len(items))
	}
	for i, u := range ups {
		if u.Device != items[i].Device || u.Seq != items[i].Seq || u.Verdict != "valid" {
			t.Errorf("update %d: device %s seq %d verdict %s (%s), want %s seq %d valid", i, u.Device, u.Seq, u.Verdict, u.Detail, items[i].Device, items[i].Seq)
		}
	}
	for _, d := range devs {
		e, ok := sim.Entity(d.id)
		if !ok {
			t.Fatalf("entity %s not stored", d.id)
		}
		if e["type"] != d.typ {
			t.Errorf("entity %s type %v, want %s", d.id, e["type"], d.typ)
		}
		temp, _ := e["temperature"].(map[string]any)
		if temp["value"] != 20+float64(perDevice)/4 {
			t.Errorf("entity %s temperature %v, want the last reading's %v", d.id, temp["value"], 20+float64(perDevice)/4)
		}
		label, _ := e["label"].(map[string]any)
		if label["value"] != fmt.Sprintf("héllo & %d", perDevice) {
			t.Errorf("entity %s label %v", d.id, label["value"])
		}
	}
}

// TestBatchBodyEscapes: the type is rendered as json.Marshal renders it.
func TestBatchBodyEscapes(t *testing.T) {
	items := []queue.Item{{Device: "d-1", Type: "T<&>\"\u2028é", Seq: 1, Body: []byte(` {"a":{"type":"Number","value":1}} `)}, {Device: "d-2", Seq: 2, Body: []byte(`{}`)}}
	got, err := appendBatchBody(nil, items)
	if err != nil {
		t.Fatal(err)
	}
	typ, _ := json.Marshal(items[0].Type)
	want := `{"actionType":"append","entities":[{"id":"d-1","type":` + string(typ) + `,"a":{"type":"Number","value":1}},{"id":"d-2"}]}`
	if string(got) != want {
		t.Fatalf("batchBody = %s\nwant %s", got, want)
	}
	if _, err := appendBatchBody(nil, []queue.Item{{Device: "d-1", Seq: 3, Body: []byte(`[1]`)}}); err == nil {
		t.Fatal("batchBody of a body that is not an object = nil error")
	}
}

// TestPatchURLMatchesURLValues: patchURL renders the target the request
// built through url.Values before (sorted keys, query escaping).
func TestPatchURLMatchesURLValues(t *testing.T) {
	for _, tc := range []struct{ dev, typ string }{
		{"th-1", "Thermometer"}, {"x.y_z-2", ""}, {"d", "a b&c=d?e/f#g+h%i"}, {"d", "é\u2028<>"},
	} {
		q := url.Values{"elementid": {tc.dev}}
		if tc.typ != "" {
			q.Set("type", tc.typ)
		}
		want := "https://b.example/orion-filter/o1" + "/v2/entities/" + url.PathEscape(tc.dev) + "/attrs?" + q.Encode()
		if got := patchURL("https://b.example/orion-filter/o1", tc.dev, tc.typ); got != want {
			t.Errorf("patchURL(%q, %q) = %s, want %s", tc.dev, tc.typ, got, want)
		}
	}
	if n := testing.AllocsPerRun(100, func() { _ = patchURL("https://b.example/o", "th-1", "Thermometer") }); n > 1 {
		t.Errorf("patchURL: %.0f allocations, want 1", n)
	}
}
