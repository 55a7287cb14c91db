package config

import (
	"errors"
	"fmt"
	"math"
	"net"
	"net/url"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/edgegate/edgegate/internal/reading"
)

// problems collects the FieldErrors of one Validate run, so that every bad
// key is reported at once rather than one per attempt.
type problems []error

// bad records that key (a dotted path) has a bad value.
func (p *problems) bad(key, value, msg string) {
	*p = append(*p, &FieldError{Key: key, Value: value, Msg: msg})
}

// Validate checks every value, one section after the other; all problems
// are returned joined, each a *FieldError naming the key.
func (c *Config) Validate() error {
	var p problems
	c.validateGateway(&p)
	c.validateStore(&p)
	c.validateMQTT(&p)
	c.validateCentral(&p)
	c.validateUplink(&p)
	c.validatePolicy(&p)
	ports := c.validateRadio(&p)
	c.validateDevices(&p, ports)
	c.validateMetrics(&p)
	c.validateAdmin(&p)
	c.validatePipeline(&p)
	c.validateCommands(&p)
	c.validateLog(&p)
	p = append(p, c.urlSecrets()...)
	return errors.Join(p...)
}

// validateGateway checks gateway.*, and the top-level state_dir and
// memory_limit that belong to the gateway as a whole.
func (c *Config) validateGateway(p *problems) {
	if id := c.Gateway.ID; id != "" && !reading.ValidSegmentID(id) {
		p.bad("gateway.id", id, "must match [A-Za-z0-9._-]{1,256} and not be . or ..")
	}
	if c.StateDir == "" {
		p.bad("state_dir", "", "must be set")
	}
	if c.MemoryLimit != 0 && c.MemoryLimit < 16<<20 {
		p.bad("memory_limit", c.MemoryLimit.String(), "must be 0 (none) or at least 16MiB")
	}
}

// validateStore checks store.*.
func (c *Config) validateStore(p *problems) {
	s := c.Store
	if s.Quota < 0 {
		p.bad("store.quota", s.Quota.String(), "must not be negative")
	}
	if s.MinFree < 0 {
		p.bad("store.min_free", s.MinFree.String(), "must not be negative")
	}
	if s.MaxBatch < 1 || s.MaxBatch > 4096 {
		p.bad("store.max_batch", strconv.Itoa(s.MaxBatch), "must be between 1 and 4096")
	}
	if s.CommitDelay < 0 || s.CommitDelay > 50*time.Millisecond {
		p.bad("store.commit_delay", s.CommitDelay.String(), "must be between 0 (sync at once) and 50ms")
	}
	if s.Credential != "" && strings.ContainsAny(s.Credential, "/\\") {
		p.bad("store.credential", s.Credential, "must be a credential name, not a path")
	}
}

// validateMQTT checks mqtt.*: the section of the mode in use (the other
// one is ignored) and the topic.
func (c *Config) validateMQTT(p *problems) {
	switch c.MQTT.Mode {
	case ModeEmbedded:
		validateEmbedded(p, c.MQTT.Embedded)
	case ModeExternal:
		validateExternal(p, c.MQTT.External)
	default:
		p.bad("mqtt.mode", c.MQTT.Mode, "must be embedded or external")
	}
	if err := checkTopic(c.MQTT.Topic); err != nil {
		p.bad("mqtt.topic", c.MQTT.Topic, err.Error())
	}
}

