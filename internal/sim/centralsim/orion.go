package centralsim

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"regexp"
	"strings"
	"time"
)

// An in-memory Orion Context Broker 3.12 (telefonicaid/fiware-orion, tag
// 3.12.0): the answers a gateway meets when it writes or reads an entity,
// behind the Orion Broker Filter (filter.go) or directly (DirectBrokerURL).
// Texts are copied from the sources named beside each; README.md lists what
// is and is not simulated.

// Orion's error codes and descriptions: src/lib/common/errorMessages.h.
const (
	orionErrParse        = "ParseError"    // ERROR_PARSE
	orionErrBadRequest   = "BadRequest"    // ERROR_BAD_REQUEST
	orionErrNotFound     = "NotFound"      // ERROR_NOT_FOUND
	orionErrUnprocess    = "Unprocessable" // ERROR_UNPROCESSABLE
	orionErrPartial      = "PartialUpdate" // ERROR_PARTIAL_UPDATE
	orionErrNotImpl      = "NotImplemented"
	orionParseErrorDesc  = "Errors found in incoming JSON buffer"                       // ERROR_DESC_PARSE
	orionNotFoundDesc    = "The requested entity has not been found. Check type and id" // ERROR_DESC_NOT_FOUND_ENTITY
	orionDoNotExist      = "do not exist: "                                             // ERROR_DESC_DO_NOT_EXIT
	orionEmptyPayload    = "empty payload"                                              // ERROR_DESC_BAD_REQUEST_EMPTY_PAYLOAD
	orionEmptyEntities   = "empty entities vector"                                      // ERROR_DESC_BAD_REQUEST_EMPTY_ENTITIES_VECTOR
	orionEntIDInPayload  = "entity id specified in payload"                             // ERROR_DESC_BAD_REQUEST_ENTID_IN_PAYLOAD
	orionEntTypeInPaylod = "entity type specified in payload"                           // ERROR_DESC_BAD_REQUEST_ENTTYPE_IN_PAYLOAD
	orionEmptyEntityID   = "entity id length: 0, min length supported: 1"               // ERROR_DESC_BAD_REQUEST_EMPTY_ENTITY_ID
	orionJTypeEntID      = "Invalid JSON type for entity id"                            // ERROR_DESC_BAD_REQUEST_INVALID_JTYPE_ENTID
	orionJTypeEntType    = "Invalid JSON type for entity type"                          // ERROR_DESC_BAD_REQUEST_INVALID_JTYPE_ENTTYPE
	orionCharEntID       = "Invalid characters in entity id"                            // ERROR_DESC_BAD_REQUEST_INVALID_CHAR_ENTID
	orionCharEntType     = "Invalid characters in entity type"                          // ERROR_DESC_BAD_REQUEST_INVALID_CHAR_ENTTYPE
	// OrionInvalidValueChars is Orion's answer to a string value holding one
	// of < > " ' = ; ( ): src/lib/ngsi/ContextAttribute.cpp (check).
	OrionInvalidValueChars = "Invalid characters in attribute value"
	// OrionInvalidMetadataChars is the same for a metadata value:
	// src/lib/ngsi/Metadata.cpp (check).
	OrionInvalidMetadataChars = "Invalid characters in metadata value"
	// orionDateInvalid: parseContextAttribute.cpp / parseMetadata.cpp.
	orionDateInvalid = "date has invalid format"
	// orionMaxID is MAX_ID_LEN, orion's limit on names and types
	// (src/lib/common/limits.h); MIN_ID_LEN is 1.
	orionMaxID = 256
	// maxUpdateBytes is Orion's default -inReqPayloadMaxSize (1 MB).
	maxUpdateBytes = 1 << 20
)

// Orion's default attribute types when none is given: defaultType() in
// src/lib/common/string.cpp (via parseContextAttribute.cpp).
const (
	typeText       = "Text"
	typeNumber     = "Number"
	typeBoolean    = "Boolean"
	typeStructured = "StructuredValue"
	typeNone       = "None"
	typeDateTime   = "DateTime"         // DATE_TYPE, common/globals.h
	typeDateAlt    = "ISO8601"          // DATE_TYPE_ALT
	typeTextUnres  = "TextUnrestricted" // TEXT_UNRESTRICTED_TYPE: no forbidden-char check on values
)

