package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwk"
	"github.com/zitadel/oidc/v3/example/server/storage"
	"github.com/zitadel/oidc/v3/pkg/oidc"
	"github.com/zitadel/oidc/v3/pkg/op"

	"github.com/edgegate/edgegate/internal/config"
	"github.com/edgegate/edgegate/internal/keys"
	centralsync "github.com/edgegate/edgegate/sync"
)

// Pairing against an OpenID provider this repository did not write:
// zitadel/oidc's pkg/op with its example in-memory storage, on loopback
// TLS, beside an Ownership API that answers as the stock PHP does. The
// device client is public by default (what Snap4City's nodered-iotedge
// is); zitadel announces private_key_jwt only with RS256.

// publicDeviceClient is the example's device client made public and
// allowed to refresh (what a Keycloak admin enables for the gateway client).
type publicDeviceClient struct{ *storage.Client }

func (publicDeviceClient) AuthMethod() oidc.AuthMethod         { return oidc.AuthMethodNone }
func (publicDeviceClient) ApplicationType() op.ApplicationType { return op.ApplicationTypeNative }
func (publicDeviceClient) GrantTypes() []oidc.GrantType {
	return []oidc.GrantType{oidc.GrantTypeDeviceCode, oidc.GrantTypeRefreshToken}
}

// confidentialDeviceClient keeps the example's client_secret_basic.
type confidentialDeviceClient struct{ *storage.Client }

func (confidentialDeviceClient) GrantTypes() []oidc.GrantType {
	return []oidc.GrantType{oidc.GrantTypeDeviceCode, oidc.GrantTypeRefreshToken}
}

type zitadelStorage struct {
	*storage.Storage
	client op.Client
}

func (s *zitadelStorage) GetClientByClientID(ctx context.Context, id string) (op.Client, error) {
	if id == s.client.GetID() {
		return s.client, nil
	}
	return s.Storage.GetClientByClientID(ctx, id)
}

// CreateAccessAndRefreshTokens fills a gap of the example storage: it
// takes the client of a refresh token only from code-flow and refresh
// requests, so device-grant refresh tokens would belong to no client.
func (s *zitadelStorage) CreateAccessAndRefreshTokens(ctx context.Context, req op.TokenRequest, cur string) (string, string, time.Time, error) {
	if d, ok := req.(*op.DeviceAuthorizationState); ok {
		req = &storage.AuthRequest{ApplicationID: d.ClientID, UserID: d.Subject, Scopes: d.Scopes}
	}
	return s.Storage.CreateAccessAndRefreshTokens(ctx, req, cur)
}

// ownershipRow is a row of the stock ownership table.
type ownershipRow struct {
	ID                            int64
	Username, ElementID, ElemType string
	ElementName, ElementURL       string
	ElementDetails                json.RawMessage
	Deleted                       bool
}

// stockOwnership answers /ownership-api/v1/{limits,register,delete}/ as
// the stock PHP does (disit/snap4city Ownership-API/v1/*/index.php); the
// caller is found through the provider's userinfo, username then
// preferred_username (Ownership-API/session.php).
type stockOwnership struct {
	userinfoURL string
	hc          *http.Client
	role        string
	limits      map[string]int // element type -> maxCount; absent: no limits row (NULL)

	mu   sync.Mutex
	rows []*ownershipRow
	// hooks run before an answer is written (after the row is inserted,
	// for register).
	onLimits, onRegister func()
	limitsStatus         int // non-zero: answer this status instead
	registerStatus       int // non-zero: answer this status instead
	calls                []string
}

func (o *stockOwnership) user(w http.ResponseWriter, r *http.Request) (string, bool) {
	// session.php: accessToken parameter or "Authorization: Bearer".
	tok := r.FormValue("accessToken")
	if h := r.Header.Get("Authorization"); tok == "" && len(h) > 8 && strings.EqualFold(h[:7], "bearer ") {
		tok = h[7:]
	}
	if tok == "" {
		w.WriteHeader(http.StatusUnauthorized)
		io.WriteString(w, "No token provided or invalid authorization header")
		return "", false
	}
	req, _ := http.NewRequestWithContext(r.Context(), http.MethodGet, o.userinfoURL, nil)
	req.Header.Set("Authorization", "Bearer "+tok)
	resp, err := o.hc.Do(req)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return "", false
	}
	defer resp.Body.Close()
	var ui map[string]any
	json.NewDecoder(resp.Body).Decode(&ui)
	if resp.StatusCode != http.StatusOK {
		w.WriteHeader(http.StatusUnauthorized)
		json.NewEncoder(w).Encode(map[string]any{"error": "invalid_token"})
		return "", false
	}
	u, _ := ui["username"].(string)
	if u == "" {
		u, _ = ui["preferred_username"].(string)
	}
	if u == "" {
		w.WriteHeader(http.StatusBadRequest)
		io.WriteString(w, "No username found")
		return "", false
	}
	return u, true
}

