package central

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"hash"
	"net/url"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"

	"github.com/edgegate/edgegate/internal/logx"
	"github.com/edgegate/edgegate/policy"
	centralsync "github.com/edgegate/edgegate/sync"
)

// Built is one gateway's policy content, or why it cannot be published.
type Built struct {
	Gateway string
	// Doc has Devices and Delegations; Version and times are set when it
	// is signed.
	Doc policy.Document
	// Content is the digest of Devices and Delegations.
	Content string
	// Problems, when any, refuse the whole gateway: publishing without the
	// device or delegation concerned would drop it silently.
	Problems []string
}

// Build maps a snapshot to one policy per gateway named by an ownership
// row's edgegateway_uri (edgegate://GW/..., written by device.php insert
// from the gateway's DeviceSpec.EdgeURI and copied into the row's
// elementDetails by common.php registerOwnership). extra are gateways to
// build even when no row names them (configured ones: an empty policy).
// An error means a row cannot be attributed to a gateway: nothing at all
// may be published from this snapshot.
func Build(s *Snapshot, brokers map[string]string, extra []string) (map[string]*Built, error) {
	return (*BuildCache)(nil).Build(s, brokers, extra)
}

// BuildCache makes rounds incremental. It remembers each ownership row's
// decoding by a digest of the row, and each gateway's finished policy by
// a digest of everything that went into it (its rows' digests in order,
// each device's entity type and broker, its sorted delegations and
// problems). A round then decodes only rows that changed and checks,
// sorts and digests only gateways whose inputs changed; the rest is the
// previous round's result, which the same inputs would rebuild
// identically (TestBuildCacheSameAsFull compares the two over random
// platform changes). Entries of rows and gateways that left the snapshot
// are dropped each round. A nil *BuildCache builds everything. Not safe
// for concurrent use: Service.Refresh holds its round lock.
type BuildCache struct {
	rows map[[32]byte]*rowEntry
	gws  map[string]cachedBuilt
	// Stats of the last Build.
	Stats BuildStats
}

// BuildStats counts what the last Build decoded and built anew.
type BuildStats struct {
	RowsDecoded, RowsReused       int
	GatewaysBuilt, GatewaysReused int
}

type cachedBuilt struct {
	inputs [32]byte
	b      *Built
}

// rowEntry is one ownership row decoded (without what depends on the
// round's other inputs: the entity type and the broker's URL).
type rowEntry struct {
	err     error // the row cannot be attributed: the round is refused
	skip    bool  // not bound to an edgegate gateway
	gateway string
	problem string
	reg     policy.Registration
	cb      string
}

func rowKey(r OwnershipRow) [32]byte {
	h := sha256.New()
	for _, f := range [][]byte{[]byte(r.ElementID), []byte(r.Username), []byte(r.ElementType), r.ElementDetails} {
		var n [8]byte
		binary.BigEndian.PutUint64(n[:], uint64(len(f)))
		h.Write(n[:])
		h.Write(f)
	}
	var k [32]byte
	h.Sum(k[:0])
	return k
}

func decodeRow(r OwnershipRow) *rowEntry {
	det, err := parseDetails(r.ElementDetails)
	if err != nil {
		return &rowEntry{err: err}
	}
	if detailString(det, "edgegateway_type") != centralsync.EdgeGatewayType {
		return &rowEntry{skip: true}
	}
	eb, err := parseEdgeURI(detailString(det, "edgegateway_uri"))
	if err != nil {
		return &rowEntry{err: fmt.Errorf("edgegateway_uri: %w", err)}
	}
	e := &rowEntry{gateway: eb.gateway}
	if r.Username == "" || strings.Count(r.ElementID, ":") != 2 {
		e.problem = fmt.Sprintf("row %s: no owner or elementId not Organization:broker:id", clip(r.ElementID))
		return e
	}
	parts := strings.SplitN(r.ElementID, ":", 3)
	e.cb = detailString(det, "contextbroker")
	if e.cb == "" {
		e.cb = parts[1]
	}
	e.reg = policy.Registration{ID: parts[2], Owner: r.Username, K1: detailString(det, "k1"), K2: detailString(det, "k2"),
		Radio: eb.radio, Signing: eb.signing}
	if e.reg.Signing == "" {
		e.reg.Signing = detailString(det, "signing")
	}
	e.reg.PublicKeys = centralsync.DetailPublicKeys(det)
	return e
}

