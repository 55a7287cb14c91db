package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"gopkg.in/yaml.v3"

	"github.com/edgegate/edgegate/internal/admin"
	"github.com/edgegate/edgegate/internal/daemon"
	"github.com/edgegate/edgegate/internal/keys"
	"github.com/edgegate/edgegate/internal/queue"
	"github.com/edgegate/edgegate/policy"
	centralsync "github.com/edgegate/edgegate/sync"
)

const deviceUsage = `usage: edgegate device add|list|update|remove|bind|rotate-key [flags]

  device add --config FILE --type TYPE [flags] ID
             [--radio-port P --radio-node N [--radio-child C] | --mqtt]
             [--attr NAME:DATA_TYPE[:VALUE_TYPE[:UNIT[:HEALTH]]]]...
             [--signing hs256|ed25519|es256|device [--public-key FILE]]
  device list --config FILE
  device update --config FILE [--type T] [--latitude X --longitude Y]
             [--frequency S] [--radio-port P ... | --mqtt]
             [--add-attr SPEC]... [--remove-attr NAME]... ID
  device remove --config FILE [--broker B] ID
  device bind --config FILE --type TYPE [--broker B]
             [--radio-port P --radio-node N --radio-child C | --mqtt]
             [--k1-file FILE] [--signing device --public-key FILE] ID
  device rotate-key --config FILE [--alg ed25519|es256 | --public-key FILE] ID

add registers a device in the platform's IoT directory (device.php, as
Snap4City's own clients call it) for the paired account, confirms that the
platform created its ownership row, and records it in the gateway's own
registry (entity type, broker, local binding, signing mode, attributes).
While the daemon runs, the command goes through its admin socket and the
daemon puts the device in force at once; otherwise the store is opened
directly.

K1/K2 are generated (random UUIDs) unless given through EDGEGATE_K1 and
EDGEGATE_K2; they are never printed (--keys-out FILE writes them, 0600,
for provisioning the device).

The model: each --attr declares one attribute with its data type (float,
integer, string, ...), value type (default: its name), unit (default "-")
and healthiness criterion: refresh_rate=SECONDS (default: twice
--frequency), different_values or within_bounds, e.g.
  --attr temperature:float:temperature:°C:refresh_rate=1200
Without --attr the model is value:float. The gateway's signature and each
reading's observation time travel as metadata on the written attributes,
so the model needs no extra attribute for them.

bind records a device registered elsewhere (e.g. delegated to the account)
in the gateway's registry, without calling the directory; --k1-file gives
its K1/K2 (a file with "k1: ..." and "k2: ..." lines) when the delegation
does not carry them. list shows the directory's devices joined with the
registry, and flags what keeps one out of the gateway's policy.

--signing says who signs the device's readings:
  hs256    the gateway, HS256 with a key derived from K1/K2 (the default:
           what the platform's verifiers know; anyone with K1/K2 can forge)
  ed25519  the gateway, with an Ed25519 key it generates now and keeps in
  es256    its encrypted store (ES256: ECDSA P-256)
  device   the device signs each reading itself (a compact JWS payload);
           its public key comes from --public-key (JWK or PEM), or a new
           Ed25519 key is generated and its private JWK written to
           --keys-out for provisioning the device
rotate-key (daemon stopped) registers a new key; the old ones stay.
`

func runDevice(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	return deviceWith(ctx, defaultPairEnv(), args, stdout, stderr)
}

// attrFlag collects --attr NAME:DATA_TYPE[:VALUE_TYPE[:UNIT[:HEALTH]]].
type attrFlag []admin.DeviceAttr

func (a *attrFlag) String() string { return fmt.Sprint(len(*a)) }
func (a *attrFlag) Set(v string) error {
	at, err := parseAttr(v)
	if err != nil {
		return err
	}
	*a = append(*a, at)
	return nil
}