// count is SELECT count(*) ... deleted IS NULL, a string as mysqli gives it.
func (o *stockOwnership) count(user, typ string) int {
	n := 0
	for _, r := range o.rows {
		if r.Username == user && r.ElemType == typ && !r.Deleted {
			n++
		}
	}
	return n
}

func (o *stockOwnership) register(mux *http.ServeMux) {
	// v1/limits/index.php: {"username","role","organization","limits":[{elementType, limit, current}]}
	// with limit from SELECT max(maxCount) (a string, or null without a row)
	// and current from SELECT count(*) (a string).
	mux.HandleFunc("/ownership-api/v1/limits/", func(w http.ResponseWriter, r *http.Request) {
		user, ok := o.user(w, r)
		if !ok {
			return
		}
		o.mu.Lock()
		o.calls = append(o.calls, "limits")
		hook, status := o.onLimits, o.limitsStatus
		o.mu.Unlock()
		if hook != nil {
			hook()
		}
		if status != 0 {
			w.WriteHeader(status)
			io.WriteString(w, "DB connection error ")
			return
		}
		types := strings.Split(r.FormValue("type"), ";")
		if r.FormValue("type") == "" {
			types = []string{"DashboardID", "AppID", "IOTID", "DAAppID"}
		}
		o.mu.Lock()
		var lims []map[string]any
		for _, t := range types {
			var limit any // NULL
			if n, ok := o.limits[t]; ok {
				limit = fmt.Sprint(n)
			}
			lims = append(lims, map[string]any{"elementType": t, "limit": limit, "current": fmt.Sprint(o.count(user, t))})
		}
		o.mu.Unlock()
		json.NewEncoder(w).Encode(map[string]any{"username": user, "role": o.role, "organization": "Organization", "limits": lims})
	})
	// v1/register/index.php: an existing row (same user, id, type) is
	// updated and echoed without id; a new one is inserted when count <
	// limit and echoed with id and username; else 400 "reached limit".
	mux.HandleFunc("/ownership-api/v1/register/", func(w http.ResponseWriter, r *http.Request) {
		user, ok := o.user(w, r)
		if !ok {
			return
		}
		var in map[string]any
		if err := json.NewDecoder(r.Body).Decode(&in); err != nil {
			w.WriteHeader(http.StatusBadRequest)
			io.WriteString(w, "invalid JSON format")
			return
		}
		for _, a := range []string{"elementId", "elementType", "elementName"} {
			if _, ok := in[a]; !ok {
				w.WriteHeader(http.StatusBadRequest)
				fmt.Fprintf(w, `{"error":"missing %s attribute"}`, a)
				return
			}
		}
		id, typ := fmt.Sprint(in["elementId"]), fmt.Sprint(in["elementType"])
		o.mu.Lock()
		o.calls = append(o.calls, "register")
		if o.registerStatus != 0 {
			o.mu.Unlock()
			w.WriteHeader(o.registerStatus)
			io.WriteString(w, "DB connection error ")
			return
		}
		var existing *ownershipRow
		for _, r := range o.rows {
			if r.Username == user && r.ElementID == id && r.ElemType == typ && !r.Deleted {
				existing = r
			}
		}
		if existing == nil {
			limit, cur := o.limits[typ], o.count(user, typ)
			if cur >= limit {
				o.mu.Unlock()
				w.WriteHeader(http.StatusBadRequest)
				fmt.Fprintf(w, `{"error":"reached limit of %d","limit":%d,"current":%d}`, limit, limit, cur)
				return
			}
			det, _ := json.Marshal(in["elementDetails"])
			row := &ownershipRow{ID: int64(len(o.rows) + 1), Username: user, ElementID: id, ElemType: typ,
				ElementName: fmt.Sprint(in["elementName"]), ElementDetails: det}
			o.rows = append(o.rows, row)
			in["username"], in["id"] = user, row.ID
		}
		hook := o.onRegister
		o.mu.Unlock()
		if hook != nil {
			hook()
		}
		json.NewEncoder(w).Encode(in)
	})
	// v1/delete/index.php: type and elementId from the request (any
	// method); rows marked deleted; {"deleted": N}, 400 when N is 0.
	mux.HandleFunc("/ownership-api/v1/delete/", func(w http.ResponseWriter, r *http.Request) {
		user, ok := o.user(w, r)
		if !ok {
			return
		}
		if r.FormValue("type") == "" || r.FormValue("elementId") == "" {
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		o.mu.Lock()
		o.calls = append(o.calls, "delete")
		n := 0
		for _, row := range o.rows {
			if row.Username == user && row.ElemType == r.FormValue("type") && row.ElementID == r.FormValue("elementId") && !row.Deleted {
				row.Deleted = true
				n++
			}
		}
		o.mu.Unlock()
		if n == 0 {
			w.WriteHeader(http.StatusBadRequest)
		}
		fmt.Fprintf(w, "{ \"deleted\": %d}\n", n)
	})
}

func (o *stockOwnership) live(user, typ string) []ownershipRow {
	o.mu.Lock()
	defer o.mu.Unlock()
	var out []ownershipRow
	for _, r := range o.rows {
		if r.Username == user && r.ElemType == typ && !r.Deleted {
			out = append(out, *r)
		}
	}
	return out
}

func (o *stockOwnership) called(what string) bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	for _, c := range o.calls {
		if c == what {
			return true
		}
	}
	return false
}

