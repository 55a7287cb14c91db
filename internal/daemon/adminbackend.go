package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/edgegate/edgegate/internal/admin"
	"github.com/edgegate/edgegate/internal/command"
	"github.com/edgegate/edgegate/internal/queue"
	"github.com/edgegate/edgegate/internal/uplink"
	"github.com/edgegate/edgegate/mqtt"
	"github.com/edgegate/edgegate/policy"
	"github.com/edgegate/edgegate/radio"
	"github.com/edgegate/edgegate/radio/modbus"
	centralsync "github.com/edgegate/edgegate/sync"
)

// deviceStats counts, per registered device, what the pipeline did with its
// readings, for `edgegate status`. Only registered devices get an entry, so
// the map is bounded by the policy.
type deviceStats struct {
	mu sync.Mutex
	m  map[string]*deviceCount
}

type deviceCount struct {
	lastSeen          time.Time
	ingested, refused uint64
}

func newDeviceStats() *deviceStats { return &deviceStats{m: map[string]*deviceCount{}} }

func (s *deviceStats) observe(known func(string) bool) func(device string, queued bool) {
	return func(device string, queued bool) {
		if !known(device) {
			return
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		c := s.m[device]
		if c == nil {
			c = &deviceCount{}
			s.m[device] = c
		}
		c.lastSeen = time.Now()
		if queued {
			c.ingested++
		} else {
			c.refused++
		}
	}
}

func (s *deviceStats) get(device string) deviceCount {
	s.mu.Lock()
	defer s.mu.Unlock()
	if c := s.m[device]; c != nil {
		return *c
	}
	return deviceCount{}
}

// adminBackend answers the local admin API from the running daemon.
type adminBackend struct {
	d         *Daemon
	q         *queue.Queue
	engine    *policy.Engine
	syncer    *centralsync.Syncer // nil with policy.source config
	radio     *radio.Manager      // nil without radio ports
	mon       *stallMonitor
	stats     *deviceStats
	missing   func() []uplink.DeviceMissing // attributes the devices' entities lack
	reset     func()                        // asks the daemon to stop and wipe its state
	paired    bool
	mqttAddrs string
	devAdmin  *DeviceAdmin // device registration (devices.go)
	appAdmin  *AppAdmin    // app accounts of an external Mosquitto (apps.go)
	// Readiness (ready.go): what the daemon still waits for; whether the
	// external ingest is subscribed now (nil: the embedded broker); the
	// manager of Mosquitto's accounts (nil unless accounts: dynsec).
	ready      *readiness
	ingestLive func() bool
	accounts   *mqtt.Dynsec
	// The downlink (nil unless commands.enabled) and the Modbus master
	// (nil without radio.modbus).
	commands *command.Service
	modbus   *modbus.Master
}

// The app endpoints (admin.AppBackend) are AppAdmin's.

func (b *adminBackend) AddApp(ctx context.Context, req admin.AppAddRequest) (admin.AppInfo, error) {
	if b.appAdmin == nil {
		return admin.AppInfo{}, bad(ErrNoAppAccounts)
	}
	return b.appAdmin.AddApp(ctx, req)
}

func (b *adminBackend) RemoveApp(ctx context.Context, user string) (admin.AppInfo, error) {
	if b.appAdmin == nil {
		return admin.AppInfo{}, bad(ErrNoAppAccounts)
	}
	return b.appAdmin.RemoveApp(ctx, user)
}

func (b *adminBackend) ListApps(ctx context.Context) (admin.AppList, error) {
	if b.appAdmin == nil {
		return admin.AppList{}, bad(ErrNoAppAccounts)
	}
	return b.appAdmin.ListApps(ctx)
}

// The device endpoints (admin.DeviceBackend) are DeviceAdmin's.

func (b *adminBackend) AddDevice(ctx context.Context, req admin.DeviceAddRequest) (admin.DeviceResult, error) {
	return b.devAdmin.AddDevice(ctx, req)
}

func (b *adminBackend) UpdateDevice(ctx context.Context, req admin.DeviceUpdateRequest) (admin.DeviceResult, error) {
	return b.devAdmin.UpdateDevice(ctx, req)
}

func (b *adminBackend) RemoveDevice(ctx context.Context, id, broker string) (admin.DeviceResult, error) {
	return b.devAdmin.RemoveDevice(ctx, id, broker)
}

func (b *adminBackend) BindDevice(ctx context.Context, req admin.DeviceBindRequest) (admin.DeviceResult, error) {
	return b.devAdmin.BindDevice(ctx, req)
}

func (b *adminBackend) ListDevices(ctx context.Context) (admin.DeviceList, error) {
	return b.devAdmin.ListDevices(ctx)
}

func (b *adminBackend) Status(ctx context.Context) admin.Status {
	now := time.Now()
	st := admin.Status{GatewayID: b.d.gateway, Version: Version, Now: now, Paired: b.paired}
	if b.d.identity != nil {
		st.IdentityThumbprint = b.d.identity.Thumbprint()
	}
	p := b.engine.Current()
	st.Policy = admin.PolicyStatus{Version: p.Version, Source: p.Source, ExpiresAt: p.ExpiresAt}
	if b.syncer != nil {
		ss := b.syncer.Status()
		st.Policy.AppliedAt = ss.AppliedAt
		if r := ss.LastRefusal; r != nil {
			st.Policy.LastRefusal = &admin.Refusal{At: r.At, Reason: r.Reason}
		}
		for _, u := range ss.Unusable {
			st.Policy.Unusable = append(st.Policy.Unusable, admin.UnusableDevice{ID: u.ID, Missing: u.Missing, Fix: u.Fix})
		}
		st.Stages = append(st.Stages, admin.StageStatus{Name: "central (policy sync)",
			Healthy: !strings.HasPrefix(ss.LastFetchResult, "error"),
			Detail:  syncDetail(ss)})
		if k := ss.Keys; k != nil {
			// Key rollover (sync/keyset.go): when the companion's keys can
			// no longer be followed only pairing again helps; say so.
			detail := fmt.Sprintf("%d pinned", len(k.Pinned))
			if k.LastResult != "" {
				detail += ", last check: " + k.LastResult
			}
			if k.RePair {
				detail = "the companion retired every policy key this gateway pins: pair again (edgegate pair --force)"
			}
			st.Stages = append(st.Stages, admin.StageStatus{Name: "central policy keys", Healthy: !k.RePair, Detail: detail})
		}
		if b.d.cfg.Policy.PushURL != "" {
			st.Stages = append(st.Stages, admin.StageStatus{Name: "central push channel", Healthy: ss.PushConnected,
				Detail: map[bool]string{true: "connected", false: "not connected"}[ss.PushConnected]})
		}
	}
	if p.Expired(now, b.d.cfg.Policy.ExpiryGrace) {
		st.Stages = append(st.Stages, admin.StageStatus{Name: "policy", Healthy: false,
			Detail: "expired beyond its grace: readings are held, not forwarded"})
	}
	health := "making progress"
	err := b.mon.healthy()
	if err != nil {
		health = err.Error()
	}
	st.Stages = append(st.Stages, admin.StageStatus{Name: "queue and uplink", Healthy: err == nil, Detail: health})
	if b.ready != nil {
		st.NotReady = b.ready.waiting()
	}
	st.Stages = append(st.Stages, b.mqttStages(ctx)...)
	if b.radio != nil {
		for _, ps := range b.radio.Ports() {
			detail := fmt.Sprintf("%s, %d frames ok, %d bad, %d reconnects", ps.Codec, ps.FramesOK, ps.FramesBad, ps.Reconnects)
			if ps.LastError != "" {
				detail += ", last error: " + ps.LastError
			}
			st.Stages = append(st.Stages, admin.StageStatus{Name: "radio " + ps.Path, Healthy: ps.Open, Detail: detail})
		}
		for _, n := range b.radio.Pending() {
			rn := admin.RadioNode{Port: n.Port, Node: n.Node, Sketch: n.Sketch, LastSeen: n.LastSeen}
			for _, c := range n.Children {
				rn.Children = append(rn.Children, c.ID)
			}
			st.PendingNodes = append(st.PendingNodes, rn)
		}
	}
	qs := b.q.Stats()
	st.Queue = admin.QueueStatus{Depth: qs.Depth, DeadLetters: qs.DeadLetters, DiskBytes: qs.DiskBytes, QuotaBytes: qs.QuotaBytes}
	for _, bs := range qs.Brokers {
		st.Queue.Brokers = append(st.Queue.Brokers, admin.BrokerQueue{Broker: bs.Broker, Depth: bs.Depth, Bytes: bs.Bytes, Oldest: bs.Oldest})
	}
	missing := map[string]uplink.DeviceMissing{}
	if b.missing != nil {
		for _, m := range b.missing() {
			missing[m.Device] = m
		}
	}
	for _, dv := range p.Devices() {
		c := b.stats.get(dv.ID)
		st.Devices = append(st.Devices, admin.DeviceStatus{ID: dv.ID, Owner: dv.Owner, LastSeen: c.lastSeen,
			Ingested: c.ingested, Refused: c.refused, MissingAttrs: missing[dv.ID].Attrs})
	}
	sort.Slice(st.Devices, func(i, j int) bool { return st.Devices[i].ID < st.Devices[j].ID })
	st.Commands = commandsStatus(b.commands)
	if b.modbus != nil {
		for _, s := range b.modbus.Status() {
			st.Modbus = append(st.Modbus, admin.ModbusStatus{Device: s.Device, Line: s.Line, Unit: s.Unit,
				Polls: s.Polls, Writes: s.Writes, Errors: s.Errors, LastOK: s.LastOK, LastError: s.LastError})
		}
	}
	return st
}

// commandsStatus counts the downlink's records by state
// (command.Service.Commands) and its counters since start (Stats).
func commandsStatus(svc *command.Service) admin.CommandsStatus {
	if svc == nil {
		return admin.CommandsStatus{}
	}
	ks := svc.Stats()
	cs := admin.CommandsStatus{Enabled: true, Learned: ks.Learned + ks.Local, SendErrors: ks.SendErrors, PollErrors: ks.PollErrors,
		Learning: svc.Learning().String()}
	recs, err := svc.Commands()
	if err != nil {
		cs.Error = err.Error()
	}
	for _, c := range recs {
		switch c.State {
		case command.Pending:
			cs.Pending++
		case command.Sent:
			cs.Sent++
		case command.Delivered:
			cs.Delivered++
		case command.Confirmed:
			cs.Confirmed++
		case command.Expired:
			cs.Expired++
		case command.Dropped:
			cs.Dropped++
		}
	}
	return cs
}

func syncDetail(ss centralsync.SyncStatus) string {
	s := "source " + ss.Source
	if !ss.LastFetch.IsZero() {
		s += ", last fetch " + ss.LastFetch.UTC().Format(time.RFC3339)
	}
	if ss.LastFetchResult != "" {
		s += ": " + ss.LastFetchResult
	}
	return s
}

// devices resolves a selector to device ids: one device, or every device
// the owner has in the policy in force.
func (b *adminBackend) devices(sel admin.Selector) ([]string, error) {
	if sel.Device != "" {
		return []string{sel.Device}, nil
	}
	var ids []string
	for _, dv := range b.engine.Current().Devices() {
		if dv.Owner == sel.Owner {
			ids = append(ids, dv.ID)
		}
	}
	if len(ids) == 0 {
		return nil, fmt.Errorf("owner %s: %w", sel.Owner, admin.ErrNotFound)
	}
	return ids, nil
}

func (b *adminBackend) Export(ctx context.Context, sel admin.Selector, w io.Writer) (admin.ExportReport, error) {
	ids, err := b.devices(sel)
	rep := admin.ExportReport{Selector: sel, Devices: ids}
	if err != nil {
		return rep, err
	}
	for _, id := range ids {
		n, err := b.q.ExportNDJSON(ctx, id, w)
		rep.Records += n
		if err != nil {
			return rep, err
		}
	}
	return rep, nil
}

func (b *adminBackend) Erase(ctx context.Context, sel admin.Selector) (admin.EraseReport, error) {
	ids, err := b.devices(sel)
	rep := admin.EraseReport{Selector: sel}
	if err != nil {
		return rep, err
	}
	for _, id := range ids {
		r, err := b.q.EraseDevice(id)
		rep.Devices = append(rep.Devices, admin.DeviceErasure{Device: id, Queued: r.Queued, DeadLetters: r.DeadLetters,
			Unsealed: r.Unsealed, KeyDestroyed: r.KeyDestroyed, Compacted: r.Compacted})
		if err != nil {
			return rep, err
		}
	}
	return rep, nil
}

// FactoryReset stops the daemon; once the store is closed, Run wipes the
// state directory (queue, keys, pairing, caches) and exits.
func (b *adminBackend) FactoryReset(ctx context.Context) error {
	if b.reset == nil {
		return errors.New("factory reset is not available")
	}
	b.reset()
	return nil
}

func (b *adminBackend) Reload(ctx context.Context) error {
	b.d.reload()
	return nil
}

// wipeState removes everything under the state directory but the directory
// itself (systemd's StateDirectory owns it) and the policy's anti-rollback
// floor (centralsync.FloorFileName): a factory reset unpairs the gateway,
// but the floor must never go down, or an old bundle signed by keys the
// configuration still pins could roll the policy back after the reset
// (see FloorFileName for why keeping it costs nothing).
func wipeState(dir string) error {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	var errs []error
	for _, e := range entries {
		if e.Name() == centralsync.FloorFileName {
			continue
		}
		if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// mqttStages describes the local MQTT link; in external mode, whether the
// ingest subscription exists now, and whether the broker's accounts match
// the policy — read back from the broker on each call, so `edgegate doctor`
// sees drift made since the last repair.
func (b *adminBackend) mqttStages(ctx context.Context) []admin.StageStatus {
	link := admin.StageStatus{Name: "local MQTT broker", Healthy: true, Detail: b.d.cfg.MQTT.Mode + ", " + b.mqttAddrs}
	if b.ingestLive == nil {
		return []admin.StageStatus{link}
	}
	if !b.ingestLive() {
		link.Healthy = false
		link.Detail += ": not subscribed (readings are not taken in)"
	} else {
		link.Detail += ": subscribed"
	}
	acc := admin.StageStatus{Name: AccountsStage}
	switch {
	case b.accounts == nil:
		acc.Detail = "not managed (mqtt.external.accounts: none): the broker's ACL is not tied to the policy"
	default:
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		issues, err := b.accounts.Check(cctx)
		switch {
		case err != nil:
			acc.Detail = "cannot read the broker's accounts back: " + err.Error()
		case len(issues) > 0:
			acc.Detail = fmt.Sprintf("%d differences from the policy: %s", len(issues), strings.Join(issues, "; "))
		default:
			acc.Healthy = true
			acc.Detail = "in line with the policy (dynsec)"
		}
	}
	return []admin.StageStatus{link, acc}
}

// AccountsStage is the status stage of Mosquitto's accounts; doctor reads it.
const AccountsStage = "Mosquitto accounts"
