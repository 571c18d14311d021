"""Training-step benchmark: one full step (forward, backward, optimizer step) per method and model.

Time: every (model, method) gets its own copy of the same initial model, its own SGD optimizer and
the same batch. After warm-up steps, each round times one step of every method, rotating the
starting method each round, so slow drifts of the machine (thermal, other processes) hit all
methods alike; a row's ``ms`` is the median over rounds. A method that regularizes only every
``interval`` steps (lazy_grad_penalty) times one regularized and one plain step per round and
reports their amortized average.

Peak memory, ``peak_mem_mb``: the memory a step needs beyond what is held between steps (model,
optimizer state, batch): activations kept for backward, gradients, temporaries. ``peak_total_mb``
is the absolute peak.
* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
  ``memory_allocated`` before the step.
* CPU: PyTorch has no CPU allocator statistics and tracemalloc does not see its allocations, so each
  (model, method) runs in its own process forked from a clean helper process, and we read the
  kernel's resident-set high-water mark (VmHWM in /proc/self/status). After a warm-up step the child
  returns freed heap to the OS (malloc_trim) and resets the high-water mark (writing 5 to
  /proc/self/clear_refs); the row is VmHWM after the measured steps minus VmRSS before them. Where
  resetting is not allowed, the child's VmHWM since fork is used (an upper bound; marked in the row).
"""
from __future__ import annotations

import copy
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from bench import baselines
from bench.models import build_model, input_shape

# Sizes per mode. CPU modes are small so `--quick` fits in minutes on 2 cores.
SIZES = {
    "smoke": {"batch": 8, "rounds": 2, "warmup": 1, "models": {
        "mlp": {"hidden": 16}, "cnn": {"width": 4}, "transformer": {"tokens": 4, "dim": 16, "heads": 2}}},
    "quick": {"batch": 64, "rounds": 21, "warmup": 3, "models": {
        "mlp": {"hidden": 256}, "cnn": {"width": 16}, "transformer": {"tokens": 16, "dim": 64, "heads": 4}}},
    "cpu_full": {"batch": 64, "rounds": 15, "warmup": 3, "models": {
        "mlp": {"hidden": 512}, "cnn": {"width": 32}, "transformer": {"tokens": 32, "dim": 128, "heads": 4}}},
    "gpu": {"batch": 256, "rounds": 20, "warmup": 3, "models": {
        "mlp": {"hidden": 1024}, "cnn": {"width": 64}, "transformer": {"tokens": 128, "dim": 256, "heads": 8},
        "resnet18": {"width": 64}}},
    "gpu_quick": {"batch": 128, "rounds": 7, "warmup": 2, "models": {
        "mlp": {"hidden": 1024}, "cnn": {"width": 64}, "transformer": {"tokens": 64, "dim": 256, "heads": 8},
        "resnet18": {"width": 64}}},
}


def sizes_for(device: str, mode: str) -> dict:
    if device.startswith("cuda"):
        return SIZES["gpu_quick" if mode in ("quick", "smoke") else "gpu"]
    return SIZES["cpu_full" if mode == "full" else mode]


def make_batch(model_name: str, sizes: dict, batch: int, device: str):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, *input_shape(model_name, sizes["models"][model_name]), generator=gen)
    target = torch.randint(0, 10, (batch,), generator=gen)
    return x.to(device), target.to(device)


def make_runner(base_model, method: baselines.Method, x, target):
    """A closure running one training step of ``method`` on its own copy of ``base_model``."""
    model = method.prepare(copy.deepcopy(base_model))
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(step_index: int):
        optimizer.zero_grad(set_to_none=True)
        loss = method.loss(model, x, target, step_index)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".split("\n")[0][:300]


