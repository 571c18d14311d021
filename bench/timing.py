"""Wall-time measurement for the benchmarks: CPU thread choice, one timed call, a median over
repetitions, and interleaved rounds that compare several steps under the same machine drift.

Every time is in milliseconds around a synchronized call (``torch.cuda.synchronize`` on CUDA), so
queued GPU work is counted where it runs, not where it is launched.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import torch


def choose_threads(device: str, threads: int | None = None) -> str:
    """Set torch's CPU threads; returns why. On a machine already busy with other work, OpenMP's
    spinning workers wait on each other and a multi-threaded step gets many times slower (more than
    10x measured on a shared 2-core box), so by default a busy CPU gets one thread."""
    if threads:
        torch.set_num_threads(threads)
        return f"--threads {threads}"
    if device.startswith("cuda"):
        return "torch default"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if cores > 1 and load > 0.5:
        torch.set_num_threads(1)
        return f"1 thread: 1-minute load average {load:.1f} on {cores} cores shows other work (override: --threads)"
    return f"torch default ({torch.get_num_threads()}): load average {load:.1f} on {cores} cores"


def add_machine_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options every benchmark command shares: ``--device`` and ``--threads``."""
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice, or 1 when the load average shows other work)")
    return parser


def require_device(device: str, prog: str) -> None:
    """Stop with a message naming the command when ``--device cuda`` has no GPU behind it."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"{prog}: --device cuda asked for but torch.cuda.is_available() is False")


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_call(fn: Callable[[], object], device: str) -> float:
    """Milliseconds of one call of ``fn``, synchronized before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3


def time_fn(fn: Callable[[], object], device: str, *, budget_s: float = 0.25, min_reps: int = 3,
            max_reps: int = 100, grad_to_none=None) -> dict:
    """Median and 20/80% quantiles of ``fn`` in milliseconds.

    CUDA: ``triton.testing.do_bench`` when Triton imports (it flushes L2 between calls). Otherwise
    (CPU, or CUDA without Triton) perf_counter around each synchronized call after two warm-up
    calls, repetitions sized to ``budget_s``."""
    if device.startswith("cuda"):
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            median, p20, p80 = do_bench(fn, grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8])
            return {"ms": float(median), "p20_ms": float(p20), "p80_ms": float(p80), "timer": "do_bench"}

    def one_call() -> float:
        for tensor in grad_to_none or ():
            tensor.grad = None
        return timed_call(fn, device)

    first = one_call()  # warm-up (allocations, lazy init); also sizes the loop
    first = min(first, one_call())
    reps = int(max(min_reps, min(max_reps, budget_s * 1e3 / max(first, 1e-3))))
    samples = sorted(one_call() for _ in range(reps))
    quantile = lambda q: samples[min(len(samples) - 1, int(q * len(samples)))]
    return {"ms": statistics.median(samples), "p20_ms": quantile(0.2), "p80_ms": quantile(0.8),
            "timer": f"perf_counter x{reps}"}


def interleaved_rounds(measures: dict[str, Callable[[int], float]], rounds: int, progress=None,
                       describe_error: Callable[[BaseException], str] = repr):
    """Run every measure once per round, the starting one rotating each round, so slow drifts of
    the machine (thermal, other processes) hit all of them alike.

    ``measures[key](round_index)`` returns one sample in ms. A measure that raises is dropped from
    later rounds and its error kept. Returns ``(samples, errors)``: key -> list of ms, key -> text."""
    samples = {key: [] for key in measures}
    errors: dict[str, str] = {}
    keys = list(measures)
    for r in range(rounds):
        shift = r % max(1, len(keys))
        for key in keys[shift:] + keys[:shift]:
            if key in errors:
                continue
            try:
                samples[key].append(measures[key](r))
            except Exception as exc:
                errors[key] = describe_error(exc)
        if progress is not None:
            progress.update(1)
    return samples, errors


__all__ = ["add_machine_options", "require_device", "choose_threads", "synchronize", "timed_call", "time_fn", "interleaved_rounds"]
