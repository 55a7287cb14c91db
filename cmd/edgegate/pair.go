package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"

	"golang.org/x/oauth2"
	"gopkg.in/yaml.v3"

	"github.com/edgegate/edgegate/internal/atomicfile"
	"github.com/edgegate/edgegate/internal/config"
	"github.com/edgegate/edgegate/internal/keys"
	"github.com/edgegate/edgegate/internal/queue"
	centralsync "github.com/edgegate/edgegate/sync"
)

// pairEnv are the process-level inputs of pair, unpair and device, so
// that tests run them in-process.
type pairEnv struct {
	getenv   func(string) string
	hostname func() (string, error)
	now      func() time.Time
}

func defaultPairEnv() pairEnv {
	return pairEnv{getenv: os.Getenv, hostname: os.Hostname, now: time.Now}
}

const pairUsage = `usage: edgegate pair --central URL [flags]

Pairs this gateway with a Snap4City platform (or any OpenID provider with
the same APIs): you approve it in a browser (the OAuth2 device
authorization grant, RFC 8628), the gateway registers its AppID row where
the account may, and writes its configuration. Against a stock platform
the policy comes from the Ownership API and delegations (--broker names the
context brokers); when the edgegate companion answers at --companion (or
the central URL), its policy-signing keys are pinned and signed bundles
are used instead. A failed or interrupted pairing leaves nothing behind.
`

// Defaults that fit a stock Snap4City: realm master (the public platform's
// /auth/realms/master), and the public client its own IoT Edge signs in
// with, nodered-iotedge (node-red-contrib-snap4city-user,
// snap4city-authentication-dev.js): its tokens are the ones the IoT
// Directory accepts with nodered=yes. The realm admin enables the device
// grant (and offline_access) on it, or on a client of your choice
// (--client-id).
const (
	defaultRealm    = "master"
	defaultClientID = "nodered-iotedge"
)

func runPair(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	return pairWith(ctx, defaultPairEnv(), args, stdout, stderr)
}

type storeFlags struct {
	stateDir, keyFile, credential string
}

func (s *storeFlags) register(fs *flag.FlagSet) {
	// The defaults are the configuration's (config.Default), so a gateway
	// paired without these flags finds its store where run looks.
	def := config.Default()
	fs.StringVar(&s.stateDir, "state-dir", def.StateDir, "state directory (the encrypted store)")
	fs.StringVar(&s.keyFile, "store-key-file", "", "store key file (default STATE_DIR/store.key)")
	fs.StringVar(&s.credential, "store-credential", def.Store.Credential, "systemd credential holding the store key")
}

func (s *storeFlags) keyPath() string {
	if s.keyFile != "" {
		return s.keyFile
	}
	return filepath.Join(s.stateDir, "store.key")
}

// errStoreLocked is what the installer must do when the daemon holds the store.
var errStoreLocked = errors.New("the store is in use by the running daemon: stop the daemon first: systemctl stop edgegate")

// openStore opens the encrypted store as the daemon does.
func openStore(env pairEnv, s storeFlags) (*queue.Queue, error) {
	key, _, err := keys.LoadStoreKey(s.credential, s.keyPath(), env.getenv)
	if err != nil {
		return nil, err
	}
	defer clear(key)
	if err := os.MkdirAll(s.stateDir, 0o700); err != nil {
		return nil, fmt.Errorf("create state directory: %w", err)
	}
	q, err := queue.Open(queue.Options{Dir: filepath.Join(s.stateDir, "queue"), Key: key})
	if err != nil {
		if strings.Contains(err.Error(), "directory lock") || strings.Contains(err.Error(), "Another process is using") {
			return nil, errStoreLocked
		}
		return nil, err
	}
	return q, nil
}

// centralHTTP is the client for the central service: TLS verified, with
// --ca FILE as the only root when given, and bounded waits.
func centralHTTP(caFile string) (*http.Client, error) {
	tc := &tls.Config{MinVersion: tls.VersionTLS12}
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("read --ca: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("--ca %s holds no PEM certificate", caFile)
		}
		tc.RootCAs = pool
	}
	tr := &http.Transport{
		Proxy:                 http.ProxyFromEnvironment,
		DialContext:           (&net.Dialer{Timeout: 10 * time.Second}).DialContext,
		TLSClientConfig:       tc,
		TLSHandshakeTimeout:   10 * time.Second,
		ResponseHeaderTimeout: 30 * time.Second,
		MaxIdleConnsPerHost:   2,
	}
	return &http.Client{Transport: tr, Timeout: 60 * time.Second}, nil
}

// clientCredentialsFile is --client-credentials FILE (JSON or YAML).
type clientCredentialsFile struct {
	ClientID     string `yaml:"client_id" json:"client_id"`
	ClientSecret string `yaml:"client_secret" json:"client_secret"`
}

func readClientCredentials(path string) (*clientCredentialsFile, error) {
	st, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("--client-credentials: %w", err)
	}
	if st.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("--client-credentials %s has mode %04o; it holds a secret: run chmod 600 %s", path, st.Mode().Perm(), path)
	}
	if st.Size() > 64<<10 {
		return nil, fmt.Errorf("--client-credentials %s is too large", path)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("--client-credentials: %w", err)
	}
	var c clientCredentialsFile
	if err := yaml.Unmarshal(b, &c); err != nil { // YAML is a superset of JSON
		return nil, fmt.Errorf("--client-credentials %s: not YAML or JSON with client_id and client_secret", path)
	}
	if c.ClientID == "" || c.ClientSecret == "" {
		return nil, fmt.Errorf("--client-credentials %s: client_id and client_secret are required", path)
	}
	return &c, nil
}

