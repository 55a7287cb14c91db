package policy

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"
)

func reg(id, owner string) Registration {
	return Registration{ID: id, Type: "T", Owner: owner, Broker: "https://b.example/f", K1: "k1-" + id, K2: "k2-" + id}
}

func doc(version uint64, regs []Registration, dl ...Delegation) Document {
	return Document{Format: DocumentFormat, Version: version, IssuedAt: time.Unix(1000, 0), Devices: regs, Delegations: dl}
}

func TestAccessByKind(t *testing.T) {
	p, err := Compile(doc(1, []Registration{reg("d1", "alice"), reg("d2", "bob")},
		Delegation{Device: "d1", User: "carol", Kind: ReadAccess},
		Delegation{Device: "d1", User: "dave", Kind: WriteOnly},
		Delegation{Device: "d1", User: "erin", Kind: ReadWrite},
		Delegation{Device: "d1", User: "fred", Kind: Modify},
		Delegation{Device: "ghost", User: "carol", Kind: ReadAccess}, // a device not served here: ignored
	), "bundle", "")
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		user, device string
		read, write  bool
	}{
		{"alice", "d1", true, true},
		{"alice", "d2", false, false},
		{"bob", "d2", true, true},
		{"carol", "d1", true, false},
		{"dave", "d1", false, true}, // WRITE_ONLY grants no read
		{"erin", "d1", true, true},
		{"fred", "d1", true, true},
		{"carol", "d2", false, false},
		{"mallory", "d1", false, false},
		{"carol", "ghost", false, false},
	}
	for _, tt := range tests {
		if got := p.CanRead(tt.user, tt.device); got != tt.read {
			t.Errorf("CanRead(%s, %s) = %v, want %v", tt.user, tt.device, got, tt.read)
		}
		if got := p.CanWrite(tt.user, tt.device); got != tt.write {
			t.Errorf("CanWrite(%s, %s) = %v, want %v", tt.user, tt.device, got, tt.write)
		}
	}
	if got := strings.Join(p.Readable("carol"), ","); got != "d1" {
		t.Errorf("Readable(carol) = %q", got)
	}
}

func TestCompileNamesTheBadField(t *testing.T) {
	bad := func(mut func(*Registration)) []Registration {
		r := reg("d1", "alice")
		mut(&r)
		return []Registration{r}
	}
	tests := []struct {
		name string
		doc  Document
		want string
	}{
		{"format", Document{Format: 9}, "format 9"},
		{"bad id", doc(1, bad(func(r *Registration) { r.ID = "a b" })), `devices[0]: device id "a b"`},
		{"dot-dot id", doc(1, bad(func(r *Registration) { r.ID = ".." })), `devices[0]: device id ".." is not allowed`},
		{"colon id", doc(1, bad(func(r *Registration) { r.ID = "org:broker:d1" })), `devices[0]: device id "org:broker:d1": byte 3 (':')`},
		{"bad type", doc(1, bad(func(r *Registration) { r.Type = "" })), "type"},
		{"no owner", doc(1, bad(func(r *Registration) { r.Owner = "" })), "owner is empty"},
		{"no keys", doc(1, bad(func(r *Registration) { r.K2 = "" })), "k1 and k2"},
		{"same keys", doc(1, bad(func(r *Registration) { r.K2 = r.K1 })), "must differ"},
		{"http broker", doc(1, bad(func(r *Registration) { r.Broker = "http://x" })), "https"},
		{"broker with a token", doc(1, bad(func(r *Registration) { r.Broker = "https://x/orion?access_token=canary-tok" })), `broker "https://x/orion?access_token=REDACTED" must be an https:// URL without credentials`},
		{"broker with userinfo", doc(1, bad(func(r *Registration) { r.Broker = "https://u:canary-pw@x/orion" })), `broker "https://REDACTED@x/orion"`},
		{"duplicate", doc(1, []Registration{reg("d1", "a"), reg("d1", "b")}), "registered twice"},
		{"bad kind", doc(1, []Registration{reg("d1", "a")}, Delegation{Device: "d1", User: "u", Kind: "OWN"}), `delegations[0]: kind "OWN"`},
		{"radio clash", doc(1, []Registration{
			func() Registration { r := reg("d1", "a"); r.Radio = &RadioBinding{"/dev/ttyUSB0", 3, -1}; return r }(),
			func() Registration { r := reg("d2", "a"); r.Radio = &RadioBinding{"/dev/ttyUSB0", 3, -1}; return r }(),
		}), "already bound to d1"},
		{"expiry before issue", Document{Format: 1, Version: 1, IssuedAt: time.Unix(100, 0), ExpiresAt: time.Unix(50, 0)}, "expires_at"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Compile(tt.doc, "test", "")
			if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Compile(%s) = %v, want ErrInvalid containing %q", tt.name, err, tt.want)
			}
			if strings.Contains(err.Error(), "k1-d1") {
				t.Fatalf("error leaks a key: %v", err)
			}
		})
	}
}

