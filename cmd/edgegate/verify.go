package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/edgegate/edgegate/config"
	"github.com/edgegate/edgegate/envelope"
	"github.com/edgegate/edgegate/policy"
)

const verifyUsage = `usage: edgegate verify [--device ID] [--key FILE | --devices FILE] [--attr NAME] [FILE|-]

Verifies a signed reading: a compact JWS, an NGSI update body or an entity
read back from a broker (GET /v2/entities/{id}), whatever the algorithm:

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

exit status: 0 valid, 1 tampered or wrong key, 2 malformed input or usage.
`

func runVerify(args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("verify", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, verifyUsage) }
	device := fs.String("device", "", "device id (default: the one the envelope names)")
	devicesFile := fs.String("devices", "", "devices file: devices.yaml (k1/k2) or a policy document (JSON, with public keys)")
	keyFile := fs.String("key", "", "the device's public key(s): JWK, JWK Set or PEM")
	attr := fs.String("attr", envelope.DefaultSignatureAttr, "NGSI attribute carrying the signature")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 1 {
		fs.Usage()
		return &exitError{code: 2, err: errors.New("verify takes at most one input")}
	}
	in := stdin
	if name := fs.Arg(0); name != "" && name != "-" {
		f, err := os.Open(name)
		if err != nil {
			return &exitError{code: 2, err: fmt.Errorf("open input: %w", err)}
		}
		defer f.Close()
		in = f
	}
	data, err := io.ReadAll(io.LimitReader(in, 4*envelope.MaxEnvelopeBytes+1))
	if err != nil {
		return &exitError{code: 2, err: fmt.Errorf("read input: %w", err)}
	}
	data = bytes.TrimSpace(data)
	isDoc := len(data) > 0 && data[0] == '{'
	compact := string(data)
	if isDoc {
		compact = signatureOf(data, *attr)
	}

	// The device id chooses the key; the verification then binds it.
	id := *device
	if id == "" {
		c, err := envelope.Peek(compact)
		if err != nil {
			return &exitError{code: 2, err: fmt.Errorf("malformed: %w (give --device to choose the key)", err)}
		}
		id = c.Device
	}
	keys, err := verifyKeySet(id, *devicesFile, *keyFile)
	if err != nil {
		return &exitError{code: 2, err: err}
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
		return &exitError{code: 1, err: errors.New("")}
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
		return &exitError{code: 1, err: errors.New("")}
	case errors.Is(err, envelope.ErrWrongKey):
		fmt.Fprintf(stdout, "wrong key: %s\n", strings.TrimPrefix(err.Error(), envelope.ErrWrongKey.Error()+": "))
		return &exitError{code: 1, err: errors.New("")}
	default:
		return &exitError{code: 2, err: fmt.Errorf("malformed: %w", err)}
	}
}

// signatureOf extracts the signature attribute's value from an NGSI document
// without trusting it, to learn which device's key to use.
func signatureOf(doc []byte, attr string) string {
	var m map[string]json.RawMessage
	if err := json.Unmarshal(doc, &m); err != nil {
		return ""
	}
	var a struct {
		Value any `json:"value"`
	}
	if err := json.Unmarshal(m[attr], &a); err != nil {
		return ""
	}
	s, _ := a.Value.(string)
	return s
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