// parseAttr reads one --attr; the refresh_rate default is filled in later
// from --frequency.
func parseAttr(v string) (admin.DeviceAttr, error) {
	p := strings.Split(v, ":")
	if len(p) < 2 || p[0] == "" || p[1] == "" || len(p) > 5 {
		return admin.DeviceAttr{}, errors.New("want NAME:DATA_TYPE[:VALUE_TYPE[:UNIT[:HEALTH]]], e.g. temperature:float:temperature:°C:refresh_rate=1200")
	}
	if err := centralsync.ValidateName("attribute name", p[0]); err != nil {
		return admin.DeviceAttr{}, err
	}
	at := admin.DeviceAttr{Name: p[0], DataType: p[1], ValueType: p[0], Unit: "-", Healthiness: centralsync.HealthRefreshRate}
	if len(p) > 2 && p[2] != "" {
		at.ValueType = p[2]
	}
	if len(p) > 3 && p[3] != "" {
		at.Unit = p[3]
	}
	if len(p) > 4 && p[4] != "" {
		crit, val, _ := strings.Cut(p[4], "=")
		switch crit {
		case centralsync.HealthRefreshRate:
			if val != "" {
				if n, err := strconv.Atoi(val); err != nil || n <= 0 {
					return admin.DeviceAttr{}, fmt.Errorf("attribute %s: refresh_rate=%q: want seconds > 0", p[0], val)
				}
			}
		case centralsync.HealthDifferentValues, centralsync.HealthWithinBounds:
		default:
			return admin.DeviceAttr{}, fmt.Errorf("attribute %s: healthiness %q: want refresh_rate[=SECONDS], different_values or within_bounds", p[0], crit)
		}
		at.Healthiness, at.HealthinessValue = crit, val
	}
	return at, nil
}

// withDefaults fills the refresh_rate of attributes that gave none: twice
// the expected interval between readings.
func withDefaults(attrs []admin.DeviceAttr, freq int) []admin.DeviceAttr {
	out := make([]admin.DeviceAttr, len(attrs))
	for i, a := range attrs {
		if a.Healthiness == centralsync.HealthRefreshRate && a.HealthinessValue == "" {
			a.HealthinessValue = strconv.Itoa(2 * freq)
		}
		out[i] = a
	}
	return out
}

type stringsFlag []string

func (s *stringsFlag) String() string     { return strings.Join(*s, ",") }
func (s *stringsFlag) Set(v string) error { *s = append(*s, v); return nil }

// bindingFlags are the shared --radio-port/--radio-node/--radio-child/--mqtt.
type bindingFlags struct {
	port        *string
	node, child *int
	mqtt        *bool
}

func addBindingFlags(fs *flag.FlagSet) bindingFlags {
	return bindingFlags{
		port:  fs.String("radio-port", "", "bind to this radio port (serial device path)"),
		node:  fs.Int("radio-node", -1, "MySensors node id on the radio port (-1: any)"),
		child: fs.Int("radio-child", -1, "MySensors child sensor (-1: any)"),
		mqtt:  fs.Bool("mqtt", false, "bind to the local MQTT link (the default without --radio-port)"),
	}
}

// get checks the flags; set says whether any was given.
func (b bindingFlags) get(cmd string) (bind admin.DeviceBinding, set bool, err error) {
	if *b.port != "" && *b.mqtt {
		return bind, false, fmt.Errorf("device %s: --radio-port and --mqtt exclude each other", cmd)
	}
	if *b.port == "" && (*b.node != -1 || *b.child != -1) {
		return bind, false, fmt.Errorf("device %s: --radio-node and --radio-child need --radio-port", cmd)
	}
	if *b.node < -1 || *b.node > 254 || *b.child < -1 || *b.child > 254 {
		return bind, false, fmt.Errorf("device %s: --radio-node and --radio-child must be in 0..254", cmd)
	}
	bind = admin.DeviceBinding{RadioPort: *b.port, RadioNode: *b.node, RadioChild: *b.child, MQTT: *b.port == ""}
	return bind, *b.port != "" || *b.mqtt, nil
}

func usageErr(err error) error { return &exitError{Code: 2, Err: err} }

