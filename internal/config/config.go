// Package config is edgegate's typed, strict configuration: one YAML file,
// every key known, every value checked, every error naming the key (as a
// dotted path), its line and the bad value. Defaults live in one place
// (Default). Secrets are never values of this file: they are files it points
// to (client secret, MQTT password) or the encrypted store.
package config

import (
	_ "embed"
	"errors"
	"fmt"
	"math"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/edgegate/edgegate/internal/admin"
	"github.com/edgegate/edgegate/internal/logx"
)

// Template is the commented example printed by `edgegate config template`.
//
//go:embed template.yaml
var Template string

// Config is the whole configuration of the daemon.
type Config struct {
	Gateway     Gateway  `yaml:"gateway"`
	StateDir    string   `yaml:"state_dir"`
	Store       Store    `yaml:"store"`
	MQTT        MQTT     `yaml:"mqtt"`
	Central     Central  `yaml:"central"`
	Uplink      Uplink   `yaml:"uplink"`
	Policy      Policy   `yaml:"policy"`
	Pipeline    Pipeline `yaml:"pipeline"`
	Radio       Radio    `yaml:"radio"`
	Commands    Commands `yaml:"commands"`
	DevicesFile string   `yaml:"devices_file"`
	Devices     []Device `yaml:"devices"`
	// MemoryLimit is the Go runtime's soft memory limit (GOMEMLIMIT, which
	// wins when set in the environment); 0: none.
	MemoryLimit ByteSize `yaml:"memory_limit"`
	Metrics     Metrics  `yaml:"metrics"`
	Admin       Admin    `yaml:"admin"`
	Log         Log      `yaml:"log"`

	// Path is the file the configuration was read from.
	Path string `yaml:"-"`
}

// Gateway identifies this gateway.
type Gateway struct {
	ID string `yaml:"id"`
}

// Store configures the encrypted, durable store.
type Store struct {
	KeyFile    string   `yaml:"key_file"`
	Credential string   `yaml:"credential"`
	Quota      ByteSize `yaml:"quota"`
	MinFree    ByteSize `yaml:"min_free"`
	MaxBatch   int      `yaml:"max_batch"`
	// CommitDelay is the longest the store waits for more readings before
	// a sync, when they are arriving (adaptive group commit); 0 = never.
	CommitDelay time.Duration `yaml:"commit_delay"`
}

// MQTT configures the local MQTT link.
type MQTT struct {
	Mode     string   `yaml:"mode"`
	Topic    string   `yaml:"topic"`
	Embedded Embedded `yaml:"embedded"`
	External External `yaml:"external"`
}

// Embedded configures the broker inside the daemon.
type Embedded struct {
	Listen    string   `yaml:"listen"`
	TLSListen string   `yaml:"tls_listen"`
	CertFile  string   `yaml:"cert_file"`
	KeyFile   string   `yaml:"key_file"`
	TLSNames  []string `yaml:"tls_names"`
	// DeviceRate and DeviceBurst pace each device (readings/s); a device
	// over its rate waits for its PUBACK, nothing is dropped.
	DeviceRate  float64 `yaml:"device_rate"`
	DeviceBurst int     `yaml:"device_burst"`
	MaxClients  int     `yaml:"max_clients"`
	// Limits bound what one device or application user may take of the
	// broker (mqtt.Limits documents each).
	Limits BrokerLimits `yaml:"limits"`
}

// BrokerLimits are the per-principal limits of the embedded broker; each
// one reached is counted in edgegate_mqtt_limit_hits_total{limit}.
type BrokerLimits struct {
	ConnectionsPerDevice      int           `yaml:"connections_per_device"`
	ConnectionsPerUser        int           `yaml:"connections_per_user"`
	SubscriptionsPerClient    int           `yaml:"subscriptions_per_client"`
	FiltersPerSubscribe       int           `yaml:"filters_per_subscribe"`
	Inflight                  int           `yaml:"inflight"`
	WritesPending             int           `yaml:"writes_pending"`
	KeptSessionBytes          ByteSize      `yaml:"kept_session_bytes"`
	RetainedBytes             ByteSize      `yaml:"retained_bytes"`
	RetainedBytesPerPrincipal ByteSize      `yaml:"retained_bytes_per_principal"`
	RetainedMessages          int           `yaml:"retained_messages"`
	WillBytes                 ByteSize      `yaml:"will_bytes"`
	AppPacketBytes            ByteSize      `yaml:"app_packet_bytes"`
	ConnectTimeout            time.Duration `yaml:"connect_timeout"`
	PendingConnects           int           `yaml:"pending_connects"`
	PendingConnectsPerHost    int           `yaml:"pending_connects_per_host"`
	MaxKeepalive              time.Duration `yaml:"max_keepalive"`
}

