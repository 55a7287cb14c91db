package uplink

import (
	"bytes"
	"fmt"
	"net/url"
	"strings"

	"github.com/edgegate/edgegate/internal/envelope"
	"github.com/edgegate/edgegate/internal/queue"
)

// Request body encoding (issue 20). A PATCH carries the stored body as it
// is (envelope.SealBody rendered it when the reading was queued); an
// op/update splices the stored bodies into one array. Both are append-only
// over bytes already rendered: no map, no sort, no encoding/json per
// reading. TestBatchBodyOrion checks the result against the simulated
// Orion's parser (internal/sim/centralsim, after Orion 3.12's
// parseBatchUpdate.cpp).

// batchBody renders the op/update body: each stored body (an NGSI
// attribute object) becomes an entity with "id" and "type" spliced in front
// of its attributes.
func batchBody(items []queue.Item, sizeHint int) ([]byte, error) {
	b := make([]byte, 0, sizeHint+64)
	b = append(b, `{"actionType":"append","entities":[`...)
	for i, it := range items {
		body := bytes.TrimSpace(it.Body)
		if len(body) < 2 || body[0] != '{' || body[len(body)-1] != '}' {
			return nil, fmt.Errorf("reading %s/%d is not a JSON object", it.Device, it.Seq)
		}
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
		inner := bytes.TrimSpace(body[1 : len(body)-1])
		if len(inner) > 0 {
			b = append(b, ',')
			b = append(b, inner...)
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
