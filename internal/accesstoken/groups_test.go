package accesstoken

import (
	"reflect"
	"strings"
	"testing"
)

// The "groups" claim as Keycloak's Group Membership mapper writes it (an
// array of paths), and what is made of odd values.
func TestGroupsClaim(t *testing.T) {
	many := make([]any, MaxGroups+10)
	for i := range many {
		many[i] = "/g"
	}
	for _, tt := range []struct {
		name string
		in   any
		want []string
	}{
		{"paths", []any{"/staff", "/org/field"}, []string{"/staff", "/org/field"}},
		{"one string", "/staff", []string{"/staff"}},
		{"non-strings dropped", []any{"/staff", 3, nil, map[string]any{"x": 1}, ""}, []string{"/staff"}},
		{"not a list", map[string]any{"staff": true}, nil},
		{"bounded", many, strings.Split(strings.Repeat("/g,", MaxGroups-1)+"/g", ",")},
	} {
		if got := groupsClaim(tt.in); !reflect.DeepEqual(got, tt.want) {
			t.Errorf("%s: groupsClaim = %v, want %v", tt.name, got, tt.want)
		}
	}
}
