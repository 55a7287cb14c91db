package centralsync

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
)

// The platform's IoT Directory device API (iot-directory/api/device.php),
// as the installer uses it to register devices. Most failures come back
// as HTTP 200 with {"status":"ko","msg":...,"error_msg":...}; Directory
// reports those as *DirectoryError.

// EdgeGatewayType is the edgegateway_type of devices bound to an edgegate
// gateway; their edgegateway_uri says to which gateway and which source:
// edgegate://GATEWAY/radio?port=P&node=N&child=C or edgegate://GATEWAY/mqtt.
const EdgeGatewayType = "edgegate"

// DeviceAttr is one value of a device model (IoT Directory "attributes").
type DeviceAttr struct {
	Name     string `json:"value_name"`
	DataType string `json:"data_type"`  // float, integer, string, ...
	Type     string `json:"value_type"` // temperature, humidity, ...
	Editable string `json:"editable"`
	Unit     string `json:"value_unit"`
	// Healthiness fields the directory requires on every attribute.
	HealthinessCriteria string `json:"healthiness_criteria"`
	HealthinessValue    string `json:"healthiness_value"`
}

// DeviceSpec is a device to insert.
type DeviceSpec struct {
	ID, Type, ContextBroker, Kind, Format, Model, Producer string
	Latitude, Longitude                                    float64
	Frequency                                              int // seconds
	K1, K2                                                 string
	Attributes                                             []DeviceAttr
	// Binding: the gateway and its local source.
	Gateway    string
	RadioPort  string // "" = MQTT
	RadioNode  int    // -1 any
	RadioChild int    // -1 any
	// Signing is who signs the device's readings ("" or "hs256",
	// "gateway", "device"); carried in the edgegateway_uri as
	// ?signing=... when not HS256.
	Signing string
	// PublicKey is the device's public key (a JWK), sent as the
	// directory's "publickey" (the platform's elementDetails.publickey).
	PublicKey string
}

// EdgeURI is the edgegateway_uri of the binding.
func (d *DeviceSpec) EdgeURI() string {
	u := url.URL{Scheme: "edgegate", Host: d.Gateway, Path: "/mqtt"}
	if d.RadioPort != "" {
		u.Path = "/radio"
		q := url.Values{"port": {d.RadioPort}}
		if d.RadioNode >= 0 {
			q.Set("node", strconv.Itoa(d.RadioNode))
		}
		if d.RadioChild >= 0 {
			q.Set("child", strconv.Itoa(d.RadioChild))
		}
		u.RawQuery = q.Encode()
	}
	if d.Signing != "" && d.Signing != "hs256" {
		q := u.Query()
		q.Set("signing", d.Signing)
		u.RawQuery = q.Encode()
	}
	return u.String()
}

// NewDeviceKey returns a random (version 4) UUID, the form of the
// platform's K1/K2.
func NewDeviceKey() (string, error) {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("generate device key: %w", err)
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16]), nil
}

// DirectoryError is a {"status":"ko"} answer (or a non-2xx one).
type DirectoryError struct {
	Action string
	Status int
	Msg    string
}

func (e *DirectoryError) Error() string {
	return fmt.Sprintf("IoT directory refused %s (HTTP %d): %s", e.Action, e.Status, e.Msg)
}

// Directory is a client of the IoT Directory device API.
type Directory struct {
	URL        string // e.g. https://central.example.org/iot-directory/api/device.php
	HTTPClient *http.Client
	Token      func(ctx context.Context) (string, error)
}

// DirectoryURL is the device API under a central service URL.
func DirectoryURL(central string) string {
	return strings.TrimRight(central, "/") + "/iot-directory/api/device.php"
}