// External configures the connection to an external broker (Mosquitto).
type External struct {
	URL          string        `yaml:"url"`
	ClientID     string        `yaml:"client_id"`
	Username     string        `yaml:"username"`
	PasswordFile string        `yaml:"password_file"`
	CAFile       string        `yaml:"ca_file"`
	Inflight     int           `yaml:"inflight"`
	Keepalive    time.Duration `yaml:"keepalive"`
	// Accounts is who keeps the broker's device accounts and ACLs:
	// AccountsDynsec (the gateway, from the policy, through Mosquitto's
	// dynamic-security plugin) or AccountsNone (the broker's administrator;
	// the gateway then cannot vouch for ownership on the local link).
	Accounts string `yaml:"accounts"`
	// AdminUsername and AdminPasswordFile are a dynsec administrator
	// account (mosquitto_ctrl dynsec init); empty: username and
	// password_file, the ingest account, serve for both.
	AdminUsername     string `yaml:"admin_username"`
	AdminPasswordFile string `yaml:"admin_password_file"`
	// AccountsInterval is how often the accounts are compared with the
	// policy and repaired besides every policy change.
	AccountsInterval time.Duration `yaml:"accounts_interval"`
}

// Who keeps an external broker's accounts (mqtt.external.accounts).
const (
	AccountsNone   = "none"
	AccountsDynsec = "dynsec"
)

// Central configures the gateway's account at the central service.
type Central struct {
	Issuer           string   `yaml:"issuer"`
	Audience         string   `yaml:"audience"`
	JWKSURL          string   `yaml:"jwks_url"`
	TokenURL         string   `yaml:"token_url"`
	Credentials      string   `yaml:"credentials"`
	ClientID         string   `yaml:"client_id"`
	ClientSecretFile string   `yaml:"client_secret_file"`
	Scopes           []string `yaml:"scopes"`
	CAFile           string   `yaml:"ca_file"`
}

// MissingCentral reports whether err (from Load or Validate) says only
// that the central section's required keys are absent: a gateway that was
// never paired or configured, which `edgegate pair` fixes, rather than a
// configuration with a wrong value.
func MissingCentral(err error) bool {
	var leaves []error
	var walk func(error) bool
	walk = func(e error) bool {
		switch u := e.(type) {
		case *FieldError:
			leaves = append(leaves, u)
			return true
		case interface{ Unwrap() []error }:
			for _, x := range u.Unwrap() {
				if !walk(x) {
					return false
				}
			}
			return true
		}
		if next := errors.Unwrap(e); next != nil {
			return walk(next)
		}
		return false
	}
	if err == nil || !walk(err) || len(leaves) == 0 {
		return false
	}
	for _, l := range leaves {
		fe := l.(*FieldError)
		switch fe.Key {
		case "central.token_url", "central.client_id", "central.client_secret_file":
			if fe.Value == "" {
				continue
			}
		}
		return false
	}
	return true
}

// Uplink configures delivery to the brokers.
type Uplink struct {
	Mode      string `yaml:"mode"`
	BatchSize int    `yaml:"batch_size"`
	// BatchLinger is how long batch mode lets readings gather before a
	// request while another request is in flight; 0 = send at once.
	BatchLinger time.Duration `yaml:"batch_linger"`
	// Concurrency is the requests in flight per broker; 0: by mode
	// (EffectiveConcurrency).
	Concurrency int `yaml:"concurrency"`
	// SendKeys is the removed uplink.send_keys, still read so that an
	// existing file with "send_keys: false" loads; true is refused. The
	// stock filter never consults k1/k2 when a bearer token is sent
	// (AccessTokenAuthenticationFilter.java), and secrets never go into
	// URLs.
	SendKeys bool `yaml:"send_keys"`
	// SignatureAttribute names the metadata, on every attribute written,
	// that carries the reading's signed envelope (the key keeps its name
	// so existing files load; there is no separate attribute any more).
	SignatureAttribute string `yaml:"signature_attribute"`
	// RefusalWindow: how long the filter's refusal of a device the policy
	// lists (or Orion's "no entity") is retried, from the device's first
	// refusal, before its readings are dead-lettered; 0 = at once. The
	// default, 15m, outlasts the filter's cache of a refusal in the stock
	// deploys (spring.elapsingcache.minutes: 3 in snap4city-docker-generator,
	// 10 in OrionBrokerFilter/docker-compose.yml.template); a filter
	// deployed with application-deploy.properties caches for 60.
	RefusalWindow     time.Duration `yaml:"refusal_window"`
	FiwareService     string        `yaml:"fiware_service"`
	FiwareServicePath string        `yaml:"fiware_service_path"`
	CAFile            string        `yaml:"ca_file"`
	RequestTimeout    time.Duration `yaml:"request_timeout"`
	MinBackoff        time.Duration `yaml:"min_backoff"`
	MaxBackoff        time.Duration `yaml:"max_backoff"`
}

// EffectiveConcurrency is Concurrency, or when 0 the default of the mode:
// 16 in filter mode, where every request carries one reading and a device
// has at most one in flight, so the rate is requests in flight / round
// trip (4 capped the filter run of edgegate-bench at ~2.7k/s on loopback,
// and a remote filter's round trip is ten times longer); 4 in batch mode,
// where fewer requests in flight make bigger batches.
func (u Uplink) EffectiveConcurrency() int {
	switch {
	case u.Concurrency > 0:
		return u.Concurrency
	case u.Mode == "batch":
		return 4
	default:
		return 16
	}
}