// Build is the package's Build, reusing what c remembers; c may be nil.
func (c *BuildCache) Build(s *Snapshot, brokers map[string]string, extra []string) (map[string]*Built, error) {
	out := map[string]*Built{}
	inputs := map[string]hash.Hash{}
	get := func(gw string) *Built {
		b := out[gw]
		if b == nil {
			b = &Built{Gateway: gw, Doc: policy.Document{Format: policy.DocumentFormat, Gateway: gw,
				Devices: []policy.Registration{}}}
			out[gw] = b
			inputs[gw] = sha256.New()
		}
		return b
	}
	for _, gw := range extra {
		get(gw)
	}
	var stats BuildStats
	var rows map[[32]byte]*rowEntry
	if c != nil {
		rows = make(map[[32]byte]*rowEntry, len(c.rows))
	}
	byElement := map[string]*Built{} // elementId → its gateway
	for i, r := range s.Rows {
		if isSet(r.Deleted) || (r.ElementType != "" && r.ElementType != "IOTID") {
			continue
		}
		var key [32]byte
		var e *rowEntry
		if c != nil {
			key = rowKey(r)
			if e = c.rows[key]; e == nil {
				e = decodeRow(r)
				stats.RowsDecoded++
			} else {
				stats.RowsReused++
			}
			rows[key] = e
		} else {
			e = decodeRow(r)
		}
		if e.err != nil {
			return nil, fmt.Errorf("ownership row %d (%s): %v", i, clip(r.ElementID), e.err)
		}
		if e.skip {
			continue
		}
		b := get(e.gateway)
		in := inputs[e.gateway]
		in.Write(key[:])
		if e.problem != "" {
			b.Problems = append(b.Problems, e.problem)
			continue
		}
		reg := e.reg
		if reg.Radio != nil {
			radio := *reg.Radio
			reg.Radio = &radio
		}
		var ok bool
		if reg.Broker, ok = brokers[e.cb]; !ok {
			b.Problems = append(b.Problems, fmt.Sprintf("device %s: context broker %q is not in platform.brokers", reg.ID, clip(e.cb)))
			continue
		}
		if reg.Type, ok = s.Types[e.cb+"/"+reg.ID]; !ok || reg.Type == "" {
			b.Problems = append(b.Problems, fmt.Sprintf("device %s: the IoT Directory lists no entity type for it", reg.ID))
			continue
		}
		fmt.Fprintf(in, "%d:%s%d:%s", len(reg.Broker), reg.Broker, len(reg.Type), reg.Type)
		// The gateway refuses a whole document over one bad device: the
		// whole document is compiled with the gateway's own rules below,
		// and only when that fails is each device compiled alone to name
		// the culprits (compiling each device every round doubled the cost
		// of a round at 1,000,000 devices: docs/central.md).
		b.Doc.Devices = append(b.Doc.Devices, reg)
		byElement[r.ElementID] = b
	}
	// Delegations each owner gave on the devices above.
	for _, b := range out {
		owners := map[string]bool{}
		for _, d := range b.Doc.Devices {
			owners[d.Owner] = true
		}
		for o := range owners {
			if why, failed := s.Failed[o]; failed {
				b.Problems = append(b.Problems, fmt.Sprintf("delegations of %s unreadable: %s", o, clip(why)))
			}
		}
	}
	for owner, rows := range s.Given {
		for _, d := range rows {
			b := byElement[d.ElementID]
			if b == nil || (d.ElementType != "" && d.ElementType != "IOTID") || isSet(d.DeleteTime) {
				continue
			}
			dev := strings.SplitN(d.ElementID, ":", 3)[2]
			kind := policy.Kind(d.Kind)
			switch {
			case d.UsernameDelegator != "" && !strings.EqualFold(d.UsernameDelegator, owner):
				continue // not a delegation this owner gave
			case !kind.Valid():
				b.Problems = append(b.Problems, fmt.Sprintf("delegation on %s: unknown kind %q", dev, clip(d.Kind)))
			case d.UsernameDelegated != "":
				b.Doc.Delegations = append(b.Doc.Delegations, policy.Delegation{Device: dev, User: d.UsernameDelegated, Kind: kind})
			case d.GroupnameDelegated != "":
				b.Doc.Delegations = append(b.Doc.Delegations, policy.Delegation{Device: dev, Group: d.GroupnameDelegated, Kind: kind})
			default:
				b.Problems = append(b.Problems, fmt.Sprintf("delegation on %s names neither a user nor a group", dev))
			}
		}
	}
	addReceived(s, brokers, get, inputs)
	// The delegations and problems above come in map order: sorted, they
	// are the same inputs in the same order every round.
	var todo []*Built
	var gws map[string]cachedBuilt
	if c != nil {
		gws = make(map[string]cachedBuilt, len(out))
	}
	for gw, b := range out {
		sortDelegations(b)
		sort.Strings(b.Problems)
		if c == nil {
			todo = append(todo, b)
			continue
		}
		in := inputs[gw]
		for _, d := range b.Doc.Delegations {
			fmt.Fprintf(in, "d%d:%s%d:%s%d:%s%d:%s", len(d.Device), d.Device, len(d.User), d.User, len(d.Group), d.Group, len(d.Kind), d.Kind)
		}
		for _, p := range b.Problems {
			fmt.Fprintf(in, "p%d:%s", len(p), p)
		}
		var sum [32]byte
		in.Sum(sum[:0])
		if prev, ok := c.gws[gw]; ok && prev.inputs == sum {
			out[gw] = prev.b
			gws[gw] = prev
			stats.GatewaysReused++
			continue
		}
		gws[gw] = cachedBuilt{inputs: sum, b: b}
		todo = append(todo, b)
	}
	stats.GatewaysBuilt = len(todo)
	// Each gateway's sorting, check and digest is independent of the
	// others: spread over the CPUs (half of a round's time at 1,000,000
	// devices, docs/central.md).
	work := make(chan *Built)
	var wg sync.WaitGroup
	for range runtime.GOMAXPROCS(0) {
		wg.Go(func() {
			for b := range work {
				finishBuilt(b)
			}
		})
	}
	for _, b := range todo {
		work <- b
	}
	close(work)
	wg.Wait()
	if c != nil {
		c.rows, c.gws, c.Stats = rows, gws, stats
	}
	return out, nil
}