// Insert registers d. It refuses equal keys before asking.
func (c *Directory) Insert(ctx context.Context, d DeviceSpec) (nudged bool, err error) {
	if d.K1 == "" || d.K2 == "" || d.K1 == d.K2 {
		return false, errors.New("insert device: k1 and k2 must be set and differ")
	}
	attrs, err := json.Marshal(d.Attributes)
	if err != nil {
		return false, err
	}
	f := url.Values{
		"action": {"insert"}, "id": {d.ID}, "type": {d.Type}, "contextbroker": {d.ContextBroker},
		"kind": {d.Kind}, "format": {d.Format}, "model": {d.Model}, "producer": {d.Producer},
		"latitude":  {strconv.FormatFloat(d.Latitude, 'f', -1, 64)},
		"longitude": {strconv.FormatFloat(d.Longitude, 'f', -1, 64)},
		"frequency": {strconv.Itoa(d.Frequency)},
		"k1":        {d.K1}, "k2": {d.K2}, "attributes": {string(attrs)},
		"mac": {""}, "visibility": {"private"},
	}
	if d.PublicKey != "" {
		f.Set("publickey", d.PublicKey)
	}
	if d.Gateway != "" {
		f.Set("edgegateway_type", EdgeGatewayType)
		f.Set("edgegateway_uri", d.EdgeURI())
	}
	var out struct {
		Nudged bool `json:"nudged"`
	}
	if err := c.call(ctx, "insert of device "+d.ID, f, &out); err != nil {
		return false, err
	}
	return out.Nudged, nil
}

// UpdatePublicKey registers a new public key (a JWK) for a device, as key
// rotation does (action=update): the central service puts it in front of
// the device's keys and keeps the older ones for older readings.
func (c *Directory) UpdatePublicKey(ctx context.Context, id, contextBroker, publicKey string) (nudged bool, err error) {
	var out struct {
		Nudged bool `json:"nudged"`
	}
	err = c.call(ctx, "key update of device "+id, url.Values{"action": {"update"}, "id": {id},
		"contextbroker": {contextBroker}, "publickey": {publicKey}}, &out)
	return out.Nudged, err
}

// Delete removes a device.
func (c *Directory) Delete(ctx context.Context, id, contextBroker string) error {
	return c.call(ctx, "delete of device "+id, url.Values{"action": {"delete"}, "id": {id}, "contextbroker": {contextBroker}}, nil)
}

// ListedDevice is a device of List (no keys).
type ListedDevice struct {
	ID              string   `json:"id"`
	Type            string   `json:"devicetype"`
	ContextBroker   string   `json:"contextBroker"`
	EdgegatewayType string   `json:"edgegateway_type"`
	EdgegatewayURI  string   `json:"edgegateway_uri"`
	Attributes      []string `json:"attributes"`
	Signing         string   `json:"signing,omitempty"`
	PublicKey       string   `json:"publickey,omitempty"`
}

// List returns the account's devices.
func (c *Directory) List(ctx context.Context) ([]ListedDevice, error) {
	var out struct {
		Content []ListedDevice `json:"content"`
	}
	if err := c.call(ctx, "device list", url.Values{"action": {"get_all_device"}}, &out); err != nil {
		return nil, err
	}
	return out.Content, nil
}

// call POSTs the form (parameters in the body, so that K1/K2 never sit in
// a URL that proxies log) with the Bearer token.
func (c *Directory) call(ctx context.Context, what string, form url.Values, v any) error {
	tok, err := c.Token(ctx)
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.URL, strings.NewReader(form.Encode()))
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("Accept", "application/json")
	req.Header.Set("Authorization", "Bearer "+tok)
	resp, err := httpClient(c.HTTPClient).Do(req)
	if err != nil {
		return fmt.Errorf("%s at %s: %w", what, redactURL(c.URL), unwrapURL(err))
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, maxDiscoveryBytes))
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	var st struct {
		Status   string `json:"status"`
		Msg      string `json:"msg"`
		ErrorMsg string `json:"error_msg"`
	}
	jerr := json.Unmarshal(b, &st)
	if resp.StatusCode/100 != 2 || jerr != nil || st.Status != "ok" {
		msg := apiMessage(b)
		if jerr == nil && st.Status == "ko" {
			msg = clip(strings.TrimSpace(st.Msg + ": " + st.ErrorMsg))
		}
		return &DirectoryError{Action: what, Status: resp.StatusCode, Msg: msg}
	}
	if v != nil {
		if err := json.Unmarshal(b, v); err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
	}
	return nil
}
