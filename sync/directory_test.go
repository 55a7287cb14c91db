package centralsync

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
)

func testSpec(id string) DeviceSpec {
	return DeviceSpec{ID: id, Type: "Thermometer", ContextBroker: "orion-1", Kind: "sensor", Format: "json",
		Model: "custom", Producer: "edgegate", Latitude: 43.77, Longitude: 11.25, Frequency: 600,
		K1: "k1-canary-0a1b2c3d", K2: "k2-canary-4e5f6a7b",
		Attributes: []DeviceAttr{{Name: "temperature", DataType: "float", Type: "temperature", Editable: "0", Unit: "°C",
			HealthinessCriteria: HealthRefreshRate, HealthinessValue: "1200"}},
		Gateway: "gw-1", RadioPort: "/dev/ttyUSB0", RadioNode: 12, RadioChild: -1}
}

func testDirectory(f *stockDirectory, srv *httptest.Server) *Directory {
	return NewDirectory(srv.URL, srv.Client(), func(context.Context) (string, error) { return f.token, nil })
}

// assertNoSecrets fails when s holds a secret of the fixture.
func assertNoSecrets(t *testing.T, s string, secrets ...string) {
	t.Helper()
	for _, sec := range secrets {
		if strings.Contains(s, sec) {
			t.Errorf("%q leaks a secret", s)
		}
	}
}

