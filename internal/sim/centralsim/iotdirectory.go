package centralsim

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/edgegate/edgegate/policy"
)

// The IoT Directory's device API (disit/iot-directory web/api/device.php
// and web/api/common.php), as Snap4City's own clients call it:
//
//	GET|POST /iot-directory/api/device.php?action=insert&nodered=yes&token=AT&id=..&type=..&contextbroker=..
//	         &kind=sensor|actuator&format=..&model=..&producer=..&latitude=..&longitude=..&k1=..&k2=..
//	         &frequency=..&attributes=[{"value_name":..,"data_type":..,"value_type":..,"value_unit":..,
//	         "healthiness_criteria":"refresh_rate","healthiness_value":"300"},..]
//	         [&edgegateway_type=..&edgegateway_uri=..]
//	...?action=update (the whole device + gb_old_cb), action=delete&id=..&contextbroker=..,
//	...?action=get_all_device (DataTables JSON, the list under "data")
//
// Every answer is HTTP 200 with a JSON body {"status":"ok"|"ko","msg",
// "error_msg",...}: clients must read the status and error_msg.
// "Authorization: Bearer X" becomes the token parameter. Without nodered
// the token is a refresh token of the directory's own Keycloak client
// (DirectoryClientID), so an access token fails with "Access Token not
// present". With Options.Companion, a device inserted with
// edgegateway_type "edgegate" and edgegateway_uri
// edgegate://GW/radio?port=..&node=..&child=.. (or /mqtt) is bound to that
// gateway in the companion's bundles; stock keeps both as opaque details.

// EdgeGatewayType is the edgegateway_type of edgegate gateways.
const EdgeGatewayType = "edgegate"

// DirectoryClientID is the Keycloak client of the IoT Directory itself
// ($clientId in its config.php): the only client whose refresh tokens
// device.php accepts without nodered.
const DirectoryClientID = "php-iot-directory"

// regphp is the IoT Directory's $regphp (web/config.php): any other
// character in an id, broker, model or attribute name is refused.
var regphp = regexp.MustCompile(`[^a-zA-Z0-9:._-]`)

// directoryAttr is an element of the attributes parameter.
type directoryAttr struct {
	ValueName           string          `json:"value_name"`
	DataType            string          `json:"data_type"`
	ValueType           string          `json:"value_type"`
	ValueUnit           string          `json:"value_unit"`
	HealthinessCriteria string          `json:"healthiness_criteria"`
	HealthinessValue    json.RawMessage `json:"healthiness_value"`
	Editable            json.RawMessage `json:"editable,omitempty"`
}

// dirDevice is the directory's devices row beyond Device.
type dirDevice struct {
	kind, format, model, producer string
	lat, lon, frequency           string
	edgeType, edgeURI             string
	organization                  string
	attrs                         []directoryAttr
	created                       time.Time
}

// DirectoryDevice is a row of action=get_all_device (the fields a client
// reads; stock adds more, all strings).
type DirectoryDevice struct {
	ContextBroker   string `json:"contextBroker"`
	ID              string `json:"id"`
	URI             string `json:"uri"`
	DeviceType      string `json:"devicetype"`
	Kind            string `json:"kind"`
	Status1         string `json:"status1"`
	Model           string `json:"model"`
	Producer        string `json:"producer"`
	Longitude       string `json:"longitude"`
	Latitude        string `json:"latitude"`
	Protocol        string `json:"protocol"`
	Format          string `json:"format"`
	Frequency       string `json:"frequency"`
	Created         string `json:"created"`
	Organization    string `json:"organization"`
	Visibility      string `json:"visibility"`
	K1              string `json:"k1"`
	K2              string `json:"k2"`
	EdgegatewayType string `json:"edgegateway_type"`
	EdgegatewayURI  string `json:"edgegateway_uri"`
	DelegationKind  string `json:"delegationKind,omitempty"`
}

// dirResult is device.php's $result; json_encode writes it.
type dirResult map[string]any

