package uplink

import (
	"crypto/tls"
	"crypto/x509"
	"net"
	"net/http"
	"time"
)

// NewHTTPClient returns the client the uplink should use: TLS 1.2 or
// later, certificates always verified (against rootCAs, or the system
// roots if nil), connections kept alive and reused, HTTP/2 when the broker
// offers it, redirects not followed (a bearer token must not travel to
// another URL), and every phase bounded. timeout bounds a whole request
// (default 30s); maxConnsPerHost caps connections per broker (default 8).
func NewHTTPClient(rootCAs *x509.CertPool, timeout time.Duration, maxConnsPerHost int) *http.Client {
	if timeout <= 0 {
		timeout = 30 * time.Second
	}
	if maxConnsPerHost <= 0 {
		maxConnsPerHost = 8
	}
	dialer := &net.Dialer{Timeout: min(timeout, 10*time.Second), KeepAlive: 30 * time.Second}
	tr := &http.Transport{
		Proxy:       http.ProxyFromEnvironment,
		DialContext: dialer.DialContext,
		TLSClientConfig: &tls.Config{
			MinVersion: tls.VersionTLS12,
			RootCAs:    rootCAs,
		},
		ForceAttemptHTTP2:     true,
		TLSHandshakeTimeout:   min(timeout, 10*time.Second),
		ResponseHeaderTimeout: timeout,
		ExpectContinueTimeout: time.Second,
		IdleConnTimeout:       90 * time.Second,
		MaxIdleConns:          4 * maxConnsPerHost,
		MaxIdleConnsPerHost:   maxConnsPerHost,
		MaxConnsPerHost:       maxConnsPerHost,
	}
	return &http.Client{
		Transport: tr,
		Timeout:   timeout,
		CheckRedirect: func(*http.Request, []*http.Request) error {
			return http.ErrUseLastResponse
		},
	}
}
