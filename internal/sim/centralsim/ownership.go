package centralsim

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"
)

// The platform's Ownership API (disit/snap4city Ownership-API) and the
// datamanager's delegations (disit/snap4city PersonalDataManager), as
// stock serves them:
//
//	GET  /ownership-api/v1/list/?type=IOTID[&elementId=..][&onlyMine=true][&includeDeleted]   v1/list/index.php
//	POST /ownership-api/v1/register/   {elementId, elementType, elementName[, elementUrl, elementDetails]}  v1/register/index.php
//	GET  /ownership-api/v1/limits/?type=IOTID                                               v1/limits/index.php
//	GET|POST /ownership-api/v1/delete/?type=IOTID&elementId=..                              v1/delete/index.php
//	GET  /datamanager/api/v2/username/{user}/delegator?sourceRequest=..[&elementType=IOTID]  UserController.getDelegatorV2
//	GET  /datamanager/api/v2/username/{user}/delegated?sourceRequest=..[&groupname=..]      UserController.getDelegatedV2
//	GET  /datamanager/api/v3/apps/{element}/access/check?sourceRequest=..&elementType=IOTID  AppsController.checkAccessV3
//
// The Ownership API authenticates like session.php (accessToken= first,
// else "Authorization: Bearer"; the user from the provider's userinfo,
// "username" then "preferred_username"); the datamanager like its
// AccessTokenAuthenticationFilter (Authorization minus its first 7
// characters, else accessToken=). The broker filter reads the same table
// (backend.go): it grants exactly what these answers show.

// Defaults of the platform's naming.
const (
	DefaultBrokerName   = "orion-1"
	DefaultOrganization = "Organization"
	// ElementTypeIOTID is the element type of an IoT device.
	ElementTypeIOTID = "IOTID"
	// LDAPBaseDN is the base of the LDAP names the datamanager compares
	// group delegations with (LDAPUserDAOImpl.getGroupAndOUnames).
	LDAPBaseDN = "dc=ldap,dc=organization,dc=com"
	// mysqlTime is how PHP's mysqli returns a TIMESTAMP column.
	mysqlTime = "2006-01-02 15:04:05"
)

// Access check messages (datamanager AccessRightType).
const (
	AccessOwner          = "OWNER"
	AccessRootAdmin      = "ROOTADMIN"
	AccessPublic         = "PUBLIC"
	AccessDelegated      = "DELEGATED"
	AccessGroupDelegated = "GROUP-DELEGATED"
)

// validElementTypes is register/index.php's $validTypes.
var validElementTypes = []string{"AppID", "IOTID", "ServiceURI", "ServiceGraphID", "DashboardID", "DAAppID", "BrokerID",
	"ModelID", "PortiaID", "HeatmapID", "DeviceGroupID", "SynopticTmplID", "SynopticID", "DataTableID", "PoiTableID", "SumoAppID"}

// Limit is a row of the Ownership API's limits table: "any" matches every
// organization, username or role. get_limit_user (Ownership-API/common.php)
// takes the largest MaxCount of the rows that match.
type Limit struct {
	Organization string `json:"organization"`
	Username     string `json:"username"`
	Role         string `json:"role"`
	ElementType  string `json:"elementType"`
	MaxCount     int    `json:"maxCount"`
}

// StockLimits is the limits table of a stock install (profiledb dump of
// disit/snap4city-docker-generator, Mysql/latest.sql): an ordinary user
// may own no AppID and 5 IOTID; an AreaManager 3 AppID (IOTID stays 5: the
// dump has no AreaManager IOTID row); a ToolAdmin 10 AppID and 20 IOTID; a
// RootAdmin 999 IOTID (and no AppID row beyond the "any" 0).
func StockLimits() []Limit {
	l := func(role, typ string, n int) Limit {
		return Limit{Organization: "any", Username: "any", Role: role, ElementType: typ, MaxCount: n}
	}
	return []Limit{
		l("any", "AppID", 0), l("any", "BrokerID", 1), l("any", "DashboardID", 10), l("any", "IOTID", 5), l("any", "ModelID", 1),
		l("any", "SynopticID", 10), l("any", "SynopticTmplID", 0),
		l(RoleAreaManager, "AppID", 3), l(RoleAreaManager, "DAAppID", 3), l(RoleAreaManager, "DataTableID", 30),
		l(RoleAreaManager, "PoiTableID", 30), l(RoleAreaManager, "PortiaID", 1), l(RoleAreaManager, "SynopticID", 10),
		l(RoleAreaManager, "SynopticTmplID", 10),
		l(RoleManager, "DataTableID", 2), l(RoleManager, "PoiTableID", 2), l(RoleManager, "SynopticID", 5), l(RoleManager, "SynopticTmplID", 5),
		l(RoleRootAdmin, "BrokerID", 999), l(RoleRootAdmin, "DAAppID", 10), l(RoleRootAdmin, "DashboardID", 100),
		l(RoleRootAdmin, "DataTableID", 100), l(RoleRootAdmin, "IOTID", 999), l(RoleRootAdmin, "ModelID", 999),
		l(RoleRootAdmin, "PoiTableID", 100), l(RoleRootAdmin, "PortiaID", 1), l(RoleRootAdmin, "SynopticID", 999),
		l(RoleRootAdmin, "SynopticTmplID", 999),
		l(RoleToolAdmin, "AppID", 10), l(RoleToolAdmin, "BrokerID", 20), l(RoleToolAdmin, "DAAppID", 3), l(RoleToolAdmin, "DashboardID", 50),
		l(RoleToolAdmin, "DataTableID", 50), l(RoleToolAdmin, "IOTID", 20), l(RoleToolAdmin, "ModelID", 20),
		l(RoleToolAdmin, "PoiTableID", 50), l(RoleToolAdmin, "PortiaID", 1), l(RoleToolAdmin, "SynopticID", 50),
		l(RoleToolAdmin, "SynopticTmplID", 50),
	}
}

