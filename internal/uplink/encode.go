package uplink

import (
	"fmt"
	"net/url"
	"strings"

	"github.com/edgegate/edgegate/internal/envelope"
	"github.com/edgegate/edgegate/internal/queue"
)

// Request body encoding (issue 20). The queue stores a reading's body
// packed, its metadata (the JWS) once (envelope.SealPacked); a PATCH
// carries it rendered in full (envelope.AppendBody), and an op/update
// renders the stored bodies into one array. Both are append-only over
// bytes already rendered: no map, no sort, no encoding/json per reading. TestBatchBodyOrion checks the result against the simulated
// Orion's parser (internal/sim/centralsim, after Orion 3.12's
// parseBatchUpdate.cpp).

// appendBatchBody appends the op/update body to b (a pooled buffer:
// body.go): each stored body (an NGSI attribute object, packed or not)
// becomes an entity with "id" and "type" in front of its attributes,
// rendered straight into the request (envelope.AppendAttrs).
func appendBatchBody(b []byte, items []queue.Item) ([]byte, error) {
	b = append(b, `{"actionType":"append","entities":[`...)
	for i, it := range items {
		if i > 0 {
			b = append(b, ',')
		}
		// Device ids are [A-Za-z0-9._-] (queue-checked); the type is
		// quoted like any string.
		b = append(b, `{"id":`...)
		b = envelope.AppendJSONString(b, it.Device)
		if it.Type != "" {
			b = append(b, `,"type":`...)
			b = envelope.AppendJSONString(b, it.Type)
		}
		b = append(b, ',')
		mark := len(b)
		var err error
		if b, err = envelope.AppendAttrs(b, it.Body); err != nil {
			return nil, fmt.Errorf("reading %s/%d: %w", it.Device, it.Seq, err)
		}
		if len(b) == mark {
			b = b[:mark-1] // no attributes: no comma
		}
		b = append(b, '}')
	}
	return append(b, "]}"...), nil
}

// patchURL is the filter's PATCH target of one reading,
// {base}/v2/entities/{id}/attrs?elementid={id}&type={type} (see request),
// rendered in one string: what url.Values{…}.Encode() renders (its keys
// sorted: elementid, type), without the map, the sort and the
// intermediate strings (TestPatchURLMatchesURLValues).
func patchURL(base, device, typ string) string {
	dev := url.PathEscape(device) // [A-Za-z0-9._-] (queue-checked): unchanged, no allocation
	qdev := url.QueryEscape(device)
	qtyp := url.QueryEscape(typ)
	n := len(base) + len("/v2/entities/") + len(dev) + len("/attrs?elementid=") + len(qdev)
	if typ != "" {
		n += len("&type=") + len(qtyp)
	}
	var b strings.Builder // one allocation: String does not copy
	b.Grow(n)
	b.WriteString(base)
	b.WriteString("/v2/entities/")
	b.WriteString(dev)
	b.WriteString("/attrs?elementid=")
	b.WriteString(qdev)
	if typ != "" {
		b.WriteString("&type=")
		b.WriteString(qtyp)
	}
	return b.String()
}
