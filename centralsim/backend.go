package centralsim

import (
	"context"
	"fmt"
	"strings"
)

// The two back-end calls the Orion Broker Filter makes for a request with
// an access token (AccessTokenAuthenticationFilter.java, disit/snap4city):
//
//   - getOwnershipCC: GET {ownership_endpoint}?type=IOTID&accessToken=..&elementId=..
//     (the Ownership API's list): owned when any row comes back;
//   - getDelegationCC: GET {delegation_endpoint}/v3/apps/{element}/access/check
//     ?accessToken=..&sourceRequest=orionbrokerfilter&elementType=IOTID&elementID=..
//     (the data manager): {"result":bool,"kind":..,"message":..}.
//
// Here they are in-process over the simulator's data. This file is the
// seam another part of the simulator replaces with the real Ownership API
// and data manager; the filter depends only on these two signatures.

// BackendError is a back-end answer other than 2xx. The filter maps a 4xx
// (HttpClientErrorException) to a 401 "Trouble in get…Credentials, see
// logs" and a 5xx (HttpServerErrorException, not caught) to a 500.
type BackendError struct {
	Status int
}

func (e *BackendError) Error() string {
	return fmt.Sprintf("back-end answered HTTP %d", e.Status)
}

// Delegation kinds of the data manager's access/check beyond the
// delegation kinds (Kind*): who the answer comes from.
const (
	checkOwner  = "OWNER"
	checkPublic = "PUBLIC"
	// AnonymousUser is the delegated user of a public delegation.
	AnonymousUser = "ANONYMOUS"
)

// deviceOfElement returns the device id of an elementId of this broker
// ("{Organization}:{BrokerName}:{id}"), or "" for another broker's.
func (s *Server) deviceOfElement(elementID string) string {
	id, ok := strings.CutPrefix(elementID, s.opts.Organization+":"+s.opts.BrokerName+":")
	if !ok {
		return ""
	}
	return id
}

// backendOwnership reports whether user has an Ownership API row for
// elementID (rows with deleted set are not listed: Ownership-API list).
func (s *Server) backendOwnership(ctx context.Context, user, elementID string) (owned bool, err error) {
	if err := s.backendFault(ctx, TargetOwnership); err != nil {
		return false, err
	}
	id := s.deviceOfElement(elementID)
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, r := range s.ps.rows {
		if r.device.ID == id && r.deleted.IsZero() && r.device.Owner == user {
			return true, nil
		}
	}
	return false, nil
}

// backendAccessCheck is the data manager's access/check for user on
// elementID: result true with the delegation's kind when user holds a
// delegation (the strongest if several), true with message PUBLIC when the
// element is delegated to ANONYMOUS, false otherwise.
func (s *Server) backendAccessCheck(ctx context.Context, user, elementID string) (result bool, kind string, public bool, err error) {
	if err := s.backendFault(ctx, TargetDelegation); err != nil {
		return false, "", false, err
	}
	id := s.deviceOfElement(elementID)
	s.mu.Lock()
	defer s.mu.Unlock()
	dev, ok := s.devices[id]
	if !ok {
		return false, KindReadAccess, false, nil
	}
	if dev.Owner == user {
		return true, checkOwner, false, nil
	}
	rank := map[string]int{KindReadAccess: 1, KindWriteOnly: 2, KindReadWrite: 3, KindModify: 4}
	for _, dl := range s.delegs {
		if dl.Device != id {
			continue
		}
		switch dl.User {
		case user:
			if rank[dl.Kind] > rank[kind] {
				result, kind = true, dl.Kind
			}
		case AnonymousUser:
			public = true
		}
	}
	if !result && public {
		return true, KindReadAccess, true, nil
	}
	if !result {
		kind = KindReadAccess // the filter's default when the answer names none
	}
	return result, kind, public, nil
}

// backendFault returns the injected failure of a back-end call, if any.
func (s *Server) backendFault(ctx context.Context, target string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	f, ok := s.takeFault(target)
	if !ok {
		return nil
	}
	return &BackendError{Status: f.Status}
}