// brokerFlags is the repeatable --broker NAME[=FILTER_URL].
type brokerFlags map[string]string

func (b brokerFlags) String() string { return fmt.Sprint(map[string]string(b)) }

func (b brokerFlags) Set(v string) error {
	name, u, _ := strings.Cut(v, "=")
	if !validBrokerName(name) {
		return fmt.Errorf("broker name %q: want letters, digits, '.', '_' or '-'", name)
	}
	if _, dup := b[name]; dup {
		return fmt.Errorf("broker %s given twice", name)
	}
	b[name] = u // empty: {central}/orion-filter/{name}, filled once --central is known
	return nil
}

// validBrokerName follows the IoT Directory's names ([a-zA-Z0-9:._-],
// web/api/common.php) without ':', which the filter's element id
// {organization}:{broker}:{id} uses as its separator.
func validBrokerName(s string) bool {
	if s == "" || len(s) > 128 {
		return false
	}
	for _, c := range []byte(s) {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			return false
		}
	}
	return true
}

// pairOpts are the parsed flags of pair.
type pairOpts struct {
	sf                                  storeFlags
	central, issuer, realm, clientID    string
	secretFile, ccFile, caFile, cfgPath string
	keysPath, gwID, audience, pushURL   string
	companion                           string
	privateKeyJWT, force, noQR          bool
	brokers                             brokerFlags
}

func parsePairFlags(env pairEnv, args []string, stderr io.Writer) (*pairOpts, error) {
	o := &pairOpts{brokers: brokerFlags{}}
	fs := flag.NewFlagSet("pair", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, pairUsage); fs.PrintDefaults() }
	o.sf.register(fs)
	fs.StringVar(&o.central, "central", "", "central platform URL (required), e.g. https://www.snap4city.org")
	fs.StringVar(&o.issuer, "issuer", "", "OIDC issuer, exactly as its discovery document names it (default CENTRAL/auth/realms/REALM)")
	fs.StringVar(&o.realm, "realm", defaultRealm, "Keycloak realm under the central URL (Snap4City: master)")
	fs.StringVar(&o.clientID, "client-id", defaultClientID, "OAuth2 client of the device grant (default: Snap4City's public IoT Edge client)")
	fs.StringVar(&o.secretFile, "client-secret-file", "", "confidential client: file holding its secret (mode 0600); client_secret_basic or _post as the provider allows")
	fs.BoolVar(&o.privateKeyJWT, "private-key-jwt", false, "the client is registered for private_key_jwt with this gateway's key (used only if the provider lists it)")
	fs.StringVar(&o.ccFile, "client-credentials", "", "non-interactive: file with client_id and client_secret (mode 0600), the client credentials grant")
	fs.StringVar(&o.companion, "companion", "", "edgegate companion URL to probe for signed policy bundles (default: the central URL)")
	fs.Var(o.brokers, "broker", "context broker NAME[=FILTER_URL] the gateway writes to (repeatable; default URL CENTRAL/orion-filter/NAME)")
	fs.StringVar(&o.caFile, "ca", "", "CA certificate(s) of the central service (PEM; default: system roots)")
	fs.StringVar(&o.cfgPath, "config", "/etc/edgegate/edgegate.yaml", "configuration file to write")
	fs.StringVar(&o.keysPath, "keys-file", "", "where to pin the companion's policy-signing keys (default: policy-keys.json beside --config)")
	fs.StringVar(&o.gwID, "gateway-id", "", "gateway id (default edgegate-HOSTNAME)")
	fs.StringVar(&o.audience, "audience", "edgegate", "audience of application tokens on the local broker")
	fs.StringVar(&o.pushURL, "push-url", "", "companion MQTT broker for pushed policies (tls://host:port), optional")
	fs.BoolVar(&o.force, "force", false, "pair again even if this gateway is paired")
	fs.BoolVar(&o.noQR, "no-qr", false, "do not draw the QR code")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	usage := func(format string, a ...any) (*pairOpts, error) {
		return nil, &exitError{Code: 2, Err: fmt.Errorf("pair: "+format, a...)}
	}
	if o.central == "" || fs.NArg() > 0 {
		fs.Usage()
		return usage("--central URL is required")
	}
	// https only: the Ownership API, datamanager and filter URLs derive
	// from it, and the daemon reaches those over https only. (A sign-on on
	// loopback may be plain http: --issuer.)
	if u, err := url.Parse(o.central); err != nil || u.Scheme != "https" || u.Host == "" || u.User != nil {
		return usage("--central must be an https URL: %q", o.central)
	}
	o.central = strings.TrimRight(o.central, "/")
	if o.issuer == "" {
		o.issuer = o.central + "/auth/realms/" + url.PathEscape(o.realm)
	}
	if o.companion == "" {
		o.companion = o.central
	} else if err := centralsync.SecureURL(o.companion); err != nil {
		return usage("--companion %q: %v", o.companion, err)
	}
	for name, u := range o.brokers {
		if u == "" {
			o.brokers[name] = o.central + "/orion-filter/" + name
			continue
		}
		// The daemon delivers to brokers over https only (config's rule).
		if pu, err := url.Parse(u); err != nil || pu.Scheme != "https" || pu.Host == "" || pu.User != nil {
			return usage("--broker %s=%s: the filter URL must be https://host/...", name, u)
		}
	}
	switch {
	case o.secretFile != "" && o.ccFile != "":
		return usage("--client-secret-file and --client-credentials exclude each other")
	case o.secretFile != "" && o.privateKeyJWT:
		return usage("--client-secret-file and --private-key-jwt exclude each other")
	case o.ccFile != "" && o.privateKeyJWT:
		return usage("--client-credentials and --private-key-jwt exclude each other")
	}
	if o.gwID == "" {
		h, err := env.hostname()
		if err != nil || h == "" {
			return usage("no hostname: pass --gateway-id")
		}
		o.gwID = "edgegate-" + strings.ToLower(strings.Split(h, ".")[0])
	}
	if o.keysPath == "" {
		o.keysPath = filepath.Join(filepath.Dir(o.cfgPath), "policy-keys.json")
	}
	return o, nil
}