// stockFixture is zitadel's OP and a stock Ownership API on one loopback
// TLS server, and an empty gateway.
type stockFixture struct {
	*pairFixture
	srv      *httptest.Server
	st       *zitadelStorage
	own      *stockOwnership
	clientID string
	disc     centralsync.Discovery

	mu        sync.Mutex
	issued    []map[string]any // token endpoint answers
	revoked   []string         // token_type_hint of each revocation, in order
	revokedTk []string
	keys      jwk.Set // served at /edgegate/v1/policy-keys when set (the companion)
	// failUserinfo makes the provider's userinfo answer 503.
	failUserinfo bool
}

type stockOptions struct {
	secret   string         // non-empty: a confidential client (client_secret_basic)
	limits   map[string]int // Ownership API limits of the account
	role     string
	clientID string
}

func newStockFixture(t *testing.T, so stockOptions) *stockFixture {
	t.Helper()
	if so.clientID == "" {
		so.clientID = defaultClientID
	}
	if so.role == "" {
		so.role = "Manager"
	}
	sf := &stockFixture{clientID: so.clientID}
	var provider http.Handler
	mux := http.NewServeMux()
	sf.own = &stockOwnership{role: so.role, limits: so.limits}
	sf.own.register(mux)
	mux.HandleFunc("GET /edgegate/v1/policy-keys", func(w http.ResponseWriter, r *http.Request) {
		sf.mu.Lock()
		keys := sf.keys
		sf.mu.Unlock()
		if keys == nil {
			http.NotFound(w, r) // stock: no such endpoint
			return
		}
		json.NewEncoder(w).Encode(keys)
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		sf.mu.Lock()
		failUserinfo := sf.failUserinfo
		sf.mu.Unlock()
		switch r.URL.Path {
		case "/userinfo":
			if failUserinfo {
				http.Error(w, `{"error":"server_error"}`, http.StatusServiceUnavailable)
				return
			}
		case "/revoke":
			body, _ := io.ReadAll(r.Body)
			form, _ := url.ParseQuery(string(body))
			sf.mu.Lock()
			sf.revoked = append(sf.revoked, form.Get("token_type_hint"))
			sf.revokedTk = append(sf.revokedTk, form.Get("token"))
			sf.mu.Unlock()
			r.Body = io.NopCloser(bytes.NewReader(body))
		case "/oauth/token":
			rec := httptest.NewRecorder()
			provider.ServeHTTP(rec, r)
			var ans map[string]any
			if json.Unmarshal(rec.Body.Bytes(), &ans) == nil && ans["access_token"] != nil {
				sf.mu.Lock()
				sf.issued = append(sf.issued, ans)
				sf.mu.Unlock()
			}
			for k, v := range rec.Header() {
				w.Header()[k] = v
			}
			w.WriteHeader(rec.Code)
			w.Write(rec.Body.Bytes())
			return
		}
		provider.ServeHTTP(w, r)
	})
	srv := httptest.NewUnstartedServer(mux)
	srv.StartTLS()
	t.Cleanup(srv.Close)
	sf.srv = srv
	sf.own.userinfoURL, sf.own.hc = srv.URL+"/userinfo", srv.Client()

	base := storage.DeviceClient(so.clientID, so.secret)
	var client op.Client = publicDeviceClient{base}
	if so.secret != "" {
		client = confidentialDeviceClient{base}
	}
	sf.st = &zitadelStorage{Storage: storage.NewStorageWithClients(storage.NewUserStore(srv.URL), map[string]*storage.Client{so.clientID: base}),
		client: client}
	var key [32]byte
	rand.Read(key[:])
	p, err := op.NewProvider(&op.Config{
		CryptoKey: key, GrantTypeRefreshToken: true,
		DeviceAuthorization: op.DeviceAuthorizationConfig{Lifetime: 5 * time.Minute, PollInterval: time.Second,
			UserFormPath: "/device", UserCode: op.UserCodeBase20},
	}, sf.st, op.StaticIssuer(srv.URL))
	if err != nil {
		t.Fatal(err)
	}
	provider = p

	dir := t.TempDir()
	caFile := filepath.Join(dir, "ca.pem")
	os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw}), 0o644)
	sf.pairFixture = &pairFixture{dir: dir, caFile: caFile, cfgPath: filepath.Join(dir, "etc", "edgegate.yaml"), stateDir: filepath.Join(dir, "state"),
		env: pairEnv{getenv: func(string) string { return "" }, hostname: func() (string, error) { return "gw01", nil }, now: time.Now}}
	resp, err := srv.Client().Get(srv.URL + "/.well-known/openid-configuration")
	if err != nil {
		t.Fatal(err)
	}
	json.NewDecoder(resp.Body).Decode(&sf.disc)
	resp.Body.Close()
	return sf
}

