package mqtt

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"strings"
)

// Application accounts in external mode. Mosquitto cannot verify an SSO
// token, so an application user gets a local credential an operator
// provisions (edgegate app add USER): the gateway sends the password to
// Mosquitto once (createClient; Mosquitto keeps only its hash) and keeps
// only a fingerprint of it (AppAccount.Fingerprint) in its encrypted store.
// USER is the platform username the policy's delegations name.
//
// Each app account has one role, edgegate-app-{user}, rebuilt from the
// policy on every change:
//
//   - subscribe to the device reading filter (wildcards included), nothing
//     else;
//   - receive (publishClientReceive) only the reading topics of the devices
//     policy.MayRead lets the user read: owned, a direct read delegation, a
//     group delegation to one of the groups given at `app add --group`
//     (Mosquitto has no token to take groups from), a public (ANONYMOUS)
//     read delegation; every other device topic is denied;
//   - publish nothing.
//
// Receive is what Mosquitto checks on every delivery (the plugin's ACL
// check for MOSQ_ACL_READ is publishClientReceive), so a removed delegation
// stops the flow on a subscription made earlier: mosquitto 2.0.11 does not
// disconnect the clients of a role whose ACLs change, and it need not
// (TestMosquittoDynsecApps asserts both). Subscribing is allowed on the
// whole reading filter for that reason: what decides is the receive ACL.
// `app remove` deletes the account, which disconnects it.
const (
	appRolePrefix = "edgegate-app-"
	appMark       = managedMark + " app"
)

// AppAccount is one application account an operator provisioned. It holds
// no password: only its fingerprint (AppFingerprint), to tell whether the
// broker's account is still the one the gateway created.
type AppAccount struct {
	User        string   `json:"user"`
	Groups      []string `json:"groups,omitempty"`
	Fingerprint string   `json:"fingerprint"`
}

// AppFingerprint is what the gateway keeps of an app password (and what
// the broker account's textname carries). The user salts it, so two
// accounts with one password do not show it; an operator's own password
// must still be strong (12 characters at least): the fingerprint is a fast
// hash.
func AppFingerprint(user, password string) string { return fingerprint(user + "\x00" + password) }

// UsableAppUser reports whether user can be a Mosquitto username and a role
// name suffix.
func UsableAppUser(user string) error {
	switch {
	case user == "":
		return errors.New("app user: empty")
	case len(user) > 256:
		return errors.New("app user: longer than 256 bytes")
	case strings.ContainsAny(user, "+#/\x00"):
		return fmt.Errorf("app user %q: contains one of + # / NUL", clipName(user))
	}
	return nil
}

func appTextname(a AppAccount) string { return appMark + " pw:" + a.Fingerprint }

// appACLs: receive the readable devices' topics only (priority 10 allows
// before the priority 0 denies), subscribe to the reading filter only,
// publish nothing.
func appACLs(t Topic, readable []string) []dynACL {
	acls := make([]dynACL, 0, len(readable)+6)
	for _, id := range readable {
		acls = append(acls, dynACL{Type: "publishClientReceive", Topic: t.For(id), Priority: 10, Allow: true})
	}
	return append(acls,
		dynACL{Type: "publishClientReceive", Topic: t.Filter(), Priority: 0, Allow: false},
		// Commands are the device's alone (mosquitto_command.go).
		dynACL{Type: "publishClientReceive", Topic: t.commandFilter(), Priority: 0, Allow: false},
		dynACL{Type: "subscribePattern", Topic: t.Filter(), Priority: 5, Allow: true},
		dynACL{Type: "subscribePattern", Topic: "#", Priority: 0, Allow: false},
		dynACL{Type: "publishClientSend", Topic: "#", Priority: 0, Allow: false},
	)
}

// appReadable lists the device ids the policy lets the app user read.
func (d *Dynsec) appReadable(a AppAccount) []string {
	p := d.opts.Policy.Current()
	var out []string
	for _, dv := range p.Devices() {
		if usableDeviceID(dv.ID) && p.MayRead(a.User, a.Groups, dv.ID) {
			out = append(out, dv.ID)
		}
	}
	return out
}

func (d *Dynsec) apps() ([]AppAccount, error) {
	if d.opts.Apps == nil {
		return nil, nil
	}
	apps, err := d.opts.Apps()
	if err != nil {
		return nil, fmt.Errorf("read the app accounts: %w", err)
	}
	return apps, nil
}

