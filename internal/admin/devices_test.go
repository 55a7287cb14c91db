package admin

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
)

// deviceFake is a Backend with the device endpoints; it remembers what it
// was asked.
type deviceFake struct {
	fakeBackend
	mu   sync.Mutex
	adds []DeviceAddRequest
	fail error
}

func (d *deviceFake) AddDevice(_ context.Context, r DeviceAddRequest) (DeviceResult, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.fail != nil {
		return DeviceResult{}, d.fail
	}
	d.adds = append(d.adds, r)
	return DeviceResult{ID: r.ID, Action: "added", Type: r.Type, Broker: r.Broker, Binding: r.Binding.String(),
		OwnershipChecked: true, OwnershipMissing: true, Warnings: []string{"The registration is NOT possible. Reached limit of IoT Devices."},
		Registry: true, SyncNudged: true}, nil
}

func (d *deviceFake) UpdateDevice(_ context.Context, r DeviceUpdateRequest) (DeviceResult, error) {
	return DeviceResult{ID: r.ID, Action: "updated"}, nil
}

func (d *deviceFake) RemoveDevice(_ context.Context, id, broker string) (DeviceResult, error) {
	if id == "ghost" {
		return DeviceResult{}, fmt.Errorf("%w: no such device", ErrUpstream)
	}
	return DeviceResult{ID: id, Action: "removed", Broker: broker}, nil
}

func (d *deviceFake) BindDevice(_ context.Context, r DeviceBindRequest) (DeviceResult, error) {
	if r.Type == "" {
		return DeviceResult{}, fmt.Errorf("%w: type is empty", ErrBadRequest)
	}
	return DeviceResult{ID: r.ID, Action: "bound", Type: r.Type, Delegated: r.K1 != "", Registry: true}, nil
}

func (d *deviceFake) ListDevices(context.Context) (DeviceList, error) {
	return DeviceList{Devices: []DeviceInfo{
		{ID: "th-1", Type: "Thermometer", Broker: "orion-1", Relation: "owned", Binding: "the local MQTT link", InDirectory: true, InRegistry: true},
		{ID: "shared-1", Type: "Meter", Broker: "orion-1", Relation: "delegated", InDirectory: true,
			Problems: []string{"no binding: edgegate device bind shared-1 --type Meter --mqtt|--radio-port P"}},
	}}, nil
}

func TestDeviceEndpoints(t *testing.T) {
	be := &deviceFake{}
	aud := &fakeAudit{}
	c, _ := serve(t, be, ServerOptions{Audit: aud})
	ctx := context.Background()
	req := DeviceAddRequest{ID: "th-1", Type: "Thermometer", Broker: "orion-1", Kind: "sensor", Frequency: 600,
		Binding: DeviceBinding{RadioPort: "/dev/ttyUSB0", RadioNode: 3, RadioChild: -1}, Signing: "hs256",
		K1: "k1-canary-aaaa", K2: "k2-canary-bbbb"}
	res, err := c.AddDevice(ctx, req)
	if err != nil {
		t.Fatalf("AddDevice: %v", err)
	}
	if len(be.adds) != 1 || be.adds[0].K1 != "k1-canary-aaaa" || be.adds[0].Binding.RadioNode != 3 {
		t.Fatalf("the backend got %d requests, %v", len(be.adds), be.adds)
	}
	var out bytes.Buffer
	WriteDeviceResult(&out, res)
	for _, want := range []string{"Registered device th-1 (type Thermometer) at orion-1", "radio port /dev/ttyUSB0, node 3, child any",
		"!! ownership  registered in the directory, but the platform refused its ownership row (IOTID limit?)",
		"Reached limit of IoT Devices", "synced its policy now"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, out.String())
		}
	}
	if s := out.String() + fmt.Sprintf("%v %#v", req, req); strings.Contains(s, "canary") {
		t.Errorf("keys printed: %s", s)
	}

	l, err := c.ListDevices(ctx)
	if err != nil || len(l.Devices) != 2 {
		t.Fatalf("ListDevices = %v, %v", l, err)
	}
	out.Reset()
	if err := WriteDeviceList(&out, l); err != nil || !strings.Contains(out.String(), "delegated") || !strings.Contains(out.String(), "no binding: edgegate device bind shared-1") {
		t.Errorf("list output (%v):\n%s", err, out.String())
	}

	if res, err := c.BindDevice(ctx, DeviceBindRequest{ID: "shared-1", Type: "Meter", K1: "a-canary", K2: "b-canary"}); err != nil || !res.Delegated {
		t.Errorf("BindDevice = %+v, %v", res, err)
	}
	_, err = c.BindDevice(ctx, DeviceBindRequest{ID: "shared-1"})
	var ae *APIError
	if !errors.As(err, &ae) || ae.Status != http.StatusBadRequest || !strings.Contains(err.Error(), "type is empty") {
		t.Errorf("bind without type: %v", err)
	}
	if _, err := c.RemoveDevice(ctx, "ghost", "orion-1"); !errors.As(err, &ae) || ae.Status != http.StatusBadGateway {
		t.Errorf("remove of an unknown device: %v", err)
	}
	if res, err := c.UpdateDevice(ctx, DeviceUpdateRequest{ID: "th-1"}); err != nil || res.Action != "updated" {
		t.Errorf("UpdateDevice = %+v, %v", res, err)
	}
	// Unknown fields are refused (a typo must not pass as "nothing to change").
	resp, err := c.do(ctx, http.MethodPost, "/v1/devices/th-1/bind", map[string]any{"id": "th-1", "type": "T", "radio": "x"})
	if err == nil {
		resp.Body.Close()
		t.Error("an unknown field was accepted")
	}
	// Audit: every change, never a key.
	kinds := fmt.Sprint(aud.kinds())
	if !strings.Contains(kinds, "device_add") || !strings.Contains(kinds, "device_bind") || !strings.Contains(kinds, "device_remove") {
		t.Errorf("audit kinds = %s", kinds)
	}
	for _, e := range aud.events {
		if strings.Contains(fmt.Sprintf("%+v", e), "canary") {
			t.Errorf("audit event carries a key: %+v", e)
		}
	}
}

// TestDeviceEndpointsWithoutBackend: a daemon without device support
// answers 501, not a crash or a 404.
func TestDeviceEndpointsWithoutBackend(t *testing.T) {
	c, _ := serve(t, &fakeBackend{}, ServerOptions{})
	_, err := c.ListDevices(context.Background())
	var ae *APIError
	if !errors.As(err, &ae) || ae.Status != http.StatusNotImplemented {
		t.Errorf("ListDevices = %v, want 501", err)
	}
}
