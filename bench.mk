# edgegate-bench: the end-to-end benchmark (issue 10). Included by the Makefile.
#   make bench                          default run (~10 minutes on 2 cores)
#   BENCH_QUICK=1 make bench            smoke test (~2 minutes)
#   BENCH_BACKLOG=1000000 make bench    backlog of 1M readings instead of 300k
#   BENCH_SKIP=micro,radio make bench   skip sections: e2e, backlog, policy, radio, micro
#   BENCH_CONCURRENCY=16 make bench     uplink.concurrency for the runs (default 4)
BENCH_SKIP ?=

.PHONY: bench-e2e

bench-e2e:
	$(GO) build -o bin/edgegate-bench ./bench/cmd/edgegate-bench
	./bin/edgegate-bench -out bench/results.json -skip '$(BENCH_SKIP)'