// Device is a device known to the gateway until policy sync provides them.
type Device struct {
	ID          string        `yaml:"id"`
	Type        string        `yaml:"type"`
	Owner       string        `yaml:"owner"`
	K1          string        `yaml:"k1"`
	K2          string        `yaml:"k2"`
	Broker      string        `yaml:"broker"`
	Service     string        `yaml:"fiware_service"`
	ServicePath string        `yaml:"fiware_service_path"`
	Radio       *RadioBinding `yaml:"radio"`
	// Signing: hs256 (from K1/K2, the default), gateway (the gateway's
	// key for the device, in the store) or device (the device signs).
	Signing    string   `yaml:"signing"`
	PublicKeys []string `yaml:"public_keys"` // JWK, JWK Set or PEM; newest first
	// Kind: sensor (default) or actuator, as the IoT Directory says;
	// Writable: the attributes the platform may set (docs/actuators.md).
	Kind     string   `yaml:"kind"`
	Writable []string `yaml:"writable"`
}

// RadioBinding ties a device to a radio source: a port, and on a MySensors
// port a node and optionally one child sensor. Absent node or child: any.
type RadioBinding struct {
	Port  string `yaml:"port"`
	Node  *int   `yaml:"node"`
	Child *int   `yaml:"child"`
}

// NodeOrAny and ChildOrAny give -1 for "any".
func (b *RadioBinding) NodeOrAny() int  { return orAny(b.Node) }
func (b *RadioBinding) ChildOrAny() int { return orAny(b.Child) }

func orAny(p *int) int {
	if p == nil {
		return -1
	}
	return *p
}

// How the gateway authenticates to the central service.
const (
	CredentialsSecretFile = "secret_file" // client credentials, the secret in client_secret_file
	CredentialsPaired     = "paired"      // written by edgegate pair: refresh token and key in the store
)

// Policy sources.
const (
	PolicyConfig    = "config"        // the devices of this file
	PolicyBundle    = "bundle"        // signed bundles from central ops
	PolicyOwnership = "ownership-api" // the platform's Ownership API and delegations
)

// Policy configures where the ownership policy comes from.
type Policy struct {
	Source       string        `yaml:"source"`
	CentralURL   string        `yaml:"central_url"`
	KeysFile     string        `yaml:"keys_file"`
	PollInterval time.Duration `yaml:"poll_interval"`
	PushURL      string        `yaml:"push_url"`
	ExpiryGrace  time.Duration `yaml:"expiry_grace"`
	Ownership    Ownership     `yaml:"ownership"`
}

// Ownership configures the Ownership API source.
type Ownership struct {
	URL            string            `yaml:"url"`
	DataManagerURL string            `yaml:"datamanager_url"`
	Username       string            `yaml:"username"`
	DefaultType    string            `yaml:"default_type"`
	Brokers        map[string]string `yaml:"brokers"`
	// MaxAge is the policy's lifetime after the last successful sync: its
	// expiry, past which (plus policy.expiry_grace) nothing is forwarded.
	MaxAge time.Duration `yaml:"max_age"`
}

// Pipeline configures checks on every reading.
type Pipeline struct {
	// MaxClockSkew refuses a reading observed further in the future;
	// MaxAge one observed longer ago (0: off). Both are skipped while the
	// gateway's clock is obviously unsynchronised.
	MaxClockSkew time.Duration `yaml:"max_clock_skew"`
	MaxAge       time.Duration `yaml:"max_age"`
}

// Commands configures the downlink: commands from the platform to
// actuators (internal/command, docs/actuators.md).
type Commands struct {
	// Enabled turns the downlink on; off, the gateway never reads an
	// entity back and never sends a device anything but radio replies.
	Enabled bool `yaml:"enabled"`
	// TTL: a command not delivered this long after it was learned expires
	// and is never sent.
	TTL time.Duration `yaml:"ttl"`
	// PollInterval is how often the actuators' entities are read back
	// through the filter; PollBudget bounds the reads of one round.
	PollInterval time.Duration `yaml:"poll_interval"`
	PollBudget   int           `yaml:"poll_budget"`
	// Retries bounds the sends of one command to a MySensors node before
	// its echo (the ack); AckTimeout is the wait for each echo.
	Retries    int           `yaml:"retries"`
	AckTimeout time.Duration `yaml:"ack_timeout"`
	// LocalControl lets local-broker applications that the policy grants
	// a write kind on a device (or own it) publish commands to it.
	LocalControl bool `yaml:"local_control"`
	// Notify learns commands through an Orion subscription where the
	// platform offers one (docs/actuators.md): none (polling only), mqtt
	// or http.
	Notify Notify `yaml:"notify"`
}

