package main

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/edgegate/edgegate/internal/config"
	"github.com/edgegate/edgegate/internal/envelope"
	"github.com/edgegate/edgegate/internal/keys"
	"github.com/edgegate/edgegate/internal/logx"
	"github.com/edgegate/edgegate/internal/uplink"
	"github.com/edgegate/edgegate/policy"
	centralsync "github.com/edgegate/edgegate/sync"
)

const verifyUsage = `usage: edgegate verify [--device ID] [--key FILE | --devices FILE] [--attr NAME] [FILE|-]
       edgegate verify --broker URL --device ID --type T [--token-file F | --config FILE]
                       [--ca FILE] [--key FILE | --devices FILE]
       edgegate verify --entity FILE [--key FILE | --devices FILE]

Verifies a signed reading: a compact JWS, an NGSI update body, or an entity
as the broker stores it. An entity (a document with an "id": what GET
/v2/entities/{id} answers, or a saved copy given with --entity) is checked
attribute by attribute: each attribute carries, as its "signature"
metadata, the signed envelope of the reading that last wrote it, so an
entity holds attributes of different readings. One line per attribute:

  name  verified|unsigned|tampered|wrong_key|malformed  seq N  observed T

--broker fetches the entity itself: GET {broker}/v2/entities/{id}?type=T
with Authorization: Bearer, the token read from --token-file, or the
paired gateway's own token (--config, with the daemon stopped: it opens
the gateway's store). --ca names the broker's CA bundle (default: system
roots). The token and the keys are never printed.

Keys, whatever the algorithm:

  HS256        the device's K1/K2 from a devices file (--devices, the
               gateway's devices.yaml) or from the environment
               (EDGEGATE_K1, EDGEGATE_K2), never from the command line
  EdDSA, ES256 the device's public key(s): --key FILE (a JWK, a JWK Set
               such as the platform's, or PEM), or --devices FILE.json (a
               policy document: {"devices":[{"id":..,"signing":..,
               "public_keys":[..]},..]})

The key is chosen by the signature's kid, the algorithm pinned to the key
("alg":"none" and HS256-with-a-public-key are refused). A device that signs
its own readings (signing "device") is verified with its public keys only:
an HS256 signature made with K1/K2 — which the gateway holds — is a wrong key.

exit status: 0 valid (an entity: no attribute tampered, wrong key or
malformed), 1 tampered or wrong key, 2 malformed input, usage or fetch error.
`

