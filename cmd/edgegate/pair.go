package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"golang.org/x/oauth2"
	"gopkg.in/yaml.v3"

	"github.com/edgegate/edgegate/identity"
	"github.com/edgegate/edgegate/qr"
	"github.com/edgegate/edgegate/queue"
	"github.com/edgegate/edgegate/storekey"
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

Pairs this gateway with the central service: you approve it in a browser
(the OAuth2 device authorization grant), then the gateway registers itself,
pins the central policy-signing keys and writes its configuration.
`

func runPair(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	return pairWith(ctx, defaultPairEnv(), args, stdout, stderr)
}

type storeFlags struct {
	stateDir, keyFile, credential string
}

func (s *storeFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&s.stateDir, "state-dir", "/var/lib/edgegate", "state directory (the encrypted store)")
	fs.StringVar(&s.keyFile, "store-key-file", "", "store key file (default STATE_DIR/store.key)")
	fs.StringVar(&s.credential, "store-credential", "store-key", "systemd credential holding the store key")
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
	key, _, err := storekey.Load(s.credential, s.keyPath(), env.getenv)
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

func pairWith(ctx context.Context, env pairEnv, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("pair", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, pairUsage); fs.PrintDefaults() }
	var sf storeFlags
	sf.register(fs)
	central := fs.String("central", "", "central service URL (required), e.g. https://central.example.org")
	issuer := fs.String("issuer", "", "OIDC issuer (default: discovered at the central URL, else CENTRAL/auth/realms/REALM)")
	realm := fs.String("realm", "edgegate", "Keycloak realm, to find the issuer under the central URL")
	clientID := fs.String("client-id", "edgegate-gateway", "OAuth2 client of the device grant")
	ccFile := fs.String("client-credentials", "", "non-interactive: file with client_id and client_secret (mode 0600)")
	caFile := fs.String("ca", "", "CA certificate(s) of the central service (PEM; default: system roots)")
	cfgPath := fs.String("config", "/etc/edgegate/edgegate.yaml", "configuration file to write")
	keysPath := fs.String("keys-file", "", "where to pin the policy-signing keys (default: policy-keys.json beside --config)")
	gwID := fs.String("gateway-id", "", "gateway id (default edgegate-HOSTNAME)")
	audience := fs.String("audience", "edgegate", "audience of application tokens on the local broker")
	pushURL := fs.String("push-url", "", "central MQTT broker for pushed policies (tls://host:port), optional")
	force := fs.Bool("force", false, "pair again even if this gateway is paired")
	noQR := fs.Bool("no-qr", false, "do not draw the QR code")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *central == "" || fs.NArg() > 0 {
		fs.Usage()
		return &exitError{code: 2, err: errors.New("pair: --central URL is required")}
	}
	if !strings.HasPrefix(*central, "https://") {
		return &exitError{code: 2, err: fmt.Errorf("pair: --central must be an https URL: %q", *central)}
	}
	*central = strings.TrimRight(*central, "/")
	if *gwID == "" {
		h, err := env.hostname()
		if err != nil || h == "" {
			return &exitError{code: 2, err: errors.New("pair: no hostname: pass --gateway-id")}
		}
		*gwID = "edgegate-" + strings.ToLower(strings.Split(h, ".")[0])
	}
	if *keysPath == "" {
		*keysPath = filepath.Join(filepath.Dir(*cfgPath), "policy-keys.json")
	}
	var cc *clientCredentialsFile
	if *ccFile != "" {
		var err error
		if cc, err = readClientCredentials(*ccFile); err != nil {
			return &exitError{code: 2, err: err}
		}
	}
	hc, err := centralHTTP(*caFile)
	if err != nil {
		return &exitError{code: 2, err: err}
	}

	q, err := openStore(env, sf)
	if err != nil {
		return fmt.Errorf("pair: %w", err)
	}
	defer q.Close()
	old, err := centralsync.LoadCredentials(q)
	switch {
	case err == nil && !*force:
		fmt.Fprintf(stdout, "This gateway is already paired with %s (gateway %s, since %s).\nNothing was changed. To pair again: edgegate pair --force --central %s\n",
			old.CentralURL, old.Gateway, old.PairedAt.Format(time.RFC3339), *central)
		return nil
	case err != nil && !errors.Is(err, centralsync.ErrNotPaired) && !*force:
		return fmt.Errorf("pair: %w", err)
	}
	id, err := identity.Load(q)
	if err != nil {
		return fmt.Errorf("pair: %w", err)
	}

	bases := []string{*central, *central + "/auth/realms/" + *realm}
	if *issuer != "" {
		bases = []string{*issuer}
	}
	disc, err := centralsync.Discover(ctx, hc, bases...)
	if err != nil {
		return fmt.Errorf("pair: cannot reach the central sign-on: %w\n(check --central, the network, and --ca for a private CA)", err)
	}
	cred := &centralsync.Credentials{
		Gateway: *gwID, Issuer: disc.Issuer, TokenURL: disc.TokenEndpoint, RevocationURL: disc.RevocationEndpoint,
		CentralURL: *central, Scopes: disc.Scopes(), PairedAt: env.now().UTC(),
	}
	fmt.Fprintf(stdout, "Gateway %s, identity %s\n", *gwID, id.Thumbprint())

	var access string
	var signer centralsync.AssertionSigner
	if cc != nil {
		cred.Grant, cred.AuthMethod, cred.ClientID, cred.ClientSecret = centralsync.GrantClientCredentials, centralsync.AuthClientSecret, cc.ClientID, cc.ClientSecret
		ts := centralsync.NewTokenSource(centralsync.ClientCredentials{TokenURL: disc.TokenEndpoint, ClientID: cc.ClientID,
			ClientSecret: cc.ClientSecret, Scopes: []string{"openid"}, HTTPClient: hc})
		if access, err = ts.Token(ctx); err != nil {
			return fmt.Errorf("pair: the central sign-on refused the client credentials of %s: %w", *ccFile, err)
		}
	} else {
		access, signer, err = deviceGrant(ctx, disc, cred, *clientID, id, hc, *noQR, stdout)
		if err != nil {
			return err
		}
	}

	details := map[string]any{
		"edgegateway_type": runtime.GOOS + "_" + runtime.GOARCH + "_edgegate",
		"thumbprint":       id.Thumbprint(),
		"jwk":              id.PublicJWK(),
	}
	if signer != nil && signer.Alg() != "EdDSA" {
		details["assertion_jwk"] = signer.PublicJWK()
	}
	row, err := centralsync.RegisterGateway(ctx, hc, *central, access, centralsync.GatewayRegistration{
		ElementID: *gwID, ElementType: "AppID", ElementName: *gwID, ElementURL: "edgegate://" + *gwID,
		ElementDetails: details,
	})
	if err != nil {
		return fmt.Errorf("pair: %w\nNothing was saved; run edgegate pair again once this is fixed", err)
	}
	cred.User = row.Username
	keys, nkeys, err := centralsync.FetchPolicyKeys(ctx, hc, *central)
	if err != nil {
		return fmt.Errorf("pair: %w\nNothing was saved; run edgegate pair again once this is fixed", err)
	}
	if ctx.Err() != nil {
		return errors.New("pair: interrupted; nothing was saved")
	}

	// Commit, secrets first: the store record, the pinned keys, then the
	// config (each atomic). A crash in between leaves a record that
	// `pair --force` replaces, never a config that points to nothing.
	if old != nil && old.RefreshToken != "" && old.RevocationURL != "" {
		if s, err := centralsync.SignerFor(old, id); err == nil {
			_ = centralsync.Revoke(ctx, hc, old, s) // best effort: the old grant is replaced
		}
	}
	if err := centralsync.SaveCredentials(q, cred); err != nil {
		return fmt.Errorf("pair: %w", err)
	}
	if err := writeFileAtomic(*keysPath, keys, 0o644); err != nil {
		return fmt.Errorf("pair: pin policy keys: %w", err)
	}
	cfg := pairedConfigYAML(pairedConfigInput{
		gateway: *gwID, stateDir: sf.stateDir, keyFile: sf.keyFile, credential: sf.credential,
		issuer: disc.Issuer, audience: *audience, tokenURL: disc.TokenEndpoint, clientID: cred.ClientID,
		caFile: absOrEmpty(*caFile), central: *central, keysFile: absOrEmpty(*keysPath), pushURL: *pushURL,
		thumbprint: id.Thumbprint(), when: cred.PairedAt, scopes: cred.Scopes,
	})
	if err := writeFileAtomic(*cfgPath, []byte(cfg), 0o640); err != nil {
		return fmt.Errorf("pair: write config: %w", err)
	}

	who := cred.User
	if who == "" {
		who = "the approving account"
	}
	fmt.Fprintf(stdout, `
