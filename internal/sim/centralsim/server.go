// Package centralsim is a simulated central service: the parts of a stock
// Snap4City platform that an edgegate gateway talks to, with the same
// contracts, so that the gateway cannot tell the difference. The platform's
// public source is the contract; README.md lists each behaviour with the
// stock file it copies.
//
//   - an OpenID Connect provider with Keycloak's paths (realm "master":
//     discovery, JWKS, token endpoint with the client_credentials,
//     refresh_token, password and device_code grants, userinfo, RFC 7009
//     revocation) (oidc.go, pairing.go);
//   - the Orion Broker Filter in front of an in-memory Orion 3.12, answer
//     for answer (filter.go, filtercache.go, orion.go), and the same Orion
//     bare at DirectBrokerURL;
//   - the platform's Ownership API (list, register, limits, delete) and the
//     datamanager's delegation lists and access check (ownership.go);
//   - the IoT Directory's device.php (iotdirectory.go);
//   - with Options.Companion only: the central side of edgegate's own policy
//     sync, which stock Snap4City lacks: signed policy bundles per gateway,
//     the policy-signing key set, an MQTT push broker and signed apply
//     receipts (policybundle.go, pushbroker.go, receipts.go). They model the
//     future edgegate-central companion service (a separate issue), not
//     the platform;
//   - fault injection, and an admin surface under /_sim/ for tests that drive
//     the real binary from another process.
//
// Beyond the real platform, the broker verifies the signature attribute of
// every accepted update with the device's key and records a verdict, so that
// tests and the demo can show end-to-end integrity.
//
// It is used by `edgegate-sim central-sim`, by `make demo` and by tests. Nothing
// in the gateway's own code path may import it.
package centralsim

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"regexp"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwk"

	"github.com/edgegate/edgegate/internal/envelope"
	"github.com/edgegate/edgegate/internal/pki"
	"github.com/edgegate/edgegate/policy"
)

// Defaults of Options.
const (
	// DefaultRealm is the realm of the public Snap4City platform
	// (https://www.snap4city.org/auth/realms/master); stock components
	// hard-code it (e.g. the IoT Directory's device.php and the
	// datamanager's AccessTokenAuthenticationFilter build
	// ".../auth/realms/master/protocol/openid-connect/...").
	DefaultRealm      = "master"
	DefaultAudience   = "edgegate"
	DefaultTokenTTL   = 5 * time.Minute
	DefaultRefreshTTL = 24 * time.Hour
	// BrokerPath is where the broker filter is mounted, after URL(), with
	// the default broker name (BrokerURL follows Options.BrokerName).
	BrokerPath = "/orion-filter/" + DefaultBrokerName
)

// Delegation kinds, as the platform's personal-data service names them.
const (
	KindReadAccess = "READ_ACCESS"
	KindReadWrite  = "READ_WRITE"
	KindWriteOnly  = "WRITE_ONLY"
	KindModify     = "MODIFY"
)

// Device is a registered IoT device: an ownership record and, behind the
// broker, an NGSI entity created with every model attribute.
type Device struct {
	ID    string   `json:"id"`
	Type  string   `json:"type"`
	Owner string   `json:"owner"`
	K1    string   `json:"k1,omitempty"`
	K2    string   `json:"k2,omitempty"`
	Attrs []string `json:"attrs,omitempty"` // model attributes: the entity's, with latitude and longitude; Orion updates only these
	// Radio binds the device to a radio source at its gateway; it is
	// carried into policy bundles.
	Radio *policy.RadioBinding `json:"radio,omitempty"`
	// Signing is who signs the device's readings (policy.SigningHS256,
	// SigningGateway, SigningDevice; "" = HS256), from the edgegateway_uri
	// "signing" parameter of the directory insert; carried into bundles.
	Signing string `json:"signing,omitempty"`
	// PublicKeys are the device's public keys (JWKs), newest first: the
	// platform's elementDetails.publickey (the newest) and the keys the
	// filter verifies with. Old keys stay after a rotation.
	PublicKeys []json.RawMessage `json:"public_keys,omitempty"`
}