// rollback undoes what a pairing did at the platform, newest first.
type rollback struct {
	steps []rollbackStep
}

type rollbackStep struct {
	todo string // what undo does, for the installer: "revoke the refresh token"
	undo func(context.Context) error
}

func (r *rollback) push(todo string, undo func(context.Context) error) {
	r.steps = append(r.steps, rollbackStep{todo, undo})
}

// run undoes every step, even after ctx was cancelled (SIGINT): a bounded
// context of its own. It returns one line per step for the installer.
func (r *rollback) run(ctx context.Context) []string {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	var lines []string
	for i := len(r.steps) - 1; i >= 0; i-- {
		s := r.steps[i]
		if err := s.undo(ctx); err != nil {
			lines = append(lines, fmt.Sprintf("NOT undone: %s failed (%v): do it at the platform", s.todo, err))
		} else {
			lines = append(lines, "undone: "+s.todo)
		}
	}
	r.steps = nil
	return lines
}

func exists(p string) bool {
	_, err := os.Lstat(p)
	return err == nil
}

func pairWith(ctx context.Context, env pairEnv, args []string, stdout, stderr io.Writer) (err error) {
	o, err := parsePairFlags(env, args, stderr)
	if err != nil {
		return err
	}
	var secret string
	if o.secretFile != "" {
		if secret, err = readPrivateSecret(o.secretFile); err != nil {
			return &exitError{Code: 2, Err: fmt.Errorf("pair: --client-secret-file: %w", err)}
		}
	}
	var cc *clientCredentialsFile
	if o.ccFile != "" {
		if cc, err = readClientCredentials(o.ccFile); err != nil {
			return &exitError{Code: 2, Err: err}
		}
	}
	hc, err := centralHTTP(o.caFile)
	if err != nil {
		return &exitError{Code: 2, Err: err}
	}

	// A pairing that fails leaves no state behind: a store this run
	// created (and its key file) is removed again.
	stateExisted, queueExisted, keyExisted := exists(o.sf.stateDir), exists(filepath.Join(o.sf.stateDir, "queue")), exists(o.sf.keyPath())
	q, err := openStore(env, o.sf)
	if err != nil {
		return fmt.Errorf("pair: %w", err)
	}
	defer func() {
		q.Close()
		if err == nil || queueExisted {
			return
		}
		os.RemoveAll(filepath.Join(o.sf.stateDir, "queue"))
		if !keyExisted {
			os.Remove(o.sf.keyPath())
		}
		if !stateExisted {
			os.Remove(o.sf.stateDir) // only if empty
		}
	}()
	old, err := centralsync.LoadCredentials(q)
	switch {
	case err == nil && !o.force:
		fmt.Fprintf(stdout, "This gateway is already paired with %s (gateway %s, since %s).\nNothing was changed. To pair again: edgegate pair --force --central %s\n",
			old.CentralURL, old.Gateway, old.PairedAt.Format(time.RFC3339), o.central)
		return nil
	case err != nil && !errors.Is(err, centralsync.ErrNotPaired) && !o.force:
		return fmt.Errorf("pair: %w", err)
	case err != nil:
		old = nil
	}
	id, err := keys.LoadIdentity(q)
	if err != nil {
		return fmt.Errorf("pair: %w", err)
	}

	disc, err := centralsync.Discover(ctx, hc, o.issuer)
	if err != nil {
		return fmt.Errorf("pair: cannot use the central sign-on: %w\n(check --central, --realm or --issuer, the network, and --ca for a private CA); nothing was saved", err)
	}

	// The companion extension: probed, never required (stock has no such
	// endpoint and answers 404).
	keys, nkeys, perr := centralsync.FetchPolicyKeys(ctx, hc, o.companion)
	companion := perr == nil
	var companionNote string
	switch {
	case companion:
	case errors.Is(perr, centralsync.ErrNoCompanion):
		companionNote = "none at " + o.companion + ": stock mode"
	case o.companion != o.central:
		// Asked for by name: a companion that does not answer right is an error.
		return fmt.Errorf("pair: --companion %s: %w; nothing was saved", o.companion, perr)
	default:
		companionNote = "none at " + o.companion + " (" + perr.Error() + "): stock mode"
	}
	if !companion && len(o.brokers) == 0 {
		return &exitError{Code: 2, Err: errors.New("pair: stock mode needs the context broker(s) the gateway writes to: --broker NAME[=FILTER_URL] (e.g. --broker orion-1); nothing was saved")}
	}

	cred := &centralsync.Credentials{
		Gateway: o.gwID, Issuer: disc.Issuer, TokenURL: disc.TokenEndpoint, RevocationURL: disc.RevocationEndpoint,
		CentralURL: o.central, Scopes: centralsync.DefaultScopes, PairedAt: env.now().UTC(),
	}
	var signer centralsync.AssertionSigner
	if cc == nil {
		choice, err := disc.ChooseClientAuth(secret != "", o.privateKeyJWT)
		if err != nil {
			return &exitError{Code: 2, Err: fmt.Errorf("pair: client authentication: %w; nothing was saved", err)}
		}
		cred.Grant, cred.AuthMethod, cred.Alg, cred.ClientID, cred.ClientSecret = centralsync.GrantRefreshToken, choice.Method, choice.Alg, o.clientID, secret
		if choice.Alg == "ES256" {
			if cred.ES256Key, err = centralsync.NewES256Key(); err != nil {
				return err
			}
		}
		if signer, err = centralsync.SignerFor(cred, id); err != nil {
			return err
		}
	}
	fmt.Fprintf(stdout, "Gateway %s, identity %s\nSign-on %s\n", o.gwID, id.Thumbprint(), disc.Issuer)

	// From the first token on, a failure undoes what was done.
	var rb rollback
	defer func() {
		if err == nil {
			return
		}
		lines := rb.run(ctx)
		if len(lines) > 0 {
			err = fmt.Errorf("%w\n  %s", err, strings.Join(lines, "\n  "))
		}
	}()

	var access string
	if cc != nil {
		cred.Grant, cred.AuthMethod, cred.ClientID, cred.ClientSecret = centralsync.GrantClientCredentials, centralsync.AuthClientSecret, cc.ClientID, cc.ClientSecret
		cred.Scopes = []string{"openid"}
		ts := centralsync.NewTokenSource(centralsync.ClientCredentials{TokenURL: disc.TokenEndpoint, ClientID: cc.ClientID,
			ClientSecret: cc.ClientSecret, Scopes: cred.Scopes, HTTPClient: hc})
		if access, err = ts.Token(ctx); err != nil {
			return fmt.Errorf("pair: the central sign-on refused the client credentials of %s: %w; nothing was saved", o.ccFile, err)
		}
		if disc.RevocationEndpoint != "" {
			auth := centralsync.ClientAuthFor(cred, nil)
			rb.push("revoke the access token", func(ctx context.Context) error {
				return centralsync.RevokeToken(ctx, hc, disc.RevocationEndpoint, access, "access_token", auth)
			})
		}
	} else {
		var tok *oauth2.Token
		if tok, err = deviceGrant(ctx, disc, cred, signer, hc, o.noQR, stdout); err != nil {
			return err
		}
		access = tok.AccessToken
		auth := centralsync.ClientAuthFor(cred, signer)
		// RFC 7009: the refresh token first (a provider revokes the
		// grant's access tokens with it), then the access token.
		rb.push("revoke the access token", func(ctx context.Context) error {
			return centralsync.RevokeToken(ctx, hc, disc.RevocationEndpoint, access, "access_token", auth)
		})
		rb.push("revoke the refresh token", func(ctx context.Context) error {
			return centralsync.RevokeToken(ctx, hc, disc.RevocationEndpoint, cred.RefreshToken, "refresh_token", auth)
		})
	}
	if ctx.Err() != nil {
		return errPairInterrupted
	}

	// Who approved: the name the Ownership API and the filter know the
	// account by (userinfo username, else preferred_username:
	// Ownership-API/session.php).
	var user string
	if disc.UserinfoEndpoint != "" {
		if user, err = centralsync.UserInfo(ctx, hc, disc.UserinfoEndpoint, access); err != nil {
			return fmt.Errorf("pair: %w; nothing was saved", err)
		}
	}

	// The AppID row, where the account may register one: stock gives
	// ordinary users an AppID limit of 0, a normal case.
	appNote, err := registerApp(ctx, hc, o, id, signer, access, &user, &rb)
	if err != nil {
		return err
	}
	if user == "" && !companion {
		return errors.New("pair: the platform did not say which account approved the gateway (no userinfo username and no Ownership API answer); nothing was saved")
	}
	cred.User = user
	if ctx.Err() != nil {
		return errPairInterrupted
	}

	// Commit, everything at the end: the pinned keys, the store record,
	// the config, each atomic; a failure undoes the earlier ones.
	cfgBytes, err := pairedConfigYAML(pairedConfigInput{
		o: o, issuer: disc.Issuer, tokenURL: disc.TokenEndpoint, clientID: cred.ClientID, scopes: cred.Scopes,
		companion: companion, user: user, thumbprint: id.Thumbprint(), when: cred.PairedAt,
	})
	if err != nil {
		return fmt.Errorf("pair: %w", err)
	}
	if err := checkPairedConfig(cfgBytes); err != nil {
		return fmt.Errorf("pair: the configuration to write does not load: %w; nothing was saved", err)
	}
	if err := commitPairing(q, old, cred, o, companion, keys, cfgBytes); err != nil {
		return fmt.Errorf("pair: %w; nothing was saved", err)
	}
	rb.steps = nil // committed: nothing to undo any more

	if old != nil && old.RefreshToken != "" && old.RevocationURL != "" {
		if s, err := centralsync.SignerFor(old, id); err == nil {
			_ = centralsync.Revoke(ctx, hc, old, s) // best effort: the old grant is replaced
		}
	}

	who := user
	if who == "" {
		who = "the approving account"
	}
	fmt.Fprintf(stdout, "\nPaired.\n  gateway       %s, account %s\n  identity      %s\n  sign-on       %s (client %s, %s)\n  AppID row     %s\n",
		o.gwID, who, id.Thumbprint(), disc.Issuer, cred.ClientID, describeAuth(cred), appNote)
	if companion {
		fmt.Fprintf(stdout, "  companion     %s: signed policy bundles\n  policy keys   %d pinned in %s (fingerprint %s)\n",
			o.companion, nkeys, o.keysPath, centralsync.KeyFingerprint(keys))
	} else {
		fmt.Fprintf(stdout, "  companion     %s\n  policy        the Ownership API and delegations at %s, as %s\n", companionNote, o.central, user)
		for _, name := range slices.Sorted(maps.Keys(o.brokers)) {
			fmt.Fprintf(stdout, "  broker        %s at %s\n", name, o.brokers[name])
		}
	}
	fmt.Fprintf(stdout, `  config        %s

Next steps:
  1. edgegate device add --config %s --type TYPE ID [--radio-port P --radio-node N]
  2. systemctl restart edgegate
  3. edgegate status                      (shows the identity above)
`, o.cfgPath, o.cfgPath)
	return nil
}

