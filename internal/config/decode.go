package config

import (
	"errors"
	"fmt"
	"reflect"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/edgegate/edgegate/internal/logx"
)

// FieldError names the configuration key (dotted path), its line and the
// offending value.
type FieldError struct {
	Key   string
	Line  int
	Value string
	Msg   string
}

func (e *FieldError) Error() string {
	var b strings.Builder
	if e.Line > 0 {
		fmt.Fprintf(&b, "line %d: ", e.Line)
	}
	b.WriteString(e.Key)
	b.WriteString(" ")
	b.WriteString(e.Msg)
	if e.Value != "" {
		// A URL's user:password@ and query never reach an error message
		// (issue 17 item 9): the value is echoed redacted.
		fmt.Fprintf(&b, ": %q", logx.RedactURL(e.Value))
	}
	return b.String()
}

var (
	durationType = reflect.TypeFor[time.Duration]()
	unmarshaler  = reflect.TypeFor[yaml.Unmarshaler]()
)

// decodeStrict decodes a YAML node into out (a pointer to a struct), field by
// field, so that an unknown key or a value of the wrong type is reported with
// its full dotted path and line, which yaml.v3's KnownFields cannot do.
func decodeStrict(n *yaml.Node, out any) error {
	v := reflect.ValueOf(out)
	if v.Kind() != reflect.Pointer || v.Elem().Kind() != reflect.Struct {
		return errors.New("decode config: want a pointer to a struct")
	}
	if n.Kind == yaml.DocumentNode {
		if len(n.Content) == 0 {
			return nil
		}
		n = n.Content[0]
	}
	return decodeValue(n, v.Elem(), "")
}

func join(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

func decodeValue(n *yaml.Node, v reflect.Value, path string) error {
	if n.Kind == yaml.AliasNode {
		return &FieldError{Key: nonEmpty(path), Line: n.Line, Msg: "uses a YAML alias, which is not supported"}
	}
	// Leaf types decode themselves (durations, sizes, strings, numbers).
	if v.Type() == durationType || reflect.PointerTo(v.Type()).Implements(unmarshaler) || isScalarKind(v.Kind()) {
		if n.Kind != yaml.ScalarNode {
			return &FieldError{Key: nonEmpty(path), Line: n.Line, Msg: "must be a single value, not a " + kindName(n)}
		}
		if n.Tag == "!!null" {
			return nil
		}
		if err := n.Decode(v.Addr().Interface()); err != nil {
			return &FieldError{Key: nonEmpty(path), Line: n.Line, Value: n.Value, Msg: "has a bad value (" + describe(v.Type()) + " expected)" + cause(err)}
		}
		return nil
	}
	switch v.Kind() {
	case reflect.Struct:
		if n.Kind != yaml.MappingNode {
			if n.Tag == "!!null" {
				return nil
			}
			return &FieldError{Key: nonEmpty(path), Line: n.Line, Msg: "must be a mapping of keys, not a " + kindName(n)}
		}
		fields := structFields(v.Type())
		seen := map[string]bool{}
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, val := n.Content[i], n.Content[i+1]
			name := k.Value
			if name == "" || k.Kind != yaml.ScalarNode {
				name = `""`
			}
			key := join(path, name)
			idx, ok := fields[k.Value]
			if !ok {
				return &FieldError{Key: key, Line: k.Line, Msg: "is not a known key" + suggest(k.Value, fields)}
			}
			if seen[k.Value] {
				return &FieldError{Key: key, Line: k.Line, Msg: "is given twice"}
			}
			seen[k.Value] = true
			if err := decodeValue(val, v.Field(idx), key); err != nil {
				return err
			}
		}
		return nil
	case reflect.Slice:
		if n.Tag == "!!null" {
			return nil
		}
		if n.Kind != yaml.SequenceNode {
			return &FieldError{Key: nonEmpty(path), Line: n.Line, Msg: "must be a list, not a " + kindName(n)}
		}
		s := reflect.MakeSlice(v.Type(), len(n.Content), len(n.Content))
		for i, item := range n.Content {
			if err := decodeValue(item, s.Index(i), fmt.Sprintf("%s[%d]", path, i)); err != nil {
				return err
			}
		}
		v.Set(s)
		return nil
	case reflect.Map:
		if n.Tag == "!!null" {
			return nil
		}
		if n.Kind != yaml.MappingNode {
			return &FieldError{Key: nonEmpty(path), Line: n.Line, Msg: "must be a mapping, not a " + kindName(n)}
		}
		if v.IsNil() {
			v.Set(reflect.MakeMap(v.Type()))
		}
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, val := n.Content[i], n.Content[i+1]
			elem := reflect.New(v.Type().Elem()).Elem()
			if err := decodeValue(val, elem, join(path, k.Value)); err != nil {
				return err
			}
			v.SetMapIndex(reflect.ValueOf(k.Value).Convert(v.Type().Key()), elem)
		}
		return nil
	case reflect.Pointer:
		if n.Tag == "!!null" {
			return nil
		}
		p := reflect.New(v.Type().Elem())
		if err := decodeValue(n, p.Elem(), path); err != nil {
			return err
		}
		v.Set(p)
		return nil
	}
	return &FieldError{Key: nonEmpty(path), Line: n.Line, Msg: "has an unsupported type " + v.Type().String()}
}

func nonEmpty(path string) string {
	if path == "" {
		return "(document)"
	}
	return path
}

func isScalarKind(k reflect.Kind) bool {
	switch k {
	case reflect.String, reflect.Bool, reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64, reflect.Float32, reflect.Float64:
		return true
	}
	return false
}

func kindName(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "mapping"
	case yaml.SequenceNode:
		return "list"
	case yaml.ScalarNode:
		return "single value"
	}
	return "node"
}

func describe(t reflect.Type) string {
	switch {
	case t == durationType:
		return "a duration such as 30s or 5m"
	case t.Kind() == reflect.Bool:
		return "true or false"
	case t.Kind() >= reflect.Int && t.Kind() <= reflect.Uint64:
		return "a whole number"
	case t.Kind() == reflect.Float32 || t.Kind() == reflect.Float64:
		return "a number"
	case t.Kind() == reflect.String:
		return "a string"
	}
	return t.Name()
}

func cause(err error) string {
	var te *yaml.TypeError
	if errors.As(err, &te) {
		return ""
	}
	msg := err.Error()
	msg = strings.TrimPrefix(msg, "yaml: ")
	return ": " + msg
}

// structFields maps yaml keys to field indexes; fields without a yaml tag or
// tagged "-" are not configurable.
func structFields(t reflect.Type) map[string]int {
	m := make(map[string]int, t.NumField())
	for i := range t.NumField() {
		f := t.Field(i)
		tag := f.Tag.Get("yaml")
		name, _, _ := strings.Cut(tag, ",")
		if name == "" || name == "-" || !f.IsExported() {
			continue
		}
		m[name] = i
	}
	return m
}

// suggest proposes the closest known key for a typo.
func suggest(key string, fields map[string]int) string {
	best, bestD := "", 3
	for k := range fields {
		if d := distance(key, k); d < bestD {
			best, bestD = k, d
		}
	}
	if best == "" {
		return ""
	}
	return " (did you mean " + best + "?)"
}

func distance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}