// args: zitadel's issuer is the server's root, not a Keycloak realm.
func (sf *stockFixture) args(extra ...string) []string {
	return append([]string{"--central", sf.srv.URL, "--issuer", sf.srv.URL, "--ca", sf.caFile,
		"--config", sf.cfgPath, "--state-dir", sf.stateDir, "--gateway-id", "gw-z-01", "--no-qr"}, extra...)
}

// pair runs pair; approve, when set, decides at the device page as the
// user id2 (test-user2) would.
func (sf *stockFixture) pair(t *testing.T, ctx context.Context, approve bool, extra ...string) pairResult {
	t.Helper()
	var out, errOut lockedBuffer
	done := make(chan error, 1)
	go func() { done <- pairWith(ctx, sf.env, sf.args(extra...), &out, &errOut) }()
	if approve {
		if code := waitUserCode(t, &out, done); code != "" {
			if err := sf.st.CompleteDeviceAuthorization(context.Background(), code, "id2"); err != nil {
				t.Fatal(err)
			}
		}
	}
	select {
	case err := <-done:
		return pairResult{out.String(), errOut.String(), err}
	case <-time.After(60 * time.Second):
		t.Fatalf("pair did not finish:\n%s", out.String())
	}
	return pairResult{}
}

// assertTokensDead: every token issued during pairing was revoked, refresh
// token first, and the provider refuses them now.
func (sf *stockFixture) assertTokensDead(t *testing.T) {
	t.Helper()
	sf.mu.Lock()
	issued, hints, revoked := sf.issued, sf.revoked, sf.revokedTk
	sf.mu.Unlock()
	if len(issued) != 1 {
		t.Fatalf("%d token answers; want the one of the device grant", len(issued))
	}
	if len(hints) != 2 || hints[0] != "refresh_token" || hints[1] != "access_token" {
		t.Errorf("revocations %v; want refresh_token then access_token", hints)
	}
	rt, _ := issued[0]["refresh_token"].(string)
	at, _ := issued[0]["access_token"].(string)
	if len(revoked) != 2 || revoked[0] != rt || revoked[1] != at {
		t.Error("the revoked tokens are not the issued ones")
	}
	// The provider's own word: the refresh token no longer works, nor the access token.
	form := url.Values{"grant_type": {"refresh_token"}, "refresh_token": {rt}, "client_id": {sf.clientID}}
	resp, err := sf.srv.Client().PostForm(sf.srv.URL+"/oauth/token", form)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode == http.StatusOK {
		t.Error("the refresh token still works after a failed pairing")
	}
	req, _ := http.NewRequest(http.MethodGet, sf.srv.URL+"/userinfo", nil)
	req.Header.Set("Authorization", "Bearer "+at)
	resp, err = sf.srv.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode == http.StatusOK {
		t.Error("the access token still works after a failed pairing")
	}
}

