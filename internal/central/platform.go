package central

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/url"
	"slices"
	"sort"
	"strings"
	"sync"

	"github.com/lestrrat-go/jwx/v2/jwt"

	centralsync "github.com/edgegate/edgegate/sync"
)

// DefaultMaxAnswer bounds every platform answer (platform.max_answer):
// about 800,000 ownership rows. Answers are decoded row by row as they
// arrive, so memory grows with the rows kept, not with the answer.
const DefaultMaxAnswer = 256 << 20

// ErrAnswerTooLarge: a platform answer went past platform.max_answer. The
// round is refused (never truncated: a cut list would drop devices).
var ErrAnswerTooLarge = errors.New("answer larger than platform.max_answer")

// sourceRequest names us to the datamanager (its required sourceRequest
// parameter, UserController).
const sourceRequest = "edgegate-central"

// OwnershipRow and DelegationRow are the platform's rows as the gateway
// reads them (one definition, in sync/ownership.go).
type (
	OwnershipRow  = centralsync.OwnershipRow
	DelegationRow = centralsync.DelegationRow
)

// Snapshot is what one round read from the platform.
type Snapshot struct {
	Rows []OwnershipRow
	// Types maps "broker/id" to the IoT Directory's devicetype: stock
	// ownership rows carry no entity type (device.php insert stores only
	// k1, k2, contextbroker and the edgegateway fields).
	Types map[string]string
	// Given maps an owner to the delegations they gave (IOTID).
	Given map[string][]DelegationRow
	// Failed maps an owner whose delegations could not be read to why:
	// the gateways with that owner's devices are not rebuilt this round.
	Failed map[string]string
	// AppPins maps a gateway id to the identity key thumbprints its live
	// AppID rows carry (edgegate pair registers elementId = the gateway id,
	// elementDetails.thumbprint; cmd/edgegate/pair.go).
	AppPins map[string][]string
	// Received maps a gateway of gateway_users to the delegations its
	// account received (datamanager v2/username/{user}/delegated), and
	// ReceivedFailed a gateway whose list could not be read to why.
	Received       map[string][]DelegationRow
	ReceivedFailed map[string]string
	// Users is gateway_users (gateway → platform username).
	Users map[string]string
}

// Platform reads the stock platform with the configured account.
type Platform struct {
	base, dm string
	hc       *http.Client
	token    func(context.Context) (string, error)
	conc     int
	max      int64             // platform.max_answer
	users    map[string]string // gateway_users
}

// NewPlatform is a platform client; token hands out the account's access
// token (a RootAdmin: the Ownership API lists every row for it,
// list/index.php, and the datamanager lets it read any user's delegations,
// CredentialsServiceImpl.checkUsernameCredentials).
// maxAnswer bounds each answer (0: DefaultMaxAnswer).
func NewPlatform(base, datamanager string, hc *http.Client, token func(context.Context) (string, error), concurrency int, maxAnswer int64) *Platform {
	if maxAnswer <= 0 {
		maxAnswer = DefaultMaxAnswer
	}
	return &Platform{base: strings.TrimRight(base, "/"), dm: strings.TrimRight(datamanager, "/"), hc: hc, token: token,
		conc: max(1, concurrency), max: maxAnswer}
}

