"""``python -m bench.call_overhead [--device cuda] [--out FILE.json]``: what one small-d DReS call costs the host.

At logits-sized widths (d = 10) the kernels' floor is microseconds, so a forward + backward costs what the
host spends issuing it: Python, dispatch, autograd, launches. Two parts:

* **ops**: a forward + backward of the two ops (``x_coded = spline_mix(E, x)``, ``loss =
  reconstruction_loss(x, x_coded, D)``, ``loss.backward()``) per backend on both roads into it
  (docs/ARCHITECTURE.md): ``eager`` (what ``dres_fast.ops`` uses outside tracing) and ``registered`` (the
  ``torch.library`` ops that ``torch.compile`` sees), next to ``plain`` (the same math in plain torch).
* **steps** (:func:`measure_steps`): a whole DReS step of a small MLP, forward + backward, through
  ``dres_loss`` and through ``SubmoduleDReS`` in both modes, each beside the same step written by hand:
  plain torch for ``dres_loss`` (the weights as tensors, ``f(x)``, ``f(E x)``, ``D f(E x)``, the mean square),
  and ``dres_loss`` on the block for ``SubmoduleDReS``. Each row also counts the calls into this repository's
  Python (cProfile frames whose file is under the repository) and the aten ops (a dispatch mode) per step.

Each timing: the median over rounds of the wall time of many calls divided by their number, the rows of
one comparison interleaved round by round (the machine's load drifts), the device synchronized once per
round. No figure here is a kernel time.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

K = N = 256
D_SMALL = 10
CALLS, ROUNDS, WARMUP = 200, 5, 20


def _inputs(device: str):
    from bench.kernels import default_weights

    encoder, decoder = default_weights(K, N, device, torch.float32)
    x = torch.randn(K, D_SMALL, device=device, requires_grad=True)
    return encoder, decoder, x


def _roads(device: str) -> dict:
    """name -> (spline_mix, reconstruction_loss returning the loss) for every backend and road here."""
    from dres_fast.ops import dispatch

    roads = {}
    for name in dispatch.available_backends(device):
        if name == "triton" and not device.startswith("cuda"):
            continue  # the interpreter: a correctness tool, not timed
        if name == "cuda" and not _module_built():
            continue  # never start the extension's minutes-long first build here
        functions = dispatch.functions(name, torch.device(device), torch.float32)
        roads[f"{name}/eager"] = (functions.spline_mix, lambda y, yc, d, r, g, f=functions: f.reconstruction_loss(y, yc, d, r))
        mix_op, loss_op = dispatch.registered_ops(name, torch.device(device))
        roads[f"{name}/registered"] = (mix_op, lambda *args, op=loss_op: op(*args)[0])

    def plain_mix(weights, x):
        return weights @ x

    def plain_loss(y, y_coded, decoder, reduction, compute_grads):
        return (y - decoder @ y_coded).square().mean()

    roads["plain"] = (plain_mix, plain_loss)
    return roads


def _module_built() -> bool:
    from dres_fast.backends import cuda

    return cuda.is_built()


def _call(mix, loss_fn, encoder, decoder, x):
    x.grad = None
    loss_fn(x, mix(encoder, x), decoder, "mean", True).backward()


def measure(device: str = "cpu", calls: int = CALLS, rounds: int = ROUNDS) -> dict:
    encoder, decoder, x = _inputs(device)
    cuda = device.startswith("cuda")
    rows = []
    for road, (mix, loss_fn) in _roads(device).items():
        for _ in range(WARMUP):
            _call(mix, loss_fn, encoder, decoder, x)
        per_call = []
        for _ in range(rounds):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(calls):
                _call(mix, loss_fn, encoder, decoder, x)
            if cuda:
                torch.cuda.synchronize()
            per_call.append((time.perf_counter() - start) / calls * 1e6)
        rows.append({"road": road, "us_per_call": statistics.median(per_call), "min_us": min(per_call)})
    eager = [r for r in rows if r["road"].endswith("/eager")]
    profile = ""
    if eager:
        slowest = max(eager, key=lambda r: r["us_per_call"])["road"]
        mix, loss_fn = _roads(device)[slowest]
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(calls):
            _call(mix, loss_fn, encoder, decoder, x)
        if cuda:
            torch.cuda.synchronize()
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(12)
        profile = f"cProfile of {slowest}, {calls} calls (tottime):\n" + text.getvalue()
    return {"K": K, "N": N, "d": D_SMALL, "rows": rows, "profile": profile}


#: (K, d_out) of the step rows: the issue's two small-d shapes (an MLP 16 -> 64 -> d_out)
STEP_SHAPES = ((32, 16), (256, 10))
STEP_CALLS, STEP_ROUNDS = 100, 7
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _step_cases(K: int, width: int, device: str) -> dict:
    """name -> a function running one forward + backward of a DReS step (module docstring)."""
    import dres_fast
    from dres_fast.cache import default_cache
    from dres_fast.smoothing import SmoothingSpec

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, width)).to(device)
    x = torch.randn(K, 16, device=device)
    encoder, decoder = default_cache.weights(SmoothingSpec(), K, torch.device(device), torch.float32)

    def plain():
        y = model(x)
        loss = (y - decoder @ model(encoder @ x)).square().mean()
        loss.backward()

    def functional():
        dres_fast.dres_loss(model, x, backend="torch").backward()

    cases = {"plain torch": plain, "dres_loss": functional}
    wrapper = torch.nn.Sequential(model)  # SubmoduleDReS regularizes its "0"
    for mode in ("separate", "concat"):
        reg = dres_fast.SubmoduleDReS(wrapper, "0", mode=mode, backend="torch")

        def hooked(reg=reg):
            with reg:
                wrapper(x)
            reg.loss.backward()

        cases[f"SubmoduleDReS {mode}"] = hooked

    def by_hand():  # what a user writes without SubmoduleDReS: the block's output, then dres_loss on it
        y = model(x)
        dres_fast.dres_loss(model, x, y=y, backend="torch").backward()

    cases["dres_loss on the block"] = by_hand
    return cases


class _AtenCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _project_calls(run) -> int:
    """Calls into this repository's Python during ``run()`` (cProfile frames whose file is in the repo)."""
    profiler = cProfile.Profile()
    profiler.enable()
    run()
    profiler.disable()
    stats = pstats.Stats(profiler).stats
    return sum(calls for (file, _, _), (_, calls, *_rest) in stats.items()
               if file.startswith(REPO) and os.sep + "bench" + os.sep not in file and ".venv" not in file)


