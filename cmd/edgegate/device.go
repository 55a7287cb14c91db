package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"

	"github.com/edgegate/edgegate/devkey"
	"github.com/edgegate/edgegate/envelope"
	"github.com/edgegate/edgegate/identity"
	"github.com/edgegate/edgegate/policy"
	centralsync "github.com/edgegate/edgegate/sync"
)

const deviceUsage = `usage: edgegate device add|list|remove|rotate-key [flags]

  device add --config FILE --type TYPE [flags] ID
             [--radio-port P --radio-node N [--radio-child C] | --mqtt]
             [--signing hs256|ed25519|es256|device [--public-key FILE]]
  device list --config FILE
  device remove --config FILE ID
  device rotate-key --config FILE [--alg ed25519|es256 | --public-key FILE] ID

Registers devices in the central IoT directory for the paired account.
K1/K2 are generated (random UUIDs) unless given through EDGEGATE_K1 and
EDGEGATE_K2; they are never printed (--keys-out FILE writes them, 0600,
for provisioning the device).

--signing says who signs the device's readings:
  hs256    the gateway, HS256 with a key derived from K1/K2 (the default:
           what the platform's verifiers know; anyone with K1/K2 can forge)
  ed25519  the gateway, with an Ed25519 key it generates now and keeps in
  es256    its encrypted store (ES256: ECDSA P-256); the public key is
           registered (publickey); verifiers need no secret
  device   the device signs each reading itself (a compact JWS payload);
           its public key comes from --public-key (JWK or PEM), or a new
           Ed25519 key is generated and its private JWK written to
           --keys-out for provisioning the device
rotate-key registers a new key (the old ones stay, for older readings): a
new gateway-held key, or the device's new public key (--public-key).
`

func runDevice(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	return deviceWith(ctx, defaultPairEnv(), args, stdout, stderr)
}

// attrFlag collects --attr name:data_type[:value_type[:unit]].
type attrFlag []centralsync.DeviceAttr

func (a *attrFlag) String() string { return fmt.Sprint(len(*a)) }
func (a *attrFlag) Set(v string) error {
	p := strings.Split(v, ":")
	if len(p) < 2 || p[0] == "" || p[1] == "" || len(p) > 4 {
		return errors.New("want name:data_type[:value_type[:unit]], e.g. temperature:float:temperature:°C")
	}
	at := centralsync.DeviceAttr{Name: p[0], DataType: p[1], Type: p[0], Editable: "0",
		HealthinessCriteria: "refresh_rate", HealthinessValue: "300"}
	if len(p) > 2 {
		at.Type = p[2]
	}
	if len(p) > 3 {
		at.Unit = p[3]
	}
	*a = append(*a, at)
	return nil
}