Paired.
  gateway       %s, registered to %s
  identity      %s
  sign-on       %s (client %s, %s)
  policy keys   %d pinned in %s (fingerprint %s)
  config        %s

Next steps:
  1. systemctl enable --now edgegate
  2. edgegate status                      (shows the identity above)
  3. edgegate device add --config %s --type TYPE ID [--radio-port P --radio-node N]
`, *gwID, who, id.Thumbprint(), disc.Issuer, cred.ClientID, describeAuth(cred), nkeys, *keysPath, centralsync.KeyFingerprint(keys), *cfgPath, *cfgPath)
	return nil
}

func describeAuth(c *centralsync.Credentials) string {
	switch c.AuthMethod {
	case centralsync.AuthPrivateKeyJWT:
		return "private_key_jwt " + c.Alg + ", no shared secret"
	case centralsync.AuthNone:
		return "public client, no shared secret"
	}
	return "client secret in the encrypted store"
}

// deviceGrant runs RFC 8628 and fills cred with the refresh token.
func deviceGrant(ctx context.Context, disc *centralsync.Discovery, cred *centralsync.Credentials, clientID string,
	id *identity.Identity, hc *http.Client, noQR bool, stdout io.Writer) (string, centralsync.AssertionSigner, error) {
	if disc.DeviceAuthorizationURL == "" {
		return "", nil, fmt.Errorf("pair: %s offers no device authorization grant; use --client-credentials FILE, or enable the grant for client %s", disc.Issuer, clientID)
	}
	choice := disc.ChooseClientAuth()
	cred.Grant, cred.AuthMethod, cred.Alg, cred.ClientID = centralsync.GrantRefreshToken, choice.Method, choice.Alg, clientID
	if choice.Alg == "ES256" {
		k, err := centralsync.NewES256Key()
		if err != nil {
			return "", nil, err
		}
		cred.ES256Key = k
	}
	signer, err := centralsync.SignerFor(cred, id)
	if err != nil {
		return "", nil, err
	}
	auth := &centralsync.ClientAuth{ClientID: clientID, Signer: signer, Audience: []string{disc.TokenEndpoint, disc.Issuer}}
	ctx = context.WithValue(ctx, oauth2.HTTPClient, centralsync.HTTPClientWithAuth(hc, auth))
	conf := centralsync.OAuth2Config(disc, clientID, "", cred.Scopes)

	da, err := conf.DeviceAuth(ctx)
	if err != nil {
		return "", nil, fmt.Errorf("pair: the central sign-on refused to start pairing: %w", oauthMessage(err))
	}
	fmt.Fprintf(stdout, "\nTo approve this gateway, open\n\n    %s\n\nand enter the code\n\n    %s\n\n", da.VerificationURI, da.UserCode)
	if da.VerificationURIComplete != "" && !noQR {
		if s, err := qr.Terminal(da.VerificationURIComplete); err == nil {
			fmt.Fprintf(stdout, "or scan this with a phone (it opens %s):\n\n%s\n", da.VerificationURIComplete, s)
		}
	}
	if !da.Expiry.IsZero() {
		fmt.Fprintf(stdout, "Waiting for approval (the code expires at %s; Ctrl-C to cancel)...\n", da.Expiry.Local().Format("15:04:05"))
	}
	tok, err := conf.DeviceAccessToken(ctx, da)
	if err != nil {
		return "", nil, deviceGrantError(ctx, err)
	}
	if tok.RefreshToken == "" {
		return "", nil, errors.New("pair: the sign-on approved the gateway but issued no refresh token; enable refresh tokens (offline_access) for client " + clientID)
	}
	cred.RefreshToken = tok.RefreshToken
	fmt.Fprintf(stdout, "Approved (%s).\n", choice.Why)
	return tok.AccessToken, signer, nil
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
	gateway, stateDir, keyFile, credential, issuer, audience, tokenURL, clientID, caFile string
	central, keysFile, pushURL, thumbprint                                               string
	when                                                                                 time.Time
	scopes                                                                               []string
}

// pairedConfigYAML is the complete configuration pair writes. It holds no
// secret: the daemon finds the pairing in the encrypted store
// (central.credentials: paired).
func pairedConfigYAML(in pairedConfigInput) string {
	q := func(s string) string { b, _ := json.Marshal(s); return string(b) }
	var b strings.Builder
	fmt.Fprintf(&b, "# edgegate configuration, written by `edgegate pair` on %s.\n", in.when.Format(time.RFC3339))
	fmt.Fprintf(&b, "# Gateway identity (RFC 7638 thumbprint): %s\n", in.thumbprint)
	b.WriteString("# The OAuth2 credentials are in the encrypted store, not in this file.\n\n")
	fmt.Fprintf(&b, "gateway:\n  id: %s\n\nstate_dir: %s\n\nstore:\n  credential: %s\n", q(in.gateway), q(absOrEmpty(in.stateDir)), q(in.credential))
	if in.keyFile != "" {
		fmt.Fprintf(&b, "  key_file: %s\n", q(absOrEmpty(in.keyFile)))
	}
	b.WriteString("\nmqtt:\n  mode: embedded\n  topic: devices/{device}/telemetry\n  embedded:\n    listen: 127.0.0.1:1883\n")
	fmt.Fprintf(&b, "\ncentral:\n  issuer: %s\n  audience: %s\n  token_url: %s\n  client_id: %s\n", q(in.issuer), q(in.audience), q(in.tokenURL), q(in.clientID))
	b.WriteString("  # pairing record in the encrypted store: refresh token + private_key_jwt, or a client secret\n  credentials: paired\n")
	if len(in.scopes) > 0 {
		fmt.Fprintf(&b, "  scopes: [%s]\n", strings.Join(in.scopes, ", "))
	}
	if in.caFile != "" {
		fmt.Fprintf(&b, "  ca_file: %s\n", q(in.caFile))
	}
	b.WriteString("\nuplink:\n  concurrency: 4\n  signature_attribute: signature\n")
	if in.caFile != "" {
		fmt.Fprintf(&b, "  ca_file: %s\n", q(in.caFile))
	}
	fmt.Fprintf(&b, "\npolicy:\n  source: bundle\n  central_url: %s\n  keys_file: %s\n  poll_interval: 5m\n", q(in.central), q(in.keysFile))
	if in.pushURL != "" {
		fmt.Fprintf(&b, "  push_url: %s\n", q(in.pushURL))
	}
	b.WriteString("  expiry_grace: 24h\n\nmetrics:\n  listen: 127.0.0.1:9464\n\nlog:\n  level: info\n  format: text\n")
	return b.String()
}

// writeFileAtomic writes data to path through a synced temporary file and
// a rename, then syncs the directory.
func writeFileAtomic(path string, data []byte, perm os.FileMode) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp) // no-op after the rename
	if err := f.Chmod(perm); err != nil {
		f.Close()
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
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
	s.StateDir, s.Store.Credential = "/var/lib/edgegate", "store-key"
	if err := yaml.Unmarshal(b, &s); err != nil {
		return storeFlags{}, "", fmt.Errorf("config %s: %w", path, err)
	}
	dir := filepath.Dir(path)
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
		return &exitError{code: 2, err: err}
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
	id, err := identity.Load(q)
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
