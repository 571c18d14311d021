"""Benchmarks for dres_fast (not part of the installed package): ``python -m bench`` for the whole
run, ``python -m bench.kernels`` for the op timings alone, ``pytest bench --benchmark-only`` for
pytest-benchmark microbenchmarks. See docs/benchmarks.md."""
