package admin

// The application-account endpoints (external broker mode, dynsec):
//
//	GET    /v1/apps          AppList
//	POST   /v1/apps          body AppAddRequest; AppInfo
//	DELETE /v1/apps/{user}   AppInfo

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"

	"github.com/edgegate/edgegate/internal/audit"
)

// AppBackend manages the local broker accounts of application users.
type AppBackend interface {
	AddApp(ctx context.Context, req AppAddRequest) (AppInfo, error)
	RemoveApp(ctx context.Context, user string) (AppInfo, error)
	ListApps(ctx context.Context) (AppList, error)
}

// AppAddRequest provisions an application user's broker account. The
// password travels to the daemon (which sends it to Mosquitto and keeps
// only a fingerprint); String and GoString never show it.
type AppAddRequest struct {
	User     string   `json:"user"`
	Password string   `json:"password"`
	Groups   []string `json:"groups,omitempty"`
}

func (r AppAddRequest) String() string {
	return fmt.Sprintf("app %s groups %v (password redacted)", r.User, r.Groups)
}

// GoString keeps %#v from printing the password.
func (r AppAddRequest) GoString() string { return r.String() }

// AppInfo is one application account.
type AppInfo struct {
	User   string   `json:"user"`
	Groups []string `json:"groups,omitempty"`
	// Readable: how many devices of the policy the user may read now.
	Readable int `json:"readable"`
}

// AppList is the answer of GET /v1/apps.
type AppList struct {
	Apps []AppInfo `json:"apps"`
}

func (s *Server) appRoutes(mux *http.ServeMux) {
	mux.HandleFunc("GET /v1/apps", guarded(s, "app accounts", s.appsList))
	mux.HandleFunc("POST /v1/apps", guarded(s, "app accounts", s.appAdd))
	mux.HandleFunc("DELETE /v1/apps/{user}", guarded(s, "app accounts", s.appRemove))
}

func (s *Server) appDone(w http.ResponseWriter, r *http.Request, what, user string, res AppInfo, err error) {
	ev := audit.Event{Kind: audit.Kind("app_" + what), User: peerUser(r), Port: s.opts.Socket, Detail: "app " + user}
	if err != nil {
		ev.Cause, ev.Detail = "failed", "app "+user+": "+err.Error()
	}
	s.record(r.Context(), ev)
	answer(w, res, err)
}

func (s *Server) appsList(ab AppBackend, w http.ResponseWriter, r *http.Request) {
	l, err := ab.ListApps(r.Context())
	answer(w, l, err)
}

func (s *Server) appAdd(ab AppBackend, w http.ResponseWriter, r *http.Request) {
	var req AppAddRequest
	if !readBody(w, r, "app", &req) {
		return
	}
	res, err := ab.AddApp(r.Context(), req)
	s.appDone(w, r, "add", req.User, res, err)
}

func (s *Server) appRemove(ab AppBackend, w http.ResponseWriter, r *http.Request) {
	user := r.PathValue("user")
	res, err := ab.RemoveApp(r.Context(), user)
	s.appDone(w, r, "remove", user, res, err)
}

// AddApp asks the daemon to provision an app account.
func (c *Client) AddApp(ctx context.Context, req AppAddRequest) (AppInfo, error) {
	var res AppInfo
	err := c.call(ctx, http.MethodPost, "/v1/apps", req, &res)
	return res, err
}

// RemoveApp asks the daemon to delete an app account.
func (c *Client) RemoveApp(ctx context.Context, user string) (AppInfo, error) {
	var res AppInfo
	err := c.call(ctx, http.MethodDelete, "/v1/apps/"+url.PathEscape(user), nil, &res)
	return res, err
}

// ListApps lists the app accounts.
func (c *Client) ListApps(ctx context.Context) (AppList, error) {
	var l AppList
	err := c.call(ctx, http.MethodGet, "/v1/apps", nil, &l)
	return l, err
}

// WriteAppList prints the app accounts, one a line. readable: with the
// count of devices each may read (the running policy's; false offline).
func WriteAppList(w io.Writer, l AppList, readable bool) error {
	if len(l.Apps) == 0 {
		_, err := fmt.Fprintln(w, "no app accounts")
		return err
	}
	for _, a := range l.Apps {
		line := a.User
		if readable {
			line += fmt.Sprintf("  reads %d devices", a.Readable)
		}
		if len(a.Groups) > 0 {
			line += "  groups " + strings.Join(a.Groups, ",")
		}
		if _, err := fmt.Fprintln(w, line); err != nil {
			return err
		}
	}
	return nil
}
