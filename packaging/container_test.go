package packaging

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/edgegate/edgegate/internal/central"
)

// containerfile is the companion's image recipe. There is no container
// engine here: the tests parse it, check what matters, and run its build
// stage's commands in a temporary directory standing for the builder's
// file system.
const containerfile = "central/Containerfile"

// instruction is one Containerfile instruction, continuation lines joined.
type instruction struct {
	line  int
	cmd   string // upper case: FROM, RUN, COPY, ...
	args  string
	stage int // index of the FROM it belongs to
}

// parseContainerfile splits a Containerfile into instructions.
func parseContainerfile(text string) ([]instruction, error) {
	var out []instruction
	stage := -1
	sc := bufio.NewScanner(strings.NewReader(text))
	var cur strings.Builder
	start, n := 0, 0
	for sc.Scan() {
		n++
		l := strings.TrimSpace(sc.Text())
		if cur.Len() == 0 && (l == "" || strings.HasPrefix(l, "#")) {
			continue
		}
		if cur.Len() == 0 {
			start = n
		}
		if strings.HasSuffix(l, "\\") {
			cur.WriteString(strings.TrimSpace(strings.TrimSuffix(l, "\\")) + " ")
			continue
		}
		cur.WriteString(l)
		f := strings.SplitN(cur.String(), " ", 2)
		cur.Reset()
		in := instruction{line: start, cmd: strings.ToUpper(f[0])}
		if len(f) == 2 {
			in.args = strings.TrimSpace(f[1])
		}
		if in.cmd == "FROM" {
			stage++
		}
		if stage < 0 && in.cmd != "ARG" {
			return nil, fmt.Errorf("line %d: %s before the first FROM", start, in.cmd)
		}
		in.stage = stage
		out = append(out, in)
	}
	if cur.Len() > 0 {
		return nil, fmt.Errorf("line %d: continuation at the end of the file", start)
	}
	return out, sc.Err()
}

func TestParseContainerfile(t *testing.T) {
	ins, err := parseContainerfile("# c\nARG X=1\nFROM a AS b\nRUN one \\\n  two\n\nFROM c\nUSER 1:1\n")
	if err != nil {
		t.Fatal(err)
	}
	got := fmt.Sprint(ins)
	want := "[{2 ARG X=1 -1} {3 FROM a AS b 0} {4 RUN one two 0} {7 FROM c 1} {8 USER 1:1 1}]"
	if got != want {
		t.Errorf("parseContainerfile = %s, want %s", got, want)
	}
	if _, err := parseContainerfile("RUN x\n"); err == nil {
		t.Error("RUN before FROM accepted")
	}
}

