// Package central is edgegate-central, the companion service an operator
// runs beside a stock Snap4City platform: it builds each gateway's policy
// from the platform's Ownership API, IoT Directory and datamanager, signs
// it as a bundle the gateway's sync package verifies, serves and pushes
// it, and records which gateway runs which version (receipts).
package central

import (
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/edgegate/edgegate/internal/config"
)

// Defaults of Config.
const (
	DefaultPolicyTTL    = 24 * time.Hour
	DefaultPollInterval = time.Minute
	DefaultKeyOverlap   = 7 * 24 * time.Hour
	DefaultStaleAfter   = time.Hour
	DefaultRoundTimeout = 30 * time.Second
	DefaultConcurrency  = 4
	// KeyCredential is the systemd credential name (LoadCredential=) of the
	// signing key file, looked up in $CREDENTIALS_DIRECTORY.
	KeyCredential = "policy-signing-keys"
	// StoreKeyCredential is the systemd credential of the store's
	// encryption key (else {state_dir}/store.key, generated).
	StoreKeyCredential = "edgegate-central-store-key"
	// StoreBadger and StorePostgres are the values of store.
	StoreBadger   = "badger"
	StorePostgres = "postgres"
	// PushEmbedded and PushExternal are the values of push.mode.
	PushEmbedded = "embedded"
	PushExternal = "external"
	// PushPasswordCredential is the systemd credential of push.password_file's
	// default: the companion's own account on the external broker.
	PushPasswordCredential = "edgegate-central-mqtt-password"
)

// gatewayIDRE is the gateway id rule of the gateway side (reading.ValidID).
var gatewayIDRE = regexp.MustCompile(`^[A-Za-z0-9._-]{1,256}$`)

// Config is edgegate-central's configuration file (YAML).
type Config struct {
	// Listen is the HTTPS address of the API (policy keys, bundles,
	// receipts, admin, metrics); TLSCert and TLSKey are PEM files.
	Listen  string `yaml:"listen"`
	TLSCert string `yaml:"tls_cert"`
	TLSKey  string `yaml:"tls_key"`
	// PublicURL is how gateways and the CLI reach the API, e.g.
	// https://central.example:8443.
	PublicURL string `yaml:"public_url"`
	// MQTTListen is the embedded push broker's TLS address (same
	// certificate); empty: no embedded push broker. Only with push.mode
	// embedded.
	MQTTListen string `yaml:"mqtt_listen"`
	// Push chooses the broker bundles are pushed through.
	Push PushConfig `yaml:"push"`
	// StateDir holds the embedded store (badger), by default the signing
	// keys and the store key.
	StateDir string `yaml:"state_dir"`
	// Store is "badger" (the default: embedded, one process) or "postgres"
	// (state in PostgreSQL: any number of replicas on one database).
	Store string `yaml:"store"`
	// PostgresURLFile holds the PostgreSQL connection string (it may hold
	// a password: mode 0600, never in this file or in logs). Required with
	// store: postgres.
	PostgresURLFile string `yaml:"postgres_url_file"`
	// KeyFile holds the policy-signing keys (0600). Empty: the systemd
	// credential KeyCredential when $CREDENTIALS_DIRECTORY is set, else
	// {state_dir}/policy-keys.json.
	KeyFile string `yaml:"key_file"`
	// AdminTokenFile holds the bearer token of the admin endpoints and of
	// the push and fleet commands.
	AdminTokenFile string `yaml:"admin_token_file"`

	Platform PlatformConfig `yaml:"platform"`

	// Gateways binds a gateway id to its account: the azp (OAuth client
	// id) of its access tokens. A gateway not listed is bound to the first
	// account that uses it when BindOnFirstUse is set, else refused.
	Gateways       map[string]string `yaml:"gateways"`
	BindOnFirstUse bool              `yaml:"bind_on_first_use"`
	// GatewayUsers maps a gateway id to its account's platform username
	// (the usernameDelegated of a delegation to it): devices delegated to
	// that user are in the gateway's bundle, with the owner's keys.
	GatewayUsers map[string]string `yaml:"gateway_users"`

	PolicyTTL    time.Duration `yaml:"policy_ttl"`
	PollInterval time.Duration `yaml:"poll_interval"`
	RoundTimeout time.Duration `yaml:"round_timeout"`
	Concurrency  int           `yaml:"concurrency"` // parallel datamanager calls per round
	KeyOverlap   time.Duration `yaml:"key_overlap"`
	StaleAfter   time.Duration `yaml:"stale_after"` // a gateway whose receipt lags this long behind its newest bundle is stale
}