func sortDelegations(b *Built) {
	dls := b.Doc.Delegations
	sort.Slice(dls, func(i, j int) bool {
		x, y := dls[i], dls[j]
		if x.Device != y.Device {
			return x.Device < y.Device
		}
		if x.User != y.User {
			return x.User < y.User
		}
		if x.Group != y.Group {
			return x.Group < y.Group
		}
		return x.Kind < y.Kind
	})
	b.Doc.Delegations = dedupe(dls)
}

// finishBuilt sorts b's devices, checks the whole
// document with the gateway's own rules (naming the culprit devices when
// refused) and sets its content digest.
func finishBuilt(b *Built) {
	sort.Slice(b.Doc.Devices, func(i, j int) bool { return b.Doc.Devices[i].ID < b.Doc.Devices[j].ID })
	var whole error
	if len(b.Problems) == 0 {
		_, whole = policy.Compile(b.Doc, "check", "")
	}
	if whole != nil || len(b.Problems) > 0 {
		// Refused: name every device the gateway would refuse alone.
		named := false
		for _, reg := range b.Doc.Devices {
			if _, err := policy.Compile(policy.Document{Format: policy.DocumentFormat, Devices: []policy.Registration{reg}}, "check", ""); err != nil {
				b.Problems = append(b.Problems, fmt.Sprintf("device %s: %s", reg.ID, strings.TrimPrefix(err.Error(), policy.ErrInvalid.Error()+": ")))
				named = true
			}
		}
		if whole != nil && !named {
			b.Problems = append(b.Problems, strings.TrimPrefix(whole.Error(), policy.ErrInvalid.Error()+": "))
		}
	}
	sum, _ := json.Marshal(struct {
		D []policy.Registration
		G []policy.Delegation
	}{b.Doc.Devices, b.Doc.Delegations})
	h := sha256.Sum256(sum)
	b.Content = "sha256:" + hex.EncodeToString(h[:])
}

func dedupe(dls []policy.Delegation) []policy.Delegation {
	out := dls[:0]
	for i, d := range dls {
		if i > 0 && d == dls[i-1] {
			continue
		}
		out = append(out, d)
	}
	return out
}

type edgeBinding struct {
	gateway string
	radio   *policy.RadioBinding
	signing string
}

// parseEdgeURI reads edgegate://GW/mqtt or edgegate://GW/radio?port=P&
// node=N&child=C (sync.DeviceSpec.EdgeURI writes them), "signing" optional.
func parseEdgeURI(raw string) (edgeBinding, error) {
	u, err := url.Parse(raw)
	if err != nil || u.Scheme != "edgegate" || !gatewayIDRE.MatchString(u.Host) {
		//lint:ignore ST1005 the "..." is part of the URI form shown
		return edgeBinding{}, fmt.Errorf("%q is not edgegate://GATEWAY/...", clip(raw))
	}
	q := u.Query()
	eb := edgeBinding{gateway: u.Host, signing: q.Get("signing")}
	switch u.Path {
	case "/mqtt":
		return eb, nil
	case "/radio":
	default:
		return edgeBinding{}, fmt.Errorf("path %q is neither /mqtt nor /radio", clip(u.Path))
	}
	eb.radio = &policy.RadioBinding{Port: q.Get("port"), Node: -1, Child: -1}
	for name, p := range map[string]*int{"node": &eb.radio.Node, "child": &eb.radio.Child} {
		if v := q.Get(name); v != "" {
			n, err := strconv.Atoi(v)
			if err != nil {
				return edgeBinding{}, fmt.Errorf("%s %q is not a number", name, clip(v))
			}
			*p = n
		}
	}
	return eb, nil
}

