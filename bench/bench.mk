# Benchmark targets (included from the top Makefile: `include bench/bench.mk`).
#   make bench        quick side-by-side run (< ~10 min): docs/benchmarks.md + docs/bench_*.png
#   make bench-full   the long version (all load points, up to 10k streams, longer runs)
#   make bench-smoke  seconds-long check that the harness works end to end (what CI runs)
# BENCH_ARGS passes options through, e.g. make bench BENCH_ARGS="--only balance --reps 5".
BENCH_PY ?= .venv/bin/python
BENCH_ARGS ?=
BENCH_SMOKE_OUT ?= bench/results/smoke

.PHONY: bench bench-deps bench-full bench-smoke

# nginx and haproxy are arms of the comparison: installed first (Debian packages); a run
# without them still works and says "arm skipped: nginx not installed" in the report.
bench-deps:
	-bash scripts/install-system-deps.sh nginx haproxy

bench: bench-deps
	$(BENCH_PY) -m bench quick $(BENCH_ARGS)

bench-full: bench-deps
	$(BENCH_PY) -m bench full $(BENCH_ARGS)

bench-smoke:
	$(BENCH_PY) -m bench smoke --out $(BENCH_SMOKE_OUT) $(BENCH_ARGS)