// validateEmbedded checks mqtt.embedded.*, its limits included.
func validateEmbedded(p *problems, e Embedded) {
	if e.Listen != "" {
		if err := loopbackAddr(e.Listen); err != nil {
			p.bad("mqtt.embedded.listen", e.Listen, err.Error()+"; devices on the network use tls_listen")
		}
	}
	if e.TLSListen != "" {
		if _, port, err := net.SplitHostPort(e.TLSListen); err != nil || port == "" {
			p.bad("mqtt.embedded.tls_listen", e.TLSListen, "must be host:port, such as [::]:8883")
		}
	}
	if e.Listen == "" && e.TLSListen == "" {
		p.bad("mqtt.embedded", "", "needs listen (loopback) or tls_listen, or both")
	}
	if e.DeviceRate < 0 {
		p.bad("mqtt.embedded.device_rate", strconv.FormatFloat(e.DeviceRate, 'g', -1, 64), "must not be negative (0: unlimited)")
	}
	if e.DeviceBurst < 1 || e.DeviceBurst > 100000 {
		p.bad("mqtt.embedded.device_burst", strconv.Itoa(e.DeviceBurst), "must be between 1 and 100000")
	}
	if e.MaxClients < 1 || e.MaxClients > 100000 {
		p.bad("mqtt.embedded.max_clients", strconv.Itoa(e.MaxClients), "must be between 1 and 100000")
	}
	checkBrokerLimits(e.Limits, p.bad)
	if (e.CertFile == "") != (e.KeyFile == "") {
		p.bad("mqtt.embedded.key_file", e.KeyFile, "must be given together with cert_file")
	}
}

// validateExternal checks mqtt.external.*.
func validateExternal(p *problems, x External) {
	u, err := url.Parse(x.URL)
	switch {
	case x.URL == "":
		p.bad("mqtt.external.url", "", "must be set when mqtt.mode is external")
	case err != nil || u.Host == "":
		p.bad("mqtt.external.url", x.URL, "must be a URL such as tls://broker:8883")
	case u.Scheme != "tls" && u.Scheme != "ssl" && u.Scheme != "mqtts" && u.Scheme != "tcp" && u.Scheme != "mqtt":
		p.bad("mqtt.external.url", x.URL, "must use tls://, mqtts:// or (loopback only) tcp://")
	case (u.Scheme == "tcp" || u.Scheme == "mqtt") && !isLoopbackHost(u.Hostname()):
		p.bad("mqtt.external.url", x.URL, "plain tcp:// is allowed only to a loopback broker; use tls://")
	}
	if x.ClientID == "" {
		p.bad("mqtt.external.client_id", "", "must be set (a persistent session needs a fixed client id)")
	}
	if x.Inflight < 1 || x.Inflight > 65535 {
		p.bad("mqtt.external.inflight", strconv.Itoa(x.Inflight), "must be between 1 and 65535")
	}
	if x.Keepalive < time.Second {
		p.bad("mqtt.external.keepalive", x.Keepalive.String(), "must be at least 1s")
	}
	switch x.Accounts {
	case AccountsNone:
	case AccountsDynsec:
		if x.AdminUsername == "" && x.Username == "" {
			p.bad("mqtt.external.admin_username", "", "must be set (or username) when accounts is dynsec: a dynamic-security administrator")
		}
		if x.AdminUsername != "" && x.AdminPasswordFile == "" {
			p.bad("mqtt.external.admin_password_file", "", "must be set with admin_username")
		}
		if x.AccountsInterval < 10*time.Second || x.AccountsInterval > 24*time.Hour {
			p.bad("mqtt.external.accounts_interval", x.AccountsInterval.String(), "must be between 10s and 24h")
		}
	default:
		p.bad("mqtt.external.accounts", x.Accounts, "must be dynsec or none")
	}
}

// validateCentral checks central.*. The sign-on may be on the gateway
// itself (a local install, tests): plain http is accepted to a loopback
// host only, as pair does. MissingCentral relies on token_url, client_id
// and client_secret_file being reported with an empty value when absent.
func (c *Config) validateCentral(p *problems) {
	ce := c.Central
	if ce.Issuer != "" {
		if err := secureURL(ce.Issuer); err != nil {
			p.bad("central.issuer", ce.Issuer, err.Error())
		}
		if ce.Audience == "" {
			p.bad("central.audience", "", "must be set with central.issuer (tokens of applications must be meant for the gateway)")
		}
	}
	if ce.JWKSURL != "" {
		if err := secureURL(ce.JWKSURL); err != nil {
			p.bad("central.jwks_url", ce.JWKSURL, err.Error())
		}
	}
	if ce.TokenURL == "" {
		p.bad("central.token_url", "", "must be set")
	} else if err := secureURL(ce.TokenURL); err != nil {
		p.bad("central.token_url", ce.TokenURL, err.Error())
	}
	if ce.ClientID == "" {
		p.bad("central.client_id", "", "must be set")
	}
	switch ce.Credentials {
	case "", CredentialsSecretFile:
		if ce.ClientSecretFile == "" {
			p.bad("central.client_secret_file", "", "must be set (the secret lives in that file, never in this one)")
		}
	case CredentialsPaired:
	default:
		p.bad("central.credentials", ce.Credentials, "must be secret_file or paired")
	}
}