// Snapshot reads the ownership rows, the directory's device types and the
// delegations of every owner of an edgegate-bound device. An error means
// the platform's answer cannot be trusted as a whole (nothing is built);
// a failure per owner is reported in Snapshot.Failed.
func (p *Platform) Snapshot(ctx context.Context) (*Snapshot, error) {
	if err := p.checkRootAdmin(ctx); err != nil {
		return nil, err
	}
	// All rows for a RootAdmin (list/index.php; onlyMine unset), in one
	// answer. Stock list/index.php pages with limit and offset, but its
	// SELECT has no ORDER BY, and a row deleted between two pages shifts
	// the offset: a device would be skipped silently. One answer is one
	// query, one consistent read; it is decoded row by row instead.
	rows := []OwnershipRow{}
	if err := getArray(ctx, p, p.base+"/ownership-api/v1/list/?type=IOTID", false, func(r OwnershipRow) {
		rows = append(rows, r)
	}); err != nil {
		return nil, fmt.Errorf("ownership list: %w", err)
	}
	s := &Snapshot{Rows: rows, Types: map[string]string{}, Given: map[string][]DelegationRow{}, Failed: map[string]string{},
		AppPins: map[string][]string{}}
	if err := p.deviceTypes(ctx, s.Types); err != nil {
		return nil, fmt.Errorf("iot directory device list: %w", err)
	}
	var apps []OwnershipRow
	// The AppID rows only pin receipt keys: when they cannot be read the
	// round goes on, and receipts keep the pins they have.
	if err := getArray(ctx, p, p.base+"/ownership-api/v1/list/?type=AppID", false, func(r OwnershipRow) {
		apps = append(apps, r)
	}); err == nil {
		s.AppPins = appPins(apps)
	}
	owners := map[string]bool{}
	for _, r := range rows {
		if r.Username != "" && !isSet(r.Deleted) && edgeBound(r) {
			owners[r.Username] = true
		}
	}
	names := make([]string, 0, len(owners))
	for o := range owners {
		names = append(names, o)
	}
	sort.Strings(names)
	var mu sync.Mutex
	sem := make(chan struct{}, p.conc)
	var wg sync.WaitGroup
	for _, owner := range names {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			dl := []DelegationRow{}
			u := p.dm + "/v2/username/" + url.PathEscape(owner) + "/delegator?" +
				url.Values{"sourceRequest": {sourceRequest}, "elementType": {"IOTID"}}.Encode()
			err := getArray(ctx, p, u, true, func(d DelegationRow) { dl = append(dl, d) })
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				s.Failed[owner] = err.Error()
				return
			}
			s.Given[owner] = dl
		}()
	}
	wg.Wait()
	// What each gateway's own account received (a RootAdmin may read any
	// user's delegations, CredentialsServiceImpl.checkUsernameCredentials;
	// the list, DelegationDAOImpl.getDelegationDelegatedByUsername, also
	// holds the account's groups' delegations, which Build leaves out).
	s.Received, s.ReceivedFailed, s.Users = map[string][]DelegationRow{}, map[string]string{}, p.users
	for _, gw := range slices.Sorted(maps.Keys(p.users)) {
		dl := []DelegationRow{}
		u := p.dm + "/v2/username/" + url.PathEscape(p.users[gw]) + "/delegated?" +
			url.Values{"sourceRequest": {sourceRequest}, "elementType": {"IOTID"}}.Encode()
		if err := getArray(ctx, p, u, true, func(d DelegationRow) { dl = append(dl, d) }); err != nil {
			s.ReceivedFailed[gw] = err.Error()
			continue
		}
		s.Received[gw] = dl
	}
	return s, ctx.Err()
}

// appPins reads the gateways' AppID rows.
func appPins(rows []OwnershipRow) map[string][]string {
	out := map[string][]string{}
	for _, r := range rows {
		if isSet(r.Deleted) || r.ElementType != "AppID" || !gatewayIDRE.MatchString(r.ElementID) {
			continue
		}
		det, err := parseDetails(r.ElementDetails)
		if err != nil || !strings.HasSuffix(detailString(det, "edgegateway_type"), "_edgegate") {
			continue
		}
		tp := detailString(det, "thumbprint")
		if len(tp) != 43 || slices.Contains(out[r.ElementID], tp) {
			continue
		}
		out[r.ElementID] = append(out[r.ElementID], tp)
	}
	return out
}

// checkRootAdmin refuses an account that is not a RootAdmin: for any
// other user the Ownership API lists only that user's rows
// (list/index.php), so every gateway's policy would silently lose its
// devices. Snap4City's realm maps the roles into the access token's
// "roles" claim (Keycloak also has realm_access.roles). The token comes
// straight from the token endpoint over TLS: its claims are read without
// verifying it again.
func (p *Platform) checkRootAdmin(ctx context.Context) error {
	tok, err := p.token(ctx)
	if err != nil {
		return fmt.Errorf("account token: %w", err)
	}
	t, err := jwt.ParseString(tok, jwt.WithVerify(false), jwt.WithValidate(false))
	if err != nil {
		return errors.New("the account's access token is not a JWT: cannot confirm it is a RootAdmin")
	}
	var roles []any
	if v, ok := t.Get("roles"); ok {
		roles, _ = v.([]any)
	}
	if v, ok := t.Get("realm_access"); ok {
		if m, ok := v.(map[string]any); ok {
			ra, _ := m["roles"].([]any)
			roles = append(roles, ra...)
		}
	}
	for _, r := range roles {
		if r == "RootAdmin" {
			return nil
		}
	}
	return errors.New("the platform account is not a RootAdmin: the Ownership API would list only its own rows")
}

