"""Weight set-up: time and peak memory to build both DReS weight matrices from scratch.

For K = N samples: the encoder ``E = W(alpha -> beta)`` (N x K) and the decoder ``D = W(beta -> alpha)``
(K x N) with the default smoothing (each spline keeps ``DEFAULT_DOF_FRACTION`` of its knots' degrees of
freedom, so each needs a dof -> lambda search first), in float64 on the CPU, with cold caches: what the
first training step at a new batch size pays. Time and peak memory come from separate runs, since
``tracemalloc`` slows Python-level loops.

``python -m bench.weights_setup [--sizes 64,256,1024] [--no-memory]`` prints a table;
:func:`run_weights_setup` returns the rows for the harness.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import dres_fast
from dres_fast import splines
from dres_fast.smoothing import DEFAULT_DOF_FRACTION

DEFAULT_SIZES = (64, 128, 256, 512, 1024, 2048, 4096, 8192)


def _build_once(num_samples: int, num_coded: int):
    """(wall seconds in the two dof searches, in the two weight matrices, CPU seconds in all), caches
    cleared first."""
    splines._lam_for_dof_cached.cache_clear()
    cpu_start = time.process_time()
    start = time.perf_counter()
    alpha = dres_fast.points(num_samples, "chebyshev")
    beta = dres_fast.points(num_coded, "lobatto")
    lam_enc = dres_fast.lam_for_dof(alpha, max(2.0, DEFAULT_DOF_FRACTION * num_samples))
    lam_dec = dres_fast.lam_for_dof(beta, max(2.0, DEFAULT_DOF_FRACTION * num_coded))
    searched = time.perf_counter()
    encoder = dres_fast.spline_weights(alpha, beta, lam_enc)
    decoder = dres_fast.spline_weights(beta, alpha, lam_dec)
    done = time.perf_counter()
    cpu = time.process_time() - cpu_start
    assert encoder.shape == (num_coded, num_samples) and decoder.shape == (num_samples, num_coded)
    return searched - start, done - searched, cpu


def measure(num_samples: int, num_coded: int = None, *, repeats: int = 1, memory: bool = True) -> dict:
    """One row: best-of-``repeats`` times (s) and, with ``memory``, the peak traced memory (MiB)."""
    num_coded = num_samples if num_coded is None else num_coded
    times = [_build_once(num_samples, num_coded) for _ in range(repeats)]
    search_s, weights_s, cpu_s = min(times, key=lambda parts: parts[0] + parts[1])
    row = {
        "K": num_samples,
        "N": num_coded,
        "dof_search_s": search_s,
        "weights_s": weights_s,
        "total_s": search_s + weights_s,
        "cpu_s": cpu_s,
        "output_mib": 2 * num_samples * num_coded * 8 / 2**20,
        "peak_mib": None,
    }
    if memory:
        tracemalloc.start()
        try:
            _build_once(num_samples, num_coded)
            row["peak_mib"] = tracemalloc.get_traced_memory()[1] / 2**20
        finally:
            tracemalloc.stop()
    return row


def _warm_up() -> None:
    """Load the lazily imported scipy pieces, so that the first row does not pay for them."""
    _build_once(8, 8)


def run_weights_setup(sizes=DEFAULT_SIZES, *, repeats: int = 1, memory: bool = True) -> list:
    """Rows of :func:`measure` for K = N in ``sizes``."""
    _warm_up()
    return [measure(size, repeats=repeats, memory=memory) for size in sizes]


def format_table(rows) -> str:
    lines = [f"{'K = N':>7} {'dof search':>11} {'weights':>9} {'total':>9} {'CPU':>9} {'output':>9} {'peak mem':>9}"]
    for row in rows:
        peak = "-" if row["peak_mib"] is None else f"{row['peak_mib']:.0f} MiB"
        lines.append(
            f"{row['K']:>7} {row['dof_search_s']:>10.3f}s {row['weights_s']:>8.3f}s {row['total_s']:>8.3f}s"
            f" {row['cpu_s']:>8.3f}s {row['output_mib']:>5.0f} MiB {peak:>9}"
        )
    return "\n".join(lines)


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(prog="python -m bench.weights_setup", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="comma-separated K (= N)")
    parser.add_argument("--repeats", type=int, default=1, help="time the best of this many builds")
    parser.add_argument("--no-memory", action="store_true", help="skip the (slower) peak-memory run")
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",") if size]
    rows = []
    _warm_up()
    print("weight set-up, both matrices, default dof smoothing, float64 on the CPU (cold caches);"
          " wall times, and CPU time (what an idle machine's wall time would be for this single-threaded work)")
    for size in sizes:
        rows.append(measure(size, repeats=args.repeats, memory=not args.no_memory))
        print(format_table(rows).splitlines()[-1] if len(rows) > 1 else format_table(rows), flush=True)
    return rows


if __name__ == "__main__":
    main()
