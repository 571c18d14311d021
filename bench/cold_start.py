"""``python -m bench.cold_start [--device cuda] [--out FILE.json]``: the first DReS training step of a fresh
process, compilation and autotuning included.

Each case runs in a new Python process with an empty Triton cache (``TRITON_CACHE_DIR`` set to a new
temporary folder, so every kernel is compiled and autotuned again). The child
times, with ``time.perf_counter`` and a device synchronize before each reading:

* ``import_torch_s``, ``import_dres_s``: the imports;
* ``first_step_s``: building the model and batch, then one training step (forward, DReS with ``y=`` the
  logits, backward, SGD step) of ``bench.models`` ResNet-18 (MLP on CPU), batch 128 (16 on CPU);
* ``second_step_s``: the next step, warm, for scale.

Cases on CUDA: float32 with backend ``auto`` (the torch backend: the baseline) and ``triton``, and bf16
autocast with ``auto`` (Triton). The CUDA backend compiles nothing per process (its one-time build is
``bench/gpu_check.sh``'s build step). Target (issue 10): ``first_step_s`` under 10 s.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

WEIGHT = 0.1  # the DReS weight of the step; its value does not change the cost


def child(device: str, backend: str, dtype_name: str) -> dict:
    """One case, in this (fresh) process; returns the timings."""
    start = time.perf_counter()
    import torch

    imported_torch = time.perf_counter()
    import dres_fast

    imported_dres = time.perf_counter()
    from bench.models import build_model, input_shape

    cuda = device.startswith("cuda")
    name, sizes, batch = ("resnet18", {"width": 64}, 128) if cuda else ("mlp", {"hidden": 64}, 16)
    reg = dres_fast.DReSLoss(backend=backend)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def step(model, optimizer, x, target):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16,
                            enabled=dtype_name == "bf16_autocast"):
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits.float(), target) + WEIGHT * reg(model, x, y=logits)
        loss.backward()
        optimizer.step()
        sync()

    first = time.perf_counter()
    torch.manual_seed(0)
    model = build_model(name, sizes).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(batch, *input_shape(name, sizes), device=device)
    target = torch.randint(0, 10, (batch,), device=device)
    step(model, optimizer, x, target)
    second = time.perf_counter()
    step(model, optimizer, x, target)
    done = time.perf_counter()
    return {"device": device, "backend": backend, "dtype": dtype_name, "model": name, "batch": batch,
            "resolved_backend": dres_fast.ops.resolve_backend(
                backend, torch.device(device), torch.bfloat16 if dtype_name == "bf16_autocast" else torch.float32),
            "import_torch_s": imported_torch - start, "import_dres_s": imported_dres - imported_torch,
            "first_step_s": second - first, "second_step_s": done - second}


def run_case(device: str, backend: str, dtype_name: str, timeout_s: float) -> dict:
    """``child`` in a new interpreter with an empty Triton cache."""
    with tempfile.TemporaryDirectory(prefix="dres_cold_triton_") as cache:
        env = dict(os.environ, TRITON_CACHE_DIR=cache)
        code = (f"import json; from bench.cold_start import child; "
                f"print('RESULT ' + json.dumps(child({device!r}, {backend!r}, {dtype_name!r})))")
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        try:
            proc = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True,
                                  text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"device": device, "backend": backend, "dtype": dtype_name, "error": f"over {timeout_s:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"device": device, "backend": backend, "dtype": dtype_name,
            "error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}


def cases(device: str) -> list[tuple[str, str]]:
    if not device.startswith("cuda"):
        return [("torch", "float32")]
    return [("auto", "float32"), ("triton", "float32"), ("auto", "bf16_autocast")]


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'backend':8} {'(resolved)':10} {'dtype':14} {'import torch':>12} {'import dres':>11} "
             f"{'first step':>10} {'second':>8}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['backend']:8} {'':10} {r['dtype']:14} error: {r['error']}")
            continue
        lines.append(f"{r['backend']:8} {r['resolved_backend']:10} {r['dtype']:14} {r['import_torch_s']:11.2f}s "
                     f"{r['import_dres_s']:10.3f}s {r['first_step_s']:9.2f}s {r['second_step_s']:7.3f}s")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cold_start", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per case (default 120)")
    parser.add_argument("--out", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    rows = []
    print(format_rows([]), flush=True)
    for backend, dtype_name in cases(args.device):
        rows.append(run_case(args.device, backend, dtype_name, args.timeout))
        # printed and written case by case: a run cut off by the GPU check's cap keeps what it measured
        print(format_rows(rows[-1:]).splitlines()[-1], flush=True)
        if args.out:
            with open(args.out, "w") as fh:
                json.dump({"rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
