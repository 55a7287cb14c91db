package centralsync

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"

	"github.com/edgegate/edgegate/internal/atomicfile"
)

// FloorFileName is the file, in the gateway's state_dir, that keeps the
// policy's anti-rollback floor outside the encrypted store (issue 17 item
// 9). The store can be quarantined (a corrupt store is moved aside and a
// new, empty one opened) and is wiped by a factory reset; a floor kept
// only in it would then fall to 0, and any old, unexpired bundle signed by
// the pinned keys could roll the policy back (restore a revoked device or
// delegation). The file holds no secret: {"version":N}.
//
// Factory reset keeps this file (daemon.wipeState): it unpairs the
// gateway, but the configuration (pinned policy keys, a client secret
// file) may survive it in /etc, so the next start could be offered the old
// bundles again. Central's versions only grow, for this gateway or for a
// new pairing of it (the Ownership API source numbers its documents
// floor+1), so keeping the floor costs nothing. An installer who moves a
// gateway to another central service whose versions start lower removes
// the file deliberately.
const FloorFileName = "policy-floor.json"

// maxFloorFile bounds what readFloorFile reads.
const maxFloorFile = 4 << 10

// readFloorFile returns the floor kept in path; 0 when there is none. A
// file that exists but does not parse is an error: the floor must never
// go down silently.
func readFloorFile(path string) (uint64, error) {
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("read policy floor file: %w", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxFloorFile+1))
	if err != nil {
		return 0, fmt.Errorf("read policy floor file %s: %w", path, err)
	}
	if len(b) > maxFloorFile {
		return 0, fmt.Errorf("policy floor file %s is larger than %d bytes", path, maxFloorFile)
	}
	var r floorRecord
	if err := json.Unmarshal(b, &r); err != nil {
		return 0, fmt.Errorf("policy floor file %s: %s; it keeps the policy from being rolled back: restore it, or remove it to accept any version again", path, SafeJSONError(err))
	}
	return r.Version, nil
}

// writeFloorFile replaces path with the floor v, atomically: a temp file
// in the same directory, fsynced, renamed over path, the directory
// fsynced; after a crash the file holds the old or the new floor.
func writeFloorFile(path string, v uint64) error {
	data, _ := json.Marshal(floorRecord{Version: v})
	if err := atomicfile.Write(path, append(data, '\n'), 0o600); err != nil {
		return fmt.Errorf("write policy floor file: %w", err)
	}
	return nil
}