def measure_steps(device: str = "cpu", calls: int = STEP_CALLS, rounds: int = STEP_ROUNDS) -> list[dict]:
    """One row per (shape, case): host microseconds per step (interleaved rounds, median), the ratio to the
    hand-written step it is compared with, project Python calls and aten ops per step."""
    rows = []
    for K, width in STEP_SHAPES:
        cases = _step_cases(K, width, device)
        times = {name: [] for name in cases}
        for run in cases.values():
            for _ in range(5):
                run()
        for _ in range(rounds):
            for name, run in cases.items():
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(calls):
                    run()
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                times[name].append((time.perf_counter() - start) / calls * 1e6)
        median = {name: statistics.median(values) for name, values in times.items()}
        for name, run in cases.items():
            counter = _AtenCounter()
            with counter:
                run()
            baseline = "plain torch" if name in ("dres_loss", "plain torch") else "dres_loss on the block"
            rows.append({"K": K, "d": width, "case": name, "us": median[name], "baseline": baseline,
                         "x_baseline": median[name] / median[baseline], "project_calls": _project_calls(run),
                         "aten_ops": counter.count})
    return rows


def format_step_rows(rows: list[dict]) -> str:
    lines = [f"{'K':>4} {'d':>3} {'case':24} {'us/step':>9} {'x base':>7} {'py calls':>8} {'aten':>5}  base"]
    lines += [f"{r['K']:4d} {r['d']:3d} {r['case']:24} {r['us']:9.1f} {r['x_baseline']:7.2f} {r['project_calls']:8d} "
              f"{r['aten_ops']:5d}  {r['baseline']}" for r in rows]
    return "\n".join(lines)


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'road':22} {'us per fwd+bwd':>14} {'min':>8}"]
    lines += [f"{r['road']:22} {r['us_per_call']:14.1f} {r['min_us']:8.1f}" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.call_overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--calls", type=int, default=CALLS, help=f"calls per round (default {CALLS})")
    parser.add_argument("--out", default=None, help="also write the rows and the profile to this JSON file")
    args = parser.parse_args(argv)
    result = measure(args.device, calls=args.calls)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"device: {name}   torch {torch.__version__}   K = N = {K}, d = {D_SMALL}, float32")
    print(format_rows(result["rows"]))
    print(result["profile"])
    result["steps"] = measure_steps(args.device)
    print(format_step_rows(result["steps"]))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"device": name, "torch": torch.__version__, **result}, fh, indent=1)


if __name__ == "__main__":
    main()
