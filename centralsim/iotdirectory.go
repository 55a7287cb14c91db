package centralsim

import (
	"encoding/json"
	"net/http"
	"net/url"
	"regexp"
	"strconv"
	"strings"

	"github.com/edgegate/edgegate/policy"
)

// The IoT Directory's device API, as `edgegate device` uses it:
//
//	GET|POST /iot-directory/api/device.php?action=insert&id=..&type=..&contextbroker=..&kind=..
//	         &format=..&model=..&producer=..&latitude=..&longitude=..&k1=..&k2=..&frequency=..
//	         &attributes=[{"value_name":..,"data_type":..,"value_type":..},..]
//	         [&edgegateway_type=edgegate&edgegateway_uri=edgegate://GW/radio?port=..&node=..&child=..]
//	GET|POST ...?action=delete&id=..&contextbroker=..
//	GET|POST ...?action=get_all_device
//
// Authorization: Bearer (the real API also takes the token as a
// parameter; a token in a URL ends up in logs, so this one does not).
// Like the real one it answers HTTP 200 with {"status":"ko","msg":..,
// "error_msg":..} for most failures: clients must read the status.
//
// A device inserted with edgegateway_type "edgegate" is bound to that
// gateway and its local source; it joins the owner's next policy bundle,
// and the gateway is nudged over the push broker when there is one.

// EdgeGatewayType is the edgegateway_type of edgegate gateways.
const EdgeGatewayType = "edgegate"

var deviceIDRE = regexp.MustCompile(`^[A-Za-z0-9._-]{1,256}$`)

type directoryAttr struct {
	ValueName string `json:"value_name"`
	DataType  string `json:"data_type"`
	ValueType string `json:"value_type"`
}

// DirectoryDevice is a row of action=get_all_device (keys left out).
type DirectoryDevice struct {
	ID              string   `json:"id"`
	DeviceType      string   `json:"devicetype"`
	ContextBroker   string   `json:"contextBroker"`
	Owner           string   `json:"username"`
	EdgegatewayType string   `json:"edgegateway_type"`
	EdgegatewayURI  string   `json:"edgegateway_uri"`
	Attributes      []string `json:"attributes"`
	Signing         string   `json:"signing,omitempty"`   // edgegate: who signs
	PublicKey       string   `json:"publickey,omitempty"` // the newest public key (JWK)
}

func directoryKO(w http.ResponseWriter, msg, detail string) {
	writeJSON(w, http.StatusOK, map[string]any{"status": "ko", "msg": msg, "error_msg": detail})
}

func (s *Server) handleIoTDirectory(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodPost {
		w.Header().Set("Allow", "GET, POST")
		w.WriteHeader(http.StatusMethodNotAllowed)
		return
	}
	user, _, ok := s.tokenUser(w, r)
	if !ok {
		return
	}
	r.Body = http.MaxBytesReader(w, r.Body, maxFormBytes)
	if err := r.ParseForm(); err != nil {
		directoryKO(w, "Bad request", "malformed form body")
		return
	}
	f := r.Form
	switch f.Get("action") {
	case "insert":
		s.directoryInsert(w, user, f)
	case "update":
		s.directoryUpdate(w, user, f)
	case "delete":
		s.directoryDelete(w, user, f)
	case "get_all_device":
		s.directoryList(w, user)
	case "get_device_attributes":
		s.directoryAttributes(w, user, f)
	default:
		directoryKO(w, "Unknown action", "action must be insert, update, delete or get_all_device")
	}
}