// getArray GETs target with the account's token and decodes its JSON
// array one element at a time, handing each to each: memory holds one
// element and the decoder's buffer, not the answer. An answer over
// platform.max_answer, cut short, or with anything after the array is an
// error (the caller refuses the round). allow204: the datamanager answers
// 204 with no body for "no data" (UserController).
func getArray[T any](ctx context.Context, p *Platform, target string, allow204 bool, each func(T)) error {
	resp, err := p.send(ctx, http.MethodGet, target, nil, "")
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	switch {
	case resp.StatusCode == http.StatusNoContent && allow204:
		return nil
	case resp.StatusCode != http.StatusOK:
		return fmt.Errorf("GET %s: HTTP %d", redactQuery(target), resp.StatusCode)
	}
	dec := json.NewDecoder(&capReader{r: resp.Body, max: p.max})
	if err := decodeArray(dec, each); err != nil {
		return p.answerErr("GET", target, err)
	}
	return endOfAnswer(dec, "GET", target, p)
}

// send does one request with the account's token.
func (p *Platform) send(ctx context.Context, method, target string, body io.Reader, contentType string) (*http.Response, error) {
	tok, err := p.token(ctx)
	if err != nil {
		return nil, fmt.Errorf("account token: %w", err)
	}
	req, err := http.NewRequestWithContext(ctx, method, target, body)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+tok)
	req.Header.Set("Accept", "application/json")
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	resp, err := p.hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", method, redactQuery(target), errors.Unwrap(err))
	}
	return resp, nil
}

// decodeArray reads '[' element, ... ']' from dec.
func decodeArray[T any](dec *json.Decoder, each func(T)) error {
	tok, err := dec.Token()
	if err != nil {
		return err
	}
	if d, ok := tok.(json.Delim); !ok || d != '[' {
		return errors.New("not a JSON array")
	}
	for dec.More() {
		var v T
		if err := dec.Decode(&v); err != nil {
			return err
		}
		each(v)
	}
	_, err = dec.Token() // ']'
	return err
}

// endOfAnswer checks that nothing but white space follows the value.
func endOfAnswer(dec *json.Decoder, method, target string, p *Platform) error {
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		if err == nil || errors.Is(err, ErrAnswerTooLarge) {
			return p.answerErr(method, target, cmpOr(err, errors.New("trailing data")))
		}
		return p.answerErr(method, target, err)
	}
	return nil
}

func cmpOr(err, def error) error {
	if err != nil {
		return err
	}
	return def
}

// answerErr says why an answer was refused without quoting it (rows
// hold K1/K2).
func (p *Platform) answerErr(method, target string, err error) error {
	if errors.Is(err, ErrAnswerTooLarge) {
		return fmt.Errorf("%s %s: %w (%d bytes): refused, not truncated; raise platform.max_answer", method, redactQuery(target), ErrAnswerTooLarge, p.max)
	}
	if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
		return fmt.Errorf("%s %s: malformed answer: cut short", method, redactQuery(target))
	}
	var se *json.SyntaxError
	var te *json.UnmarshalTypeError
	if errors.As(err, &se) || errors.As(err, &te) || err.Error() == "not a JSON array" || err.Error() == "trailing data" {
		return fmt.Errorf("%s %s: malformed answer: %s", method, redactQuery(target), jsonErr(err))
	}
	return fmt.Errorf("%s %s: reading the answer: %w", method, redactQuery(target), err)
}

// capReader reads up to max bytes, then fails with ErrAnswerTooLarge.
type capReader struct {
	r      io.Reader
	n, max int64
}