// errPairInterrupted: the installer interrupted pairing (SIGINT) before
// anything was saved; what was created on the platform is rolled back.
var errPairInterrupted = errors.New("pair: interrupted; nothing was saved")

// registerApp registers the gateway's AppID row when GET limits says the
// account has a free AppID slot, and says plainly why not otherwise. It
// fills user from the Ownership API when userinfo did not.
func registerApp(ctx context.Context, hc *http.Client, o *pairOpts, id *keys.Identity, signer centralsync.AssertionSigner,
	access string, user *string, rb *rollback) (string, error) {
	lim, err := centralsync.FetchOwnershipLimits(ctx, hc, o.central, access, "AppID")
	if ctx.Err() != nil {
		// Interrupted while the limits were asked, even if they came back:
		// no row is created only to be rolled back.
		return "", errPairInterrupted
	}
	if err != nil {
		if errors.Is(err, centralsync.ErrNoOwnershipAPI) {
			return "not registered: no Ownership API at " + o.central + "; the gateway works without its AppID row", nil
		}
		return "", fmt.Errorf("pair: %w; nothing was saved", err)
	}
	if *user == "" {
		*user = lim.Username
	}
	free, listed := lim.Free("AppID")
	if !listed || free < 1 {
		limit, current := lim.Limit("AppID")
		return fmt.Sprintf("not registered: the account may not register apps (AppID limit %d, %d used); the gateway works without its AppID row", limit, current), nil
	}
	details := map[string]any{
		// edgegateway_type marks an edge gateway's AppID row as Snap4City's
		// IoT Edge registers it (Ownership-API/v1/register/index.php).
		"edgegateway_type": runtime.GOOS + "_" + runtime.GOARCH + "_edgegate",
		"thumbprint":       id.Thumbprint(),
		"jwk":              id.PublicJWK(),
	}
	if signer != nil && signer.Alg() != "EdDSA" {
		details["assertion_jwk"] = signer.PublicJWK()
	}
	// The answer is read even when ctx is cancelled meanwhile, so a row
	// created at that moment is known and deleted by the rollback.
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 60*time.Second)
	defer cancel()
	row, err := centralsync.RegisterGateway(rctx, hc, o.central, access, centralsync.GatewayRegistration{
		ElementID: o.gwID, ElementType: "AppID", ElementName: o.gwID, ElementURL: "edgegate://" + o.gwID,
		ElementDetails: details,
	})
	if err != nil {
		if errors.Is(err, centralsync.ErrLimitReached) {
			// Another app took the free slot meanwhile: the same normal case.
			return "not registered: the account may not register more apps (" + err.Error() + "); the gateway works without its AppID row", nil
		}
		return "", fmt.Errorf("pair: %w; nothing was saved", err)
	}
	if row.Created() {
		rb.push("delete the AppID row "+o.gwID, func(ctx context.Context) error {
			return centralsync.DeleteApp(ctx, hc, o.central, access, "AppID", o.gwID)
		})
	}
	if *user == "" {
		*user = row.Username
	}
	if row.Created() {
		return "registered as " + o.gwID, nil
	}
	return "updated (" + o.gwID + " was already registered to this account)", nil
}