func (r dirResult) add(key, text string) { r[key] = fmt.Sprint(r[key]) + text }

func newDirResult() dirResult {
	return dirResult{"status": "", "msg": "", "content": "", "log": "", "error_msg": ""}
}

func (s *Server) handleIoTDirectory(w http.ResponseWriter, r *http.Request) {
	r.Body = http.MaxBytesReader(w, r.Body, maxFormBytes)
	res := newDirResult()
	if err := r.ParseForm(); err != nil {
		res["status"], res["msg"], res["error_msg"] = "ko", "action not present", "malformed form body"
		writeJSON(w, http.StatusOK, res)
		return
	}
	f := r.Form
	action := f.Get("action")
	if action == "" {
		res["status"], res["msg"], res["error_msg"], res["log"] = "ko", "action not present", "action not present", "device.php action not present"
		writeJSON(w, http.StatusOK, res)
		return
	}
	if h := r.Header.Get("Authorization"); len(h) > 8 {
		f.Set("token", h[7:])
	}
	accessToken := ""
	if _, nodered := f["nodered"]; nodered {
		if t := f.Get("token"); t != "undefined" {
			accessToken = t
		}
	} else if t := f.Get("token"); t != "" {
		// $oidc->refreshToken($_REQUEST['token']): the directory's own
		// client refreshes; anything else yields no access token.
		accessToken = s.directoryRefresh(t)
	}
	if accessToken == "" {
		res["status"], res["msg"], res["error_msg"], res["log"] = "ko", "Access Token not present", "Access Token not present", "model.php AccessToken not present\r\n"
		writeJSON(w, http.StatusOK, res)
		return
	}
	user, err := s.directoryUser(r.Context(), accessToken)
	if err != nil {
		res["status"], res["msg"] = "ko", "Cannot retrieve user information"
		res["error_msg"] = err.Error() + "Problem in insert context broker (Cannot retrieve user information)"
		res["log"] = "action=insert - error Cannot retrieve user information\r\n"
		writeJSON(w, http.StatusOK, res)
		return
	}
	res["status"] = "ok" // get_user_info
	org := s.userOrg(user)
	role := s.directoryRole(user)

	// device.php's scan of every parameter for "strange characters".
	for key, vs := range f {
		v := vs[0]
		switch key {
		case "id", "device", "cb", "contextbroker", "model", "value_name":
			if key == "model" {
				v = strings.ReplaceAll(v, " ", "")
			}
			if key == "id" || key == "device" {
				v = strings.ReplaceAll(v, ":", "")
			}
			if regphp.MatchString(v) {
				res["status"], res["error_msg"], action = "ko", "strange characters are not allowed", ""
			}
		case "attributes", "newattributes", "deleteattributes":
			var list []directoryAttr
			_ = json.Unmarshal([]byte(v), &list) // json_decode: garbage is an empty list
			for _, a := range list {
				if regphp.MatchString(a.ValueName) {
					res["status"], res["error_msg"], action = "ko", "strange characters are not allowed", ""
				}
			}
		}
	}
	switch action {
	case "insert":
		s.directoryInsert(res, user, org, f)
	case "update":
		s.directoryUpdate(res, user, role, f)
	case "delete":
		s.directoryDelete(res, user, role, f)
	case "get_all_device":
		w.Header().Set("Cache-Control", "no-store") // rows hold K1/K2
		writeJSON(w, http.StatusOK, s.directoryList(user, role, org))
		return
	case "get_device_attributes":
		s.directoryAttributes(res, user, role, f)
	default:
		res["status"], res["msg"], res["log"] = "ko", "invalid action "+action, "invalid action "+action
	}
	writeJSON(w, http.StatusOK, res)
}