// validateUplink checks uplink.*.
func (c *Config) validateUplink(p *problems) {
	u := c.Uplink
	switch u.Mode {
	case "filter", "batch":
	default:
		p.bad("uplink.mode", u.Mode, "must be filter (one PATCH per reading, what the Orion Broker Filter accepts) or batch (POST /v2/op/update, for brokers reached directly)")
	}
	if u.BatchSize < 1 || u.BatchSize > 1000 {
		p.bad("uplink.batch_size", strconv.Itoa(u.BatchSize), "must be between 1 and 1000")
	}
	if u.BatchLinger < 0 || u.BatchLinger > time.Second {
		p.bad("uplink.batch_linger", u.BatchLinger.String(), "must be between 0 (send at once) and 1s")
	}
	if u.Concurrency < 0 || u.Concurrency > 64 {
		p.bad("uplink.concurrency", strconv.Itoa(u.Concurrency), "must be between 1 and 64 (0 or absent: 16 in filter mode, 4 in batch mode)")
	}
	if u.SignatureAttribute == "" || !reading.ValidID(u.SignatureAttribute) || u.SignatureAttribute == "TimeInstant" {
		p.bad("uplink.signature_attribute", u.SignatureAttribute, "must be a valid NGSI metadata name other than TimeInstant")
	}
	if u.SendKeys {
		// AccessTokenAuthenticationFilter.java (OrionBrokerFilter) never
		// consults k1/k2 when a bearer token is sent.
		p.bad("uplink.send_keys", "true", "was removed: device keys are never put in URLs, and the Orion Broker Filter ignores k1/k2 when a token is sent; delete the line")
	}
	if u.RefusalWindow < 0 || u.RefusalWindow > 24*time.Hour {
		p.bad("uplink.refusal_window", u.RefusalWindow.String(), "must be between 0 (dead-letter at once) and 24h; keep it above the filter's cache (spring.elapsingcache.minutes: 3 to 60 minutes by deploy)")
	}
	if u.RequestTimeout < 100*time.Millisecond {
		p.bad("uplink.request_timeout", u.RequestTimeout.String(), "must be at least 100ms")
	}
	if u.MinBackoff <= 0 {
		p.bad("uplink.min_backoff", u.MinBackoff.String(), "must be positive")
	}
	if u.MaxBackoff < u.MinBackoff {
		p.bad("uplink.max_backoff", u.MaxBackoff.String(), "must not be below uplink.min_backoff")
	}
	if u.FiwareServicePath != "" && !strings.HasPrefix(u.FiwareServicePath, "/") {
		p.bad("uplink.fiware_service_path", u.FiwareServicePath, "must start with /")
	}
}