// Notify modes (commands.notify.mode).
const (
	NotifyModeNone = "none"
	NotifyModeMQTT = "mqtt"
	NotifyModeHTTP = "http"
)

// Notify configures the Orion subscription that hints the gateway that an
// actuator's entity changed; the gateway then reads the entity through
// the filter (a notification is never a command by itself).
type Notify struct {
	Mode string `yaml:"mode"`
	// Expires is the lifetime asked for each subscription; it is renewed
	// (a new one, then the old one deleted) before it lapses.
	Expires time.Duration `yaml:"expires"`
	// SafetyInterval is how often a device with a live subscription is
	// still read back (a lost notification costs at most this).
	SafetyInterval time.Duration `yaml:"safety_interval"`
	// Reprobe bounds the wait before a refused or failed subscription is
	// tried again (jittered, doubling from 10s).
	Reprobe time.Duration `yaml:"reprobe"`
	MQTT    NotifyMQTT    `yaml:"mqtt"`
	HTTP    NotifyHTTP    `yaml:"http"`
}

// NotifyMQTT: a broker both Orion and the gateway reach.
type NotifyMQTT struct {
	// URL is where the gateway subscribes: tcp://, ssl://, mqtt:// or mqtts://.
	URL string `yaml:"url"`
	// OrionURL is where Orion publishes: mqtt://host:port (Orion 3.12 has
	// no MQTT over TLS); default: URL when that is mqtt:// or tcp://.
	OrionURL    string `yaml:"orion_url"`
	TopicPrefix string `yaml:"topic_prefix"`
	// Username and PasswordFile log both in; the password goes to Orion in
	// the subscription (which shows it masked) and never into a log.
	Username     string `yaml:"username"`
	PasswordFile string `yaml:"password_file"`
	CAFile       string `yaml:"ca_file"` // for ssl:// or mqtts:// on the gateway's side
}

// NotifyHTTP: an HTTPS endpoint of the gateway that Orion posts to.
type NotifyHTTP struct {
	Listen    string `yaml:"listen"`
	PublicURL string `yaml:"public_url"`
	CertFile  string `yaml:"cert_file"`
	KeyFile   string `yaml:"key_file"`
}

// Radio configures the serial radio links.
type Radio struct {
	Ports []RadioPort `yaml:"ports"`
	// Modbus lists the Modbus RTU lines (RS-485 buses) the gateway polls
	// as their master, each with its slaves and their register maps.
	Modbus []ModbusLine `yaml:"modbus"`
}

// ModbusLine is one serial line with Modbus RTU slaves on it. Zero values
// take the defaults of Modbus over Serial Line: 19200 baud, even parity,
// one stop bit (two with parity none), and a 500ms answer timeout.
type ModbusLine struct {
	Path     string         `yaml:"path"`
	Baud     int            `yaml:"baud"`
	Parity   string         `yaml:"parity"`
	StopBits int            `yaml:"stop_bits"`
	Timeout  time.Duration  `yaml:"timeout"`
	Devices  []ModbusDevice `yaml:"devices"`
}

// ModbusDevice is one slave (unit) on a line and the device whose
// readings its registers make. Where the map lives in this file, not in
// devices[], so that it works whatever policy.source provides the devices.
type ModbusDevice struct {
	Device    string           `yaml:"device"`
	Unit      int              `yaml:"unit"`
	Period    time.Duration    `yaml:"period"`  // between polls; 0: 10s
	Timeout   time.Duration    `yaml:"timeout"` // per request; 0: the line's
	Registers []ModbusRegister `yaml:"registers"`
}

// ModbusRegister maps one attribute to a register (or coil) of the slave.
type ModbusRegister struct {
	Attribute string `yaml:"attribute"`
	// Function is the table: holding, input, coil or discrete.
	Function string `yaml:"function"`
	// Address is the protocol address, 0-based (holding register 40001
	// is address 0).
	Address int `yaml:"address"`
	// Type is int16, uint16, int32, uint32 or float32 for registers; a
	// coil or discrete input is a bool (leave it out).
	Type      string      `yaml:"type"`
	WordOrder string      `yaml:"word_order"` // 32-bit types: big (default) or little
	Scale     ModbusScale `yaml:"scale"`      // reported = raw*scale + offset
	Offset    float64     `yaml:"offset"`
	Unit      string      `yaml:"unit"`     // informational, e.g. kWh
	Writable  bool        `yaml:"writable"` // commands may write it (holding and coil only)
}

// ModbusScale is a register's multiplier. Its zero value is "absent" and
// means 1; an explicit 0 (which would report every value as the offset)
// is refused when the file is read. A value type, not a pointer, so that
// the configuration compares and prints by value.
type ModbusScale float64

// Or1 is the multiplier in force.
func (s ModbusScale) Or1() float64 {
	if s == 0 {
		return 1
	}
	return float64(s)
}