func deviceWith(ctx context.Context, env pairEnv, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, deviceUsage)
		return &exitError{code: 2, err: errors.New("device: add, list or remove")}
	}
	sub, rest := args[0], args[1:]
	fs := flag.NewFlagSet("device "+sub, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, deviceUsage); fs.PrintDefaults() }
	cfgPath := fs.String("config", "/etc/edgegate/edgegate.yaml", "configuration file")
	broker := fs.String("broker", "orion-1", "context broker name at the IoT directory")
	var (
		typ, model, producer, kind, format, radioPort, keysOut *string
		signing, pubKeyFile, rotAlg                            *string
		lat, lon                                               *float64
		freq, node, child                                      *int
		useMQTT                                                *bool
		attrs                                                  attrFlag
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
		radioPort = fs.String("radio-port", "", "bind to this radio port (serial device path)")
		node = fs.Int("radio-node", -1, "MySensors node id on the radio port (-1: any)")
		child = fs.Int("radio-child", -1, "MySensors child sensor (-1: any)")
		useMQTT = fs.Bool("mqtt", false, "bind to the local MQTT link (the default without --radio-port)")
		keysOut = fs.String("keys-out", "", "write the device's K1/K2 to this file (mode 0600)")
		fs.Var(&attrs, "attr", "attribute name:data_type[:value_type[:unit]] (repeatable; default value:float)")
		signing = fs.String("signing", "hs256", "who signs readings: hs256, ed25519, es256 (gateway-held keys) or device")
		pubKeyFile = fs.String("public-key", "", "with --signing device: the device's public key (JWK or PEM)")
	case "rotate-key":
		rotAlg = fs.String("alg", "", "gateway-held key: ed25519 or es256 (default: the current key's)")
		pubKeyFile = fs.String("public-key", "", "device-signed device: its new public key (JWK or PEM)")
		keysOut = fs.String("keys-out", "", "device-signed device without --public-key: write the new private key here (0600)")
	case "list", "remove":
	default:
		fmt.Fprint(stderr, deviceUsage)
		return &exitError{code: 2, err: fmt.Errorf("device: unknown command %q (add, list, remove, rotate-key)", sub)}
	}
	if err := fs.Parse(rest); err != nil {
		return err
	}
	var id string
	switch {
	case sub == "list" && fs.NArg() == 0:
	case sub != "list" && fs.NArg() == 1:
		id = fs.Arg(0)
	default:
		fs.Usage()
		return &exitError{code: 2, err: fmt.Errorf("device %s: wrong arguments", sub)}
	}
	var spec centralsync.DeviceSpec
	if sub == "add" {
		if *typ == "" {
			return &exitError{code: 2, err: errors.New("device add: --type is required")}
		}
		if *radioPort != "" && *useMQTT {
			return &exitError{code: 2, err: errors.New("device add: --radio-port and --mqtt exclude each other")}
		}
		if *radioPort == "" && (*node != -1 || *child != -1) {
			return &exitError{code: 2, err: errors.New("device add: --radio-node and --radio-child need --radio-port")}
		}
		if *node < -1 || *node > 254 || *child < -1 || *child > 254 {
			return &exitError{code: 2, err: errors.New("device add: --radio-node and --radio-child must be in 0..254")}
		}
		if len(attrs) == 0 {
			_ = attrs.Set("value:float")
		}
		k1, k2 := env.getenv("EDGEGATE_K1"), env.getenv("EDGEGATE_K2")
		if (k1 == "") != (k2 == "") {
			return &exitError{code: 2, err: errors.New("device add: set both EDGEGATE_K1 and EDGEGATE_K2, or neither")}
		}
		var err error
		for k1 == "" || k1 == k2 {
			if k1, err = centralsync.NewDeviceKey(); err != nil {
				return err
			}
			if k2, err = centralsync.NewDeviceKey(); err != nil {
				return err
			}
		}
		spec = centralsync.DeviceSpec{ID: id, Type: *typ, ContextBroker: *broker, Kind: *kind, Format: *format,
			Model: *model, Producer: *producer, Latitude: *lat, Longitude: *lon, Frequency: *freq,
			K1: k1, K2: k2, Attributes: attrs, RadioPort: *radioPort, RadioNode: *node, RadioChild: *child}
		switch *signing {
		case "hs256", "ed25519", "es256", "device":
		default:
			return &exitError{code: 2, err: fmt.Errorf("device add: --signing %q: want hs256, ed25519, es256 or device", *signing)}
		}
		if *pubKeyFile != "" && *signing != "device" {
			return &exitError{code: 2, err: errors.New("device add: --public-key goes with --signing device")}
		}
		if *signing == "device" && *pubKeyFile == "" && *keysOut == "" {
			return &exitError{code: 2, err: errors.New("device add: --signing device needs --public-key FILE, or --keys-out FILE to receive a new key")}
		}
	}

	sf, ca, err := loadPairedSettings(*cfgPath)
	if err != nil {
		return &exitError{code: 2, err: err}
	}
	q, err := openStore(env, sf)
	if err != nil {
		return fmt.Errorf("device %s: %w", sub, err)
	}
	defer q.Close()
	cred, err := centralsync.LoadCredentials(q)
	if err != nil {
		return fmt.Errorf("device %s: %w", sub, err)
	}
	gwID, err := identity.Load(q)
	if err != nil {
		return err
	}
	hc, err := centralHTTP(ca)
	if err != nil {
		return err
	}
	ts, err := centralsync.NewPairedTokenSource(centralsync.PairedOptions{Store: q, Identity: gwID, HTTPClient: hc})
	if err != nil {
		return fmt.Errorf("device %s: %w", sub, err)
	}
	dir := &centralsync.Directory{URL: centralsync.DirectoryURL(cred.CentralURL), HTTPClient: hc, Token: ts.Token}

	switch sub {
	case "add":
		spec.Gateway = cred.Gateway
		sk, err := deviceSigningKey(*signing, *pubKeyFile)
		if err != nil {
			return &exitError{code: 2, err: fmt.Errorf("device add: %w", err)}
		}
		spec.Signing, spec.PublicKey = sk.mode, sk.publicJWK
		if *keysOut != "" {
			// Before the insert: a device registered with keys nobody kept
			// would have to be removed again.
			data := fmt.Sprintf("# keys of device %s (K1/K2 of the IoT directory)\nk1: %s\nk2: %s\n", id, spec.K1, spec.K2)
			if sk.devicePrivate != "" {
				data += fmt.Sprintf("# the device's private signing key (JWK, kid %s): provision it, then delete this file\nprivate_key: '%s'\n", sk.key.ID(), sk.devicePrivate)
			}
			if err := writeFileAtomic(*keysOut, []byte(data), 0o600); err != nil {
				return fmt.Errorf("device add: --keys-out: %w", err)
			}
		}
		if sk.mode == policy.SigningGateway {
			// The private key is in the store before the public one is
			// registered: a registered key nobody holds cannot sign.
			if err := devkey.Put(q, id, []envelope.Key{sk.key}); err != nil {
				return fmt.Errorf("device add: store the device key: %w", err)
			}
		}
		nudged, err := dir.Insert(ctx, spec)
		if err != nil {
			if *keysOut != "" {
				os.Remove(*keysOut)
			}
			if sk.mode == policy.SigningGateway {
				_ = devkey.Delete(q, id)
			}
			return fmt.Errorf("device add: %w", err)
		}
		bind := "the local MQTT link (topic devices/" + id + "/telemetry)"
		if spec.RadioPort != "" {
			bind = fmt.Sprintf("radio port %s, node %s, child %s", spec.RadioPort, anyInt(spec.RadioNode), anyInt(spec.RadioChild))
		}
		fmt.Fprintf(stdout, "Registered device %s (type %s) at %s for %s.\n  bound to     %s on gateway %s\n  keys         K1/K2 generated or taken from the environment; not shown",
			id, spec.Type, *broker, cred.User, bind, cred.Gateway)
		if *keysOut != "" {
			fmt.Fprintf(stdout, " (written to %s)", *keysOut)
		}
		fmt.Fprintf(stdout, "\n  signing      %s", sk.describe())
		if nudged {
			fmt.Fprintf(stdout, "\n  policy       the gateway was told to sync now; the device is in its next policy bundle\n")
		} else {
			fmt.Fprintf(stdout, "\n  policy       the device is in the gateway's next policy bundle (at the next poll)\n")
		}
	case "remove":
		if err := dir.Delete(ctx, id, *broker); err != nil {
			return fmt.Errorf("device remove: %w", err)
		}
		if err := devkey.Delete(q, id); err != nil {
			return fmt.Errorf("device remove: forget the device key: %w", err)
		}
		fmt.Fprintf(stdout, "Removed device %s; the gateway stops accepting it with its next policy bundle.\n", id)
	case "rotate-key":
		return rotateKey(ctx, q, dir, id, *broker, *rotAlg, *pubKeyFile, *keysOut, stdout)
	case "list":
		devs, err := dir.List(ctx)
		if err != nil {
			return fmt.Errorf("device list: %w", err)
		}
		tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "ID\tTYPE\tBROKER\tSOURCE")
		for _, d := range devs {
			src := "-"
			if d.EdgegatewayURI != "" {
				src = d.EdgegatewayURI
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", d.ID, d.Type, d.ContextBroker, src)
		}
		tw.Flush()
	}
	return nil
}

func anyInt(n int) string {
	if n < 0 {
		return "any"
	}
	return fmt.Sprint(n)
}
