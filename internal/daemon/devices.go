package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/edgegate/edgegate/internal/admin"
	"github.com/edgegate/edgegate/internal/config"
	"github.com/edgegate/edgegate/internal/envelope"
	"github.com/edgegate/edgegate/internal/keys"
	"github.com/edgegate/edgegate/policy"
	centralsync "github.com/edgegate/edgegate/sync"
)

// DeviceStore is what device registration needs of the encrypted store
// (queue.Queue): the registry record and the gateway-held device keys.
type DeviceStore interface {
	GetState(name string) ([]byte, bool, error)
	PutState(name string, v []byte) error
	DeleteState(name string) error
}

// DeviceAdmin registers devices: in the IoT directory (device.php, with the
// paired account's token) and in the gateway's own registry; then it asks
// the policy sync to run, so that a new device is in force at once. The
// running daemon serves it on the admin socket; `edgegate device` uses it
// directly on the store when the daemon is not running. One code path
// either way.
type DeviceAdmin struct {
	Store    DeviceStore
	Registry *centralsync.Registry
	// Directory is nil when the gateway is not paired: add, update and
	// remove then fail with admin.ErrNotPaired; bind and list work.
	Directory *centralsync.Directory
	Gateway   string // this gateway's id, in edgegateway_uri
	User      string // the paired account, for messages
	// Nudge asks the policy sync to run now; nil: none (not running).
	Nudge  func()
	Logger *slog.Logger
}

func (a *DeviceAdmin) log() *slog.Logger { return orDiscard(a.Logger) }

// orDiscard is l, or a logger that drops everything when l is nil.
func orDiscard(l *slog.Logger) *slog.Logger {
	if l == nil {
		return slog.New(slog.DiscardHandler)
	}
	return l
}

func bad(err error) error { return fmt.Errorf("%w: %w", admin.ErrBadRequest, err) }

// upstream marks a refusal of the central service (a 502 on the socket).
func upstream(err error) error {
	var de *centralsync.DirectoryError
	switch {
	case errors.Is(err, centralsync.ErrNoSuchDevice):
		return fmt.Errorf("%w: %w", admin.ErrNotFound, err)
	case errors.As(err, &de):
		return fmt.Errorf("%w: %w", admin.ErrUpstream, err)
	}
	return err
}

func (a *DeviceAdmin) nudge() bool {
	if a.Nudge == nil {
		return false
	}
	a.Nudge()
	return true
}

func registryBinding(b admin.DeviceBinding) (*policy.RadioBinding, bool, error) {
	if b.RadioPort != "" {
		if b.MQTT {
			return nil, false, errors.New("--radio-port and --mqtt exclude each other")
		}
		if b.RadioNode < -1 || b.RadioNode > 254 || b.RadioChild < -1 || b.RadioChild > 254 {
			return nil, false, errors.New("radio node and child must be in 0..254 (-1: any)")
		}
		return &policy.RadioBinding{Port: b.RadioPort, Node: b.RadioNode, Child: b.RadioChild}, false, nil
	}
	// No port: the local MQTT link (node and child mean nothing there).
	return nil, true, nil
}

// signingOf checks the keys of a signing mode: the gateway-held private key
// (gateway) or the device's public key (device).
func signingOf(mode, privJWK, pubJWK string) (priv envelope.Key, pub string, err error) {
	switch mode {
	case "", policy.SigningHS256:
		if privJWK != "" || pubJWK != "" {
			return envelope.Key{}, "", errors.New("hs256 signing takes no key")
		}
		return envelope.Key{}, "", nil
	case policy.SigningGateway:
		k, err := envelope.ParseKey([]byte(privJWK))
		if err != nil || !k.CanSign() || !k.Asymmetric() {
			return envelope.Key{}, "", errors.New("gateway signing needs the private key (an EdDSA or ES256 JWK)")
		}
		p, err := k.PublicJWK()
		return k, string(p), err
	case policy.SigningDevice:
		k, err := envelope.ParseKey([]byte(pubJWK))
		if err != nil || k.CanSign() || !k.Asymmetric() {
			return envelope.Key{}, "", errors.New("device signing needs the device's public key only (a JWK)")
		}
		p, err := k.PublicJWK()
		return envelope.Key{}, string(p), err
	}
	return envelope.Key{}, "", fmt.Errorf("signing %q: want hs256, gateway or device", mode)
}