// validatePolicy checks policy.*: the keys common to the central sources,
// then those of the source in use.
func (c *Config) validatePolicy(p *problems) {
	pol := c.Policy
	switch pol.Source {
	case PolicyConfig:
		return
	case PolicyBundle, PolicyOwnership:
	default:
		p.bad("policy.source", pol.Source, "must be config, bundle or ownership-api")
		return
	}
	if len(c.Devices) > 0 {
		p.bad("devices", "", "must be empty when policy.source is "+pol.Source+" (the devices come from the central service)")
	}
	if pol.PollInterval < 10*time.Second {
		p.bad("policy.poll_interval", pol.PollInterval.String(), "must be at least 10s")
	}
	if pol.ExpiryGrace < 0 {
		p.bad("policy.expiry_grace", pol.ExpiryGrace.String(), "must not be negative")
	}
	if pol.PushURL != "" {
		u, err := url.Parse(pol.PushURL)
		if err != nil || (u.Scheme != "tls" && u.Scheme != "ssl" && u.Scheme != "mqtts") || u.Host == "" {
			p.bad("policy.push_url", pol.PushURL, "must be tls://host:port (the central MQTT broker)")
		}
	}
	if pol.Source == PolicyBundle {
		if err := httpsURL(pol.CentralURL); err != nil {
			p.bad("policy.central_url", pol.CentralURL, err.Error())
		}
		if pol.KeysFile == "" {
			p.bad("policy.keys_file", "", "must be set: the central policy-signing keys pinned at pairing (a JWKS)")
		}
		return
	}
	validateOwnership(p, pol.Ownership, pol.PollInterval)
	if pol.CentralURL != "" {
		if err := httpsURL(pol.CentralURL); err != nil {
			p.bad("policy.central_url", pol.CentralURL, err.Error())
		}
	}
}

// validateOwnership checks policy.ownership.* (policy.source
// ownership-api); pollInterval is policy.poll_interval.
func validateOwnership(p *problems, o Ownership, pollInterval time.Duration) {
	if err := httpsURL(o.URL); err != nil {
		p.bad("policy.ownership.url", o.URL, err.Error())
	}
	if o.DataManagerURL != "" {
		if err := httpsURL(o.DataManagerURL); err != nil {
			p.bad("policy.ownership.datamanager_url", o.DataManagerURL, err.Error())
		}
	}
	if o.Username == "" {
		p.bad("policy.ownership.username", "", "must be set (the gateway account's username)")
	}
	if len(o.Brokers) == 0 {
		p.bad("policy.ownership.brokers", "", "must map at least one context broker name to its https filter URL")
	}
	switch {
	case o.MaxAge < time.Minute:
		p.bad("policy.ownership.max_age", o.MaxAge.String(), "must be at least 1m")
	case o.MaxAge < pollInterval:
		p.bad("policy.ownership.max_age", o.MaxAge.String(), "must not be below policy.poll_interval (every sync would find the policy expired)")
	}
	for name, u := range o.Brokers {
		if err := httpsURL(u); err != nil {
			p.bad("policy.ownership.brokers."+name, u, err.Error())
		}
	}
}

// validateRadio checks radio.ports and returns the set of port paths that
// devices[].radio.port may name.
func (c *Config) validateRadio(p *problems) map[string]bool {
	ports := map[string]bool{}
	for i, rp := range c.Radio.Ports {
		key := fmt.Sprintf("radio.ports[%d]", i)
		switch {
		case rp.Path == "" || !filepath.IsAbs(rp.Path):
			p.bad(key+".path", rp.Path, "must be an absolute device path such as /dev/ttyUSB0")
		case ports[rp.Path]:
			p.bad(key+".path", rp.Path, "is given twice")
		}
		ports[rp.Path] = true
		if rp.Baud != 0 && (rp.Baud < 1200 || rp.Baud > 4000000) {
			p.bad(key+".baud", strconv.Itoa(rp.Baud), "must be between 1200 and 4000000")
		}
		switch rp.Codec {
		case "", "mysensors", "jsonlines":
		default:
			p.bad(key+".codec", rp.Codec, "must be mysensors or jsonlines")
		}
		if rp.ReadTimeout != 0 && (rp.ReadTimeout < 100*time.Millisecond || rp.ReadTimeout > 25500*time.Millisecond) {
			p.bad(key+".read_timeout", rp.ReadTimeout.String(), "must be between 100ms and 25.5s")
		}
	}
	c.validateModbus(p, ports)
	return ports
}