// UnmarshalYAML refuses 0 and non-finite numbers.
func (s *ModbusScale) UnmarshalYAML(n *yaml.Node) error {
	var f float64
	if err := n.Decode(&f); err != nil {
		return err
	}
	if f == 0 || math.IsNaN(f) || math.IsInf(f, 0) {
		return errors.New("must be a finite number other than 0 (absent: 1)")
	}
	*s = ModbusScale(f)
	return nil
}

// RadioPort is one radio module on a serial port.
type RadioPort struct {
	Path        string        `yaml:"path"`
	Baud        int           `yaml:"baud"`
	Codec       string        `yaml:"codec"`
	ReadTimeout time.Duration `yaml:"read_timeout"`
}

// Metrics configures the loopback-only metrics listener.
type Metrics struct {
	Listen string `yaml:"listen"`
}

// Admin configures the local admin API (a unix socket, never a port).
type Admin struct {
	Socket string `yaml:"socket"`
}

// Log configures logging.
type Log struct {
	Level  string `yaml:"level"`
	Format string `yaml:"format"`
}

// Modes of the local MQTT link.
const (
	ModeEmbedded = "embedded"
	ModeExternal = "external"
)

// DeviceToken is the placeholder of the device id in an MQTT topic pattern.
const DeviceToken = "{device}"

// Default returns the configuration every file starts from. It is the one
// source of defaults: template.yaml states the same values
// (TestTemplateIsDefault keeps the two in step) and `edgegate pair` takes
// what it writes from here.
func Default() Config {
	return Config{
		StateDir:    "/var/lib/edgegate",
		MemoryLimit: 40 << 20, // docs/performance.md#memory
		Store: Store{Credential: "store-key", Quota: 512 << 20, MinFree: 48 << 20, MaxBatch: 256,
			CommitDelay: 20 * time.Millisecond},
		MQTT: MQTT{
			Mode:  ModeEmbedded,
			Topic: "devices/{device}/telemetry",
			Embedded: Embedded{Listen: "127.0.0.1:1883", DeviceRate: 50, DeviceBurst: 100, MaxClients: 256,
				// Keep in step with mqtt.DefaultLimits (a test checks).
				Limits: BrokerLimits{
					ConnectionsPerDevice: 4, ConnectionsPerUser: 8, SubscriptionsPerClient: 64, FiltersPerSubscribe: 16,
					Inflight: 64, WritesPending: 64, KeptSessionBytes: 256 << 10, RetainedBytes: 1 << 20, RetainedBytesPerPrincipal: 64 << 10,
					RetainedMessages: 4096, WillBytes: 4 << 10, AppPacketBytes: 64 << 10,
					ConnectTimeout: 10 * time.Second, PendingConnects: 128, PendingConnectsPerHost: 16,
					MaxKeepalive: 10 * time.Minute,
				}},
			External: External{ClientID: "edgegate", Inflight: 512, Keepalive: 30 * time.Second,
				Accounts: AccountsNone, AccountsInterval: 5 * time.Minute},
		},
		Uplink: Uplink{
			Mode: "filter", BatchSize: 256, BatchLinger: 25 * time.Millisecond, SignatureAttribute: "signature", RefusalWindow: 15 * time.Minute,
			RequestTimeout: 15 * time.Second, MinBackoff: 200 * time.Millisecond, MaxBackoff: 30 * time.Second,
		},
		Pipeline: Pipeline{MaxClockSkew: 5 * time.Minute},
		Commands: Commands{TTL: 10 * time.Minute, PollInterval: 5 * time.Second, PollBudget: 32,
			Retries: 3, AckTimeout: 2 * time.Second,
			Notify: Notify{Mode: NotifyModeNone, Expires: time.Hour, SafetyInterval: 5 * time.Minute, Reprobe: 10 * time.Minute,
				MQTT: NotifyMQTT{TopicPrefix: "edgegate/notify"}}},
		Policy: Policy{Source: PolicyConfig, PollInterval: 5 * time.Minute, ExpiryGrace: 24 * time.Hour,
			Ownership: Ownership{MaxAge: 24 * time.Hour}},
		Metrics: Metrics{Listen: "127.0.0.1:9464"},
		// The daemon treats this exact path as "not configured"
		// (daemon/devices.go), so it is the admin package's constant.
		Admin: Admin{Socket: admin.DefaultSocket},
		Log:   Log{Level: "info", Format: "text"},
	}
}

// MaxFileBytes bounds a configuration or devices file.
const MaxFileBytes = 4 << 20