// assertNoState: a failed pairing leaves not even the store it created.
func (sf *stockFixture) assertNoState(t *testing.T) {
	t.Helper()
	for _, p := range []string{sf.cfgPath, filepath.Join(filepath.Dir(sf.cfgPath), "policy-keys.json"), sf.stateDir} {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s exists after a failed pairing (%v)", p, err)
		}
	}
}

func (sf *stockFixture) noSecretsIn(t *testing.T, texts ...string) {
	t.Helper()
	sf.mu.Lock()
	defer sf.mu.Unlock()
	for _, a := range sf.issued {
		for _, k := range []string{"access_token", "refresh_token", "id_token"} {
			tok, _ := a[k].(string)
			for _, s := range texts {
				if tok != "" && strings.Contains(s, tok) {
					t.Errorf("%s shown to the installer", k)
				}
			}
		}
	}
}

func TestPairStockOrdinaryUser(t *testing.T) {
	// Stock limits: AppID 0 for an ordinary user (no AppID limits row
	// matches a Manager: SELECT max() is NULL), IOTID 5.
	sf := newStockFixture(t, stockOptions{limits: map[string]int{"IOTID": 5}})
	res := sf.pair(t, context.Background(), true, "--broker", "orion-1", "--broker", "orion-2=https://broker.example.org/orion-filter/orion-2")
	if res.err != nil {
		t.Fatalf("pair: %v\n%s", res.err, res.out)
	}
	t.Logf("output:\n%s", res.out)
	for _, want := range []string{
		"To approve this gateway, open\n\n    " + sf.srv.URL + "/device",
		"account test-user2",
		"public client, no shared secret",
		"AppID row     not registered: the account may not register apps (AppID limit 0, 0 used); the gateway works without its AppID row",
		"companion     none at " + sf.srv.URL + ": stock mode",
		"policy        the Ownership API and delegations at " + sf.srv.URL + ", as test-user2",
		"broker        orion-1 at " + sf.srv.URL + "/orion-filter/orion-1",
		"Next steps:\n  1. edgegate device add --config " + sf.cfgPath,
		"  2. systemctl restart edgegate",
	} {
		if !strings.Contains(res.out, want) {
			t.Errorf("output lacks %q", want)
		}
	}
	sf.noSecretsIn(t, res.out, res.errOut)
	if sf.own.called("register") {
		t.Error("register was attempted with an AppID limit of 0")
	}

	// The configuration: stock mode, loaded by the daemon's own loader.
	written, _ := os.ReadFile(sf.cfgPath)
	t.Logf("config:\n%s", written)
	cfg, err := config.Load(sf.cfgPath)
	if err != nil {
		b, _ := os.ReadFile(sf.cfgPath)
		t.Fatalf("the written config does not load: %v\n%s", err, b)
	}
	o := cfg.Policy.Ownership
	if cfg.Policy.Source != config.PolicyOwnership || o.URL != sf.srv.URL || o.DataManagerURL != sf.srv.URL+"/datamanager/api" ||
		o.Username != "test-user2" || len(o.Brokers) != 2 || o.Brokers["orion-1"] != sf.srv.URL+"/orion-filter/orion-1" ||
		o.Brokers["orion-2"] != "https://broker.example.org/orion-filter/orion-2" {
		t.Errorf("policy = %+v", cfg.Policy)
	}
	if c := cfg.Central; c.Issuer != sf.srv.URL || c.TokenURL != sf.disc.TokenEndpoint || c.ClientID != defaultClientID ||
		c.Credentials != config.CredentialsPaired || strings.Join(c.Scopes, " ") != "openid profile offline_access" {
		t.Errorf("central = %+v", c)
	}
	if _, err := os.Stat(filepath.Join(filepath.Dir(sf.cfgPath), "policy-keys.json")); !errors.Is(err, os.ErrNotExist) {
		t.Error("keys pinned in stock mode")
	}

	// The daemon's refresh against zitadel: rotation persisted.
	q, err := openStore(sf.env, storeFlags{stateDir: sf.stateDir, credential: "store-key"})
	if err != nil {
		t.Fatal(err)
	}
	creds, err := centralsync.LoadCredentials(q)
	if err != nil || creds.AuthMethod != centralsync.AuthNone || creds.RefreshToken == "" || creds.User != "test-user2" {
		t.Fatalf("creds %v: %v", creds, err)
	}
	id, _ := keys.LoadIdentity(q)
	ts, err := centralsync.NewPairedTokenSource(centralsync.PairedOptions{Store: q, Identity: id, HTTPClient: mustHTTP(t, sf.caFile)})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ts.Token(context.Background()); err != nil {
		t.Fatalf("refresh at zitadel: %v", err)
	}
	after, _ := centralsync.LoadCredentials(q)
	q.Close()
	if after.RefreshToken == creds.RefreshToken {
		t.Error("zitadel rotated the refresh token but the new one was not persisted")
	}

	// Unpair, then the daemon on this gateway: exit 78 and how to pair,
	// from the real process (see TestExitNotPaired for the helper).
	var out, errOut lockedBuffer
	if err := unpairWith(context.Background(), sf.env, []string{"--config", sf.cfgPath}, &out, &errOut); err != nil {
		t.Fatalf("unpair: %v", err)
	}
	if !strings.Contains(out.String(), "tokens       revoked") {
		t.Errorf("unpair output:\n%s", out.String())
	}
	code, stderr := runEdgegateProcess(t, "run", "--config", sf.cfgPath)
	if code != 78 || !strings.Contains(stderr, "edgegate pair --central URL") {
		t.Errorf("run after unpair: exit %d, stderr:\n%s\nwant exit 78 and how to pair", code, stderr)
	}
}

