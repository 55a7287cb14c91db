// Package centralsync talks to the central service: access tokens for the
// gateway's account today; policy pull and push, registration and pairing
// as they land.
//
// The design card names the folder sync/. The package is called centralsync
// so that importing it never shadows the standard library's sync (a file
// that needs both would otherwise have to rename one of them). Import it as
//
//	import "github.com/edgegate/edgegate/sync" // package centralsync
//
// Only cmd/ (wiring) and stages that need a bearer token (uplink, through
// its own Tokens interface) should import it.
//
// Secrets: client secrets, refresh tokens and access tokens never appear in
// this package's errors or logs; tests assert it with canary values.
package centralsync