// Load reads, decodes and validates a configuration file. Relative paths in
// it are taken relative to the file's own folder, whether path is relative
// or absolute: path is made absolute first, so that "run --config
// edgegate.yaml" and "run --config /etc/edgegate/edgegate.yaml" read the
// same file the same way (admin.socket: state/admin.sock must be absolute
// once resolved). Config.Path is the absolute path.
func Load(path string) (*Config, error) {
	if path == "" {
		return nil, errors.New("load config: no file given")
	}
	path, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("load config: %w", err)
	}
	data, err := readBounded(path)
	if err != nil {
		return nil, fmt.Errorf("load config: %w", err)
	}
	c := Default()
	if err := decodeYAML(data, &c); err != nil {
		return nil, fmt.Errorf("load config %s: %w", path, err)
	}
	c.Path = path
	c.resolvePaths(filepath.Dir(path))
	if hasKeys(c.Devices) {
		if err := privateFile(path); err != nil {
			return nil, fmt.Errorf("load config: devices carry k1/k2: %w", err)
		}
	}
	if c.DevicesFile != "" {
		devs, err := LoadDevices(c.DevicesFile)
		if err != nil {
			return nil, fmt.Errorf("load config %s: %w", path, err)
		}
		c.Devices = append(c.Devices, devs...)
	}
	if err := c.Validate(); err != nil {
		return nil, fmt.Errorf("load config %s: %w", path, err)
	}
	return &c, nil
}

// devicesDoc is the shape of a devices file.
type devicesDoc struct {
	Devices []Device `yaml:"devices"`
}

// LoadDevices reads a devices file (`devices:` list). It holds K1/K2, so it
// must not be readable by other users.
func LoadDevices(path string) ([]Device, error) {
	data, err := readBounded(path)
	if err != nil {
		return nil, fmt.Errorf("load devices: %w", err)
	}
	var d devicesDoc
	if err := decodeYAML(data, &d); err != nil {
		return nil, fmt.Errorf("load devices %s: %w", path, err)
	}
	if hasKeys(d.Devices) {
		if err := privateFile(path); err != nil {
			return nil, fmt.Errorf("load devices: %w", err)
		}
	}
	return d.Devices, nil
}

func decodeYAML(data []byte, out any) error {
	var n yaml.Node
	if err := yaml.Unmarshal(data, &n); err != nil {
		return fmt.Errorf("parse YAML: %w", err)
	}
	return decodeStrict(&n, out)
}

func readBounded(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if st.Size() > MaxFileBytes {
		return nil, fmt.Errorf("%s is %d bytes, at most %d", path, st.Size(), MaxFileBytes)
	}
	buf := make([]byte, st.Size())
	if _, err := f.ReadAt(buf, 0); err != nil && st.Size() > 0 {
		return nil, err
	}
	return buf, nil
}

func hasKeys(ds []Device) bool {
	for _, d := range ds {
		if d.K1 != "" || d.K2 != "" {
			return true
		}
	}
	return false
}

// privateFile refuses a file that other users may read.
func privateFile(path string) error {
	st, err := os.Stat(path)
	if err != nil {
		return err
	}
	if st.Mode().Perm()&0o007 != 0 {
		return fmt.Errorf("%s holds secrets but has mode %04o; run: chmod o-rwx %s", path, st.Mode().Perm(), path)
	}
	return nil
}

func (c *Config) resolvePaths(dir string) {
	abs := func(p *string) {
		if *p != "" && !filepath.IsAbs(*p) {
			*p = filepath.Join(dir, *p)
		}
	}
	abs(&c.StateDir)
	abs(&c.Store.KeyFile)
	abs(&c.MQTT.Embedded.CertFile)
	abs(&c.MQTT.Embedded.KeyFile)
	abs(&c.MQTT.External.PasswordFile)
	abs(&c.MQTT.External.CAFile)
	abs(&c.MQTT.External.AdminPasswordFile)
	abs(&c.Central.ClientSecretFile)
	abs(&c.Central.CAFile)
	abs(&c.Uplink.CAFile)
	abs(&c.DevicesFile)
	abs(&c.Policy.KeysFile)
	abs(&c.Admin.Socket)
	abs(&c.Commands.Notify.MQTT.PasswordFile)
	abs(&c.Commands.Notify.MQTT.CAFile)
	abs(&c.Commands.Notify.HTTP.CertFile)
	abs(&c.Commands.Notify.HTTP.KeyFile)
}

// KeyFile is the store key file in use: the configured one or
// state_dir/store.key.
func (c *Config) KeyFile() string {
	if c.Store.KeyFile != "" {
		return c.Store.KeyFile
	}
	return filepath.Join(c.StateDir, "store.key")
}

// QueueDir is where the durable queue lives.
func (c *Config) QueueDir() string { return filepath.Join(c.StateDir, "queue") }