def time_model(model_name: str, methods, sizes: dict, device: str, progress=None) -> list[dict]:
    """Interleaved step timing of every method on one model; one row per method."""
    sync = (lambda: torch.cuda.synchronize()) if device.startswith("cuda") else (lambda: None)
    torch.manual_seed(0)
    base = build_model(model_name, sizes["models"][model_name]).to(device)
    x, target = make_batch(model_name, sizes, sizes["batch"], device)
    runners, errors = {}, {}
    for method in methods:
        try:
            runners[method.key] = make_runner(base, method, x, target)
            for i in range(sizes["warmup"]):
                # Lazy methods: warm up both the regularized (index 0) and the plain step.
                runners[method.key](0 if method.interval > 1 and i == 0 else i + 1)
            sync()
        except Exception as exc:  # e.g. no double backward through fused attention
            errors[method.key] = _error(exc)
            runners.pop(method.key, None)

    def timed(step, index) -> float:
        sync()
        start = time.perf_counter()
        step(index)
        sync()
        return (time.perf_counter() - start) * 1e3

    samples = {key: [] for key in runners}
    active = [m for m in methods if m.key in runners]
    for r in range(sizes["rounds"]):
        shift = r % max(1, len(active))
        for method in active[shift:] + active[:shift]:
            if method.key in errors:
                continue
            try:
                step = runners[method.key]
                if method.interval > 1:
                    ms = baselines.amortized_ms(timed(step, 0), timed(step, 1), method.interval)
                else:
                    ms = timed(step, r + 1)
                samples[method.key].append(ms)
            except Exception as exc:
                errors[method.key] = _error(exc)
        if progress is not None:
            progress.update(1)

    rows = []
    for method in methods:
        row = {"method": method.name, "model": model_name, "batch": sizes["batch"], "ms": None,
               "peak_mem_mb": None, "key": method.key, **method.extra}
        if "num_coded_ratio" in method.extra:
            row["num_coded"] = max(3, int(round(method.extra["num_coded_ratio"] * sizes["batch"])))
        if method.interval > 1:
            row["interval"] = method.interval
            row["timing"] = "amortized over the interval"
        if method.key in errors:
            row["error"] = errors[method.key]
        elif samples.get(method.key):
            s = sorted(samples[method.key])
            row.update(ms=statistics.median(s), min_ms=s[0], max_ms=s[-1], rounds=len(s))
        rows.append(row)
    del runners
    gc.collect()
    return rows


# ----------------------------------------------------------------------------------------------
# Peak memory
# ----------------------------------------------------------------------------------------------

def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_cpu_peak() -> bool:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def measure_memory(model_name: str, method_key: str, sizes: dict, device: str) -> dict:
    """Peak memory of training steps of one method on one model (see the module docstring)."""
    method = baselines.method_by_key(method_key)
    torch.manual_seed(0)
    base = build_model(model_name, sizes["models"][model_name]).to(device)
    x, target = make_batch(model_name, sizes, sizes["batch"], device)
    step = make_runner(base, method, x, target)
    indices = [0, 1] if method.interval > 1 else [1]
    for i in indices:  # warm-up: optimizer state and lazy initialisation are not per-step costs
        step(i)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
        for i in indices:
            step(i)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"peak_mem_mb": (peak - held) / 2**20, "peak_total_mb": peak / 2**20,
                "mem_method": "torch.cuda.max_memory_allocated"}
    was_reset = _reset_cpu_peak()
    held_kb = _proc_status_kb("VmRSS")
    for i in indices:
        step(i)
    peak_kb = _proc_status_kb("VmHWM")
    return {"peak_mem_mb": (peak_kb - held_kb) / 1024, "peak_total_mb": peak_kb / 1024,
            "mem_method": "VmHWM-VmRSS (forked process)" + ("" if was_reset else ", HWM since fork")}


def _forked(task: dict) -> dict:
    """Run ``measure_memory`` in a forked child; the child's result comes back through a pipe."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        try:
            torch.set_num_threads(task["threads"])
            result = measure_memory(task["model"], task["key"], task["sizes"], "cpu")
        except BaseException as exc:
            result = {"error": _error(exc)}
        os.write(write_fd, json.dumps(result).encode())
        os._exit(0)
    os.close(write_fd)
    chunks = []
    while chunk := os.read(read_fd, 65536):
        chunks.append(chunk)
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    if not chunks:
        return {"error": f"memory child exited with status {status} and no result"}
    return json.loads(b"".join(chunks))


def cpu_memory(tasks: list[dict], progress=None) -> list[dict]:
    """Peak memory for every task, each in its own process forked from one clean helper process.

    The helper (``python -m bench.steps --memory-helper``) has imported torch but run nothing, so
    forking it is safe (no OpenMP pool yet) and every child starts from the same state."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen([sys.executable, "-m", "bench.steps", "--memory-helper"], cwd=root, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    proc.stdin.write(json.dumps(tasks) + "\n")
    proc.stdin.close()
    results = []
    for line in proc.stdout:
        if line.startswith("RESULT "):
            results.append(json.loads(line[len("RESULT "):]))
            if progress is not None:
                progress.update(1)
    proc.wait()
    while len(results) < len(tasks):
        results.append({"error": f"memory helper exited with status {proc.returncode}"})
    return results