// PushConfig is how bundles reach the gateways: the embedded broker
// (mqtt_listen), or an MQTT broker (cluster) the operator runs, in which
// the companion provisions one account per gateway through Mosquitto's
// dynamic-security plugin (pushext.go).
type PushConfig struct {
	// Mode is "embedded" (the default) or "external".
	Mode string `yaml:"mode"`
	// Brokers are the external broker's URLs (ssl://, tls:// or mqtts://
	// host:port), tried in order. Every replica must list them in the same
	// order: a retained message is ordered by the broker it is published
	// to, so replicas must publish to one broker (the root of a bridge
	// tree), and the others are fail-overs.
	Brokers []string `yaml:"brokers"`
	// LeafBrokers are further Mosquittos, bridged from Brokers (topic
	// edgegate/gateways/+/policy in), that gateways connect to: the
	// companion publishes nothing there, it only keeps the gateways'
	// accounts on each (every Mosquitto has its own dynamic-security
	// file). One URL per broker.
	LeafBrokers []string `yaml:"leaf_brokers"`
	// CAFile is the PEM CA the brokers' certificates chain to; empty: the
	// system roots.
	CAFile string `yaml:"ca_file"`
	// Username is the companion's own account on the broker: it publishes
	// on edgegate/gateways/+/policy and is a dynamic-security
	// administrator (it creates the gateways' accounts).
	Username string `yaml:"username"`
	// PasswordFile holds that account's password (0600). Empty: the
	// systemd credential PushPasswordCredential.
	PasswordFile string `yaml:"password_file"`
	// ClientID prefixes the companion's MQTT client id (a replica adds a
	// random suffix, so replicas never take over each other's session).
	ClientID string `yaml:"client_id"`
}

// PlatformConfig is the Snap4City platform and the account read with.
type PlatformConfig struct {
	// URL is the platform's base, e.g. https://www.snap4city.org: the
	// Ownership API at /ownership-api/v1/, the IoT Directory at
	// /iot-directory/api/device.php, the datamanager at /datamanager/api.
	URL string `yaml:"url"`
	// DataManagerURL overrides {url}/datamanager/api.
	DataManagerURL string `yaml:"datamanager_url"`
	// Issuer is the SSO realm (https://host/auth/realms/master): tokens
	// come from its token endpoint, gateway tokens are verified with its
	// JWKS (Keycloak's /protocol/openid-connect/certs).
	Issuer string `yaml:"issuer"`
	// The account: a client whose tokens carry a RootAdmin user (Keycloak
	// hard-coded claim mapper on a service account), via client
	// credentials; or a RootAdmin's refresh token (RefreshTokenFile).
	ClientID         string `yaml:"client_id"`
	ClientSecretFile string `yaml:"client_secret_file"`
	RefreshTokenFile string `yaml:"refresh_token_file"`
	// CAFile adds a CA for the platform's TLS (tests, private platforms).
	CAFile string `yaml:"ca_file"`
	// Brokers maps the platform's context broker names (elementDetails
	// contextbroker) to the https base URI of that broker's filter.
	Brokers map[string]string `yaml:"brokers"`
	// MaxAnswer bounds each answer of the platform (512MiB, 2GB, …;
	// default DefaultMaxAnswer). A larger answer refuses the round.
	MaxAnswer config.ByteSize `yaml:"max_answer"`
}

