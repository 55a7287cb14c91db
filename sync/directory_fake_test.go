package centralsync

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"sync"
	"testing"
)

// stockDirectory is an IoT Directory device.php and an Ownership API list
// that answer as the stock sources do (disit/iot-directory web/api/device.php
// and web/api/common.php; disit/snap4city Ownership-API/v1/list/index.php).
// Each behaviour cites the code it copies.
type stockDirectory struct {
	t      *testing.T
	token  string // the one valid access token
	user   string
	org    string
	broker string // the organization's only broker

	mu sync.Mutex
	// refuseOwnership makes the Ownership API's register refuse (as at the
	// IOTID limit): insert still answers ok (common.php
	// registerOwnerShipDevice sets status 'ok' in its else branch).
	refuseOwnership bool
	devices         map[string]*stockDevice
	ownership       []string // element ids of the user's IOTID rows
	delegated       map[string]*stockDevice
	forms           []map[string][]string // every accepted form, by action order
}

type stockDevice struct {
	row   map[string]string
	attrs []map[string]string
	edge  [2]string
}

// regphp is iot-directory web/config.php $regphp.
var regphp = regexp.MustCompile(`[^a-zA-Z0-9:._-]`)

func newStockDirectory(t *testing.T) (*stockDirectory, *httptest.Server) {
	f := &stockDirectory{t: t, token: "access-token-canary-7f3a", user: "alice", org: "Org", broker: "orion-1",
		devices: map[string]*stockDevice{}, delegated: map[string]*stockDevice{}}
	mux := http.NewServeMux()
	mux.HandleFunc("/iot-directory/api/device.php", f.devicePHP)
	mux.HandleFunc("/ownership-api/v1/list/", f.ownershipList)
	srv := httptest.NewTLSServer(mux)
	t.Cleanup(srv.Close)
	return f, srv
}

func (f *stockDirectory) answer(w http.ResponseWriter, res map[string]any) {
	// device.php: header("Content-type: application/json"), always 200,
	// my_log echoes the whole $result, "log" included (which can hold a
	// URL with accessToken=: common.php checkRegisterOwnerShipObject).
	w.Header().Set("Content-Type", "application/json")
	if _, ok := res["log"]; !ok {
		res["log"] = "ownership-api/v1/limits/?type=IOTID&accessToken=" + f.token
	}
	_ = json.NewEncoder(w).Encode(res)
}

func ko(msg, emsg string) map[string]any {
	return map[string]any{"status": "ko", "msg": msg, "error_msg": emsg, "content": ""}
}

