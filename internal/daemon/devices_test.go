package daemon

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/edgegate/edgegate/internal/admin"
	"github.com/edgegate/edgegate/internal/envelope"
	"github.com/edgegate/edgegate/internal/keys"
	"github.com/edgegate/edgegate/internal/queue"
	"github.com/edgegate/edgegate/policy"
	centralsync "github.com/edgegate/edgegate/sync"
)

// platformEdge is the central service at its HTTP edge: device.php and the
// Ownership API list, answering as stock does (iot-directory web/api/
// device.php and common.php; Ownership-API v1/list/index.php), in the few
// shapes these tests need.
type platformEdge struct {
	mu              sync.Mutex
	token           string
	devices         map[string]map[string]string // id -> columns
	attrs           map[string]string            // id -> attributes JSON
	rows            []string                     // IOTID element ids
	refuseOwnership bool
	refuseInsert    string   // error_msg of a "ko" insert
	calls           []string // actions
}

func newPlatformEdge(t *testing.T) (*platformEdge, *httptest.Server) {
	p := &platformEdge{token: "tok-canary-91c2", devices: map[string]map[string]string{}, attrs: map[string]string{}}
	mux := http.NewServeMux()
	mux.HandleFunc("/iot-directory/api/device.php", p.device)
	mux.HandleFunc("/ownership-api/v1/list/", func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer "+p.token {
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		p.mu.Lock()
		defer p.mu.Unlock()
		var out []map[string]any
		for _, e := range p.rows {
			out = append(out, map[string]any{"elementId": e, "elementType": "IOTID", "username": "alice"})
		}
		_ = json.NewEncoder(w).Encode(out)
	})
	srv := httptest.NewTLSServer(mux)
	t.Cleanup(srv.Close)
	return p, srv
}