// orionError is Orion's error body.
type orionError struct {
	Error       string `json:"error"`
	Description string `json:"description"`
}

// orionFail is an Orion answer other than success.
type orionFail struct {
	status int
	code   string
	desc   string
}

func badRequest(desc string) *orionFail {
	return &orionFail{http.StatusBadRequest, orionErrBadRequest, desc}
}

func parseFail() *orionFail {
	return &orionFail{http.StatusBadRequest, orionErrParse, orionParseErrorDesc}
}

// tenant is where a request acts: Fiware-Service (lower-cased, "" = the
// default tenant) and Fiware-ServicePath.
type tenant struct {
	service     string
	servicePath string // "" when the request names none
}

// tenantRE is the check of RestService.cpp (servicePathCheck/tenantCheck):
// alphanumerics and underscore, at most 50 (SERVICE_NAME_MAX_LEN).
var tenantRE = regexp.MustCompile(`^[a-z0-9_]{1,50}$`)

// tenantOf reads Fiware-Service and Fiware-ServicePath. Orion lower-cases
// the service name (rest.cpp) before checking it.
func tenantOf(r *http.Request) (tenant, *orionFail) {
	t := tenant{service: strings.ToLower(r.Header.Get("Fiware-Service")), servicePath: r.Header.Get("Fiware-ServicePath")}
	if t.service != "" && !tenantRE.MatchString(t.service) {
		if len(t.service) > 50 {
			return t, badRequest("bad length - a tenant name can be max 50 characters long")
		}
		return t, badRequest("bad character in tenant name - only underscore and alphanumeric characters are allowed")
	}
	if t.servicePath != "" && !strings.HasPrefix(t.servicePath, "/") {
		return t, badRequest("Only /absolute/ Service Paths allowed [a service path must begin with /]")
	}
	return t, nil
}

// updatePath is the service path an update acts in: "/" by default.
func (t tenant) updatePath() string {
	if t.servicePath == "" {
		return "/"
	}
	return t.servicePath
}

// queryMatches reports whether an entity in path p is visible to a query:
// no header means every path ("/#"); "/a/#" means /a and below.
func (t tenant) queryMatches(p string) bool {
	sp := t.servicePath
	if sp == "" || sp == "/#" {
		return true
	}
	if base, ok := strings.CutSuffix(sp, "/#"); ok {
		return p == base || strings.HasPrefix(p, base+"/")
	}
	return p == sp
}

// entKey is the store key of an entity: its tenant and id. (Orion keys by
// id, type and service path; here an id is unique in its tenant, as the IoT
// Directory makes it.)
func entKey(service, id string) string { return service + "\x00" + id }

// createEntityLocked creates (or replaces) an entity as the IoT Directory's
// device insert does: latitude and longitude (type "float") and each
// declared attribute, value "" and its data type (web/api/device.php of
// disit/iot-directory, via its Orion call). attrs maps name to type; a ""
// type becomes "Text". Caller holds s.mu.
func (s *Server) createEntityLocked(service, id, typ string, attrs map[string]string) {
	e := &entity{id: id, typ: typ, servicePath: "/", attrs: make(map[string]ngsiAttr, len(attrs)+2)}
	empty := json.RawMessage(`""`)
	e.attrs["latitude"] = ngsiAttr{Type: "float", Value: empty}
	e.attrs["longitude"] = ngsiAttr{Type: "float", Value: empty}
	for name, t := range attrs {
		if t == "" {
			t = typeText
		}
		e.attrs[name] = ngsiAttr{Type: t, Value: empty}
	}
	s.entities[entKey(service, id)] = e
}

// orionAttr is one attribute of a request as Orion parses it.
type orionAttr struct {
	name      string
	typ       string
	typeGiven bool
	value     json.RawMessage // "null" when absent (NGSIv2: implicit null)
	md        map[string]json.RawMessage
	mdGiven   bool
	raw       json.RawMessage // as received
}