// ownRow is a row of the ownership table (profiledb.ownership).
type ownRow struct {
	id          int64
	username    string
	elementID   string
	elementType string
	elementName string
	elementURL  *string
	details     json.RawMessage // a JSON text as register stored it; nil: NULL
	pubkeySHA1  string
	created     time.Time
	deleted     time.Time // zero: NULL
	deletedBy   string
}

// delegationMeta is what the datamanager stores beyond the delegation.
type delegationMeta struct {
	id       int64
	inserted time.Time
}

// OwnershipRow is a row of GET /ownership-api/v1/list/ as list/index.php
// writes it: the table's columns without id, elementDetails JSON-decoded,
// publickeySHA1 only when set, deleted and deletedBy only with
// includeDeleted. ID (not serialized) keeps the table order.
type OwnershipRow struct {
	ID             int64           `json:"-"`
	Username       string          `json:"username"`
	ElementID      string          `json:"elementId"`
	ElementType    string          `json:"elementType"`
	ElementName    string          `json:"elementName"`
	ElementURL     *string         `json:"elementUrl"`
	ElementDetails json.RawMessage `json:"elementDetails"`
	PublickeySHA1  string          `json:"publickeySHA1,omitempty"`
	Created        string          `json:"created"`
	Deleted        *string         `json:"deleted,omitempty"`
	DeletedBy      *string         `json:"deletedBy,omitempty"`
}

// ElementDetails is the elementDetails of an IOTID row as the IoT
// Directory's insert_device (web/api/common.php) registers it: k1, k2,
// [edgegateway_type, edgegateway_uri,] contextbroker. No entity type.
// PublicKey, PublicKeys and Signing are edgegate extensions, present only
// for devices that carry public keys (set through the admin surface or the
// companion's key rotation).
type ElementDetails struct {
	K1              string `json:"k1"`
	K2              string `json:"k2"`
	EdgegatewayType string `json:"edgegateway_type,omitempty"`
	EdgegatewayURI  string `json:"edgegateway_uri,omitempty"`
	ContextBroker   string `json:"contextbroker"`
	PublicKey       string `json:"publickey,omitempty"`
	PublicKeys      string `json:"publickeys,omitempty"`
	Signing         string `json:"signing,omitempty"`
}

// DelegationRow is a delegation as the datamanager's DelegationSerializer
// writes it: null fields are left out; insertTime is in milliseconds.
type DelegationRow struct {
	ID                 int64  `json:"id"`
	UsernameDelegator  string `json:"usernameDelegator,omitempty"`
	UsernameDelegated  string `json:"usernameDelegated,omitempty"`
	ElementID          string `json:"elementId"`
	ElementType        string `json:"elementType"`
	InsertTime         int64  `json:"insertTime"`
	GroupnameDelegated string `json:"groupnameDelegated,omitempty"`
	Kind               string `json:"kind"`
}

// AccessCheck is the datamanager's Response of v3 access/check.
type AccessCheck struct {
	Result  bool    `json:"result"`
	Message *string `json:"message"`
	Kind    string  `json:"kind"`
}

// ElementID is the platform's id of a device: "<org>:<broker>:<device>".
func (s *Server) ElementID(device string) string {
	return s.opts.Organization + ":" + s.opts.BrokerName + ":" + device
}

// deviceURI is the device's Km4City URI, the elementUrl the IoT Directory
// registers ($result["content"] of registerKB).
func (s *Server) deviceURI(device string) string {
	return "http://www.disit.org/km4city/resource/iot/" + s.opts.BrokerName + "/" + s.opts.Organization + "/" + device
}

// initPlatform checks the platform options; it runs in New before any
// device is registered.
func (s *Server) initPlatform() error {
	if s.opts.Limits == nil {
		s.opts.Limits = StockLimits()
	}
	s.ps.users = map[string]User{}
	for i, u := range s.opts.Users {
		switch {
		case !usernameRE.MatchString(u.Username):
			return fmt.Errorf("users[%d].username must match %s: %q", i, usernameRE, u.Username)
		case u.Role != "" && !slices.Contains([]string{RoleRootAdmin, RoleToolAdmin, RoleAreaManager, RoleManager, RoleObserver}, u.Role):
			return fmt.Errorf("users[%d].role must be RootAdmin, ToolAdmin, AreaManager, Manager or Observer: %q", i, u.Role)
		}
		if u.Role == "" {
			u.Role = RoleManager
		}
		if u.Organization == "" {
			u.Organization = s.opts.Organization
		}
		key := strings.ToLower(u.Username)
		if _, dup := s.ps.users[key]; dup {
			return fmt.Errorf("users[%d].username is a duplicate: %q", i, u.Username)
		}
		s.ps.users[key] = u
	}
	for i, t := range s.opts.TrustIssuers {
		if t.Issuer == "" {
			return fmt.Errorf("trust_issuers[%d].issuer is empty", i)
		}
	}
	s.ps.dirDevices = map[string]*dirDevice{}
	s.ps.backendFaults = map[string]*BackendError{}
	return nil
}

