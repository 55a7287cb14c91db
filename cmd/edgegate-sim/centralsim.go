package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"github.com/edgegate/edgegate/internal/atomicfile"
	"io"
	"os"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/edgegate/edgegate/internal/pki"
	"github.com/edgegate/edgegate/internal/sim/centralsim"
	"github.com/edgegate/edgegate/policy"
)

// centralSimConfig is the YAML file of `edgegate-sim central-sim --config`.
// Unknown keys are errors. It holds client secrets and K1/K2: keep it 0600.
type centralSimConfig struct {
	Realm         string                 `yaml:"realm"`
	Audience      string                 `yaml:"audience"`
	SignatureAttr string                 `yaml:"signature_attr"`
	CheckKeys     bool                   `yaml:"check_keys"`
	TokenTTL      time.Duration          `yaml:"token_ttl"`
	RefreshTTL    time.Duration          `yaml:"refresh_ttl"`
	Clients       []centralSimClient     `yaml:"clients"`
	Devices       []centralSimDevice     `yaml:"devices"`
	Delegations   []centralSimDelegation `yaml:"delegations"`
	// Policy sync.
	BrokerName       string            `yaml:"broker_name"`
	Organization     string            `yaml:"organization"`
	PolicyTTL        time.Duration     `yaml:"policy_ttl"`
	PolicyKeyAlg     string            `yaml:"policy_key_alg"`
	BundleAllDevices bool              `yaml:"bundle_all_devices"`
	Gateways         map[string]string `yaml:"gateways"` // client id -> gateway id
	// Platform.
	Users     []centralSimUser  `yaml:"users"`
	Limits    []centralSimLimit `yaml:"limits"` // replaces the stock limits table
	Companion bool              `yaml:"companion"`
}

type centralSimUser struct {
	Username     string   `yaml:"username"`
	Password     string   `yaml:"password"`
	Role         string   `yaml:"role"`
	Groups       []string `yaml:"groups"`
	Organization string   `yaml:"organization"`
}

type centralSimLimit struct {
	Organization string `yaml:"organization"`
	Username     string `yaml:"username"`
	Role         string `yaml:"role"`
	ElementType  string `yaml:"element_type"`
	MaxCount     int    `yaml:"max_count"`
}

type centralSimClient struct {
	ID       string `yaml:"id"`
	Secret   string `yaml:"secret"`
	Username string `yaml:"username"`
	Offline  bool   `yaml:"offline"`
}

type centralSimDevice struct {
	ID    string   `yaml:"id"`
	Type  string   `yaml:"type"`
	Owner string   `yaml:"owner"`
	K1    string   `yaml:"k1"`
	K2    string   `yaml:"k2"`
	Attrs []string `yaml:"attrs"`
	Radio *struct {
		Port  string `yaml:"port"`
		Node  int    `yaml:"node"`
		Child int    `yaml:"child"`
	} `yaml:"radio"`
}

type centralSimDelegation struct {
	Device    string `yaml:"device"` // a device id or an element id
	User      string `yaml:"user"`   // or ANONYMOUS
	Group     string `yaml:"group"`
	Kind      string `yaml:"kind"`
	Delegator string `yaml:"delegator"`
}

// parseCentralSimConfig decodes a config strictly (unknown keys name
// themselves in the error) into server options.
func parseCentralSimConfig(data []byte) (centralsim.Options, error) {
	var c centralSimConfig
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&c); err != nil && !errors.Is(err, io.EOF) {
		return centralsim.Options{}, err
	}
	var extra any
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		return centralsim.Options{}, errors.New("more than one YAML document")
	}
	if c.TokenTTL < 0 {
		return centralsim.Options{}, fmt.Errorf("token_ttl must be positive: %v", c.TokenTTL)
	}
	if c.RefreshTTL < 0 {
		return centralsim.Options{}, fmt.Errorf("refresh_ttl must be positive: %v", c.RefreshTTL)
	}
	if c.PolicyTTL < 0 {
		return centralsim.Options{}, fmt.Errorf("policy_ttl must be positive: %v", c.PolicyTTL)
	}
	o := centralsim.Options{
		Realm: c.Realm, Audience: c.Audience, SignatureAttr: c.SignatureAttr,
		CheckKeys: c.CheckKeys, TokenTTL: c.TokenTTL, RefreshTTL: c.RefreshTTL,
		BrokerName: c.BrokerName, Organization: c.Organization, PolicyTTL: c.PolicyTTL,
		PolicyKeyAlg: c.PolicyKeyAlg, BundleAllDevices: c.BundleAllDevices, Gateways: c.Gateways,
		Companion: c.Companion,
	}
	for _, x := range c.Users {
		o.Users = append(o.Users, centralsim.User{Username: x.Username, Password: x.Password, Role: x.Role,
			Groups: x.Groups, Organization: x.Organization})
	}
	for _, x := range c.Limits {
		o.Limits = append(o.Limits, centralsim.Limit{Organization: x.Organization, Username: x.Username, Role: x.Role,
			ElementType: x.ElementType, MaxCount: x.MaxCount})
	}
	for _, x := range c.Clients {
		o.Clients = append(o.Clients, centralsim.Client{ID: x.ID, Secret: x.Secret, Username: x.Username, Offline: x.Offline})
	}
	for _, x := range c.Devices {
		d := centralsim.Device{ID: x.ID, Type: x.Type, Owner: x.Owner, K1: x.K1, K2: x.K2, Attrs: x.Attrs}
		if x.Radio != nil {
			d.Radio = &policy.RadioBinding{Port: x.Radio.Port, Node: x.Radio.Node, Child: x.Radio.Child}
		}
		o.Devices = append(o.Devices, d)
	}
	for _, x := range c.Delegations {
		o.Delegations = append(o.Delegations, centralsim.Delegation{Device: x.Device, User: x.User, Group: x.Group,
			Kind: x.Kind, Delegator: x.Delegator})
	}
	return o, nil
}

