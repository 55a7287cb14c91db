package pki

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestTLSHandshakeVerifiesWithPool(t *testing.T) {
	now := time.Now()
	ca, err := NewCA("edgegate test CA", now)
	if err != nil {
		t.Fatal(err)
	}
	if !ca.Cert.IsCA || ca.Cert.NotAfter.Sub(now) < 9*365*24*time.Hour {
		t.Fatalf("CA: IsCA=%v NotAfter=%v", ca.Cert.IsCA, ca.Cert.NotAfter)
	}
	cert, err := ca.IssueServer(now, "127.0.0.1", "localhost")
	if err != nil {
		t.Fatal(err)
	}
	if len(cert.Leaf.IPAddresses) != 1 || len(cert.Leaf.DNSNames) != 1 {
		t.Fatalf("SANs: ips=%v dns=%v", cert.Leaf.IPAddresses, cert.Leaf.DNSNames)
	}

	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12})
	if err != nil {
		t.Fatal(err)
	}
	// The server handshakes every connection until the listener closes.
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.SetDeadline(time.Now().Add(5 * time.Second))
			io.WriteString(c, "hello") // drives the handshake; fails for refused clients
			c.Close()
		}
	}()
	defer func() {
		ln.Close()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Error("accept loop did not stop")
		}
	}()

	for _, name := range []string{"127.0.0.1", "localhost"} {
		t.Run(name, func(t *testing.T) {
			_, port, _ := net.SplitHostPort(ln.Addr().String())
			d := &net.Dialer{Timeout: 5 * time.Second}
			c, err := tls.DialWithDialer(d, "tcp", net.JoinHostPort("127.0.0.1", port), &tls.Config{RootCAs: ca.Pool(), ServerName: name})
			if err != nil {
				t.Fatalf("handshake with ServerName %q: %v", name, err)
			}
			defer c.Close()
			got, err := io.ReadAll(c)
			if err != nil || string(got) != "hello" {
				t.Fatalf("read = %q, %v; want \"hello\"", got, err)
			}
		})
	}
	// A pool without the CA refuses the certificate.
	d := &net.Dialer{Timeout: 5 * time.Second}
	if c, err := tls.DialWithDialer(d, "tcp", ln.Addr().String(), &tls.Config{RootCAs: x509.NewCertPool(), ServerName: "127.0.0.1"}); err == nil {
		c.Close()
		t.Fatal("handshake with an empty pool succeeded")
	}
}

func TestIssueServerUsages(t *testing.T) {
	now := time.Now()
	ca, err := NewCA("ca", now)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := ca.IssueServer(now, "::1", "gw.example")
	if err != nil {
		t.Fatal(err)
	}
	_, err = cert.Leaf.Verify(x509.VerifyOptions{Roots: ca.Pool(), DNSName: "gw.example", KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, CurrentTime: now})
	if err != nil {
		t.Fatalf("verify serverAuth: %v", err)
	}
	_, err = cert.Leaf.Verify(x509.VerifyOptions{Roots: ca.Pool(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, CurrentTime: now})
	if err == nil {
		t.Fatal("server certificate verified for clientAuth")
	}
	if len(ca.Cert.SubjectKeyId) == 0 || !bytes.Equal(cert.Leaf.AuthorityKeyId, ca.Cert.SubjectKeyId) {
		t.Fatalf("key ids: CA subject %x, leaf authority %x", ca.Cert.SubjectKeyId, cert.Leaf.AuthorityKeyId)
	}
	if got := cert.Leaf.NotAfter.Sub(now); got > 366*24*time.Hour || got < 364*24*time.Hour {
		t.Fatalf("validity %v, want about a year", got)
	}
	if _, err := ca.IssueServer(now); err == nil {
		t.Fatal("IssueServer() with no hosts: no error")
	}
}

func TestWriteCertPEM(t *testing.T) {
	ca, err := NewCA("ca", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(path, []byte("old"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := WriteCertPEM(path, ca.CertPEM); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, ca.CertPEM) {
		t.Fatal("content differs")
	}
	if b, _ := pem.Decode(got); b == nil || b.Type != "CERTIFICATE" {
		t.Fatal("not a PEM certificate")
	}
	ents, _ := os.ReadDir(filepath.Dir(path))
	if len(ents) != 1 {
		t.Fatalf("directory holds %d entries, want 1 (no temp files left)", len(ents))
	}
	if err := WriteCertPEM(path, []byte("garbage")); err == nil {
		t.Fatal("WriteCertPEM(garbage): no error")
	}
	if err := WriteCertPEM(filepath.Join(t.TempDir(), "missing", "ca.pem"), ca.CertPEM); err == nil {
		t.Fatal("WriteCertPEM into a missing directory: no error")
	}
}
