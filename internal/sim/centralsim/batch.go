package centralsim

import (
	"encoding/json"
	"net/http"
)

// maxBatchBytes bounds an op/update body. Orion's own inbound limit is 1 MB
// by default (-inReqPayloadMaxSize); a gateway batching readings must stay
// below it, and does (uplink.Options.BatchBytes).
const maxBatchBytes = maxUpdateBytes

// orionDefaultEntityType is the type Orion gives an entity created without
// one (DEFAULT_ENTITY_TYPE, src/lib/common/defaultValues.h).
const orionDefaultEntityType = "Thing"

type batchEntity struct {
	id, typ string
	attrs   []orionAttr
	v       verdict
}

// handleBatchUpdate is POST /v2/op/update on the bare Orion (DirectPath):
// the Orion Broker Filter has no such route, so only a gateway that reaches
// its broker directly batches. Semantics of Orion 3.12
// (src/lib/jsonParseV2/parseBatchUpdate.cpp, MongoCommonUpdate.cpp and the
// functional tests 0000_update_error_responses/error_responses_09*):
//
//   - "append": a missing entity is created (type "Thing" when none is
//     given); attributes are added or updated;
//   - "appendStrict": as append, but attributes that exist are not
//     touched and reported (422 Unprocessable "one or more of the
//     attributes in the request already exist: …");
//   - "update": existing entities and attributes only; the rest is
//     reported "do not exist: …" with 404 NotFound (no entity exists),
//     422 Unprocessable (nothing written) or 422 PartialUpdate (some
//     written: those WERE applied);
//   - "delete" and "replace" answer 501 (not simulated).
//
// Entities are processed in array order; each one with something applied
// is recorded as one Update, with the verdict of its signatures.
func (s *Server) handleBatchUpdate(w http.ResponseWriter, r *http.Request) {
	ref := Refusal{Method: r.Method, Path: r.URL.Path}
	fail := func(f *orionFail) { s.refuseOrion(w, ref, f.status, f.code, f.desc) }
	t, f := tenantOf(r)
	if f != nil {
		fail(f)
		return
	}
	body, f := readBody(w, r, maxBatchBytes)
	if f == nil {
		f = orionContentType(r, len(body))
	}
	if f != nil {
		fail(f)
		return
	}
	var req struct {
		ActionType json.RawMessage   `json:"actionType"`
		Entities   []json.RawMessage `json:"entities"`
	}
	if err := json.Unmarshal(body, &req); err != nil {
		fail(parseFail())
		return
	}
	var action string
	if json.Unmarshal(req.ActionType, &action) != nil {
		fail(badRequest("invalid JSON type for actionType"))
		return
	}
	switch action {
	case "append", "appendStrict", "update":
	case "delete", "replace":
		s.notSimulated(w, ref, "op/update "+action+" actions")
		return
	default:
		// Sic: Orion's text says "appendStric".
		fail(badRequest("invalid update action type: right ones are: append, appendStric, delete, replace, update"))
		return
	}
	if len(req.Entities) == 0 {
		fail(badRequest(orionEmptyEntities))
		return
	}
	ents := make([]batchEntity, 0, len(req.Entities))
	for _, raw := range req.Entities {
		e, f := parseBatchEntity(raw)
		if f != nil {
			ref.Device = e.id
			fail(f)
			return
		}
		ents = append(ents, e)
	}

	// Verify outside the lock: it is the slow part.
	for i := range ents {
		s.mu.Lock()
		dev := s.devices[ents[i].id]
		s.mu.Unlock()
		ents[i].v = s.verdictOf(dev, ents[i].id, ents[i].attrs)
	}

	var (
		ups        []Update
		desc       string // Orion's accumulated description
		anyEntity  bool   // some entity existed (or was created)
		anyApplied bool
		anyFailed  bool
		notifs     []pendingNotif
	)
	addDesc := func(first, next string) {
		if desc == "" {
			desc = first
		} else {
			desc += next
		}
	}
	s.mu.Lock()
	for _, be := range ents {
		key := entKey(t.service, be.id)
		e, ok := s.entities[key]
		if ok && (be.typ != "" && e.typ != be.typ || e.servicePath != t.updatePath()) {
			ok = false
		}
		name := enStr(be.id, be.typ)
		var res applyResult
		var snap attrSnapshot
		switch action {
		case "update":
			if !ok {
				anyFailed = true
				addDesc(orionDoNotExist+name+" - [entity itself]", ", "+name+" [entity itself]")
				continue
			}
			snap = s.snapshotLocked(e, be.attrs)
			res = updateExistingLocked(e, be.attrs)
			if len(res.missing) > 0 {
				anyFailed = true
				addDesc(orionDoNotExist+name+" - "+notExistList(res.missing), ", "+name+" - "+notExistList(res.missing))
			}
		default: // append, appendStrict
			if !ok {
				typ := be.typ
				if typ == "" {
					typ = orionDefaultEntityType
				}
				e = &entity{id: be.id, typ: typ, servicePath: t.updatePath(), attrs: map[string]ngsiAttr{}}
				s.entities[key] = e
			}
			attrs := be.attrs
			if action == "appendStrict" {
				var fresh []orionAttr
				var exist []string
				for _, a := range attrs {
					if _, dup := e.attrs[a.name]; dup {
						exist = append(exist, a.name)
					} else {
						fresh = append(fresh, a)
					}
				}
				if len(exist) > 0 {
					anyFailed = true
					addDesc("one or more of the attributes in the request already exist: "+name+" - "+notExistList(exist), ", "+name+" - "+notExistList(exist))
				}
				attrs = fresh
			}
			snap = s.snapshotLocked(e, attrs)
			res = appendLocked(e, attrs)
		}
		notifs = append(notifs, s.triggerLocked(t.service, e, snap.changedLocked(e))...) // orion_subs.go
		anyEntity = true
		if len(res.applied) > 0 {
			anyApplied = true
			u := s.newUpdate(be.id, "", res.applied, be.v)
			s.recordLocked(u)
			ups = append(ups, *u)
		}
	}
	s.mu.Unlock()
	s.notifyAsync(notifs)
	for _, u := range ups {
		s.notify(u)
	}
	s.log.Debug("batch update", "action", action, "entities", len(ents), "recorded", len(ups))
	switch {
	case !anyFailed:
		w.WriteHeader(http.StatusNoContent)
	case !anyEntity:
		fail(&orionFail{http.StatusNotFound, orionErrNotFound, desc})
	case !anyApplied:
		fail(&orionFail{http.StatusUnprocessableEntity, orionErrUnprocess, desc})
	default:
		fail(&orionFail{http.StatusUnprocessableEntity, orionErrPartial, desc})
	}
}