// platformUser returns the account of name: listed in Options.Users, or
// an implicit user when no users are listed. known is false for a name
// the LDAP does not hold (no organization, no role).
func (s *Server) platformUser(name string) (u User, known bool) {
	if u, ok := s.ps.users[strings.ToLower(name)]; ok {
		return u, true
	}
	if len(s.ps.users) == 0 {
		return User{Username: name, Role: RoleManager, Organization: s.opts.Organization}, true
	}
	return User{Username: name, Organization: "-"}, false
}

// userRoles is the "roles" claim of name's tokens and userinfo.
func (s *Server) userRoles(name string) []string {
	if u, known := s.platformUser(name); known && u.Role != "" {
		return []string{u.Role}
	}
	return []string{}
}

// userOrg is name's LDAP organization; "" for none.
func (s *Server) userOrg(name string) string {
	u, _ := s.platformUser(name)
	if u.Organization == "-" {
		return ""
	}
	return u.Organization
}

// mainRole is session.php's $uinfo->mainRole: the first of its $ROLES the
// user has, else "none".
func (s *Server) mainRole(name string) string {
	roles := s.userRoles(name)
	for _, r := range []string{RoleRootAdmin, RoleToolAdmin, RoleAreaManager, RoleManager, RoleObserver, "Public"} {
		if slices.Contains(roles, r) {
			return r
		}
	}
	return "none"
}

// groupDNs is LDAPUserDAOImpl.getGroupAndOUnames: the user's groups
// ("cn=G,ou=Org,base") and organizational units ("ou=Org,base").
func (s *Server) groupDNs(name string) []string {
	u, _ := s.platformUser(name)
	org := s.userOrg(name)
	var out []string
	for _, g := range u.Groups {
		if org != "" {
			out = append(out, "cn="+g+",ou="+org+","+LDAPBaseDN)
		} else {
			out = append(out, "cn="+g+","+LDAPBaseDN)
		}
	}
	if org != "" {
		out = append(out, "ou="+org+","+LDAPBaseDN)
	}
	return out
}

// inGroup reports whether name belongs to group: an LDAP DN as the
// datamanager stores groupname_delegated, or a bare group or organization
// name (a convenience of the simulator).
func (s *Server) inGroup(name, group string) bool {
	if group == "" || name == AnonymousUser {
		return false // ANONYMOUS is no LDAP entry
	}
	dns := s.groupDNs(name)
	if slices.Contains(dns, group) {
		return true
	}
	u, _ := s.platformUser(name)
	return slices.Contains(u.Groups, group) || (s.userOrg(name) != "" && s.userOrg(name) == group)
}

// groupDN is the groupname_delegated of a delegation as the lists show it.
func (s *Server) groupDN(group string) string {
	if group == "" || strings.Contains(group, "=") {
		return group
	}
	if group == s.opts.Organization {
		return "ou=" + group + "," + LDAPBaseDN
	}
	return "cn=" + group + ",ou=" + s.opts.Organization + "," + LDAPBaseDN
}

// limitFor is get_limit_user (Ownership-API/common.php): the largest
// maxCount of the matching limits rows; ok false when none matches (SQL
// NULL).
func (s *Server) limitFor(user, role, elementType string) (limit int, ok bool) {
	org := s.userOrg(user)
	if org == "" {
		org = "any" // get_user_organization's answer without an LDAP entry
	}
	for _, l := range s.opts.Limits {
		if (l.Organization == "any" || l.Organization == org) && (l.Username == "any" || l.Username == user) &&
			(l.Role == "any" || l.Role == role) && l.ElementType == elementType {
			if !ok || l.MaxCount > limit {
				limit, ok = l.MaxCount, true
			}
		}
	}
	return limit, ok
}

// countLocked counts user's active rows of elementType.
func (s *Server) countLocked(user, elementType string) int {
	n := 0
	for _, r := range s.ps.rows {
		if r.username == user && r.elementType == elementType && r.deleted.IsZero() {
			n++
		}
	}
	return n
}

// registration is the body of POST /ownership-api/v1/register/.
type registration struct {
	ElementID      string
	ElementType    string
	ElementName    string
	ElementURL     *string
	ElementDetails json.RawMessage // nil: not given
	Username       string          // change of owner; "" keep
}

// registerError is a refusal of register/index.php: HTTP 400 and its body.
type registerError struct{ body string }

func (e *registerError) Error() string { return e.body }

