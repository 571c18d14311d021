"""``python -m bench.banded [--quick|--smoke] [--device cpu|cuda] [--out FILE]``: the dense and banded
spline paths side by side.

One row per (K = N, d, dtype): forward + backward of both ops (``spline_mix`` of x, then ``reconstruction_loss``
of y against the decoded y_coded; non-unit incoming gradients), float32 data unless the row says, on each path, timed in
interleaved rounds (bench/timing.py), with each path's floor:

* dense floor = ``max(bytes / copy bandwidth, flops / matmul rate)`` (the row dtype's rate), flops ``8 K N d``
  (4 GEMMs);
* banded floor = ``bytes / copy bandwidth``: each tensor read or written once, ``4 (K + N) d`` elements.

``auto`` is the path :func:`dres_fast.ops.banded.choose` takes for the row's shape and dtype. Grid: K = N
in {256, 1024, 4096} and d in {2^10, 2^14, 2^18} (GPU), trimmed on the CPU to what fits memory and minutes
(rows left out are listed with the reason); plus K = N = 256 at small d, where ``auto`` must never lose; plus,
on the CPU, float64 and bfloat16 rows around ``auto``'s boundary for those dtypes (floors then use that
dtype's bytes and matmul rate).
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from bench.kernels import measure_copy_bandwidth, measure_matmul_rate
from bench.timing import add_machine_options, choose_threads, interleaved_rounds, require_device, timed_call
from dres_fast import ops
from dres_fast.cache import default_cache
from dres_fast.ops import banded as banded_path
from dres_fast.smoothing import SmoothingSpec

GRID = [(k, d) for k in (256, 1024, 4096) for d in (2**10, 2**14, 2**18)]
SMALL_D = ([(256, d) for d in (16, 32, 64, 256)] + [(128, d) for d in (64, 256, 1024)] + [(64, d) for d in (64, 1024)]
           + [(32, 4096)])
#: per mode: largest K * d (elements per tensor) and the largest dense flop count run on the CPU
CPU_LIMITS = {"smoke": (2**14, 1e9), "quick": (2**22, 6e10), "full": (2**24, 3e11)}
ISSUE_ROWS = [(1024, 4096), (4096, 1024)]  # issue 20's CPU targets: 5x and 20x
#: CPU rows in other dtypes, around auto's boundary for them (dres_fast/ops/banded.py AUTO_CPU_BY_DTYPE)
DTYPE_ROWS = {torch.float64: [(64, 64), (128, 64), (128, 128), (128, 256), (256, 32), (256, 64), (256, 256), (1024, 1024)],
              torch.bfloat16: [(128, 256), (128, 1024), (256, 32), (256, 64), (256, 256), (1024, 1024)]}


def cases(device: str, mode: str):
    """(rows to run as (K, d, run dense?, dtype), {row: why it is left out})."""
    if mode == "smoke":
        return [(64, 256, True, torch.float32)], {}
    rows = sorted(set(GRID + SMALL_D + ISSUE_ROWS))
    if device.startswith("cuda"):  # quick (bench/gpu_check.sh): rows up to 2^28 elements (1 GiB fp32 tensors)
        limit = 2**28 if mode == "quick" else 2**31
        return ([(k, d, True, torch.float32) for k, d in rows if k * d <= limit],
                {f"K=N={k}, d={d}": "over this mode's GPU limit" for k, d in rows if k * d > limit})
    max_elements, max_flops = CPU_LIMITS[mode]
    run, skipped = [], {}
    for k, d in rows:
        if k * d > max_elements:
            skipped[f"K=N={k}, d={d}"] = f"{k * d * 4 / 2**20:.0f} MiB per tensor: over this mode's CPU limit"
            continue
        dense = 8 * k * k * d <= max_flops
        if not dense:
            skipped[f"K=N={k}, d={d} (dense)"] = f"{8 * k * k * d / 1e9:.0f} GFLOP per step: over this mode's CPU limit"
        run.append((k, d, dense, torch.float32))
    run += [(k, d, True, dtype) for dtype, shapes in DTYPE_ROWS.items() for k, d in shapes]
    return run, skipped


def _step(encoder, decoder, tensors):
    x, y, y_coded, grad_mix = tensors
    for leaf in (x, y, y_coded):
        leaf.grad = None
    mixed = ops.spline_mix(encoder, x)
    loss = ops.reconstruction_loss(y, y_coded, decoder)
    torch.autograd.backward([mixed, loss], [grad_mix, torch.tensor(0.7, device=loss.device)])


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def run_row(device: str, k: int, d: int, with_dense: bool, bandwidth: float, rate: float, rounds: int,
            dtype: torch.dtype = torch.float32) -> dict:
    """One row; ``rate``: the matmul rate of ``dtype`` (the dense floor's flops)."""
    spec = SmoothingSpec()
    gen = torch.Generator(device="cpu").manual_seed(k + d)
    make = lambda rows: torch.randn(rows, d, generator=gen).to(device, dtype)  # noqa: E731
    tensors = [make(k).requires_grad_(), make(k).requires_grad_(), make(k).requires_grad_(), make(k)]
    paths = {"banded": default_cache.banded(spec, k, device)}
    if with_dense:
        paths["dense"] = default_cache.weights(spec, k, device, dtype)
    measures = {name: (lambda r, maps=maps: timed_call(lambda: _step(*maps, tensors), device))
                for name, maps in paths.items()}
    for fn in measures.values():
        fn(0)  # warm-up: kernel build, allocations
    samples, errors = interleaved_rounds(measures, rounds)
    row = {"K": k, "N": k, "d": d, "dtype": _name(dtype),
           "auto": banded_path.choose("auto", torch.device(device), k, k, d, dtype), "errors": errors}
    bytes_moved = 4 * (k + k) * d * dtype.itemsize
    row["banded_floor_ms"] = bytes_moved / bandwidth * 1e3
    row["dense_floor_ms"] = max(bytes_moved / bandwidth, 8 * k * k * d / rate) * 1e3
    for name, values in samples.items():
        if values:
            row[f"{name}_ms"] = sorted(values)[len(values) // 2]
            row[f"{name}_x_floor"] = row[f"{name}_ms"] / row[f"{name}_floor_ms"]
    if "dense_ms" in row and "banded_ms" in row:
        row["speedup"] = row["dense_ms"] / row["banded_ms"]
        row["auto_ms"] = row[f"{row['auto']}_ms"]
        row["auto_vs_dense"] = row["auto_ms"] / row["dense_ms"]
    return row


def run_banded(device: str = "cpu", mode: str = "quick", progress=None) -> dict:
    quick = mode != "full"
    bandwidth = measure_copy_bandwidth(device, quick)
    rows_to_run, skipped = cases(device, mode)
    rates = {dtype: measure_matmul_rate(device, dtype, quick) for dtype in dict.fromkeys(r[3] for r in rows_to_run)}
    rounds = 3 if mode == "smoke" else 5
    rows = []
    for k, d, with_dense, dtype in rows_to_run:
        rows.append(run_row(device, k, d, with_dense, bandwidth, rates[dtype], rounds, dtype))
        if progress is not None:
            progress.update(1)
    return {"copy_GBps": bandwidth / 1e9, "rows": rows, "skipped": skipped, "env": os.environ.get(banded_path.ENV_VAR, ""),
            **{f"mm_{_name(dtype)}_TFLOPs": rate / 1e12 for dtype, rate in rates.items()}}


def table(result: dict, markdown: bool = True) -> str:
    """Markdown table of :func:`run_banded`'s rows (also printed as is on the console)."""
    lines = ["| K = N | d | dtype | dense ms (x floor) | banded ms (x floor) | speed-up | auto | auto / dense |",
             "|---|---|---|---|---|---|---|---|"]
    ms = lambda value: f"{value:.0f}" if value >= 100 else f"{value:.3g}"  # noqa: E731  (no exponents)
    for r in result["rows"]:
        dense = f"{ms(r['dense_ms'])} ({r['dense_x_floor']:.1f}x)" if "dense_ms" in r else "not run"
        banded = f"{ms(r['banded_ms'])} ({r['banded_x_floor']:.1f}x)" if "banded_ms" in r else "failed"
        speed = f"{r['speedup']:.1f}x" if "speedup" in r else "-"
        auto = f"{r['auto_vs_dense']:.2f}" if "auto_vs_dense" in r else "-"
        lines.append(f"| {r['K']} | {r['d']} | {r['dtype']} | {dense} | {banded} | {speed} | {r['auto']} | {auto} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = add_machine_options(argparse.ArgumentParser(prog="python -m bench.banded", description=__doc__.split("\n")[0]))
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true")
    size.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=None, help="JSON file to write")
    args = parser.parse_args(argv)
    require_device(args.device, "python -m bench.banded")
    note = choose_threads(args.device, args.threads)
    mode = "smoke" if args.smoke else ("quick" if args.quick else "full")
    result = run_banded(args.device, mode)
    result.update(device=args.device, threads=torch.get_num_threads(), threads_note=note, mode=mode)
    print(table(result))
    for row, why in result["skipped"].items():
        print(f"left out: {row}: {why}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    main()
