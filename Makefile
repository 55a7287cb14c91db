# edgegate — the two commands that matter: `make demo` and `make test`.
GO      ?= go
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -s -w -buildid= -X github.com/edgegate/edgegate/internal/daemon.Version=$(VERSION)
BIN     := bin/edgegate
DEMO_SECONDS ?= 30

export CGO_ENABLED := 0

.PHONY: build test test-short lint duplicates-baseline demo bench fuzz clean fairness soak-hostile

build:
	$(GO) build -trimpath -ldflags "$(LDFLAGS)" -o $(BIN) ./cmd/edgegate
	$(GO) build -trimpath -ldflags "$(LDFLAGS)" -o bin/edgegate-central ./cmd/edgegate-central
	$(GO) build -trimpath -ldflags "$(LDFLAGS)" -o bin/edgegate-sim ./cmd/edgegate-sim
	$(GO) build -trimpath -o bin/edgegate-bench ./cmd/edgegate-bench

# gofmt, go vet, staticcheck (pinned; ~15 s with a warm cache, ~35 s cold
# on 2 cores, so `make test` keeps running it first) and the duplicates check
# against .ci/duplicates-baseline (.ci/duplicates.sh; skipped, and said so,
# where the `duplicates` command is absent).
STATICCHECK ?= honnef.co/go/tools/cmd/staticcheck@v0.8.2
lint:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	  if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) run $(STATICCHECK) ./...
	@.ci/duplicates.sh

# After a reviewed change that adds (or removes) duplicated places.
duplicates-baseline:
	@.ci/duplicates.sh --update

# The whole default suite: unit tests, end-to-end tests of the real binary
# against the embedded broker and a real Mosquitto, with the race detector.
# skipcheck prints what go test would and keeps its exit status; under
# CI=true it also fails on a skipped test that .ci/skip-allow does not list.
test: lint
	$(GO) build -o bin/skipcheck ./internal/testkit/cmd/skipcheck
	CGO_ENABLED=1 bin/skipcheck -allow .ci/skip-allow -- $(GO) test -race -count=1 -timeout 20m -json ./...

test-short: lint
	$(GO) test -short -count=1 ./...

# The uplink's round-robin, proven without a network or a clock, 200 times
# in a row (it once flaked as a timed end-to-end test).
fairness:
	$(GO) test -count=200 -run '^TestFillRoundRobin$$' ./internal/uplink

# The simulators live in bin/edgegate-sim (never packaged); its demo runs
# the bin/edgegate next to it.
demo: build
	DEMO_SECONDS=$(DEMO_SECONDS) ./bin/edgegate-sim demo

# The end-to-end benchmark (docs/performance.md, docs/bench/README.md):
#   make bench                          default run (6 min 49 s on 2 cores on 2026-11-26, docs/bench/results-2026-11-26.json; backlog 100k vs 1M)
#   BENCH_QUICK=1 make bench            smoke test (~2 minutes)
#   BENCH_BACKLOG=300000 make bench     a shorter backlog (100k vs 300k)
#   BENCH_ONLY=filter make bench        only the end-to-end scenarios whose name holds this
#   BENCH_SKIP=micro,radio make bench   skip sections: e2e, backlog, policy, radio, micro
#   BENCH_CONCURRENCY=16 make bench     uplink.concurrency for the runs (default 4)
BENCH_SKIP ?=
bench:
	$(GO) build -o bin/edgegate-bench ./cmd/edgegate-bench
	./bin/edgegate-bench -out docs/bench/results.json -skip '$(BENCH_SKIP)'

fuzz: fuzz-all

# edgegate-central at fleet scale: 10,000 gateways, 1,000,000 devices
# (BENCH_CENTRAL_GATEWAYS, BENCH_CENTRAL_DEVICES; BENCH_CENTRAL_STORE=postgres
# runs it on a real PostgreSQL started by the test). Prints the figures
# docs/central.md quotes.
.PHONY: bench-central
bench-central:
	$(GO) test -run '^$$' -bench '^BenchmarkCentralScale$$' -benchtime 1x -timeout 60m ./internal/central/

# Push->applied latency through a real Mosquitto: 1,000 real gateway
# syncers in one process (BENCH_PUSH_GATEWAYS); docs/central.md quotes it.
.PHONY: bench-central-push
bench-central-push:
	$(GO) test -run '^$$' -bench '^BenchmarkPushApplied1000$$' -benchtime 1x -timeout 30m ./internal/central/

clean:
	rm -rf bin dist

# The hostile floods of issue 17 (retained wills, 100k subscriptions, one
# device's 256 connections, connections that never send CONNECT) against
# the real embedded broker, SOAK_FLOOD each; prints peak RSS and heap per
# flood and fails past the unit's MemoryMax. Not part of `make test`.
SOAK_FLOOD ?= 40s
soak-hostile:
	SOAK_FLOOD=$(SOAK_FLOOD) $(GO) test -tags soak -count=1 -v -run 'TestSoakHostile' -timeout 30m ./mqtt

include packaging/packaging.mk
include e2e/chaos.mk