// orderedMembers splits a JSON object into its members in document order,
// as rapidjson iterates them (Orion names missing attributes in request
// order). ok is false when b is not a JSON object.
func orderedMembers(b []byte) (names []string, vals []json.RawMessage, ok bool) {
	dec := json.NewDecoder(bytes.NewReader(b))
	tok, err := dec.Token()
	if d, isDelim := tok.(json.Delim); err != nil || !isDelim || d != '{' {
		return nil, nil, false
	}
	for dec.More() {
		k, err := dec.Token()
		if err != nil {
			return nil, nil, false
		}
		name, _ := k.(string)
		var v json.RawMessage
		if err := dec.Decode(&v); err != nil {
			return nil, nil, false
		}
		names, vals = append(names, name), append(vals, v)
	}
	if _, err := dec.Token(); err != nil { // the closing brace
		return nil, nil, false
	}
	if _, err := dec.Token(); err != io.EOF { // trailing garbage
		return nil, nil, false
	}
	return names, vals, true
}

// parseAttrsBody parses the body of PATCH /v2/entities/{id}/attrs as
// parseEntity(ciP, eP, eidInURL=true) does (src/lib/jsonParseV2/parseEntity.cpp).
func parseAttrsBody(body []byte) ([]orionAttr, *orionFail) {
	if !json.Valid(body) {
		return nil, parseFail()
	}
	names, vals, ok := orderedMembers(body)
	if !ok {
		return nil, parseFail() // "JSON Object not found"
	}
	for _, n := range names {
		switch n {
		case "id":
			return nil, badRequest(orionEntIDInPayload)
		case "type":
			return nil, badRequest(orionEntTypeInPaylod)
		}
	}
	if len(names) == 0 {
		return nil, badRequest(orionEmptyPayload)
	}
	return parseAttrList(names, vals)
}

func parseAttrList(names []string, vals []json.RawMessage) ([]orionAttr, *orionFail) {
	out := make([]orionAttr, 0, len(names))
	for i, n := range names {
		a, err := parseOrionAttr(n, vals[i])
		if err != "" {
			return nil, badRequest(err)
		}
		out = append(out, a)
	}
	return out, nil
}

// jsonKind names a JSON value's kind as rapidjson's jsonParseTypeNames do.
func jsonKind(v json.RawMessage) string {
	v = bytes.TrimSpace(v)
	if len(v) == 0 {
		return "Null"
	}
	switch v[0] {
	case '"':
		return "String"
	case '{':
		return "Object"
	case '[':
		return "Array"
	case 't':
		return "True"
	case 'f':
		return "False"
	case 'n':
		return "Null"
	}
	return "Number"
}

// typedValue applies the type rules an attribute and a metadata share: a
// DateTime/ISO8601 value (not null) must parse and is rendered as Orion
// renders dates; with no type given, the default type of the value's kind.
// The string is Orion's error description, "" when none.
func typedValue(typ string, typeGiven bool, value json.RawMessage) (string, json.RawMessage, string) {
	kind := jsonKind(value)
	if (typ == typeDateTime || typ == typeDateAlt) && kind != "Null" {
		norm, ok := normalizeDate(value)
		if !ok {
			return typ, value, orionDateInvalid
		}
		value = norm
	}
	if !typeGiven {
		typ = defaultTypeOf(kind)
	}
	return typ, value, ""
}

func defaultTypeOf(kind string) string {
	switch kind {
	case "String":
		return typeText
	case "Number":
		return typeNumber
	case "True", "False":
		return typeBoolean
	case "Object", "Array":
		return typeStructured
	}
	return typeNone
}