// commitPairing writes the pinned keys (companion mode), the store record
// and the configuration, each atomically; when one fails, the ones before
// it are put back as they were.
func commitPairing(q *queue.Queue, old, cred *centralsync.Credentials, o *pairOpts, companion bool, keys, cfg []byte) error {
	var undo []func()
	fail := func(err error) error {
		for i := len(undo) - 1; i >= 0; i-- {
			undo[i]()
		}
		return err
	}
	restoreFile := func(p string) func() {
		prev, rerr := os.ReadFile(p)
		st, serr := os.Stat(p)
		return func() {
			if rerr != nil || serr != nil {
				os.Remove(p)
				return
			}
			writeFileAtomic(p, prev, st.Mode().Perm())
		}
	}
	if companion {
		u := restoreFile(o.keysPath)
		if err := writeFileAtomic(o.keysPath, keys, 0o644); err != nil {
			return fail(fmt.Errorf("pin policy keys: %w", err))
		}
		undo = append(undo, u)
	}
	if err := centralsync.SaveCredentials(q, cred); err != nil {
		return fail(err)
	}
	undo = append(undo, func() {
		if old != nil {
			centralsync.SaveCredentials(q, old)
			return
		}
		q.DeleteState(centralsync.CredentialsStateName)
	})
	u := restoreFile(o.cfgPath)
	if err := writeFileAtomic(o.cfgPath, cfg, 0o640); err != nil {
		u()
		return fail(fmt.Errorf("write config: %w", err))
	}
	return nil
}

