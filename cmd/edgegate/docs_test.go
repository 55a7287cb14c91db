package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"testing"

	"github.com/edgegate/edgegate/internal/config"
)

// The manual pages must not drift from the binary: every `edgegate ...`
// command in their shell blocks names a subcommand that exists and only
// flags it defines, and every dotted configuration key they name in
// backticks is a key of the configuration.

var (
	shBlockRE   = regexp.MustCompile("(?s)```sh\n(.*?)```")
	flagRE      = regexp.MustCompile(`(?:^|\s)--([a-z][a-z0-9-]*)`)
	linkRE      = regexp.MustCompile(`\]\(([^)\s]+)\)`)
	configKeyRE = regexp.MustCompile("`((?:central|uplink|policy|mqtt|store|radio|admin|metrics|log|pipeline|gateway|commands)\\.[a-z_.]+)`")
)

// subcommands with their own second word.
var twoWord = map[string]bool{"device": true, "config": true, "data": true, "app": true}

func docPages(t *testing.T) []string {
	t.Helper()
	pages, err := filepath.Glob(filepath.Join("..", "..", "docs", "*.md"))
	if err != nil || len(pages) == 0 {
		t.Fatalf("no manual pages under docs/: %v", err)
	}
	return append(pages, filepath.Join("..", "..", "README.md"))
}

// helpOf returns what `edgegate ARGS -h` prints (the flag set's defaults).
func helpOf(t *testing.T, args []string) string {
	t.Helper()
	var out, errOut bytes.Buffer
	_ = run(context.Background(), append(append([]string(nil), args...), "-h"), strings.NewReader(""), &out, &errOut)
	return out.String() + errOut.String()
}

func TestDocsCommandsExist(t *testing.T) {
	for _, page := range docPages(t) {
		raw, err := os.ReadFile(page)
		if err != nil {
			t.Fatal(err)
		}
		checked := 0
		for _, m := range shBlockRE.FindAllSubmatch(raw, -1) {
			block := strings.ReplaceAll(string(m[1]), "\\\n", " ")
			for _, line := range strings.Split(block, "\n") {
				// The command is the first "edgegate" word not followed by
				// another ("sudo -u edgegate edgegate pair ...").
				all := strings.Fields(line)
				at := -1
				for i, w := range all {
					if w == "edgegate" && (i+1 >= len(all) || all[i+1] != "edgegate") {
						at = i
						break
					}
				}
				if at < 0 || at+1 >= len(all) {
					continue
				}
				words := all[at+1:]
				cmdline := strings.Join(words, " ")
				sub := words[:1]
				if twoWord[words[0]] && len(words) > 1 {
					sub = words[:2]
				}
				help := helpOf(t, sub)
				if strings.Contains(help, "unknown command") {
					t.Errorf("%s: `edgegate %s`: no such command", filepath.Base(page), strings.Join(sub, " "))
					continue
				}
				for _, f := range flagRE.FindAllStringSubmatch(cmdline, -1) {
					// Listed by the flag set's defaults, or named in the usage text.
					if !regexp.MustCompile(`(?m)(^\s+-` + regexp.QuoteMeta(f[1]) + `\b|--` + regexp.QuoteMeta(f[1]) + `\b)`).MatchString(help) {
						t.Errorf("%s: `edgegate %s` has no flag --%s", filepath.Base(page), strings.Join(sub, " "), f[1])
					}
				}
				checked++
			}
		}
		for _, k := range configKeyRE.FindAllSubmatch(raw, -1) {
			if !configHasKey(reflect.TypeOf(config.Config{}), strings.Split(string(k[1]), ".")) {
				t.Errorf("%s: configuration key `%s` does not exist", filepath.Base(page), k[1])
			}
		}
		// Relative links point at files that exist.
		for _, l := range linkRE.FindAllSubmatch(raw, -1) {
			target, _, _ := strings.Cut(string(l[1]), "#")
			if target == "" || strings.Contains(target, "://") {
				continue
			}
			if _, err := os.Stat(filepath.Join(filepath.Dir(page), target)); err != nil {
				t.Errorf("%s: link to %s: %v", filepath.Base(page), l[1], err)
			}
		}
		if checked == 0 && strings.Contains(string(raw), "```sh") {
			t.Errorf("%s: no edgegate command found in its shell blocks", filepath.Base(page))
		}
	}
}

// configHasKey walks a dotted key through the yaml tags of the
// configuration's types.
func configHasKey(t reflect.Type, path []string) bool {
	for t.Kind() == reflect.Pointer || t.Kind() == reflect.Slice {
		t = t.Elem()
	}
	if len(path) == 0 {
		return true
	}
	if t.Kind() == reflect.Map {
		return true // a free-form map (brokers: NAME → URL)
	}
	if t.Kind() != reflect.Struct {
		return false
	}
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
		if name == path[0] {
			return configHasKey(f.Type, path[1:])
		}
	}
	return false
}