// urlSecrets refuses a URL that carries a credential: user:password@ or
// a token in the query. Tokens come from files (client_secret_file,
// password_file) or systemd credentials, never from a URL, which ends up
// in logs, process listings and error messages. The error names the key
// and never the secret (FieldError redacts the value).
func (c *Config) urlSecrets() []error {
	type kv struct{ key, url string }
	urls := []kv{
		{"mqtt.external.url", c.MQTT.External.URL},
		{"central.issuer", c.Central.Issuer},
		{"central.jwks_url", c.Central.JWKSURL},
		{"central.token_url", c.Central.TokenURL},
		{"policy.central_url", c.Policy.CentralURL},
		{"policy.push_url", c.Policy.PushURL},
		{"policy.ownership.url", c.Policy.Ownership.URL},
		{"policy.ownership.datamanager_url", c.Policy.Ownership.DataManagerURL},
		{"commands.notify.mqtt.url", c.Commands.Notify.MQTT.URL},
		{"commands.notify.mqtt.orion_url", c.Commands.Notify.MQTT.OrionURL},
		{"commands.notify.http.public_url", c.Commands.Notify.HTTP.PublicURL},
	}
	names := make([]string, 0, len(c.Policy.Ownership.Brokers))
	for name := range c.Policy.Ownership.Brokers {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		urls = append(urls, kv{"policy.ownership.brokers." + name, c.Policy.Ownership.Brokers[name]})
	}
	for i, d := range c.Devices {
		urls = append(urls, kv{fmt.Sprintf("devices[%d].broker", i), d.Broker})
	}
	var errs []error
	for _, x := range urls {
		if msg := urlSecret(x.url); msg != "" {
			errs = append(errs, &FieldError{Key: x.key, Value: x.url, Msg: msg})
		}
	}
	return errs
}

// urlSecret says what secret a URL carries, or "".
func urlSecret(s string) string {
	if s == "" {
		return ""
	}
	u, err := url.Parse(s)
	if err != nil {
		if strings.Contains(s, "@") || strings.Contains(s, "?") {
			return "must not carry credentials; it is not a valid URL either"
		}
		return ""
	}
	switch what := logx.URLCredential(u); {
	case what == "":
		return ""
	case u.User != nil:
		return "must not carry credentials (user:password@): put the password in a file (mqtt.external.password_file, central.client_secret_file) or a systemd credential"
	default:
		return "must not carry a token in its query (" + what + "): tokens come from files or credentials, never URLs"
	}
}

func httpsURL(s string) error {
	u, err := url.Parse(s)
	if s == "" || err != nil || u.Host == "" {
		return errors.New("must be an https:// URL")
	}
	if u.Scheme != "https" {
		return errors.New("must use https:// (TLS is always verified)")
	}
	// user:password@ is refused by urlSecrets, with a message of its own.
	return nil
}

// secureURL is httpsURL, or an http URL to a loopback host.
func secureURL(s string) error {
	if u, err := url.Parse(s); err == nil && u.Scheme == "http" && u.Host != "" && isLoopbackHost(u.Hostname()) {
		return nil
	}
	return httpsURL(s)
}

func loopbackAddr(addr string) error {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return errors.New("must be host:port")
	}
	if _, err := strconv.ParseUint(port, 10, 16); err != nil {
		return errors.New("must have a numeric port")
	}
	if !isLoopbackHost(host) {
		return errors.New("must be a loopback address (127.0.0.1 or ::1)")
	}
	return nil
}

