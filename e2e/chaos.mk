# Chaos suite and fuzzing (issue 11). Included from the Makefile.
#
#   make chaos            the long chaos run: CHAOS_CYCLES SIGKILL cycles and
#                         every fault scenario, against the real binary
#   make fuzz             every fuzz target for FUZZTIME each (default 30s)
#
# Crashers land in <pkg>/testdata/fuzz/<Target>/; commit them: `go test`
# runs them as regression tests from then on.

CHAOS_CYCLES  ?= 50
CHAOS_TIMEOUT ?= 60m
FUZZTIME      ?= 30s

# package:target pairs; keep in step with the *_fuzz_test.go files.
FUZZ_TARGETS := \
	./internal/reading:FuzzParse \
	./internal/reading:FuzzParseSealBody \
	./internal/config:FuzzLoad \
	./sync:FuzzVerifyBundle \
	./sync:FuzzOwnershipRows \
	./internal/uplink:FuzzClassify \
	./internal/accesstoken:FuzzVerify \
	./internal/envelope:FuzzOpen \
	./internal/envelope:FuzzVerifyAttrs \
	./internal/envelope:FuzzVerifyEntity \
	./internal/envelope:FuzzAppendBody \
	./mqtt:FuzzTopicMatch \
	./mqtt:FuzzCommandTopic \
	./internal/command:FuzzReadEntity \
	./internal/command:FuzzNotifiedIDs \
	./mqtt:FuzzBrokerPackets \
	./radio:FuzzMySensors \
	./radio:FuzzJSONLines \
	./radio/modbus:FuzzDecodeResponse \
	./radio/modbus:FuzzDecodeRequest

.PHONY: chaos chaos-short fuzz-all

chaos:
	CHAOS_CYCLES=$(CHAOS_CYCLES) $(GO) test -count=1 -v -run 'Chaos' -timeout $(CHAOS_TIMEOUT) ./e2e

chaos-short:
	$(GO) test -count=1 -v -run 'Chaos' -timeout 10m ./e2e

fuzz-all:
	@set -e; for pt in $(FUZZ_TARGETS); do \
	  pkg=$${pt%%:*}; fn=$${pt##*:}; \
	  echo "== $$pkg $$fn ($(FUZZTIME))"; \
	  $(GO) test -run '^$$' -fuzz "^$$fn\$$" -fuzztime $(FUZZTIME) $$pkg; \
	done

