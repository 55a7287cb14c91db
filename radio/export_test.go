package radio

// StateFileName lets the external tests (package radio_test, which can
// import internal/sim/radiosim without an import cycle) find the saved
// id state.
const StateFileName = stateFileName

// TraceBytes reads a recorded trace from testdata/.
var TraceBytes = traceBytes

// PortBoundJSON builds one port (no manager) and returns its boundJSON.
func PortBoundJSON(pc PortConfig, sub Submitter, bind Binder, opts Options) func(device string) bool {
	return newPort(pc, sub, bind, nil, opts, nil, nil).boundJSON
}
