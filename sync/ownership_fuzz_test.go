package centralsync

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/edgegate/edgegate/internal/reading"
	"github.com/edgegate/edgegate/policy"
)

// FuzzOwnershipRows feeds arbitrary Ownership API and delegator answers
// through the same decoding as getJSON and into buildOwnershipDocument:
// nothing panics; a decoding error never quotes the input; every device
// that makes it into the document has a valid id and compiles, and so does
// the whole document (one bad row must not cost the policy); no skip
// detail carries a k1/k2 value.
func FuzzOwnershipRows(f *testing.F) {
	f.Add([]byte(ownershipRowsJSON), []byte(delegatorJSON))
	f.Add([]byte(`[]`), []byte(`[]`))
	f.Add([]byte(`[{"username":"alice","elementId":"O:orion-1:x","elementType":"IOTID","elementDetails":"{\"k1\":\"`+fuzzK1+`\",\"k2\":\"`+fuzzK2+`\",\"contextbroker\":\"orion-1\"}","deleted":null}]`), []byte(`null`))
	f.Add([]byte(`[{"elementId":"O:orion-1:x","elementDetails":"\"`+fuzzK1+`"}]`), []byte(`[{}]`))
	f.Add([]byte(`[{"elementId":"O:orion-1:x","elementDetails":{"k1":1,"k2":true,"contextbroker":"orion-1","type":"T"}}]`), []byte(`{}`))
	f.Add([]byte(`[{"elementId":"a:b:c:d:<script>","elementDetails":{"k1":"`+fuzzK1+`","k2":"`+fuzzK1+`","contextbroker":"orion-1"}}]`), []byte(`[{"usernameDelegator":"ALICE","usernameDelegated":"bob","elementId":"a:b:c:d:<script>"}]`))
	f.Add([]byte(`[{"elementId":"`+strings.Repeat("x", 300)+`","elementDetails":{"contextbroker":"orion-1","k1":"a","k2":"b"}}]`), []byte(`"`))
	f.Add([]byte(`{"rows":[]}`), []byte(`[1,2,3]`))
	f.Add([]byte(`[]`), []byte(`[{"usernameDelegator":"bob","usernameDelegated":"alice","elementId":"O:orion-1:y","elementType":"IOTID","kind":"READ_WRITE","delegationDetails":"{\"k1\":\"`+fuzzK1+`\",\"k2\":\"`+fuzzK2+`\"}"},{"usernameDelegator":"bob","groupnameDelegated":"cn=g","elementId":"O:orion-1:z","kind":"MODIFY"}]`))
	opts := OwnershipOptions{Username: "alice", Brokers: map[string]string{"orion-1": "https://broker.example:8443"}, DefaultType: "Sensor"}
	f.Fuzz(func(t *testing.T, rowsJSON, delsJSON []byte) {
		var rows []OwnershipRow
		if err := json.Unmarshal(rowsJSON, &rows); err != nil {
			checkJSONErrQuiet(t, SafeJSONError(err), rowsJSON)
			return
		}
		var dels []DelegationRow
		if err := json.Unmarshal(delsJSON, &dels); err != nil {
			checkJSONErrQuiet(t, SafeJSONError(err), delsJSON)
			dels = nil
		}
		doc, skipped, unusable := buildOwnershipDocument(ownershipInput{Rows: rows, Given: dels, Received: dels}, opts, "gw-1")
		for _, d := range doc.Devices {
			if !reading.ValidID(d.ID) {
				t.Fatalf("device id %q in the document", d.ID)
			}
		}
		doc.Version = 1
		if _, err := policy.Compile(doc, SourceOwnership, "sha256:x"); err != nil {
			t.Fatalf("rows accepted one by one do not compile together: %v", err)
		}
		// The values that may legitimately be quoted: everything but keys.
		var public strings.Builder
		for _, r := range rows {
			public.WriteString(r.Username + r.ElementID + r.ElementType + r.ElementName + "\x00")
			if det, err := ParseDetails(r.ElementDetails); err == nil {
				public.WriteString(DetailString(det, "contextbroker") + "\x00")
			}
		}
		for _, d := range dels {
			public.WriteString(d.UsernameDelegator + d.UsernameDelegated + d.GroupnameDelegated + d.ElementID + d.Kind + "\x00")
		}
		var keys []string
		for _, r := range rows {
			if det, err := ParseDetails(r.ElementDetails); err == nil {
				keys = append(keys, DetailString(det, "k1"), DetailString(det, "k2"))
			}
		}
		for _, d := range dels {
			k1, k2 := delegatedKeys(d.DelegationDetails)
			keys = append(keys, k1, k2)
		}
		for _, k := range keys {
			if len(k) < 6 || strings.Contains(public.String(), k) {
				continue
			}
			for _, s := range skipped {
				if strings.Contains(s.Detail, k) {
					t.Fatalf("skip %s detail %q quotes a device key", s.Reason, s.Detail)
				}
			}
			for _, u := range unusable {
				if b, _ := json.Marshal(u); strings.Contains(string(b), k) {
					t.Fatalf("unusable %s quotes a device key", u.ID)
				}
			}
		}
	})
}

// checkJSONErrQuiet: a decoding error of an API answer must not quote the
// answer (it holds K1/K2).
func checkJSONErrQuiet(t *testing.T, msg string, input []byte) {
	t.Helper()
	for _, sec := range []string{fuzzK1, fuzzK2} {
		if strings.Contains(string(input), sec) && strings.Contains(msg, sec) {
			t.Fatalf("JSON error %q quotes the input", msg)
		}
	}
}
