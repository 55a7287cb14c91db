package centralsync

import (
	"bytes"
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

	"github.com/edgegate/edgegate/internal/reading"
)

// The platform's IoT Directory device API (iot-directory web/api/device.php),
// called as Snap4City's own clients call it (node-red-contrib-snap4city-user:
// a POST form with nodered=yes&token=<access token>). Stock answers every
// request with HTTP 200 and {"status":"ok"|"ko","msg":...,"error_msg":...};
// a "ko" (or any status but "ok") is a *DirectoryError, and an "ok" that
// carries an error_msg is a warning the caller shows (stock says "ok" when
// the Ownership API refused the device's row: common.php
// registerOwnerShipDevice sets status ok with "The registration is NOT
// possible. Reached limit of IoT Devices.").

// EdgeGatewayType is the edgegateway_type of devices bound to an edgegate
// gateway; their edgegateway_uri says to which gateway and which source:
// edgegate://GATEWAY/radio?port=P&node=N&child=C or edgegate://GATEWAY/mqtt.
// Stock copies both into the ownership row's elementDetails (common.php
// insert_device, "edgegateway_type"/"edgegateway_uri").
const EdgeGatewayType = "edgegate"

// Healthiness criteria an attribute may declare (common.php canBeRegistered).
const (
	HealthRefreshRate     = "refresh_rate"
	HealthDifferentValues = "different_values"
	HealthWithinBounds    = "within_bounds"
)

// DeviceAttr is one value of a device model (IoT Directory "attributes";
// the event_values table of web/createtables.sql).
type DeviceAttr struct {
	Name     string `json:"value_name"`
	DataType string `json:"data_type"`  // float, integer, string, ...
	Type     string `json:"value_type"` // temperature, humidity, ...
	Editable string `json:"editable"`
	Unit     string `json:"value_unit"`
	// HealthinessCriteria is refresh_rate, different_values or
	// within_bounds; HealthinessValue its value (seconds for refresh_rate).
	// Stock refuses an attribute without them (common.php canBeRegistered).
	HealthinessCriteria string `json:"healthiness_criteria"`
	HealthinessValue    string `json:"healthiness_value"`
	// OldName is the name the attribute had (update only: device.php
	// updates event_values WHERE value_name = old_value_name).
	OldName string `json:"old_value_name,omitempty"`
}

// DeviceSpec is a device as insert and update send it.
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
	// PublicKey is the device's public key (a JWK). Stock device.php has
	// no such parameter and ignores it (PHP reads only the $_REQUEST keys
	// it names); the edgegate companion reads it. The gateway keeps its
	// own copy in its registry.
	PublicKey string
	// EdgeType and EdgeURI, when set, are sent as they are instead of
	// EdgeGatewayType and EdgeURI() (update keeps what the row has).
	EdgeType, EdgeURIRaw string
	// Fields update carries over unchanged from the directory's row, so
	// that an update does not blank them (device.php action=update writes
	// every column it is given, defaults for the others).
	Mac, Subnature, StaticAttributes, HLT, WKTGeometry string
}

// EdgeURI is the edgegateway_uri of the binding.
func (d *DeviceSpec) EdgeURI() string {
	if d.EdgeURIRaw != "" {
		return d.EdgeURIRaw
	}
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

// ValidateName checks an attribute, model or broker name against what
// device.php accepts: config.php $regphp = "/[^a-zA-Z0-9:._-]/" (applied to
// id, contextbroker, model and every value_name). field names the flag or
// parameter in the error.
func ValidateName(field, s string) error {
	if s == "" {
		return fmt.Errorf("%s is empty", field)
	}
	if len(s) > 255 {
		return fmt.Errorf("%s is longer than 255 characters", field)
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == ':' || c == '.' || c == '_' || c == '-') {
			what := fmt.Sprintf("0x%02x", c)
			if c > 0x20 && c < 0x7f {
				what = fmt.Sprintf("%q", rune(c))
			}
			return fmt.Errorf("%s %q: byte %d (%s) is not allowed: the IoT directory accepts only letters, digits and : . _ -", field, s, i, what)
		}
	}
	return nil
}