// Client is an OAuth2 confidential client with a service account.
type Client struct {
	ID     string `json:"id"`
	Secret string `json:"secret"`
	// Username is the preferred_username of the client's tokens. Empty (the
	// stock case): Keycloak's service-account user "service-account-{id}",
	// which owns nothing on the platform. Set, it models a realm that maps
	// a hard-coded preferred_username onto the client's tokens (a Keycloak
	// "hardcoded claim" mapper: a non-default realm configuration).
	Username string `json:"username,omitempty"`
	Offline  bool   `json:"offline"` // client_credentials also returns a refresh token
}

// AnonymousUser is the datamanager's delegation target that makes an
// element public (AccessServiceImpl.checkDelegationAccess: PUBLIC).
const AnonymousUser = "ANONYMOUS"

// Delegation lets User (or every member of Group) access Device; Kind is
// one of the Kind constants. Device is a device id of this server or any
// element id ("{organization}:{broker}:{device}" for an IoT device).
// User AnonymousUser makes the element public.
type Delegation struct {
	Device string `json:"device"`
	User   string `json:"user,omitempty"`
	// Group is the datamanager's groupname_delegated: an LDAP group
	// ("cn=G,ou=Org,dc=...") or organization ("ou=Org,dc=...") DN, or a
	// bare group or organization name, matched against User.Groups and
	// User.Organization.
	Group string `json:"group,omitempty"`
	Kind  string `json:"kind"`
	// Delegator is the username_delegator; default: the element's owner.
	Delegator string `json:"delegator,omitempty"`
}

// Platform roles, as Snap4City's Keycloak puts them in the "roles" claim
// (and Keycloak in realm_access.roles), in the order the Ownership API's
// session.php picks the main role.
const (
	RoleRootAdmin   = "RootAdmin"
	RoleToolAdmin   = "ToolAdmin"
	RoleAreaManager = "AreaManager"
	RoleManager     = "Manager"
	RoleObserver    = "Observer"
)

// User is an account of the platform: Keycloak user plus the LDAP entries
// (organization, groups) the Ownership API, the datamanager and the IoT
// Directory read.
type User struct {
	Username string `json:"username"`
	// Password enables the resource owner password grant for this user.
	Password string `json:"password,omitempty"`
	// Role is one of the Role constants; default RoleManager.
	Role string `json:"role,omitempty"`
	// Groups are LDAP group names (cn) the user is a member of.
	Groups []string `json:"groups,omitempty"`
	// Organization is the LDAP organizational unit; default
	// Options.Organization. "-" means none (the IoT Directory then answers
	// "Organization not found ...").
	Organization string `json:"organization,omitempty"`
}

