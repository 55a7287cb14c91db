package centralsim

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"
)

// platformOptions: users with roles, groups and organizations, devices of
// alice and bob, and delegations of every target kind.
func platformOptions(o *Options) {
	o.Users = []User{
		{Username: "alice"},
		{Username: "bob", Groups: []string{"ops"}},
		{Username: "carol", Role: RoleAreaManager},
		{Username: "root", Role: RoleRootAdmin},
		{Username: "tool", Role: RoleToolAdmin},
		{Username: "nobody", Organization: "-"},
		{Username: "reader"}, {Username: "writer"}, {Username: "wonly"}, {Username: "modifier"},
	}
	o.Devices = append(o.Devices, Device{ID: "meter-bob", Type: "Meter", Owner: "bob", K1: "kb1", K2: "kb2"})
	o.Delegations = append(o.Delegations,
		Delegation{Device: "Organization:orion-1:meter-bob", Group: "ops", Kind: KindReadWrite},
		Delegation{Device: devFree, User: AnonymousUser, Kind: KindReadAccess},
	)
}

func (f *fixture) get(t *testing.T, path, bearer string) response {
	t.Helper()
	return f.mustDo(t, "GET", f.sim.URL()+path, bearer, nil)
}

func TestUserinfoAndServiceAccount(t *testing.T) {
	f := newFixture(t, platformOptions, func(o *Options) {
		o.Clients = append(o.Clients, Client{ID: "svc", Secret: "svc-secret-qqqq"})
	})
	disc := decodeJSON[map[string]any](t, f.mustDo(t, "GET", f.sim.Issuer()+"/.well-known/openid-configuration", "", nil))
	for k, want := range map[string]string{"issuer": f.sim.URL() + "/auth/realms/master", "userinfo_endpoint": f.sim.UserinfoURL(),
		"device_authorization_endpoint": f.sim.DeviceAuthURL(), "revocation_endpoint": f.sim.RevocationURL()} {
		if disc[k] != want {
			t.Errorf("discovery %s = %v, want %s", k, disc[k], want)
		}
	}
	if slices.Contains(toStrings(disc["token_endpoint_auth_methods_supported"]), "private_key_jwt") {
		t.Error("stock discovery announces the companion's private_key_jwt")
	}

	tok := f.token(t, "carol", time.Minute)
	r := f.mustDo(t, "GET", f.sim.UserinfoURL(), tok, nil)
	ui := decodeJSON[map[string]any](t, r)
	if r.status != 200 || ui["preferred_username"] != "carol" || ui["username"] != "carol" || !slices.Equal(toStrings(ui["roles"]), []string{RoleAreaManager}) {
		t.Errorf("userinfo = %d %v", r.status, ui)
	}
	for name, bad := range map[string]string{"none": "", "garbage": "a.b.c", "expired": f.token(t, "carol", -time.Minute)} {
		r := f.mustDo(t, "GET", f.sim.UserinfoURL(), bad, nil)
		if e := decodeJSON[map[string]string](t, r); r.status != 401 || e["error"] != "invalid_token" {
			t.Errorf("%s token: %d %v", name, r.status, e)
		}
	}

	// client_credentials: Keycloak's service account, which owns nothing.
	resp, err := f.http.PostForm(f.sim.TokenURL(), url.Values{"grant_type": {"client_credentials"}, "client_id": {"svc"}, "client_secret": {"svc-secret-qqqq"}})
	if err != nil {
		t.Fatal(err)
	}
	var tr struct {
		AccessToken string `json:"access_token"`
	}
	json.NewDecoder(resp.Body).Decode(&tr)
	resp.Body.Close()
	if ui := decodeJSON[map[string]any](t, f.mustDo(t, "GET", f.sim.UserinfoURL(), tr.AccessToken, nil)); ui["preferred_username"] != "service-account-svc" {
		t.Errorf("service account userinfo = %v", ui)
	}
	if r := f.get(t, "/ownership-api/v1/list/?type=IOTID", tr.AccessToken); r.status != 200 || strings.TrimSpace(string(r.body)) != "[]" {
		t.Errorf("service account's rows: %d %s", r.status, r.body)
	}

	// Direct access grant of a user with a password; offline_access gives
	// an offline refresh token.
	f2 := newFixture(t, func(o *Options) { o.Users = []User{{Username: "dave", Password: "dave-pw-1234"}} })
	resp, err = f2.http.PostForm(f2.sim.TokenURL(), url.Values{"grant_type": {"password"}, "client_id": {"gw-1"}, "client_secret": {gwSecret},
		"username": {"dave"}, "password": {"dave-pw-1234"}, "scope": {"openid offline_access"}})
	if err != nil {
		t.Fatal(err)
	}
	var pr map[string]any
	json.NewDecoder(resp.Body).Decode(&pr)
	resp.Body.Close()
	if resp.StatusCode != 200 || pr["refresh_token"] == nil || !strings.Contains(pr["scope"].(string), "offline_access") {
		t.Fatalf("password grant: %d %v", resp.StatusCode, pr)
	}
}

