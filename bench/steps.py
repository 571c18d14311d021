"""Training-step benchmark: one full step (forward, backward, optimizer step) per method and model.

Time: every (model, method) gets its own copy of the same initial model, its own SGD optimizer and
the same batch. After warm-up steps, each round times one step of every method, rotating the
starting method each round, so slow drifts of the machine (thermal, other processes) hit all
methods alike; a row's ``ms`` is the median over rounds. A method that regularizes only every
``interval`` steps (lazy_grad_penalty, and lazy DReS: dres(every=k)) times one regularized and one
plain step per round and reports their amortized average.

Peak memory, ``peak_mem_mb``: the memory a step needs beyond what is held between steps (model,
optimizer state, batch): activations kept for backward, gradients, temporaries. ``peak_total_mb``
is the absolute peak. How it is read (CUDA allocator statistics; on CPU the resident-set
high-water mark of a process forked per (model, method)) is in bench/memory.py.
"""
from __future__ import annotations

import copy
import gc
import statistics

import torch

from bench import baselines, memory
from bench.models import build_model, input_shape
from bench.timing import interleaved_rounds, synchronize, time_fn, timed_call

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


def time_model(model_name: str, methods, sizes: dict, device: str, progress=None) -> list[dict]:
    """Interleaved step timing of every method on one model; one row per method."""
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
            synchronize(device)
        except Exception as exc:  # e.g. no double backward through fused attention
            errors[method.key] = memory.error_text(exc)
            runners.pop(method.key, None)

    def measure(method, step):
        if method.interval > 1:
            return lambda r: baselines.amortized_ms(timed_call(lambda: step(0), device),
                                                    timed_call(lambda: step(1), device), method.interval)
        return lambda r: timed_call(lambda: step(r + 1), device)

    measures = {m.key: measure(m, runners[m.key]) for m in methods if m.key in runners}
    samples, round_errors = interleaved_rounds(measures, sizes["rounds"], progress, memory.error_text)
    errors.update(round_errors)

    rows = []
    for method in methods:
        row = {"method": method.name, "model": model_name, "batch": sizes["batch"], "ms": None,
               "peak_mem_mb": None, "key": method.key, **method.extra}
        if "num_coded_ratio" in method.extra:
            row["num_coded"] = baselines.num_coded_for(method.extra["num_coded_ratio"], sizes["batch"])
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


def measure_memory(task: dict) -> dict:
    """Peak memory of the training steps of ``task["key"]`` on ``task["model"]`` (bench/memory.py),
    after a warm-up step: optimizer state and lazy initialisation are not per-step costs."""
    device, sizes = task.get("device", "cpu"), task["sizes"]
    method = baselines.method_by_key(task["key"])
    torch.manual_seed(0)
    base = build_model(task["model"], sizes["models"][task["model"]]).to(device)
    x, target = make_batch(task["model"], sizes, sizes["batch"], device)
    step = make_runner(base, method, x, target)
    indices = [0, 1] if method.interval > 1 else [1]
    for i in indices:
        step(i)
    return memory.peak_memory(lambda: [step(i) for i in indices], device)


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

    tasks = [{"model": r["model"], "key": r["key"], "sizes": sizes, "device": device,
              "threads": torch.get_num_threads()} for r in rows if r.get("ms") is not None]
    bar = progress_factory(total=len(tasks), desc="memory") if progress_factory else None
    if device.startswith("cuda"):
        results = []
        for task in tasks:
            try:
                results.append(measure_memory(task))
            except Exception as exc:
                results.append({"error": memory.error_text(exc)})
            if bar is not None:
                bar.update(1)
    else:  # one forked process per task: the high-water mark belongs to the whole process
        results = memory.isolated("bench.steps:measure_memory", tasks, preload=["dres_fast"], progress=bar)
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

    from bench.kernels import default_weights

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