// parseOrionAttr is parseContextAttribute + ContextAttribute::check
// (src/lib/jsonParseV2/parseContextAttribute.cpp, src/lib/ngsi/ContextAttribute.cpp).
// It returns Orion's error text, or "".
func parseOrionAttr(name string, raw json.RawMessage) (orionAttr, string) {
	a := orionAttr{name: name, value: json.RawMessage("null"), raw: raw}
	if jsonKind(raw) != "Object" {
		return a, "attribute must be a JSON object, unless keyValues option is used"
	}
	var members map[string]json.RawMessage
	if err := json.Unmarshal(raw, &members); err != nil {
		return a, "attribute must be a JSON object, unless keyValues option is used"
	}
	for k, v := range members {
		switch k {
		case "type":
			if jsonKind(v) != "String" {
				return a, "invalid JSON type for attribute type"
			}
			_ = json.Unmarshal(v, &a.typ)
			a.typeGiven = true
		case "value":
			a.value = bytes.TrimSpace(v)
		case "metadata":
			if jsonKind(v) != "Object" {
				return a, "metadata not a JSON object" // parseMetadataVector.cpp
			}
			var mds map[string]json.RawMessage
			_ = json.Unmarshal(v, &mds)
			a.md, a.mdGiven = make(map[string]json.RawMessage, len(mds)), true
			for mn, mv := range mds {
				norm, err := parseOrionMetadata(mv)
				if err != "" {
					return a, err
				}
				a.md[mn] = norm
			}
		default:
			return a, "unrecognized property for context attribute"
		}
	}
	var err string
	if a.typ, a.value, err = typedValue(a.typ, a.typeGiven, a.value); err != "" {
		return a, err
	}
	return a, checkOrionAttr(a)
}

// checkOrionAttr is ContextAttribute::check for NGSIv2 then
// Metadata::check for each metadata (src/lib/ngsi/Metadata.cpp).
func checkOrionAttr(a orionAttr) string {
	if msg := checkID("attribute name", a.name); msg != "" {
		return msg
	}
	if len(a.typ) > orionMaxID {
		return fmt.Sprintf("attribute type length: %d, max length supported: %d", len(a.typ), orionMaxID)
	}
	if len(a.typ) < 1 {
		return "attribute type length: 0, min length supported: 1"
	}
	if forbiddenIDChars(a.typ) {
		return "Invalid characters in attribute type"
	}
	if a.typ != typeTextUnres && valueHasForbidden(a.value) {
		return OrionInvalidValueChars
	}
	for _, mn := range sortedKeys(a.md) {
		if msg := checkID("metadata name", mn); msg != "" {
			return msg
		}
		var m struct {
			Type  string          `json:"type"`
			Value json.RawMessage `json:"value"`
		}
		_ = json.Unmarshal(a.md[mn], &m)
		if len(m.Type) > orionMaxID {
			return fmt.Sprintf("metadata type length: %d, max length supported: %d", len(m.Type), orionMaxID)
		}
		if len(m.Type) < 1 {
			return "metadata type length: 0, min length supported: 1"
		}
		if forbiddenIDChars(m.Type) {
			return "Invalid characters in metadata type"
		}
		// Only a plain string is checked here: Metadata::check does not
		// walk compound metadata values.
		if jsonKind(m.Value) == "String" {
			var s string
			if json.Unmarshal(m.Value, &s) == nil && forbiddenChars(s) {
				return OrionInvalidMetadataChars
			}
		}
	}
	return ""
}

// checkID checks an attribute or metadata name: 1..256 characters, none
// forbidden by forbiddenIdCharsV2.
func checkID(what, s string) string {
	switch {
	case len(s) < 1:
		return what + " length: 0, min length supported: 1"
	case len(s) > orionMaxID:
		return fmt.Sprintf("%s length: %d, max length supported: %d", what, len(s), orionMaxID)
	case forbiddenIDChars(s):
		if what == "attribute name" {
			return "Invalid characters in attribute name"
		}
		return "Invalid characters in metadata name"
	}
	return ""
}