// LoadConfig reads and checks a configuration file.
func LoadConfig(path string) (Config, error) {
	var c Config
	b, err := os.ReadFile(path)
	if err != nil {
		return c, fmt.Errorf("config: %w", err)
	}
	if err := yaml.Unmarshal(b, &c); err != nil {
		return c, fmt.Errorf("config %s: %w", path, err)
	}
	if err := c.Check(); err != nil {
		return c, fmt.Errorf("config %s: %w", path, err)
	}
	return c, nil
}

// Check fills in defaults and validates.
func (c *Config) Check() error {
	if c.PolicyTTL == 0 {
		c.PolicyTTL = DefaultPolicyTTL
	}
	if c.PollInterval == 0 {
		c.PollInterval = DefaultPollInterval
	}
	if c.RoundTimeout == 0 {
		c.RoundTimeout = DefaultRoundTimeout
	}
	if c.Concurrency == 0 {
		c.Concurrency = DefaultConcurrency
	}
	if c.KeyOverlap == 0 {
		c.KeyOverlap = DefaultKeyOverlap
	}
	if c.StaleAfter == 0 {
		c.StaleAfter = DefaultStaleAfter
	}
	for name, d := range map[string]time.Duration{"policy_ttl": c.PolicyTTL, "poll_interval": c.PollInterval,
		"round_timeout": c.RoundTimeout, "key_overlap": c.KeyOverlap, "stale_after": c.StaleAfter} {
		if d < 0 {
			return fmt.Errorf("%s must be positive: %s", name, d)
		}
	}
	if c.PolicyTTL < time.Minute {
		return fmt.Errorf("policy_ttl %s must be at least 1m", c.PolicyTTL)
	}
	if c.Platform.MaxAnswer == 0 {
		c.Platform.MaxAnswer = DefaultMaxAnswer
	}
	if c.Platform.MaxAnswer < 1<<20 {
		return fmt.Errorf("platform.max_answer %d must be at least 1MiB", c.Platform.MaxAnswer)
	}
	for gw, u := range c.GatewayUsers {
		if !gatewayIDRE.MatchString(gw) || u == "" {
			return fmt.Errorf("gateway_users: gateway %q must match %s and name a username", clip(gw), gatewayIDRE)
		}
	}
	if c.Concurrency < 1 || c.Concurrency > 64 {
		return fmt.Errorf("concurrency must be 1..64: %d", c.Concurrency)
	}
	if c.StateDir == "" {
		return errors.New("state_dir is required")
	}
	switch c.Store {
	case "", StoreBadger:
		c.Store = StoreBadger
		if c.PostgresURLFile != "" {
			return errors.New("postgres_url_file is set but store is badger: set store: postgres")
		}
	case StorePostgres:
		if c.PostgresURLFile == "" {
			return errors.New("store: postgres needs postgres_url_file (a 0600 file holding the connection string)")
		}
	default:
		return fmt.Errorf("store %q: want %s or %s", clip(c.Store), StoreBadger, StorePostgres)
	}
	if c.KeyFile == "" {
		if cd := os.Getenv("CREDENTIALS_DIRECTORY"); cd != "" {
			if _, err := os.Stat(filepath.Join(cd, KeyCredential)); err == nil {
				c.KeyFile = filepath.Join(cd, KeyCredential)
			}
		}
		if c.KeyFile == "" {
			c.KeyFile = filepath.Join(c.StateDir, "policy-keys.json")
		}
	}
	if err := c.Push.check(c.MQTTListen); err != nil {
		return err
	}
	p := &c.Platform
	for name, v := range map[string]string{"platform.url": p.URL, "platform.issuer": p.Issuer} {
		if err := checkHTTPS(name, v); err != nil {
			return err
		}
	}
	if p.DataManagerURL == "" {
		p.DataManagerURL = p.URL + "/datamanager/api"
	} else if err := checkHTTPS("platform.datamanager_url", p.DataManagerURL); err != nil {
		return err
	}
	if p.ClientID == "" {
		return errors.New("platform.client_id is required")
	}
	if (p.ClientSecretFile == "") == (p.RefreshTokenFile == "") {
		return errors.New("platform: set exactly one of client_secret_file and refresh_token_file")
	}
	if len(p.Brokers) == 0 {
		return errors.New("platform.brokers maps no context broker")
	}
	for name, u := range p.Brokers {
		if err := checkHTTPS("platform.brokers["+name+"]", u); err != nil {
			return err
		}
	}
	for gw, acct := range c.Gateways {
		if !gatewayIDRE.MatchString(gw) {
			return fmt.Errorf("gateways: id %q must match %s", gw, gatewayIDRE)
		}
		if acct == "" {
			return fmt.Errorf("gateways[%s]: no account", gw)
		}
	}
	return nil
}