// TestContainerfile checks the image recipe: a builder running
// packaging/gobuild.sh (so the flags are the package's), a final stage
// from distroless/static or scratch running as a non-root user, the
// binary copied from where the build put it, a state volume, the ports of
// the shipped configuration, and a HEALTHCHECK through the binary's
// health command.
func TestContainerfile(t *testing.T) {
	b, err := os.ReadFile(containerfile)
	if err != nil {
		t.Fatal(err)
	}
	ins, err := parseContainerfile(string(b))
	if err != nil {
		t.Fatal(err)
	}
	last := ins[len(ins)-1].stage
	if last < 1 {
		t.Fatal("not a multi-stage build")
	}
	stageName := map[string]int{}
	var final []instruction
	var buildRun string
	for _, in := range ins {
		switch {
		case in.cmd == "FROM":
			f := strings.Fields(in.args)
			if len(f) == 3 && strings.EqualFold(f[1], "AS") {
				stageName[f[2]] = in.stage
			}
			if in.stage == last && !regexp.MustCompile(`^(gcr\.io/distroless/static(-debian\d+)?(:\S+)?|scratch)$`).MatchString(f[0]) {
				t.Errorf("line %d: final image %s, want distroless/static or scratch", in.line, f[0])
			}
			if in.stage == 0 && !strings.Contains(f[0], "golang:1.26") {
				t.Errorf("line %d: builder %s, want the golang 1.26 image (go.mod's go line)", in.line, f[0])
			}
		case in.stage != last && in.cmd == "RUN" && strings.Contains(in.args, "gobuild.sh"):
			buildRun = in.args
		}
		if in.stage == last {
			final = append(final, in)
		}
	}

	// The build runs the package's script for the companion, nothing else.
	m := regexp.MustCompile(`packaging/gobuild\.sh\s+"?\$\{?TARGETARCH\}?"?\s+(\S+)\s+edgegate-central\s*$`).FindStringSubmatch(buildRun)
	if m == nil {
		t.Fatalf("no RUN ... packaging/gobuild.sh \"$TARGETARCH\" OUT edgegate-central in the build stage (got %q)", buildRun)
	}
	builtAt := m[1]

	var user, health, entry string
	var volumes, exposed []string
	copied := false
	for _, in := range final {
		switch in.cmd {
		case "USER":
			user = in.args
		case "HEALTHCHECK":
			health = in.args
		case "ENTRYPOINT":
			entry = in.args
		case "VOLUME":
			volumes = append(volumes, in.args)
		case "EXPOSE":
			exposed = append(exposed, strings.Fields(in.args)...)
		case "COPY":
			f := strings.Fields(in.args)
			if len(f) >= 3 && strings.HasPrefix(f[0], "--from=") && f[len(f)-2] == builtAt && f[len(f)-1] == "/usr/bin/edgegate-central" {
				if _, ok := stageName[strings.TrimPrefix(f[0], "--from=")]; !ok {
					t.Errorf("line %d: COPY from an unknown stage %s", in.line, f[0])
				}
				copied = true
			}
		case "RUN":
			t.Errorf("line %d: RUN in the final stage (distroless has no shell)", in.line)
		case "ENV":
			if regexp.MustCompile(`(?i)(secret|token|password|key)\s*=`).MatchString(in.args) {
				t.Errorf("line %d: a secret in the environment: %s", in.line, in.args)
			}
		}
	}
	if !copied {
		t.Errorf("the final stage does not COPY --from=build %s /usr/bin/edgegate-central", builtAt)
	}
	if user == "" || regexp.MustCompile(`^(0|root)(:|$)`).MatchString(user) {
		t.Errorf("USER %q: the image must run as a non-root user", user)
	}
	if !strings.Contains(entry, "/usr/bin/edgegate-central") {
		t.Errorf("ENTRYPOINT %q does not run the binary", entry)
	}
	if !strings.Contains(health, `"/usr/bin/edgegate-central", "health"`) {
		t.Errorf("HEALTHCHECK %q does not use edgegate-central health", health)
	}
	if !strings.Contains(strings.Join(volumes, " "), "/var/lib/edgegate-central") {
		t.Errorf("VOLUME %q lacks the state directory /var/lib/edgegate-central", volumes)
	}
	cfg, err := os.ReadFile("central/config.yaml")
	if err != nil {
		t.Fatal(err)
	}
	for _, key := range []string{"listen", "mqtt_listen"} {
		pm := regexp.MustCompile(`(?m)^` + key + `: *"[^"]*:(\d+)"`).FindSubmatch(cfg)
		if pm == nil {
			t.Fatalf("config.yaml has no %s with a port", key)
		}
		want := string(pm[1]) + "/tcp"
		found := false
		for _, e := range exposed {
			found = found || e == want || e == string(pm[1])
		}
		if !found {
			t.Errorf("EXPOSE %v lacks %s's port %s", exposed, key, want)
		}
	}

	// The build stage's command, run for real: the binary lands where the
	// final stage copies it from, and it is the companion.
	if testing.Short() {
		return
	}
	root := t.TempDir()
	cmdline := strings.ReplaceAll(buildRun, builtAt, filepath.Join(root, strings.TrimPrefix(builtAt, "/")))
	run(t, buildTimeout, repoRoot(t), []string{"VERSION=v0.0.0-container-test", "TARGETARCH=amd64"}, "sh", "-c", cmdline)
	bin := filepath.Join(root, strings.TrimPrefix(builtAt, "/"))
	out := run(t, time.Minute, "", nil, bin, "help")
	if !strings.Contains(string(out), "health --config FILE") {
		t.Errorf("%s help does not list the health command the HEALTHCHECK runs:\n%s", bin, out)
	}
}

// TestContainerConfigDocumented: the configuration docs/central.md gives
// for the container is one the companion accepts, and its paths are the
// image's (state volume, secrets under $CREDENTIALS_DIRECTORY).
func TestContainerConfigDocumented(t *testing.T) {
	b, err := os.ReadFile("../docs/central.md")
	if err != nil {
		t.Fatal(err)
	}
	_, sec, ok := strings.Cut(string(b), "## Container image")
	m := regexp.MustCompile("(?s)```yaml\n(.*?)```").FindStringSubmatch(sec)
	if !ok || m == nil {
		t.Fatal("docs/central.md has no yaml block under \"## Container image\"")
	}
	p := filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(p, []byte(m[1]), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg, err := central.LoadConfig(p)
	if err != nil {
		t.Fatalf("the documented container configuration is refused: %v", err)
	}
	if cfg.StateDir != "/var/lib/edgegate-central" {
		t.Errorf("state_dir %q is not the image's volume", cfg.StateDir)
	}
	for name, v := range map[string]string{"tls_key": cfg.TLSKey, "admin_token_file": cfg.AdminTokenFile,
		"postgres_url_file": cfg.PostgresURLFile, "platform.client_secret_file": cfg.Platform.ClientSecretFile} {
		if !strings.HasPrefix(v, "/run/secrets/") {
			t.Errorf("%s %q: secrets are mounted under /run/secrets", name, v)
		}
	}
}