func describeSigning(mode, pub string) string {
	var kid, alg string
	if pub != "" {
		if k, err := envelope.ParseKey([]byte(pub)); err == nil {
			kid, alg = k.ID(), k.Alg()
		}
	}
	switch mode {
	case policy.SigningGateway:
		return fmt.Sprintf("%s, by the gateway (key %s in the encrypted store)", alg, kid)
	case policy.SigningDevice:
		return fmt.Sprintf("%s, by the device itself (public key %s)", alg, kid)
	}
	return "HS256, by the gateway (key derived from K1/K2)"
}

func dirAttrs(in []admin.DeviceAttr) []centralsync.DeviceAttr {
	out := make([]centralsync.DeviceAttr, 0, len(in))
	for _, a := range in {
		out = append(out, centralsync.DeviceAttr{Name: a.Name, DataType: a.DataType, Type: a.ValueType, Unit: a.Unit,
			Editable: "0", HealthinessCriteria: a.Healthiness, HealthinessValue: a.HealthinessValue})
	}
	return out
}

func attrNames(in []centralsync.DeviceAttr) []string {
	var out []string
	for _, a := range in {
		out = append(out, a.Name)
	}
	return out
}

func (a *DeviceAdmin) result(res centralsync.Result, out *admin.DeviceResult) {
	if res.Warning != "" {
		out.Warnings = append(out.Warnings, res.Warning)
	}
	out.OwnershipChecked, out.OwnershipMissing, out.ElementID = res.OwnershipChecked, res.OwnershipMissing, res.ElementID
}

// AddDevice inserts the device in the IoT directory, confirms its ownership
// row and records it in the registry.
func (a *DeviceAdmin) AddDevice(ctx context.Context, req admin.DeviceAddRequest) (admin.DeviceResult, error) {
	if a.Directory == nil {
		return admin.DeviceResult{}, admin.ErrNotPaired
	}
	radio, mqtt, err := registryBinding(req.Binding)
	if err != nil {
		return admin.DeviceResult{}, bad(err)
	}
	priv, pub, err := signingOf(req.Signing, req.SigningKey, req.PublicKey)
	if err != nil {
		return admin.DeviceResult{}, bad(err)
	}
	spec := centralsync.DeviceSpec{ID: req.ID, Type: req.Type, ContextBroker: req.Broker, Kind: req.Kind, Format: req.Format,
		Model: req.Model, Producer: req.Producer, Latitude: req.Latitude, Longitude: req.Longitude, Frequency: req.Frequency,
		K1: req.K1, K2: req.K2, Attributes: dirAttrs(req.Attributes), Gateway: a.Gateway,
		RadioPort: req.Binding.RadioPort, RadioNode: req.Binding.RadioNode, RadioChild: req.Binding.RadioChild,
		Signing: req.Signing, PublicKey: pub}
	if err := spec.Validate(); err != nil {
		return admin.DeviceResult{}, bad(err)
	}
	entry := centralsync.RegistryEntry{ID: req.ID, Type: req.Type, Broker: req.Broker, Radio: radio, MQTT: mqtt,
		Signing: req.Signing, Attributes: attrNames(spec.Attributes), Kind: req.Kind}
	if pub != "" {
		entry.PublicKeys = []json.RawMessage{json.RawMessage(pub)}
	}
	if err := entry.Validate(); err != nil {
		return admin.DeviceResult{}, bad(err)
	}
	if req.Signing == policy.SigningGateway {
		// The private key is in the store before the public one is
		// registered: a registered key nobody holds cannot sign.
		if err := keys.PutDeviceKeys(a.Store, req.ID, []envelope.Key{priv}); err != nil {
			return admin.DeviceResult{}, fmt.Errorf("store the device key: %w", err)
		}
	}
	// The registry entry goes in before the insert: a policy sync that
	// sees the new ownership row then also finds its type and binding
	// (stock rows carry neither). Undone when the insert fails.
	prev, hadPrev, err := a.Registry.Get(req.ID)
	if err == nil {
		err = a.Registry.Put(ctx, entry)
	}
	if err != nil {
		if req.Signing == policy.SigningGateway {
			_ = keys.DeleteDeviceKeys(a.Store, req.ID)
		}
		return admin.DeviceResult{}, fmt.Errorf("the gateway's device registry: %w", err)
	}
	res, err := a.Directory.Insert(ctx, spec)
	if err != nil {
		if req.Signing == policy.SigningGateway {
			_ = keys.DeleteDeviceKeys(a.Store, req.ID)
		}
		var rerr error
		if hadPrev {
			rerr = a.Registry.Put(ctx, prev)
		} else {
			_, rerr = a.Registry.Delete(req.ID)
		}
		if rerr != nil {
			a.log().Warn("could not undo the registry entry of a refused device", "device", req.ID, "err", rerr)
		}
		return admin.DeviceResult{}, upstream(err)
	}
	out := admin.DeviceResult{ID: req.ID, Action: "added", Type: req.Type, Broker: req.Broker, Binding: req.Binding.String(),
		Signing: describeSigning(req.Signing, pub), User: a.User, Gateway: a.Gateway, Registry: true}
	a.result(res, &out)
	out.SyncNudged = a.nudge()
	a.log().Info("device added", "device", req.ID, "type", req.Type, "broker", req.Broker,
		"ownership_missing", out.OwnershipMissing, "warnings", len(out.Warnings))
	return out, nil
}