// registerLocked is register/index.php on a decoded request: update the
// caller's active row of the element (all rows for a RootAdmin), or insert
// one if the caller's limit allows. It returns the row.
func (s *Server) registerLocked(user string, req registration) (ownRow, error) {
	role := s.mainRole(user)
	for i := range s.ps.rows {
		r := &s.ps.rows[i]
		if (role != RoleRootAdmin && r.username != user) || r.elementID != req.ElementID ||
			r.elementType != req.ElementType || !r.deleted.IsZero() {
			continue
		}
		if req.Username != "" && req.Username != r.username {
			nu, known := s.platformUser(req.Username)
			if !known {
				return ownRow{}, &registerError{`{"error":"invalid username ` + req.Username + ` attribute"}`}
			}
			limit, _ := s.limitFor(nu.Username, nu.Role, req.ElementType)
			if cur := s.countLocked(nu.Username, req.ElementType); cur >= limit {
				return ownRow{}, &registerError{fmt.Sprintf(`{"error":"reached limit of %d","limit":%d,"current":%d}`, limit, limit, cur)}
			}
			r.username = req.Username
		}
		r.elementName = req.ElementName
		if req.ElementURL != nil {
			r.elementURL = req.ElementURL
		}
		if req.ElementDetails != nil {
			r.details = req.ElementDetails
			r.pubkeySHA1 = publickeySHA1(req.ElementDetails)
		}
		return *r, nil
	}
	limit, hasLimit := s.limitFor(user, role, req.ElementType)
	cur := s.countLocked(user, req.ElementType)
	if !hasLimit || cur >= limit {
		lim := ""
		if hasLimit {
			lim = strconv.Itoa(limit)
		}
		// Stock concatenates the SQL value: a missing limit (NULL) makes
		// this body invalid JSON, as it is.
		return ownRow{}, &registerError{fmt.Sprintf(`{"error":"reached limit of %s","limit":%s,"current":%d}`, lim, lim, cur)}
	}
	s.ps.nextRowID++
	row := ownRow{id: s.ps.nextRowID, username: user, elementID: req.ElementID, elementType: req.ElementType,
		elementName: req.ElementName, elementURL: req.ElementURL, details: req.ElementDetails,
		pubkeySHA1: publickeySHA1(req.ElementDetails), created: s.now().UTC()}
	s.ps.rows = append(s.ps.rows, row)
	return row, nil
}

// publickeySHA1 is register/index.php's $idxAttrs: SHA1 of
// elementDetails.publickey, kept for list's pubkeySHA1 filter.
func publickeySHA1(details json.RawMessage) string {
	var d struct {
		PublicKey *string `json:"publickey"`
	}
	if json.Unmarshal(details, &d) != nil || d.PublicKey == nil {
		return ""
	}
	return sha1Hex(*d.PublicKey)
}

// deleteRowsLocked is delete/index.php: mark deleted every row of the
// caller (any row for a RootAdmin) with one of the ids and types. Like
// stock, rows deleted before count again.
func (s *Server) deleteRowsLocked(user string, types, ids []string) int {
	root := s.mainRole(user) == RoleRootAdmin
	n := 0
	now := s.now().UTC()
	for i := range s.ps.rows {
		r := &s.ps.rows[i]
		if (!root && r.username != user) || !slices.Contains(types, r.elementType) || !slices.Contains(ids, r.elementID) {
			continue
		}
		r.deleted, r.deletedBy = now, user
		n++
	}
	return n
}

// rowJSON is a row as list/index.php writes it.
func rowJSON(r ownRow, includeDeleted bool) OwnershipRow {
	out := OwnershipRow{ID: r.id, Username: r.username, ElementID: r.elementID, ElementType: r.elementType,
		ElementName: r.elementName, ElementURL: r.elementURL, ElementDetails: json.RawMessage("null"),
		PublickeySHA1: r.pubkeySHA1, Created: r.created.UTC().Format(mysqlTime)}
	if r.details != nil {
		out.ElementDetails = r.details // json_decode of the stored text
	}
	if includeDeleted {
		if !r.deleted.IsZero() {
			d, by := r.deleted.UTC().Format(mysqlTime), r.deletedBy
			out.Deleted, out.DeletedBy = &d, &by
		}
	}
	return out
}

// deviceDetails is the elementDetails the IoT Directory registers for d.
func (s *Server) deviceDetails(d Device, edgeType, edgeURI string) json.RawMessage {
	det := ElementDetails{K1: d.K1, K2: d.K2, EdgegatewayType: edgeType, EdgegatewayURI: edgeURI,
		ContextBroker: s.opts.BrokerName, Signing: d.Signing}
	if len(d.PublicKeys) > 0 {
		det.PublicKey = string(d.PublicKeys[0])
		set, _ := json.Marshal(map[string]any{"keys": d.PublicKeys})
		det.PublicKeys = string(set)
	}
	b, _ := json.Marshal(det) // plain strings: cannot fail
	return b
}