func deviceWith(ctx context.Context, env pairEnv, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, deviceUsage)
		return usageErr(errors.New("device: add, list, update, remove, bind or rotate-key"))
	}
	sub, rest := args[0], args[1:]
	fs := flag.NewFlagSet("device "+sub, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, deviceUsage); fs.PrintDefaults() }
	cfgPath := fs.String("config", "/etc/edgegate/edgegate.yaml", "configuration file")
	socket := fs.String("socket", "", "the daemon's admin socket (default: from the configuration)")
	var broker *string
	if sub == "add" {
		broker = fs.String("broker", "orion-1", "context broker name at the IoT directory")
	} else {
		broker = fs.String("broker", "", "context broker name at the IoT directory (default: the registry's)")
	}
	var (
		typ, model, producer, kind, format, keysOut *string
		signing, pubKeyFile, rotAlg, k1File         *string
		lat, lon                                    *float64
		freq                                        *int
		bind                                        bindingFlags
		attrs, addAttrs                             attrFlag
		removeAttrs, bindAttrs, writable            stringsFlag
	)
	switch sub {
	case "add":
		typ = fs.String("type", "", "device (entity) type, required")
		model = fs.String("model", "custom", "device model")
		producer = fs.String("producer", "edgegate", "producer")
		kind = fs.String("kind", "sensor", "sensor or actuator")
		format = fs.String("format", "json", "payload format")
		lat = fs.Float64("latitude", 0, "latitude")
		lon = fs.Float64("longitude", 0, "longitude")
		freq = fs.Int("frequency", 600, "expected seconds between readings")
		bind = addBindingFlags(fs)
		keysOut = fs.String("keys-out", "", "write the device's K1/K2 to this file (mode 0600)")
		fs.Var(&attrs, "attr", "attribute NAME:DATA_TYPE[:VALUE_TYPE[:UNIT[:HEALTH]]] (repeatable; default value:float)")
		signing = fs.String("signing", "hs256", "who signs readings: hs256, ed25519, es256 (gateway-held keys) or device")
		pubKeyFile = fs.String("public-key", "", "with --signing device: the device's public key (JWK or PEM)")
	case "update":
		typ = fs.String("type", "", "new device (entity) type")
		lat = fs.Float64("latitude", 0, "new latitude")
		lon = fs.Float64("longitude", 0, "new longitude")
		freq = fs.Int("frequency", 0, "new expected seconds between readings")
		bind = addBindingFlags(fs)
		fs.Var(&addAttrs, "add-attr", "add an attribute NAME:DATA_TYPE[:VALUE_TYPE[:UNIT[:HEALTH]]] (repeatable)")
		fs.Var(&removeAttrs, "remove-attr", "remove the attribute NAME (repeatable)")
	case "bind":
		typ = fs.String("type", "", "device (entity) type, required")
		bind = addBindingFlags(fs)
		k1File = fs.String("k1-file", "", `file with the device's "k1: ..." and "k2: ..." (a delegated device)`)
		signing = fs.String("signing", "hs256", "who signs readings: hs256 or device")
		pubKeyFile = fs.String("public-key", "", "with --signing device: the device's public key (JWK or PEM)")
		fs.Var(&bindAttrs, "attr", "attribute name of the device's model (repeatable)")
		kind = fs.String("kind", "", "sensor or actuator (commands go to actuators, docs/actuators.md)")
		fs.Var(&writable, "writable", "attribute the platform may set, registered editable (repeatable)")
	case "rotate-key":
		rotAlg = fs.String("alg", "", "gateway-held key: ed25519 or es256 (default: the current key's)")
		pubKeyFile = fs.String("public-key", "", "device-signed device: its new public key (JWK or PEM)")
		keysOut = fs.String("keys-out", "", "device-signed device without --public-key: write the new private key here (0600)")
	case "list", "remove":
	default:
		fmt.Fprint(stderr, deviceUsage)
		return usageErr(fmt.Errorf("device: unknown command %q (add, list, update, remove, bind, rotate-key)", sub))
	}
	if err := fs.Parse(rest); err != nil {
		return err
	}
	var id string
	switch {
	case sub == "list" && fs.NArg() == 0:
	case sub != "list" && fs.NArg() == 1:
		id = fs.Arg(0)
		if err := centralsync.ValidateDeviceID(id); err != nil {
			return usageErr(fmt.Errorf("device %s: %w", sub, err))
		}
	default:
		fs.Usage()
		return usageErr(fmt.Errorf("device %s: wrong arguments", sub))
	}
	given := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { given[f.Name] = true })

	// Build the request first: a mistake is reported before anything is
	// opened or asked.
	var (
		op      func(context.Context, admin.DeviceBackend) (admin.DeviceResult, error)
		cleanup func() // undo local side effects when the registration fails
	)
	switch sub {
	case "add":
		req, undo, err := addRequest(env, id, *typ, *broker, *kind, *format, *model, *producer, *lat, *lon, *freq, attrs, bind, *signing, *pubKeyFile, *keysOut)
		if err != nil {
			return err
		}
		cleanup = undo
		op = func(ctx context.Context, b admin.DeviceBackend) (admin.DeviceResult, error) {
			return b.AddDevice(ctx, req)
		}
	case "update":
		req := admin.DeviceUpdateRequest{ID: id, Broker: *broker, RemoveAttributes: removeAttrs}
		if given["type"] {
			req.Type = typ
		}
		if given["latitude"] {
			req.Latitude = lat
		}
		if given["longitude"] {
			req.Longitude = lon
		}
		if given["frequency"] {
			req.Frequency = freq
		}
		b, set, err := bind.get(sub)
		if err != nil {
			return usageErr(err)
		}
		if set {
			req.Binding = &b
		}
		f := 600
		if req.Frequency != nil {
			f = *req.Frequency
		}
		req.AddAttributes = withDefaults(addAttrs, f)
		op = func(ctx context.Context, b admin.DeviceBackend) (admin.DeviceResult, error) {
			return b.UpdateDevice(ctx, req)
		}
	case "bind":
		if *typ == "" {
			return usageErr(errors.New("device bind: --type is required"))
		}
		b, _, err := bind.get(sub)
		if err != nil {
			return usageErr(err)
		}
		req := admin.DeviceBindRequest{ID: id, Type: *typ, Broker: *broker, Binding: b, Attributes: bindAttrs,
			Kind: *kind, Writable: writable}
		switch *signing {
		case "hs256":
			if *pubKeyFile != "" {
				return usageErr(errors.New("device bind: --public-key goes with --signing device"))
			}
		case "device":
			if *pubKeyFile == "" {
				return usageErr(errors.New("device bind: --signing device needs --public-key FILE"))
			}
			k, _, err := devicePublicKey(*pubKeyFile)
			if err != nil {
				return usageErr(fmt.Errorf("device bind: %w", err))
			}
			pub, err := k.PublicJWK()
			if err != nil {
				return err
			}
			req.Signing, req.PublicKey = policy.SigningDevice, string(pub)
		default:
			return usageErr(fmt.Errorf("device bind: --signing %q: want hs256 or device", *signing))
		}
		if *k1File != "" {
			if req.K1, req.K2, err = readKeysFile(*k1File); err != nil {
				return usageErr(fmt.Errorf("device bind: --k1-file: %w", err))
			}
		}
		op = func(ctx context.Context, b admin.DeviceBackend) (admin.DeviceResult, error) {
			return b.BindDevice(ctx, req)
		}
	case "remove":
		op = func(ctx context.Context, b admin.DeviceBackend) (admin.DeviceResult, error) {
			return b.RemoveDevice(ctx, id, *broker)
		}
	}

	sf, ca, adminSocket, err := loadDeviceSettings(*cfgPath)
	if err != nil {
		return usageErr(err)
	}
	sockets := daemon.AdminSocketCandidates(adminSocket, sf.stateDir)
	if *socket != "" {
		sockets = []string{*socket}
	}
	if sub != "rotate-key" {
		// The running daemon first: it holds the store.
		answered, err := throughDaemon(sockets, func(c *admin.Client) error {
			return runDeviceOp(ctx, sub, deviceClient{c}, op, stdout)
		})
		if answered {
			if err != nil && cleanup != nil {
				cleanup()
			}
			return err
		}
	}

	q, err := openStore(env, sf)
	if err != nil {
		if cleanup != nil {
			cleanup()
		}
		if errors.Is(err, errStoreLocked) && sub != "rotate-key" {
			// The daemon runs, but none of the sockets answered.
			return fmt.Errorf("device %s: the store is in use by the running daemon, and its admin socket did not answer (%s): give --socket PATH (admin.socket)",
				sub, strings.Join(sockets, ", "))
		}
		return fmt.Errorf("device %s: %w", sub, err)
	}
	defer q.Close()
	da, err := directDeviceAdmin(q, ca, sub == "list" || sub == "bind")
	if err != nil {
		if cleanup != nil {
			cleanup()
		}
		return fmt.Errorf("device %s: %w", sub, err)
	}
	if sub == "rotate-key" {
		if da.Directory == nil {
			return fmt.Errorf("device rotate-key: %w", admin.ErrNotPaired)
		}
		return rotateKey(ctx, q, da.Directory, id, *broker, da.Registry, *rotAlg, *pubKeyFile, *keysOut, stdout)
	}
	err = runDeviceOp(ctx, sub, da, op, stdout)
	if err != nil && cleanup != nil {
		cleanup()
	}
	return err
}