func toStrings(v any) []string {
	var out []string
	for _, x := range v.([]any) {
		out = append(out, x.(string))
	}
	return out
}

func TestOwnershipAPI(t *testing.T) {
	f := newFixture(t, platformOptions)
	alice, root := f.token(t, "alice", time.Minute), f.token(t, "root", time.Minute)
	list := "/ownership-api/v1/list/?type=IOTID"

	// Shape: list/index.php's columns without id, details decoded, no
	// entity type in them.
	r := f.get(t, list, alice)
	var raw []map[string]json.RawMessage
	if err := json.Unmarshal(r.body, &raw); err != nil || r.status != 200 || len(raw) != 2 {
		t.Fatalf("alice's list: %d %s", r.status, r.body)
	}
	for _, row := range raw {
		for _, k := range []string{"id", "deleted", "deletedBy"} {
			if _, ok := row[k]; ok {
				t.Errorf("row has %q: %s", k, r.body)
			}
		}
		var det map[string]string
		if err := json.Unmarshal(row["elementDetails"], &det); err != nil {
			t.Fatalf("elementDetails is not an object: %s", row["elementDetails"])
		}
		if _, ok := det["type"]; ok || det["contextbroker"] != "orion-1" {
			t.Errorf("elementDetails = %v", det)
		}
	}
	rows := decodeJSON[[]OwnershipRow](t, r)
	if rows[0].ElementID != "Organization:orion-1:"+devTemp || rows[0].Username != "alice" || rows[0].ElementType != "IOTID" {
		t.Errorf("row 0 = %+v", rows[0])
	}
	if _, err := time.Parse(mysqlTime, rows[0].Created); err != nil {
		t.Errorf("created %q: %v", rows[0].Created, err)
	}

	tests := []struct {
		name, path, token string
		wantStatus        int
		wantUsers         []string // usernames of the rows, in order
		wantBody          string   // substring, for refusals
	}{
		{"RootAdmin sees all", list, root, 200, []string{"alice", "alice", "bob"}, ""},
		{"RootAdmin onlyMine", list + "&onlyMine=true", root, 200, nil, ""},
		{"elementId filter", list + "&elementId=Organization:orion-1:meter-bob", root, 200, []string{"bob"}, ""},
		{"elementId of another user", list + "&elementId=Organization:orion-1:meter-bob", alice, 200, nil, ""},
		{"accessToken parameter", list + "&accessToken=" + alice, "", 200, []string{"alice", "alice"}, ""},
		{"no token", list, "", 401, nil, "No token provided or invalid authorization header"},
		{"invalid token", list, "x.y.z", 401, nil, `"error":"invalid_token"`},
		{"expired token", list, f.token(t, "alice", -time.Minute), 401, nil, "Token verification failed"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := f.get(t, tt.path, tt.token)
			if r.status != tt.wantStatus || !strings.Contains(string(r.body), tt.wantBody) {
				t.Fatalf("%d %s", r.status, r.body)
			}
			if tt.wantStatus != 200 {
				return
			}
			var got []string
			for _, row := range decodeJSON[[]OwnershipRow](t, r) {
				got = append(got, row.Username)
			}
			if !slices.Equal(got, tt.wantUsers) {
				t.Errorf("users = %v, want %v", got, tt.wantUsers)
			}
		})
	}

	// register: limits per role (stock defaults), answers as stock.
	reg := func(tok, body string) response {
		return f.mustDo(t, "POST", f.sim.URL()+"/ownership-api/v1/register/", tok, []byte(body))
	}
	app := `{"elementId":"gw-1","elementType":"AppID","elementName":"gateway","elementDetails":{"edgegateway_type":"edgegate"}}`
	regTests := []struct {
		name, user, body string
		wantStatus       int
		wantBody         string
	}{
		{"AppID: limit 0 for an ordinary user", "alice", app, 400, `{"error":"reached limit of 0","limit":0,"current":0}`},
		{"AppID: AreaManager may", "carol", app, 200, `"username":"carol"`},
		{"missing elementName", "alice", `{"elementId":"x","elementType":"IOTID"}`, 400, `{"error":"missing elementName attribute"}`},
		{"invalid type", "alice", `{"elementId":"x","elementType":"Car","elementName":"x"}`, 400, `{"error":"invalid elementType Car"}`},
		{"not JSON", "alice", `{{`, 400, "invalid JSON format"},
		{"not an object", "alice", `[1]`, 400, "no JSON object"},
		{"empty", "alice", ``, 400, "no data via POST"},
	}
	for _, tt := range regTests {
		t.Run(tt.name, func(t *testing.T) {
			r := reg(f.token(t, tt.user, time.Minute), tt.body)
			if r.status != tt.wantStatus || !strings.Contains(string(r.body), tt.wantBody) {
				t.Fatalf("%d %s", r.status, r.body)
			}
		})
	}
	if rows := f.sim.AppRows("carol"); len(rows) != 1 || !strings.Contains(string(rows[0].ElementDetails), "edgegate") {
		t.Errorf("carol's AppID rows = %+v", rows)
	}
	// IOTID: 5 for an ordinary user; alice has 2.
	for i := 0; i < 3; i++ {
		if r := reg(alice, `{"elementId":"Organization:orion-1:x`+string(rune('a'+i))+`","elementType":"IOTID","elementName":"x"}`); r.status != 200 {
			t.Fatalf("IOTID %d: %d %s", i, r.status, r.body)
		}
	}
	if r := reg(alice, `{"elementId":"Organization:orion-1:xz","elementType":"IOTID","elementName":"x"}`); r.status != 400 || string(r.body) != `{"error":"reached limit of 5","limit":5,"current":5}` {
		t.Errorf("sixth IOTID: %d %s", r.status, r.body)
	}
	lim := decodeJSON[struct {
		Username, Role, Organization string
		Limits                       []struct{ ElementType, Limit, Current string }
	}](t, f.get(t, "/ownership-api/v1/limits/?type=IOTID;AppID", alice))
	if lim.Username != "alice" || lim.Role != RoleManager || lim.Organization != "Organization" || len(lim.Limits) != 2 ||
		lim.Limits[0] != (struct{ ElementType, Limit, Current string }{"IOTID", "5", "5"}) || lim.Limits[1].Limit != "0" {
		t.Errorf("limits = %+v", lim)
	}

	// delete sets deleted; the row leaves the list but stays with
	// includeDeleted.
	del := "/ownership-api/v1/delete/?type=IOTID&elementId=Organization:orion-1:xa"
	if r := f.get(t, del, alice); r.status != 200 || string(r.body) != "{ \"deleted\": 1}\n" {
		t.Errorf("delete: %d %q", r.status, r.body)
	}
	if r := f.get(t, "/ownership-api/v1/delete/?type=IOTID&elementId=Organization:orion-1:meter-bob", alice); r.status != 400 {
		t.Errorf("deleting bob's row as alice: %d %s", r.status, r.body)
	}
	if rows := decodeJSON[[]OwnershipRow](t, f.get(t, list+"&elementId=Organization:orion-1:xa", alice)); len(rows) != 0 {
		t.Errorf("deleted row listed: %+v", rows)
	}
	rows = decodeJSON[[]OwnershipRow](t, f.get(t, list+"&includeDeleted&elementId=Organization:orion-1:xa", alice))
	if len(rows) != 1 || rows[0].Deleted == nil || *rows[0].DeletedBy != "alice" {
		t.Errorf("with includeDeleted: %+v", rows)
	}
}