func edgeBound(r OwnershipRow) bool {
	det, err := parseDetails(r.ElementDetails)
	return err == nil && detailString(det, "edgegateway_type") == centralsync.EdgeGatewayType
}

func isSet(raw json.RawMessage) bool {
	switch string(bytes.TrimSpace(raw)) {
	case "", "null", `""`, "false":
		return false
	}
	return true
}

// parseDetails decodes elementDetails as the gateway does
// (centralsync.ParseDetails); absent or null details are an empty object
// here, so such a row is judged by its missing keys, not refused whole.
func parseDetails(raw json.RawMessage) (map[string]any, error) {
	if t := bytes.TrimSpace(raw); len(t) == 0 || string(t) == "null" || string(t) == `""` {
		return map[string]any{}, nil
	}
	return centralsync.ParseDetails(raw)
}

func detailString(m map[string]any, key string) string { return centralsync.DetailString(m, key) }

func clip(s string) string { return logx.Clip(s, 120) }

// addReceived adds to each gateway of gateway_users the devices delegated
// to its account's username (not to its groups), with the owner's keys
// from the owner's ownership row (the account reads every row as a
// RootAdmin) and a delegation to the account, the way the gateway builds
// its own policy from received delegations (sync/ownership.go). Each
// device's registration goes into the gateway's build inputs.
func addReceived(s *Snapshot, brokers map[string]string, get func(string) *Built, inputs map[string]hash.Hash) {
	if len(s.Received) == 0 && len(s.ReceivedFailed) == 0 {
		return
	}
	for gw, why := range s.ReceivedFailed {
		b := get(gw)
		b.Problems = append(b.Problems, fmt.Sprintf("delegations received by %s unreadable: %s", s.Users[gw], clip(why)))
	}
	live := map[string]OwnershipRow{}
	for _, r := range s.Rows {
		if !isSet(r.Deleted) && (r.ElementType == "" || r.ElementType == "IOTID") {
			live[r.ElementID] = r
		}
	}
	for gw, rows := range s.Received {
		user := s.Users[gw]
		b := get(gw)
		in := inputs[gw]
		have := map[string]bool{}
		for _, d := range b.Doc.Devices {
			have[d.ID] = true
		}
		for _, d := range rows {
			if isSet(d.DeleteTime) || (d.ElementType != "" && d.ElementType != "IOTID") || !strings.EqualFold(d.UsernameDelegated, user) {
				continue
			}
			parts := strings.SplitN(d.ElementID, ":", 3)
			if len(parts) != 3 {
				b.Problems = append(b.Problems, fmt.Sprintf("delegation to %s on %s: elementId not Organization:broker:id", user, clip(d.ElementID)))
				continue
			}
			r, ok := live[d.ElementID]
			if !ok {
				continue // the device has no live row: it was deleted
			}
			dev, kind := parts[2], policy.Kind(d.Kind)
			if !kind.Valid() {
				b.Problems = append(b.Problems, fmt.Sprintf("delegation on %s: unknown kind %q", dev, clip(d.Kind)))
				continue
			}
			b.Doc.Delegations = append(b.Doc.Delegations, policy.Delegation{Device: dev, User: d.UsernameDelegated, Kind: kind})
			if have[dev] {
				continue
			}
			have[dev] = true
			det, err := parseDetails(r.ElementDetails)
			if err != nil {
				b.Problems = append(b.Problems, fmt.Sprintf("device %s delegated to %s: %v", dev, user, err))
				continue
			}
			reg := policy.Registration{ID: dev, Owner: r.Username, K1: detailString(det, "k1"), K2: detailString(det, "k2"),
				Signing: detailString(det, "signing"), PublicKeys: centralsync.DetailPublicKeys(det)}
			cb := detailString(det, "contextbroker")
			if cb == "" {
				cb = parts[1]
			}
			if reg.Broker, ok = brokers[cb]; !ok {
				b.Problems = append(b.Problems, fmt.Sprintf("device %s: context broker %q is not in platform.brokers", dev, clip(cb)))
				continue
			}
			if reg.Type = s.Types[cb+"/"+dev]; reg.Type == "" {
				b.Problems = append(b.Problems, fmt.Sprintf("device %s: the IoT Directory lists no entity type for it", dev))
				continue
			}
			rb, _ := json.Marshal(reg)
			fmt.Fprintf(in, "r%d:%s", len(rb), rb)
			b.Doc.Devices = append(b.Doc.Devices, reg)
		}
	}
}
