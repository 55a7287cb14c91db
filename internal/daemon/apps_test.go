package daemon

import (
	"bytes"
	"context"
	"path/filepath"
	"strings"
	"testing"

	"github.com/edgegate/edgegate/internal/admin"
	"github.com/edgegate/edgegate/internal/queue"
	"github.com/edgegate/edgegate/mqtt"
)

// TestAppAccountsNeedDynsec: on a daemon that does not manage Mosquitto's
// accounts (embedded broker, or accounts: none), app add through the socket
// is refused with a 400 that says what to configure, nothing is stored,
// and list shows what the store holds.
func TestAppAccountsNeedDynsec(t *testing.T) {
	q, err := queue.Open(queue.Options{Dir: t.TempDir(), Key: bytes.Repeat([]byte{4}, 32)})
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	dir := socketDir(t, "eg-app-")
	sock := filepath.Join(dir, "admin.sock")
	aa := &AppAdmin{Store: q}
	adm, err := admin.Listen(admin.ServerOptions{Socket: sock, Backend: &adminBackend{appAdmin: aa}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- adm.Run(ctx) }()
	c := admin.NewClient(sock)
	defer func() { c.CloseIdle(); cancel(); <-done }()

	_, err = c.AddApp(ctx, admin.AppAddRequest{User: "carol", Password: "carol-pw-canary-1234"})
	if err == nil || !strings.Contains(err.Error(), "mqtt.external.accounts: dynsec") || strings.Contains(err.Error(), "canary") {
		t.Fatalf("app add without dynsec: %v", err)
	}
	if _, ok, _ := q.GetState(appsState); ok {
		t.Fatal("a refused app add was stored")
	}
	if err := saveApps(q, []mqtt.AppAccount{{User: "erin", Groups: []string{"/staff"}, Fingerprint: mqtt.AppFingerprint("erin", "x")}}); err != nil {
		t.Fatal(err)
	}
	l, err := c.ListApps(ctx)
	if err != nil || len(l.Apps) != 1 || l.Apps[0].User != "erin" || l.Apps[0].Groups[0] != "/staff" {
		t.Fatalf("list = %+v, %v", l, err)
	}
	if _, err := c.RemoveApp(ctx, "nobody"); err == nil || !strings.Contains(err.Error(), `no app account "nobody"`) {
		t.Fatalf("remove of an unknown app: %v", err)
	}
	if s := (admin.AppAddRequest{User: "u", Password: "pw-canary"}).String() + (admin.AppAddRequest{Password: "pw-canary"}).GoString(); strings.Contains(s, "canary") {
		t.Fatalf("the request prints its password: %s", s)
	}
}
