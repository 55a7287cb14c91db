package main

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/edgegate/edgegate/centralsim"
	"github.com/edgegate/edgegate/config"
)

// TestDemoConfigAfterPair: the demo runs the daemon on the configuration a
// stock-mode `edgegate pair` writes, plus its own keys; the result must be
// one the daemon loads, still in stock mode (policy.source ownership-api,
// no devices in the file).
func TestDemoConfigAfterPair(t *testing.T) {
	f := newPairFixture(t, stockPlatform, centralsim.PairingOptions{})
	if res := f.runPair(t, context.Background(), func(code string) { _ = f.sim.ApproveDevice(code, "alice") }); res.err != nil {
		t.Fatalf("pair: %v\n%s", res.err, res.out)
	}
	link := filepath.Join(f.dir, "ttyRADIO0")
	if err := demoTuneConfig(f.cfgPath, link); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load(f.cfgPath)
	if err != nil {
		t.Fatalf("the daemon would refuse the demo's configuration: %v", err)
	}
	o := cfg.Policy.Ownership
	switch {
	case cfg.Policy.Source != config.PolicyOwnership:
		t.Errorf("policy.source = %q, want %q", cfg.Policy.Source, config.PolicyOwnership)
	case o.Username != "alice" || o.DefaultType != "TemperatureSensor":
		t.Errorf("policy.ownership = %+v", o)
	case o.Brokers[centralsim.DefaultBrokerName] != f.sim.BrokerURL():
		t.Errorf("brokers = %v, want %s at %s", o.Brokers, centralsim.DefaultBrokerName, f.sim.BrokerURL())
	case len(cfg.Radio.Ports) != 1 || cfg.Radio.Ports[0].Path != link || cfg.Radio.Ports[0].Codec != "mysensors":
		t.Errorf("radio.ports = %+v", cfg.Radio.Ports)
	case cfg.MQTT.Embedded.Listen != "127.0.0.1:0" || cfg.Log.Format != "json":
		t.Errorf("mqtt.embedded.listen %q, log.format %q", cfg.MQTT.Embedded.Listen, cfg.Log.Format)
	}
}

// TestDemoTuneConfigRefusesBundleMode: on a configuration that is not
// stock mode the demo says so instead of running something else.
func TestDemoTuneConfigRefusesBundleMode(t *testing.T) {
	f := newPairFixture(t, withCompanion, centralsim.PairingOptions{})
	if res := f.runPair(t, context.Background(), func(code string) { _ = f.sim.ApproveDevice(code, "alice") }); res.err != nil {
		t.Fatalf("pair: %v\n%s", res.err, res.out)
	}
	err := demoTuneConfig(f.cfgPath, filepath.Join(f.dir, "tty"))
	if err == nil {
		t.Fatal("demoTuneConfig accepted a bundle-mode configuration")
	}
	t.Log(err)
}