// ValidateDeviceID checks a device id by the gateway's one rule,
// reading.ValidateDeviceID: the name rule, no ':' (insert refuses ':' '/'
// '%' in the id: common.php checkSensibleCharacters; the id is also the
// last part of the element id org:broker:id), and never "." or "..".
func ValidateDeviceID(id string) error { return reading.ValidateDeviceID(id) }

// Validate checks what stock insert requires before asking it, so that a
// mistake gets a clear local error naming the field (device.php action
// insert; common.php canBeRegistered).
func (d *DeviceSpec) Validate() error {
	if err := ValidateDeviceID(d.ID); err != nil {
		return err
	}
	if err := ValidateName("type", d.Type); err != nil {
		return err
	}
	if err := ValidateName("contextbroker", d.ContextBroker); err != nil {
		return err
	}
	if err := ValidateName("model", d.Model); err != nil {
		return err
	}
	if d.Kind != "sensor" && d.Kind != "actuator" {
		return fmt.Errorf("kind %q: want sensor or actuator", d.Kind)
	}
	if d.Latitude < -90 || d.Latitude > 90 {
		return fmt.Errorf("latitude %v: want -90..90", d.Latitude)
	}
	if d.Longitude < -180 || d.Longitude > 180 {
		return fmt.Errorf("longitude %v: want -180..180", d.Longitude)
	}
	if d.Frequency <= 0 {
		return fmt.Errorf("frequency %d: want seconds > 0", d.Frequency)
	}
	if d.K1 == "" || d.K2 == "" || d.K1 == d.K2 {
		return errors.New("k1 and k2 must be set and differ")
	}
	if len(d.Attributes) == 0 {
		return errors.New("at least one attribute is required")
	}
	seen := map[string]bool{}
	for i, a := range d.Attributes {
		if err := ValidateName(fmt.Sprintf("attribute %d name", i+1), a.Name); err != nil {
			return err
		}
		if seen[a.Name] {
			return fmt.Errorf("attribute %q declared twice", a.Name)
		}
		seen[a.Name] = true
		if a.DataType == "" || a.Type == "" || a.Unit == "" {
			return fmt.Errorf("attribute %q: data type, value type and unit are required", a.Name)
		}
		switch a.HealthinessCriteria {
		case HealthRefreshRate:
			if a.HealthinessValue == "" {
				return fmt.Errorf("attribute %q: refresh_rate needs a value", a.Name)
			}
		case HealthDifferentValues, HealthWithinBounds:
		default:
			return fmt.Errorf("attribute %q: healthiness criterion %q: want refresh_rate, different_values or within_bounds", a.Name, a.HealthinessCriteria)
		}
	}
	return nil
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

// ErrInvalidDevice wraps a device refused locally, before asking the
// directory (a bad id, name, kind, attribute...).
var ErrInvalidDevice = errors.New("invalid device")

// DirectoryError is an answer whose status is not "ok" (or a non-2xx one).
type DirectoryError struct {
	Action string
	Status int    // HTTP status
	Msg    string // msg and error_msg, clipped, secrets removed
}

func (e *DirectoryError) Error() string {
	return fmt.Sprintf("IoT directory refused %s (HTTP %d): %s", e.Action, e.Status, e.Msg)
}

// Result is what an accepted change reports.
type Result struct {
	// Warning is an error_msg that came with status "ok" (clipped, no
	// secrets): stock accepted, but not all of it happened.
	Warning string
	// OwnershipChecked says the Ownership API was asked for the device's
	// row after an insert; OwnershipMissing that the row was not there
	// (the platform refused it, e.g. the account's IOTID limit).
	OwnershipChecked, OwnershipMissing bool
	// ElementID is the device's ownership element id org:broker:id when
	// the row was found.
	ElementID string
	// Nudged: the (companion) central service said it told the gateway to
	// sync. Stock never says so.
	Nudged bool
}

// Directory is a client of the IoT Directory device API.
type Directory struct {
	URL        string // e.g. https://central.example.org/iot-directory/api/device.php
	HTTPClient *http.Client
	Token      func(ctx context.Context) (string, error)
	// OwnershipURL is the base of the Ownership API (…/ownership-api/v1/list/
	// is added) used to confirm an insert's ownership row; "" skips it.
	OwnershipURL string
}

// DirectoryURL is the device API under a central service URL.
func DirectoryURL(central string) string {
	return strings.TrimRight(central, "/") + "/iot-directory/api/device.php"
}

// NewDirectory is the directory of a central service (Snap4City base URL),
// with the Ownership API under the same base.
func NewDirectory(central string, hc *http.Client, token func(context.Context) (string, error)) *Directory {
	return &Directory{URL: DirectoryURL(central), HTTPClient: hc, Token: token, OwnershipURL: strings.TrimRight(central, "/")}
}

// Insert registers d (device.php action=insert with every parameter stock
// requires: id, type, contextbroker, kind, format, model, producer,
// latitude, longitude, k1, k2, frequency, attributes), then confirms the
// ownership row, because stock answers ok without it.
func (c *Directory) Insert(ctx context.Context, d DeviceSpec) (Result, error) {
	if err := d.Validate(); err != nil {
		return Result{}, fmt.Errorf("insert device: %w: %w", ErrInvalidDevice, err)
	}
	f := c.deviceForm("insert", d, d.Attributes)
	var out struct {
		Nudged bool `json:"nudged"`
	}
	res, err := c.call(ctx, "insert of device "+d.ID, f, &out, d.K1, d.K2)
	if err != nil {
		return res, err
	}
	res.Nudged = out.Nudged
	if c.OwnershipURL != "" {
		eid, found, err := c.OwnershipRow(ctx, d.ContextBroker, d.ID)
		if err != nil {
			res.Warning = joinWarn(res.Warning, "could not confirm the ownership row: "+clip(err.Error()))
		} else {
			res.OwnershipChecked, res.OwnershipMissing, res.ElementID = true, !found, eid
		}
	}
	return res, nil
}

func joinWarn(a, b string) string {
	if a == "" {
		return b
	}
	return a + "; " + b
}

// deviceForm is the form of insert and update (the update-only parameters
// are added by Update).
func (c *Directory) deviceForm(action string, d DeviceSpec, attrs []DeviceAttr) url.Values {
	if attrs == nil {
		attrs = []DeviceAttr{}
	}
	a, _ := json.Marshal(attrs) // plain strings: cannot fail
	f := url.Values{
		"action": {action}, "id": {d.ID}, "type": {d.Type}, "contextbroker": {d.ContextBroker},
		"kind": {d.Kind}, "format": {d.Format}, "model": {d.Model}, "producer": {d.Producer},
		"latitude":  {strconv.FormatFloat(d.Latitude, 'f', -1, 64)},
		"longitude": {strconv.FormatFloat(d.Longitude, 'f', -1, 64)},
		"frequency": {strconv.Itoa(d.Frequency)},
		"k1":        {d.K1}, "k2": {d.K2}, "attributes": {string(a)},
		"mac": {d.Mac}, "visibility": {"private"},
	}
	for k, v := range map[string]string{"subnature": d.Subnature, "static_attributes": d.StaticAttributes,
		"hlt": d.HLT, "wktGeometry": d.WKTGeometry, "publickey": d.PublicKey} {
		if v != "" {
			f.Set(k, v)
		}
	}
	switch {
	case d.EdgeType != "":
		f.Set("edgegateway_type", d.EdgeType)
		f.Set("edgegateway_uri", d.EdgeURIRaw)
	case d.Gateway != "":
		f.Set("edgegateway_type", EdgeGatewayType)
		f.Set("edgegateway_uri", d.EdgeURI())
	}
	return f
}

// Update changes a device the account owns. Stock update needs the whole
// device (device.php action=update: id, type, contextbroker, gb_old_cb,
// kind, format, model, producer, latitude, longitude, k1, k2, frequency)
// and writes each column it is sent, so Update reads the device first
// (get_all_device, get_device_attributes), lets change edit that, and sends
// it all back: what change does not touch is kept. Attributes change
// leaves in place are sent with old_value_name; new ones as newattributes;
// removed ones as deleteattributes.
func (c *Directory) Update(ctx context.Context, id, broker string, change func(*DeviceSpec) error) (Result, error) {
	cur, err := c.Get(ctx, id, broker)
	if err != nil {
		return Result{}, err
	}
	if cur.K1 == "" || cur.K2 == "" {
		return Result{}, fmt.Errorf("update of device %s: the directory shows no keys for it: only its owner can update it (visibility %s)", id, cur.Visibility)
	}
	attrs, err := c.Attributes(ctx, id, broker)
	if err != nil {
		return Result{}, err
	}
	spec := cur.Spec()
	spec.Attributes = attrs
	old := map[string]DeviceAttr{}
	for _, a := range attrs {
		old[a.Name] = a
	}
	if change != nil {
		if err := change(&spec); err != nil {
			return Result{}, fmt.Errorf("update of device %s: %w: %w", id, ErrInvalidDevice, err)
		}
	}
	if spec.ID != id || spec.ContextBroker != broker {
		return Result{}, fmt.Errorf("update of device %s: %w: the id and broker cannot change", id, ErrInvalidDevice)
	}
	if err := spec.Validate(); err != nil {
		return Result{}, fmt.Errorf("update of device %s: %w: %w", id, ErrInvalidDevice, err)
	}
	var kept, added, removed []DeviceAttr
	now := map[string]bool{}
	for _, a := range spec.Attributes {
		now[a.Name] = true
		if _, ok := old[a.Name]; ok {
			a.OldName = a.Name
			kept = append(kept, a)
		} else {
			a.OldName = ""
			added = append(added, a)
		}
	}
	for _, a := range attrs {
		if !now[a.Name] {
			removed = append(removed, DeviceAttr{Name: a.Name})
		}
	}
	f := c.deviceForm("update", spec, kept)
	f.Set("gb_old_cb", broker)
	if len(added) > 0 {
		b, _ := json.Marshal(added)
		f.Set("newattributes", string(b))
	}
	if len(removed) > 0 {
		b, _ := json.Marshal(removed)
		f.Set("deleteattributes", string(b))
	}
	var out struct {
		Nudged bool `json:"nudged"`
	}
	res, err := c.call(ctx, "update of device "+id, f, &out, spec.K1, spec.K2)
	res.Nudged = out.Nudged
	return res, err
}

// UpdatePublicKey registers a new public key (a JWK) for a device, as key
// rotation does: a whole-device update (see Update) that also carries
// publickey, which only the edgegate companion reads.
func (c *Directory) UpdatePublicKey(ctx context.Context, id, contextBroker, publicKey string) (Result, error) {
	return c.Update(ctx, id, contextBroker, func(d *DeviceSpec) error {
		d.PublicKey = publicKey
		return nil
	})
}

// Delete removes a device: its entity and its ownership row (device.php
// action=delete needs id and contextbroker).
func (c *Directory) Delete(ctx context.Context, id, contextBroker string) (Result, error) {
	if err := ValidateDeviceID(id); err != nil {
		return Result{}, fmt.Errorf("%w: %w", ErrInvalidDevice, err)
	}
	return c.call(ctx, "delete of device "+id, url.Values{"action": {"delete"}, "id": {id}, "contextbroker": {contextBroker}}, nil)
}

// phpString reads a JSON string or number (mysqli hands every column to
// json_encode as a string; a number or null is accepted too).
type phpString string

func (s *phpString) UnmarshalJSON(b []byte) error {
	if bytes.Equal(b, []byte("null")) {
		*s = ""
		return nil
	}
	var str string
	if err := json.Unmarshal(b, &str); err == nil {
		*s = phpString(str)
		return nil
	}
	var n json.Number
	if err := json.Unmarshal(b, &n); err != nil {
		return fmt.Errorf("want a string or a number: %s", clip(string(b)))
	}
	*s = phpString(n.String())
	return nil
}

// ListedDevice is a row of get_all_device (device.php action=get_all_device,
// the $rec fields). K1/K2 are filled only for the account's own devices
// (and delegated ones whose delegation carries them); callers never print
// them.
type ListedDevice struct {
	ID              string `json:"id"`
	Type            string `json:"devicetype"`
	ContextBroker   string `json:"contextBroker"`
	Organization    string `json:"organization"`
	Kind            string `json:"kind"`
	Model           string `json:"model"`
	Producer        string `json:"producer"`
	Format          string `json:"format"`
	Latitude        string `json:"latitude"`
	Longitude       string `json:"longitude"`
	Frequency       string `json:"frequency"`
	Mac             string `json:"macaddress"`
	Subnature       string `json:"subnature"`
	StaticAttrs     string `json:"staticAttributes"`
	HLT             string `json:"hlt"`
	WKTGeometry     string `json:"wktGeometry"`
	EdgegatewayType string `json:"edgegateway_type"`
	EdgegatewayURI  string `json:"edgegateway_uri"`
	// Visibility is MyOwnPrivate, MyOwnPublic (owned), delegated, public
	// or the row's own visibility.
	Visibility     string `json:"visibility"`
	DelegationKind string `json:"delegationKind"`
	K1             string `json:"-"`
	K2             string `json:"-"`
}

// Owned says the account owns the device (device.php marks its own rows
// MyOwnPrivate or MyOwnPublic).
func (d ListedDevice) Owned() bool { return strings.HasPrefix(d.Visibility, "MyOwn") }

// String leaves the keys out.
func (d ListedDevice) String() string {
	return fmt.Sprintf("device %s (type %s, broker %s, %s)", d.ID, d.Type, d.ContextBroker, d.Visibility)
}

// GoString keeps %#v from printing keys.
func (d ListedDevice) GoString() string { return d.String() }

// Spec is the row as a DeviceSpec (attributes not included: see Attributes).
func (d ListedDevice) Spec() DeviceSpec {
	lat, _ := strconv.ParseFloat(d.Latitude, 64)
	lon, _ := strconv.ParseFloat(d.Longitude, 64)
	freq, _ := strconv.Atoi(d.Frequency)
	s := DeviceSpec{ID: d.ID, Type: d.Type, ContextBroker: d.ContextBroker, Kind: d.Kind, Format: d.Format,
		Model: d.Model, Producer: d.Producer, Latitude: lat, Longitude: lon, Frequency: freq, K1: d.K1, K2: d.K2,
		Mac: d.Mac, Subnature: d.Subnature, StaticAttributes: d.StaticAttrs, HLT: d.HLT, WKTGeometry: d.WKTGeometry,
		RadioNode: -1, RadioChild: -1}
	if d.EdgegatewayType != "" {
		s.EdgeType, s.EdgeURIRaw = d.EdgegatewayType, d.EdgegatewayURI
	}
	return s
}

type listedRow struct {
	ID              phpString `json:"id"`
	Type            phpString `json:"devicetype"`
	ContextBroker   phpString `json:"contextBroker"`
	Organization    phpString `json:"organization"`
	Kind            phpString `json:"kind"`
	Model           phpString `json:"model"`
	Producer        phpString `json:"producer"`
	Format          phpString `json:"format"`
	Latitude        phpString `json:"latitude"`
	Longitude       phpString `json:"longitude"`
	Frequency       phpString `json:"frequency"`
	Mac             phpString `json:"macaddress"`
	Subnature       phpString `json:"subnature"`
	StaticAttrs     phpString `json:"staticAttributes"`
	HLT             phpString `json:"hlt"`
	WKTGeometry     phpString `json:"wktGeometry"`
	EdgegatewayType phpString `json:"edgegateway_type"`
	EdgegatewayURI  phpString `json:"edgegateway_uri"`
	Visibility      phpString `json:"visibility"`
	DelegationKind  phpString `json:"delegationKind"`
	K1              phpString `json:"k1"`
	K2              phpString `json:"k2"`
}

// List returns the devices the account sees: its own and those delegated
// to it (device.php get_all_device answers DataTables JSON, format_result
// in common.php: the rows under "data").
func (c *Directory) List(ctx context.Context) ([]ListedDevice, error) {
	var out struct {
		Data []listedRow `json:"data"`
	}
	if _, err := c.call(ctx, "device list", url.Values{"action": {"get_all_device"}}, &out); err != nil {
		return nil, err
	}
	devs := make([]ListedDevice, 0, len(out.Data))
	for _, r := range out.Data {
		devs = append(devs, ListedDevice{ID: string(r.ID), Type: string(r.Type), ContextBroker: string(r.ContextBroker),
			Organization: string(r.Organization), Kind: string(r.Kind), Model: string(r.Model), Producer: string(r.Producer),
			Format: string(r.Format), Latitude: string(r.Latitude), Longitude: string(r.Longitude), Frequency: string(r.Frequency),
			Mac: string(r.Mac), Subnature: string(r.Subnature), StaticAttrs: string(r.StaticAttrs), HLT: string(r.HLT),
			WKTGeometry: string(r.WKTGeometry), EdgegatewayType: string(r.EdgegatewayType), EdgegatewayURI: string(r.EdgegatewayURI),
			Visibility: string(r.Visibility), DelegationKind: string(r.DelegationKind), K1: string(r.K1), K2: string(r.K2)})
	}
	return devs, nil
}

// ErrNoSuchDevice: the directory does not list the device for the account.
var ErrNoSuchDevice = errors.New("no such device in the IoT directory for this account")

// Get is one device of List.
func (c *Directory) Get(ctx context.Context, id, broker string) (ListedDevice, error) {
	devs, err := c.List(ctx)
	if err != nil {
		return ListedDevice{}, err
	}
	for _, d := range devs {
		if d.ID == id && d.ContextBroker == broker {
			return d, nil
		}
	}
	return ListedDevice{}, fmt.Errorf("device %s at broker %s: %w", id, broker, ErrNoSuchDevice)
}

// Attributes reads a device's model (device.php action=get_device_attributes:
// the event_values rows under "content").
func (c *Directory) Attributes(ctx context.Context, id, broker string) ([]DeviceAttr, error) {
	var out struct {
		Content []struct {
			Name        phpString `json:"value_name"`
			DataType    phpString `json:"data_type"`
			Type        phpString `json:"value_type"`
			Editable    phpString `json:"editable"`
			Unit        phpString `json:"value_unit"`
			Criteria    phpString `json:"healthiness_criteria"`
			HealthValue phpString `json:"healthiness_value"`
		} `json:"content"`
	}
	if _, err := c.call(ctx, "attributes of device "+id, url.Values{"action": {"get_device_attributes"}, "id": {id}, "contextbroker": {broker}}, &out); err != nil {
		return nil, err
	}
	attrs := make([]DeviceAttr, 0, len(out.Content))
	for _, a := range out.Content {
		attrs = append(attrs, DeviceAttr{Name: string(a.Name), DataType: string(a.DataType), Type: string(a.Type),
			Editable: string(a.Editable), Unit: string(a.Unit), HealthinessCriteria: string(a.Criteria), HealthinessValue: string(a.HealthValue)})
	}
	return attrs, nil
}

// OwnershipRow looks for the account's ownership row of a device: GET
// {ownership}/ownership-api/v1/list/?type=IOTID&onlyMine=true (Ownership-API
// v1/list/index.php; rows where deleted IS NULL), matched on the element id
// suffix :broker:id, since the organization prefix is the directory's
// (common.php insert_device: $organization:$contextbroker:$id).
func (c *Directory) OwnershipRow(ctx context.Context, broker, id string) (elementID string, found bool, err error) {
	tok, err := c.Token(ctx)
	if err != nil {
		return "", false, err
	}
	u := strings.TrimRight(c.OwnershipURL, "/") + "/ownership-api/v1/list/?type=IOTID&onlyMine=true"
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return "", false, err
	}
	req.Header.Set("Authorization", "Bearer "+tok)
	req.Header.Set("Accept", "application/json")
	resp, err := httpClient(c.HTTPClient).Do(req)
	if err != nil {
		return "", false, fmt.Errorf("ownership list at %s: %w", redactURL(u), unwrapURL(err))
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return "", false, fmt.Errorf("ownership list: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return "", false, fmt.Errorf("ownership list: HTTP %d: %s", resp.StatusCode, redactSecrets(apiMessage(b), tok))
	}
	var rows []struct {
		ElementID string `json:"elementId"`
	}
	if err := json.Unmarshal(b, &rows); err != nil {
		return "", false, fmt.Errorf("ownership list: not a JSON list: %w", err)
	}
	suffix := ":" + broker + ":" + id
	for _, r := range rows {
		if strings.HasSuffix(r.ElementID, suffix) && strings.Count(r.ElementID, ":") == 2 {
			return r.ElementID, true, nil
		}
	}
	return "", false, nil
}

// redactSecrets removes secrets a remote message might echo back.
func redactSecrets(s string, secrets ...string) string {
	for _, sec := range secrets {
		if len(sec) >= 4 {
			s = strings.ReplaceAll(s, sec, "[redacted]")
		}
	}
	return s
}

// call POSTs the form (parameters in the body, so that K1/K2 and the token
// never sit in a URL that proxies log) with nodered=yes and the access
// token both as the token parameter and as the Bearer header: without
// nodered device.php takes the token for a refresh token of its own
// Keycloak client and fails with "Access Token not present" (device.php,
// the $_REQUEST['nodered'] branch). secrets are scrubbed from any message.
func (c *Directory) call(ctx context.Context, what string, form url.Values, v any, secrets ...string) (Result, error) {
	tok, err := c.Token(ctx)
	if err != nil {
		return Result{}, fmt.Errorf("%s: %w", what, err)
	}
	form.Set("nodered", "yes")
	form.Set("token", tok)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.URL, strings.NewReader(form.Encode()))
	if err != nil {
		return Result{}, fmt.Errorf("%s: %w", what, err)
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("Accept", "application/json")
	req.Header.Set("Authorization", "Bearer "+tok)
	resp, err := httpClient(c.HTTPClient).Do(req)
	if err != nil {
		return Result{}, fmt.Errorf("%s at %s: %w", what, redactURL(c.URL), unwrapURL(err))
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return Result{}, fmt.Errorf("%s: %w", what, err)
	}
	secrets = append(secrets, tok)
	var st struct {
		Status   string `json:"status"`
		Msg      any    `json:"msg"`
		ErrorMsg any    `json:"error_msg"`
	}
	jerr := json.Unmarshal(b, &st)
	msg, emsg := textOf(st.Msg), textOf(st.ErrorMsg)
	if resp.StatusCode/100 != 2 || jerr != nil || st.Status != "ok" {
		text := apiMessage(b)
		if jerr == nil && (msg != "" || emsg != "") {
			// Stock sets status "ko", or leaves it empty with an
			// error_msg (device.php insert: "forbidden character
			// detected"): both are refusals.
			text = strings.TrimSpace(strings.Trim(msg+": "+emsg, ": "))
		}
		return Result{}, &DirectoryError{Action: what, Status: resp.StatusCode, Msg: clip(redactSecrets(text, secrets...))}
	}
	var res Result
	if emsg != "" {
		res.Warning = clip(redactSecrets(emsg, secrets...))
	}
	if v != nil {
		if err := json.Unmarshal(b, v); err != nil {
			return res, fmt.Errorf("%s: %w", what, err)
		}
	}
	return res, nil
}

// textOf is a msg or error_msg field as text (stock sends strings; a
// DataTables answer may carry other JSON).
func textOf(v any) string {
	switch t := v.(type) {
	case nil:
		return ""
	case string:
		return strings.TrimSpace(t)
	default:
		b, _ := json.Marshal(t)
		return string(b)
	}
}