func TestPairStockRegistersAppIDWhenAllowed(t *testing.T) {
	// An AreaManager: AppID 3 in the stock limits table.
	sf := newStockFixture(t, stockOptions{role: "AreaManager", limits: map[string]int{"AppID": 3, "IOTID": 50}})
	res := sf.pair(t, context.Background(), true, "--broker", "orion-1")
	if res.err != nil {
		t.Fatalf("pair: %v\n%s", res.err, res.out)
	}
	if !strings.Contains(res.out, "AppID row     registered as gw-z-01") {
		t.Errorf("output:\n%s", res.out)
	}
	rows := sf.own.live("test-user2", "AppID")
	if len(rows) != 1 || rows[0].ElementID != "gw-z-01" || !strings.Contains(string(rows[0].ElementDetails), "edgegateway_type") {
		t.Errorf("AppID rows = %+v", rows)
	}
	// Pairing again (--force) updates the account's own row: stock echoes
	// it without an id, and it is not the pairing's to delete.
	res = sf.pair(t, context.Background(), true, "--broker", "orion-1", "--force")
	if res.err != nil || !strings.Contains(res.out, "AppID row     updated") {
		t.Errorf("second pair: %v\n%s", res.err, res.out)
	}
	if rows := sf.own.live("test-user2", "AppID"); len(rows) != 1 {
		t.Errorf("AppID rows after re-pairing = %+v", rows)
	}
}

