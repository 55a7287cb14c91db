# edgegate-bench: the end-to-end benchmark (issue 10). Included by the Makefile.
#   make bench                          default run (~15 minutes on 2 cores; backlog 100k vs 1M)
#   BENCH_QUICK=1 make bench            smoke test (~2 minutes)
#   BENCH_BACKLOG=300000 make bench     a shorter backlog (100k vs 300k)
#   BENCH_ONLY=filter make bench        only the end-to-end scenarios whose name holds this
#   BENCH_SKIP=micro,radio make bench   skip sections: e2e, backlog, policy, radio, micro
#   BENCH_CONCURRENCY=16 make bench     uplink.concurrency for the runs (default 4)
BENCH_SKIP ?=

.PHONY: bench-e2e

bench-e2e:
	$(GO) build -o bin/edgegate-bench ./bench/cmd/edgegate-bench
	./bin/edgegate-bench -out bench/results.json -skip '$(BENCH_SKIP)'