// Options configure a Server. Zero values take the defaults above.
type Options struct {
	Realm         string
	Audience      string
	SignatureAttr string
	Clients       []Client
	Devices       []Device
	Delegations   []Delegation
	CheckKeys     bool // Deprecated: means K1K2Auth (stock has no "token and keys" check)
	TokenTTL      time.Duration
	RefreshTTL    time.Duration
	Logger        *slog.Logger
	Now           func() time.Time

	// Policy sync (see policybundle.go).

	// BrokerName names the broker in the Ownership API's elementId
	// ("<Organization>:<BrokerName>:<device>") and elementDetails; default
	// DefaultBrokerName. The filter's path stays BrokerPath.
	BrokerName string
	// Organization is the first part of every elementId; default
	// DefaultOrganization.
	Organization string
	// PolicyTTL is the lifetime of a policy bundle; default DefaultPolicyTTL.
	PolicyTTL time.Duration
	// PolicyKeyAlg is the policy-signing algorithm: "ES256" (default),
	// "EdDSA" or "RS256".
	PolicyKeyAlg string
	// BundleAllDevices puts every registered device in every gateway's
	// bundle; by default a bundle holds only the devices owned by the
	// gateway account's user.
	BundleAllDevices bool
	// Gateways maps an OAuth client id to the gateway it is the account of.
	// When empty, a gateway is bound to the first client that uses it
	// (trust on first use); when set, only these bindings are accepted.
	Gateways map[string]string
	// MQTT starts the push broker (TLS, same CA) with Start.
	MQTT bool
	// TrustTokensOf makes this server's broker filter also accept access
	// tokens issued by another simulated central service: a second broker
	// behind the same single sign-on, for tests that check that a device's
	// data reaches its own broker and no other.
	TrustTokensOf *Server
	// MQTTListen is the push broker's address; default "127.0.0.1:0".
	MQTTListen string

	// Load tests (see record.go).

	// OnUpdate, when set, is called with every accepted update (PATCH or
	// one entity of an op/update), after the store's lock is released, on
	// the request's goroutine. It must be safe for concurrent use.
	OnUpdate func(Update)
	// DiscardUpdates keeps accepted updates out of Updates and Summary (the
	// entity store and duplicate detection still see them), so that a long
	// load test does not grow the simulator without bound.
	DiscardUpdates bool

	// Pairing configures the device grant and pairing surface (pairing.go).
	Pairing PairingOptions

	// Broker filter (filter.go)

	// K1K2Auth lets a request WITHOUT an Authorization header through on
	// the device's k1/k2 query parameters (spring.auth.k1k2.enabled of the
	// Orion Broker Filter; false in its deploy, as here). With an
	// Authorization header k1/k2 are never consulted.
	K1K2Auth bool
	// FilterCacheTTL is how long the filter caches an ownership or
	// delegation answer, positive or negative; default
	// DefaultFilterCacheTTL (filtercache.go).
	FilterCacheTTL time.Duration

	// Platform (ownership.go, iotdirectory.go)

	// Users are the platform's accounts. When empty, every username is an
	// implicit user (role Manager, organization Options.Organization); when
	// set, a username not listed has no organization and no role.
	Users []User
	// Limits replace the Ownership API's limits table; nil: StockLimits.
	Limits []Limit
	// TrustIssuers are third-party OpenID providers: the Ownership API
	// resolves the user of their tokens through the provider's userinfo
	// endpoint (found in its discovery document).
	TrustIssuers []TrustedIssuer
	// PlatformHTTPClient makes the calls to trusted third-party providers;
	// default: one that trusts the system roots.
	PlatformHTTPClient *http.Client
	// Orion subscriptions (orion_subs.go)

	// NoSubscriptions makes the broker answer POST and DELETE
	// /v2/subscriptions 501, as a deploy that does not offer them (a
	// gateway then falls back to polling).
	NoSubscriptions bool
	// NotifyHTTPClient sends Orion's HTTP notifications; default
	// http.DefaultClient (Orion verifies the receiver's certificate unless
	// started with -insecureNotif).
	NotifyHTTPClient *http.Client

	// Companion mounts the edgegate-only endpoints that stock Snap4City
	// lacks (policy keys, signed bundles, receipts, the MQTT push broker,
	// pairing's key pinning): they model the future edgegate-central
	// companion. Default false: a stock platform.
	Companion bool
}

// Server is a running (or ready to run) simulated central service.
type Server struct {
	opts    Options
	log     *slog.Logger
	now     func() time.Time
	clients map[string]Client

	ca         *pki.CA
	signKey    jwk.Key // private, with kid and alg
	publicJWKS jwk.Set
	adminToken string
	tokens     tokenCache  // verified access tokens (tokencache.go)
	fcache     filterCache // the broker filter's checks (filtercache.go)
	trusted    []*trustedIssuer

	closing  chan struct{} // closed by Close: ends injected delays
	inflight atomic.Int64  // requests being served

	mu        sync.Mutex
	devices   map[string]Device
	entities  map[string]*entity
	delegs    []Delegation
	updates   []Update
	refusals  []Refusal
	refresh   map[string]refreshGrant
	seen      map[seenKey]bool
	fault     *Fault
	faultLeft int

	startOnce sync.Once
	srv       *http.Server
	url       string
	served    chan error

	ps   syncState    // policy-sync state, under mu
	pair pairingState // pairing state, under its own lock (pairing.go)
	push *pushBroker  // nil unless Options.MQTT

	subs     map[string]*subscription // Orion's subscriptions, under mu (orion_subs.go)
	notifier *subNotifier
	noSubs   atomic.Bool // Options.NoSubscriptions, SetNoSubscriptions
}