// throughDaemon runs op with a client of the first of sockets whose daemon
// answers; answered is false when none does (no socket file, or a stale
// one nobody listens on).
func throughDaemon(sockets []string, op func(*admin.Client) error) (answered bool, err error) {
	for _, s := range sockets {
		if fi, err := os.Stat(s); err != nil || fi.Mode()&os.ModeSocket == 0 {
			continue
		}
		c := admin.NewClient(s)
		err := op(c)
		c.CloseIdle()
		if errors.Is(err, admin.ErrUnavailable) {
			continue
		}
		return true, err
	}
	return false, nil
}

// deviceClient adapts the admin client to DeviceBackend: the same calls as
// DeviceAdmin in-process (the daemon not running), through the socket.
type deviceClient struct{ c *admin.Client }

func (d deviceClient) AddDevice(ctx context.Context, r admin.DeviceAddRequest) (admin.DeviceResult, error) {
	return d.c.AddDevice(ctx, r)
}
func (d deviceClient) UpdateDevice(ctx context.Context, r admin.DeviceUpdateRequest) (admin.DeviceResult, error) {
	return d.c.UpdateDevice(ctx, r)
}
func (d deviceClient) RemoveDevice(ctx context.Context, id, broker string) (admin.DeviceResult, error) {
	return d.c.RemoveDevice(ctx, id, broker)
}
func (d deviceClient) BindDevice(ctx context.Context, r admin.DeviceBindRequest) (admin.DeviceResult, error) {
	return d.c.BindDevice(ctx, r)
}
func (d deviceClient) ListDevices(ctx context.Context) (admin.DeviceList, error) {
	return d.c.ListDevices(ctx)
}

