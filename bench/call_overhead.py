"""``python -m bench.call_overhead [--device cuda] [--out FILE.json]``: what one small-d DReS call costs the host.

At logits-sized widths (d = 10) the kernels' floor is microseconds, so a forward + backward of the two ops
(``x_coded = spline_mix(E, x)``, ``loss = reconstruction_loss(x, x_coded, D)``, ``loss.backward()``) costs what
the host spends issuing it: Python, dispatch, autograd, launches. This times that cost per backend on both
roads into a backend (docs/ARCHITECTURE.md): ``eager`` (the ``autograd.Function`` s that ``dres_fast.ops``
uses outside tracing) and ``registered`` (the ``torch.library`` ops that ``torch.compile`` sees), next to
``plain`` (the same math in plain differentiable torch). Each row: the median over 5 rounds of the wall time
of 200 calls divided by 200, the device synchronized once per round (so with a GPU the figure is the
host's issue rate whenever the host is slower than the GPU, as at d = 10). Then the ``cProfile`` of the
slowest eager backend shows where its time goes. No figure here is a kernel time.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import time

import torch

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
        loaded = dispatch.load_backend(name)
        roads[f"{name}/eager"] = (loaded.eager_spline_mix, loaded.eager_reconstruction_loss)
        op = loaded.reconstruction_loss
        roads[f"{name}/registered"] = (loaded.spline_mix, lambda *args, op=op: op(*args)[0])

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
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"device": name, "torch": torch.__version__, **result}, fh, indent=1)


if __name__ == "__main__":
    main()
