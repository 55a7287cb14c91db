// Command edgegate-central is the companion service of a fleet of edgegate
// gateways beside a stock Snap4City platform (see docs/central.md).
//
//	edgegate-central serve --config FILE                  run the service
//	edgegate-central push --config FILE --gateway ID|--all  rebuild from the platform now and push
//	edgegate-central fleet --config FILE [--json]         which gateway runs which version, stale ones
//	edgegate-central keys rotate --config FILE [--overlap D]  add a signing key; the old stays published
//	edgegate-central keys init --key-file FILE            create a signing key file when there is none
//	edgegate-central config check --config FILE           load and check a configuration
//	edgegate-central health --config FILE                 is the local service answering (container HEALTHCHECK)
package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/edgegate/edgegate/internal/central"
	"github.com/edgegate/edgegate/internal/cliexit"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	cliexit.Exit("edgegate-central", err)
}

const usage = `usage: edgegate-central <command> [flags]

  serve --config FILE                        run the service
  push  --config FILE --gateway ID | --all   rebuild from the platform now and push
  push accounts-export --config FILE --dynsec-file FILE --gateway ID | --gateways-file FILE | --all
                                             write gateways' push accounts into a stopped Mosquitto's dynamic-security file
  fleet --config FILE [--json]               which gateway runs which version since when
  keys rotate --config FILE [--overlap D] [--key-file FILE]
                                             add a signing key; the old one stays published for D
  keys init --key-file FILE                  create a signing key file when there is none
  config check --config FILE                 load and check a configuration
  health --config FILE                       exit 0 when the local service answers GET /metrics
`

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return flag.ErrHelp
	}
	switch cmd, rest := args[0], args[1:]; cmd {
	case "serve":
		return serve(ctx, rest, stderr)
	case "push":
		if len(rest) > 0 && rest[0] == "accounts-export" {
			return accountsExport(rest[1:], stdout, stderr)
		}
		return push(ctx, rest, stdout, stderr)
	case "fleet":
		return fleet(ctx, rest, stdout, stderr)
	case "keys":
		switch {
		case len(rest) > 0 && rest[0] == "rotate":
			return rotate(rest[1:], stdout, stderr)
		case len(rest) > 0 && rest[0] == "init":
			return initKeys(rest[1:], stdout, stderr)
		}
		fmt.Fprint(stderr, usage)
		return errors.New("keys: the subcommands are rotate and init")
	case "config":
		if len(rest) == 0 || rest[0] != "check" {
			fmt.Fprint(stderr, usage)
			return errors.New("config: the only subcommand is check")
		}
		return checkConfig(rest[1:], stdout, stderr)
	case "health":
		return health(ctx, rest, stdout, stderr)
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return nil
	default:
		fmt.Fprint(stderr, usage)
		return fmt.Errorf("unknown command %q", cmd)
	}
}