func TestPairStockFailuresLeaveNothing(t *testing.T) {
	t.Run("limits fail", func(t *testing.T) {
		sf := newStockFixture(t, stockOptions{})
		sf.own.limitsStatus = http.StatusInternalServerError
		res := sf.pair(t, context.Background(), true, "--broker", "orion-1")
		t.Logf("error shown: %v", res.err)
		if res.err == nil || !strings.Contains(res.err.Error(), "ownership limits") || !strings.Contains(res.err.Error(), "nothing was saved") ||
			!strings.Contains(res.err.Error(), "undone: revoke the refresh token") {
			t.Errorf("err = %v", res.err)
		}
		sf.assertTokensDead(t)
		sf.assertNoState(t)
		sf.noSecretsIn(t, res.out, res.errOut, fmt.Sprint(res.err))
	})
	t.Run("userinfo fails", func(t *testing.T) {
		sf := newStockFixture(t, stockOptions{limits: map[string]int{"AppID": 1}})
		sf.failUserinfo = true
		res := sf.pair(t, context.Background(), true, "--broker", "orion-1")
		if res.err == nil || !strings.Contains(res.err.Error(), "userinfo") || !strings.Contains(res.err.Error(), "status 503") {
			t.Errorf("err = %v", res.err)
		}
		if sf.own.called("limits") {
			t.Error("went on after userinfo failed")
		}
		sf.mu.Lock()
		sf.failUserinfo = false // so that assertTokensDead asks the provider for real
		sf.mu.Unlock()
		sf.assertTokensDead(t)
		sf.assertNoState(t)
	})
	t.Run("register fails", func(t *testing.T) {
		sf := newStockFixture(t, stockOptions{limits: map[string]int{"AppID": 1}})
		sf.own.registerStatus = http.StatusInternalServerError
		res := sf.pair(t, context.Background(), true, "--broker", "orion-1")
		if res.err == nil || !strings.Contains(res.err.Error(), "register gateway") || !strings.Contains(res.err.Error(), "status 500") {
			t.Errorf("err = %v", res.err)
		}
		sf.assertTokensDead(t)
		sf.assertNoState(t)
	})
	t.Run("config not writable after the AppID row", func(t *testing.T) {
		sf := newStockFixture(t, stockOptions{limits: map[string]int{"AppID": 1}})
		// The config's directory is a file: the last write fails.
		os.WriteFile(filepath.Dir(sf.cfgPath), []byte("x"), 0o644)
		res := sf.pair(t, context.Background(), true, "--broker", "orion-1")
		if res.err == nil || !strings.Contains(res.err.Error(), "write config") || !strings.Contains(res.err.Error(), "undone: delete the AppID row gw-z-01") {
			t.Errorf("err = %v", res.err)
		}
		if rows := sf.own.live("test-user2", "AppID"); len(rows) != 0 || !sf.own.called("register") {
			t.Errorf("AppID rows left = %+v", rows)
		}
		sf.assertTokensDead(t)
		if _, err := os.Stat(sf.stateDir); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("state left: %v", err)
		}
	})
	t.Run("interrupted after the AppID row", func(t *testing.T) {
		sf := newStockFixture(t, stockOptions{limits: map[string]int{"AppID": 1}})
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		sf.own.onRegister = cancel // SIGINT while the row is being created
		res := sf.pair(t, ctx, true, "--broker", "orion-1")
		if res.err == nil || !strings.Contains(res.err.Error(), "interrupted; nothing was saved") {
			t.Errorf("err = %v", res.err)
		}
		if rows := sf.own.live("test-user2", "AppID"); len(rows) != 0 {
			t.Errorf("AppID rows left = %+v", rows)
		}
		sf.assertTokensDead(t)
		sf.assertNoState(t)
	})
	t.Run("interrupted before the AppID row", func(t *testing.T) {
		sf := newStockFixture(t, stockOptions{limits: map[string]int{"AppID": 1}})
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		sf.own.onLimits = cancel
		res := sf.pair(t, ctx, true, "--broker", "orion-1")
		if res.err == nil || !strings.Contains(res.err.Error(), "interrupted") {
			t.Errorf("err = %v", res.err)
		}
		if sf.own.called("register") {
			t.Error("registered after the interruption")
		}
		sf.assertTokensDead(t)
		sf.assertNoState(t)
	})
	t.Run("issuer differs", func(t *testing.T) {
		sf := newStockFixture(t, stockOptions{})
		var out, errOut lockedBuffer
		err := pairWith(context.Background(), sf.env, append(sf.args("--broker", "orion-1"), "--issuer", sf.srv.URL+"/"), &out, &errOut)
		if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("names issuer %q, but the configured issuer is %q", sf.srv.URL, sf.srv.URL+"/")) {
			t.Errorf("err = %v", err)
		}
		sf.assertNoState(t)
	})
	t.Run("private_key_jwt the provider cannot do", func(t *testing.T) {
		sf := newStockFixture(t, stockOptions{})
		res := sf.pair(t, context.Background(), false, "--broker", "orion-1", "--private-key-jwt")
		var ee *exitError
		if !errors.As(res.err, &ee) || ee.Code != 2 || !strings.Contains(res.err.Error(), "private_key_jwt") {
			t.Errorf("err = %v", res.err)
		}
		sf.assertNoState(t)
	})
	t.Run("stock mode without a broker", func(t *testing.T) {
		sf := newStockFixture(t, stockOptions{})
		res := sf.pair(t, context.Background(), false)
		var ee *exitError
		if !errors.As(res.err, &ee) || ee.Code != 2 || !strings.Contains(res.err.Error(), "--broker NAME") {
			t.Errorf("err = %v", res.err)
		}
		sf.mu.Lock()
		n := len(sf.issued)
		sf.mu.Unlock()
		if n != 0 {
			t.Error("tokens issued before the usage error")
		}
		sf.assertNoState(t)
	})
}