// parseOrionMetadata is parseMetadataObject (src/lib/jsonParseV2/parseMetadata.cpp):
// only "type" and "value"; a DateTime must parse; a missing type becomes
// the default of the value's kind. It returns the metadata as stored.
func parseOrionMetadata(raw json.RawMessage) (json.RawMessage, string) {
	if jsonKind(raw) != "Object" {
		return nil, "metadata must be a JSON object"
	}
	var members map[string]json.RawMessage
	if err := json.Unmarshal(raw, &members); err != nil {
		return nil, "metadata must be a JSON object"
	}
	m := struct {
		Type  string          `json:"type"`
		Value json.RawMessage `json:"value"`
	}{Value: json.RawMessage("null")}
	typeGiven := false
	for k, v := range members {
		switch k {
		case "type":
			if jsonKind(v) != "String" {
				return nil, "invalid JSON type for attribute metadata type"
			}
			_ = json.Unmarshal(v, &m.Type)
			typeGiven = true
		case "value":
			m.Value = bytes.TrimSpace(v)
		default:
			return nil, "invalid JSON field for attribute metadata"
		}
	}
	var err string
	if m.Type, m.Value, err = typedValue(m.Type, typeGiven, m.Value); err != "" {
		return nil, err
	}
	b, _ := json.Marshal(m) // strings and valid raw JSON: cannot fail
	return b, ""
}

// commonForbidden is forbiddenChars.cpp's set: < > " ' = ; ( ).
func forbiddenChars(s string) bool { return strings.ContainsAny(s, `<>"'=;()`) }

// forbiddenIDChars is forbiddenIdCharsV2: no byte <= 32 or >= 127 (so no
// space and no non-ASCII), none of ? / # &, and the common set.
func forbiddenIDChars(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c <= 32 || c >= 127 || strings.IndexByte("?/#&", c) >= 0 {
			return true
		}
	}
	return forbiddenChars(s)
}

// valueHasForbidden checks a string value and, as CompoundValueNode::check
// does, every string leaf of a compound value.
func valueHasForbidden(v json.RawMessage) bool {
	switch jsonKind(v) {
	case "String":
		var s string
		return json.Unmarshal(v, &s) == nil && forbiddenChars(s)
	case "Object", "Array":
		var x any
		if json.Unmarshal(v, &x) != nil {
			return false
		}
		return anyForbidden(x)
	}
	return false
}

func anyForbidden(x any) bool {
	switch t := x.(type) {
	case string:
		return forbiddenChars(t)
	case []any:
		for _, e := range t {
			if anyForbidden(e) {
				return true
			}
		}
	case map[string]any:
		for _, e := range t {
			if anyForbidden(e) {
				return true
			}
		}
	}
	return false
}

// dateLayouts are the ISO 8601 forms parse8601Time (src/lib/common/globals.cpp)
// accepts that a client plausibly sends.
var dateLayouts = []string{
	time.RFC3339Nano,
	"2006-01-02T15:04:05.999999999Z0700",
	"2006-01-02T15:04:05.999999999",
	"2006-01-02T15:04Z07:00",
	"2006-01-02T15:04",
	"2006-01-02",
}

// normalizeDate parses an ISO 8601 string and renders it as Orion returns
// a DateTime: UTC with milliseconds ("2026-12-03T07:00:00.000Z").
func normalizeDate(v json.RawMessage) (json.RawMessage, bool) {
	var s string
	if json.Unmarshal(v, &s) != nil || s == "" {
		return nil, false
	}
	for _, l := range dateLayouts {
		if t, err := time.Parse(l, s); err == nil {
			b, _ := json.Marshal(t.UTC().Format("2006-01-02T15:04:05.000Z"))
			return b, true
		}
	}
	return nil, false
}

// applyResult is what an update did to one entity.
type applyResult struct {
	applied map[string]json.RawMessage // attributes written, as received
	missing []string                   // named attributes the entity lacks, in request order
}

// updateExistingLocked applies attrs to e with Orion's "update" semantics
// (PATCH /v2/entities/{id}/attrs, op/update actionType "update"): existing
// attributes only; the rest are reported missing (MongoCommonUpdate.cpp,
// updateContextAttributeItem). A named metadata replaces the one of that
// name; metadata not named are kept. Caller holds s.mu.
func updateExistingLocked(e *entity, attrs []orionAttr) applyResult {
	res := applyResult{applied: map[string]json.RawMessage{}}
	for _, a := range attrs {
		old, ok := e.attrs[a.name]
		if !ok {
			res.missing = append(res.missing, a.name)
			continue
		}
		e.attrs[a.name] = mergeAttr(old, a)
		res.applied[a.name] = a.raw
	}
	return res
}