// Names the Modbus register map accepts (radio/modbus has the same).
var (
	modbusFunctions = []string{"holding", "input", "coil", "discrete"}
	modbusTypes     = []string{"int16", "uint16", "int32", "uint32", "float32"}
	modbusBauds     = []int{1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200, 230400, 460800, 921600}
)

// validateModbus checks radio.modbus; radioPorts are radio.ports' paths,
// which a Modbus line may not share.
func (c *Config) validateModbus(p *problems, radioPorts map[string]bool) {
	lines := map[string]bool{}
	devices := map[string]bool{}
	var known map[string]bool
	if c.Policy.Source == PolicyConfig {
		known = map[string]bool{}
		for _, d := range c.Devices {
			known[d.ID] = true
		}
	}
	for i, l := range c.Radio.Modbus {
		key := fmt.Sprintf("radio.modbus[%d]", i)
		switch {
		case l.Path == "" || !filepath.IsAbs(l.Path):
			p.bad(key+".path", l.Path, "must be an absolute device path such as /dev/ttyUSB1")
		case lines[l.Path]:
			p.bad(key+".path", l.Path, "is given twice")
		case radioPorts[l.Path]:
			p.bad(key+".path", l.Path, "is also a radio.ports path; one serial port carries one protocol")
		}
		lines[l.Path] = true
		if l.Baud != 0 && !slices.Contains(modbusBauds, l.Baud) {
			p.bad(key+".baud", strconv.Itoa(l.Baud), fmt.Sprintf("must be one of %v", modbusBauds))
		}
		switch l.Parity {
		case "", "none", "even", "odd":
		default:
			p.bad(key+".parity", l.Parity, "must be none, even or odd")
		}
		if l.StopBits != 0 && l.StopBits != 1 && l.StopBits != 2 {
			p.bad(key+".stop_bits", strconv.Itoa(l.StopBits), "must be 1 or 2")
		}
		if l.Timeout != 0 && (l.Timeout < 10*time.Millisecond || l.Timeout > 10*time.Second) {
			p.bad(key+".timeout", l.Timeout.String(), "must be between 10ms and 10s")
		}
		if len(l.Devices) == 0 {
			p.bad(key+".devices", "", "must list at least one slave")
		}
		units := map[int]bool{}
		for j, d := range l.Devices {
			dkey := fmt.Sprintf("%s.devices[%d]", key, j)
			switch err := reading.ValidateDeviceID(d.Device); {
			case err != nil:
				p.bad(dkey+".device", d.Device, "must be a platform device id ("+err.Error()+")")
			case devices[d.Device]:
				p.bad(dkey+".device", d.Device, "is given twice (one device is one slave)")
			case known != nil && !known[d.Device]:
				p.bad(dkey+".device", d.Device, "must be one of devices[].id (policy.source is config)")
			}
			devices[d.Device] = true
			switch {
			case d.Unit < 1 || d.Unit > 247:
				p.bad(dkey+".unit", strconv.Itoa(d.Unit), "must be a slave address between 1 and 247")
			case units[d.Unit]:
				p.bad(dkey+".unit", strconv.Itoa(d.Unit), "is used twice on this line")
			}
			units[d.Unit] = true
			if d.Period != 0 && (d.Period < 100*time.Millisecond || d.Period > 24*time.Hour) {
				p.bad(dkey+".period", d.Period.String(), "must be between 100ms and 24h")
			}
			if d.Timeout != 0 && (d.Timeout < 10*time.Millisecond || d.Timeout > 10*time.Second) {
				p.bad(dkey+".timeout", d.Timeout.String(), "must be between 10ms and 10s")
			}
			switch n := len(d.Registers); {
			case n == 0:
				p.bad(dkey+".registers", "", "must map at least one attribute")
			case n > reading.MaxAttrs:
				p.bad(dkey+".registers", strconv.Itoa(n), fmt.Sprintf("must map at most %d attributes (a reading's limit)", reading.MaxAttrs))
			}
			attrs := map[string]bool{}
			for k, r := range d.Registers {
				validateModbusRegister(p, fmt.Sprintf("%s.registers[%d]", dkey, k), r, attrs)
			}
		}
	}
}