func runDeviceOp(ctx context.Context, sub string, db admin.DeviceBackend, op func(context.Context, admin.DeviceBackend) (admin.DeviceResult, error), stdout io.Writer) error {
	if sub == "list" {
		l, err := db.ListDevices(ctx)
		if err != nil {
			return fmt.Errorf("device list: %w", err)
		}
		return admin.WriteDeviceList(stdout, l)
	}
	res, err := op(ctx, db)
	if err != nil {
		return fmt.Errorf("device %s: %w", sub, err)
	}
	admin.WriteDeviceResult(stdout, res)
	return nil
}

// directDeviceAdmin is DeviceAdmin over the opened store, with the paired
// account's token; unpaired is an error unless optional (list, bind).
func directDeviceAdmin(q *queue.Queue, caFile string, optional bool) (*daemon.DeviceAdmin, error) {
	gwID, err := keys.LoadIdentity(q)
	if err != nil {
		return nil, err
	}
	da := &daemon.DeviceAdmin{Store: q, Registry: centralsync.NewRegistry(q)}
	cred, err := centralsync.LoadCredentials(q)
	if err != nil {
		if optional && errors.Is(err, centralsync.ErrNotPaired) {
			return da, nil
		}
		return nil, err
	}
	hc, err := centralHTTP(caFile)
	if err != nil {
		return nil, err
	}
	ts, err := centralsync.NewPairedTokenSource(centralsync.PairedOptions{Store: q, Identity: gwID, HTTPClient: hc})
	if err != nil {
		return nil, err
	}
	da.Directory = centralsync.NewDirectory(cred.CentralURL, hc, ts.Token)
	da.Gateway, da.User = cred.Gateway, cred.User
	return da, nil
}