// planApps compares the broker's app accounts and roles with the store and
// the policy. notes are differences the gateway cannot remove (it does not
// hold the passwords): Check shows them, Reconcile logs them.
func (d *Dynsec) planApps(st *brokerState, devices map[string]wantDevice) (steps []step, notes []string, keep map[string]bool, err error) {
	apps, err := d.apps()
	if err != nil {
		return nil, nil, nil, err
	}
	keep = map[string]bool{}
	sort.Slice(apps, func(i, j int) bool { return apps[i].User < apps[j].User })
	for _, a := range apps {
		if UsableAppUser(a.User) != nil || a.User == d.opts.Username || a.User == d.opts.IngestUser {
			notes = append(notes, "app "+clipName(a.User)+": not a usable Mosquitto username here")
			continue
		}
		if _, dev := devices[a.User]; dev {
			notes = append(notes, "app "+a.User+": a device of the policy has this id; the device keeps the account")
			continue
		}
		keep[a.User] = true
		role := appRolePrefix + a.User
		want := appACLs(d.opts.Topic, d.appReadable(a))
		if r, ok := st.roles[role]; !ok {
			steps = append(steps, step{"app " + a.User + ": no role " + role,
				[]dynCmd{{"command": "createRole", "rolename": role, "textname": managedMark, "acls": aclsArg(want)}}})
		} else if cmds := fixACLs(role, r.ACLs, want); len(cmds) > 0 {
			steps = append(steps, step{"app " + a.User + ": role " + role + " grants other devices than the policy lets " + a.User + " read", cmds})
		}
		c, ok := st.clients[a.User]
		switch {
		case !ok:
			notes = append(notes, "app "+a.User+": no account in the broker: run edgegate app add "+a.User+" again")
			continue
		case c.Textname != appTextname(a):
			notes = append(notes, "app "+a.User+": the broker's account is not the one the gateway created: run edgegate app add "+a.User+" again")
			continue
		}
		var why []string
		if len(c.Roles) != 1 || c.Roles[0].Name != role {
			why = append(why, "other roles")
		}
		if len(c.Groups) > 0 {
			why = append(why, "in groups")
		}
		if c.Disabled {
			why = append(why, "disabled")
		}
		if len(why) > 0 {
			cmds := []dynCmd{{"command": "modifyClient", "username": a.User, "roles": []map[string]any{{"rolename": role}}, "groups": []map[string]any{}}}
			if c.Disabled {
				cmds = append(cmds, dynCmd{"command": "enableClient", "username": a.User})
			}
			steps = append(steps, step{"app " + a.User + ": " + strings.Join(why, ", "), cmds})
		}
	}
	var gone []string
	for name, c := range st.clients {
		if strings.HasPrefix(c.Textname, appMark) && !keep[name] {
			if _, dev := devices[name]; !dev {
				gone = append(gone, name)
			}
		}
	}
	sort.Strings(gone)
	for _, name := range gone {
		steps = append(steps, step{"account " + name + ": its app account was removed",
			[]dynCmd{{"command": "deleteClient", "username": name}}})
	}
	var stale []string
	for name, r := range st.roles {
		if strings.HasPrefix(name, appRolePrefix) && r.Textname == managedMark && !keep[strings.TrimPrefix(name, appRolePrefix)] {
			stale = append(stale, name)
		}
	}
	sort.Strings(stale)
	for _, name := range stale {
		steps = append(steps, step{"role " + name + ": its app account was removed",
			[]dynCmd{{"command": "deleteRole", "rolename": name}}})
	}
	return steps, notes, keep, nil
}

// AddApp creates (or replaces) the broker account of an app user with
// password and its role as the policy has it now. The caller stores a
// first (the reconciliation that follows a Nudge keeps it). The password
// goes in the command payload only; errors never quote it.
func (d *Dynsec) AddApp(ctx context.Context, a AppAccount, password string) error {
	if err := UsableAppUser(a.User); err != nil {
		return err
	}
	if a.User == d.opts.Username || a.User == d.opts.IngestUser {
		return fmt.Errorf("app user %s: the gateway's own broker account", a.User)
	}
	if _, dev := d.opts.Policy.Current().Device(a.User); dev {
		return fmt.Errorf("app user %s: a device of the policy has this id", a.User)
	}
	if a.Fingerprint != AppFingerprint(a.User, password) {
		return errors.New("app account: fingerprint does not match the password")
	}
	role := appRolePrefix + a.User
	rs, err := d.do(ctx, []dynCmd{
		{"command": "deleteClient", "username": a.User},
		{"command": "deleteRole", "rolename": role},
		{"command": "createRole", "rolename": role, "textname": managedMark, "acls": aclsArg(appACLs(d.opts.Topic, d.appReadable(a)))},
		{"command": "createClient", "username": a.User, "password": password, "textname": appTextname(a),
			"roles": []map[string]any{{"rolename": role}}},
	})
	if err != nil {
		return fmt.Errorf("create the Mosquitto account of app %s: %w", a.User, err)
	}
	for _, r := range rs[2:] {
		if r.Error != "" {
			return fmt.Errorf("create the Mosquitto account of app %s: dynsec %s: %s", a.User, r.Command, r.Error)
		}
	}
	d.log.Info("Mosquitto app account created", "user", a.User)
	return nil
}

// RemoveApp deletes an app user's account (Mosquitto disconnects it) and
// role. Already gone is success.
func (d *Dynsec) RemoveApp(ctx context.Context, user string) error {
	rs, err := d.do(ctx, []dynCmd{
		{"command": "deleteClient", "username": user},
		{"command": "deleteRole", "rolename": appRolePrefix + user},
	})
	if err != nil {
		return fmt.Errorf("delete the Mosquitto account of app %s: %w", clipName(user), err)
	}
	for _, r := range rs {
		if r.Error != "" && !strings.Contains(r.Error, "not found") {
			return fmt.Errorf("delete the Mosquitto account of app %s: dynsec %s: %s", clipName(user), r.Command, r.Error)
		}
	}
	d.log.Info("Mosquitto app account deleted", "user", clipName(user))
	return nil
}

func (d *Dynsec) logNotes(ctx context.Context, notes []string) {
	for _, n := range notes {
		d.limited.Log(ctx, slog.LevelWarn, "app/"+n, "app account not in line and not repairable by the gateway", "issue", n)
	}
}