// validateModbusRegister checks one register map entry; key is its
// "radio.modbus[i].devices[j].registers[k]" prefix.
func validateModbusRegister(p *problems, key string, r ModbusRegister, attrs map[string]bool) {
	switch {
	case !reading.ValidID(r.Attribute):
		p.bad(key+".attribute", r.Attribute, "must be an attribute name, [A-Za-z0-9._-]{1,256}")
	case attrs[r.Attribute]:
		p.bad(key+".attribute", r.Attribute, "is mapped twice")
	}
	attrs[r.Attribute] = true
	words := 1
	switch r.Function {
	case "holding", "input":
		if !slices.Contains(modbusTypes, r.Type) {
			p.bad(key+".type", r.Type, "is not one of "+strings.Join(modbusTypes, ", "))
		}
		if strings.HasSuffix(r.Type, "32") {
			words = 2
		}
	case "coil", "discrete":
		if r.Type != "" && r.Type != "bool" {
			p.bad(key+".type", r.Type, "must be left out: a "+r.Function+" is a bool")
		}
	default:
		p.bad(key+".function", r.Function, "is not one of "+strings.Join(modbusFunctions, ", "))
	}
	if r.Address < 0 || r.Address+words > 65536 {
		p.bad(key+".address", strconv.Itoa(r.Address), "must be a protocol address between 0 and 65535 (0-based: 40001 is 0)")
	}
	switch r.WordOrder {
	case "", "big", "little":
	default:
		p.bad(key+".word_order", r.WordOrder, "must be big or little")
	}
	if math.IsNaN(r.Offset) || math.IsInf(r.Offset, 0) {
		p.bad(key+".offset", strconv.FormatFloat(r.Offset, 'g', -1, 64), "must be a finite number")
	}
	if r.Writable && r.Function != "holding" && r.Function != "coil" {
		p.bad(key+".writable", "true", "only a holding register or a coil can be written")
	}
}

// validateDevices checks devices[] (those of this file and of
// devices_file); ports are the configured radio port paths.
func (c *Config) validateDevices(p *problems, ports map[string]bool) {
	seen := map[string]bool{}
	for i, d := range c.Devices {
		key := fmt.Sprintf("devices[%d]", i)
		idErr := reading.ValidateDeviceID(d.ID)
		switch {
		case idErr != nil:
			p.bad(key+".id", d.ID, "must be a platform device id, [A-Za-z0-9._-]{1,255} and not . or .. ("+idErr.Error()+")")
		case seen[d.ID]:
			p.bad(key+".id", d.ID, "is given twice")
		}
		seen[d.ID] = true
		validateDevice(p, key, d, ports)
	}
}

// validateDevice checks one device's keys but its id; key is its
// "devices[i]" prefix.
func validateDevice(p *problems, key string, d Device, ports map[string]bool) {
	if !reading.ValidID(d.Type) {
		p.bad(key+".type", d.Type, "must match [A-Za-z0-9._-]{1,256}")
	}
	if d.Owner == "" {
		p.bad(key+".owner", "", "must be set")
	}
	// The keys themselves never go into an error message.
	if d.K1 == "" {
		p.bad(key+".k1", "", "must be set")
	}
	if d.K2 == "" {
		p.bad(key+".k2", "", "must be set")
	}
	if d.K1 != "" && d.K1 == d.K2 {
		p.bad(key+".k2", "", "must differ from k1")
	}
	if err := httpsURL(d.Broker); err != nil {
		p.bad(key+".broker", d.Broker, err.Error())
	}
	if d.ServicePath != "" && !strings.HasPrefix(d.ServicePath, "/") {
		p.bad(key+".fiware_service_path", d.ServicePath, "must start with /")
	}
	switch d.Signing {
	case "", "hs256", "gateway", "device":
	default:
		p.bad(key+".signing", d.Signing, "must be hs256, gateway or device")
	}
	if (d.Signing == "gateway" || d.Signing == "device") && len(d.PublicKeys) == 0 {
		p.bad(key+".public_keys", "", "must list the device's public key(s) when signing is "+d.Signing)
	}
	if r := d.Radio; r != nil {
		switch {
		case !ports[r.Port]:
			p.bad(key+".radio.port", r.Port, "must be one of radio.ports[].path")
		case r.NodeOrAny() < -1 || r.NodeOrAny() > 254:
			p.bad(key+".radio.node", strconv.Itoa(r.NodeOrAny()), "must be between 0 and 254")
		case r.ChildOrAny() < -1 || r.ChildOrAny() > 255:
			p.bad(key+".radio.child", strconv.Itoa(r.ChildOrAny()), "must be between 0 and 255")
		case r.Child != nil && r.Node == nil:
			p.bad(key+".radio.child", strconv.Itoa(*r.Child), "needs radio.node")
		}
	}
}