// appendLocked applies attrs with "append" semantics (POST /v2/entities/{id}/attrs
// or op/update "append"): existing ones are updated as above, new ones added.
func appendLocked(e *entity, attrs []orionAttr) applyResult {
	res := applyResult{applied: map[string]json.RawMessage{}}
	for _, a := range attrs {
		e.attrs[a.name] = mergeAttr(e.attrs[a.name], a)
		res.applied[a.name] = a.raw
	}
	return res
}

func mergeAttr(old ngsiAttr, a orionAttr) ngsiAttr {
	n := ngsiAttr{Type: old.Type, Value: a.value, Metadata: old.Metadata}
	if a.typeGiven || n.Type == "" {
		n.Type = a.typ
	}
	if len(a.md) > 0 {
		md := make(map[string]json.RawMessage, len(old.Metadata)+len(a.md))
		for k, v := range old.Metadata {
			md[k] = v
		}
		for k, v := range a.md {
			md[k] = v
		}
		n.Metadata = md
	}
	return n
}

// enStr names an entity in Orion's "do not exist" texts: id, or id/type
// when the request gave a type (MongoCommonUpdate.cpp, processContextElement).
func enStr(id, typ string) string {
	if typ == "" {
		return id
	}
	return id + "/" + typ
}

// notExistList renders "[ a, b ]" as MongoCommonUpdate.cpp builds it.
func notExistList(names []string) string { return "[ " + strings.Join(names, ", ") + " ]" }

// contentTypeOK is Orion's check of the Content-Type of a request with a
// body (rest.cpp, contentTypeCheck): NGSIv2 takes application/json (and
// text/plain on some routes).
func orionContentType(r *http.Request, bodyLen int) *orionFail {
	if bodyLen == 0 {
		return nil
	}
	ct := r.Header.Get("Content-Type")
	if ct == "" {
		return &orionFail{http.StatusUnsupportedMediaType, "UnsupportedMediaType", "Content-Type header not used, default application/octet-stream is not supported"}
	}
	mt, _, err := mime.ParseMediaType(ct)
	if err != nil || (mt != "application/json" && mt != "text/plain") {
		return &orionFail{http.StatusUnsupportedMediaType, "UnsupportedMediaType", "not supported content type: " + ct}
	}
	return nil
}

// readBody reads at most limit bytes (Orion's -inReqPayloadMaxSize).
func readBody(w http.ResponseWriter, r *http.Request, limit int64) ([]byte, *orionFail) {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, limit))
	if err == nil {
		return body, nil
	}
	var tooBig *http.MaxBytesError
	if errors.As(err, &tooBig) {
		return nil, &orionFail{http.StatusRequestEntityTooLarge, "RequestEntityTooLarge", fmt.Sprintf("payload size: %d, max size supported: %d", tooBig.Limit+1, limit)}
	}
	return nil, parseFail()
}

// orionCall is one request to Orion, from the filter or directly.
type orionCall struct {
	w     http.ResponseWriter
	r     *http.Request
	ref   Refusal
	user  string // the filter's user, "" when direct
	id    string
	typ   string // the type query parameter ("" when the filter dropped it)
	attrs string // the attrs query parameter of a GET
}

func (s *Server) orionAnswer(c orionCall, f *orionFail) {
	s.refuseOrion(c.w, c.ref, f.status, f.code, f.desc)
}

// orionTenant reads the request's tenant, or answers Orion's 400.
func (s *Server) orionTenant(c orionCall) (tenant, bool) {
	t, f := tenantOf(c.r)
	if f != nil {
		s.orionAnswer(c, f)
		return t, false
	}
	return t, true
}

// orionRequest reads the tenant and the body of a request that carries
// one (size limit, Content-Type), or answers Orion's error.
func (s *Server) orionRequest(c orionCall) (tenant, []byte, bool) {
	t, ok := s.orionTenant(c)
	if !ok {
		return t, nil, false
	}
	body, f := readBody(c.w, c.r, maxUpdateBytes)
	if f == nil {
		f = orionContentType(c.r, len(body))
	}
	if f != nil {
		s.orionAnswer(c, f)
		return t, nil, false
	}
	return t, body, true
}