func TestDatamanager(t *testing.T) {
	f := newFixture(t, platformOptions)
	tok := func(u string) string { return f.token(t, u, time.Minute) }
	dm := func(user, list, extra string) string {
		return "/datamanager/api/v2/username/" + user + "/" + list + "?sourceRequest=iotdirectory" + extra
	}
	tests := []struct {
		name, path, token string
		wantStatus        int
		wantElements      []string // elementId of the rows
	}{
		{"delegator: alice gave 5", dm("alice", "delegator", "&elementType=IOTID"), tok("alice"), 200,
			[]string{"Organization:orion-1:" + devTemp, "Organization:orion-1:" + devTemp, "Organization:orion-1:" + devTemp,
				"Organization:orion-1:" + devTemp, "Organization:orion-1:" + devFree}},
		{"delegator: none is 204", dm("carol", "delegator", ""), tok("carol"), 204, nil},
		{"delegated: to bob's group", dm("bob", "delegated", ""), tok("bob"), 200, []string{"Organization:orion-1:meter-bob"}},
		{"delegated: groupname of the delegators", dm("bob", "delegated", "&groupname=ops"), tok("bob"), 200, []string{"Organization:orion-1:meter-bob"}},
		{"delegated: none is 204", dm("carol", "delegated", ""), tok("carol"), 204, nil},
		{"delegated: other element types", dm("writer", "delegated", "&elementType=AppID"), tok("writer"), 204, nil},
		{"delegated: ANONYMOUS is open", dm("ANONYMOUS", "delegated", ""), tok("carol"), 200, []string{"Organization:orion-1:" + devFree}},
		{"another user's list", dm("alice", "delegator", ""), tok("carol"), 401, nil},
		{"RootAdmin reads another's list", dm("bob", "delegated", ""), tok("root"), 200, []string{"Organization:orion-1:meter-bob"}},
		{"no sourceRequest", "/datamanager/api/v2/username/alice/delegator", tok("alice"), 400, nil},
		{"bad token", dm("alice", "delegator", ""), "x.y.z", 401, nil},
		{"accessToken parameter", dm("alice", "delegator", "&accessToken="+tok("alice")), "", 200, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := f.get(t, tt.path, tt.token)
			if r.status != tt.wantStatus {
				t.Fatalf("%d %s", r.status, r.body)
			}
			if r.status == 204 && len(r.body) != 0 {
				t.Errorf("204 with a body: %q", r.body)
			}
			if r.status != 200 || tt.wantElements == nil {
				return
			}
			var got []string
			for _, d := range decodeJSON[[]DelegationRow](t, r) {
				got = append(got, d.ElementID)
			}
			if !slices.Equal(got, tt.wantElements) {
				t.Errorf("elements = %v, want %v", got, tt.wantElements)
			}
		})
	}
	// Serializer shape: a group delegation has no usernameDelegated, a
	// groupnameDelegated DN, and no deleteTime.
	var raw []map[string]any
	json.Unmarshal(f.get(t, dm("bob", "delegated", ""), tok("bob")).body, &raw)
	if len(raw) != 1 || raw[0]["groupnameDelegated"] != "cn=ops,ou=Organization,"+LDAPBaseDN || raw[0]["usernameDelegated"] != nil ||
		raw[0]["deleteTime"] != nil || raw[0]["usernameDelegator"] != "bob" || raw[0]["kind"] != KindReadWrite {
		t.Errorf("group delegation row = %v", raw)
	}

	check := func(element string) string {
		return "/datamanager/api/v3/apps/" + element + "/access/check?sourceRequest=orionbrokerfilter&elementType=IOTID"
	}
	temp, free, meter := "Organization:orion-1:"+devTemp, "Organization:orion-1:"+devFree, "Organization:orion-1:meter-bob"
	kinds := []struct {
		name, user, element string
		want                string // result/message/kind
	}{
		{"owner", "alice", temp, "true/OWNER/READ_ACCESS"},
		{"delegated read-write", "writer", temp, "true/DELEGATED/READ_WRITE"},
		{"delegated write-only", "wonly", temp, "true/DELEGATED/WRITE_ONLY"},
		{"delegated modify", "modifier", temp, "true/DELEGATED/MODIFY"},
		{"group delegated (delegations before ownership)", "bob", meter, "true/GROUP-DELEGATED/READ_WRITE"},
		{"public", "carol", free, "true/PUBLIC/READ_ACCESS"},
		{"public even for its owner (delegations first)", "alice", free, "true/PUBLIC/READ_ACCESS"},
		{"root admin", "root", meter, "true/ROOTADMIN/READ_ACCESS"},
		{"nothing", "carol", temp, "false/<nil>/READ_ACCESS"},
	}
	for _, tt := range kinds {
		t.Run("access/check "+tt.name, func(t *testing.T) {
			r := f.get(t, check(tt.element), tok(tt.user))
			a := decodeJSON[AccessCheck](t, r)
			msg := "<nil>"
			if a.Message != nil {
				msg = *a.Message
			}
			if got := strings.Join([]string{boolStr(a.Result), msg, a.Kind}, "/"); r.status != 200 || got != tt.want {
				t.Errorf("%d %s: got %s, want %s", r.status, r.body, got, tt.want)
			}
		})
	}
	// A member of the group that is not the owner.
	f.sim.SetDelegations(append(f.sim.delegs, Delegation{Device: meter, Group: "ou=Organization," + LDAPBaseDN, Kind: KindReadAccess}))
	if a := decodeJSON[AccessCheck](t, f.get(t, check(meter), tok("carol"))); !a.Result || *a.Message != AccessGroupDelegated || a.Kind != KindReadAccess {
		t.Errorf("organization delegation: %+v", a)
	}
	if r := f.get(t, "/datamanager/api/v3/apps/"+temp+"/access/check?sourceRequest=x", tok("alice")); r.status != 400 {
		t.Errorf("without elementType: %d", r.status)
	}

	// The admin surface adds and removes one delegation at a time.
	admin := f.sim.AdminToken()
	dl := []byte(`{"device":"` + temp + `","user":"carol","kind":"READ_WRITE"}`)
	if r := f.mustDo(t, "POST", f.sim.URL()+"/_sim/delegations", admin, dl); r.status != 204 {
		t.Fatalf("add delegation: %d %s", r.status, r.body)
	}
	if a := decodeJSON[AccessCheck](t, f.get(t, check(temp), tok("carol"))); !a.Result || *a.Message != AccessDelegated || a.Kind != KindReadWrite {
		t.Errorf("after adding: %+v", a)
	}
	if r := f.mustDo(t, "POST", f.sim.URL()+"/_sim/delegations", admin, []byte(`{"device":"x","kind":"READ_WRITE"}`)); r.status != 400 {
		t.Errorf("delegation without a target: %d %s", r.status, r.body)
	}
	if r := f.mustDo(t, "POST", f.sim.URL()+"/_sim/delegations", tok("alice"), dl); r.status != 401 {
		t.Errorf("add delegation without the admin token: %d", r.status)
	}
	if r := f.mustDo(t, "DELETE", f.sim.URL()+"/_sim/delegations", admin, dl); r.status != 204 {
		t.Fatalf("delete delegation: %d %s", r.status, r.body)
	}
	if a := decodeJSON[AccessCheck](t, f.get(t, check(temp), tok("carol"))); a.Result {
		t.Errorf("after deleting: %+v", a)
	}
	if r := f.mustDo(t, "DELETE", f.sim.URL()+"/_sim/delegations", admin, dl); r.status != 404 {
		t.Errorf("delete again: %d", r.status)
	}

	// The filter's in-process back ends see the same.
	ctx := context.Background()
	if owned, err := f.sim.backendOwnership(ctx, "alice", temp); !owned || err != nil {
		t.Errorf("backendOwnership(alice) = %v %v", owned, err)
	}
	if owned, _ := f.sim.backendOwnership(ctx, "writer", temp); owned {
		t.Error("a delegate owns the device")
	}
	if owned, _ := f.sim.backendOwnership(ctx, "root", temp); !owned {
		t.Error("RootAdmin does not see the row")
	}
	if ok, kind, public, err := f.sim.backendAccessCheck(ctx, "carol", free); !ok || !public || kind != KindReadAccess || err != nil {
		t.Errorf("backendAccessCheck(public) = %v %s %v %v", ok, kind, public, err)
	}
	f.sim.setBackendFault(BackendDatamanager, 503)
	var be *BackendError
	if _, _, _, err := f.sim.backendAccessCheck(ctx, "carol", free); !errors.As(err, &be) || be.Status != 503 {
		t.Errorf("with a fault: %v", err)
	}
	if r := f.get(t, check(free), tok("carol")); r.status != 503 {
		t.Errorf("HTTP with a fault: %d", r.status)
	}
}

