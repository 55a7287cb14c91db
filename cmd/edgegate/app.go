package main

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/edgegate/edgegate/internal/admin"
	"github.com/edgegate/edgegate/internal/config"
	"github.com/edgegate/edgegate/internal/daemon"
	"github.com/edgegate/edgegate/mqtt"
)

const appUsage = `usage: edgegate app add|remove|list [flags]

  app add --config FILE [--password-file F] [--group G]... USER
  app remove --config FILE USER
  app list --config FILE

External broker mode (mqtt.mode external, mqtt.external.accounts: dynsec)
only: Mosquitto cannot check an SSO token, so an application user signs in
to it with a local password. USER is the platform username the policy's
delegations name. The daemon creates the Mosquitto account and a role that
lets it receive only the readings of the devices the policy lets USER read
(owned, delegated to USER, delegated to one of the --group G given here,
public), and follows every policy change. Without --password-file a random
password is generated and printed once; the gateway keeps only a
fingerprint of it. add and remove need the running daemon; remove deletes
the account, which disconnects it.
`

func runApp(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	return appWith(ctx, defaultPairEnv(), args, stdout, stderr)
}

func appWith(ctx context.Context, env pairEnv, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, appUsage)
		return usageErr(errors.New("app: add, remove or list"))
	}
	sub, rest := args[0], args[1:]
	fs := flag.NewFlagSet("app "+sub, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, appUsage); fs.PrintDefaults() }
	cfgPath := fs.String("config", "/etc/edgegate/edgegate.yaml", "configuration file")
	socket := fs.String("socket", "", "the daemon's admin socket (default: from the configuration)")
	var pwFile *string
	var groups stringsFlag
	switch sub {
	case "add":
		pwFile = fs.String("password-file", "", "the app's password, from a file only its owner can read (default: generate and print once)")
		fs.Var(&groups, "group", "a group of USER, as the platform's group delegations name it (repeatable)")
	case "remove", "list":
	default:
		fmt.Fprint(stderr, appUsage)
		return usageErr(fmt.Errorf("app: unknown command %q (add, remove, list)", sub))
	}
	if err := fs.Parse(rest); err != nil {
		return err
	}
	var user string
	switch {
	case sub == "list" && fs.NArg() == 0:
	case sub != "list" && fs.NArg() == 1:
		user = fs.Arg(0)
		if err := mqtt.UsableAppUser(user); err != nil {
			return usageErr(fmt.Errorf("app %s: %w", sub, err))
		}
	default:
		fs.Usage()
		return usageErr(fmt.Errorf("app %s: wrong arguments", sub))
	}
	var password string
	generated := false
	if sub == "add" {
		var err error
		if password, generated, err = appPassword(*pwFile); err != nil {
			return usageErr(fmt.Errorf("app add: %w", err))
		}
	}

	sf, _, adminSocket, err := loadDeviceSettings(*cfgPath)
	if err != nil {
		return usageErr(err)
	}
	sockets := daemon.AdminSocketCandidates(adminSocket, sf.stateDir)
	if *socket != "" {
		sockets = []string{*socket}
	}
	if answered, err := throughDaemon(sockets, func(c *admin.Client) error {
		return runAppOp(ctx, sub, c, user, password, groups, generated, stdout)
	}); answered {
		return err
	}
	if sub != "list" {
		// The broker account is the daemon's to create: it holds the dynsec
		// administrator's credential and follows the policy.
		return fmt.Errorf("app %s: the daemon is not running (its admin socket did not answer: %s): start it, or give --socket PATH", sub, strings.Join(sockets, ", "))
	}
	q, err := openStore(env, sf)
	if err != nil {
		return fmt.Errorf("app list: %w", err)
	}
	defer q.Close()
	apps, err := daemon.LoadApps(q)
	if err != nil {
		return fmt.Errorf("app list: %w", err)
	}
	l := admin.AppList{}
	for _, a := range apps {
		l.Apps = append(l.Apps, admin.AppInfo{User: a.User, Groups: a.Groups})
	}
	// The daemon is not running: no count of readable devices.
	return admin.WriteAppList(stdout, l, false)
}

func runAppOp(ctx context.Context, sub string, c *admin.Client, user, password string, groups []string, generated bool, stdout io.Writer) error {
	switch sub {
	case "add":
		res, err := c.AddApp(ctx, admin.AppAddRequest{User: user, Password: password, Groups: groups})
		if err != nil {
			return fmt.Errorf("app add: %w", err)
		}
		fmt.Fprintf(stdout, "app %s: Mosquitto account created; reads %d devices now\n", res.User, res.Readable)
		if generated {
			// The only time the password is shown: the gateway keeps a
			// fingerprint, Mosquitto a hash.
			fmt.Fprintf(stdout, "password (shown once; store it in the application now): %s\n", password)
		}
		return nil
	case "remove":
		res, err := c.RemoveApp(ctx, user)
		if err != nil {
			return fmt.Errorf("app remove: %w", err)
		}
		fmt.Fprintf(stdout, "app %s: Mosquitto account deleted (its sessions are closed)\n", res.User)
		return nil
	default:
		l, err := c.ListApps(ctx)
		if err != nil {
			return fmt.Errorf("app list: %w", err)
		}
		return admin.WriteAppList(stdout, l, true)
	}
}

// appPassword reads the password file (private to its owner, as every
// secret file of the configuration) or generates 24 random bytes.
func appPassword(file string) (pw string, generated bool, err error) {
	if file == "" {
		b := make([]byte, 24)
		if _, err := rand.Read(b); err != nil {
			return "", false, err
		}
		return base64.RawURLEncoding.EncodeToString(b), true, nil
	}
	if err := config.PrivateFile(file); err != nil {
		return "", false, fmt.Errorf("--password-file: %w", err)
	}
	b, err := os.ReadFile(file)
	if err != nil {
		return "", false, fmt.Errorf("--password-file: %w", err)
	}
	pw = strings.TrimRight(string(b), "\r\n")
	if len(pw) < 12 {
		return "", false, errors.New("--password-file: the password is shorter than 12 characters")
	}
	return pw, false, nil
}