func isLoopbackHost(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// checkTopic requires exactly one {device} level and no wildcards.
func checkTopic(t string) error {
	if t == "" {
		return errors.New("must be set")
	}
	n := 0
	for _, level := range strings.Split(t, "/") {
		switch {
		case level == DeviceToken:
			n++
		case strings.ContainsAny(level, "+#{}"):
			return fmt.Errorf("level %q: only the whole-level placeholder {device} is allowed, no wildcards", level)
		}
	}
	if n != 1 {
		return errors.New("must contain {device} exactly once, as a whole level")
	}
	return nil
}

// ByteSize is a size in bytes, written as 512MiB, 1GB, 64k or a number.
type ByteSize int64

// UnmarshalYAML parses sizes with units.
func (b *ByteSize) UnmarshalYAML(n *yaml.Node) error {
	v, err := ParseByteSize(n.Value)
	if err != nil {
		return err
	}
	*b = v
	return nil
}

// ParseByteSize parses "512MiB", "1GB", "64k", "1000".
func ParseByteSize(s string) (ByteSize, error) {
	s = strings.TrimSpace(s)
	units := []struct {
		suffix string
		mult   int64
	}{
		{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"TiB", 1 << 40},
		{"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9}, {"TB", 1e12},
		{"k", 1 << 10}, {"K", 1 << 10}, {"M", 1 << 20}, {"G", 1 << 30}, {"B", 1},
	}
	mult := int64(1)
	for _, u := range units {
		if strings.HasSuffix(s, u.suffix) {
			s, mult = strings.TrimSpace(strings.TrimSuffix(s, u.suffix)), u.mult
			break
		}
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n < 0 || (mult > 1 && n > (1<<62)/mult) {
		return 0, errors.New("must be a size such as 512MiB, 2GB or 1000000")
	}
	return ByteSize(n * mult), nil
}

func (b ByteSize) String() string {
	switch {
	case b >= 1<<30 && b%(1<<30) == 0:
		return fmt.Sprintf("%dGiB", b>>30)
	case b >= 1<<20 && b%(1<<20) == 0:
		return fmt.Sprintf("%dMiB", b>>20)
	case b >= 1<<10 && b%(1<<10) == 0:
		return fmt.Sprintf("%dKiB", b>>10)
	}
	return strconv.FormatInt(int64(b), 10)
}

// PrivateFile is the daemon's rule for a file that holds a secret (a
// client secret, a broker password, the store key): a regular file no
// group or other user may access. `edgegate run` and `edgegate config
// check` both apply it, so check cannot pass a file run then refuses.
// The error names the file and the fix, never its content.
func PrivateFile(path string) error {
	st, err := os.Stat(path)
	if err != nil {
		return err
	}
	if !st.Mode().IsRegular() {
		return fmt.Errorf("%s is not a regular file", path)
	}
	if perm := st.Mode().Perm(); perm&0o077 != 0 {
		return fmt.Errorf("%s has mode %04o; a secret file must be private: chmod 600 %s", path, perm, path)
	}
	return nil
}

// CheckSecretFiles applies PrivateFile to every secret file run reads:
// central.client_secret_file (unless the credentials are paired),
// mqtt.external.password_file and the store key file (unless the store
// key comes from a systemd credential: keys.LoadStoreKey looks for
// store.credential in $CREDENTIALS_DIRECTORY, read through getenv, first).
// The config and devices files holding k1/k2 were checked by Load. A
// missing file is not an error here: before pairing there is none, and
// run reports it as not configured (or generates the store key).
func (c *Config) CheckSecretFiles(getenv func(string) string) error {
	type kf struct{ key, path string }
	files := []kf{}
	if c.Central.Credentials != CredentialsPaired {
		files = append(files, kf{"central.client_secret_file", c.Central.ClientSecretFile})
	}
	if c.MQTT.Mode == ModeExternal {
		files = append(files, kf{"mqtt.external.password_file", c.MQTT.External.PasswordFile})
	}
	if c.Commands.Enabled && c.Commands.Notify.Mode == NotifyModeMQTT {
		files = append(files, kf{"commands.notify.mqtt.password_file", c.Commands.Notify.MQTT.PasswordFile})
	}
	if c.Commands.Enabled && c.Commands.Notify.Mode == NotifyModeHTTP {
		files = append(files, kf{"commands.notify.http.key_file", c.Commands.Notify.HTTP.KeyFile})
	}
	credential := false
	if dir := getenv("CREDENTIALS_DIRECTORY"); dir != "" && c.Store.Credential != "" {
		_, err := os.Stat(filepath.Join(dir, c.Store.Credential))
		credential = err == nil
	}
	if !credential {
		files = append(files, kf{"store.key_file", c.KeyFile()})
	}
	var errs []error
	for _, f := range files {
		if f.path == "" {
			continue
		}
		if err := PrivateFile(f.path); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, &FieldError{Key: f.key, Msg: err.Error()})
		}
	}
	return errors.Join(errs...)
}

// checkBrokerLimits validates mqtt.embedded.limits: every limit is bounded
// on both sides (0 would mean "none" to some readers; a limit that is off
// is what issue 17 was about).
func checkBrokerLimits(l BrokerLimits, bad func(key, value, msg string)) {
	const k = "mqtt.embedded.limits."
	count := func(key string, v, lo, hi int) {
		if v < lo || v > hi {
			bad(k+key, strconv.Itoa(v), fmt.Sprintf("must be between %d and %d", lo, hi))
		}
	}
	size := func(key string, v, lo, hi ByteSize) {
		if v < lo || v > hi {
			bad(k+key, v.String(), "must be between "+lo.String()+" and "+hi.String())
		}
	}
	dur := func(key string, v, lo, hi time.Duration) {
		if v < lo || v > hi {
			bad(k+key, v.String(), "must be between "+lo.String()+" and "+hi.String())
		}
	}
	count("connections_per_device", l.ConnectionsPerDevice, 1, 1024)
	count("connections_per_user", l.ConnectionsPerUser, 1, 1024)
	count("subscriptions_per_client", l.SubscriptionsPerClient, 1, 4096)
	count("filters_per_subscribe", l.FiltersPerSubscribe, 1, 1024)
	count("inflight", l.Inflight, 1, 65535)
	count("writes_pending", l.WritesPending, 1, 65536)
	size("kept_session_bytes", l.KeptSessionBytes, 1<<10, 64<<20)
	size("retained_bytes", l.RetainedBytes, 1<<10, 64<<20)
	size("retained_bytes_per_principal", l.RetainedBytesPerPrincipal, 1<<10, max(1<<10, l.RetainedBytes))
	count("retained_messages", l.RetainedMessages, 1, 1_000_000)
	size("will_bytes", l.WillBytes, 1, 256<<10)
	size("app_packet_bytes", l.AppPacketBytes, 1<<10, 320<<10)
	dur("connect_timeout", l.ConnectTimeout, time.Second, 5*time.Minute)
	count("pending_connects", l.PendingConnects, 1, 100000)
	count("pending_connects_per_host", l.PendingConnectsPerHost, 1, max(1, l.PendingConnects))
	// mochi keeps 1.5 x the keep-alive in 16 bits of seconds.
	dur("max_keepalive", l.MaxKeepalive, time.Second, 43690*time.Second)
}
