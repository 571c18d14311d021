"""pytest configuration for the microbenchmarks in bench/ (``pytest bench --benchmark-only``).

They time things, so they run only when asked for with ``--benchmark-only``; any other pytest run
that happens to collect bench/ skips them. CI runs ``pytest tests`` and never collects this folder."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def pytest_collection_modifyitems(config, items):
    try:
        benchmark_only = config.getoption("benchmark_only")
    except ValueError:  # pytest-benchmark not installed
        benchmark_only = False
    if benchmark_only:
        return
    skip = pytest.mark.skip(reason="timing benchmark: run with `pytest bench --benchmark-only`")
    bench_dir = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        if str(item.fspath).startswith(bench_dir) and "benchmark" in getattr(item, "fixturenames", ()):
            item.add_marker(skip)