// orionPatchAttrs is PATCH /v2/entities/{id}/attrs.
func (s *Server) orionPatchAttrs(c orionCall) {
	t, body, ok := s.orionRequest(c)
	if !ok {
		return
	}
	if len(body) == 0 {
		s.orionAnswer(c, badRequest(orionEmptyPayload))
		return
	}
	attrs, f := parseAttrsBody(body)
	if f != nil {
		s.orionAnswer(c, f)
		return
	}
	// Verify outside the lock: it is the slow part.
	s.mu.Lock()
	dev := s.devices[c.id]
	s.mu.Unlock()
	v := s.verdictOf(dev, c.id, attrs)

	s.mu.Lock()
	e, ok := s.entities[entKey(t.service, c.id)]
	if !ok || (c.typ != "" && e.typ != c.typ) || e.servicePath != t.updatePath() {
		s.mu.Unlock()
		s.orionAnswer(c, &orionFail{http.StatusNotFound, orionErrNotFound, orionNotFoundDesc})
		return
	}
	snap := s.snapshotLocked(e, attrs)
	res := updateExistingLocked(e, attrs)
	var u *Update
	if len(res.applied) > 0 {
		u = s.newUpdate(c.id, c.user, res.applied, v)
		s.recordLocked(u)
	}
	notifs := s.triggerLocked(t.service, e, snap.changedLocked(e)) // orion_subs.go
	s.mu.Unlock()
	s.notifyAsync(notifs)
	if u != nil {
		s.notify(*u)
		s.log.Debug("update accepted", "device", u.Device, "user", u.User, "gateway", u.Gateway, "seq", u.Seq, "verdict", u.Verdict, "missing", len(res.missing))
	}
	switch {
	case len(res.missing) == 0:
		c.w.WriteHeader(http.StatusNoContent)
	case len(res.applied) == 0:
		s.orionAnswer(c, &orionFail{http.StatusUnprocessableEntity, orionErrUnprocess, orionDoNotExist + enStr(c.id, c.typ) + " - " + notExistList(res.missing)})
	default:
		// The values that exist WERE written: Orion answers 422 after
		// applying them (error_responses_02_update_existing_entity_attributes.test).
		s.orionAnswer(c, &orionFail{http.StatusUnprocessableEntity, orionErrPartial, orionDoNotExist + enStr(c.id, c.typ) + " - " + notExistList(res.missing)})
	}
}

// newUpdate builds the record of an accepted (part of an) update.
func (s *Server) newUpdate(device, user string, applied map[string]json.RawMessage, v verdict) *Update {
	u := &Update{Device: device, User: user, Attrs: applied, Verdict: v.verdict, Detail: v.detail, Time: s.now()}
	if v.claims.Version != 0 { // signature verified: the claims can be trusted
		u.Gateway, u.Seq = v.claims.Gateway, v.claims.Seq
		u.Alg, u.KeyID = v.alg, v.kid
	}
	return u
}

// orionGetEntity is GET /v2/entities/{id}[?type=&attrs=] in normalized
// form; "attrs" limits the attributes rendered.
func (s *Server) orionGetEntity(c orionCall) {
	t, ok := s.orionTenant(c)
	if !ok {
		return
	}
	s.mu.Lock()
	e, ok := s.entities[entKey(t.service, c.id)]
	var doc map[string]any
	if ok && (c.typ == "" || e.typ == c.typ) && t.queryMatches(e.servicePath) {
		doc = e.normalized()
	}
	s.mu.Unlock()
	if doc == nil {
		s.orionAnswer(c, &orionFail{http.StatusNotFound, orionErrNotFound, orionNotFoundDesc})
		return
	}
	if c.attrs != "" {
		keep := map[string]bool{"id": true, "type": true}
		for _, a := range strings.Split(c.attrs, ",") {
			keep[a] = true
		}
		for k := range doc {
			if !keep[k] {
				delete(doc, k)
			}
		}
	}
	writeJSON(c.w, http.StatusOK, doc)
}
