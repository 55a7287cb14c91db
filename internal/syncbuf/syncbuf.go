// Package syncbuf is kept only as an alias of testkit.Buffer for the mqtt
// tests, which other work was editing when the helpers were merged into
// internal/testkit (issue #19). New code imports testkit; delete this
// package once mqtt/access_test.go does.
package syncbuf

import "github.com/edgegate/edgegate/internal/testkit"

// Buffer is testkit.Buffer.
//
// Deprecated: use testkit.Buffer.
type Buffer = testkit.Buffer