func boolStr(b bool) string {
	if b {
		return "true"
	}
	return "false"
}

// directory calls device.php with the parameters as Snap4City's clients
// send them (nodered=yes, token in the Authorization header).
func (f *fixture) directory(t *testing.T, token string, params url.Values) map[string]any {
	t.Helper()
	r := f.mustDo(t, "POST", f.sim.URL()+"/iot-directory/api/device.php?"+params.Encode(), token, nil)
	if r.status != 200 {
		t.Fatalf("device.php answered HTTP %d: %s", r.status, r.body)
	}
	return decodeJSON[map[string]any](t, r)
}

func insertParams(id string) url.Values {
	return url.Values{"action": {"insert"}, "nodered": {"yes"}, "id": {id}, "type": {"Thermometer"},
		"contextbroker": {"orion-1"}, "kind": {"sensor"}, "format": {"json"}, "model": {"thermo-1"}, "producer": {"acme"},
		"latitude": {"43.77"}, "longitude": {"11.25"}, "k1": {"dk1-" + id}, "k2": {"dk2-" + id}, "frequency": {"600"},
		"attributes": {`[{"value_name":"temperature","data_type":"float","value_type":"temperature","value_unit":"°C",` +
			`"healthiness_criteria":"refresh_rate","healthiness_value":"300"}]`},
		"edgegateway_type": {"edgegate"}, "edgegateway_uri": {"edgegate://gw-alpha/radio?port=/dev/ttyUSB0&node=3"}}
}

