"""``python -m bench [--quick] [--out DIR] [--device cpu|cuda]``: the whole benchmark.

Kernels against their measured floors, the weight set-up time for K = N from 64 up
(bench/weights_setup.py), the dense and banded spline paths side by side (bench/banded.py), the host cost of a small-d DReS step (bench/call_overhead.py), then training steps of DReS against the baselines; writes
``results.json``, ``summary.md`` and PNG plots to ``--out`` (default ``bench/out/``) and prints a
compact table last. ``--quick`` keeps CPU sizes small (a few minutes on 2 cores); ``--smoke`` is a
seconds-long run for the test suite.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import sys
import time

import torch


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU: {name}"


# K = N sizes of the weight set-up section per run mode (issue 9: K from 64 to 8,192).
WEIGHT_SETUP_SIZES = {"smoke": [64, 128], "quick": [64, 256, 1024, 4096],
                      "full": [64, 128, 256, 512, 1024, 2048, 4096, 8192]}


def run_weights_section(mode: str) -> list[dict]:
    """Weight set-up: the time and peak memory to build the encoder and decoder for K = N from 64 up
    (bench/weights_setup.py; rows with K, N, dof_search_s, weights_s, total_s, cpu_s, peak_mib)."""
    from bench import weights_setup

    return weights_setup.run_weights_setup(WEIGHT_SETUP_SIZES[mode], memory=mode != "smoke")


def main(argv=None) -> dict:
    from bench.timing import add_machine_options, choose_threads, require_device

    parser = add_machine_options(argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0]))
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"),
                        help="output folder (default bench/out/)")
    parser.add_argument("--skip-kernels", action="store_true", help="only the training steps")
    parser.add_argument("--models", default=None, help="comma-separated subset of mlp,cnn,transformer,resnet18")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes; < 5 minutes on a 2-core CPU")
    size.add_argument("--smoke", action="store_true", help="tiny sizes, seconds; used by tests/test_bench_smoke.py")
    args = parser.parse_args(argv)
    require_device(args.device, "python -m bench")
    threads_note = choose_threads(args.device, args.threads)
    from tqdm import tqdm

    from bench import report
    from bench.kernels import count_cases, run_kernels
    from bench.steps import run_steps

    run_mode = "smoke" if args.smoke else ("quick" if args.quick else "full")
    os.makedirs(args.out, exist_ok=True)
    started = time.perf_counter()
    results = {
        "device": args.device, "device_name": _device_name(args.device), "torch": torch.__version__,
        "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(), "threads_note": threads_note, "mode": run_mode,
        "command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "rates": {}, "kernels": [], "kernels_skipped": {}, "steps": [], "weights": [], "host": [], "banded": {},
    }
    progress = functools.partial(tqdm, leave=False, dynamic_ncols=True)
    if not args.skip_kernels:
        with progress(total=count_cases(args.device, run_mode), desc="kernels") as bar:
            kern = run_kernels(args.device, run_mode, progress=bar)
        results.update(rates=kern["rates"], kernels=kern["kernels"], kernels_skipped=kern["skipped"])
        results["kernel_floor_problems"] = report.floor_problems(kern["kernels"])
    results["weights"] = run_weights_section(run_mode)
    from bench.banded import run_banded

    results["banded"] = run_banded(args.device, run_mode)
    from bench import call_overhead

    results["host"] = (call_overhead.measure_steps(args.device, calls=3, rounds=1) if run_mode == "smoke"
                       else call_overhead.measure_steps(args.device))
    models = args.models.split(",") if args.models else None
    results.update(run_steps(args.device, run_mode, models=models, progress_factory=progress))
    results["wall_s"] = time.perf_counter() - started
    results["targets"] = report.targets(results)

    plots = report.write_plots(results, args.out)
    results["plots"] = plots
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump(results, fh, indent=1, default=str)
    report.write_summary(results, args.out, plots)
    print(report.console_table(results))
    print(f"\nwrote {args.out}/results.json, summary.md, " + ", ".join(plots))
    return results


if __name__ == "__main__":
    main()
