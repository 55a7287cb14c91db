// Package packaging holds no code for the daemon: it is the home of the
// Debian packaging (nfpm.yaml, maintainer scripts, the build scripts that
// `make cross` and `make deb` run) and of the Go tests that check them, so
// that `go test ./...` covers what ships: reproducible builds, the package
// contents, lintian, and the systemd unit's sandbox score.
//
// Nothing imports this package.
package packaging