// noteRegistrationLocked records (or updates) d's ownership row, as the
// IoT Directory's insert does through register: a device registered
// through Options.Devices or the admin surface is not limited. A new owner
// ends the old row and opens a new one, as a transfer does.
func (s *Server) noteRegistrationLocked(d Device) {
	eid := s.ElementID(d.ID)
	edgeType, edgeURI := "", ""
	if dd := s.ps.dirDevices[d.ID]; dd != nil {
		edgeType, edgeURI = dd.edgeType, dd.edgeURI
	}
	details := s.deviceDetails(d, edgeType, edgeURI)
	for i := len(s.ps.rows) - 1; i >= 0; i-- {
		r := &s.ps.rows[i]
		if r.elementID != eid || r.elementType != ElementTypeIOTID || !r.deleted.IsZero() {
			continue
		}
		if r.username == d.Owner {
			r.details, r.pubkeySHA1 = details, publickeySHA1(details)
			return
		}
		r.deleted, r.deletedBy = s.now().UTC(), r.username
		break
	}
	s.ps.nextRowID++
	u := s.deviceURI(d.ID)
	s.ps.rows = append(s.ps.rows, ownRow{id: s.ps.nextRowID, username: d.Owner, elementID: eid, elementType: ElementTypeIOTID,
		elementName: d.ID, elementURL: &u, details: details, pubkeySHA1: publickeySHA1(details), created: s.now().UTC()})
}

// noteRemovalLocked ends the device's active ownership rows.
func (s *Server) noteRemovalLocked(id string) {
	eid := s.ElementID(id)
	for i := range s.ps.rows {
		if r := &s.ps.rows[i]; r.elementID == eid && r.elementType == ElementTypeIOTID && r.deleted.IsZero() {
			r.deleted, r.deletedBy = s.now().UTC(), r.username
		}
	}
	delete(s.ps.dirDevices, id)
}

// noteDelegationsLocked gives every delegation in force an id and an
// insertion time, keeping those of delegations that were already there,
// and forgets the ones gone.
func (s *Server) noteDelegationsLocked() {
	keep := make(map[Delegation]delegationMeta, len(s.delegs))
	for _, dl := range s.delegs {
		if _, done := keep[dl]; done {
			continue
		}
		m, ok := s.ps.delegMeta[dl]
		if !ok {
			s.ps.nextDelegID++
			m = delegationMeta{id: s.ps.nextDelegID, inserted: s.now()}
		}
		keep[dl] = m
	}
	s.ps.delegMeta = keep
}

// elementOf is the element id a delegation targets: a device of this
// server by its id, else an element id as given.
func (s *Server) elementOf(dl Delegation) string {
	if _, ok := s.devices[dl.Device]; ok || strings.Count(dl.Device, ":") < 2 {
		return s.ElementID(dl.Device)
	}
	return dl.Device
}

// phpQuery parses a query string as PHP does: pairs split on "&" only, so
// a ";" stays in the value (the Ownership API's "type=IOTID;AppID").
func phpQuery(raw string) url.Values {
	out := url.Values{}
	for _, pair := range strings.Split(raw, "&") {
		if pair == "" {
			continue
		}
		k, v, _ := strings.Cut(pair, "=")
		k, err1 := url.QueryUnescape(k)
		v, err2 := url.QueryUnescape(v)
		if err1 != nil || err2 != nil {
			continue
		}
		out.Add(k, v)
	}
	return out
}

// ownerLocked is the user of the element's active ownership row.
func (s *Server) ownerLocked(elementID string) string {
	for _, r := range s.ps.rows {
		if r.elementID == elementID && r.deleted.IsZero() {
			return r.username
		}
	}
	return ""
}

