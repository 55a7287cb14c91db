//go:build race

package envelope

// raceEnabled: under the race detector sync.Pool drops a share of what is
// put back on purpose, so pooled scratch is reallocated at random.
const raceEnabled = true
