package radio

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sync"

	"github.com/edgegate/edgegate/internal/atomicfile"
)

// stateFileName holds the MySensors controller state that must survive a
// restart: which node ids each port's network has used, so that an id is
// never handed out twice.
const stateFileName = "radio-nodes.json"

type stateFile struct {
	Version int                  `json:"version"`
	Ports   map[string]portState `json:"ports"`
}

type portState struct {
	IDs []int `json:"ids"` // ids given out or seen on this port, sorted
}

// nodeIDs is the one owner of the persisted node ids of every port. It
// writes the file atomically (temp, fsync, rename, fsync dir) before an id
// is handed out, so a crash cannot hand the same id to two nodes.
type nodeIDs struct {
	path string // "" keeps the ids in memory only

	mu   sync.Mutex
	used map[string]*[256]bool
}

func loadNodeIDs(dir string) (*nodeIDs, error) {
	s := &nodeIDs{used: map[string]*[256]bool{}}
	if dir == "" {
		return s, nil
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create radio state directory: %w", err)
	}
	s.path = filepath.Join(dir, stateFileName)
	b, err := os.ReadFile(s.path)
	if errors.Is(err, fs.ErrNotExist) {
		return s, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read radio state: %w", err)
	}
	var f stateFile
	if err := json.Unmarshal(b, &f); err != nil {
		return nil, fmt.Errorf("parse radio state %s: %w", s.path, err)
	}
	for port, ps := range f.Ports {
		u := new([256]bool)
		for _, id := range ps.IDs {
			if id >= 1 && id <= MaxNodeID {
				u[id] = true
			}
		}
		s.used[port] = u
	}
	return s, nil
}

func (s *nodeIDs) usedOf(port string) *[256]bool {
	u := s.used[port]
	if u == nil {
		u = new([256]bool)
		s.used[port] = u
	}
	return u
}

// markSeen records that node id is in use on port; it persists only when
// the id is new.
func (s *nodeIDs) markSeen(port string, id int) error {
	if id < 1 || id > MaxNodeID {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	u := s.usedOf(port)
	if u[id] {
		return nil
	}
	u[id] = true
	if err := s.saveLocked(); err != nil {
		u[id] = false
		return err
	}
	return nil
}

// allocate hands out a fresh id for port: the first free one above the
// highest used, or the lowest free one once the top is taken. An id is
// free when it was never handed out or seen on port and bound(id) is
// false (bound may be nil): a new node must never get the id the policy
// binds to a device, or it would speak as that device. The id is
// persisted before it returns.
func (s *nodeIDs) allocate(port string, bound func(int) bool) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	u := s.usedOf(port)
	free := func(i int) bool { return !u[i] && (bound == nil || !bound(i)) }
	start := 1
	for i := MaxNodeID; i >= 1; i-- {
		if u[i] {
			start = i + 1
			break
		}
	}
	id := 0
	for i := start; i <= MaxNodeID && id == 0; i++ {
		if free(i) {
			id = i
		}
	}
	for i := 1; i < start && id == 0; i++ {
		if free(i) {
			id = i
		}
	}
	if id == 0 {
		return 0, fmt.Errorf("allocate node id on %s: all %d ids used or bound", port, MaxNodeID)
	}
	u[id] = true
	if err := s.saveLocked(); err != nil {
		u[id] = false
		return 0, err
	}
	return id, nil
}

func (s *nodeIDs) saveLocked() error {
	if s.path == "" {
		return nil
	}
	f := stateFile{Version: 1, Ports: map[string]portState{}}
	for port, u := range s.used {
		var ids []int
		for i, ok := range u {
			if ok {
				ids = append(ids, i)
			}
		}
		slices.Sort(ids)
		f.Ports[port] = portState{IDs: ids}
	}
	b, err := json.MarshalIndent(f, "", "  ")
	if err != nil {
		return fmt.Errorf("encode radio state: %w", err)
	}
	// 0600: CreateTemp's mode, which the state file always had.
	return atomicfile.Write(s.path, append(b, '\n'), 0o600)
}