// TestDirectoryWithoutNodered: stock takes a token sent without
// nodered=yes for a refresh token and fails (device.php 73-95); the
// client sends nodered=yes and the token, and is accepted.
func TestDirectoryWithoutNodered(t *testing.T) {
	f, srv := newStockDirectory(t)
	// What a client without nodered=yes gets from stock.
	req, _ := http.NewRequest(http.MethodPost, srv.URL+"/iot-directory/api/device.php",
		strings.NewReader(url.Values{"action": {"get_all_device"}}.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("Authorization", "Bearer "+f.token)
	resp, err := srv.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.Contains(string(b), `"Access Token not present"`) {
		t.Fatalf("without nodered: HTTP %d %s", resp.StatusCode, b)
	}
	// The client.
	if _, err := testDirectory(f, srv).List(context.Background()); err != nil {
		t.Fatalf("List: %v", err)
	}
}

// TestDirectoryInsertAndList: the full parameter set is accepted, the
// ownership row is confirmed, and get_all_device's "data" lists the device
// with its keys and binding.
func TestDirectoryInsertAndList(t *testing.T) {
	f, srv := newStockDirectory(t)
	ctx := context.Background()
	dir := testDirectory(f, srv)
	res, err := dir.Insert(ctx, testSpec("th-1"))
	if err != nil {
		t.Fatalf("Insert: %v", err)
	}
	if res.Warning != "" || !res.OwnershipChecked || res.OwnershipMissing || res.ElementID != "Org:orion-1:th-1" {
		t.Errorf("Insert result = %+v", res)
	}
	form := f.forms[0]
	if form["nodered"][0] != "yes" || form["edgegateway_type"][0] != EdgeGatewayType ||
		form["edgegateway_uri"][0] != "edgegate://gw-1/radio?node=12&port=%2Fdev%2FttyUSB0" {
		t.Errorf("insert form: nodered %v, edge %v %v", form["nodered"], form["edgegateway_type"], form["edgegateway_uri"])
	}
	var attrs []map[string]string
	_ = json.Unmarshal([]byte(form["attributes"][0]), &attrs)
	if len(attrs) != 1 || attrs[0]["value_unit"] != "°C" || attrs[0]["healthiness_criteria"] != "refresh_rate" || attrs[0]["healthiness_value"] != "1200" {
		t.Errorf("attributes sent = %v", attrs)
	}
	f.delegated["shared-1"] = &stockDevice{row: map[string]string{"type": "Meter", "contextbroker": "orion-1", "k1": "x", "k2": "y"}}
	devs, err := dir.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	byID := map[string]ListedDevice{}
	for _, d := range devs {
		byID[d.ID] = d
	}
	th, sh := byID["th-1"], byID["shared-1"]
	if !th.Owned() || th.Type != "Thermometer" || th.K1 != "k1-canary-0a1b2c3d" || th.Latitude != "43.77" || th.EdgegatewayType != EdgeGatewayType {
		t.Errorf("own row = %#v (k1 set: %v)", th, th.K1 != "")
	}
	if sh.Owned() || sh.Visibility != "delegated" || sh.K1 != "" || sh.DelegationKind != "READ_WRITE" {
		t.Errorf("delegated row = %#v", sh)
	}
	assertNoSecrets(t, th.String()+th.GoString(), th.K1, th.K2)
}

// TestDirectoryOwnershipRefused: stock answers ok with an error_msg when
// the Ownership API refused the row (common.php registerOwnerShipDevice);
// the client reports the warning and the missing row.
func TestDirectoryOwnershipRefused(t *testing.T) {
	f, srv := newStockDirectory(t)
	f.refuseOwnership = true
	res, err := testDirectory(f, srv).Insert(context.Background(), testSpec("th-2"))
	if err != nil {
		t.Fatalf("Insert: %v", err)
	}
	if !strings.Contains(res.Warning, "Reached limit of IoT Devices") || !res.OwnershipChecked || !res.OwnershipMissing {
		t.Errorf("result = %+v, want the limit warning and a missing ownership row", res)
	}
}

// TestDirectoryRefusals: stock's "ko" answers (and the "" status of a
// forbidden character) are DirectoryErrors carrying msg and error_msg,
// without the token or the keys; local checks refuse before asking.
func TestDirectoryRefusals(t *testing.T) {
	f, srv := newStockDirectory(t)
	ctx := context.Background()
	// A transport that drops one parameter, to see stock's answer to it.
	drop := func(param string) *Directory {
		d := testDirectory(f, srv)
		base := srv.Client().Transport
		d.HTTPClient = &http.Client{Transport: roundTripFunc(func(r *http.Request) (*http.Response, error) {
			b, _ := io.ReadAll(r.Body)
			v, _ := url.ParseQuery(string(b))
			v.Del(param)
			r2 := r.Clone(r.Context())
			enc := v.Encode()
			r2.Body, r2.ContentLength = io.NopCloser(strings.NewReader(enc)), int64(len(enc))
			return base.RoundTrip(r2)
		})}
		return d
	}
	_, err := drop("frequency").Insert(ctx, testSpec("th-3"))
	var de *DirectoryError
	if !errors.As(err, &de) || !strings.Contains(err.Error(), "Missing parameters: frequency") {
		t.Errorf("insert without frequency: %v", err)
	}
	assertNoSecrets(t, err.Error(), f.token, "k1-canary-0a1b2c3d", "k2-canary-4e5f6a7b")

	spec := testSpec("th-4")
	spec.ContextBroker = "orion-9"
	if _, err := testDirectory(f, srv).Insert(ctx, spec); !errors.As(err, &de) || !strings.Contains(err.Error(), "Unrecognized contextbroker") {
		t.Errorf("unknown broker: %v", err)
	}
	bad := testDirectory(f, srv)
	bad.Token = func(context.Context) (string, error) { return "not-a-token-canary", nil }
	if _, err := bad.List(ctx); !errors.As(err, &de) || !strings.Contains(err.Error(), "Cannot retrieve user information") {
		t.Errorf("bad token: %v", err)
	}

	// Refused locally, naming the field: nothing is sent.
	n := len(f.forms)
	for _, tt := range []struct {
		name string
		edit func(*DeviceSpec)
		want string
	}{
		{"slash in id", func(d *DeviceSpec) { d.ID = "a/b" }, "byte 1"},
		{"colon in id", func(d *DeviceSpec) { d.ID = "a:b" }, "':'"},
		{"space in attribute", func(d *DeviceSpec) { d.Attributes[0].Name = "t emp" }, "attribute 1 name"},
		{"no unit", func(d *DeviceSpec) { d.Attributes[0].Unit = "" }, "unit"},
		{"bad criterion", func(d *DeviceSpec) { d.Attributes[0].HealthinessCriteria = "often" }, "healthiness"},
		{"refresh without value", func(d *DeviceSpec) { d.Attributes[0].HealthinessValue = "" }, "refresh_rate needs a value"},
		{"kind", func(d *DeviceSpec) { d.Kind = "sensors" }, "kind"},
		{"no attributes", func(d *DeviceSpec) { d.Attributes = nil }, "at least one attribute"},
		{"same keys", func(d *DeviceSpec) { d.K2 = d.K1 }, "k1 and k2"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			s := testSpec("th-5")
			tt.edit(&s)
			_, err := testDirectory(f, srv).Insert(ctx, s)
			if !errors.Is(err, ErrInvalidDevice) || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("Insert = %v, want ErrInvalidDevice mentioning %q", err, tt.want)
			}
		})
	}
	if len(f.forms) != n {
		t.Error("a locally refused device reached the directory")
	}
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// TestDirectoryUpdateSendsWholeDevice: update reads the device and its
// attributes, then sends every parameter stock requires with what the
// change left alone kept (keys, binding, other attributes).
func TestDirectoryUpdateSendsWholeDevice(t *testing.T) {
	f, srv := newStockDirectory(t)
	ctx := context.Background()
	dir := testDirectory(f, srv)
	if _, err := dir.Insert(ctx, testSpec("th-6")); err != nil {
		t.Fatal(err)
	}
	_, err := dir.Update(ctx, "th-6", "orion-1", func(d *DeviceSpec) error {
		d.Latitude = 44.5
		d.Attributes = append(d.Attributes, DeviceAttr{Name: "humidity", DataType: "float", Type: "humidity", Unit: "%",
			HealthinessCriteria: HealthDifferentValues})
		return nil
	})
	if err != nil {
		t.Fatalf("Update: %v", err)
	}
	form := f.forms[len(f.forms)-1]
	for _, p := range []string{"id", "type", "contextbroker", "gb_old_cb", "kind", "format", "model", "producer",
		"latitude", "longitude", "k1", "k2", "frequency", "attributes", "newattributes", "edgegateway_type", "edgegateway_uri", "nodered"} {
		if len(form[p]) == 0 {
			t.Errorf("update form lacks %s", p)
		}
	}
	d := f.devices["th-6"]
	if d.row["latitude"] != "44.5" || d.row["longitude"] != "11.25" || d.row["k1"] != "k1-canary-0a1b2c3d" || d.row["type"] != "Thermometer" {
		t.Errorf("after update: lat %s lon %s type %s (k1 kept: %v)", d.row["latitude"], d.row["longitude"], d.row["type"], d.row["k1"] == "k1-canary-0a1b2c3d")
	}
	if d.edge[1] != "edgegate://gw-1/radio?node=12&port=%2Fdev%2FttyUSB0" {
		t.Errorf("binding after update = %q: lost", d.edge[1])
	}
	if len(d.attrs) != 2 || d.attrs[0]["value_name"] != "temperature" || d.attrs[0]["value_unit"] != "°C" || d.attrs[1]["value_name"] != "humidity" {
		t.Errorf("attributes after update = %v", d.attrs)
	}
	// Remove one: deleteattributes.
	if _, err := dir.Update(ctx, "th-6", "orion-1", func(d *DeviceSpec) error {
		d.Attributes = d.Attributes[:1]
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if len(f.devices["th-6"].attrs) != 1 {
		t.Errorf("attributes after removal = %v", f.devices["th-6"].attrs)
	}
	// Not listed: a clear error, not a blind update.
	if _, err := dir.Update(ctx, "nope", "orion-1", nil); !errors.Is(err, ErrNoSuchDevice) {
		t.Errorf("update of an unknown device: %v", err)
	}
	if _, err := dir.Delete(ctx, "th-6", "orion-1"); err != nil {
		t.Fatal(err)
	}
	if _, found, err := dir.OwnershipRow(ctx, "orion-1", "th-6"); err != nil || found {
		t.Errorf("ownership row after delete: found %v, %v", found, err)
	}
}

// TestPHPString: mysqli hands columns over as strings; numbers and null
// are read too.
func TestPHPString(t *testing.T) {
	var v struct{ A, B, C phpString }
	if err := json.NewDecoder(bytes.NewReader([]byte(`{"A":"1.5","B":2,"C":null}`))).Decode(&v); err != nil || v.A != "1.5" || v.B != "2" || v.C != "" {
		t.Errorf("got %+v, %v", v, err)
	}
	if err := json.Unmarshal([]byte(`{"A":{}}`), &v); err == nil {
		t.Error("an object was accepted as a string")
	}
}