func TestRadioBinding(t *testing.T) {
	child := reg("child", "a")
	child.Radio = &RadioBinding{"/dev/ttyUSB0", 5, 1}
	node := reg("node", "a")
	node.Radio = &RadioBinding{"/dev/ttyUSB0", 5, -1}
	port := reg("port", "a")
	port.Radio = &RadioBinding{"/dev/ttyACM0", -1, -1}
	p, err := Compile(doc(1, []Registration{child, node, port}), "t", "")
	if err != nil {
		t.Fatal(err)
	}
	e := NewEngine(p)
	tests := []struct {
		port        string
		node, child int
		want        string
		ok          bool
	}{
		{"/dev/ttyUSB0", 5, 1, "child", true},
		{"/dev/ttyUSB0", 5, 2, "node", true},
		{"/dev/ttyUSB0", 6, 1, "", false},
		{"/dev/ttyACM0", 9, 9, "port", true},
		{"/dev/ttyAMA0", 5, 1, "", false},
	}
	for _, tt := range tests {
		got, ok := e.BindRadio(tt.port, tt.node, tt.child)
		if got != tt.want || ok != tt.ok {
			t.Errorf("BindRadio(%s, %d, %d) = %q, %v; want %q, %v", tt.port, tt.node, tt.child, got, ok, tt.want, tt.ok)
		}
	}
	if port, ok := e.RadioPort("port"); !ok || port != "/dev/ttyACM0" {
		t.Errorf("RadioPort(port) = %q, %v", port, ok)
	}
	if _, ok := e.RadioPort("nobody"); ok {
		t.Error("RadioPort of an unknown device")
	}
}

func TestApplyVersionsAndChanges(t *testing.T) {
	cfg, _ := New(0, "config", []Registration{reg("d1", "alice"), reg("d2", "alice"), reg("d3", "alice")})
	e := NewEngine(cfg)
	var seen []Change
	e.OnChange(func(c Change) { seen = append(seen, c) })

	moved := reg("d2", "bob") // changed owner
	v5, _ := Compile(doc(5, []Registration{reg("d1", "alice"), moved}), "bundle", "")
	ch, err := e.Apply(v5, false)
	if err != nil {
		t.Fatalf("Apply(v5 over config) = %v", err)
	}
	if fmt.Sprint(ch.Revoked) != "[d3]" || fmt.Sprint(ch.Rebound) != "[d2]" {
		t.Errorf("change = revoked %v rebound %v, want [d3] [d2]", ch.Revoked, ch.Rebound)
	}
	if len(seen) != 1 || seen[0].New != v5 {
		t.Errorf("listeners saw %d changes", len(seen))
	}
	for _, v := range []uint64{5, 4, 0} {
		old, _ := Compile(doc(v, []Registration{reg("d1", "alice")}), "bundle", "")
		if _, err := e.Apply(old, false); !errors.Is(err, ErrRollback) {
			t.Errorf("Apply(version %d over 5) = %v, want ErrRollback", v, err)
		}
	}
	if e.Current() != v5 {
		t.Fatal("a refused policy replaced the one in force")
	}
	if e.DecideIngest("d3").Allow {
		t.Error("revoked device still allowed")
	}
	if d := e.DecideIngest("d2"); !d.Allow || d.Device.Owner != "bob" {
		t.Errorf("DecideIngest(d2) = %+v", d)
	}
}