// parseBatchEntity parses one entity of an op/update: "id", optional
// "type", and NGSI attributes (parseEntityObject.cpp, then each attribute
// as parseContextAttribute).
func parseBatchEntity(raw json.RawMessage) (batchEntity, *orionFail) {
	names, vals, ok := orderedMembers(raw)
	if !ok {
		return batchEntity{}, parseFail()
	}
	var e batchEntity
	var an []string
	var av []json.RawMessage
	hasID := false
	for i, n := range names {
		switch n {
		case "id":
			if jsonKind(vals[i]) != "String" {
				return e, badRequest(orionJTypeEntID)
			}
			_ = json.Unmarshal(vals[i], &e.id)
			hasID = true
		case "type":
			if jsonKind(vals[i]) != "String" {
				return e, badRequest(orionJTypeEntType)
			}
			_ = json.Unmarshal(vals[i], &e.typ)
			if e.typ == "" {
				return e, badRequest("entity type length: 0, min length supported: 1")
			}
			if forbiddenIDChars(e.typ) {
				return e, badRequest(orionCharEntType)
			}
		default:
			an, av = append(an, n), append(av, vals[i])
		}
	}
	if !hasID || e.id == "" {
		return e, badRequest(orionEmptyEntityID)
	}
	if forbiddenIDChars(e.id) {
		return e, badRequest(orionCharEntID)
	}
	attrs, f := parseAttrList(an, av)
	if f != nil {
		return e, f
	}
	e.attrs = attrs
	return e, nil
}
