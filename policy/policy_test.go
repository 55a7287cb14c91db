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
		Delegation{"d1", "carol", ReadAccess},
		Delegation{"d1", "dave", WriteOnly},
		Delegation{"d1", "erin", ReadWrite},
		Delegation{"d1", "fred", Modify},
		Delegation{"ghost", "carol", ReadAccess}, // a device not served here: ignored
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
		{"bad id", doc(1, bad(func(r *Registration) { r.ID = "a b" })), `devices[0]: id "a b"`},
		{"bad type", doc(1, bad(func(r *Registration) { r.Type = "" })), "type"},
		{"no owner", doc(1, bad(func(r *Registration) { r.Owner = "" })), "owner is empty"},
		{"no keys", doc(1, bad(func(r *Registration) { r.K2 = "" })), "k1 and k2"},
		{"same keys", doc(1, bad(func(r *Registration) { r.K2 = r.K1 })), "must differ"},
		{"http broker", doc(1, bad(func(r *Registration) { r.Broker = "http://x" })), "https"},
		{"duplicate", doc(1, []Registration{reg("d1", "a"), reg("d1", "b")}), "registered twice"},
		{"bad kind", doc(1, []Registration{reg("d1", "a")}, Delegation{"d1", "u", "OWN"}), `delegations[0]: kind "OWN"`},
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
