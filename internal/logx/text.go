// Package logx is the one place for log hygiene: untrusted text made safe
// for a log line, and log lines rate-limited per cause.
//
// Clip makes untrusted text (a device id, a topic, a broker's
// answer) safe to put in one log line or error message: control characters
// become spaces, so nothing can forge another log line, and the text is cut
// at a byte limit without splitting a UTF-8 sequence.
package logx

import (
	"net/url"
	"strings"
)

// Clip returns s fit for one log line, at most n bytes plus "…".
func Clip(s string, n int) string {
	s = strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return ' '
		}
		return r
	}, s)
	if len(s) > n {
		s = strings.ToValidUTF8(s[:n], "") + "…"
	}
	return s
}

// Redacted replaces a secret part of a URL.
const Redacted = "REDACTED"

// RedactURL hides what a URL may carry as a secret before it is echoed in
// an error or log: the userinfo (user:password@, both parts: a "user" may
// be a token), every query value and the fragment. Text that does not look
// like a URL with credentials is returned unchanged.
func RedactURL(s string) string {
	scheme := strings.Index(s, "://")
	if scheme < 0 {
		// user:password@host:port without a scheme.
		if at := strings.LastIndexByte(s, '@'); at > 0 && strings.IndexByte(s[:at], ':') >= 0 && !strings.ContainsAny(s[:at], "/ ") {
			return Redacted + s[at:]
		}
		return s
	}
	u, err := url.Parse(s)
	if err != nil {
		// Unparseable: cut by hand, never echo what follows "://" up to
		// the last '@' of the authority, nor anything after '?' or '#'.
		rest := s[scheme+3:]
		end := strings.IndexAny(rest, "/?#")
		if end < 0 {
			end = len(rest)
		}
		if at := strings.LastIndexByte(rest[:end], '@'); at >= 0 {
			s = s[:scheme+3] + Redacted + rest[at:]
		}
		if q := strings.IndexAny(s, "?#"); q >= 0 {
			s = s[:q+1] + Redacted
		}
		return s
	}
	if u.User != nil {
		u.User = url.User(Redacted)
	}
	if u.RawQuery != "" {
		q, err := url.ParseQuery(u.RawQuery)
		if err != nil {
			u.RawQuery = Redacted
		} else {
			for k := range q {
				q[k] = []string{Redacted}
			}
			u.RawQuery = q.Encode()
		}
	}
	if u.Fragment != "" {
		u.Fragment = Redacted
	}
	return u.String()
}

// URLCredential names the credential a URL carries, or returns "": its
// userinfo ("user:password@"), or a query parameter whose name says it is
// a secret (token, access_token, password, secret, apikey, jwt, auth,
// signature, k1 and k2 of the Orion Broker Filter, ...). Secrets belong in
// files or systemd credentials: a URL ends up in logs, process listings
// and error messages.
func URLCredential(u *url.URL) string {
	if u.User != nil {
		return "user:password@"
	}
	for name := range u.Query() {
		if credentialParam(name) {
			return "query parameter " + Clip(name, 32)
		}
	}
	return ""
}

func credentialParam(name string) bool {
	n := strings.ToLower(name)
	switch n {
	case "k1", "k2", "sig", "code":
		return true
	}
	for _, w := range []string{"token", "pass", "secret", "key", "auth", "jwt", "cred", "signature", "session"} {
		if strings.Contains(n, w) {
			return true
		}
	}
	return false
}