func loadConfig(fs *flag.FlagSet, args []string) (central.Config, error) {
	path := fs.String("config", "/etc/edgegate-central/config.yaml", "configuration file")
	if err := fs.Parse(args); err != nil {
		return central.Config{}, err
	}
	if fs.NArg() > 0 {
		return central.Config{}, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	return central.LoadConfig(*path)
}

func adminToken(cfg central.Config) (string, error) {
	if cfg.AdminTokenFile == "" {
		return "", errors.New("admin_token_file is not configured")
	}
	return central.ReadSecretFile("admin_token_file", cfg.AdminTokenFile)
}

func serve(ctx context.Context, args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	cfg, err := loadConfig(fs, args)
	if err != nil {
		return err
	}
	log := slog.New(slog.NewJSONHandler(stderr, nil))
	if cfg.Listen == "" || cfg.TLSCert == "" || cfg.TLSKey == "" {
		return errors.New("serve: listen, tls_cert and tls_key are required")
	}
	cert, err := tls.LoadX509KeyPair(cfg.TLSCert, cfg.TLSKey)
	if err != nil {
		return fmt.Errorf("serve: TLS certificate: %w", err)
	}
	admin := ""
	if cfg.AdminTokenFile != "" {
		if admin, err = adminToken(cfg); err != nil {
			return err
		}
	}
	svc, err := central.New(ctx, central.Options{Config: cfg, Logger: log})
	if err != nil {
		return err
	}
	defer svc.Close()
	switch {
	case cfg.Push.Mode == central.PushExternal:
		if err := svc.StartExternalPush(ctx); err != nil {
			return err
		}
	case cfg.MQTTListen != "":
		if _, err := svc.StartPush(cfg.MQTTListen, cert); err != nil {
			return err
		}
	}
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	srv := central.NewHTTPServer(cfg.Listen, svc.Handler(admin))
	srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	errc := make(chan error, 1)
	go func() { errc <- srv.ServeTLS(ln, "", "") }()
	log.Info("edgegate-central serving", "listen", ln.Addr().String(), "kid", svc.Keys().ActiveKID())
	runDone := make(chan struct{})
	rctx, cancel := context.WithCancel(ctx)
	go func() { defer close(runDone); _ = svc.Run(rctx) }()
	select {
	case <-ctx.Done():
		err = nil
	case err = <-errc:
	}
	cancel()
	sctx, scancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer scancel()
	_ = srv.Shutdown(sctx)
	<-runDone
	if errors.Is(err, http.ErrServerClosed) {
		err = nil
	}
	return err
}

// client calls the running service's admin API at public_url, trusting
// the system roots and the service's own certificate.
func client(cfg central.Config) *http.Client {
	pool, err := x509.SystemCertPool()
	if err != nil {
		pool = x509.NewCertPool()
	}
	if pem, err := os.ReadFile(cfg.TLSCert); err == nil {
		pool.AppendCertsFromPEM(pem)
	}
	return &http.Client{Timeout: 2 * time.Minute, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
}

func adminCall(ctx context.Context, cfg central.Config, method, path string, body []byte, out any) error {
	tok, err := adminToken(cfg)
	if err != nil {
		return err
	}
	if cfg.PublicURL == "" {
		return errors.New("public_url is not configured")
	}
	req, err := http.NewRequestWithContext(ctx, method, strings.TrimRight(cfg.PublicURL, "/")+path, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+tok)
	req.Header.Set("Content-Type", "application/json")
	resp, err := client(cfg).Do(req)
	if err != nil {
		return fmt.Errorf("%s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 32<<20))
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		var e struct {
			Error, Description string
		}
		_ = json.Unmarshal(b, &e)
		return fmt.Errorf("%s %s: HTTP %d %s %s", method, path, resp.StatusCode, e.Error, e.Description)
	}
	return json.Unmarshal(b, out)
}

func push(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("push", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var gws multi
	fs.Var(&gws, "gateway", "gateway id (repeatable)")
	all := fs.Bool("all", false, "every gateway")
	cfg, err := loadConfig(fs, args)
	if err != nil {
		return err
	}
	if *all == (len(gws) > 0) {
		return errors.New("push: give either --gateway ID or --all")
	}
	body, _ := json.Marshal(central.PushRequest{Gateways: gws, All: *all})
	var res central.RoundResult
	if err := adminCall(ctx, cfg, http.MethodPost, central.AdminPushPath, body, &res); err != nil {
		return fmt.Errorf("push: %w", err)
	}
	fmt.Fprintf(stdout, "gateways %d, signed %d, pushed %d, unchanged %d\n", res.Gateways, len(res.Signed), len(res.Pushed), res.Unchanged)
	for gw, why := range res.Refused {
		fmt.Fprintf(stdout, "refused %s: %s\n", gw, why)
	}
	if len(res.Refused) > 0 {
		return errors.New("push: some gateways were refused")
	}
	return nil
}

// accountsExport writes the push accounts of many gateways into a
// Mosquitto dynamic-security file offline: the plugin rewrites its whole
// file after every control command, so thousands of accounts created
// live cost O(n²) (docs/central.md, "Push through an external broker").
func accountsExport(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("push accounts-export", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var gws multi
	fs.Var(&gws, "gateway", "gateway id (repeatable)")
	list := fs.String("gateways-file", "", "file of gateway ids, one a line")
	all := fs.Bool("all", false, "every gateway of the configuration's gateways map")
	file := fs.String("dynsec-file", "", "the broker's dynamic-security file (plugin_opt_config_file), broker stopped")
	keyFile := fs.String("store-key-file", "", "the companion's store key (default: the systemd credential "+
		central.StoreKeyCredential+" when run under systemd, else {state_dir}/store.key)")
	cfg, err := loadConfig(fs, args)
	if err != nil {
		return err
	}
	if *file == "" {
		return errors.New("push accounts-export: --dynsec-file is required")
	}
	if *list != "" {
		b, err := os.ReadFile(*list)
		if err != nil {
			return fmt.Errorf("push accounts-export: --gateways-file: %w", err)
		}
		for line := range strings.Lines(string(b)) {
			if id := strings.TrimSpace(line); id != "" && !strings.HasPrefix(id, "#") {
				gws = append(gws, id)
			}
		}
	}
	if *all {
		for gw := range cfg.Gateways {
			gws = append(gws, gw)
		}
	}
	slices.Sort(gws)
	gws = slices.Compact(gws)
	if len(gws) == 0 {
		return errors.New("push accounts-export: give --gateway ID, --gateways-file FILE or --all (with gateways configured)")
	}
	// The key the service itself loads (keys.LoadStoreKey): the
	// credential, else the file in state_dir.
	if *keyFile == "" {
		*keyFile = filepath.Join(cfg.StateDir, "store.key")
		if dir := os.Getenv("CREDENTIALS_DIRECTORY"); dir != "" {
			if p := filepath.Join(dir, central.StoreKeyCredential); fileExists(p) {
				*keyFile = p
			}
		}
	}
	added, replaced, err := central.ExportDynsecAccounts(*keyFile, *file, gws)
	if err != nil {
		return fmt.Errorf("push accounts-export: %w", err)
	}
	fmt.Fprintf(stdout, "%s: %d gateway accounts added, %d replaced; start the broker now\n", *file, added, replaced)
	return nil
}

func fleet(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("fleet", flag.ContinueOnError)
	fs.SetOutput(stderr)
	asJSON := fs.Bool("json", false, "print JSON")
	cfg, err := loadConfig(fs, args)
	if err != nil {
		return err
	}
	var f []central.FleetEntry
	if err := adminCall(ctx, cfg, http.MethodGet, central.AdminFleetPath, nil, &f); err != nil {
		return fmt.Errorf("fleet: %w", err)
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(f)
	}
	tw := tabwriter.NewWriter(stdout, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "GATEWAY\tISSUED\tAPPLIED\tSINCE\tLAST RECEIPT\tDEVICES\tSTATE")
	stale := 0
	for _, e := range f {
		state := "ok"
		switch {
		case e.BuildError != "":
			state = "refused: " + e.BuildError
		case e.Stale:
			state = "STALE"
			stale++
		case e.Applied < e.Version:
			state = "pending"
		}
		fmt.Fprintf(tw, "%s\t%d\t%d\t%s\t%s\t%d\t%s\n", e.Gateway, e.Version, e.Applied, when(e.AppliedSince), when(e.LastReceiptAt), e.Devices, state)
	}
	tw.Flush()
	fmt.Fprintf(stdout, "%d gateways, %d stale\n", len(f), stale)
	return nil
}

func when(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.UTC().Format(time.RFC3339)
}

func rotate(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("keys rotate", flag.ContinueOnError)
	fs.SetOutput(stderr)
	overlap := fs.Duration("overlap", 0, "how long the old keys stay published (default: key_overlap)")
	keyFile := fs.String("key-file", "", "the key file to rotate (default: key_file; with the package, /etc/edgegate-central/credentials/policy-signing-keys)")
	cfg, err := loadConfig(fs, args)
	if err != nil {
		return err
	}
	if *overlap == 0 {
		*overlap = cfg.KeyOverlap
	}
	if *keyFile != "" {
		// The packaged service reads its keys as a systemd credential, a
		// read-only copy: rotate the source file it is copied from.
		cfg.KeyFile = *keyFile
	}
	ring, err := central.OpenKeyRing(cfg.KeyFile, false)
	if err != nil {
		return err
	}
	kid, err := ring.Rotate(*overlap, time.Now())
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "new signing key %s; older keys stay published for %s (the service picks the new key up at its next round)\n", kid, *overlap)
	return nil
}

// initKeys creates a signing key file (one ES256 key, mode 0600) unless
// one exists: the package's postinst runs it for the service's credential.
func initKeys(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("keys init", flag.ContinueOnError)
	fs.SetOutput(stderr)
	path := fs.String("key-file", "", "the signing key file to create")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *path == "" || fs.NArg() > 0 {
		return &cliexit.Error{Code: 2, Err: errors.New("keys init: give --key-file FILE and nothing else")}
	}
	_, statErr := os.Stat(*path)
	ring, err := central.OpenKeyRing(*path, true)
	if err != nil {
		return err
	}
	if statErr == nil {
		fmt.Fprintf(stdout, "%s exists; signing key %s kept\n", *path, ring.ActiveKID())
		return nil
	}
	fmt.Fprintf(stdout, "new signing key %s in %s\n", ring.ActiveKID(), *path)
	return nil
}

func checkConfig(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("config check", flag.ContinueOnError)
	fs.SetOutput(stderr)
	cfg, err := loadConfig(fs, args)
	if err != nil {
		return &cliexit.Error{Code: 2, Err: err}
	}
	fmt.Fprintf(stdout, "configuration ok: store %s, %d broker(s), %d gateway(s) configured\n", cfg.Store, len(cfg.Platform.Brokers), len(cfg.Gateways))
	return nil
}

// health asks the service on this host for GET /metrics, the one endpoint
// that needs no token: the probe of a container HEALTHCHECK (distroless
// has no curl). It dials the listen port on loopback but checks the
// certificate against public_url's host, with the roots the CLI trusts.
func health(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("health", flag.ContinueOnError)
	fs.SetOutput(stderr)
	timeout := fs.Duration("timeout", 5*time.Second, "give up after")
	cfg, err := loadConfig(fs, args)
	if err != nil {
		return err
	}
	_, port, err := net.SplitHostPort(cfg.Listen)
	if err != nil {
		return fmt.Errorf("health: listen %q: %w", cfg.Listen, err)
	}
	base := cfg.PublicURL
	if base == "" {
		base = "https://localhost:" + port
	}
	hc := client(cfg)
	hc.Timeout = *timeout
	tr := hc.Transport.(*http.Transport)
	tr.DialContext = func(ctx context.Context, network, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, network, net.JoinHostPort("127.0.0.1", port))
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, strings.TrimRight(base, "/")+central.MetricsPath, nil)
	if err != nil {
		return err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return fmt.Errorf("health: %w", err)
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 8<<20))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("health: GET %s: HTTP %d", central.MetricsPath, resp.StatusCode)
	}
	fmt.Fprintln(stdout, "ok")
	return nil
}

func fileExists(p string) bool { _, err := os.Stat(p); return err == nil }

type multi []string

func (m *multi) String() string     { return strings.Join(*m, ",") }
func (m *multi) Set(v string) error { *m = append(*m, v); return nil }