func runVerify(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("verify", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, verifyUsage) }
	device := fs.String("device", "", "device id (default: the one the envelope or entity names)")
	devicesFile := fs.String("devices", "", "devices file: devices.yaml (k1/k2) or a policy document (JSON, with public keys)")
	keyFile := fs.String("key", "", "the device's public key(s): JWK, JWK Set or PEM")
	attr := fs.String("attr", envelope.DefaultSignatureAttr, "name of the signature metadata (or, in the older form, attribute)")
	broker := fs.String("broker", "", "broker (filter) URL to read the entity from: GET {broker}/v2/entities/{id}?type=T")
	typ := fs.String("type", "", "entity type, with --broker (the filter needs it)")
	tokenFile := fs.String("token-file", "", "file holding the bearer token for --broker")
	cfgPath := fs.String("config", "", "with --broker and no --token-file: the paired gateway's configuration, for its token")
	caFile := fs.String("ca", "", "CA bundle (PEM) for --broker (default: system roots)")
	service := fs.String("fiware-service", "", "Fiware-Service header for --broker")
	servicePath := fs.String("fiware-service-path", "", "Fiware-ServicePath header for --broker")
	entityFile := fs.String("entity", "", "a saved entity (JSON, as GET /v2/entities/{id} answers) to verify offline")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 1 || (fs.NArg() > 0 && (*broker != "" || *entityFile != "")) || (*broker != "" && *entityFile != "") {
		fs.Usage()
		return &exitError{Code: 2, Err: errors.New("verify takes one input: a file or -, --entity FILE, or --broker URL")}
	}
	var data []byte
	switch {
	case *broker != "":
		if *device == "" || *typ == "" {
			return &exitError{Code: 2, Err: errors.New("verify --broker needs --device and --type")}
		}
		tok, err := verifyToken(ctx, *tokenFile, *cfgPath)
		if err != nil {
			return &exitError{Code: 2, Err: err}
		}
		data, err = fetchEntity(ctx, entityRequest{broker: *broker, device: *device, typ: *typ, token: tok,
			caFile: *caFile, service: *service, servicePath: *servicePath})
		if err != nil {
			return &exitError{Code: 2, Err: err}
		}
	default:
		in := stdin
		name := fs.Arg(0)
		if *entityFile != "" {
			name = *entityFile
		}
		if name != "" && name != "-" {
			f, err := os.Open(name)
			if err != nil {
				return &exitError{Code: 2, Err: fmt.Errorf("open input: %w", err)}
			}
			defer f.Close()
			in = f
		}
		var err error
		data, err = io.ReadAll(io.LimitReader(in, 4*envelope.MaxEnvelopeBytes+1))
		if err != nil {
			return &exitError{Code: 2, Err: fmt.Errorf("read input: %w", err)}
		}
	}
	data = bytes.TrimSpace(data)
	isDoc := len(data) > 0 && data[0] == '{'
	if isDoc {
		if id, ok := entityID(data); ok && !legacyForm(data, *attr) {
			return verifyEntityDoc(data, id, *device, *devicesFile, *keyFile, *attr, stdout)
		}
		if *entityFile != "" || *broker != "" {
			return &exitError{Code: 2, Err: errors.New("malformed: the entity has no string \"id\"")}
		}
	}
	compact := string(data)
	if isDoc {
		compact = signatureOf(data, *attr)
	}

	// The device id chooses the key; the verification then binds it.
	id := *device
	if id == "" {
		c, err := envelope.Peek(compact)
		if err != nil {
			return &exitError{Code: 2, Err: fmt.Errorf("malformed: %w (give --device to choose the key)", err)}
		}
		id = c.Device
	}
	keys, err := verifyKeySet(id, *devicesFile, *keyFile)
	if err != nil {
		return &exitError{Code: 2, Err: err}
	}

	var claims envelope.Claims
	if isDoc {
		claims, err = envelope.VerifyAttrsWith(data, keys, *attr)
	} else {
		claims, err = envelope.OpenWith(compact, keys)
	}
	switch {
	case err == nil && claims.Device != id:
		fmt.Fprintf(stdout, "wrong key: the reading is of device %s, the key of %s\n", claims.Device, id)
		return &exitError{Code: 1, Err: errors.New("")}
	case err == nil:
		signer := "gateway " + claims.Gateway
		if claims.Gateway == "" {
			signer = "signed by the device itself"
		}
		fmt.Fprintf(stdout, "valid: reading of device %s, seq %d, %s, observed %s\n",
			claims.Device, claims.Seq, signer, claims.Time.Format(time.RFC3339Nano))
		if alg, kid, _ := envelope.KeyIDOf(compact); alg != envelope.AlgHS256 {
			fmt.Fprintf(stdout, "  key %s %s\n", alg, kid)
		}
		names := make([]string, 0, len(claims.Attrs))
		for n := range claims.Attrs {
			names = append(names, n)
		}
		sort.Strings(names)
		for _, n := range names {
			a := claims.Attrs[n]
			fmt.Fprintf(stdout, "  %s (%s) = %v\n", n, a.Type, a.Value)
		}
		return nil
	case errors.Is(err, envelope.ErrTampered):
		fmt.Fprintf(stdout, "tampered: %s\n", strings.TrimPrefix(err.Error(), envelope.ErrTampered.Error()+": "))
		return &exitError{Code: 1, Err: errors.New("")}
	case errors.Is(err, envelope.ErrWrongKey):
		fmt.Fprintf(stdout, "wrong key: %s\n", strings.TrimPrefix(err.Error(), envelope.ErrWrongKey.Error()+": "))
		return &exitError{Code: 1, Err: errors.New("")}
	default:
		return &exitError{Code: 2, Err: fmt.Errorf("malformed: %w", err)}
	}
}

// signatureOf extracts a signature from an NGSI update body without
// trusting it, to learn which device's key to use: the attr metadata of
// an attribute, or (older form) the attr attribute's value.
func signatureOf(doc []byte, attr string) string {
	var m map[string]json.RawMessage
	if err := json.Unmarshal(doc, &m); err != nil {
		return ""
	}
	var a struct {
		Value    any                        `json:"value"`
		Metadata map[string]json.RawMessage `json:"metadata"`
	}
	if json.Unmarshal(m[attr], &a) == nil {
		if s, ok := a.Value.(string); ok && a.Metadata[attr] == nil {
			return s
		}
	}
	names := make([]string, 0, len(m))
	for n := range m {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		a.Metadata = nil
		if json.Unmarshal(m[n], &a) != nil || a.Metadata[attr] == nil {
			continue
		}
		var meta struct {
			Value any `json:"value"`
		}
		if json.Unmarshal(a.Metadata[attr], &meta) == nil {
			if s, ok := meta.Value.(string); ok {
				return s
			}
		}
	}
	return ""
}