// delegationRowsLocked is every delegation in force with its stored
// columns, in id order.
func (s *Server) delegationRowsLocked() []DelegationRow {
	out := []DelegationRow{}
	seen := map[Delegation]bool{}
	for _, dl := range s.delegs {
		if seen[dl] {
			continue
		}
		seen[dl] = true
		eid := s.elementOf(dl)
		delegator := dl.Delegator
		if delegator == "" {
			delegator = s.ownerLocked(eid)
		}
		m := s.ps.delegMeta[dl]
		out = append(out, DelegationRow{ID: m.id, UsernameDelegator: delegator, UsernameDelegated: dl.User,
			ElementID: eid, ElementType: ElementTypeIOTID, InsertTime: m.inserted.UnixMilli(),
			GroupnameDelegated: s.groupDN(dl.Group), Kind: dl.Kind})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// OwnershipRows returns every ownership row of user (any element type),
// removed ones included, in table order, as list/index.php writes them
// with includeDeleted.
func (s *Server) OwnershipRows(user string) []OwnershipRow {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := []OwnershipRow{}
	for _, r := range s.ps.rows {
		if r.username == user {
			out = append(out, rowJSON(r, true))
		}
	}
	return out
}

// DelegationRows lists the delegations in force that user received,
// directly or through a group (delegator false: the v2 "delegated" list),
// or gave (delegator true: the "delegator" list), in id order.
func (s *Server) DelegationRows(user string, delegator bool) []DelegationRow {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.delegationListLocked(user, delegator, "")
}

func (s *Server) delegationListLocked(user string, delegator bool, groupFilter string) []DelegationRow {
	out := []DelegationRow{}
	for _, row := range s.delegationRowsLocked() {
		if delegator {
			// DelegationDAOImpl.getDelegationDelegatorByUsername.
			if row.UsernameDelegator == user {
				out = append(out, row)
			}
			continue
		}
		// DelegationDAOImpl.getDelegationDelegatedByUsername: to the user
		// (case-insensitive) or to a group or organization of theirs.
		if !strings.EqualFold(row.UsernameDelegated, user) && !(row.GroupnameDelegated != "" && s.inGroup(user, row.GroupnameDelegated)) {
			continue
		}
		if groupFilter != "" && !s.inGroup(row.UsernameDelegator, groupFilter) {
			continue // groupname=: only delegators of that group
		}
		out = append(out, row)
	}
	return out
}

// accessCheckLocked is AccessServiceImpl.checkAccessFromApp: the
// delegations of the element first (MODIFY, READ_WRITE, READ_ACCESS,
// WRITE_ONLY order; ANONYMOUS → PUBLIC, the user → DELEGATED, a group of
// theirs → GROUP-DELEGATED), then RootAdmin, then ownership. A response
// without a delegation keeps kind READ_ACCESS (Response's constructor).
func (s *Server) accessCheckLocked(user, elementID, elementType string) AccessCheck {
	msg := func(m string) *string { return &m }
	var mine []DelegationRow
	for _, row := range s.delegationRowsLocked() {
		if row.ElementID == elementID && row.ElementType == elementType {
			mine = append(mine, row)
		}
	}
	for _, kind := range []string{KindModify, KindReadWrite, KindReadAccess, KindWriteOnly} { // Delegation.orderDelegations
		for _, d := range mine {
			if d.Kind != kind {
				continue
			}
			switch {
			case d.UsernameDelegated == AnonymousUser:
				return AccessCheck{Result: true, Message: msg(AccessPublic), Kind: d.Kind}
			case d.UsernameDelegated != "" && strings.EqualFold(d.UsernameDelegated, user):
				return AccessCheck{Result: true, Message: msg(AccessDelegated), Kind: d.Kind}
			case d.GroupnameDelegated != "" && s.inGroup(user, d.GroupnameDelegated):
				return AccessCheck{Result: true, Message: msg(AccessGroupDelegated), Kind: d.Kind}
			}
		}
	}
	if s.mainRole(user) == RoleRootAdmin {
		return AccessCheck{Result: true, Message: msg(AccessRootAdmin), Kind: KindReadAccess}
	}
	stripped := elementID
	if strings.HasPrefix(elementID, "http://") || strings.HasPrefix(elementID, "https://") {
		stripped = elementID[strings.LastIndex(elementID, "/")+1:]
	}
	for _, r := range s.ps.rows {
		if r.elementID == stripped && r.deleted.IsZero() && r.username == user {
			return AccessCheck{Result: true, Message: msg(AccessOwner), Kind: KindReadAccess}
		}
	}
	return AccessCheck{Result: false, Kind: KindReadAccess}
}

// --- authentication ---

// errNoUsername: the userinfo named no user (session.php: 400).
var errNoUsername = errors.New("no username found")

// ownershipUser answers an Ownership API fault (BackendOwnership), else
// authenticates the request as session.php does; on failure it has answered.
func (s *Server) ownershipUser(w http.ResponseWriter, r *http.Request) (string, bool) {
	if f := s.backendFault(BackendOwnership); f != nil {
		writeText(w, f.Status, http.StatusText(f.Status))
		return "", false
	}
	tok := phpQuery(r.URL.RawQuery).Get("accessToken")
	if tok == "" {
		h := r.Header.Get("Authorization")
		if len(h) > 8 && strings.EqualFold(h[:7], "bearer ") {
			tok = h[7:]
		} else {
			s.log.Info("api refused", "path", r.URL.Path, "status", http.StatusUnauthorized, "reason", "no token")
			writeText(w, http.StatusUnauthorized, "No token provided or invalid authorization header")
			return "", false
		}
	}
	user, err := s.resolveUser(r.Context(), tok)
	if err != nil {
		s.log.Info("api refused", "path", r.URL.Path, "status", http.StatusUnauthorized, "err", err)
		// session.php echoes the userinfo's error object.
		w.Header().Set("Content-Type", "text/html; charset=UTF-8")
		w.WriteHeader(http.StatusUnauthorized)
		b, _ := json.Marshal(keycloakInvalidToken)
		w.Write(b)
		return "", false
	}
	return user, true
}

// datamanagerUser authenticates like the datamanager's
// AccessTokenAuthenticationFilter; on failure it has answered.
func (s *Server) datamanagerUser(w http.ResponseWriter, r *http.Request) (string, bool) {
	tok := ""
	if h := r.Header.Get("Authorization"); len(h) > 8 {
		tok = h[7:]
	} else {
		tok = r.URL.Query().Get("accessToken")
	}
	if tok == "" {
		// The filter lets the request through unauthenticated; Spring
		// Security then refuses it.
		writeJSON(w, http.StatusUnauthorized, map[string]any{"result": false, "message": "Access token not present", "kind": nil})
		return "", false
	}
	user, err := s.resolveUser(r.Context(), strings.TrimSpace(tok))
	if err != nil {
		s.log.Info("api refused", "path", r.URL.Path, "status", http.StatusUnauthorized, "err", err)
		writeJSON(w, http.StatusUnauthorized, map[string]any{"result": false, "message": MsgAccessTokenNotValid, "kind": nil})
		return "", false
	}
	return user, true
}

// writeText answers a plain body, as PHP's echo does.
func writeText(w http.ResponseWriter, status int, body string) {
	w.Header().Set("Content-Type", "text/html; charset=UTF-8")
	w.WriteHeader(status)
	w.Write([]byte(body))
}

// --- Ownership API handlers ---

// handleOwnershipList is GET /ownership-api/v1/list/ (list/index.php).
func (s *Server) handleOwnershipList(w http.ResponseWriter, r *http.Request) {
	user, ok := s.ownershipUser(w, r)
	if !ok {
		return
	}
	q := phpQuery(r.URL.RawQuery)
	_, includeDeleted := q["includeDeleted"]
	onlyMine := q.Get("onlyMine") == "true"
	var types, ids []string
	if _, ok := q["type"]; ok {
		types = strings.Split(q.Get("type"), ";")
	}
	if _, ok := q["elementId"]; ok {
		ids = strings.Split(q.Get("elementId"), ";")
	}
	pk := q.Get("pubkeySHA1")
	all := s.mainRole(user) == RoleRootAdmin && !onlyMine
	s.mu.Lock()
	out := []OwnershipRow{}
	for _, row := range s.ps.rows {
		switch {
		case !includeDeleted && !row.deleted.IsZero():
		case !all && row.username != user:
		case types != nil && !slices.Contains(types, row.elementType):
		case ids != nil && !slices.Contains(ids, row.elementID):
		case pk != "" && row.pubkeySHA1 != pk:
		default:
			out = append(out, rowJSON(row, includeDeleted))
		}
	}
	s.mu.Unlock()
	w.Header().Set("Cache-Control", "no-store") // rows hold K1/K2
	w.Header().Set("Access-Control-Allow-Origin", "*")
	writeJSON(w, http.StatusOK, out)
}

// handleOwnershipRegister is POST /ownership-api/v1/register/
// (register/index.php).
func (s *Server) handleOwnershipRegister(w http.ResponseWriter, r *http.Request) {
	user, ok := s.ownershipUser(w, r)
	if !ok {
		return
	}
	body, err := readBounded(w, r, maxAdminBody)
	if err != nil || len(bytes.TrimSpace(body)) == 0 {
		writeText(w, http.StatusBadRequest, "no data via POST")
		return
	}
	var obj map[string]json.RawMessage
	if err := json.Unmarshal(body, &obj); err != nil {
		var any any
		if json.Unmarshal(body, &any) == nil {
			writeText(w, http.StatusBadRequest, "no JSON object")
		} else {
			writeText(w, http.StatusBadRequest, "invalid JSON format")
		}
		return
	}
	if obj == nil {
		writeText(w, http.StatusBadRequest, "invalid JSON format") // json_decode("null") is NULL
		return
	}
	str := func(k string) (string, bool) {
		v, ok := obj[k]
		if !ok || string(v) == "null" {
			return "", false
		}
		var s string
		if json.Unmarshal(v, &s) != nil {
			return strings.Trim(string(v), `"`), true // PHP casts scalars
		}
		return s, true
	}
	var req registration
	for _, k := range []string{"elementId", "elementType", "elementName"} {
		v, ok := str(k)
		if !ok {
			writeText(w, http.StatusBadRequest, `{"error":"missing `+k+` attribute"}`)
			return
		}
		switch k {
		case "elementId":
			req.ElementID = v
		case "elementType":
			req.ElementType = v
		case "elementName":
			req.ElementName = v
		}
	}
	if !slices.Contains(validElementTypes, req.ElementType) {
		writeText(w, http.StatusBadRequest, `{"error":"invalid elementType `+req.ElementType+`"}`)
		return
	}
	if v, ok := str("elementUrl"); ok {
		req.ElementURL = &v
	}
	if v, ok := obj["elementDetails"]; ok && string(v) != "null" {
		var c bytes.Buffer
		if json.Compact(&c, v) == nil {
			req.ElementDetails = c.Bytes()
		}
	}
	req.Username, _ = str("username")
	s.mu.Lock()
	row, err := s.registerLocked(user, req)
	s.mu.Unlock()
	var re *registerError
	if errors.As(err, &re) {
		s.log.Info("ownership register refused", "user", user, "type", req.ElementType, "answer", re.body)
		writeText(w, http.StatusBadRequest, re.body)
		return
	}
	if row.elementType == ElementTypeAppID {
		s.noteAppRegistration(user, row, obj)
	}
	// json_encode($o): the request object with username and id added.
	obj["username"], _ = json.Marshal(row.username)
	obj["id"], _ = json.Marshal(row.id)
	if req.ElementDetails != nil {
		obj["elementDetails"] = req.ElementDetails
	}
	b, _ := json.Marshal(obj)
	s.log.Info("ownership registered", "user", user, "type", row.elementType, "element", row.elementID)
	writeText(w, http.StatusOK, string(b))
}

// handleOwnershipLimits is GET /ownership-api/v1/limits/ (limits/index.php).
// Numbers come out as strings, as mysqli returns them.
func (s *Server) handleOwnershipLimits(w http.ResponseWriter, r *http.Request) {
	user, ok := s.ownershipUser(w, r)
	if !ok {
		return
	}
	q := phpQuery(r.URL.RawQuery)
	typ := strings.TrimSpace(q.Get("type"))
	if typ == "" {
		typ = "DashboardID;AppID;IOTID;DAAppID"
	}
	username, role := user, s.mainRole(user)
	if u := q.Get("username"); u != "" && role == RoleRootAdmin {
		pu, known := s.platformUser(u)
		if !known {
			writeText(w, http.StatusBadRequest, "invalid username no role found for "+u)
			return
		}
		username, role = pu.Username, pu.Role
	}
	org := s.userOrg(username)
	if org == "" {
		org = "any"
	}
	type lim struct {
		ElementType string  `json:"elementType"`
		Limit       *string `json:"limit"`
		Current     string  `json:"current"`
	}
	out := []lim{}
	s.mu.Lock()
	for _, t := range strings.Split(typ, ";") {
		l := lim{ElementType: t, Current: strconv.Itoa(s.countLocked(username, t))}
		if n, ok := s.limitFor(username, role, t); ok {
			v := strconv.Itoa(n)
			l.Limit = &v
		}
		out = append(out, l)
	}
	s.mu.Unlock()
	b, _ := json.Marshal(map[string]any{"username": username, "role": role, "organization": org, "limits": out})
	writeText(w, http.StatusOK, string(b))
}

// handleOwnershipDelete is /ownership-api/v1/delete/ (delete/index.php).
func (s *Server) handleOwnershipDelete(w http.ResponseWriter, r *http.Request) {
	user, ok := s.ownershipUser(w, r)
	if !ok {
		return
	}
	q := phpQuery(r.URL.RawQuery)
	if _, ok := q["type"]; !ok {
		writeText(w, http.StatusBadRequest, "")
		return
	}
	if _, ok := q["elementId"]; !ok {
		writeText(w, http.StatusBadRequest, "")
		return
	}
	s.mu.Lock()
	n := s.deleteRowsLocked(user, strings.Split(q.Get("type"), ";"), strings.Split(q.Get("elementId"), ";"))
	s.mu.Unlock()
	status := http.StatusOK
	if n == 0 {
		status = http.StatusBadRequest
	}
	writeText(w, status, fmt.Sprintf("{ \"deleted\": %d}\n", n))
}

// --- datamanager handlers ---

// springMissingParam answers like Spring for a missing @RequestParam.
func springMissingParam(w http.ResponseWriter, r *http.Request, name string) {
	writeJSON(w, http.StatusBadRequest, map[string]any{
		"timestamp": time.Now().UnixMilli(), "status": 400, "error": "Bad Request",
		"message": "Required String parameter '" + name + "' is not present", "path": r.URL.Path,
	})
}

// handleDelegations serves v2 .../username/{user}/delegated and
// .../delegator (UserController, DelegationServiceImpl).
func (s *Server) handleDelegations(delegator bool) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if f := s.backendFault(BackendDatamanager); f != nil {
			writeText(w, f.Status, http.StatusText(f.Status))
			return
		}
		user, ok := s.datamanagerUser(w, r)
		if !ok {
			return
		}
		q := r.URL.Query()
		if _, ok := q["sourceRequest"]; !ok {
			springMissingParam(w, r, "sourceRequest")
			return
		}
		who := r.PathValue("user")
		// checkUsernameCredentials; a delegated list of ANONYMOUS is open
		// to anyone (getDelegationsDelegatedForUsername).
		if !strings.EqualFold(who, user) && s.mainRole(user) != RoleRootAdmin && (delegator || who != AnonymousUser) {
			s.log.Info("api refused", "path", r.URL.Path, "status", http.StatusUnauthorized, "user", user, "reason", "path user is not the token's user")
			w.Header().Set("Content-Type", "text/plain;charset=UTF-8")
			w.WriteHeader(http.StatusUnauthorized)
			w.Write([]byte("The logged user is not the same of the specified username"))
			return
		}
		var rows []DelegationRow
		if t, ok := q["elementType"]; !ok || t[0] == ElementTypeIOTID {
			s.mu.Lock()
			rows = s.delegationListLocked(who, delegator, q.Get("groupname"))
			s.mu.Unlock()
		}
		if len(rows) == 0 {
			w.WriteHeader(http.StatusNoContent) // "No data found"
			return
		}
		writeJSON(w, http.StatusOK, rows)
	}
}

// handleAccessCheck is GET /datamanager/api/v3/apps/{element}/access/check
// (AppsController.checkAccessV3).
func (s *Server) handleAccessCheck(w http.ResponseWriter, r *http.Request) {
	if f := s.backendFault(BackendDatamanager); f != nil {
		writeText(w, f.Status, http.StatusText(f.Status))
		return
	}
	user, ok := s.datamanagerUser(w, r)
	if !ok {
		return
	}
	q := r.URL.Query()
	for _, p := range []string{"sourceRequest", "elementType"} {
		if _, ok := q[p]; !ok {
			springMissingParam(w, r, p)
			return
		}
	}
	s.mu.Lock()
	res := s.accessCheckLocked(user, r.PathValue("element"), q.Get("elementType"))
	s.mu.Unlock()
	writeJSON(w, http.StatusOK, res)
}