// runCentralSim is `edgegate-sim central-sim [flags]`: serve the simulated
// central service until ctx is cancelled. args exclude the subcommand name.
func runCentralSim(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("central-sim", flag.ContinueOnError)
	fs.SetOutput(stderr)
	listen := fs.String("listen", "127.0.0.1:8443", "`address` to serve HTTPS on")
	configPath := fs.String("config", "", "YAML `file`: realm, audience, signature_attr, check_keys, token_ttl, refresh_ttl, clients, devices, delegations, broker_name, organization, policy_ttl, policy_key_alg, bundle_all_devices, gateways, users, limits, companion")
	caOut := fs.String("ca-out", "", "write the CA certificate (PEM) to `file`")
	tokenOut := fs.String("admin-token-out", "", "write the /_sim/ admin token to `file` (0600); without it the token is printed")
	logLevel := fs.String("log-level", "info", "debug, info, warn or error")
	companion := fs.Bool("companion", false, "also serve the edgegate companion's endpoints that stock Snap4City lacks (policy keys, signed bundles, receipts)")
	withMQTT := fs.Bool("mqtt", false, "also run the companion's policy push broker (MQTT over TLS, same CA); implies --companion")
	mqttListen := fs.String("mqtt-listen", "127.0.0.1:0", "`address` of the push broker (with --mqtt)")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: edgegate-sim central-sim [flags]\n\nServe a simulated stock Snap4City platform (Keycloak-like OIDC provider, Orion Broker Filter, NGSI v2 broker, Ownership API, datamanager delegations, IoT Directory device.php) for demos and tests; with --companion also the edgegate companion's signed policy bundles, receipts and (--mqtt) push broker.\n\nflags:")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("central-sim: unexpected arguments: %q", fs.Args())
	}
	logger, err := toolLogger(stderr, *logLevel)
	if err != nil {
		return fmt.Errorf("central-sim: %w", err)
	}

	var opts centralsim.Options
	if *configPath != "" {
		data, err := os.ReadFile(*configPath)
		if err != nil {
			return fmt.Errorf("central-sim: read config: %w", err)
		}
		if opts, err = parseCentralSimConfig(data); err != nil {
			return fmt.Errorf("central-sim: config %s: %w", *configPath, err)
		}
		if fi, err := os.Stat(*configPath); err == nil && fi.Mode().Perm()&0o077 != 0 {
			logger.Warn("config file holds secrets but is readable by others", "file", *configPath, "mode", fi.Mode().Perm().String())
		}
	} else {
		logger.Warn("no --config: no clients and no devices; add devices with POST /_sim/devices")
	}
	opts.Logger = logger
	opts.MQTT, opts.MQTTListen = *withMQTT, *mqttListen
	opts.Companion = opts.Companion || *companion || *withMQTT

	sim, err := centralsim.New(opts)
	if err != nil {
		return fmt.Errorf("central-sim: %w", err)
	}
	if err := sim.Start(*listen); err != nil {
		return fmt.Errorf("central-sim: %w", err)
	}
	defer func() {
		if err := sim.Close(); err != nil {
			logger.Warn("close", "err", err)
		}
	}()
	if *caOut != "" {
		if err := pki.WriteCertPEM(*caOut, sim.CACertPEM()); err != nil {
			return fmt.Errorf("central-sim: --ca-out: %w", err)
		}
	}
	if *tokenOut != "" {
		if err := atomicfile.Write(*tokenOut, []byte(sim.AdminToken()+"\n"), 0o600); err != nil {
			return fmt.Errorf("central-sim: --admin-token-out: %w", err)
		}
	}
	// Shell-sourceable, one per line, for `make demo` and scripts.
	fmt.Fprintf(stdout, "ISSUER=%s\n", sim.Issuer())
	fmt.Fprintf(stdout, "TOKEN_URL=%s\n", sim.TokenURL())
	fmt.Fprintf(stdout, "JWKS_URL=%s\n", sim.JWKSURL())
	fmt.Fprintf(stdout, "BROKER_URL=%s\n", sim.BrokerURL())
	fmt.Fprintf(stdout, "ADMIN_URL=%s/_sim\n", sim.URL())
	fmt.Fprintf(stdout, "USERINFO_URL=%s\n", sim.UserinfoURL())
	if opts.Companion {
		fmt.Fprintf(stdout, "POLICY_KEYS_URL=%s\n", sim.PolicyKeysURL())
	}
	if *withMQTT {
		fmt.Fprintf(stdout, "MQTT_URL=%s\n", sim.MQTTURL())
	}
	if *caOut != "" {
		fmt.Fprintf(stdout, "CA_FILE=%s\n", *caOut)
	}
	if *tokenOut != "" {
		fmt.Fprintf(stdout, "ADMIN_TOKEN_FILE=%s\n", *tokenOut)
	} else {
		fmt.Fprintf(stdout, "ADMIN_TOKEN=%s\n", sim.AdminToken())
	}

	<-ctx.Done()
	logger.Info("central-sim stopping")
	return nil // cancellation is how it stops, not an error
}
