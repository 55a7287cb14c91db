package centralsim

import (
	"context"
	"fmt"
	"net/http"
)

// The two back-end calls the Orion Broker Filter makes for a request it
// has not cached (OrionBrokerFilter AccessTokenAuthenticationFilter:
// getOwnerCredentials, then getDelegatedCredentials), served in-process
// from the same table and delegations as the HTTP APIs (ownership.go).

// Back ends a fault can be injected on.
const (
	BackendOwnership   = "ownership"   // the Ownership API
	BackendDatamanager = "datamanager" // the datamanager (delegations, access check)
	// BackendOwnershipRegister fails only the IoT Directory's register
	// call, after its limits check passed: what a concurrent insert that
	// took the last slot does to a stock insert.
	BackendOwnershipRegister = "ownership-register"
)

// BackendError is a failure of the ownership or datamanager back end: the
// HTTP status it answered. The filter turns a 4xx into its 401 "Trouble
// in get...Credentials, see logs" and a 5xx into a 500.
type BackendError struct{ Status int }

func (e *BackendError) Error() string {
	return fmt.Sprintf("back end answered %d %s", e.Status, http.StatusText(e.Status))
}

// backendFault returns the failure injected on target (BackendOwnership or
// BackendDatamanager), or nil. The HTTP handlers of that back end answer
// it too.
func (s *Server) backendFault(target string) *BackendError {
	s.mu.Lock()
	defer s.mu.Unlock()
	if f := s.ps.backendFaults[target]; f != nil {
		e := *f
		return &e
	}
	return nil
}

// setBackendFault makes target fail with status until cleared (status 0).
// faults.go may drive it from a Fault.
func (s *Server) setBackendFault(target string, status int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if status == 0 {
		delete(s.ps.backendFaults, target)
		return
	}
	s.ps.backendFaults[target] = &BackendError{Status: status}
}

// backendOwnership is GET /ownership-api/v1/list/?type=IOTID&elementId=
// as user sees it: owned when an active IOTID row of the element belongs
// to user, or exists at all for a RootAdmin (list/index.php).
func (s *Server) backendOwnership(ctx context.Context, user, elementID string) (owned bool, err error) {
	if err := ctx.Err(); err != nil {
		return false, err
	}
	if f := s.backendFault(BackendOwnership); f != nil {
		return false, f
	}
	if f, ok := s.takeFault(TargetOwnership); ok { // a one-shot fault (faults.go)
		return false, &BackendError{Status: f.Status}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	root := s.mainRole(user) == RoleRootAdmin
	for _, r := range s.ps.rows {
		if r.elementID == elementID && r.elementType == ElementTypeIOTID && r.deleted.IsZero() && (root || r.username == user) {
			return true, nil
		}
	}
	return false, nil
}

// backendAccessCheck is GET /datamanager/api/v3/apps/{elementID}/access/check
// ?elementType=IOTID for user (AccessServiceImpl.checkAccessFromApp):
// result, the delegation kind, and public when the answer came from a
// delegation to ANONYMOUS.
func (s *Server) backendAccessCheck(ctx context.Context, user, elementID string) (result bool, kind string, public bool, err error) {
	if err := ctx.Err(); err != nil {
		return false, "", false, err
	}
	if f := s.backendFault(BackendDatamanager); f != nil {
		return false, "", false, f
	}
	if f, ok := s.takeFault(TargetDelegation); ok { // a one-shot fault (faults.go)
		return false, "", false, &BackendError{Status: f.Status}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	res := s.accessCheckLocked(user, elementID, ElementTypeIOTID)
	public = res.Message != nil && *res.Message == AccessPublic
	return res.Result, res.Kind, public, nil
}