// validateMetrics checks metrics.*.
func (c *Config) validateMetrics(p *problems) {
	if c.Metrics.Listen != "" {
		if err := loopbackAddr(c.Metrics.Listen); err != nil {
			p.bad("metrics.listen", c.Metrics.Listen, err.Error())
		}
	}
}

// validateAdmin checks admin.*. Load has already made a relative socket
// path absolute against the file's folder.
func (c *Config) validateAdmin(p *problems) {
	if c.Admin.Socket == "" || !filepath.IsAbs(c.Admin.Socket) {
		p.bad("admin.socket", c.Admin.Socket, "must be an absolute path")
	}
}

// validatePipeline checks pipeline.*.
func (c *Config) validatePipeline(p *problems) {
	if c.Pipeline.MaxClockSkew < 0 {
		p.bad("pipeline.max_clock_skew", c.Pipeline.MaxClockSkew.String(), "must not be negative (0: off)")
	}
	if c.Pipeline.MaxAge < 0 {
		p.bad("pipeline.max_age", c.Pipeline.MaxAge.String(), "must not be negative (0: off)")
	}
}

// validateLog checks log.*.
func (c *Config) validateLog(p *problems) {
	switch c.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		p.bad("log.level", c.Log.Level, "must be debug, info, warn or error")
	}
	switch c.Log.Format {
	case "text", "json":
	default:
		p.bad("log.format", c.Log.Format, "must be text or json")
	}
}

// validateCommands checks commands.*.
func (c *Config) validateCommands(p *problems) {
	k := c.Commands
	if k.TTL < time.Second || k.TTL > 7*24*time.Hour {
		p.bad("commands.ttl", k.TTL.String(), "must be in 1s..168h")
	}
	if k.PollInterval < 100*time.Millisecond || k.PollInterval > time.Hour {
		p.bad("commands.poll_interval", k.PollInterval.String(), "must be in 100ms..1h")
	}
	if k.PollBudget < 1 || k.PollBudget > 4096 {
		p.bad("commands.poll_budget", strconv.Itoa(k.PollBudget), "must be in 1..4096")
	}
	if k.Retries < 1 || k.Retries > 20 {
		p.bad("commands.retries", strconv.Itoa(k.Retries), "must be in 1..20")
	}
	if k.AckTimeout < 100*time.Millisecond || k.AckTimeout > time.Minute {
		p.bad("commands.ack_timeout", k.AckTimeout.String(), "must be in 100ms..1m")
	}
	if k.Enabled && k.LocalControl && c.MQTT.Mode == ModeExternal {
		// Mosquitto delivers an app's publish to the topic's subscribers
		// before the gateway could check, sign and keep it
		// (docs/actuators.md): local control needs the embedded broker.
		p.bad("commands.local_control", "true", "needs mqtt.mode embedded: with an external Mosquitto, applications cannot publish commands")
	}
	c.validateNotify(p)
	for _, d := range c.Devices {
		switch d.Kind {
		case "", "sensor", "actuator":
		default:
			p.bad("devices["+d.ID+"].kind", d.Kind, "must be sensor or actuator")
		}
	}
}

