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
)

const verifyUsage = `usage: edgegate verify [--device ID] [--devices FILE] [--attr NAME] [FILE|-]

Verifies a signed reading: a compact JWS, an NGSI update body or an entity
read back from a broker (GET /v2/entities/{id}). The device's K1/K2 come from
a devices file (--devices, the gateway's devices.yaml) or from the
environment (EDGEGATE_K1, EDGEGATE_K2), never from the command line.

exit status: 0 valid, 1 tampered or wrong key, 2 malformed input or usage.
`

func runVerify(args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("verify", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, verifyUsage) }
	device := fs.String("device", "", "device id (default: the one the envelope names)")
	devicesFile := fs.String("devices", "", "devices file holding the device's k1/k2")
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

	// The device id chooses the key; the verification then binds it.
	id := *device
	if id == "" {
		var compact string
		if isDoc {
			compact = signatureOf(data, *attr)
		} else {
			compact = string(data)
		}
		c, err := envelope.Peek(compact)
		if err != nil {
			return &exitError{code: 2, err: fmt.Errorf("malformed: %w (give --device to choose the key)", err)}
		}
		id = c.Device
	}
	k1, k2, err := verifyKeys(id, *devicesFile)
	if err != nil {
		return &exitError{code: 2, err: err}
	}
	key, err := envelope.DeriveHS256(id, k1, k2)
	if err != nil {
		return &exitError{code: 2, err: err}
	}

	var claims envelope.Claims
	if isDoc {
		claims, err = envelope.VerifyAttrs(data, key, *attr)
	} else {
		claims, err = envelope.Open(string(data), key)
	}
	switch {
	case err == nil:
		fmt.Fprintf(stdout, "valid: reading of device %s, seq %d, gateway %s, observed %s\n",
			claims.Device, claims.Seq, claims.Gateway, claims.Time.Format(time.RFC3339Nano))
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