func (s *Server) directoryInsert(w http.ResponseWriter, user string, f url.Values) {
	var missing []string
	for _, p := range []string{"id", "type", "contextbroker", "kind", "format", "model", "producer",
		"latitude", "longitude", "k1", "k2", "frequency", "attributes"} {
		if f.Get(p) == "" {
			missing = append(missing, p)
		}
	}
	if len(missing) > 0 {
		directoryKO(w, "Missing Parameters", "Problem in insert device (Missing parameters: "+strings.Join(missing, ", ")+" )")
		return
	}
	id, typ, cb := f.Get("id"), f.Get("type"), f.Get("contextbroker")
	if cb != s.opts.BrokerName {
		directoryKO(w, "Unrecognized contextbroker/protocol", "Problem in insert device (Unrecognized contextbroker/protocol)")
		return
	}
	if !deviceIDRE.MatchString(id) || !deviceIDRE.MatchString(typ) {
		directoryKO(w, "Invalid id or type", "Problem in insert device (id and type must match "+deviceIDRE.String()+")")
		return
	}
	for _, p := range []string{"latitude", "longitude", "frequency"} {
		if _, err := strconv.ParseFloat(f.Get(p), 64); err != nil {
			directoryKO(w, "Invalid "+p, "Problem in insert device ("+p+" must be a number)")
			return
		}
	}
	k1, k2 := f.Get("k1"), f.Get("k2")
	if k1 == k2 {
		directoryKO(w, "Invalid keys", "Problem in insert device (k1 and k2 must differ)")
		return
	}
	var attrs []directoryAttr
	if err := json.Unmarshal([]byte(f.Get("attributes")), &attrs); err != nil {
		directoryKO(w, "Invalid attributes", "Problem in insert device (attributes must be a JSON array)")
		return
	}
	pubs, err := parsePublicKeyParam(f.Get("publickey"))
	if err != nil {
		directoryKO(w, "Invalid publickey", "Problem in insert device (publickey: "+err.Error()+")")
		return
	}
	d := Device{ID: id, Type: typ, Owner: user, K1: k1, K2: k2, PublicKeys: pubs}
	for _, a := range attrs {
		d.Attrs = append(d.Attrs, a.ValueName)
	}
	var gw string
	if f.Get("edgegateway_type") == EdgeGatewayType {
		var err error
		gw, d.Radio, d.Signing, err = parseEdgeURI(f.Get("edgegateway_uri"))
		if err != nil {
			directoryKO(w, "Invalid edgegateway_uri", "Problem in insert device ("+err.Error()+")")
			return
		}
	}
	if err := validDevice(d); err != nil {
		directoryKO(w, "Invalid device", "Problem in insert device ("+err.Error()+")")
		return
	}
	s.mu.Lock()
	if _, dup := s.devices[id]; dup {
		s.mu.Unlock()
		directoryKO(w, "Device already exists", "Problem in insert device (id "+id+" already registered on "+cb+")")
		return
	}
	s.addDeviceLocked(d)
	s.mu.Unlock()
	s.log.Info("device inserted", "device", id, "owner", user, "gateway", gw)
	nudged := false
	if gw != "" && s.push != nil {
		nudged = s.Push(gw, false) == nil
	}
	writeJSON(w, http.StatusOK, map[string]any{"status": "ok", "msg": "Device inserted", "nudged": nudged})
}

func (s *Server) directoryDelete(w http.ResponseWriter, user string, f url.Values) {
	id := f.Get("id")
	if id == "" || f.Get("contextbroker") == "" {
		directoryKO(w, "Missing Parameters", "Problem in delete device (Missing parameters: id, contextbroker)")
		return
	}
	if !s.directoryOwned(w, user, id, f.Get("contextbroker"), "delete") {
		return
	}
	s.RemoveDevice(id)
	writeJSON(w, http.StatusOK, map[string]any{"status": "ok", "msg": "Device deleted"})
}

// directoryOwned checks that id is a device of user on this broker; when it
// is not, it has answered as the directory does to op (delete, update).
func (s *Server) directoryOwned(w http.ResponseWriter, user, id, contextBroker, op string) bool {
	s.mu.Lock()
	d, ok := s.devices[id]
	s.mu.Unlock()
	if !ok || contextBroker != s.opts.BrokerName {
		directoryKO(w, "Unrecognized device", "Problem in "+op+" device (Unrecognized device)")
		return false
	}
	if d.Owner != user {
		directoryKO(w, "Not ownership or enough right to "+op, "Problem in "+op+" device ()")
		return false
	}
	return true
}

func (s *Server) directoryList(w http.ResponseWriter, user string) {
	s.mu.Lock()
	out := []DirectoryDevice{}
	for _, id := range sortedKeys(s.devices) {
		d := s.devices[id]
		if d.Owner != user {
			continue
		}
		row := DirectoryDevice{ID: d.ID, DeviceType: d.Type, ContextBroker: s.opts.BrokerName, Owner: d.Owner,
			Attributes: append([]string{}, d.Attrs...), Signing: d.Signing}
		if len(d.PublicKeys) > 0 {
			row.PublicKey = string(d.PublicKeys[0])
		}
		if d.Radio != nil {
			row.EdgegatewayType = EdgeGatewayType
			row.EdgegatewayURI = "radio?" + url.Values{"port": {d.Radio.Port}, "node": {strconv.Itoa(d.Radio.Node)},
				"child": {strconv.Itoa(d.Radio.Child)}}.Encode()
		}
		out = append(out, row)
	}
	// Stock answers DataTables JSON with the rows under "data" (iot-directory
	// device.php get_all_device, common.php format_result), k1/k2 on the
	// owner's rows, visibility MyOwnPrivate. Bridge for the device-reg
	// branch: the columns the sim does not keep get fixed values.
	data := make([]map[string]any, 0, len(out))
	for _, row := range out {
		d := s.devices[row.ID]
		data = append(data, map[string]any{"id": row.ID, "devicetype": row.DeviceType, "contextBroker": row.ContextBroker,
			"kind": "sensor", "model": "custom", "producer": "edgegate", "format": "json", "latitude": "0", "longitude": "0",
			"frequency": "600", "visibility": "MyOwnPrivate", "k1": d.K1, "k2": d.K2,
			"edgegateway_type": row.EdgegatewayType, "edgegateway_uri": row.EdgegatewayURI})
	}
	s.mu.Unlock()
	w.Header().Set("Cache-Control", "no-store")
	writeJSON(w, http.StatusOK, map[string]any{"status": "ok", "content": out, "data": data})
}