// UpdateDevice changes a device the account owns (the whole device is
// sent back to the directory) and its registry entry.
func (a *DeviceAdmin) UpdateDevice(ctx context.Context, req admin.DeviceUpdateRequest) (admin.DeviceResult, error) {
	if a.Directory == nil {
		return admin.DeviceResult{}, admin.ErrNotPaired
	}
	if err := centralsync.ValidateDeviceID(req.ID); err != nil {
		return admin.DeviceResult{}, bad(err)
	}
	entry, inReg, err := a.Registry.Get(req.ID)
	if err != nil {
		return admin.DeviceResult{}, err
	}
	broker := req.Broker
	if broker == "" {
		broker = entry.Broker
	}
	if broker == "" {
		return admin.DeviceResult{}, bad(errors.New("--broker is required: the registry does not know the device's broker"))
	}
	var radio *policy.RadioBinding
	var mqtt bool
	if req.Binding != nil {
		if radio, mqtt, err = registryBinding(*req.Binding); err != nil {
			return admin.DeviceResult{}, bad(err)
		}
	}
	var final centralsync.DeviceSpec
	res, err := a.Directory.Update(ctx, req.ID, broker, func(d *centralsync.DeviceSpec) error {
		if req.Type != nil {
			d.Type = *req.Type
		}
		if req.Latitude != nil {
			d.Latitude = *req.Latitude
		}
		if req.Longitude != nil {
			d.Longitude = *req.Longitude
		}
		if req.Frequency != nil {
			d.Frequency = *req.Frequency
		}
		if req.Binding != nil {
			d.EdgeType, d.EdgeURIRaw = "", ""
			d.Gateway = a.Gateway
			d.RadioPort, d.RadioNode, d.RadioChild = req.Binding.RadioPort, req.Binding.RadioNode, req.Binding.RadioChild
			d.Signing = entry.Signing
		}
		for _, name := range req.RemoveAttributes {
			i := slices.IndexFunc(d.Attributes, func(x centralsync.DeviceAttr) bool { return x.Name == name })
			if i < 0 {
				return fmt.Errorf("attribute %q is not in the device's model", name)
			}
			d.Attributes = slices.Delete(d.Attributes, i, i+1)
		}
		d.Attributes = append(d.Attributes, dirAttrs(req.AddAttributes)...)
		final = *d
		return nil
	})
	if err != nil {
		if errors.Is(err, centralsync.ErrInvalidDevice) {
			return admin.DeviceResult{}, bad(err)
		}
		return admin.DeviceResult{}, upstream(err)
	}
	out := admin.DeviceResult{ID: req.ID, Action: "updated", Type: final.Type, Broker: broker, User: a.User, Gateway: a.Gateway}
	a.result(res, &out)
	switch {
	case !inReg && req.Binding == nil:
		// No local binding is known: an entry without one would be
		// guessed, so none is written.
		out.Warnings = append(out.Warnings, fmt.Sprintf("the gateway's registry has no entry for %s: edgegate device bind %s --type %s --mqtt|--radio-port P", req.ID, req.ID, final.Type))
	default:
		if !inReg {
			entry = centralsync.RegistryEntry{ID: req.ID}
		}
		entry.Type, entry.Broker, entry.Attributes, entry.UpdatedAt = final.Type, broker, attrNames(final.Attributes), time.Time{}
		if req.Binding != nil {
			entry.Radio, entry.MQTT = radio, mqtt
		}
		if err := a.Registry.Put(ctx, entry); err != nil {
			out.Warnings = append(out.Warnings, fmt.Sprintf("updated, but the gateway's registry was not written: %v", err))
		} else {
			out.Registry = true
		}
	}
	out.Binding = bindingOf(entry)
	out.SyncNudged = a.nudge()
	a.log().Info("device updated", "device", req.ID, "broker", broker)
	return out, nil
}