// addRequest builds an add: K1/K2 generated here (or from the
// environment), the signing keys made here, --keys-out written before the
// registration (undo removes it again when the registration fails).
func addRequest(env pairEnv, id, typ, broker, kind, format, model, producer string, lat, lon float64, freq int,
	attrs attrFlag, bind bindingFlags, signing, pubKeyFile, keysOut string) (admin.DeviceAddRequest, func(), error) {
	var req admin.DeviceAddRequest
	if typ == "" {
		return req, nil, usageErr(errors.New("device add: --type is required"))
	}
	b, _, err := bind.get("add")
	if err != nil {
		return req, nil, usageErr(err)
	}
	if freq <= 0 {
		return req, nil, usageErr(errors.New("device add: --frequency must be > 0 seconds"))
	}
	if len(attrs) == 0 {
		_ = attrs.Set("value:float")
	}
	k1, k2 := env.getenv("EDGEGATE_K1"), env.getenv("EDGEGATE_K2")
	if (k1 == "") != (k2 == "") {
		return req, nil, usageErr(errors.New("device add: set both EDGEGATE_K1 and EDGEGATE_K2, or neither"))
	}
	for k1 == "" || k1 == k2 {
		if k1, err = centralsync.NewDeviceKey(); err != nil {
			return req, nil, err
		}
		if k2, err = centralsync.NewDeviceKey(); err != nil {
			return req, nil, err
		}
	}
	switch signing {
	case "hs256", "ed25519", "es256", "device":
	default:
		return req, nil, usageErr(fmt.Errorf("device add: --signing %q: want hs256, ed25519, es256 or device", signing))
	}
	if pubKeyFile != "" && signing != "device" {
		return req, nil, usageErr(errors.New("device add: --public-key goes with --signing device"))
	}
	if signing == "device" && pubKeyFile == "" && keysOut == "" {
		return req, nil, usageErr(errors.New("device add: --signing device needs --public-key FILE, or --keys-out FILE to receive a new key"))
	}
	req = admin.DeviceAddRequest{ID: id, Type: typ, Broker: broker, Kind: kind, Format: format, Model: model, Producer: producer,
		Latitude: lat, Longitude: lon, Frequency: freq, Attributes: withDefaults(attrs, freq), Binding: b, K1: k1, K2: k2}
	// The same checks the directory makes, before anything is written.
	if err := validateAdd(req); err != nil {
		return req, nil, usageErr(fmt.Errorf("device add: %w", err))
	}
	sk, err := deviceSigningKey(signing, pubKeyFile)
	if err != nil {
		return req, nil, usageErr(fmt.Errorf("device add: %w", err))
	}
	req.Signing = sk.mode
	switch sk.mode {
	case policy.SigningGateway:
		priv, err := sk.key.PrivateJWK()
		if err != nil {
			return req, nil, err
		}
		req.SigningKey = string(priv)
	case policy.SigningDevice:
		req.PublicKey = sk.publicJWK
	}
	var undo func()
	if keysOut != "" {
		// Before the insert: a device registered with keys nobody kept
		// would have to be removed again.
		data := fmt.Sprintf("# keys of device %s (K1/K2 of the IoT directory)\nk1: %s\nk2: %s\n", id, k1, k2)
		if sk.devicePrivate != "" {
			data += fmt.Sprintf("# the device's private signing key (JWK, kid %s): provision it, then delete this file\nprivate_key: '%s'\n", sk.key.ID(), sk.devicePrivate)
		}
		if err := writeFileAtomic(keysOut, []byte(data), 0o600); err != nil {
			return req, nil, fmt.Errorf("device add: --keys-out: %w", err)
		}
		undo = func() { os.Remove(keysOut) }
	}
	return req, undo, nil
}

func validateAdd(r admin.DeviceAddRequest) error {
	spec := centralsync.DeviceSpec{ID: r.ID, Type: r.Type, ContextBroker: r.Broker, Kind: r.Kind, Format: r.Format,
		Model: r.Model, Producer: r.Producer, Latitude: r.Latitude, Longitude: r.Longitude, Frequency: r.Frequency,
		K1: r.K1, K2: r.K2}
	for _, a := range r.Attributes {
		spec.Attributes = append(spec.Attributes, centralsync.DeviceAttr{Name: a.Name, DataType: a.DataType, Type: a.ValueType,
			Unit: a.Unit, HealthinessCriteria: a.Healthiness, HealthinessValue: a.HealthinessValue})
	}
	return spec.Validate()
}

// readKeysFile reads "k1: ..." and "k2: ..." (the --keys-out format).
func readKeysFile(path string) (k1, k2 string, err error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", "", err
	}
	if len(b) > 64<<10 {
		return "", "", fmt.Errorf("%s: too large", path)
	}
	var v struct {
		K1 string `yaml:"k1"`
		K2 string `yaml:"k2"`
	}
	if err := yaml.Unmarshal(b, &v); err != nil {
		// yaml's message may quote the content: say where, not what.
		return "", "", fmt.Errorf("%s: not a keys file (k1: ..., k2: ...)", path)
	}
	if v.K1 == "" || v.K2 == "" || v.K1 == v.K2 {
		return "", "", fmt.Errorf("%s: needs k1 and k2, different", path)
	}
	return v.K1, v.K2, nil
}

// loadDeviceSettings is loadPairedSettings plus admin.socket.
func loadDeviceSettings(path string) (storeFlags, string, string, error) {
	sf, ca, err := loadPairedSettings(path)
	if err != nil {
		return sf, "", "", err
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return sf, "", "", fmt.Errorf("read config: %w", err)
	}
	var s struct {
		Admin struct {
			Socket string `yaml:"socket"`
		} `yaml:"admin"`
	}
	_ = yaml.Unmarshal(b, &s) // loadPairedSettings has reported a bad file
	sock := s.Admin.Socket
	if sock != "" && !filepath.IsAbs(sock) {
		sock = filepath.Join(filepath.Dir(path), sock)
	}
	return sf, ca, sock, nil
}