// legacyForm reports the older form: a top-level attr attribute holding
// the envelope of the whole document.
func legacyForm(doc []byte, attr string) bool {
	var m map[string]json.RawMessage
	if json.Unmarshal(doc, &m) != nil {
		return false
	}
	var a struct {
		Value    any                        `json:"value"`
		Metadata map[string]json.RawMessage `json:"metadata"`
	}
	if json.Unmarshal(m[attr], &a) != nil {
		return false
	}
	_, isStr := a.Value.(string)
	return isStr && a.Metadata[attr] == nil
}

// entityID returns the "id" of an NGSI entity document.
func entityID(doc []byte) (string, bool) {
	var e struct {
		ID *string `json:"id"`
	}
	if json.Unmarshal(doc, &e) != nil || e.ID == nil {
		return "", false
	}
	return *e.ID, true
}

// verifyEntityDoc verifies an entity read back from a broker attribute by
// attribute and prints one line per attribute.
func verifyEntityDoc(doc []byte, id, device, devicesFile, keyFile, attr string, stdout io.Writer) error {
	if device != "" && device != id {
		fmt.Fprintf(stdout, "wrong entity: it is %s, not %s\n", logx.Clip(id, 64), device)
		return &exitError{Code: 1, Err: errors.New("")}
	}
	keys, err := verifyKeySet(id, devicesFile, keyFile)
	if err != nil {
		return &exitError{Code: 2, Err: err}
	}
	rep, err := envelope.VerifyEntity(doc, keys, attr)
	if err != nil {
		return &exitError{Code: 2, Err: fmt.Errorf("malformed: %w", err)}
	}
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	counts := map[envelope.Verdict]int{}
	for _, a := range rep.Attrs {
		counts[a.Verdict]++
		line := logx.Clip(a.Name, 64) + "\t" + string(a.Verdict)
		if a.Seq != 0 { // the envelope opened
			signer := "gateway " + a.Gateway
			if a.Gateway == "" {
				signer = "device-signed"
			}
			line += fmt.Sprintf("\tseq %d\tobserved %s\t%s", a.Seq, a.Time.UTC().Format(time.RFC3339Nano), signer)
		} else {
			line += "\t-\t-\t-"
		}
		if a.Detail != "" {
			line += "\t" + logx.Clip(a.Detail, 160)
		}
		fmt.Fprintln(tw, line)
	}
	tw.Flush()
	fmt.Fprintf(stdout, "entity %s (%s): %d verified, %d unsigned, %d tampered, %d wrong key, %d malformed\n",
		logx.Clip(rep.ID, 64), logx.Clip(orDashStr(rep.Type), 64), counts[envelope.Verified], counts[envelope.Unsigned],
		counts[envelope.Tampered], counts[envelope.WrongKey], counts[envelope.Malformed])
	if rep.Bad() > 0 {
		return &exitError{Code: 1, Err: errors.New("")}
	}
	return nil
}

func orDashStr(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// verifyToken reads the bearer token for --broker: from --token-file, or
// the paired gateway's own (refreshed through its store).
func verifyToken(ctx context.Context, tokenFile, cfgPath string) (string, error) {
	if tokenFile != "" {
		b, err := os.ReadFile(tokenFile)
		if err != nil {
			return "", fmt.Errorf("read --token-file: %w", err)
		}
		tok := strings.TrimSpace(string(b))
		if tok == "" || strings.ContainsAny(tok, " \r\n\t") {
			return "", fmt.Errorf("--token-file %s does not hold one token", tokenFile)
		}
		return tok, nil
	}
	if cfgPath == "" {
		return "", errors.New("verify --broker needs --token-file FILE or --config FILE (the paired gateway's token)")
	}
	sf, ca, err := loadPairedSettings(cfgPath)
	if err != nil {
		return "", err
	}
	q, err := openStore(defaultPairEnv(), sf)
	if err != nil {
		return "", fmt.Errorf("open the gateway's store (stop the daemon, or use --token-file): %w", err)
	}
	defer q.Close()
	gwID, err := keys.LoadIdentity(q)
	if err != nil {
		return "", err
	}
	hc, err := centralHTTP(ca)
	if err != nil {
		return "", err
	}
	ts, err := centralsync.NewPairedTokenSource(centralsync.PairedOptions{Store: q, Identity: gwID, HTTPClient: hc})
	if err != nil {
		return "", fmt.Errorf("the paired gateway's token: %w", err)
	}
	tok, err := ts.Token(ctx)
	if err != nil {
		return "", fmt.Errorf("the paired gateway's token: %w", err)
	}
	return tok, nil
}

type entityRequest struct {
	broker, device, typ, token   string
	caFile, service, servicePath string
}

// fetchEntity reads an entity through the broker filter: GET
// {broker}/v2/entities/{id}?type=T, the only read the Orion Broker Filter
// routes, and it needs the type (SNAP4CITY.md; OrionController.java).
// The token is never part of an error.
func fetchEntity(ctx context.Context, r entityRequest) ([]byte, error) {
	u, err := url.Parse(r.broker)
	if err != nil || u.Scheme != "https" || u.Host == "" {
		return nil, fmt.Errorf("--broker %q: want an https:// URL", r.broker)
	}
	var pool *x509.CertPool
	if r.caFile != "" {
		pem, err := os.ReadFile(r.caFile)
		if err != nil {
			return nil, fmt.Errorf("read --ca: %w", err)
		}
		pool = x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("--ca %s holds no PEM certificate", r.caFile)
		}
	}
	target := strings.TrimRight(r.broker, "/") + "/v2/entities/" + url.PathEscape(r.device) + "?" + url.Values{"type": {r.typ}}.Encode()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, target, nil)
	if err != nil {
		return nil, fmt.Errorf("build request: %w", err)
	}
	req.Header.Set("Authorization", "Bearer "+r.token)
	req.Header.Set("Accept", "application/json")
	req.Header.Set("User-Agent", "edgegate-verify")
	if r.service != "" {
		req.Header.Set("Fiware-Service", r.service)
	}
	if r.servicePath != "" {
		req.Header.Set("Fiware-ServicePath", r.servicePath)
	}
	hc := uplink.NewHTTPClient(pool, 30*time.Second, 1)
	defer hc.CloseIdleConnections()
	resp, err := hc.Do(req)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err // its text repeats the URL; the token is not in it, but keep it short
		}
		return nil, fmt.Errorf("GET entity %s from %s: %s", r.device, u.Host, strings.ReplaceAll(err.Error(), r.token, "[redacted]"))
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 4*envelope.MaxEnvelopeBytes+1))
	if err != nil {
		return nil, fmt.Errorf("read entity: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		text := logx.Clip(strings.ReplaceAll(string(bytes.TrimSpace(body)), r.token, "[redacted]"), 200)
		return nil, fmt.Errorf("GET entity %s: broker answered %s: %s", r.device, resp.Status, text)
	}
	return body, nil
}