func TestExpired(t *testing.T) {
	d := doc(1, []Registration{reg("d1", "a")})
	d.ExpiresAt = d.IssuedAt.Add(time.Hour)
	p, err := Compile(d, "bundle", "")
	if err != nil {
		t.Fatal(err)
	}
	exp := d.ExpiresAt
	if p.Expired(exp, time.Minute) || p.Expired(exp.Add(time.Minute), time.Minute) {
		t.Error("expired within the grace")
	}
	if !p.Expired(exp.Add(time.Minute+time.Second), time.Minute) {
		t.Error("not expired after expiry plus grace")
	}
	cfg, _ := New(0, "config", nil)
	if cfg.Expired(time.Now().Add(1e6*time.Hour), 0) {
		t.Error("a policy without expiry expired")
	}
}

func TestDescribeHasNoSecrets(t *testing.T) {
	p, _ := New(0, "config", []Registration{reg("d1", "alice")})
	d, _ := p.Device("d1")
	for _, s := range []string{p.Describe(), d.String(), fmt.Sprintf("%v %+v", d, d)} {
		if strings.Contains(s, "k1-d1") || strings.Contains(s, "k2-d1") {
			t.Fatalf("secret in %q", s)
		}
	}
}

func BenchmarkDecideIngest(b *testing.B) {
	for _, n := range []int{100, 10_000, 100_000} {
		regs := make([]Registration, n)
		for i := range regs {
			regs[i] = reg(fmt.Sprintf("dev-%06d", i), "owner")
		}
		p, err := New(1, "bench", regs)
		if err != nil {
			b.Fatal(err)
		}
		e := NewEngine(p)
		b.Run(fmt.Sprintf("devices=%d", n), func(b *testing.B) {
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				if !e.DecideIngest(regs[i%n].ID).Allow {
					b.Fatal("refused")
				}
				i++
			}
		})
	}
}