// checkPairedConfig loads cfg as the daemon will (it holds no secret), so that
// pair never leaves a configuration the daemon refuses.
func checkPairedConfig(cfg []byte) error {
	f, err := os.CreateTemp("", "edgegate-pair-*.yaml")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	if _, err := f.Write(cfg); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	_, err = config.Load(f.Name())
	return err
}

// readPrivateSecret reads a secret from a file only its owner can read.
func readPrivateSecret(path string) (string, error) {
	st, err := os.Stat(path)
	if err != nil {
		return "", err
	}
	if st.Mode().Perm()&0o077 != 0 {
		return "", fmt.Errorf("%s has mode %04o; it holds a secret: run chmod 600 %s", path, st.Mode().Perm(), path)
	}
	if st.Size() > 64<<10 {
		return "", fmt.Errorf("%s is too large for a secret", path)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	s := strings.TrimSpace(string(b))
	if s == "" {
		return "", fmt.Errorf("%s is empty", path)
	}
	return s, nil
}

func describeAuth(c *centralsync.Credentials) string {
	switch c.AuthMethod {
	case centralsync.AuthPrivateKeyJWT:
		return "private_key_jwt " + c.Alg + ", no shared secret"
	case centralsync.AuthNone:
		return "public client, no shared secret"
	case centralsync.AuthClientSecretBasic, centralsync.AuthClientSecretPost:
		return "confidential client (" + c.AuthMethod + "), secret in the encrypted store"
	}
	return "client secret in the encrypted store"
}

// deviceGrant runs RFC 8628 and fills cred with the refresh token.
func deviceGrant(ctx context.Context, disc *centralsync.Discovery, cred *centralsync.Credentials, signer centralsync.AssertionSigner,
	hc *http.Client, noQR bool, stdout io.Writer) (*oauth2.Token, error) {
	if disc.DeviceAuthorizationURL == "" {
		return nil, fmt.Errorf("pair: %s offers no device authorization grant; enable it for client %s (or use --client-credentials FILE); nothing was saved", disc.Issuer, cred.ClientID)
	}
	auth := centralsync.ClientAuthFor(cred, signer)
	ctx = context.WithValue(ctx, oauth2.HTTPClient, centralsync.HTTPClientWithAuth(hc, auth))
	conf := centralsync.OAuth2Config(disc, cred)

	da, err := conf.DeviceAuth(ctx)
	if err != nil {
		return nil, fmt.Errorf("pair: the central sign-on refused to start pairing for client %s: %w (the realm admin enables the device grant and offline_access for it); nothing was saved", cred.ClientID, oauthMessage(err))
	}
	fmt.Fprintf(stdout, "\nTo approve this gateway, open\n\n    %s\n\nand enter the code\n\n    %s\n\n", da.VerificationURI, da.UserCode)
	if da.VerificationURIComplete != "" && !noQR {
		if s, err := qrTerminal(da.VerificationURIComplete); err == nil {
			fmt.Fprintf(stdout, "or scan this with a phone (it opens %s):\n\n%s\n", da.VerificationURIComplete, s)
		}
	}
	if !da.Expiry.IsZero() {
		fmt.Fprintf(stdout, "Waiting for approval (the code expires at %s; Ctrl-C to cancel)...\n", da.Expiry.Local().Format("15:04:05"))
	}
	tok, err := conf.DeviceAccessToken(ctx, da)
	if err != nil {
		return nil, deviceGrantError(ctx, err)
	}
	if tok.RefreshToken == "" {
		// An access token alone may still be live: revoke it.
		_ = centralsync.RevokeToken(context.WithoutCancel(ctx), hc, disc.RevocationEndpoint, tok.AccessToken, "access_token", auth)
		return nil, errors.New("pair: the sign-on approved the gateway but issued no refresh token; enable refresh tokens (offline_access) for client " + cred.ClientID + "; nothing was saved")
	}
	cred.RefreshToken = tok.RefreshToken
	fmt.Fprintf(stdout, "Approved (%s).\n", describeAuth(cred))
	return tok, nil
}

// deviceGrantError turns the end of polling into an actionable message.
func deviceGrantError(ctx context.Context, err error) error {
	var re *oauth2.RetrieveError
	if errors.As(err, &re) {
		switch re.ErrorCode {
		case "access_denied":
			return errors.New("pair: the request was denied at the sign-on page; nothing was saved. Run edgegate pair again and approve it")
		case "expired_token":
			return errors.New("pair: the code expired before it was approved; nothing was saved. Run edgegate pair again and approve within the time shown")
		}
		return fmt.Errorf("pair: the sign-on refused the gateway: %w; nothing was saved", oauthMessage(err))
	}
	if errors.Is(err, context.DeadlineExceeded) && ctx.Err() == nil {
		return errors.New("pair: the code expired before it was approved; nothing was saved. Run edgegate pair again and approve within the time shown")
	}
	if ctx.Err() != nil {
		return errors.New("pair: cancelled; nothing was saved")
	}
	return fmt.Errorf("pair: lost contact with the central sign-on while waiting: %w; nothing was saved, run edgegate pair again", unwrapURLErr(err))
}

// oauthMessage keeps an oauth2 error to its code and description (never
// the raw body).
func oauthMessage(err error) error {
	var re *oauth2.RetrieveError
	if errors.As(err, &re) {
		msg := re.ErrorCode
		if re.ErrorDescription != "" {
			msg += ": " + re.ErrorDescription
		}
		if msg == "" && re.Response != nil {
			msg = re.Response.Status
		}
		return errors.New(msg)
	}
	return unwrapURLErr(err)
}

func unwrapURLErr(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}

func absOrEmpty(p string) string {
	if p == "" {
		return ""
	}
	a, err := filepath.Abs(p)
	if err != nil {
		return p
	}
	return a
}

type pairedConfigInput struct {
	o                                            *pairOpts
	issuer, tokenURL, clientID, user, thumbprint string
	scopes                                       []string
	companion                                    bool
	when                                         time.Time
}

// The configuration pair writes: the keys of config.Config that pair
// decides, marshalled by yaml.v3 (never assembled as text), with the
// defaults of config.Default for everything else.
type pairedConfig struct {
	Gateway  config.Gateway `yaml:"gateway"`
	StateDir string         `yaml:"state_dir"`
	Store    pairedStore    `yaml:"store"`
	MQTT     pairedMQTT     `yaml:"mqtt"`
	Central  pairedCentral  `yaml:"central"`
	Uplink   pairedUplink   `yaml:"uplink,omitempty"`
	Policy   pairedPolicy   `yaml:"policy"`
	Metrics  config.Metrics `yaml:"metrics"`
	Log      config.Log     `yaml:"log"`
}

// pairedMQTT names the local broker's mode and loopback listener, the
// first knobs an installer looks for (the values are config.Default's).
type pairedMQTT struct {
	Mode     string `yaml:"mode"`
	Topic    string `yaml:"topic"`
	Embedded struct {
		Listen string `yaml:"listen"`
	} `yaml:"embedded"`
}

type pairedStore struct {
	Credential string `yaml:"credential"`
	KeyFile    string `yaml:"key_file,omitempty"`
}

type pairedCentral struct {
	Issuer      string   `yaml:"issuer"`
	Audience    string   `yaml:"audience"`
	TokenURL    string   `yaml:"token_url"`
	ClientID    string   `yaml:"client_id"`
	Credentials string   `yaml:"credentials"`
	Scopes      []string `yaml:"scopes,flow"`
	CAFile      string   `yaml:"ca_file,omitempty"`
}

type pairedUplink struct {
	CAFile string `yaml:"ca_file,omitempty"`
}

type pairedPolicy struct {
	Source     string           `yaml:"source"`
	CentralURL string           `yaml:"central_url,omitempty"`
	KeysFile   string           `yaml:"keys_file,omitempty"`
	PushURL    string           `yaml:"push_url,omitempty"`
	Ownership  *pairedOwnership `yaml:"ownership,omitempty"`
}

type pairedOwnership struct {
	URL            string            `yaml:"url"`
	DataManagerURL string            `yaml:"datamanager_url"`
	Username       string            `yaml:"username"`
	Brokers        map[string]string `yaml:"brokers"`
}

// pairedConfigYAML is the complete configuration pair writes. It holds no
// secret: the daemon finds the pairing in the encrypted store
// (central.credentials: paired).
func pairedConfigYAML(in pairedConfigInput) ([]byte, error) {
	o, def := in.o, config.Default()
	ca := absOrEmpty(o.caFile)
	c := pairedConfig{
		Gateway:  config.Gateway{ID: o.gwID},
		StateDir: absOrEmpty(o.sf.stateDir),
		Store:    pairedStore{Credential: o.sf.credential, KeyFile: absOrEmpty(o.sf.keyFile)},
		Central: pairedCentral{Issuer: in.issuer, Audience: o.audience, TokenURL: in.tokenURL, ClientID: in.clientID,
			Credentials: config.CredentialsPaired, Scopes: in.scopes, CAFile: ca},
		Uplink:  pairedUplink{CAFile: ca},
		Metrics: def.Metrics,
		Log:     def.Log,
	}
	c.MQTT.Mode, c.MQTT.Topic, c.MQTT.Embedded.Listen = def.MQTT.Mode, def.MQTT.Topic, def.MQTT.Embedded.Listen
	if in.companion {
		c.Policy = pairedPolicy{Source: config.PolicyBundle, CentralURL: o.companion, KeysFile: absOrEmpty(o.keysPath), PushURL: o.pushURL}
	} else {
		// Stock Snap4City: the Ownership API and datamanager under the
		// central URL (the docker generator's nginx routes), the brokers
		// behind the Orion Broker Filter.
		c.Policy = pairedPolicy{Source: config.PolicyOwnership, Ownership: &pairedOwnership{
			URL: o.central, DataManagerURL: o.central + "/datamanager/api", Username: in.user, Brokers: o.brokers,
		}}
	}
	var doc yaml.Node
	if err := doc.Encode(c); err != nil {
		return nil, fmt.Errorf("encode config: %w", err)
	}
	doc.HeadComment = fmt.Sprintf("edgegate configuration, written by `edgegate pair` on %s.\nGateway identity (RFC 7638 thumbprint): %s\nThe OAuth2 credentials are in the encrypted store, not in this file.\nEvery other key has its default: edgegate config template lists them.",
		in.when.Format(time.RFC3339), in.thumbprint)
	var out bytes.Buffer
	enc := yaml.NewEncoder(&out)
	enc.SetIndent(2)
	if err := enc.Encode(&doc); err != nil {
		return nil, fmt.Errorf("encode config: %w", err)
	}
	if err := enc.Close(); err != nil {
		return nil, fmt.Errorf("encode config: %w", err)
	}
	return out.Bytes(), nil
}

// writeFileAtomic creates path's directory if needed (pair writes into a
// configuration folder that may not exist yet) and replaces path
// atomically.
func writeFileAtomic(path string, data []byte, perm os.FileMode) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	return atomicfile.Write(path, data, perm)
}

