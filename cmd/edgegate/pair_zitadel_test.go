package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/json"
	"encoding/pem"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwk"
	"github.com/zitadel/oidc/v3/example/server/storage"
	"github.com/zitadel/oidc/v3/pkg/oidc"
	"github.com/zitadel/oidc/v3/pkg/op"

	"github.com/edgegate/edgegate/identity"
	centralsync "github.com/edgegate/edgegate/sync"
)

// The pairing against an OIDC provider this repository did not write:
// zitadel/oidc's pkg/op with its example in-memory storage, on loopback.
// The device client is public (no secret); zitadel announces
// private_key_jwt only with RS256, so pair falls back to a public client,
// as documented in centralsync.ChooseClientAuth.

// publicDeviceClient is the example's device client made public and
// allowed to refresh (what a Keycloak admin enables for the gateway client).
type publicDeviceClient struct{ *storage.Client }

func (publicDeviceClient) AuthMethod() oidc.AuthMethod         { return oidc.AuthMethodNone }
func (publicDeviceClient) ApplicationType() op.ApplicationType { return op.ApplicationTypeNative }
func (publicDeviceClient) GrantTypes() []oidc.GrantType {
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

func TestPairAgainstZitadel(t *testing.T) {
	const clientID = "edgegate-gateway"
	var provider http.Handler
	var registered []map[string]any
	mux := http.NewServeMux()
	mux.HandleFunc("POST /ownership-api/v1/register/", func(w http.ResponseWriter, r *http.Request) {
		if !strings.HasPrefix(r.Header.Get("Authorization"), "Bearer ") {
			http.Error(w, `{"error":"no token"}`, http.StatusUnauthorized)
			return
		}
		var body map[string]any
		json.NewDecoder(r.Body).Decode(&body)
		registered = append(registered, body)
		json.NewEncoder(w).Encode(map[string]any{"id": 1, "username": "test-user2", "elementId": body["elementId"]})
	})
	ek, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	pk, _ := jwk.FromRaw(ek.Public())
	jwk.AssignKeyID(pk)
	set := jwk.NewSet()
	set.AddKey(pk)
	mux.HandleFunc("GET /edgegate/v1/policy-keys", func(w http.ResponseWriter, r *http.Request) { json.NewEncoder(w).Encode(set) })
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) { provider.ServeHTTP(w, r) })
	srv := httptest.NewUnstartedServer(mux)
	srv.StartTLS()
	defer srv.Close()

	clients := map[string]*storage.Client{clientID: storage.DeviceClient(clientID, "")}
	st := &zitadelStorage{Storage: storage.NewStorageWithClients(storage.NewUserStore(srv.URL), clients),
		client: publicDeviceClient{clients[clientID]}}
	var key [32]byte
	rand.Read(key[:])
	p, err := op.NewProvider(&op.Config{
		CryptoKey: key, GrantTypeRefreshToken: true,
		DeviceAuthorization: op.DeviceAuthorizationConfig{Lifetime: 5 * time.Minute, PollInterval: time.Second,
			UserFormPath: "/device", UserCode: op.UserCodeBase20},
	}, st, op.StaticIssuer(srv.URL))
	if err != nil {
		t.Fatal(err)
	}
	provider = p

	dir := t.TempDir()
	caFile := filepath.Join(dir, "ca.pem")
	os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw}), 0o644)
	f := &pairFixture{dir: dir, caFile: caFile, cfgPath: filepath.Join(dir, "etc", "edgegate.yaml"), stateDir: filepath.Join(dir, "state"),
		env: pairEnv{getenv: func(string) string { return "" }, hostname: func() (string, error) { return "gw01", nil }, now: time.Now}}

	var out, errOut lockedBuffer
	done := make(chan error, 1)
	go func() {
		done <- pairWith(context.Background(), f.env, []string{"--central", srv.URL, "--issuer", srv.URL, "--ca", caFile,
			"--config", f.cfgPath, "--state-dir", f.stateDir, "--gateway-id", "gw-z-01", "--client-id", clientID}, &out, &errOut)
	}()
	code := waitUserCode(t, &out, done)
	if code == "" {
		t.Fatalf("pair ended early: %v\n%s", <-done, out.String())
	}
	if err := st.CompleteDeviceAuthorization(context.Background(), code, "id1"); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("pair: %v\n%s", err, out.String())
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("pair did not finish:\n%s", out.String())
	}
	if !strings.Contains(out.String(), srv.URL+"/device") || !strings.Contains(out.String(), "public client, no shared secret") {
		t.Errorf("output:\n%s", out.String())
	}
	if len(registered) != 1 || registered[0]["elementType"] != "AppID" {
		t.Errorf("registrations = %v", registered)
	}

	// The daemon's refresh against zitadel: rotation persisted.
	q, err := openStore(f.env, storeFlags{stateDir: f.stateDir, credential: "store-key"})
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	creds, err := centralsync.LoadCredentials(q)
	if err != nil || creds.AuthMethod != centralsync.AuthNone || creds.RefreshToken == "" {
		t.Fatalf("creds %v: %v", creds, err)
	}
	id, _ := identity.Load(q)
	ts, err := centralsync.NewPairedTokenSource(centralsync.PairedOptions{Store: q, Identity: id, HTTPClient: mustHTTP(t, caFile)})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ts.Token(context.Background()); err != nil {
		t.Fatalf("refresh at zitadel: %v", err)
	}
	after, _ := centralsync.LoadCredentials(q)
	if after.RefreshToken == creds.RefreshToken {
		t.Error("zitadel rotated the refresh token but the new one was not persisted")
	}
}