// directoryRefresh is the refresh_token grant of DirectoryClientID; ""
// when t is not one of its refresh tokens.
func (s *Server) directoryRefresh(t string) string {
	g, ok := s.useRefreshToken(t, DirectoryClientID)
	if !ok {
		return ""
	}
	at, err := s.IssueAccessToken(g.user, s.opts.TokenTTL, DirectoryClientID)
	if err != nil {
		return ""
	}
	return at
}

// directoryUser is get_user_info: the token's user, which the provider's
// userinfo must confirm, and an organization in the LDAP. The error text
// is what get_user_info puts in error_msg.
func (s *Server) directoryUser(ctx context.Context, accessToken string) (string, error) {
	// get_user_info asks the provider's userinfo (common.php): a trusted
	// third-party provider's tokens too.
	user, err := s.resolveUser(ctx, accessToken)
	if err != nil {
		b, _ := json.Marshal(keycloakInvalidToken)
		return "", errString("Userinfo not found in AccessToken " + string(b))
	}
	if s.userOrg(user) == "" {
		return "", errString("Organization not found in AccessToken for user " + user)
	}
	return user, nil
}

// directoryRole is get_user_info's role: from the roles claim, Observer
// when none of the known ones.
func (s *Server) directoryRole(user string) string {
	roles := s.userRoles(user)
	for _, r := range []string{RoleRootAdmin, RoleToolAdmin, RoleAreaManager, RoleManager} {
		if slices.Contains(roles, r) {
			return r
		}
	}
	return RoleObserver
}

// missingParams is common.php's missingParameters: names not sent at all
// (an empty value counts as sent).
func missingParams(f url.Values, names ...string) []string {
	var out []string
	for _, n := range names {
		if _, ok := f[n]; !ok {
			out = append(out, n)
		}
	}
	return out
}

// checkSensibleCharacters is common.php's: "/", ":" and "%" in an id.
func checkSensibleCharacters(text string) (bool, string) {
	var log []string
	for _, c := range []string{"/", ":", "%"} {
		if strings.Contains(text, c) {
			log = append(log, "The data contains "+c)
		}
	}
	return len(log) == 0, strings.Join(log, " - ")
}

// healthinessEmpty is PHP's $att->healthiness_value == "": absent, null
// or an empty string.
func healthinessEmpty(v json.RawMessage) bool {
	t := strings.TrimSpace(string(v))
	return t == "" || t == "null" || t == `""`
}