// pairedSettings is what unpair and device need from a configuration. It
// is read leniently until config knows central.credentials; then these
// commands should use config.Load.
type pairedSettings struct {
	StateDir string `yaml:"state_dir"`
	Store    struct {
		KeyFile    string `yaml:"key_file"`
		Credential string `yaml:"credential"`
	} `yaml:"store"`
	Central struct {
		CAFile string `yaml:"ca_file"`
	} `yaml:"central"`
}

func loadPairedSettings(path string) (storeFlags, string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return storeFlags{}, "", fmt.Errorf("read config: %w", err)
	}
	var s pairedSettings
	def := config.Default()
	s.StateDir, s.Store.Credential = def.StateDir, def.Store.Credential
	if err := yaml.Unmarshal(b, &s); err != nil {
		return storeFlags{}, "", fmt.Errorf("config %s: %w", path, err)
	}
	// Relative paths are the file's folder's, as config.Load takes them,
	// whether path is relative or absolute.
	absPath, err := filepath.Abs(path)
	if err != nil {
		return storeFlags{}, "", fmt.Errorf("config %s: %w", path, err)
	}
	dir := filepath.Dir(absPath)
	abs := func(p string) string {
		if p != "" && !filepath.IsAbs(p) {
			return filepath.Join(dir, p)
		}
		return p
	}
	return storeFlags{stateDir: abs(s.StateDir), keyFile: abs(s.Store.KeyFile), credential: s.Store.Credential}, abs(s.Central.CAFile), nil
}