func TestPairConfidentialClient(t *testing.T) {
	const secret = "s3cret-of-the-gateway-client"
	sf := newStockFixture(t, stockOptions{secret: secret, clientID: "edgegate-confidential"})
	sfile := filepath.Join(sf.dir, "client-secret")
	os.WriteFile(sfile, []byte(secret+"\n"), 0o600)
	res := sf.pair(t, context.Background(), true, "--client-id", "edgegate-confidential", "--client-secret-file", sfile, "--broker", "orion-1")
	if res.err != nil {
		t.Fatalf("pair: %v\n%s", res.err, res.out)
	}
	if !strings.Contains(res.out, "confidential client (client_secret_basic)") || strings.Contains(res.out, secret) {
		t.Errorf("output:\n%s", res.out)
	}
	if b, _ := os.ReadFile(sf.cfgPath); bytes.Contains(b, []byte(secret)) {
		t.Error("the client secret is in the config file")
	}
	q, err := openStore(sf.env, storeFlags{stateDir: sf.stateDir, credential: "store-key"})
	if err != nil {
		t.Fatal(err)
	}
	creds, err := centralsync.LoadCredentials(q)
	if err != nil || creds.AuthMethod != centralsync.AuthClientSecretBasic || creds.ClientSecret != secret {
		t.Fatalf("creds %v: %v", creds, err)
	}
	if s := fmt.Sprintf("%v %+v %#v %s", creds, creds, creds, creds); strings.Contains(s, secret) || strings.Contains(s, creds.RefreshToken) {
		t.Error("the credentials' text shows a secret")
	}
	id, _ := keys.LoadIdentity(q)
	ts, err := centralsync.NewPairedTokenSource(centralsync.PairedOptions{Store: q, Identity: id, HTTPClient: mustHTTP(t, sf.caFile)})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ts.Token(context.Background()); err != nil {
		t.Fatalf("refresh with client_secret_basic: %v", err)
	}
	rotated, _ := centralsync.LoadCredentials(q)
	q.Close()
	// Unpair revokes with the same client authentication.
	var out, errOut lockedBuffer
	if err := unpairWith(context.Background(), sf.env, []string{"--config", sf.cfgPath}, &out, &errOut); err != nil || !strings.Contains(out.String(), "tokens       revoked") {
		t.Fatalf("unpair: %v\n%s", err, out.String())
	}
	req, _ := http.NewRequest(http.MethodPost, sf.srv.URL+"/oauth/token",
		strings.NewReader(url.Values{"grant_type": {"refresh_token"}, "refresh_token": {rotated.RefreshToken}}.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.SetBasicAuth("edgegate-confidential", secret)
	resp, err := sf.srv.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode == http.StatusOK {
		t.Error("the refresh token works after unpair")
	}
	// A secret file others can read is refused before anything happens.
	os.Chmod(sfile, 0o644)
	res = sf.pair(t, context.Background(), false, "--client-secret-file", sfile, "--broker", "orion-1", "--force")
	if res.err == nil || !strings.Contains(res.err.Error(), "chmod 600") {
		t.Errorf("err = %v", res.err)
	}
}

func TestPairCompanionFound(t *testing.T) {
	sf := newStockFixture(t, stockOptions{})
	ek, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	pk, _ := jwk.FromRaw(ek.Public())
	jwk.AssignKeyID(pk)
	set := jwk.NewSet()
	set.AddKey(pk)
	sf.keys = set
	res := sf.pair(t, context.Background(), true)
	if res.err != nil {
		t.Fatalf("pair: %v\n%s", res.err, res.out)
	}
	if !strings.Contains(res.out, "companion     "+sf.srv.URL+": signed policy bundles") || !strings.Contains(res.out, "policy keys   1 pinned") {
		t.Errorf("output:\n%s", res.out)
	}
	cfg, err := config.Load(sf.cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Policy.Source != config.PolicyBundle || cfg.Policy.CentralURL != sf.srv.URL || cfg.Policy.KeysFile != filepath.Join(filepath.Dir(sf.cfgPath), "policy-keys.json") {
		t.Errorf("policy = %+v", cfg.Policy)
	}
	// An explicit --companion that cannot be reached is an error, not
	// stock mode (a 404 there is stock mode, as at the central URL).
	down := httptest.NewTLSServer(http.NotFoundHandler())
	down.Close()
	res = sf.pair(t, context.Background(), false, "--force", "--companion", down.URL)
	if res.err == nil || !strings.Contains(res.err.Error(), "--companion") {
		t.Errorf("err = %v", res.err)
	}
}