// directoryAttributes is action=get_device_attributes (device.php: the
// event_values rows under "content"). Bridge for the device-reg branch:
// the sim keeps attribute names only.
func (s *Server) directoryAttributes(w http.ResponseWriter, user string, f url.Values) {
	id := f.Get("id")
	if id == "" || f.Get("contextbroker") == "" {
		directoryKO(w, "Missing Parameters", "Problem getting all the device attr information (Missing parameters: id, contextbroker )")
		return
	}
	if !s.directoryOwned(w, user, id, f.Get("contextbroker"), "get_device_attributes") {
		return
	}
	s.mu.Lock()
	var attrs []map[string]any
	for _, a := range s.devices[id].Attrs {
		attrs = append(attrs, map[string]any{"value_name": a, "data_type": "float", "value_type": a, "editable": "0",
			"value_unit": "-", "healthiness_criteria": "refresh_rate", "healthiness_value": "1200"})
	}
	s.mu.Unlock()
	writeJSON(w, http.StatusOK, map[string]any{"status": "ok", "content": attrs})
}

// parseEdgeURI reads edgegate://GW/radio?port=P&node=N&child=C or
// edgegate://GW/mqtt. Absent node or child: any (-1). The "signing"
// parameter (edgegate://GW/mqtt?signing=device) says who signs the
// device's readings.
func parseEdgeURI(raw string) (gw string, rb *policy.RadioBinding, signing string, err error) {
	u, err := url.Parse(raw)
	if err != nil || u.Scheme != "edgegate" || !gatewayIDRE.MatchString(u.Host) {
		return "", nil, "", errString("edgegateway_uri must be edgegate://GATEWAY/radio?... or edgegate://GATEWAY/mqtt")
	}
	q := u.Query()
	switch u.Path {
	case "/mqtt":
		return u.Host, nil, q.Get("signing"), nil
	case "/radio":
	default:
		return "", nil, "", errString("edgegateway_uri path must be /radio or /mqtt")
	}
	rb = &policy.RadioBinding{Port: q.Get("port"), Node: -1, Child: -1}
	for name, p := range map[string]*int{"node": &rb.Node, "child": &rb.Child} {
		if v := q.Get(name); v != "" {
			n, err := strconv.Atoi(v)
			if err != nil {
				return "", nil, "", errString("edgegateway_uri " + name + " must be a number")
			}
			*p = n
		}
	}
	return u.Host, rb, q.Get("signing"), nil
}

type errString string

func (e errString) Error() string { return string(e) }

// directoryUpdate is action=update as key rotation uses it: id,
// contextbroker and a new publickey, which goes in front of the device's
// keys (the old ones stay, for older readings). The real directory's
// update takes the whole device; only the key is changed here.
func (s *Server) directoryUpdate(w http.ResponseWriter, user string, f url.Values) {
	id := f.Get("id")
	if id == "" || f.Get("contextbroker") == "" || f.Get("publickey") == "" {
		directoryKO(w, "Missing Parameters", "Problem in update device (Missing parameters: id, contextbroker, publickey)")
		return
	}
	pubs, err := parsePublicKeyParam(f.Get("publickey"))
	if err != nil || len(pubs) != 1 {
		directoryKO(w, "Invalid publickey", "Problem in update device (publickey must be one public key)")
		return
	}
	if !s.directoryOwned(w, user, id, f.Get("contextbroker"), "update") {
		return
	}
	if err := s.RotateDeviceKey(id, pubs[0]); err != nil {
		directoryKO(w, "Invalid device", "Problem in update device ("+err.Error()+")")
		return
	}
	s.log.Info("device key rotated", "device", id, "owner", user)
	// The directory does not keep which gateway serves a device: nudge
	// every gateway bound to an account, by Options.Gateways or on first
	// use (Options.Gateways alone misses the latter).
	nudged := false
	if s.push != nil {
		s.mu.Lock()
		var gws []string
		for _, gw := range sortedKeys(s.ps.gateways) {
			if s.ps.gateways[gw].client != "" {
				gws = append(gws, gw)
			}
		}
		s.mu.Unlock()
		for _, gw := range gws {
			nudged = s.Push(gw, false) == nil || nudged
		}
	}
	writeJSON(w, http.StatusOK, map[string]any{"status": "ok", "msg": "Device updated", "nudged": nudged})
}