func (c *capReader) Read(b []byte) (int, error) {
	if c.n >= c.max {
		// One byte more tells a body of exactly max from a longer one.
		var one [1]byte
		if k, _ := c.r.Read(one[:]); k > 0 {
			return 0, ErrAnswerTooLarge
		}
	}
	if rem := c.max - c.n; int64(len(b)) > rem {
		b = b[:rem]
	}
	if len(b) == 0 {
		return c.r.Read(b)
	}
	k, err := c.r.Read(b)
	c.n += int64(k)
	return k, err
}

// deviceTypes reads the IoT Directory's devices (device.php
// action=get_all_device; POST form with nodered=yes and the token, as
// sync/directory.go call explains) into types["broker/id"] = devicetype,
// decoding its "data" array one device at a time. The answer is
// format_result's object (device.php): status "ok", data the rows.
func (p *Platform) deviceTypes(ctx context.Context, types map[string]string) error {
	tok, err := p.token(ctx)
	if err != nil {
		return fmt.Errorf("account token: %w", err)
	}
	target := p.base + "/iot-directory/api/device.php"
	form := url.Values{"action": {"get_all_device"}, "nodered": {"yes"}, "token": {tok}}
	resp, err := p.send(ctx, http.MethodPost, target, strings.NewReader(form.Encode()), "application/x-www-form-urlencoded")
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("POST %s: HTTP %d", target, resp.StatusCode)
	}
	dec := json.NewDecoder(&capReader{r: resp.Body, max: p.max})
	if tok, err := dec.Token(); err != nil {
		return p.answerErr("POST", target, err)
	} else if d, ok := tok.(json.Delim); !ok || d != '{' {
		return fmt.Errorf("POST %s: malformed answer: not a JSON object", target)
	}
	var status, msg string
	sawData := false
	for dec.More() {
		kt, err := dec.Token()
		if err != nil {
			return p.answerErr("POST", target, err)
		}
		switch kt {
		case "data":
			sawData = true
			// An error answer carries "" as data (format_result with '').
			if err := decodeArray(dec, func(r struct {
				ID     phpText `json:"id"`
				Type   phpText `json:"devicetype"`
				Broker phpText `json:"contextBroker"`
			}) {
				types[string(r.Broker)+"/"+string(r.ID)] = string(r.Type)
			}); err != nil {
				if err.Error() == "not a JSON array" {
					continue
				}
				return p.answerErr("POST", target, err)
			}
		case "status":
			var v phpText
			if err := dec.Decode(&v); err != nil {
				return p.answerErr("POST", target, err)
			}
			status = string(v)
		case "msg", "error_msg":
			var v any
			if err := dec.Decode(&v); err != nil {
				return p.answerErr("POST", target, err)
			}
			if str, ok := v.(string); ok && msg == "" {
				msg = clip(strings.ReplaceAll(str, tok, "[redacted]"))
			}
		default:
			var skip json.RawMessage
			if err := dec.Decode(&skip); err != nil {
				return p.answerErr("POST", target, err)
			}
		}
	}
	if _, err := dec.Token(); err != nil { // '}'
		return p.answerErr("POST", target, err)
	}
	if err := endOfAnswer(dec, "POST", target, p); err != nil {
		return err
	}
	if status != "ok" || !sawData {
		return fmt.Errorf("POST %s: the IoT Directory refused get_all_device (status %q): %s", target, clip(status), msg)
	}
	return nil
}

// phpText reads a string, a number or null (PHP's json_encode of mysqli
// values) as text.
type phpText string

func (t *phpText) UnmarshalJSON(b []byte) error {
	switch {
	case bytes.Equal(b, []byte("null")):
		*t = ""
	case len(b) > 0 && b[0] == '"':
		var s string
		if err := json.Unmarshal(b, &s); err != nil {
			return err
		}
		*t = phpText(s)
	default:
		var n json.Number
		if err := json.Unmarshal(b, &n); err != nil {
			return errors.New("want a string or a number")
		}
		*t = phpText(n.String())
	}
	return nil
}

func redactQuery(target string) string {
	if i := strings.IndexByte(target, '?'); i >= 0 {
		return target[:i]
	}
	return target
}

// jsonErr says where JSON broke without quoting it (rows hold K1/K2).
func jsonErr(err error) string { return centralsync.SafeJSONError(err) }
