package central

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"sort"
	"strings"
	"sync"

	"github.com/lestrrat-go/jwx/v2/jwt"

	centralsync "github.com/edgegate/edgegate/sync"
)

// maxPlatformBody bounds every platform answer.
const maxPlatformBody = 64 << 20

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
}

// Platform reads the stock platform with the configured account.
type Platform struct {
	base, dm string
	hc       *http.Client
	token    func(context.Context) (string, error)
	dir      *centralsync.Directory
	conc     int
}

// NewPlatform is a platform client; token hands out the account's access
// token (a RootAdmin: the Ownership API lists every row for it,
// list/index.php, and the datamanager lets it read any user's delegations,
// CredentialsServiceImpl.checkUsernameCredentials).
func NewPlatform(base, datamanager string, hc *http.Client, token func(context.Context) (string, error), concurrency int) *Platform {
	return &Platform{base: strings.TrimRight(base, "/"), dm: strings.TrimRight(datamanager, "/"), hc: hc, token: token,
		dir: centralsync.NewDirectory(base, hc, token), conc: max(1, concurrency)}
}

// Snapshot reads the ownership rows, the directory's device types and the
// delegations of every owner of an edgegate-bound device. An error means
// the platform's answer cannot be trusted as a whole (nothing is built);
// a failure per owner is reported in Snapshot.Failed.
func (p *Platform) Snapshot(ctx context.Context) (*Snapshot, error) {
	if err := p.checkRootAdmin(ctx); err != nil {
		return nil, err
	}
	var rows []OwnershipRow
	// All rows for a RootAdmin (list/index.php; onlyMine unset).
	if err := p.getJSON(ctx, p.base+"/ownership-api/v1/list/?type=IOTID", &rows, false); err != nil {
		return nil, fmt.Errorf("ownership list: %w", err)
	}
	if rows == nil {
		return nil, errors.New("ownership list: answer is not a JSON array")
	}
	devs, err := p.dir.List(ctx)
	if err != nil {
		return nil, fmt.Errorf("iot directory device list: %w", err)
	}
	s := &Snapshot{Rows: rows, Types: map[string]string{}, Given: map[string][]DelegationRow{}, Failed: map[string]string{},
		AppPins: map[string][]string{}}
	var apps []OwnershipRow
	// The AppID rows only pin receipt keys: when they cannot be read the
	// round goes on, and receipts keep the pins they have.
	if err := p.getJSON(ctx, p.base+"/ownership-api/v1/list/?type=AppID", &apps, false); err == nil {
		s.AppPins = appPins(apps)
	}
	for _, d := range devs {
		s.Types[d.ContextBroker+"/"+d.ID] = d.Type
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
			var dl []DelegationRow
			u := p.dm + "/v2/username/" + url.PathEscape(owner) + "/delegator?" +
				url.Values{"sourceRequest": {sourceRequest}, "elementType": {"IOTID"}}.Encode()
			err := p.getJSON(ctx, u, &dl, true)
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

// getJSON GETs target with the account's token. allow204: the
// datamanager answers 204 with no body for "no data" (UserController).
func (p *Platform) getJSON(ctx context.Context, target string, v any, allow204 bool) error {
	tok, err := p.token(ctx)
	if err != nil {
		return fmt.Errorf("account token: %w", err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, target, nil)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+tok)
	req.Header.Set("Accept", "application/json")
	resp, err := p.hc.Do(req)
	if err != nil {
		return fmt.Errorf("GET %s: %w", redactQuery(target), errors.Unwrap(err))
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxPlatformBody+1))
	switch {
	case err != nil:
		return fmt.Errorf("GET %s: reading the answer: %w", redactQuery(target), err)
	case len(body) > maxPlatformBody:
		return fmt.Errorf("GET %s: answer larger than %d bytes", redactQuery(target), maxPlatformBody)
	case resp.StatusCode == http.StatusNoContent && allow204:
		return json.Unmarshal([]byte("[]"), v)
	case resp.StatusCode != http.StatusOK:
		return fmt.Errorf("GET %s: HTTP %d", redactQuery(target), resp.StatusCode)
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("GET %s: malformed answer: %s", redactQuery(target), jsonErr(err))
	}
	if dec.More() {
		return fmt.Errorf("GET %s: malformed answer: trailing data", redactQuery(target))
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