var realmRE = regexp.MustCompile(`^[A-Za-z0-9._-]{1,64}$`)

// New validates opts and builds a Server with its own CA and token signing
// key. It does not listen; call Start.
func New(opts Options) (*Server, error) {
	if opts.Realm == "" {
		opts.Realm = DefaultRealm
	}
	if !realmRE.MatchString(opts.Realm) {
		return nil, fmt.Errorf("centralsim: realm must match %s: %q", realmRE, opts.Realm)
	}
	if opts.Audience == "" {
		opts.Audience = DefaultAudience
	}
	if opts.SignatureAttr == "" {
		opts.SignatureAttr = envelope.DefaultSignatureAttr
	}
	if opts.TokenTTL == 0 {
		opts.TokenTTL = DefaultTokenTTL
	}
	if opts.TokenTTL < 0 {
		return nil, fmt.Errorf("centralsim: token_ttl must be positive: %v", opts.TokenTTL)
	}
	if opts.RefreshTTL == 0 {
		opts.RefreshTTL = DefaultRefreshTTL
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	s := &Server{
		opts:     opts,
		log:      opts.Logger.With("component", "centralsim"),
		now:      opts.Now,
		clients:  make(map[string]Client),
		closing:  make(chan struct{}),
		devices:  make(map[string]Device),
		entities: make(map[string]*entity),
		refresh:  make(map[string]refreshGrant),
		seen:     make(map[seenKey]bool),
		subs:     make(map[string]*subscription),
		notifier: newSubNotifier(),
		pair: pairingState{
			codes:   make(map[string]*deviceCode),
			users:   make(map[string]string),
			refresh: make(map[string]*pairGrant),
			keys:    make(map[string]pairedKey),
			jtis:    make(map[string]time.Time),
		},
	}
	s.noSubs.Store(opts.NoSubscriptions)
	if err := s.initSyncState(); err != nil {
		return nil, fmt.Errorf("centralsim: %w", err)
	}
	if err := s.initFilter(); err != nil {
		return nil, fmt.Errorf("centralsim: %w", err)
	}
	for i, c := range opts.Clients {
		switch {
		case c.ID == "":
			return nil, fmt.Errorf("centralsim: clients[%d].id is empty", i)
		case c.Secret == "":
			return nil, fmt.Errorf("centralsim: clients[%d].secret is empty", i)
		}
		if _, dup := s.clients[c.ID]; dup {
			return nil, fmt.Errorf("centralsim: clients[%d].id is a duplicate: %q", i, c.ID)
		}
		s.clients[c.ID] = c
	}
	if opts.MQTT && !opts.Companion {
		return nil, errors.New("centralsim: the MQTT push broker is a companion extension: set Companion too")
	}
	if err := s.initPlatform(); err != nil {
		return nil, fmt.Errorf("centralsim: %w", err)
	}
	for i, d := range opts.Devices {
		if err := validDevice(d); err != nil {
			return nil, fmt.Errorf("centralsim: devices[%d]: %w", i, err)
		}
		if _, dup := s.devices[d.ID]; dup {
			return nil, fmt.Errorf("centralsim: devices[%d].id is a duplicate: %q", i, d.ID)
		}
		s.addDeviceLocked(d)
	}
	for i, dl := range opts.Delegations {
		if err := validDelegation(dl); err != nil {
			return nil, fmt.Errorf("centralsim: delegations[%d]: %w", i, err)
		}
	}
	s.delegs = append([]Delegation(nil), opts.Delegations...)
	s.noteDelegationsLocked()

	var err error
	if s.ca, err = pki.NewCA("edgegate central-sim CA", s.now()); err != nil {
		return nil, fmt.Errorf("centralsim: %w", err)
	}
	if err := s.initSigningKey(); err != nil {
		return nil, fmt.Errorf("centralsim: %w", err)
	}
	if s.adminToken, err = randomToken(32); err != nil {
		return nil, fmt.Errorf("centralsim: admin token: %w", err)
	}
	return s, nil
}

// Start listens on addr (e.g. "127.0.0.1:0") and serves HTTPS with a
// certificate from the server's own CA, until Close.
func (s *Server) Start(addr string) error {
	err := errors.New("centralsim: already started")
	s.startOnce.Do(func() { err = s.start(addr) })
	return err
}

func (s *Server) start(addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("centralsim: listen %s: %w", addr, err)
	}
	host, port, _ := net.SplitHostPort(ln.Addr().String())
	hosts := []string{"127.0.0.1", "::1", "localhost"}
	if ip := net.ParseIP(host); ip != nil && !ip.IsUnspecified() && !ip.IsLoopback() {
		hosts = append(hosts, host)
	}
	if hn, err := os.Hostname(); err == nil && hn != "" {
		hosts = append(hosts, hn)
	}
	cert, err := s.ca.IssueServer(s.now(), hosts...)
	if err != nil {
		ln.Close()
		return fmt.Errorf("centralsim: %w", err)
	}
	s.srv = &http.Server{
		Handler:           s.routes(),
		TLSConfig:         tlsConfig(cert),
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       30 * time.Second,
		WriteTimeout:      60 * time.Second,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    64 << 10,
		// Handshake failures of clients that do not trust the CA are expected
		// in tests; keep them at debug level.
		ErrorLog: slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
	}
	hostForURL := host
	if ip := net.ParseIP(host); ip == nil || ip.IsUnspecified() {
		hostForURL = "127.0.0.1"
	}
	s.url = "https://" + net.JoinHostPort(hostForURL, port)
	if s.opts.MQTT {
		if s.push, err = s.startPushBroker(cert); err != nil {
			ln.Close()
			return fmt.Errorf("centralsim: %w", err)
		}
	}
	s.served = make(chan error, 1)
	go func() { s.served <- s.srv.ServeTLS(ln, "", "") }()
	s.log.Info("central-sim listening", "url", s.url, "issuer", s.Issuer(), "broker", s.BrokerURL())
	return nil
}

