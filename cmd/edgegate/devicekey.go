package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/edgegate/edgegate/internal/envelope"
	"github.com/edgegate/edgegate/internal/keys"
	"github.com/edgegate/edgegate/internal/queue"
	"github.com/edgegate/edgegate/policy"
	centralsync "github.com/edgegate/edgegate/sync"
)

// signingKey is what `device add --signing` decided.
type signingKey struct {
	mode          string       // policy.SigningHS256, SigningGateway, SigningDevice
	key           envelope.Key // gateway-held private key, or the device's (public or generated)
	publicJWK     string       // registered as "publickey"
	devicePrivate string       // generated for the device: its private JWK, for --keys-out only
}

var algOfFlag = map[string]string{"ed25519": envelope.AlgEdDSA, "es256": envelope.AlgES256}

func deviceSigningKey(signing, pubKeyFile string) (signingKey, error) {
	switch signing {
	case "hs256":
		return signingKey{mode: policy.SigningHS256}, nil
	case "ed25519", "es256":
		k, err := envelope.GenerateKey(algOfFlag[signing])
		if err != nil {
			return signingKey{}, err
		}
		pub, err := k.PublicJWK()
		if err != nil {
			return signingKey{}, err
		}
		return signingKey{mode: policy.SigningGateway, key: k, publicJWK: string(pub)}, nil
	case "device":
		k, priv, err := devicePublicKey(pubKeyFile)
		if err != nil {
			return signingKey{}, err
		}
		pub, err := k.PublicJWK()
		if err != nil {
			return signingKey{}, err
		}
		return signingKey{mode: policy.SigningDevice, key: k.Public(), publicJWK: string(pub), devicePrivate: priv}, nil
	}
	return signingKey{}, fmt.Errorf("--signing %q: want hs256, ed25519, es256 or device", signing)
}

// devicePublicKey reads the device's public key from file, or generates an
// Ed25519 key for the device when file is "" (priv is then its private JWK).
func devicePublicKey(file string) (k envelope.Key, priv string, err error) {
	if file == "" {
		k, err = envelope.GenerateKey(envelope.AlgEdDSA)
		if err != nil {
			return envelope.Key{}, "", err
		}
		b, err := k.PrivateJWK()
		return k, string(b), err
	}
	b, err := os.ReadFile(file)
	if err != nil {
		return envelope.Key{}, "", fmt.Errorf("--public-key: %w", err)
	}
	if len(b) > envelope.MaxKeyBytes {
		return envelope.Key{}, "", fmt.Errorf("--public-key %s: too large", file)
	}
	k, err = envelope.ParseKey(b)
	if err != nil {
		return envelope.Key{}, "", fmt.Errorf("--public-key %s: %w", file, err)
	}
	if k.CanSign() {
		// Refuse rather than silently register a key whose private half
		// has been copied around.
		return envelope.Key{}, "", fmt.Errorf("--public-key %s holds a private key: give the public key only", file)
	}
	return k, "", nil
}

// rotateKey registers a new key for a device: a new gateway-held key when
// the gateway holds the device's key, else the device's new public key.
// The old keys stay registered, so older readings stay verifiable; the
// gateway signs with the new key once the policy names it.
func rotateKey(ctx context.Context, q *queue.Queue, dir *centralsync.Directory, id, broker string, reg *centralsync.Registry,
	alg, pubKeyFile, keysOut string, stdout io.Writer) error {
	entry, inReg, err := reg.Get(id)
	if err != nil {
		return fmt.Errorf("device rotate-key: %w", err)
	}
	if broker == "" {
		broker = entry.Broker
	}
	if broker == "" {
		return &exitError{Code: 2, Err: fmt.Errorf("device rotate-key: --broker is required: the registry does not know the broker of %s", id)}
	}
	held, err := keys.LoadDeviceKeys(q, id)
	if err != nil {
		return fmt.Errorf("device rotate-key: %w", err)
	}
	var (
		newKey envelope.Key
		priv   string
	)
	switch {
	case len(held) > 0:
		if pubKeyFile != "" {
			return &exitError{Code: 2, Err: fmt.Errorf("device rotate-key: the gateway signs for %s: --public-key does not apply", id)}
		}
		a := held[0].Alg()
		if alg != "" {
			if a = algOfFlag[alg]; a == "" {
				return &exitError{Code: 2, Err: fmt.Errorf("device rotate-key: --alg %q: want ed25519 or es256", alg)}
			}
		}
		if newKey, err = envelope.GenerateKey(a); err != nil {
			return err
		}
		if err := keys.PutDeviceKeys(q, id, append([]envelope.Key{newKey}, held...)); err != nil {
			return fmt.Errorf("device rotate-key: store the new key: %w", err)
		}
	case pubKeyFile == "" && keysOut == "":
		return &exitError{Code: 2, Err: fmt.Errorf("device rotate-key: the gateway holds no key of %s: give the device's new --public-key FILE, or --keys-out FILE", id)}
	default:
		if newKey, priv, err = devicePublicKey(pubKeyFile); err != nil {
			return &exitError{Code: 2, Err: fmt.Errorf("device rotate-key: %w", err)}
		}
		if priv != "" {
			data := fmt.Sprintf("# the device's new private signing key (JWK, kid %s): provision it, then delete this file\nprivate_key: '%s'\n", newKey.ID(), priv)
			if err := writeFileAtomic(keysOut, []byte(data), 0o600); err != nil {
				return fmt.Errorf("device rotate-key: --keys-out: %w", err)
			}
		}
	}
	pub, err := newKey.PublicJWK()
	if err != nil {
		return err
	}
	res, err := dir.UpdatePublicKey(ctx, id, broker, string(pub))
	if err != nil {
		if len(held) > 0 {
			// Not registered: the new key must not linger as the newest.
			if rerr := keys.PutDeviceKeys(q, id, held); rerr != nil {
				err = errors.Join(err, fmt.Errorf("restore the previous key: %w", rerr))
			}
		} else if priv != "" {
			os.Remove(keysOut)
		}
		return fmt.Errorf("device rotate-key: %w", err)
	}
	if inReg {
		// The registry is where the stock policy source finds the keys.
		keys := append([]json.RawMessage{json.RawMessage(pub)}, entry.PublicKeys...)
		if len(keys) > policy.MaxPublicKeys {
			keys = keys[:policy.MaxPublicKeys]
		}
		entry.PublicKeys, entry.UpdatedAt = keys, time.Time{}
		if err := reg.Put(ctx, entry); err != nil {
			return fmt.Errorf("device rotate-key: registered, but the gateway's registry was not written: %w", err)
		}
	}
	if res.Warning != "" {
		fmt.Fprintf(stdout, "!! warning: %s\n", res.Warning)
	}
	fmt.Fprintf(stdout, "Registered a new %s key %s for device %s; the previous keys stay registered for older readings.\n", newKey.Alg(), newKey.ID(), id)
	if len(held) > 0 {
		fmt.Fprintf(stdout, "  the gateway signs with it once its policy lists it")
	} else {
		fmt.Fprintf(stdout, "  the gateway accepts readings signed with it once its policy lists it")
	}
	if res.Nudged {
		fmt.Fprintln(stdout, " (the gateway was told to sync now)")
	} else {
		fmt.Fprintln(stdout, " (at the next poll)")
	}
	return nil
}
