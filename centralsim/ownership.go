package centralsim

import (
	"encoding/json"
	"net/http"
	"sort"
	"time"
)

// The platform's Ownership API and the personal-data service's delegation
// lists, as a gateway's policy sync reads them:
//
//	GET /ownership-api/v1/list/?type=IOTID                                   (Bearer)
//	GET /datamanager/api/v2/username/{user}/delegated?sourceRequest=..&elementType=IOTID (Bearer)
//	GET /datamanager/api/v2/username/{user}/delegator?sourceRequest=..&elementType=IOTID (Bearer)
//
// Both read the same store as the broker filter: the filter grants exactly
// what these lists show.

// Defaults of the Ownership API's naming.
const (
	DefaultBrokerName   = "orion-1"
	DefaultOrganization = "Organization"
	// ElementTypeIOTID is the element type of an IoT device.
	ElementTypeIOTID = "IOTID"
)

// ownershipRow is one registration of a device, kept after the device is
// removed (with Deleted set), as the Ownership API does.
type ownershipRow struct {
	id      int64
	device  Device
	created time.Time
	deleted time.Time // zero: active
}

// delegationMeta is what the personal-data service stores beyond the
// delegation itself.
type delegationMeta struct {
	id       int64
	inserted time.Time
}

// OwnershipRow is a row of GET /ownership-api/v1/list/. ElementDetails is
// a JSON object for rows with an even id and a JSON-encoded string for
// rows with an odd id: the real platform serves both, so clients must
// accept both.
type OwnershipRow struct {
	ID             int64           `json:"id"`
	Username       string          `json:"username"`
	ElementID      string          `json:"elementId"`
	ElementType    string          `json:"elementType"`
	ElementName    string          `json:"elementName"`
	ElementURL     string          `json:"elementUrl"`
	ElementDetails json.RawMessage `json:"elementDetails"`
	Created        string          `json:"created"`
	Deleted        *string         `json:"deleted"`
}

// ElementDetails is the object inside OwnershipRow.ElementDetails.
type ElementDetails struct {
	K1            string `json:"k1"`
	K2            string `json:"k2"`
	ContextBroker string `json:"contextbroker"`
	Type          string `json:"type"`
	// PublicKey is the device's newest public key (a JWK), as the platform
	// keeps it; PublicKeys (an edgegate extension) is the JWK Set of all
	// of them, newest first, so older readings stay verifiable.
	PublicKey  string `json:"publickey,omitempty"`
	PublicKeys string `json:"publickeys,omitempty"`
	Signing    string `json:"signing,omitempty"`
}

// DelegationRow is a row of the personal-data service's delegation lists,
// with the field names of the platform's DelegationSerializer. InsertTime
// is in milliseconds since the epoch, as that serializer writes a Date;
// DeleteTime is always null (only delegations in force are listed).
type DelegationRow struct {
	ID                int64   `json:"id"`
	UsernameDelegator string  `json:"usernameDelegator"`
	UsernameDelegated string  `json:"usernameDelegated"`
	ElementID         string  `json:"elementId"`
	ElementType       string  `json:"elementType"`
	Kind              string  `json:"kind"`
	InsertTime        int64   `json:"insertTime"`
	DeleteTime        *string `json:"deleteTime"`
}

// ElementID is the platform's id of a device: "<org>:<broker>:<device>".
func (s *Server) ElementID(device string) string {
	return s.opts.Organization + ":" + s.opts.BrokerName + ":" + device
}

// noteRegistrationLocked records (or updates) d's ownership row. A new
// owner ends the old row and opens a new one, as a transfer does.
func (s *Server) noteRegistrationLocked(d Device) {
	for i := len(s.ps.rows) - 1; i >= 0; i-- {
		r := &s.ps.rows[i]
		if r.device.ID != d.ID || !r.deleted.IsZero() {
			continue
		}
		if r.device.Owner == d.Owner {
			r.device = d
			return
		}
		r.deleted = s.now()
		break
	}
	s.ps.nextRowID++
	s.ps.rows = append(s.ps.rows, ownershipRow{id: s.ps.nextRowID, device: d, created: s.now()})
}