// RemoveDevice deletes an owned device from the directory (entity and
// ownership row) and forgets it locally; a device bound as delegated is
// only forgotten locally (it is not the account's to delete).
func (a *DeviceAdmin) RemoveDevice(ctx context.Context, id, broker string) (admin.DeviceResult, error) {
	if err := centralsync.ValidateDeviceID(id); err != nil {
		return admin.DeviceResult{}, bad(err)
	}
	entry, inReg, err := a.Registry.Get(id)
	if err != nil {
		return admin.DeviceResult{}, err
	}
	if broker == "" {
		broker = entry.Broker
	}
	out := admin.DeviceResult{ID: id, Action: "removed", Broker: broker}
	if !(inReg && entry.Delegated) {
		if a.Directory == nil {
			return admin.DeviceResult{}, admin.ErrNotPaired
		}
		if broker == "" {
			return admin.DeviceResult{}, bad(errors.New("--broker is required: the registry does not know the device's broker"))
		}
		res, err := a.Directory.Delete(ctx, id, broker)
		if err != nil {
			return admin.DeviceResult{}, upstream(err)
		}
		a.result(res, &out)
	} else {
		out.Warnings = append(out.Warnings, "a delegated device: forgotten by this gateway; the IoT directory was not changed")
	}
	if err := keys.DeleteDeviceKeys(a.Store, id); err != nil {
		out.Warnings = append(out.Warnings, fmt.Sprintf("the gateway-held key was not forgotten: %v", err))
	}
	if _, err := a.Registry.Delete(id); err != nil {
		out.Warnings = append(out.Warnings, fmt.Sprintf("the gateway's registry was not written: %v", err))
	} else {
		out.Registry = true
	}
	out.SyncNudged = a.nudge()
	a.log().Info("device removed", "device", id, "broker", broker)
	return out, nil
}

// BindDevice records a device registered elsewhere in the registry only.
// When the directory can be asked, it says whether the account owns the
// device or has it delegated.
func (a *DeviceAdmin) BindDevice(ctx context.Context, req admin.DeviceBindRequest) (admin.DeviceResult, error) {
	radio, mqtt, err := registryBinding(req.Binding)
	if err != nil {
		return admin.DeviceResult{}, bad(err)
	}
	_, pub, err := signingOf(req.Signing, "", req.PublicKey)
	if err != nil {
		return admin.DeviceResult{}, bad(err)
	}
	entry := centralsync.RegistryEntry{ID: req.ID, Type: req.Type, Broker: req.Broker, Radio: radio, MQTT: mqtt,
		Signing: req.Signing, Attributes: req.Attributes, K1: req.K1, K2: req.K2, Delegated: req.K1 != "",
		Kind: req.Kind, Writable: req.Writable}
	if pub != "" {
		entry.PublicKeys = []json.RawMessage{json.RawMessage(pub)}
	}
	if err := entry.Validate(); err != nil {
		return admin.DeviceResult{}, bad(err)
	}
	out := admin.DeviceResult{ID: req.ID, Action: "bound", Type: req.Type, Broker: req.Broker, Gateway: a.Gateway,
		Signing: describeSigning(req.Signing, pub)}
	if a.Directory != nil {
		devs, err := a.Directory.List(ctx)
		switch {
		case err != nil:
			out.Warnings = append(out.Warnings, "could not ask the IoT directory whether the account owns the device: "+err.Error())
		default:
			i := slices.IndexFunc(devs, func(d centralsync.ListedDevice) bool {
				return d.ID == req.ID && (req.Broker == "" || d.ContextBroker == req.Broker)
			})
			if i < 0 {
				out.Warnings = append(out.Warnings, "the IoT directory does not list this device for the account: the broker filter will refuse its data")
			} else {
				entry.Delegated = !devs[i].Owned()
				if entry.Broker == "" {
					entry.Broker = devs[i].ContextBroker
				}
			}
		}
	}
	if entry.Delegated && entry.K1 == "" {
		out.Warnings = append(out.Warnings, "delegated, keys missing: give --k1-file, unless the delegation carries K1/K2")
	}
	if err := a.Registry.Put(ctx, entry); err != nil {
		return admin.DeviceResult{}, err
	}
	out.Registry, out.Delegated, out.Broker = true, entry.Delegated, entry.Broker
	out.Binding = bindingOf(entry)
	out.SyncNudged = a.nudge()
	a.log().Info("device bound", "device", req.ID, "type", req.Type, "delegated", entry.Delegated)
	return out, nil
}