func TestGroupAndPublicDelegations(t *testing.T) {
	p, err := Compile(doc(1, []Registration{reg("d1", "alice"), reg("d2", "alice"), reg("d3", "alice"), reg("d4", "alice")},
		Delegation{Device: "d1", Group: "cn=staff,ou=Firenze,dc=ldap,dc=org", Kind: ReadAccess},
		Delegation{Device: "d2", Group: "cn=ops,dc=ldap,dc=org", Kind: ReadWrite},
		Delegation{Device: "d3", User: Public, Kind: ReadAccess},
		Delegation{Device: "d4", User: Public, Kind: ReadWrite},
		Delegation{Device: "d4", Group: "field", Kind: WriteOnly},
	), "ownership-api", "")
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name, user   string
		groups       []string
		device       string
		read, writes bool
	}{
		{"owner", "alice", nil, "d1", true, true},
		{"group member by DN", "bob", []string{"cn=staff,ou=Firenze,dc=ldap,dc=org"}, "d1", true, false},
		{"group member by DN, other case", "bob", []string{"CN=Staff,OU=Firenze,DC=ldap,DC=org"}, "d1", true, false},
		{"group member by Keycloak path", "bob", []string{"/staff"}, "d1", true, false},
		{"group member by nested Keycloak path", "bob", []string{"/org/staff"}, "d1", true, false},
		{"group member by plain name", "bob", []string{"staff"}, "d1", true, false},
		{"member of another DN with the same cn", "bob", []string{"cn=staff,ou=Bologna,dc=ldap,dc=org"}, "d1", false, false},
		{"non-member", "bob", []string{"/visitors"}, "d1", false, false},
		{"no groups", "bob", nil, "d1", false, false},
		{"group READ_WRITE", "carol", []string{"/ops"}, "d2", true, true},
		{"group WRITE_ONLY grants no read", "dave", []string{"field"}, "d4", true, true}, // d4 is also public READ_WRITE
		{"public read, any signed-in user", "mallory", nil, "d3", true, false},
		{"public read, not signed in", "", nil, "d3", false, false},
		{"public READ_WRITE, as stock", "mallory", nil, "d4", true, true},
		{"public READ_WRITE, not signed in", "", nil, "d4", false, false},
		{"owner not signed in", "", []string{"/staff"}, "d1", false, false},
		{"unknown device", "bob", []string{"/staff"}, "ghost", false, false},
	}
	for _, tt := range tests {
		if got := p.MayRead(tt.user, tt.groups, tt.device); got != tt.read {
			t.Errorf("%s: MayRead(%q, %q, %s) = %v, want %v", tt.name, tt.user, tt.groups, tt.device, got, tt.read)
		}
		if got := p.MayWrite(tt.user, tt.groups, tt.device); got != tt.writes {
			t.Errorf("%s: MayWrite(%q, %q, %s) = %v, want %v", tt.name, tt.user, tt.groups, tt.device, got, tt.writes)
		}
	}
	// A WRITE_ONLY group grant alone gives no read.
	q, err := Compile(doc(1, []Registration{reg("d1", "alice")}, Delegation{Device: "d1", Group: "field", Kind: WriteOnly}), "x", "")
	if err != nil {
		t.Fatal(err)
	}
	if q.MayRead("dave", []string{"/field"}, "d1") || !q.MayWrite("dave", []string{"/field"}, "d1") {
		t.Error("WRITE_ONLY group delegation: want write, no read")
	}
}

func TestDelegationNeedsExactlyOneOfUserAndGroup(t *testing.T) {
	for _, dl := range []Delegation{
		{Device: "d1", Kind: ReadAccess},
		{Device: "d1", User: "bob", Group: "staff", Kind: ReadAccess},
	} {
		_, err := Compile(doc(1, []Registration{reg("d1", "alice")}, dl), "x", "")
		if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "delegations[0]: user and group") {
			t.Errorf("%+v: err = %v", dl, err)
		}
	}
}

func TestRenewExtendsOnlyTheSamePolicy(t *testing.T) {
	d := doc(3, []Registration{reg("d1", "alice")})
	d.ExpiresAt = d.IssuedAt.Add(time.Hour)
	p, err := Compile(d, "ownership-api", "sha256:aa")
	if err != nil {
		t.Fatal(err)
	}
	e := NewEngine(p)
	called := 0
	e.OnChange(func(Change) { called++ })
	later := d.IssuedAt.Add(5 * time.Hour)
	if _, ok := e.Renew(3, "sha256:bb", later); ok {
		t.Fatal("renewed a policy with another digest")
	}
	if _, ok := e.Renew(2, "sha256:aa", later); ok {
		t.Fatal("renewed a policy with another version")
	}
	if _, ok := e.Renew(3, "sha256:aa", d.IssuedAt); ok {
		t.Fatal("renewed to an expiry not after issued_at")
	}
	np, ok := e.Renew(3, "sha256:aa", later)
	if !ok || e.Current() != np || !np.ExpiresAt.Equal(later) || !np.Document().ExpiresAt.Equal(later) {
		t.Fatalf("Renew = %v, %v", np, ok)
	}
	if np.Version != 3 || np.Len() != 1 || !np.CanWrite("alice", "d1") || called != 0 {
		t.Fatalf("renewed policy %s, listeners called %d", np.Describe(), called)
	}
	if !p.ExpiresAt.Equal(d.IssuedAt.Add(time.Hour)) {
		t.Fatal("Renew changed the old policy")
	}
	if np.Expired(d.IssuedAt.Add(2*time.Hour), 0) || !np.Expired(later.Add(time.Minute), 0) {
		t.Fatal("expiry not moved")
	}
}
