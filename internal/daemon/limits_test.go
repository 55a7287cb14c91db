package daemon

import (
	"testing"

	"github.com/edgegate/edgegate/internal/config"
	"github.com/edgegate/edgegate/mqtt"
)

// The configuration's defaults are the broker's.
func TestConfigLimitsDefaultsMatchBroker(t *testing.T) {
	if got, want := brokerLimits(config.Default().MQTT.Embedded.Limits), mqtt.DefaultLimits(); got != want {
		t.Errorf("config defaults map to %+v, want mqtt.DefaultLimits %+v", got, want)
	}
}