// verifyKeySet finds the keys a reading of device verifies with: public
// keys from --key, a policy document's keys, or HS256 from K1/K2.
func verifyKeySet(device, devicesFile, keyFile string) ([]envelope.Key, error) {
	if keyFile != "" {
		if devicesFile != "" {
			return nil, errors.New("give --key or --devices, not both")
		}
		b, err := os.ReadFile(keyFile)
		if err != nil {
			return nil, fmt.Errorf("read --key: %w", err)
		}
		keys, err := envelope.ParseKeys(b)
		if err != nil {
			return nil, fmt.Errorf("--key %s: %w", keyFile, err)
		}
		for i := range keys {
			keys[i] = keys[i].Public()
		}
		return keys, nil
	}
	if devicesFile != "" {
		if b, err := os.ReadFile(devicesFile); err == nil && len(bytes.TrimSpace(b)) > 0 && bytes.TrimSpace(b)[0] == '{' {
			return policyDocKeys(device, devicesFile, b)
		}
	}
	k1, k2, err := verifyKeys(device, devicesFile)
	if err != nil {
		return nil, err
	}
	key, err := envelope.DeriveHS256(device, k1, k2)
	if err != nil {
		return nil, err
	}
	return []envelope.Key{key}, nil
}

// policyDocKeys reads a policy document (a bundle's payload, the
// platform-side form) and returns the device's verification keys.
func policyDocKeys(device, name string, b []byte) ([]envelope.Key, error) {
	var doc policy.Document
	if err := json.Unmarshal(b, &doc); err != nil {
		return nil, fmt.Errorf("devices file %s: %w", name, err)
	}
	for _, r := range doc.Devices {
		if r.ID != device {
			continue
		}
		p, err := policy.Compile(policy.Document{Format: policy.DocumentFormat, Devices: []policy.Registration{r}}, "verify", "")
		if err != nil {
			return nil, fmt.Errorf("devices file %s: %w", name, err)
		}
		d, _ := p.Device(device)
		return d.VerifyKeys(), nil
	}
	return nil, fmt.Errorf("device %q is not in %s", device, name)
}

func verifyKeys(device, devicesFile string) (k1, k2 string, err error) {
	if devicesFile != "" {
		devs, err := config.LoadDevices(devicesFile)
		if err != nil {
			return "", "", err
		}
		for _, d := range devs {
			if d.ID == device {
				return d.K1, d.K2, nil
			}
		}
		return "", "", fmt.Errorf("device %q is not in %s", device, devicesFile)
	}
	k1, k2 = os.Getenv("EDGEGATE_K1"), os.Getenv("EDGEGATE_K2")
	if k1 == "" || k2 == "" {
		return "", "", errors.New("no keys: give --devices FILE or set EDGEGATE_K1 and EDGEGATE_K2")
	}
	return k1, k2, nil
}