const unpairUsage = `usage: edgegate unpair [--config FILE]

Revokes the gateway's tokens at the central sign-on (where it supports
revocation) and wipes the pairing from the encrypted store. The identity
key stays: the gateway keeps its id.
`

func runUnpair(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	return unpairWith(ctx, defaultPairEnv(), args, stdout, stderr)
}

func unpairWith(ctx context.Context, env pairEnv, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("unpair", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, unpairUsage); fs.PrintDefaults() }
	cfgPath := fs.String("config", "/etc/edgegate/edgegate.yaml", "configuration file")
	if err := fs.Parse(args); err != nil {
		return err
	}
	sf, ca, err := loadPairedSettings(*cfgPath)
	if err != nil {
		return &exitError{Code: 2, Err: err}
	}
	q, err := openStore(env, sf)
	if err != nil {
		return fmt.Errorf("unpair: %w", err)
	}
	defer q.Close()
	cred, err := centralsync.LoadCredentials(q)
	if errors.Is(err, centralsync.ErrNotPaired) {
		fmt.Fprintln(stdout, "This gateway is not paired; nothing to do.")
		return nil
	}
	if err != nil {
		return fmt.Errorf("unpair: %w", err)
	}
	hc, err := centralHTTP(ca)
	if err != nil {
		return err
	}
	id, err := keys.LoadIdentity(q)
	if err != nil {
		return fmt.Errorf("unpair: %w", err)
	}
	revoked := "not revoked: the sign-on has no revocation endpoint; remove the grant there"
	if cred.Grant == centralsync.GrantClientCredentials {
		revoked = "nothing to revoke (client credentials); disable the client at the sign-on"
	} else if cred.RevocationURL != "" {
		signer, err := centralsync.SignerFor(cred, id)
		if err == nil {
			err = centralsync.Revoke(ctx, hc, cred, signer)
		}
		if err != nil {
			revoked = "NOT revoked (" + err.Error() + "): remove the grant at the sign-on"
		} else {
			revoked = "revoked"
		}
	}
	if err := q.DeleteState(centralsync.CredentialsStateName); err != nil {
		return fmt.Errorf("unpair: wipe the pairing: %w", err)
	}
	fmt.Fprintf(stdout, "Unpaired gateway %s from %s.\n  tokens       %s\n  secrets      wiped from the encrypted store\n  identity     %s (kept)\nPair again with: edgegate pair --central %s\n",
		cred.Gateway, cred.CentralURL, revoked, id.Thumbprint(), cred.CentralURL)
	return nil
}