func (p *PushConfig) check(mqttListen string) error {
	switch p.Mode {
	case "", PushEmbedded:
		p.Mode = PushEmbedded
		if len(p.Brokers) > 0 || len(p.LeafBrokers) > 0 || p.Username != "" || p.PasswordFile != "" || p.CAFile != "" {
			return errors.New("push.brokers, push.leaf_brokers, push.username, push.password_file and push.ca_file need push.mode: external")
		}
		return nil
	case PushExternal:
	default:
		return fmt.Errorf("push.mode %q: want %s or %s", clip(p.Mode), PushEmbedded, PushExternal)
	}
	if mqttListen != "" {
		return errors.New("mqtt_listen is set but push.mode is external: the embedded broker would serve no gateway; remove mqtt_listen")
	}
	if len(p.Brokers) == 0 {
		return errors.New("push.mode external needs push.brokers (ssl://host:8883, ...)")
	}
	for key, list := range map[string][]string{"push.brokers": p.Brokers, "push.leaf_brokers": p.LeafBrokers} {
		for i, b := range list {
			u, err := url.Parse(b)
			if err != nil || (u.Scheme != "ssl" && u.Scheme != "tls" && u.Scheme != "mqtts") || u.Host == "" || u.Port() == "" ||
				u.User != nil || (u.Path != "" && u.Path != "/") || u.RawQuery != "" {
				return fmt.Errorf("%s[%d] %q must be ssl://host:port (TLS, no credentials in the URL)", key, i, clip(b))
			}
		}
	}
	if p.Username == "" {
		return errors.New("push.mode external needs push.username (the companion's account on the broker)")
	}
	if p.PasswordFile == "" {
		cd := os.Getenv("CREDENTIALS_DIRECTORY")
		if cd == "" {
			return fmt.Errorf("push.password_file is required (or the systemd credential %s)", PushPasswordCredential)
		}
		p.PasswordFile = filepath.Join(cd, PushPasswordCredential)
	}
	if p.ClientID == "" {
		p.ClientID = "edgegate-central"
	}
	if strings.ContainsAny(p.ClientID, "+#/\x00") || len(p.ClientID) > 64 {
		return fmt.Errorf("push.client_id %q: at most 64 bytes, none of + # / NUL", clip(p.ClientID))
	}
	return nil
}

func checkHTTPS(name, raw string) error {
	u, err := url.Parse(raw)
	if err != nil || u.Scheme != "https" || u.Host == "" || u.User != nil || u.RawQuery != "" {
		return fmt.Errorf("%s %q must be an https:// URL without credentials or query", name, raw)
	}
	return nil
}

// ReadSecretFile reads a one-line secret, refusing a file others can read.
func ReadSecretFile(name, path string) (string, error) {
	st, err := os.Stat(path)
	if err != nil {
		return "", fmt.Errorf("%s: %w", name, err)
	}
	if st.Mode().Perm()&0o077 != 0 {
		return "", fmt.Errorf("%s %s: mode %o, want 0600 or stricter", name, path, st.Mode().Perm())
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("%s: %w", name, err)
	}
	s := string(b)
	for len(s) > 0 && (s[len(s)-1] == '\n' || s[len(s)-1] == '\r' || s[len(s)-1] == ' ') {
		s = s[:len(s)-1]
	}
	if s == "" {
		return "", fmt.Errorf("%s %s is empty", name, path)
	}
	return s, nil
}