// directoryInsert is action=insert: device.php, then insert_device,
// canBeRegistered, checkRegisterOwnerShipObject, insert_ngsi and
// registerOwnerShipDevice (common.php).
func (s *Server) directoryInsert(res dirResult, user, org string, f url.Values) {
	if ok, why := checkSensibleCharacters(f.Get("id")); !ok {
		// Stock leaves status as get_user_info set it ("ok").
		res["msg"], res["error_msg"], res["log"] = "error inserting device", "forbidden character detected ( "+why+" )", "forbidden character detected ( "+why+" )"
		return
	}
	if res.missingParams(f, "Problem in insert device", "id", "type", "contextbroker", "kind", "format", "model", "producer",
		"latitude", "longitude", "k1", "k2", "frequency", "attributes") {
		return
	}
	id, typ, cb, kind := f.Get("id"), f.Get("type"), f.Get("contextbroker"), f.Get("kind")
	if !s.knownBroker(res, cb, "Problem in insert device") {
		return
	}
	k1, k2 := f.Get("k1"), f.Get("k2")
	if k1 == "" {
		k1 = guidv4()
	}
	if k2 == "" {
		k2 = guidv4()
	}
	var attrs []directoryAttr
	_ = json.Unmarshal([]byte(f.Get("attributes")), &attrs)
	// The companion's device keys: publickey registers the device's first
	// public key(s), as update's publickey rotates them. Stock device.php
	// reads only the $_REQUEST keys it names and ignores it.
	var pubs []json.RawMessage
	if p := f.Get("publickey"); p != "" && s.opts.Companion {
		var err error
		if pubs, err = parsePublicKeyParam(p); err != nil {
			res["status"], res["msg"] = "ko", "Invalid publickey"
			res.add("error_msg", "Problem in insert device (publickey: "+err.Error()+")")
			return
		}
	}

	// canBeRegistered.
	bad := false
	miss := func(text string) {
		bad = true
		res.add("error_msg", text)
		res.add("msg", "\n "+strings.TrimSuffix(text, ". "))
	}
	if id == "" {
		miss("id not specified. ")
	}
	if typ == "" {
		miss("type not specified. ")
	}
	if kind != "sensor" && kind != "actuator" {
		miss("kind not specified. ")
	}
	if len(attrs) == 0 {
		miss("at least one attribute must be added. ")
	}
	for _, a := range attrs {
		if a.DataType == "" {
			miss("data type for attribute " + a.ValueName + " not specified. ")
		}
		if a.ValueUnit == "" {
			miss("value unit for attribute " + a.ValueName + " not specified. ")
		}
		if a.ValueType == "" {
			miss("value type for attribute " + a.ValueName + " not specified. ")
		}
		switch a.HealthinessCriteria {
		case "refresh_rate", "different_values", "within_bounds":
		default:
			miss("wrong healthiness_criteria. ")
		}
		if a.HealthinessCriteria == "refresh_rate" && healthinessEmpty(a.HealthinessValue) {
			miss("healthiness_criteria for attribute " + a.ValueName + " not specified. ")
		}
	}
	if org != s.opts.Organization {
		// The broker's organization is not the user's: stock only logs it.
		bad = true
		res.add("log", "No 'organization' named "+org+" found for "+cb+" \n")
	}
	if bad {
		res["status"] = "ko"
		res.add("error_msg", "Missing some device data ")
		res.add("msg", "\n Missing some device data, device not saved")
		return
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	// checkRegisterOwnerShipObject: the caller's IOTID limits first, asked
	// of the Ownership API.
	if s.ps.backendFaults[BackendOwnership] != nil {
		res["status"] = "ko"
		res.add("error_msg", "Error returned in checking the ownership. ")
		res.add("msg", "\n Error returned in checkRegisterOwnership")
		return
	}
	role := s.mainRole(user)
	limit, _ := s.limitFor(user, role, ElementTypeIOTID)
	if s.countLocked(user, ElementTypeIOTID) >= limit {
		res["status"] = "ko"
		res.add("error_msg", "The registration is NOT possible. Reached limit of IOTID")
		res.add("msg", fmt.Sprintf("\n The registration is NOT possible. Reached limit of IOTID (%d)", limit))
		return
	}
	res.add("msg", "\n registration is possible")
	if _, dup := s.devices[id]; dup {
		res["status"] = "ko"
		// insert_device appends generateErrorMessage($link) (web/api/common.php),
		// which turns MySQL's errno 1062 into this text, not MySQL's own.
		const dupMsg = "Duplicate entry: the device id is already in use, please choose a different id"
		res.add("error_msg", "Problem in inserting the device "+id+" in the database. "+dupMsg)
		res.add("msg", "\n Problem in inserting the device "+id+"  in the database. :  <br/>"+dupMsg)
		return
	}
	d := Device{ID: id, Type: typ, Owner: user, K1: k1, K2: k2, PublicKeys: pubs}
	for _, a := range attrs {
		d.Attrs = append(d.Attrs, a.ValueName)
	}
	dd := &dirDevice{kind: kind, format: f.Get("format"), model: f.Get("model"), producer: f.Get("producer"),
		lat: f.Get("latitude"), lon: f.Get("longitude"), frequency: f.Get("frequency"),
		edgeType: f.Get("edgegateway_type"), edgeURI: f.Get("edgegateway_uri"), organization: org,
		attrs: attrs, created: s.now().UTC()}
	var gw string
	if s.opts.Companion && dd.edgeType == EdgeGatewayType {
		if g, rb, signing, err := parseEdgeURI(dd.edgeURI); err == nil {
			gw, d.Radio, d.Signing = g, rb, signing
		}
	}
	s.devices[id] = d
	s.ps.dirDevices[id] = dd
	s.createDeviceEntityLocked(d, dd)
	res.add("msg", "\n Device "+cb+"/"+id+" correctly inserted in db")

	// registerOwnerShipDevice: any refusal still answers ok.
	u := s.deviceURI(id)
	var row ownRow
	var err error
	if f := s.ps.backendFaults[BackendOwnershipRegister]; f != nil {
		err = f // the register call alone failed (e.g. a concurrent insert took the last slot)
	} else {
		row, err = s.registerLocked(user, registration{ElementID: s.ElementID(id), ElementType: ElementTypeIOTID,
			ElementName: id, ElementURL: &u, ElementDetails: s.deviceDetails(d, dd.edgeType, dd.edgeURI)})
	}
	if err != nil {
		s.log.Info("device ownership not registered", "device", id, "owner", user, "err", err)
		res.add("error_msg", "The registration is NOT possible. Reached limit of IoT Devices. ")
		res.add("msg", fmt.Sprintf("\n The registration is NOT possible. Reached limit of IoT Devices (%d)", limit))
	} else {
		res.add("msg", "\n the element id is "+row.elementID+"\n the registration of the ownership succeded "+row.elementID)
	}
	res["status"], res["content"] = "ok", u
	res.add("msg", "\n Inserted the device uri in the database  <br/>")
	res["visibility"], res["active"] = "private", true
	s.log.Info("device inserted", "device", id, "owner", user, "gateway", gw)
	if gw != "" && s.push != nil {
		go s.Push(gw, false) // after the lock: a nudge, best effort
	}
}

// createDeviceEntityLocked creates the device's Orion entity as insert_ngsi
// (web/api/common.php) does: latitude and longitude (type "float", the
// values as sent, strings), each declared attribute with value "" and its
// data_type, and "model" (type "string").
func (s *Server) createDeviceEntityLocked(d Device, dd *dirDevice) {
	str := func(v string) json.RawMessage { b, _ := json.Marshal(v); return b }
	attrs := make(map[string]string, len(dd.attrs))
	for _, a := range dd.attrs {
		attrs[a.ValueName] = a.DataType
	}
	s.createEntityLocked("", d.ID, d.Type, attrs)
	e := s.entities[entKey("", d.ID)]
	e.attrs["latitude"] = ngsiAttr{Type: "float", Value: str(dd.lat)}
	e.attrs["longitude"] = ngsiAttr{Type: "float", Value: str(dd.lon)}
	e.attrs["model"] = ngsiAttr{Type: "string", Value: str(dd.model)}
}

// guidv4 is common.php's guidv4, the K1/K2 made for a device sent without.
func guidv4() string {
	b, _ := randomToken(16)
	h := fmt.Sprintf("%x", []byte(b))
	return h[0:8] + "-" + h[8:12] + "-4" + h[13:16] + "-a" + h[17:20] + "-" + h[20:32]
}

// directoryRights is enforcementRights for 'write': RootAdmin and
// ToolAdmin may do anything; others need ownership, or a MODIFY
// delegation (device.php: $hasModifyDelegation) for update.
func (s *Server) directoryRightsLocked(user, role, id string, modifyOK bool) bool {
	if role == RoleRootAdmin || role == RoleToolAdmin {
		return true
	}
	eid := s.ElementID(id)
	if s.ownerLocked(eid) == user {
		return true
	}
	if !modifyOK {
		return false
	}
	c := s.accessCheckLocked(user, eid, ElementTypeIOTID)
	return c.Result && c.Kind == KindModify
}

// directoryAttributes is action=get_device_attributes (device.php,
// "get_device_attributes"): the device's event_values rows under
// "content", for a user with read rights on the element.
func (s *Server) directoryAttributes(res dirResult, user, role string, f url.Values) {
	if res.missingParams(f, "Problem getting all the device attr information", "id", "contextbroker") {
		return
	}
	id, cb := f.Get("id"), f.Get("contextbroker")
	if !s.knownBroker(res, cb, "Problem in get device attributes") {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	dd, known := s.ps.dirDevices[id]
	if _, dev := s.devices[id]; !known || !dev {
		res["status"], res["msg"] = "ko", "Unrecognized device"
		res.add("error_msg", "Problem in get_device_attribute (Unrecognized device)")
		return
	}
	// enforcementRights(..., 'read'): owner, admins, or any delegation.
	if !s.directoryRightsLocked(user, role, id, true) && !s.accessCheckLocked(user, s.ElementID(id), ElementTypeIOTID).Result {
		res["status"], res["msg"] = "ko", "Not ownership or enough right to update"
		res.add("error_msg", "Problem in get device attributes (Not ownership or enough right to update)")
		return
	}
	attrs := make([]map[string]any, 0, len(dd.attrs))
	for i, a := range dd.attrs {
		hv := string(a.HealthinessValue)
		if u, err := strconv.Unquote(hv); err == nil {
			hv = u
		}
		editable := string(a.Editable)
		if u, err := strconv.Unquote(editable); err == nil {
			editable = u
		}
		attrs = append(attrs, map[string]any{"cb": cb, "device": id, "value_name": a.ValueName, "data_type": a.DataType,
			"value_type": a.ValueType, "editable": editable, "value_unit": a.ValueUnit, "order": strconv.Itoa(i + 1),
			"healthiness_criteria": a.HealthinessCriteria, "healthiness_value": hv, "real_time_flag": "0"})
	}
	res["status"], res["content"] = "ok", attrs
}

// directoryDelete is action=delete: deleteKB (the entity), then
// removeOwnerShipDevice, then the directory's rows.
func (s *Server) directoryDelete(res dirResult, user, role string, f url.Values) {
	if res.missingParams(f, "Problem deleting the device information", "id", "contextbroker") {
		return
	}
	id, cb := f.Get("id"), f.Get("contextbroker")
	if !s.knownBroker(res, cb, "Problem in delete device") {
		return
	}
	s.mu.Lock()
	_, known := s.devices[id]
	allowed := known && s.directoryRightsLocked(user, role, id, false)
	s.mu.Unlock()
	switch {
	case !known:
		res["status"], res["msg"] = "ko", "Unrecognized device"
		res.add("error_msg", "Problem in delete device (Unrecognized device)")
		return
	case !allowed:
		res["status"], res["msg"] = "ko", "Not ownership or enough right to delete"
		res.add("error_msg", "Problem in delete device (Not ownership or enough right to delete)")
		return
	}
	s.RemoveDevice(id) // entity, ownership row (deleted set), directory row
	res["status"] = "ok"
	res.add("msg", "\n the deletion of the ownership succeded")
	s.log.Info("device deleted", "device", id, "by", user)
}

// directoryUpdate is action=update: the whole device again (gb_old_cb
// names the broker it was on). K1/K2 and the model's attributes change;
// attributes (the full list) or newattributes/deleteattributes reshape
// the entity. With Options.Companion, a publickey parameter rotates the
// device's key (the companion's key rotation).
func (s *Server) directoryUpdate(res dirResult, user, role string, f url.Values) {
	if res.missingParams(f, "Problem update the device information", "id", "type", "contextbroker", "gb_old_cb", "kind", "format", "model", "producer",
		"latitude", "longitude", "k1", "k2", "frequency") {
		return
	}
	id, cb := f.Get("id"), f.Get("contextbroker")
	if !s.knownBroker(res, cb, "Problem in update device") {
		return
	}
	var pubs []json.RawMessage
	if p := f.Get("publickey"); p != "" && s.opts.Companion {
		var err error
		if pubs, err = parsePublicKeyParam(p); err != nil || len(pubs) != 1 {
			res["status"], res["msg"] = "ko", "Invalid publickey"
			res.add("error_msg", "Problem in update device (publickey must be one public key)")
			return
		}
	}
	s.mu.Lock()
	d, known := s.devices[id]
	switch {
	case !known:
		s.mu.Unlock()
		res["status"], res["msg"] = "ko", "Unrecognized device"
		res.add("error_msg", "Problem in update device (Unrecognized device)")
		return
	case !s.directoryRightsLocked(user, role, id, true):
		s.mu.Unlock()
		res["status"], res["msg"] = "ko", "Not ownership or enough right to update"
		res.add("error_msg", "Problem in update device ()")
		return
	}
	dd := s.ps.dirDevices[id]
	if dd == nil {
		dd = &dirDevice{organization: s.opts.Organization, created: s.now().UTC()}
		for _, a := range d.Attrs {
			dd.attrs = append(dd.attrs, directoryAttr{ValueName: a, DataType: "string", ValueType: "string", ValueUnit: "-"})
		}
		s.ps.dirDevices[id] = dd
	}
	dd.kind, dd.format, dd.model, dd.producer = f.Get("kind"), f.Get("format"), f.Get("model"), f.Get("producer")
	dd.lat, dd.lon, dd.frequency = f.Get("latitude"), f.Get("longitude"), f.Get("frequency")
	if _, ok := f["edgegateway_type"]; ok {
		dd.edgeType, dd.edgeURI = f.Get("edgegateway_type"), f.Get("edgegateway_uri")
	}
	var list, added, removed []directoryAttr
	_ = json.Unmarshal([]byte(f.Get("attributes")), &list)
	_ = json.Unmarshal([]byte(f.Get("newattributes")), &added)
	_ = json.Unmarshal([]byte(f.Get("deleteattributes")), &removed)
	if merged := append(list, added...); len(merged) > 0 || len(removed) > 0 {
		if len(list) == 0 {
			merged = append(slices.Clone(dd.attrs), added...)
		}
		merged = slices.DeleteFunc(merged, func(a directoryAttr) bool {
			return slices.ContainsFunc(removed, func(x directoryAttr) bool { return strings.EqualFold(x.ValueName, a.ValueName) })
		})
		dd.attrs = merged
	}
	d.Type, d.K1, d.K2, d.Attrs = f.Get("type"), f.Get("k1"), f.Get("k2"), nil
	for _, a := range dd.attrs {
		d.Attrs = append(d.Attrs, a.ValueName)
	}
	if len(pubs) == 1 {
		d.PublicKeys = append([]json.RawMessage{pubs[0]}, d.PublicKeys...)
	}
	s.devices[id] = d
	if e := s.entities[entKey("", id)]; e != nil {
		e.typ = d.Type
		keep := map[string]bool{"latitude": true, "longitude": true, "model": true}
		for _, a := range dd.attrs {
			keep[a.ValueName] = true
			if _, ok := e.attrs[a.ValueName]; !ok {
				e.attrs[a.ValueName] = ngsiAttr{Type: a.DataType, Value: json.RawMessage(`""`)}
			}
		}
		for name := range e.attrs {
			if !keep[name] && name != s.opts.SignatureAttr {
				delete(e.attrs, name)
			}
		}
	} else {
		s.createDeviceEntityLocked(d, dd)
	}
	s.noteRegistrationLocked(d)
	s.mu.Unlock()
	res["status"] = "ok"
	res.add("msg", "\n Device "+cb+"/"+id+" correctly updated")
	s.log.Info("device updated", "device", id, "by", user, "key_rotated", len(pubs) == 1)
	if len(pubs) == 1 && s.push != nil {
		res["nudged"] = s.nudgeBoundGateways() // the companion's answer
	}
}

// nudgeBoundGateways nudges every gateway bound to an account (the
// directory does not keep which gateway serves a device); it reports
// whether any was nudged.
func (s *Server) nudgeBoundGateways() bool {
	s.mu.Lock()
	var gws []string
	for _, gw := range sortedKeys(s.ps.gateways) {
		if s.ps.gateways[gw].client != "" {
			gws = append(gws, gw)
		}
	}
	s.mu.Unlock()
	nudged := false
	for _, gw := range gws {
		nudged = s.Push(gw, false) == nil || nudged
	}
	return nudged
}

// directoryList is action=get_all_device: the devices the user owns, those
// delegated to them (not ANONYMOUS), the public ones of their organization
// and, for a RootAdmin, all; as DataTables JSON (format_result) with the
// list under "data".
func (s *Server) directoryList(user, role, org string) map[string]any {
	s.mu.Lock()
	defer s.mu.Unlock()
	data := []DirectoryDevice{}
	for _, id := range sortedKeys(s.devices) {
		d := s.devices[id]
		eid := s.ElementID(id)
		dd := s.ps.dirDevices[id]
		if dd == nil {
			dd = &dirDevice{kind: "sensor", format: "json", model: "custom", organization: s.opts.Organization}
		}
		own := s.ownerLocked(eid) == user
		check := s.accessCheckLocked(user, eid, ElementTypeIOTID)
		msg := ""
		if check.Message != nil {
			msg = *check.Message
		}
		public := msg == AccessPublic && dd.organization == org
		delegated := msg == AccessDelegated || msg == AccessGroupDelegated
		if !own && !public && !delegated && role != RoleRootAdmin {
			continue
		}
		rec := DirectoryDevice{ContextBroker: s.opts.BrokerName, ID: id, URI: s.deviceURI(id), DeviceType: d.Type,
			Kind: dd.kind, Status1: "active", Model: dd.model, Producer: dd.producer, Longitude: dd.lon, Latitude: dd.lat,
			Protocol: "ngsi", Format: dd.format, Frequency: dd.frequency, Created: dd.created.Format(mysqlTime),
			Organization: dd.organization}
		switch {
		case own:
			rec.Visibility = "MyOwnPrivate"
			if public {
				rec.Visibility = "MyOwnPublic"
			}
			rec.K1, rec.K2, rec.EdgegatewayType, rec.EdgegatewayURI = d.K1, d.K2, dd.edgeType, dd.edgeURI
		case public:
			rec.Visibility = "public"
		case delegated:
			rec.Visibility, rec.DelegationKind = "delegated", check.Kind
		default:
			rec.Visibility = "private"
		}
		data = append(data, rec)
	}
	return map[string]any{"draw": 1, "recordsTotal": len(data), "recordsFiltered": len(data), "data": data,
		"msg": "", "log": "\r\n action=get_all_device \r\n", "status": "ok", "cache": "NOCACHE"}
}

// parseEdgeURI reads edgegate://GW/radio?port=P&node=N&child=C or
// edgegate://GW/mqtt. Absent node or child: any (-1). The "signing"
// parameter (edgegate://GW/mqtt?signing=device) says who signs the
// device's readings. Used by the companion only.
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

// missingParams answers device.php's "Missing Parameters" for the names
// absent from f; problem starts the error_msg (e.g. "Problem in insert
// device"). It reports whether any was missing.
func (res dirResult) missingParams(f url.Values, problem string, names ...string) bool {
	missing := missingParams(f, names...)
	if len(missing) == 0 {
		return false
	}
	res["status"], res["msg"] = "ko", "Missing Parameters"
	res.add("error_msg", problem+" (Missing parameters: "+strings.Join(missing, ", ")+" )")
	return true
}

// knownBroker is getProtocol: the broker must be in the directory, else it
// answers "Unrecognized contextbroker/protocol" and reports false.
func (s *Server) knownBroker(res dirResult, cb, problem string) bool {
	if cb == s.opts.BrokerName {
		return true
	}
	res["status"], res["msg"] = "ko", "Unrecognized contextbroker/protocol"
	res.add("error_msg", problem+" (Unrecognized contextbroker/protocol)")
	return false
}