// noteRemovalLocked ends the device's active ownership row.
func (s *Server) noteRemovalLocked(id string) {
	for i := range s.ps.rows {
		if r := &s.ps.rows[i]; r.device.ID == id && r.deleted.IsZero() {
			r.deleted = s.now()
		}
	}
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

// OwnershipRows returns the Ownership API's rows of user's devices,
// removed ones included, in id order.
func (s *Server) OwnershipRows(user string) []OwnershipRow {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := []OwnershipRow{}
	for _, r := range s.ps.rows {
		if r.device.Owner != user {
			continue
		}
		det := ElementDetails{K1: r.device.K1, K2: r.device.K2, ContextBroker: s.opts.BrokerName, Type: r.device.Type,
			Signing: r.device.Signing}
		if len(r.device.PublicKeys) > 0 {
			det.PublicKey = string(r.device.PublicKeys[0])
			set, _ := json.Marshal(map[string]any{"keys": r.device.PublicKeys})
			det.PublicKeys = string(set)
		}
		b, _ := json.Marshal(det) // plain strings: cannot fail
		if r.id%2 == 1 {
			b, _ = json.Marshal(string(b))
		}
		row := OwnershipRow{
			ID: r.id, Username: r.device.Owner,
			ElementID: s.ElementID(r.device.ID), ElementType: ElementTypeIOTID,
			ElementName: r.device.ID, ElementURL: s.BrokerURL(),
			ElementDetails: b, Created: r.created.UTC().Format(time.RFC3339),
		}
		if !r.deleted.IsZero() {
			d := r.deleted.UTC().Format(time.RFC3339)
			row.Deleted = &d
		}
		out = append(out, row)
	}
	return out
}

// DelegationRows lists the delegations in force that user received
// (delegator false: the "delegated" list) or gave (delegator true: the
// "delegator" list), in id order. The delegator is the device's owner.
func (s *Server) DelegationRows(user string, delegator bool) []DelegationRow {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := []DelegationRow{}
	seen := map[Delegation]bool{}
	for _, dl := range s.delegs {
		dev, ok := s.devices[dl.Device]
		if !ok || seen[dl] {
			continue
		}
		seen[dl] = true
		if (delegator && dev.Owner != user) || (!delegator && dl.User != user) {
			continue
		}
		m := s.ps.delegMeta[dl]
		out = append(out, DelegationRow{
			ID: m.id, UsernameDelegator: dev.Owner, UsernameDelegated: dl.User,
			ElementID: s.ElementID(dl.Device), ElementType: ElementTypeIOTID,
			Kind: dl.Kind, InsertTime: m.inserted.UnixMilli(),
		})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// apiError answers the platform APIs' errors (not the filter's).
func apiError(w http.ResponseWriter, status int, code, desc string) {
	if status == http.StatusUnauthorized {
		w.Header().Set("WWW-Authenticate", `Bearer error="invalid_token"`)
	}
	writeJSON(w, status, map[string]string{"error": code, "description": desc})
}

// tokenUser verifies the Bearer token and returns its user and client; on
// failure it has answered 401.
func (s *Server) tokenUser(w http.ResponseWriter, r *http.Request) (user, azp string, ok bool) {
	raw, err := bearerToken(r)
	if err == nil {
		user, azp, err = s.verifyToken(raw)
	}
	if err != nil {
		s.log.Info("api refused", "path", r.URL.Path, "status", http.StatusUnauthorized, "err", err)
		apiError(w, http.StatusUnauthorized, "unauthorized", MsgAccessTokenNotValid)
		return "", "", false
	}
	return user, azp, true
}

// handleOwnershipList is GET /ownership-api/v1/list/?type=IOTID.
func (s *Server) handleOwnershipList(w http.ResponseWriter, r *http.Request) {
	user, _, ok := s.tokenUser(w, r)
	if !ok {
		return
	}
	if t := r.URL.Query().Get("type"); t != "" && t != ElementTypeIOTID {
		writeJSON(w, http.StatusOK, []OwnershipRow{}) // no other element types here
		return
	}
	w.Header().Set("Cache-Control", "no-store") // rows hold K1/K2
	writeJSON(w, http.StatusOK, s.OwnershipRows(user))
}

// handleDelegations serves .../username/{user}/delegated and .../delegator.
func (s *Server) handleDelegations(delegator bool) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		user, _, ok := s.tokenUser(w, r)
		if !ok {
			return
		}
		if r.PathValue("user") != user {
			// The data manager answers a CredentialsException as 401.
			s.log.Info("api refused", "path", r.URL.Path, "status", http.StatusUnauthorized, "user", user, "reason", "path user is not the token's user")
			apiError(w, http.StatusUnauthorized, "unauthorized", "Credentials not valid")
			return
		}
		q := r.URL.Query()
		if q.Get("sourceRequest") == "" {
			// A required request parameter of the real controller.
			apiError(w, http.StatusBadRequest, "bad_request", "Required String parameter 'sourceRequest' is not present")
			return
		}
		if t := q.Get("elementType"); t != "" && t != ElementTypeIOTID {
			writeJSON(w, http.StatusOK, []DelegationRow{})
			return
		}
		writeJSON(w, http.StatusOK, s.DelegationRows(user, delegator))
	}
}