func TestIoTDirectory(t *testing.T) {
	f := newFixture(t, platformOptions)
	alice := f.token(t, "alice", time.Minute)
	with := func(id string, mutate func(url.Values)) url.Values {
		p := insertParams(id)
		mutate(p)
		return p
	}
	tests := []struct {
		name   string
		token  string
		params url.Values
		status string
		msg    string // substring of msg
		errMsg string // substring of error_msg
	}{
		{"without nodered the token is a refresh token", alice, with("d-1", func(p url.Values) { p.Del("nodered") }),
			"ko", "Access Token not present", "Access Token not present"},
		{"no token", "", insertParams("d-1"), "ko", "Access Token not present", ""},
		{"invalid token", "x.y.z", insertParams("d-1"), "ko", "Cannot retrieve user information", "Userinfo not found in AccessToken"},
		{"no organization", f.token(t, "nobody", time.Minute), insertParams("d-1"), "ko", "Cannot retrieve user information",
			"Organization not found in AccessToken for user nobody"},
		{"missing parameters", alice, with("d-1", func(p url.Values) { p.Del("k1"); p.Del("frequency") }), "ko", "Missing Parameters",
			"Problem in insert device (Missing parameters: k1, frequency )"},
		{"strange characters", alice, with("d 1", func(url.Values) {}), "ko", "invalid action", "strange characters are not allowed"},
		{"forbidden character, status stays ok", alice, with("a:b", func(url.Values) {}), "ok", "error inserting device",
			"forbidden character detected ( The data contains : )"},
		{"unknown broker", alice, with("d-1", func(p url.Values) { p.Set("contextbroker", "orion-9") }), "ko",
			"Unrecognized contextbroker/protocol", "Problem in insert device (Unrecognized contextbroker/protocol)"},
		{"bad kind", alice, with("d-1", func(p url.Values) { p.Set("kind", "thing") }), "ko", "Missing some device data",
			"kind not specified. "},
		{"attribute without healthiness value", alice, with("d-1", func(p url.Values) {
			p.Set("attributes", `[{"value_name":"t","data_type":"float","value_type":"temperature","value_unit":"C","healthiness_criteria":"refresh_rate"}]`)
		}), "ko", "Missing some device data", "healthiness_criteria for attribute t not specified. "},
		{"attribute without unit and criterion", alice, with("d-1", func(p url.Values) {
			p.Set("attributes", `[{"value_name":"t","data_type":"float","value_type":"temperature"}]`)
		}), "ko", "", "value unit for attribute t not specified. wrong healthiness_criteria. "},
		{"no attributes", alice, with("d-1", func(p url.Values) { p.Set("attributes", "[]") }), "ko", "",
			"at least one attribute must be added. "},
		{"insert", alice, insertParams("d-1"), "ok", "registration of the ownership succeded", ""},
		{"duplicate", alice, insertParams("d-1"), "ko", "",
			"Problem in inserting the device d-1 in the database. Duplicate entry: the device id is already in use, please choose a different id"},
		{"unknown action", alice, url.Values{"action": {"fly"}, "nodered": {"yes"}}, "ko", "invalid action fly", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res := f.directory(t, tt.token, tt.params)
			if res["status"] != tt.status || !strings.Contains(res["msg"].(string), tt.msg) || !strings.Contains(res["error_msg"].(string), tt.errMsg) {
				t.Errorf("answer = %v", res)
			}
		})
	}

	// The entity holds only latitude, longitude, model and the declared
	// attributes; the ownership row has the keys, the edge gateway and no
	// entity type.
	e, ok := f.sim.Entity("d-1")
	if !ok {
		t.Fatal("no entity for d-1")
	}
	var names []string
	for k := range e {
		names = append(names, k)
	}
	slices.Sort(names)
	if !slices.Equal(names, []string{"id", "latitude", "longitude", "model", "temperature", "type"}) ||
		e["latitude"].(map[string]any)["type"] != "float" || e["temperature"].(map[string]any)["value"] != "" ||
		e["temperature"].(map[string]any)["type"] != "float" {
		t.Errorf("entity = %v", e)
	}
	rows := decodeJSON[[]OwnershipRow](t, f.get(t, "/ownership-api/v1/list/?type=IOTID&elementId=Organization:orion-1:d-1", alice))
	var det map[string]string
	if len(rows) != 1 || json.Unmarshal(rows[0].ElementDetails, &det) != nil {
		t.Fatalf("row of d-1 = %+v", rows)
	}
	if want := map[string]string{"k1": "dk1-d-1", "k2": "dk2-d-1", "contextbroker": "orion-1", "edgegateway_type": "edgegate",
		"edgegateway_uri": "edgegate://gw-alpha/radio?port=/dev/ttyUSB0&node=3"}; !mapsEqual(det, want) {
		t.Errorf("details = %v, want %v", det, want)
	}

	// get_all_device: own devices with keys, delegated ones without; the
	// list is under "data".
	list := f.directory(t, alice, url.Values{"action": {"get_all_device"}, "nodered": {"yes"}})
	if _, has := list["content"]; has || list["status"] != "ok" {
		t.Errorf("get_all_device = %v", list)
	}
	got := map[string]string{}
	for _, d := range list["data"].([]any) {
		m := d.(map[string]any)
		got[m["id"].(string)] = m["visibility"].(string) + "/" + m["k1"].(string)
	}
	if got["d-1"] != "MyOwnPrivate/dk1-d-1" || got[devFree] != "MyOwnPublic/" || got[devTemp] != "MyOwnPrivate/"+k1 || len(got) != 3 {
		t.Errorf("alice's devices = %v", got)
	}
	bobs := f.directory(t, f.token(t, "bob", time.Minute), url.Values{"action": {"get_all_device"}, "nodered": {"yes"}})
	got = map[string]string{}
	for _, d := range bobs["data"].([]any) {
		m := d.(map[string]any)
		got[m["id"].(string)] = m["visibility"].(string) + "/" + m["k1"].(string)
	}
	if got["meter-bob"] != "MyOwnPrivate/kb1" || got[devFree] != "public/" || len(got) != 2 {
		t.Errorf("bob's devices = %v", got)
	}
	writer := f.directory(t, f.token(t, "writer", time.Minute), url.Values{"action": {"get_all_device"}, "nodered": {"yes"}})
	if d := writer["data"].([]any); len(d) != 2 || d[1].(map[string]any)["delegationKind"] != KindReadWrite {
		t.Errorf("writer's devices = %v", d)
	}

	// update needs the whole device; delete removes entity and row.
	upd := f.directory(t, alice, url.Values{"action": {"update"}, "nodered": {"yes"}, "id": {"d-1"}, "contextbroker": {"orion-1"}})
	if upd["status"] != "ko" || !strings.Contains(upd["error_msg"].(string), "Missing parameters: type, gb_old_cb, kind, format, model, producer, latitude, longitude, k1, k2, frequency )") {
		t.Errorf("partial update = %v", upd)
	}
	p := insertParams("d-1")
	p.Set("action", "update")
	p.Set("gb_old_cb", "orion-1")
	p.Set("k1", "new-k1")
	if res := f.directory(t, f.token(t, "bob", time.Minute), p); res["status"] != "ko" || res["msg"] != "Not ownership or enough right to update" {
		t.Errorf("bob updating alice's device = %v", res)
	}
	if res := f.directory(t, alice, p); res["status"] != "ok" {
		t.Errorf("update = %v", res)
	}
	if rows := decodeJSON[[]OwnershipRow](t, f.get(t, "/ownership-api/v1/list/?type=IOTID&elementId=Organization:orion-1:d-1", alice)); len(rows) != 1 ||
		!strings.Contains(string(rows[0].ElementDetails), `"k1":"new-k1"`) {
		t.Errorf("after update: %+v", rows)
	}
	del := url.Values{"action": {"delete"}, "nodered": {"yes"}, "id": {"d-1"}, "contextbroker": {"orion-1"}}
	if res := f.directory(t, f.token(t, "bob", time.Minute), del); res["msg"] != "Not ownership or enough right to delete" {
		t.Errorf("bob deleting = %v", res)
	}
	if res := f.directory(t, alice, del); res["status"] != "ok" {
		t.Errorf("delete = %v", res)
	}
	if _, ok := f.sim.Entity("d-1"); ok {
		t.Error("entity survived delete")
	}
	if rows := decodeJSON[[]OwnershipRow](t, f.get(t, "/ownership-api/v1/list/?type=IOTID&elementId=Organization:orion-1:d-1", alice)); len(rows) != 0 {
		t.Errorf("row survived delete: %+v", rows)
	}
	if res := f.directory(t, alice, del); res["msg"] != "Unrecognized device" {
		t.Errorf("second delete = %v", res)
	}
	for _, secret := range []string{"dk1-d-1", "dk2-d-1", "new-k1", alice} {
		if strings.Contains(f.logs.String(), secret) {
			t.Errorf("logs contain a secret %q", secret)
		}
	}
}

