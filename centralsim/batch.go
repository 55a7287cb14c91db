package centralsim

import (
	"encoding/json"
	"net/http"
)

// maxBatchBytes bounds an op/update body. Orion's own inbound limit is 1 MB
// by default (-inReqPayloadMaxSize); a gateway batching readings must stay
// below it, and does (uplink.Options.BatchBytes).
const maxBatchBytes = maxUpdateBytes

type batchRequest struct {
	ActionType string            `json:"actionType"`
	Entities   []json.RawMessage `json:"entities"`
}

type batchEntity struct {
	id, typ string
	dev     Device
	attrs   parsedAttrs
}

// handleBatchUpdate is POST /v2/op/update with actionType "append" (or
// "update", "appendStrict"): NGSI v2 batch update, as a gateway uses it
// against a broker it reaches without the filter.
//
// The checks are the filter's and Orion's, per entity: Bearer token,
// ownership (or a write delegation) of every entity, entity existence and
// type, attribute syntax; then each entity's signature attribute is
// verified like a PATCH's. The batch is all or nothing here: one refused
// entity refuses the whole request and nothing is applied (real Orion
// applies the entities before a failing one; a gateway that retries a
// refused batch entity by entity, as edgegate's uplink does, is correct
// under both). Entities are applied in array order, each recorded as one
// Update, so several entities with the same id in one batch are several
// updates, in order — as Orion processes them.
func (s *Server) handleBatchUpdate(w http.ResponseWriter, r *http.Request) {
	ref := Refusal{Method: r.Method, Path: r.URL.Path}
	user, err := s.verifyAccessToken(r)
	if err != nil {
		s.refuseFilter(w, ref, MsgAccessTokenNotValid)
		return
	}
	ref.User = user
	body, ok := s.readOrionBody(w, r, ref, maxBatchBytes)
	if !ok {
		return
	}
	var req batchRequest
	if err := json.Unmarshal(body, &req); err != nil {
		s.refuseOrion(w, ref, http.StatusBadRequest, "ParseError", orionParseErrorDesc)
		return
	}
	switch req.ActionType {
	case "append", "appendStrict", "update":
	default:
		s.refuseOrion(w, ref, http.StatusBadRequest, "BadRequest", "invalid update action type: "+req.ActionType)
		return
	}
	if len(req.Entities) == 0 {
		s.refuseOrion(w, ref, http.StatusBadRequest, "BadRequest", "empty entities vector")
		return
	}
	ents := make([]batchEntity, 0, len(req.Entities))
	for _, raw := range req.Entities {
		e, code, desc := parseBatchEntity(raw)
		if code != "" {
			ref.Device = e.id
			s.refuseOrion(w, ref, http.StatusBadRequest, code, desc)
			return
		}
		ents = append(ents, e)
	}

	// Filter checks: ownership of every entity.
	s.mu.Lock()
	for i := range ents {
		e := &ents[i]
		if !s.canAccessLocked(e.id, user, true) {
			s.mu.Unlock()
			ref.Device = e.id
			s.refuseFilter(w, ref, MsgCredentialsNotValid)
			return
		}
		e.dev = s.devices[e.id]
		if ent, ok := s.entities[e.id]; !ok || (e.typ != "" && ent.typ != e.typ) {
			s.mu.Unlock()
			ref.Device = e.id
			s.refuseOrion(w, ref, http.StatusNotFound, "NotFound", orionNotFoundDesc)
			return
		}
	}
	s.mu.Unlock()

	// Verify outside the lock: it is the slow part.
	ups := make([]Update, len(ents))
	for i := range ents {
		e := &ents[i]
		verdict, detail, claims := s.verdictOf(e.dev, e.attrs.raw)
		attrs := e.attrs.raw
		delete(attrs, "id")
		delete(attrs, "type")
		ups[i] = Update{Device: e.id, User: user, Attrs: attrs, Verdict: verdict, Detail: detail}
		if claims.Version != 0 {
			ups[i].Gateway, ups[i].Seq = claims.Gateway, claims.Seq
			ups[i].Alg, ups[i].KeyID = s.keyOfSignature(attrs)
		}
	}

	s.mu.Lock()
	now := s.now()
	for i := range ents {
		ent := s.entities[ents[i].id]
		if ent == nil { // removed meanwhile: Orion's append would create it
			ent = &entity{id: ents[i].id, typ: ents[i].dev.Type, attrs: map[string]ngsiAttr{}}
			s.entities[ents[i].id] = ent
		}
		ent.update(ents[i].attrs.parsed)
		ups[i].Time = now
		s.recordLocked(&ups[i])
	}
	s.mu.Unlock()
	for _, u := range ups {
		s.notify(u)
	}
	s.log.Debug("batch update accepted", "user", user, "entities", len(ents))
	w.WriteHeader(http.StatusNoContent)
}

// parseBatchEntity parses one entity of an op/update: "id", optional
// "type", and NGSI attributes.
func parseBatchEntity(raw json.RawMessage) (batchEntity, string, string) {
	var m map[string]json.RawMessage
	if err := json.Unmarshal(raw, &m); err != nil || m == nil {
		return batchEntity{}, "ParseError", orionParseErrorDesc
	}
	var e batchEntity
	if err := json.Unmarshal(m["id"], &e.id); err != nil || e.id == "" {
		return batchEntity{}, "BadRequest", "entity id is missing or not a string"
	}
	if t, ok := m["type"]; ok {
		if err := json.Unmarshal(t, &e.typ); err != nil {
			return e, "BadRequest", "entity type is not a string"
		}
	}
	// Parse the attributes alone, then put id and type back for the
	// signature check (VerifyAttrs matches the entity id with the claims).
	attrsOnly := make(map[string]json.RawMessage, len(m))
	for k, v := range m {
		if k != "id" && k != "type" {
			attrsOnly[k] = v
		}
	}
	attrs, code, desc := parseAttrMap(attrsOnly)
	if code != "" {
		return e, code, desc
	}
	attrs.raw["id"] = m["id"]
	if t, ok := m["type"]; ok {
		attrs.raw["type"] = t
	}
	e.attrs = attrs
	return e, "", ""
}