func bindingOf(e centralsync.RegistryEntry) string {
	if e.Radio != nil {
		return admin.DeviceBinding{RadioPort: e.Radio.Port, RadioNode: e.Radio.Node, RadioChild: e.Radio.Child}.String()
	}
	if e.MQTT {
		return admin.DeviceBinding{MQTT: true}.String()
	}
	return ""
}

// ListDevices joins the directory's devices with the registry.
func (a *DeviceAdmin) ListDevices(ctx context.Context) (admin.DeviceList, error) {
	entries, err := a.Registry.List()
	if err != nil {
		return admin.DeviceList{}, err
	}
	reg := map[string]centralsync.RegistryEntry{}
	for _, e := range entries {
		reg[e.ID] = e
	}
	var l admin.DeviceList
	seen := map[string]bool{}
	if a.Directory == nil {
		l.Warning = "not paired: only the gateway's registry is shown"
	} else if devs, err := a.Directory.List(ctx); err != nil {
		l.Warning = "the IoT directory could not be read (" + err.Error() + "): only the gateway's registry is shown"
	} else {
		for _, d := range devs {
			info := admin.DeviceInfo{ID: d.ID, Type: d.Type, Broker: d.ContextBroker, InDirectory: true}
			switch {
			case d.Owned():
				info.Relation = "owned"
			case d.Visibility == "delegated":
				info.Relation = "delegated"
			default:
				info.Relation = orWord(d.Visibility, "visible")
			}
			e, ok := reg[d.ID]
			if ok {
				seen[d.ID] = true
				info.InRegistry = true
				info.Type, info.Binding, info.Signing = e.Type, bindingOf(e), e.Signing
			}
			switch {
			case info.Binding == "" && d.EdgegatewayURI != "":
				info.Binding = d.EdgegatewayURI
			case info.Binding == "" && (info.Relation == "owned" || info.Relation == "delegated"):
				info.Problems = append(info.Problems, "no binding: edgegate device bind "+d.ID+" --type "+orWord(d.Type, "T")+" --mqtt|--radio-port P")
			}
			if info.Type == "" {
				info.Problems = append(info.Problems, "no type: edgegate device bind "+d.ID+" --type T")
			}
			if info.Relation == "delegated" && (!ok || e.K1 == "") && d.K1 == "" {
				info.Problems = append(info.Problems, "delegated, keys missing: edgegate device bind "+d.ID+" --k1-file F")
			}
			if info.Relation != "owned" && info.Relation != "delegated" {
				info.Problems = append(info.Problems, "not writable by the account")
			}
			l.Devices = append(l.Devices, info)
		}
	}
	for _, e := range entries {
		if seen[e.ID] {
			continue
		}
		info := admin.DeviceInfo{ID: e.ID, Type: e.Type, Broker: e.Broker, Relation: "local", InRegistry: true,
			Binding: bindingOf(e), Signing: e.Signing}
		if e.Delegated {
			info.Relation = "delegated"
		}
		if l.Warning == "" {
			info.Problems = append(info.Problems, "not listed by the IoT directory for the account (no ownership row or delegation: IOTID limit?)")
		}
		l.Devices = append(l.Devices, info)
	}
	slices.SortFunc(l.Devices, func(x, y admin.DeviceInfo) int { return strings.Compare(x.ID, y.ID) })
	return l, nil
}

func orWord(s, w string) string {
	if s == "" {
		return w
	}
	return s
}

// AdminSocket is where the daemon of cfg listens: admin.socket, or the
// systemd RuntimeDirectory's admin.sock when the default is kept, or
// admin.sock in the state directory when not under systemd.
func AdminSocket(cfg *config.Config) string {
	return adminSocketFor(cfg.Admin.Socket, cfg.StateDir)
}

func adminSocketFor(configured, stateDir string) string {
	if configured != "" && configured != admin.DefaultSocket {
		return configured
	}
	if rd := os.Getenv("RUNTIME_DIRECTORY"); rd != "" {
		return filepath.Join(rd, "admin.sock")
	}
	if st, err := os.Stat(filepath.Dir(admin.DefaultSocket)); err == nil && st.IsDir() {
		return admin.DefaultSocket
	}
	// Not under systemd (a test, a demo, a manual run): next to the state.
	return filepath.Join(stateDir, "admin.sock")
}

// AdminSocketCandidates are the sockets a CLI tries, in order, for a
// configuration that gives admin.socket (maybe "") and a state directory:
// the CLI does not run under the daemon's RuntimeDirectory.
func AdminSocketCandidates(configured, stateDir string) []string {
	if configured != "" && configured != admin.DefaultSocket {
		return []string{configured}
	}
	return []string{admin.DefaultSocket, filepath.Join(stateDir, "admin.sock")}
}
