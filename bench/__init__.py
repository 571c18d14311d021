"""Benchmarks for dres_fast (not part of the installed package): ``python -m bench`` for the whole
run, ``python -m bench.kernels`` for the op timings alone, ``python -m bench.generalization`` for the
evidence study, ``pytest bench --benchmark-only`` for pytest-benchmark microbenchmarks. Layout and
outputs: docs/benchmarks.md."""
