package daemon

import (
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/edgegate/edgegate/internal/pki"
)

// stateLocalCA is the store record of the gateway's local CA, whose
// certificate devices pin for the TLS listener of the embedded broker.
const stateLocalCA = "local-ca"

type localCA struct {
	CertPEM string `json:"cert"`
	KeyDER  []byte `json:"key"` // PKCS #8
}

// stateStore is what the local CA needs of the store.
type stateStore interface {
	GetState(name string) ([]byte, bool, error)
	PutState(name string, v []byte) error
}

// localTLS returns the TLS configuration of the embedded broker's network
// listener: the installer's certificate when configured, else a server
// certificate issued at every start by the gateway's own CA (created once,
// kept in the encrypted store). The CA certificate is written to caOut for
// devices to pin.
func localTLS(st stateStore, certFile, keyFile string, names []string, caOut string, now time.Time) (*tls.Config, error) {
	if certFile != "" {
		cert, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return nil, fmt.Errorf("load mqtt.embedded.cert_file/key_file: %w", err)
		}
		return &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}, nil
	}
	ca, err := loadOrCreateCA(st, now)
	if err != nil {
		return nil, err
	}
	hosts := []string{"localhost", "127.0.0.1", "::1"}
	if h, err := os.Hostname(); err == nil && h != "" {
		hosts = append([]string{h}, hosts...)
	}
	hosts = append(hosts, names...)
	if addrs, err := net.InterfaceAddrs(); err == nil {
		for _, a := range addrs {
			if ipn, ok := a.(*net.IPNet); ok && !ipn.IP.IsLoopback() && !ipn.IP.IsLinkLocalUnicast() {
				hosts = append(hosts, ipn.IP.String())
			}
		}
	}
	cert, err := ca.IssueServer(now, hosts...)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Dir(caOut), 0o755); err != nil {
		return nil, fmt.Errorf("write local CA certificate: %w", err)
	}
	if err := pki.WriteCertPEM(caOut, ca.CertPEM); err != nil {
		return nil, fmt.Errorf("write local CA certificate: %w", err)
	}
	return &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}, nil
}

func loadOrCreateCA(st stateStore, now time.Time) (*pki.CA, error) {
	raw, ok, err := st.GetState(stateLocalCA)
	if err != nil {
		return nil, fmt.Errorf("load local CA: %w", err)
	}
	if ok {
		var rec localCA
		if err := json.Unmarshal(raw, &rec); err != nil {
			return nil, fmt.Errorf("load local CA: %w", err)
		}
		block, _ := pem.Decode([]byte(rec.CertPEM))
		if block == nil {
			return nil, fmt.Errorf("load local CA: no certificate")
		}
		cert, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("load local CA: %w", err)
		}
		key, err := x509.ParsePKCS8PrivateKey(rec.KeyDER)
		if err != nil {
			return nil, fmt.Errorf("load local CA: %w", err)
		}
		signer, ok := key.(crypto.Signer)
		if !ok {
			return nil, fmt.Errorf("load local CA: key is not a signer")
		}
		return &pki.CA{Cert: cert, Key: signer, CertPEM: []byte(rec.CertPEM)}, nil
	}
	ca, err := pki.NewCA("edgegate local CA", now)
	if err != nil {
		return nil, err
	}
	der, err := x509.MarshalPKCS8PrivateKey(ca.Key)
	if err != nil {
		return nil, fmt.Errorf("store local CA: %w", err)
	}
	b, _ := json.Marshal(localCA{CertPEM: string(ca.CertPEM), KeyDER: der})
	if err := st.PutState(stateLocalCA, b); err != nil {
		return nil, fmt.Errorf("store local CA: %w", err)
	}
	return ca, nil
}