func (p *platformEdge) device(w http.ResponseWriter, r *http.Request) {
	_ = r.ParseForm()
	f := r.Form
	res := map[string]any{"status": "ko", "msg": "", "error_msg": "", "content": ""}
	defer func() { _ = json.NewEncoder(w).Encode(res) }()
	// device.php: no nodered, the token is taken for a refresh token.
	if !f.Has("nodered") || f.Get("token") != p.token {
		res["msg"], res["error_msg"] = "Access Token not present", "Access Token not present"
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.calls = append(p.calls, f.Get("action"))
	id := f.Get("id")
	switch f.Get("action") {
	case "insert":
		if p.refuseInsert != "" {
			res["msg"], res["error_msg"] = "\n Problem in inserting the device", p.refuseInsert
			return
		}
		for _, k := range []string{"id", "type", "contextbroker", "kind", "format", "model", "producer", "latitude", "longitude", "k1", "k2", "frequency", "attributes"} {
			if !f.Has(k) {
				res["msg"], res["error_msg"] = "Missing Parameters", "Problem in insert device (Missing parameters: "+k+" )"
				return
			}
		}
		cols := map[string]string{}
		for k := range f {
			cols[k] = f.Get(k)
		}
		p.devices[id], p.attrs[id] = cols, f.Get("attributes")
		res["status"] = "ok"
		if p.refuseOwnership { // common.php registerOwnerShipDevice: still 'ok'
			res["error_msg"] = "The registration is NOT possible. Reached limit of IoT Devices. "
		} else {
			p.rows = append(p.rows, "Org:"+f.Get("contextbroker")+":"+id)
		}
	case "get_all_device":
		var data []map[string]string
		for id, c := range p.devices {
			data = append(data, map[string]string{"id": id, "devicetype": c["type"], "contextBroker": c["contextbroker"],
				"kind": c["kind"], "format": c["format"], "model": c["model"], "producer": c["producer"], "latitude": c["latitude"],
				"longitude": c["longitude"], "frequency": c["frequency"], "visibility": "MyOwnPrivate", "k1": c["k1"], "k2": c["k2"],
				"edgegateway_type": c["edgegateway_type"], "edgegateway_uri": c["edgegateway_uri"]})
		}
		res = map[string]any{"draw": 1, "data": data, "status": "ok", "msg": ""}
	case "get_device_attributes":
		var attrs []map[string]string
		_ = json.Unmarshal([]byte(p.attrs[id]), &attrs)
		res["status"], res["content"] = "ok", attrs
	case "update":
		// device.php action=update: the whole device, or "Missing Parameters".
		for _, k := range []string{"id", "type", "contextbroker", "gb_old_cb", "kind", "format", "model", "producer", "latitude", "longitude", "k1", "k2", "frequency"} {
			if !f.Has(k) {
				res["msg"], res["error_msg"] = "Missing Parameters", "Problem update the device information (Missing parameters: "+k+" )"
				return
			}
		}
		cols := map[string]string{}
		for k := range f {
			cols[k] = f.Get(k)
		}
		var kept, added []map[string]string
		_ = json.Unmarshal([]byte(f.Get("attributes")), &kept)
		_ = json.Unmarshal([]byte(f.Get("newattributes")), &added)
		all, _ := json.Marshal(append(kept, added...))
		p.devices[id], p.attrs[id] = cols, string(all)
		res["status"] = "ok"
	case "delete":
		if _, ok := p.devices[id]; !ok {
			res["msg"], res["error_msg"] = "Unrecognized device", "Problem in delete device (Unrecognized device)"
			return
		}
		delete(p.devices, id)
		res["status"] = "ok"
	}
}

// daemonWithDevices is the daemon's admin side over a real store: the real
// admin server, the real adminBackend and DeviceAdmin, the directory at the
// platform edge above.
func daemonWithDevices(t *testing.T) (*admin.Client, *platformEdge, *queue.Queue, *atomic.Int32) {
	t.Helper()
	p, srv := newPlatformEdge(t)
	q, err := queue.Open(queue.Options{Dir: t.TempDir(), Key: bytes.Repeat([]byte{3}, 32)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { q.Close() })
	var nudges atomic.Int32
	da := &DeviceAdmin{Store: q, Registry: centralsync.NewRegistry(q), Gateway: "gw-1", User: "alice",
		Directory: centralsync.NewDirectory(srv.URL, srv.Client(), func(context.Context) (string, error) { return p.token, nil }),
		Nudge:     func() { nudges.Add(1) }}
	dir := socketDir(t, "eg-dev-")
	sock := filepath.Join(dir, "admin.sock")
	adm, err := admin.Listen(admin.ServerOptions{Socket: sock, Backend: &adminBackend{devAdmin: da}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- adm.Run(ctx) }()
	c := admin.NewClient(sock)
	t.Cleanup(func() {
		c.CloseIdle()
		cancel()
		<-done
	})
	return c, p, q, &nudges
}

func addReq(id string) admin.DeviceAddRequest {
	return admin.DeviceAddRequest{ID: id, Type: "Thermometer", Broker: "orion-1", Kind: "sensor", Format: "json", Model: "custom",
		Producer: "edgegate", Frequency: 600, K1: "k1-canary-1111", K2: "k2-canary-2222", Signing: policy.SigningHS256,
		Binding:    admin.DeviceBinding{RadioPort: "/dev/ttyUSB0", RadioNode: 4, RadioChild: -1},
		Attributes: []admin.DeviceAttr{{Name: "temperature", DataType: "float", ValueType: "temperature", Unit: "°C", Healthiness: "refresh_rate", HealthinessValue: "1200"}}}
}

// TestDeviceAddThroughSocket: device add through the running daemon's
// socket registers at device.php, writes the registry and nudges the
// policy sync; remove undoes both.
func TestDeviceAddThroughSocket(t *testing.T) {
	c, p, q, nudges := daemonWithDevices(t)
	ctx := context.Background()
	res, err := c.AddDevice(ctx, addReq("th-1"))
	if err != nil {
		t.Fatalf("AddDevice: %v", err)
	}
	if !res.Registry || !res.SyncNudged || nudges.Load() != 1 || res.OwnershipMissing || res.ElementID != "Org:orion-1:th-1" {
		t.Errorf("result %+v, nudges %d", res, nudges.Load())
	}
	reg, ok := centralsync.NewRegistry(q).Lookup("th-1")
	if !ok || reg.Type != "Thermometer" || reg.Radio == nil || reg.Radio.Port != "/dev/ttyUSB0" || reg.Radio.Node != 4 || reg.K1 != "" {
		t.Errorf("registry entry = %+v, %v", reg, ok)
	}
	if got := p.devices["th-1"]["edgegateway_uri"]; got != "edgegate://gw-1/radio?node=4&port=%2Fdev%2FttyUSB0" {
		t.Errorf("edgegateway_uri = %q", got)
	}
	if b, _ := json.Marshal(res); bytes.Contains(b, []byte("canary")) {
		t.Errorf("the answer carries a secret: %s", b)
	}

	// The list joins the directory and the registry.
	l, err := c.ListDevices(ctx)
	if err != nil || len(l.Devices) != 1 || l.Devices[0].Relation != "owned" || !l.Devices[0].InRegistry ||
		!strings.Contains(l.Devices[0].Binding, "node 4") || len(l.Devices[0].Problems) != 0 {
		t.Errorf("ListDevices = %+v, %v", l, err)
	}

	// Refused before asking, naming the field (400); nothing recorded.
	bad := addReq("th-2")
	bad.Broker = ""
	var ae *admin.APIError
	if _, err := c.AddDevice(ctx, bad); !errors.As(err, &ae) || ae.Status != http.StatusBadRequest || !strings.Contains(err.Error(), "contextbroker") {
		t.Errorf("add without a broker: %v", err)
	}
	if _, ok := centralsync.NewRegistry(q).Lookup("th-2"); ok {
		t.Error("a refused device is in the registry")
	}
	// Refused by stock: a 502 with stock's message; the registry entry
	// written before the insert is gone again.
	p.refuseInsert = "Problem in inserting the device th-2, device name already exists in deleted devices. "
	if _, err := c.AddDevice(ctx, addReq("th-2")); !errors.As(err, &ae) || ae.Status != http.StatusBadGateway || !strings.Contains(err.Error(), "already exists in deleted devices") {
		t.Errorf("refused insert: %v", err)
	}
	p.refuseInsert = ""
	if _, ok := centralsync.NewRegistry(q).Lookup("th-2"); ok {
		t.Error("a device refused by the directory is in the registry")
	}

	if _, err := c.RemoveDevice(ctx, "th-1", ""); err != nil {
		t.Fatalf("RemoveDevice: %v", err)
	}
	if _, ok := centralsync.NewRegistry(q).Lookup("th-1"); ok || p.devices["th-1"] != nil || nudges.Load() != 2 {
		t.Errorf("after remove: registry %v, directory %v, nudges %d", ok, p.devices["th-1"] != nil, nudges.Load())
	}
	if _, err := c.RemoveDevice(ctx, "th-1", "orion-1"); !errors.As(err, &ae) || ae.Status != http.StatusBadGateway || !strings.Contains(err.Error(), "Unrecognized device") {
		t.Errorf("second remove: %v", err)
	}
}

// TestDeviceAddOwnershipRefused: stock says ok without creating the
// ownership row; the daemon reports it.
func TestDeviceAddOwnershipRefused(t *testing.T) {
	c, p, _, _ := daemonWithDevices(t)
	p.refuseOwnership = true
	res, err := c.AddDevice(context.Background(), addReq("th-3"))
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	admin.WriteDeviceResult(&out, res)
	if !res.OwnershipMissing || !strings.Contains(out.String(), "refused its ownership row (IOTID limit?)") ||
		!strings.Contains(out.String(), "Reached limit of IoT Devices") {
		t.Errorf("result %+v:\n%s", res, out.String())
	}
}

// TestDeviceGatewaySigningKey: a gateway-held key sent in the request is
// stored before the registration, and only its public half registered.
func TestDeviceGatewaySigningKey(t *testing.T) {
	c, p, q, _ := daemonWithDevices(t)
	k, err := envelope.GenerateKey(envelope.AlgEdDSA)
	if err != nil {
		t.Fatal(err)
	}
	priv, _ := k.PrivateJWK()
	req := addReq("gk-1")
	req.Signing, req.SigningKey = policy.SigningGateway, string(priv)
	if _, err := c.AddDevice(context.Background(), req); err != nil {
		t.Fatal(err)
	}
	held, err := keys.LoadDeviceKeys(q, "gk-1")
	if err != nil || len(held) != 1 || held[0].ID() != k.ID() {
		t.Fatalf("held keys %v, %v", held, err)
	}
	reg, _ := centralsync.NewRegistry(q).Lookup("gk-1")
	if reg.Signing != policy.SigningGateway || len(reg.PublicKeys) != 1 || bytes.Contains(reg.PublicKeys[0], []byte(`"d"`)) {
		t.Errorf("registry signing %q keys %d", reg.Signing, len(reg.PublicKeys))
	}
	if pk := p.devices["gk-1"]["publickey"]; pk == "" || strings.Contains(pk, `"d"`) {
		t.Errorf("publickey sent = %q", pk)
	}
}

// TestDeviceBindDelegated: bind records a device the account does not own
// without calling insert, with the installer's keys.
func TestDeviceBindDelegated(t *testing.T) {
	c, p, q, nudges := daemonWithDevices(t)
	res, err := c.BindDevice(context.Background(), admin.DeviceBindRequest{ID: "shared-1", Type: "Meter", Broker: "orion-1",
		Binding: admin.DeviceBinding{MQTT: true, RadioNode: -1, RadioChild: -1}, K1: "k1-canary-3", K2: "k2-canary-4"})
	if err != nil {
		t.Fatal(err)
	}
	if !res.Delegated || !res.Registry || nudges.Load() != 1 || len(res.Warnings) == 0 {
		t.Errorf("result %+v", res)
	}
	for _, a := range p.calls {
		if a != "get_all_device" {
			t.Errorf("bind called device.php action %s", a)
		}
	}
	reg, ok := centralsync.NewRegistry(q).Lookup("shared-1")
	if !ok || reg.K1 != "k1-canary-3" || reg.Type != "Meter" || reg.Radio != nil {
		t.Errorf("registry %v", ok)
	}
	l, _ := c.ListDevices(context.Background())
	if len(l.Devices) != 1 || l.Devices[0].Relation != "delegated" || !strings.Contains(strings.Join(l.Devices[0].Problems, ";"), "not listed") {
		t.Errorf("list = %+v", l)
	}
}

// TestDeviceUpdateThroughSocket: update sends the whole device back with
// the change, keeps the keys and the binding, and updates the registry.
func TestDeviceUpdateThroughSocket(t *testing.T) {
	c, p, q, nudges := daemonWithDevices(t)
	ctx := context.Background()
	if _, err := c.AddDevice(ctx, addReq("th-7")); err != nil {
		t.Fatal(err)
	}
	typ, lat := "Thermo2", 43.5
	res, err := c.UpdateDevice(ctx, admin.DeviceUpdateRequest{ID: "th-7", Type: &typ, Latitude: &lat,
		AddAttributes: []admin.DeviceAttr{{Name: "humidity", DataType: "float", ValueType: "humidity", Unit: "%", Healthiness: "different_values"}}})
	if err != nil {
		t.Fatalf("UpdateDevice: %v", err)
	}
	d := p.devices["th-7"]
	if d["type"] != "Thermo2" || d["latitude"] != "43.5" || d["k1"] != "k1-canary-1111" || d["gb_old_cb"] != "orion-1" ||
		d["edgegateway_uri"] != "edgegate://gw-1/radio?node=4&port=%2Fdev%2FttyUSB0" || !strings.Contains(p.attrs["th-7"], "humidity") ||
		!strings.Contains(p.attrs["th-7"], `"old_value_name":"temperature"`) {
		t.Errorf("device after update: type %s lat %s uri %s attrs %s", d["type"], d["latitude"], d["edgegateway_uri"], p.attrs["th-7"])
	}
	e, _, _ := centralsync.NewRegistry(q).Get("th-7")
	if !res.Registry || e.Type != "Thermo2" || len(e.Attributes) != 2 || e.Radio == nil || nudges.Load() != 2 {
		t.Errorf("registry after update %+v, result %+v", e, res)
	}
	var ae *admin.APIError
	if _, err := c.UpdateDevice(ctx, admin.DeviceUpdateRequest{ID: "th-7", RemoveAttributes: []string{"pressure"}}); !errors.As(err, &ae) || ae.Status != http.StatusBadRequest {
		t.Errorf("removing an unknown attribute: %v", err)
	}
	if _, err := c.UpdateDevice(ctx, admin.DeviceUpdateRequest{ID: "nope", Broker: "orion-1"}); !errors.As(err, &ae) || ae.Status != http.StatusNotFound {
		t.Errorf("update of an unknown device: %v", err)
	}
}