// Close stops serving: injected delays end at once, in-flight requests get
// up to five seconds, then connections are closed.
func (s *Server) Close() error {
	select {
	case <-s.closing:
		return nil
	default:
		close(s.closing)
	}
	if s.push != nil {
		s.push.close()
	}
	defer s.closeNotifier()
	if s.srv == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := s.srv.Shutdown(ctx)
	if err != nil {
		err = s.srv.Close()
	}
	if serr := <-s.served; serr != nil && !errors.Is(serr, http.ErrServerClosed) && err == nil {
		err = serr
	}
	return err
}

// URL is the base URL, e.g. "https://127.0.0.1:43567"; empty before Start.
func (s *Server) URL() string { return s.url }

// Issuer is the OIDC issuer: {URL}/auth/realms/{realm}.
func (s *Server) Issuer() string { return s.url + s.realmPath() }

// TokenURL is the OAuth2 token endpoint.
func (s *Server) TokenURL() string { return s.Issuer() + "/protocol/openid-connect/token" }

// JWKSURL is the realm's key set.
func (s *Server) JWKSURL() string { return s.Issuer() + "/protocol/openid-connect/certs" }

// BrokerURL is the base of the NGSI v2 API behind the filter, e.g.
// https://127.0.0.1:P/orion-filter/orion-1: PATCH {BrokerURL}/v2/entities/{id}/attrs.
func (s *Server) BrokerURL() string { return s.url + "/orion-filter/" + s.opts.BrokerName }

// CACertPEM is the PEM of the CA that issued the server certificate.
func (s *Server) CACertPEM() []byte { return append([]byte(nil), s.ca.CertPEM...) }

// CAPool is a pool holding only that CA.
func (s *Server) CAPool() *x509.CertPool { return s.ca.Pool() }

// AdminToken is the Bearer token of the /_sim/ admin surface.
func (s *Server) AdminToken() string { return s.adminToken }

func (s *Server) realmPath() string { return "/auth/realms/" + s.opts.Realm }

func randomToken(n int) (string, error) {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	return base64.RawURLEncoding.EncodeToString(b), nil
}

func generateRSA() (*rsa.PrivateKey, error) { return rsa.GenerateKey(rand.Reader, 2048) }