func mapsEqual(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

// TestIoTDirectoryOwnershipLimit: the IOTID limit is checked before the
// insert (ko); a register refused after that check still answers ok.
func TestIoTDirectoryOwnershipLimit(t *testing.T) {
	f := newFixture(t, platformOptions, func(o *Options) {
		o.Limits = []Limit{{Organization: "any", Username: "any", Role: "any", ElementType: ElementTypeIOTID, MaxCount: 3}}
	})
	alice := f.token(t, "alice", time.Minute) // owns 2 IOTID
	if res := f.directory(t, alice, insertParams("d-3")); res["status"] != "ok" {
		t.Fatalf("third device = %v", res)
	}
	res := f.directory(t, alice, insertParams("d-4"))
	if res["status"] != "ko" || res["error_msg"] != "The registration is NOT possible. Reached limit of IOTID" || !strings.Contains(res["msg"].(string), "(3)") {
		t.Errorf("at the limit = %v", res)
	}
	if _, ok := f.sim.Entity("d-4"); ok {
		t.Error("refused device has an entity")
	}

	// The register call fails after the check passed (a concurrent
	// insert took the slot): the device exists, without an ownership row,
	// and the answer is still ok.
	f.sim.setBackendFault(BackendOwnershipRegister, 400)
	bob := f.token(t, "bob", time.Minute)
	res = f.directory(t, bob, insertParams("d-5"))
	if res["status"] != "ok" || !strings.Contains(res["error_msg"].(string), "The registration is NOT possible. Reached limit of IoT Devices. ") {
		t.Errorf("refused register = %v", res)
	}
	if _, ok := f.sim.Entity("d-5"); !ok {
		t.Error("no entity for d-5")
	}
	if rows := decodeJSON[[]OwnershipRow](t, f.get(t, "/ownership-api/v1/list/?type=IOTID&elementId=Organization:orion-1:d-5", bob)); len(rows) != 0 {
		t.Errorf("d-5 has rows %+v", rows)
	}
	f.sim.setBackendFault(BackendOwnershipRegister, 0)
	f.sim.setBackendFault(BackendOwnership, 500)
	if res := f.directory(t, bob, insertParams("d-6")); res["status"] != "ko" || res["error_msg"] != "Error returned in checking the ownership. " {
		t.Errorf("ownership API down = %v", res)
	}
}

func TestCompanionRoutes(t *testing.T) {
	paths := []string{PolicyKeysPath, "/edgegate/v1/gateways/gw-alpha/policy"}
	stock := newFixture(t)
	tok := stock.clientToken(t, "alice", "gw-1")
	for _, p := range paths {
		if r := stock.get(t, p, tok); r.status != 404 {
			t.Errorf("stock %s: %d, want 404", p, r.status)
		}
	}
	if r := stock.mustDo(t, "POST", stock.sim.URL()+"/edgegate/v1/gateways/gw-alpha/receipts", tok, []byte("x")); r.status != 404 {
		t.Errorf("stock receipts: %d, want 404", r.status)
	}
	if _, err := New(Options{MQTT: true}); err == nil {
		t.Error("MQTT without Companion accepted")
	}
	comp := newFixture(t, func(o *Options) { o.Companion = true })
	for _, p := range paths {
		if r := comp.get(t, p, comp.clientToken(t, "alice", "gw-1")); r.status != 200 {
			t.Errorf("companion %s: %d %s", p, r.status, r.body)
		}
	}
}

// TestTrustedIssuer: the Ownership API resolves the user of a third-party
// provider's token through that provider's userinfo.
func TestTrustedIssuer(t *testing.T) {
	ext, err := New(Options{Realm: "partner"})
	if err != nil {
		t.Fatal(err)
	}
	if err := ext.Start("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ext.Close() })
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(ext.CACertPEM())
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	f := newFixture(t, func(o *Options) {
		o.TrustIssuers = []TrustedIssuer{{Issuer: ext.Issuer(), JWKSURL: ext.JWKSURL()}}
		o.PlatformHTTPClient = hc
	})
	tok, err := ext.IssueAccessToken("alice", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if rows := decodeJSON[[]OwnershipRow](t, f.get(t, "/ownership-api/v1/list/?type=IOTID", tok)); len(rows) != 2 || rows[0].Username != "alice" {
		t.Errorf("rows for the partner's alice = %+v", rows)
	}
	other, _ := New(Options{Realm: "stranger"})
	otherTok, _ := other.IssueAccessToken("alice", time.Minute)
	if r := f.get(t, "/ownership-api/v1/list/?type=IOTID", otherTok); r.status != 401 {
		t.Errorf("untrusted issuer: %d %s", r.status, r.body)
	}
}

// TestDeviceGrantOffline: Keycloak's device authorization grant for the
// public pairing client, without the companion's key binding; scope
// offline_access yields an offline refresh token.
func TestDeviceGrantOffline(t *testing.T) {
	f := newFixture(t, platformOptions, func(o *Options) { o.Pairing.Interval = time.Second })
	post := func(u string, form url.Values) map[string]any {
		t.Helper()
		resp, err := f.http.PostForm(u, form)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var m map[string]any
		if err := json.NewDecoder(resp.Body).Decode(&m); err != nil {
			t.Fatal(err)
		}
		return m
	}
	da := post(f.sim.DeviceAuthURL(), url.Values{"client_id": {DefaultPairingClientID}, "scope": {"openid offline_access"}})
	code, _ := da["device_code"].(string)
	if code == "" {
		t.Fatalf("device authorization = %v", da)
	}
	if err := f.sim.ApproveDevice(da["user_code"].(string), "carol"); err != nil {
		t.Fatal(err)
	}
	tok := post(f.sim.TokenURL(), url.Values{"grant_type": {grantDeviceCode}, "client_id": {DefaultPairingClientID}, "device_code": {code}})
	if tok["refresh_token"] == nil || tok["refresh_expires_in"] != float64(0) || !strings.Contains(tok["scope"].(string), "offline_access") {
		t.Fatalf("device token = %v", tok)
	}
	ui := decodeJSON[map[string]any](t, f.mustDo(t, "GET", f.sim.UserinfoURL(), tok["access_token"].(string), nil))
	if ui["preferred_username"] != "carol" {
		t.Errorf("userinfo = %v", ui)
	}
	// A client assertion is the companion's extension: refused here.
	bad := post(f.sim.DeviceAuthURL(), url.Values{"client_id": {DefaultPairingClientID},
		"client_assertion_type": {assertionTypeJWTBrr}, "client_assertion": {"a.b.c"}})
	if bad["error"] != "invalid_client" {
		t.Errorf("assertion without the companion = %v", bad)
	}
}