def _memory_helper() -> None:
    import dres_fast  # noqa: F401  (imported before forking so children do not pay for it)

    tasks = json.loads(sys.stdin.readline())
    gc.collect()
    gc.freeze()  # the children's gc.collect() then skips the objects torch created at import
    for task in tasks:
        print("RESULT " + json.dumps(_forked(task)), flush=True)


def run_steps(device: str, mode: str, models=None, progress_factory=None) -> dict:
    """Time and measure every method on every model. Returns {"steps": rows, "sizes": sizes}."""
    sizes = sizes_for(device, mode)
    model_names = models or [m for m in sizes["models"] if device.startswith("cuda") or m != "resnet18"]
    methods = baselines.all_methods()
    rows = []
    bar = progress_factory(total=len(model_names) * sizes["rounds"], desc="steps") if progress_factory else None
    for model_name in model_names:
        rows += time_model(model_name, methods, sizes, device, progress=bar)
    if bar is not None:
        bar.close()

    tasks = [{"model": r["model"], "key": r["key"], "sizes": sizes, "threads": torch.get_num_threads()}
             for r in rows if r.get("ms") is not None]
    bar = progress_factory(total=len(tasks), desc="memory") if progress_factory else None
    if device.startswith("cuda"):
        results = []
        for task in tasks:
            try:
                results.append(measure_memory(task["model"], task["key"], sizes, device))
            except Exception as exc:
                results.append({"error": _error(exc)})
            if bar is not None:
                bar.update(1)
    else:
        results = cpu_memory(tasks, progress=bar)
    if bar is not None:
        bar.close()
    by_key = {(t["model"], t["key"]): res for t, res in zip(tasks, results)}
    for row in rows:
        res = by_key.get((row["model"], row["key"]))
        if res is None:
            continue
        if "error" in res:
            row["mem_error"] = res["error"]
        else:
            row.update(res)

    _relative_times(rows)
    spline = _spline_share(rows, sizes, device)
    return {"steps": rows, "sizes": sizes, "spline_share": spline}


def _relative_times(rows: list[dict]) -> None:
    erm_ms = {r["model"]: r["ms"] for r in rows if r["key"] == "erm" and r.get("ms")}
    for row in rows:
        if row.get("ms") is not None and row["model"] in erm_ms:
            row["x_erm"] = row["ms"] / erm_ms[row["model"]]


def _spline_share(rows: list[dict], sizes: dict, device: str) -> list[dict]:
    """Share of a DReS (N = K) step spent in the library's spline ops, timed in isolation at the
    step's shapes: spline_mix(E, x) forward (the data needs no gradient) and reconstruction_loss on
    the logits, forward + backward, with the backend "auto" picks."""
    from dres_fast import ops

    from bench.kernels import default_weights, time_fn

    out = []
    for row in rows:
        if row["key"] != "dres" or row.get("ms") is None:
            continue
        K = N = row["batch"]
        x, _ = make_batch(row["model"], sizes, K, device)
        encoder, decoder = default_weights(K, N, device, torch.float32)
        y = torch.randn(K, 10, device=device, requires_grad=True)
        y_coded = torch.randn(N, 10, device=device, requires_grad=True)
        mix = time_fn(lambda: ops.spline_mix(encoder, x), device, budget_s=0.1)
        recon = time_fn(lambda: ops.reconstruction_loss(y, y_coded, decoder).backward(), device,
                        budget_s=0.1, grad_to_none=[y, y_coded])
        spline_ms = mix["ms"] + recon["ms"]
        row["spline_ms"] = spline_ms
        row["spline_share"] = spline_ms / row["ms"]
        out.append({"model": row["model"], "spline_ms": spline_ms, "dres_step_ms": row["ms"],
                    "share": spline_ms / row["ms"]})
    return out


if __name__ == "__main__":
    if sys.argv[1:] == ["--memory-helper"]:
        _memory_helper()
    else:
        raise SystemExit("bench.steps is run through `python -m bench`")
