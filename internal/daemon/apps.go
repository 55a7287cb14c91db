package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sort"
	"sync"

	"github.com/edgegate/edgegate/internal/admin"
	"github.com/edgegate/edgegate/mqtt"
	"github.com/edgegate/edgegate/policy"
)

// appsState is the store record of the app accounts: a JSON list of
// mqtt.AppAccount (user, groups, password fingerprint; never a password).
const appsState = "mqtt-apps"

// ErrNoAppAccounts: app accounts need an external Mosquitto whose accounts
// the gateway manages (mqtt.external.accounts: dynsec).
var ErrNoAppAccounts = errors.New("app accounts need mqtt.mode external with mqtt.external.accounts: dynsec (on the embedded broker apps sign in with their SSO token)")

// AppAdmin keeps the application accounts of an external Mosquitto: the
// record in the encrypted store and the broker account (through Dynsec).
type AppAdmin struct {
	Store    DeviceStore
	Accounts *mqtt.Dynsec // nil: not managing Mosquitto's accounts
	Policy   func() *policy.Policy
	Logger   *slog.Logger

	mu sync.Mutex // one change at a time: read-modify-write of the record
}

// LoadApps reads the app accounts from the store.
func LoadApps(st DeviceStore) ([]mqtt.AppAccount, error) {
	b, ok, err := st.GetState(appsState)
	if err != nil || !ok {
		return nil, err
	}
	var apps []mqtt.AppAccount
	if err := json.Unmarshal(b, &apps); err != nil {
		return nil, fmt.Errorf("decode the app accounts record: %w", err)
	}
	return apps, nil
}

func saveApps(st DeviceStore, apps []mqtt.AppAccount) error {
	sort.Slice(apps, func(i, j int) bool { return apps[i].User < apps[j].User })
	b, err := json.Marshal(apps)
	if err != nil {
		return err
	}
	if err := st.PutState(appsState, b); err != nil {
		return fmt.Errorf("store the app accounts: %w", err)
	}
	return nil
}

// Apps is what mqtt.DynsecOptions.Apps reads.
func (a *AppAdmin) Apps() ([]mqtt.AppAccount, error) { return LoadApps(a.Store) }

func (a *AppAdmin) info(acc mqtt.AppAccount) admin.AppInfo {
	inf := admin.AppInfo{User: acc.User, Groups: acc.Groups}
	if a.Policy != nil {
		p := a.Policy()
		for _, d := range p.Devices() {
			if p.MayRead(acc.User, acc.Groups, d.ID) {
				inf.Readable++
			}
		}
	}
	return inf
}

// AddApp stores the account (fingerprint only) and creates it in the
// broker; a failure in the broker leaves the store as it was.
func (a *AppAdmin) AddApp(ctx context.Context, req admin.AppAddRequest) (admin.AppInfo, error) {
	if a.Accounts == nil {
		return admin.AppInfo{}, bad(ErrNoAppAccounts)
	}
	if err := mqtt.UsableAppUser(req.User); err != nil {
		return admin.AppInfo{}, bad(err)
	}
	if len(req.Password) < 12 {
		return admin.AppInfo{}, bad(errors.New("app password: shorter than 12 characters"))
	}
	if a.Policy != nil {
		if _, dev := a.Policy().Device(req.User); dev {
			return admin.AppInfo{}, bad(fmt.Errorf("app user %s: a device of the policy has this id", req.User))
		}
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	old, err := LoadApps(a.Store)
	if err != nil {
		return admin.AppInfo{}, err
	}
	acc := mqtt.AppAccount{User: req.User, Groups: req.Groups, Fingerprint: mqtt.AppFingerprint(req.User, req.Password)}
	next := slices.DeleteFunc(slices.Clone(old), func(x mqtt.AppAccount) bool { return x.User == req.User })
	if err := saveApps(a.Store, append(next, acc)); err != nil {
		return admin.AppInfo{}, err
	}
	if err := a.Accounts.AddApp(ctx, acc, req.Password); err != nil {
		if rerr := saveApps(a.Store, old); rerr != nil {
			err = errors.Join(err, rerr)
		}
		return admin.AppInfo{}, err
	}
	a.Accounts.Nudge()
	a.log().Info("app account added", "user", req.User)
	return a.info(acc), nil
}

// RemoveApp forgets the account and deletes it in the broker, which
// disconnects it.
func (a *AppAdmin) RemoveApp(ctx context.Context, user string) (admin.AppInfo, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	old, err := LoadApps(a.Store)
	if err != nil {
		return admin.AppInfo{}, err
	}
	i := slices.IndexFunc(old, func(x mqtt.AppAccount) bool { return x.User == user })
	if i < 0 {
		return admin.AppInfo{}, fmt.Errorf("%w: no app account %q", admin.ErrNotFound, user)
	}
	acc := old[i]
	if err := saveApps(a.Store, slices.Delete(slices.Clone(old), i, i+1)); err != nil {
		return admin.AppInfo{}, err
	}
	if a.Accounts != nil {
		// Should the broker be unreachable, the reconciliation deletes the
		// account once it is back (it is no longer in the record).
		if err := a.Accounts.RemoveApp(ctx, user); err != nil {
			a.Accounts.Nudge()
			return admin.AppInfo{}, fmt.Errorf("app %s forgotten, but its Mosquitto account will be deleted on the next reconciliation: %w", user, err)
		}
	}
	a.log().Info("app account removed", "user", user)
	return admin.AppInfo{User: acc.User, Groups: acc.Groups}, nil
}

// ListApps lists the stored accounts.
func (a *AppAdmin) ListApps(context.Context) (admin.AppList, error) {
	apps, err := LoadApps(a.Store)
	if err != nil {
		return admin.AppList{}, err
	}
	l := admin.AppList{Apps: []admin.AppInfo{}}
	for _, acc := range apps {
		l.Apps = append(l.Apps, a.info(acc))
	}
	return l, nil
}

func (a *AppAdmin) log() *slog.Logger { return orDiscard(a.Logger) }