// validateNotify checks commands.notify.*.
func (c *Config) validateNotify(p *problems) {
	n := c.Commands.Notify
	const k = "commands.notify."
	switch n.Mode {
	case NotifyModeNone:
		return
	case NotifyModeMQTT, NotifyModeHTTP:
	default:
		p.bad(k+"mode", n.Mode, "must be none, mqtt or http")
		return
	}
	if n.Expires < 10*time.Second || n.Expires > 7*24*time.Hour {
		p.bad(k+"expires", n.Expires.String(), "must be in 10s..168h")
	}
	if n.SafetyInterval < c.Commands.PollInterval || n.SafetyInterval > 24*time.Hour {
		p.bad(k+"safety_interval", n.SafetyInterval.String(), "must be in commands.poll_interval..24h")
	}
	if n.Reprobe < 10*time.Second || n.Reprobe > 24*time.Hour {
		p.bad(k+"reprobe", n.Reprobe.String(), "must be in 10s..24h")
	}
	if n.Mode == NotifyModeMQTT {
		m := n.MQTT
		u, err := url.Parse(m.URL)
		switch {
		case m.URL == "" || err != nil || u.Host == "":
			p.bad(k+"mqtt.url", m.URL, "must be a broker URL: tcp://, ssl://, mqtt:// or mqtts://host:port")
		case u.Scheme != "tcp" && u.Scheme != "ssl" && u.Scheme != "mqtt" && u.Scheme != "mqtts":
			p.bad(k+"mqtt.url", m.URL, "scheme must be tcp, ssl, mqtt or mqtts")
		case u.User != nil:
			p.bad(k+"mqtt.url", "(redacted)", "must not carry credentials: use commands.notify.mqtt.username and password_file")
		}
		if m.OrionURL == "" && err == nil && u.Scheme != "tcp" && u.Scheme != "mqtt" {
			p.bad(k+"mqtt.orion_url", "", "required when mqtt.url is TLS: Orion 3.12 publishes over plain mqtt:// only")
		}
		if m.OrionURL != "" {
			ou, err := url.Parse(m.OrionURL)
			if err != nil || ou.Scheme != "mqtt" || ou.Host == "" || (ou.Path != "" && ou.Path != "/") || ou.User != nil {
				p.bad(k+"mqtt.orion_url", m.OrionURL, "must be mqtt://host:port, without a path or credentials (Orion's rule)")
			}
		}
		if m.TopicPrefix == "" || strings.ContainsAny(m.TopicPrefix, "+#") || strings.HasSuffix(m.TopicPrefix, "/") || strings.ContainsAny(m.TopicPrefix, `<>"'=;()`) {
			p.bad(k+"mqtt.topic_prefix", m.TopicPrefix, "must be a topic without + # or a trailing /, and none of < > \" ' = ; ( ) (Orion refuses them)")
		}
		if (m.Username == "") != (m.PasswordFile == "") {
			p.bad(k+"mqtt.username", m.Username, "username and password_file go together (Orion takes user and passwd together)")
		}
	}
	if n.Mode == NotifyModeHTTP {
		h := n.HTTP
		if _, _, err := net.SplitHostPort(h.Listen); h.Listen == "" || err != nil {
			p.bad(k+"http.listen", h.Listen, "must be host:port")
		}
		if err := httpsURL(h.PublicURL); err != nil {
			p.bad(k+"http.public_url", h.PublicURL, err.Error())
		} else if strings.ContainsAny(h.PublicURL, `<>"'=;()`) {
			p.bad(k+"http.public_url", h.PublicURL, "must hold none of < > \" ' = ; ( ) (Orion refuses them)")
		}
		if h.CertFile == "" {
			p.bad(k+"http.cert_file", "", "required: Orion posts over https")
		}
		if h.KeyFile == "" {
			p.bad(k+"http.key_file", "", "required: Orion posts over https")
		}
	}
}