func (f *stockDirectory) devicePHP(w http.ResponseWriter, r *http.Request) {
	_ = r.ParseForm()
	req := r.Form
	action := req.Get("action")
	if action == "" { // device.php lines 46-55
		f.answer(w, ko("action not present", "action not present"))
		return
	}
	// device.php 57-61: the Authorization header becomes the token.
	if h := r.Header.Get("Authorization"); len(h) > 8 {
		req.Set("token", h[7:])
	}
	// device.php 73-83: without nodered the token is a refresh token of
	// the directory's own client; ours is not one, so no access token.
	access := ""
	if req.Has("nodered") {
		if req.Get("token") != "undefined" {
			access = req.Get("token")
		}
	}
	if access == "" { // device.php 87-95
		res := ko("Access Token not present", "Access Token not present")
		res["log"] = "model.php AccessToken not present\r\n"
		f.answer(w, res)
		return
	}
	if access != f.token { // device.php 99-107 (get_user_info fails)
		f.answer(w, ko("Cannot retrieve user information", "Problem in insert context broker (Cannot retrieve user information)"))
		return
	}
	// device.php 110-143: strange characters.
	for _, k := range []string{"id", "contextbroker", "model"} {
		v := req.Get(k)
		if k == "id" {
			v = strings.ReplaceAll(v, ":", "")
		}
		if regphp.MatchString(v) {
			f.answer(w, map[string]any{"status": "ko", "error_msg": "strange characters are not allowed"})
			return
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	switch action {
	case "insert":
		f.insert(w, req)
	case "update":
		f.update(w, req)
	case "delete":
		f.delete(w, req)
	case "get_all_device":
		f.list(w)
	case "get_device_attributes":
		f.attributes(w, req)
	default:
		f.answer(w, map[string]any{"status": "", "msg": "", "content": ""})
	}
}

// missingParameters is common.php missingParameters: isset, not non-empty.
func missingParameters(req map[string][]string, names ...string) []string {
	var miss []string
	for _, n := range names {
		if _, ok := req[n]; !ok {
			miss = append(miss, n)
		}
	}
	return miss
}

func (f *stockDirectory) insert(w http.ResponseWriter, req map[string][]string) {
	get := func(k string) string {
		if v := req[k]; len(v) > 0 {
			return v[0]
		}
		return ""
	}
	// device.php 146-158.
	if miss := missingParameters(req, "id", "type", "contextbroker", "kind", "format", "model", "producer",
		"latitude", "longitude", "k1", "k2", "frequency", "attributes"); len(miss) > 0 {
		f.answer(w, ko("Missing Parameters", "Problem in insert device (Missing parameters: "+strings.Join(miss, ", ")+" )"))
		return
	}
	// device.php 150, 324-330 and common.php checkSensibleCharacters: the
	// status is left "" with the message.
	if id := get("id"); strings.ContainsAny(id, "/:%") {
		f.answer(w, map[string]any{"status": "", "msg": "error inserting device", "error_msg": "forbidden character detected ( The data contains : )"})
		return
	}
	// device.php 228-236: the broker must be known.
	if get("contextbroker") != f.broker {
		f.answer(w, ko("Unrecognized contextbroker/protocol", "Problem in insert device (Unrecognized contextbroker/protocol)"))
		return
	}
	// common.php canBeRegistered.
	var attrs []map[string]string
	_ = json.Unmarshal([]byte(get("attributes")), &attrs)
	emsg := ""
	if k := get("kind"); k != "sensor" && k != "actuator" {
		emsg += "kind not specified. "
	}
	if len(attrs) == 0 {
		emsg += "at least one attribute must be added. "
	}
	for _, a := range attrs {
		if a["value_unit"] == "" {
			emsg += "value unit for attribute " + a["value_name"] + " not specified. "
		}
		switch a["healthiness_criteria"] {
		case "refresh_rate", "different_values", "within_bounds":
		default:
			emsg += "wrong healthiness_criteria. "
		}
		if a["healthiness_criteria"] == "refresh_rate" && a["healthiness_value"] == "" {
			emsg += "healthiness_criteria for attribute " + a["value_name"] + " not specified. "
		}
	}
	if emsg != "" { // common.php insert_device, the canBeRegistered else
		f.answer(w, map[string]any{"status": "ko", "msg": "\n Missing some device data, device not saved", "error_msg": emsg + "Missing some device data "})
		return
	}
	id := get("id")
	if _, dup := f.devices[id]; dup {
		f.answer(w, ko("\n Problem in inserting the device", "Problem in inserting the device "+id+" in the database. Duplicate entry"))
		return
	}
	d := &stockDevice{row: map[string]string{}, attrs: attrs, edge: [2]string{get("edgegateway_type"), get("edgegateway_uri")}}
	for _, k := range []string{"type", "contextbroker", "kind", "format", "model", "producer", "latitude", "longitude", "frequency", "k1", "k2", "mac"} {
		d.row[k] = get(k)
	}
	f.devices[id] = d
	f.forms = append(f.forms, req)
	res := map[string]any{"status": "ok", "msg": "\n Device " + f.broker + "/" + id + " correctly inserted in db", "error_msg": "", "content": ""}
	// common.php insert_device: registerOwnerShipDevice; a refusal still
	// leaves status 'ok'.
	if f.refuseOwnership {
		res["error_msg"] = "The registration is NOT possible. Reached limit of IoT Devices. "
	} else {
		f.ownership = append(f.ownership, f.org+":"+f.broker+":"+id)
	}
	f.answer(w, res)
}

func (f *stockDirectory) row(id string, d *stockDevice, vis string) map[string]any {
	// device.php get_all_device: the $rec fields (all strings, as mysqli
	// gives them).
	rec := map[string]any{"contextBroker": d.row["contextbroker"], "id": id, "devicetype": d.row["type"], "kind": d.row["kind"],
		"model": d.row["model"], "producer": d.row["producer"], "latitude": d.row["latitude"], "longitude": d.row["longitude"],
		"format": d.row["format"], "frequency": d.row["frequency"], "organization": f.org, "macaddress": d.row["mac"],
		"subnature": "", "staticAttributes": "[]", "privatekey": "", "certificate": "", "visibility": vis,
		"edgegateway_type": "", "edgegateway_uri": "", "k1": "", "k2": ""}
	if vis == "MyOwnPrivate" {
		rec["k1"], rec["k2"] = d.row["k1"], d.row["k2"]
		rec["edgegateway_type"], rec["edgegateway_uri"] = d.edge[0], d.edge[1]
	}
	return rec
}

func (f *stockDirectory) list(w http.ResponseWriter) {
	data := []map[string]any{}
	for id, d := range f.devices {
		data = append(data, f.row(id, d, "MyOwnPrivate"))
	}
	for id, d := range f.delegated {
		rec := f.row(id, d, "delegated")
		rec["delegationKind"] = "READ_WRITE"
		data = append(data, rec)
	}
	// common.php format_result: DataTables JSON, no "content".
	f.answer(w, map[string]any{"draw": 1, "recordsTotal": len(data), "recordsFiltered": len(data), "data": data,
		"msg": "", "log": "\r\n action=get_all_device \r\n", "status": "ok"})
}

func (f *stockDirectory) attributes(w http.ResponseWriter, req map[string][]string) {
	id := ""
	if v := req["id"]; len(v) > 0 {
		id = v[0]
	}
	d, ok := f.devices[id]
	if !ok { // device.php get_device_attributes
		f.answer(w, ko("Unrecognized device", "Problem in get_device_attribute (Unrecognized device)"))
		return
	}
	f.answer(w, map[string]any{"status": "ok", "content": d.attrs})
}

func (f *stockDirectory) update(w http.ResponseWriter, req map[string][]string) {
	// device.php 336-348.
	if miss := missingParameters(req, "id", "type", "contextbroker", "gb_old_cb", "kind", "format", "model", "producer",
		"latitude", "longitude", "k1", "k2", "frequency"); len(miss) > 0 {
		f.answer(w, ko("Missing Parameters", "Problem update the device information (Missing parameters: "+strings.Join(miss, ", ")+" )"))
		return
	}
	id := req["id"][0]
	d, ok := f.devices[id]
	if !ok {
		f.answer(w, ko("Unrecognized device", "Problem in update device (Unrecognized device)"))
		return
	}
	for _, k := range []string{"type", "kind", "format", "model", "producer", "latitude", "longitude", "frequency", "k1", "k2"} {
		d.row[k] = req[k][0]
	}
	// event_values: UPDATE ... WHERE value_name = old_value_name, then
	// newattributes inserted, deleteattributes deleted.
	var kept, added, removed []map[string]string
	if v := req["attributes"]; len(v) > 0 {
		_ = json.Unmarshal([]byte(v[0]), &kept)
	}
	if v := req["newattributes"]; len(v) > 0 {
		_ = json.Unmarshal([]byte(v[0]), &added)
	}
	if v := req["deleteattributes"]; len(v) > 0 {
		_ = json.Unmarshal([]byte(v[0]), &removed)
	}
	var attrs []map[string]string
	for _, old := range d.attrs {
		for _, k := range kept {
			if k["old_value_name"] == old["value_name"] {
				nk := map[string]string{}
				for kk, vv := range k {
					if kk != "old_value_name" {
						nk[kk] = vv
					}
				}
				old = nk
			}
		}
		gone := false
		for _, r := range removed {
			gone = gone || r["value_name"] == old["value_name"]
		}
		if !gone {
			attrs = append(attrs, old)
		}
	}
	d.attrs = append(attrs, added...)
	// The ownership row is registered again with what was sent: without
	// edgegateway_* it loses them (device.php update, $ownmsg).
	d.edge = [2]string{}
	if v := req["edgegateway_type"]; len(v) > 0 {
		d.edge[0] = v[0]
	}
	if v := req["edgegateway_uri"]; len(v) > 0 {
		d.edge[1] = v[0]
	}
	f.forms = append(f.forms, req)
	f.answer(w, map[string]any{"status": "ok", "msg": "\n Device correctly updated", "error_msg": "", "content": nil})
}

func (f *stockDirectory) delete(w http.ResponseWriter, req map[string][]string) {
	if miss := missingParameters(req, "id", "contextbroker"); len(miss) > 0 {
		f.answer(w, ko("Missing Parameters", "Problem deleting the device information (Missing parameters: "+strings.Join(miss, ", ")+" )"))
		return
	}
	id := req["id"][0]
	if _, ok := f.devices[id]; !ok {
		f.answer(w, ko("Unrecognized device", "Problem in delete device (Unrecognized device)"))
		return
	}
	delete(f.devices, id)
	eid := f.org + ":" + f.broker + ":" + id
	for i, e := range f.ownership {
		if e == eid {
			f.ownership = append(f.ownership[:i], f.ownership[i+1:]...)
			break
		}
	}
	f.answer(w, map[string]any{"status": "ok", "msg": "", "error_msg": "", "content": ""})
}

// ownershipList is Ownership-API v1/list/index.php for a plain user: the
// caller's rows (deleted IS NULL), elementDetails decoded; the user from
// the token (session.php).
func (f *stockDirectory) ownershipList(w http.ResponseWriter, r *http.Request) {
	tok := r.URL.Query().Get("accessToken")
	if h := r.Header.Get("Authorization"); strings.HasPrefix(h, "Bearer ") {
		tok = h[7:]
	}
	if tok != f.token {
		w.WriteHeader(http.StatusUnauthorized)
		_, _ = w.Write([]byte(`{"result":false,"message":"invalid token"}`))
		return
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	rows := []map[string]any{}
	for _, e := range f.ownership {
		rows = append(rows, map[string]any{"username": f.user, "elementId": e, "elementType": "IOTID",
			"elementName": e[strings.LastIndexByte(e, ':')+1:], "elementDetails": map[string]any{"contextbroker": f.broker}})
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(rows)
}
