"""Kernel benchmark: ``spline_mix`` and ``reconstruction_loss`` (forward + backward) on every available
backend, each time set against its floor measured on the same machine in the same run.

Run alone: ``python -m bench.kernels [--device cpu|cuda] [--full|--quick|--sweep] [--out FILE.json]``
(``--sweep``: d = 10 .. 2^20 at K = N = 256, then a batch of 4096 at d = 10 and 1000, every backend,
fp32 and bf16: the small-d cliffs; ``--compile skip|only``: leave out, or time only, the ``torch_compile`` rows).
``bench/gpu_check.sh`` runs ``--sweep`` early and ``--full --compile only`` last.

Row order (what a run cut off by a time cap has measured): every ``reconstruction_loss`` row, then every
``spline_mix`` row, each op shape by shape and dtype by dtype with all its backends side by side, and the
``torch_compile`` rows (one cold compile each) after all of them, in the same order. The JSON of ``--out``
is rewritten after every row (to a temporary file, then renamed, so a kill never leaves half a file).

Floor of one call (both ops, forward + backward; x viewed as (K, d), N coded rows, element size s):

* bytes moved, each input read once and each output written once:
  - spline_mix: forward reads x (K d) and writes out (N d); backward reads grad_out (N d) and writes
    grad_x (K d); the weights (N K float32) are read once per pass:
    ``bytes = 2 (K + N) d s + 2 * 4 N K``
  - reconstruction_loss: reads y (K d) and y_coded (N d), writes grad_y (K d) and grad_y_coded (N d)
    (the fused kernel produces both gradients in its one pass; backward only scales them), reads the
    decoder (K N float32) once: ``bytes = 2 (K + N) d s + 4 K N``
* flops: ``4 N K d`` for both (two products with the N x K weights per column: W x and W^T grad for
  spline_mix; D y_coded and D^T r for reconstruction_loss); elementwise work is not counted.
* ``floor_ms = max(bytes / copy_bandwidth, flops / matmul_rate[dtype])`` where the copy bandwidth is
  measured with ``dst.copy_(src)`` on a buffer far larger than the caches (2 x bytes per copy), and the
  matmul rate with a large square ``torch.mm`` in that dtype (float32 with TF32 disabled: the kernels
  must use IEEE float32 products). The floor is a lower bound: a result under 1.0x means the
  measured rates are not the machine's peak.

Timing: on CUDA ``triton.testing.do_bench`` (median and 20/80% quantiles, L2 flushed between calls);
on CPU a median of ``time.perf_counter`` loops after a warm-up call.

Backends: every name in ``dres_fast.ops.available_backends()`` for the device, plus ``torch_compile``:
``torch.compile`` of the torch backend's math written as plain differentiable PyTorch (the registered
custom op is opaque to the compiler, so compiling the op call itself would time eager torch again).
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from bench import report
from bench.timing import choose_threads, time_fn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}

# (K, N, d) shape sets.
SHAPES = {
    "smoke": [(8, 8, 256)],
    "quick": [(64, 64, 2**14), (256, 256, 2**11), (128, 64, 2**13)],
    "cpu_full": [(64, 64, 2**16), (256, 256, 2**14), (256, 128, 2**16), (512, 512, 2**12)],
    # GPU: the shapes the GPU check asks for; kept to two so the check fits a short device lease.
    "gpu": [(256, 256, 2**16), (256, 256, 2**20)],
    # --sweep: feature widths from logits to wide activations at K = N = 256, where the kernels change
    # path (small-d row split, fused reconstruction) and where a cliff would show as a jump in x floor.
    # Then batches of thousands with logits-sized d: few column tiles, many rows (the row split).
    "sweep": [(256, 256, d) for d in (10, 100, 1000, 2**12, 2**14, 2**16, 2**18, 2**20)]
    + [(4096, 4096, 10), (4096, 4096, 1000)],
}
# On CPU the sweep keeps shapes with K N d <= 2^30 (K = N = 256 up to d = 2^14; a 2^20-wide fp32 batch
# of 256 is 1 GiB, and K = N = 4096 at d = 1000 is 67 GFLOP per call).
SWEEP_CPU_MAX_WORK = 2**30
# Row order: the fused reconstruction first (the figures the GPU check is for), then spline_mix.
OPS = ("reconstruction_loss", "spline_mix")
COMPILE_CHOICES = ("include", "skip", "only")
DTYPE_SETS = {"smoke": ["float32"], "quick": ["float32", "bfloat16"], "full": ["float32", "bfloat16"],
              "sweep": ["float32", "bfloat16"]}


def measure_copy_bandwidth(device: str, quick: bool) -> float:
    """Bytes per second of ``dst.copy_(src)`` (read + write counted) on a buffer beyond the caches."""
    numel = 2**27 if device.startswith("cuda") else (2**23 if quick else 2**25)
    src = torch.ones(numel, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    timing = time_fn(lambda: dst.copy_(src), device, budget_s=0.2 if quick else 1.0)
    return 2 * numel * 4 / (timing["ms"] * 1e-3)


def measure_matmul_rate(device: str, dtype: torch.dtype, quick: bool) -> float:
    """Flops per second of a large square ``torch.mm`` in ``dtype`` (float32: IEEE, TF32 off)."""
    n = 8192 if device.startswith("cuda") else (512 if quick else 1024)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    timing = time_fn(lambda: torch.mm(a, b), device, budget_s=0.2 if quick else 1.0)
    return 2 * n**3 / (timing["ms"] * 1e-3)


def op_cost(op: str, K: int, N: int, d: int, dtype: torch.dtype) -> tuple[int, int]:
    """(bytes moved, flops) of one forward + backward call; formula in the module docstring."""
    size = torch.tensor([], dtype=dtype).element_size()
    if op == "spline_mix":
        return 2 * (K + N) * d * size + 2 * 4 * N * K, 4 * N * K * d
    if op == "reconstruction_loss":
        return 2 * (K + N) * d * size + 4 * K * N, 4 * N * K * d
    raise ValueError(op)


def _plain_spline_mix(weights, x):
    """The torch backend's spline_mix math as plain differentiable PyTorch (fp32 accumulation)."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (weights @ x.to(compute)).to(x.dtype)


def _plain_reconstruction_loss(y, y_coded, decoder):
    compute = torch.float64 if y.dtype == torch.float64 else torch.float32
    residual = y.to(compute) - decoder @ y_coded.to(compute)
    return residual.square().mean()


def default_weights(K: int, N: int, device: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The (encoder (N, K), decoder (K, N)) that ``dres_loss`` uses by default, in the compute dtype.

    The values matter on CPU: interpolating-spline weights decay to subnormal floats far from the
    diagonal, and subnormal operands slow CPU matmuls many times over, so the benchmark times the
    weights users actually get rather than random ones."""
    import dres_fast

    weight_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    try:
        from dres_fast import SmoothingSpec
        from dres_fast.cache import default_cache

        # the shared, marked pair a DReS step uses (get() would copy it: fp16/bf16 Triton would then split per call)
        return default_cache.weights(SmoothingSpec(num_coded=N), K, device, dtype)
    except (ImportError, AttributeError, TypeError):  # internal API moved: same shapes, lam = 0
        alpha, beta = dres_fast.points(K, "chebyshev"), dres_fast.points(N, "lobatto")
        return tuple(dres_fast.spline_weights(src, dst, 0.0).to(device=device, dtype=weight_dtype).contiguous()
                     for src, dst in ((alpha, beta), (beta, alpha)))


def _make_case(op: str, backend: str, K: int, N: int, d: int, dtype: torch.dtype, device: str):
    """Inputs and a closure running one forward + backward of ``op`` on ``backend``."""
    from dres_fast import ops

    gen = torch.Generator(device=device).manual_seed(0)
    randn = lambda rows: torch.randn(rows, d, generator=gen, device=device)  # on the device: d is up to 2^20
    weight_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    encoder, decoder = default_weights(K, N, device, dtype)
    if op == "spline_mix":
        weights = encoder
        x = randn(K).to(dtype).requires_grad_(True)
        grad_out = randn(N).to(dtype)
        if backend == "torch_compile":
            compiled = torch.compile(_plain_spline_mix, dynamic=False)
            call = lambda: compiled(weights, x)
        else:
            call = lambda: ops.spline_mix(weights, x, backend=backend)
        return (lambda: call().backward(grad_out)), [x]
    y_coded = randn(N).to(dtype)
    # y close to D y_coded, as in training: the residual is much smaller than y.
    y = ((decoder @ y_coded.to(weight_dtype)) + 1e-2 * randn(K)).to(dtype)
    y.requires_grad_(True)
    y_coded.requires_grad_(True)
    if backend == "torch_compile":
        compiled = torch.compile(_plain_reconstruction_loss, dynamic=False)
        call = lambda: compiled(y, y_coded, decoder)
    else:
        call = lambda: ops.reconstruction_loss(y, y_coded, decoder, backend=backend)
    return (lambda: call().backward()), [y, y_coded]


def kernel_cases(device: str, mode: str, compile_rows: str = "include") -> tuple[list[tuple], dict[str, str]]:
    """(op, backend, (K, N, d), dtype name) to time on ``device`` in ``mode``, and notes on what is
    left out and why. Order: the ops in ``OPS`` order, each shape by shape, dtype by dtype, every backend;
    then the ``torch_compile`` rows in the same order. ``compile_rows``: "include" (the mode's compile
    rows), "skip" (none) or "only" (nothing but them)."""
    from dres_fast import ops

    if compile_rows not in COMPILE_CHOICES:
        raise ValueError(f"compile_rows must be one of {COMPILE_CHOICES}, not {compile_rows!r}")
    cuda = device.startswith("cuda")
    if mode == "sweep":
        shapes = [s for s in SHAPES["sweep"] if cuda or s[0] * s[1] * s[2] <= SWEEP_CPU_MAX_WORK]
    elif cuda:
        shapes = SHAPES["gpu"] if mode == "full" else SHAPES["gpu"][:1]
    else:
        shapes = SHAPES["cpu_full"] if mode == "full" else SHAPES[mode]
    dtype_names = DTYPE_SETS[mode]
    notes: dict[str, str] = {}
    names = list(ops.available_backends())
    if not cuda:
        if "triton" in names:  # listed on CPU only under TRITON_INTERPRET=1: a correctness tool
            notes["triton"] = "Triton on CPU runs only in the interpreter (TRITON_INTERPRET=1); not timed"
        names = [n for n in names if n not in ("triton", "cuda")]
    cases = [(op, b, shape, dt) for op in OPS for shape in shapes for dt in dtype_names for b in names]
    compiled = []
    if mode == "sweep":
        notes["torch_compile"] = "not timed in --sweep (one compile per shape); --full times it at 2^16 and 2^20"
    elif cuda or mode == "full":
        compiled = [(op, "torch_compile", shape, dt) for op in OPS for shape in shapes for dt in dtype_names]
    elif mode == "quick":
        # Inductor compiles C++ per shape and dtype (~10 s each on 2 cores): one case per op.
        compiled = [(op, "torch_compile", shapes[0], "float32") for op in OPS]
        notes["torch_compile"] = ("timed at one shape (float32) per op under --quick on CPU: Inductor's C++ "
                                  "compile takes ~10 s per shape; run without --quick for all shapes")
    else:
        notes["torch_compile"] = "not timed in --smoke (compile time)"
    if compile_rows == "skip":
        if compiled:
            notes["torch_compile"] = "not timed (--compile skip)"
        compiled = []
    elif compile_rows == "only":
        cases = []
        notes = {k: v for k, v in notes.items() if k == "torch_compile"}
    # The compile rows last: each is a cold compile (seconds to tens of seconds) that a capped run may not reach.
    return cases + compiled, notes


def run_kernels(device: str = "cpu", mode: str = "quick", progress=None, on_row=None,
                compile_rows: str = "include") -> dict:
    """Measure rates and time every (op, backend, shape, dtype). Returns {"rates", "kernels", "skipped"}.
    ``on_row(partial_result)``, if given, is called after every row with what has been measured so far.
    ``compile_rows``: see :func:`kernel_cases`."""
    previous_tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # IEEE fp32, as the kernels must use
    torch.backends.cudnn.allow_tf32 = False
    try:
        return _run_kernels(device, mode, progress, on_row, compile_rows)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous_tf32


def _run_kernels(device: str, mode: str, progress, on_row=None, compile_rows: str = "include") -> dict:
    quick = mode in ("quick", "smoke")
    # Seconds of timing per row on the CPU (on CUDA, do_bench's own 25 ms warm-up and 100 ms of repetitions).
    budget_s = 0.4 if quick else 0.5 if mode == "sweep" else 1.0
    cases, notes = kernel_cases(device, mode, compile_rows)
    bandwidth = measure_copy_bandwidth(device, quick)
    rates = {name: measure_matmul_rate(device, DTYPES[name], quick) for name in DTYPE_SETS[mode]}
    if on_row is not None:  # the measured ceilings reach --out before the first row
        on_row(_result(bandwidth, rates, [], notes))
    rows = []
    for op, backend, (K, N, d), dtype_name in cases:
        dtype = DTYPES[dtype_name]
        bytes_moved, flops = op_cost(op, K, N, d, dtype)
        floor_ms = max(bytes_moved / bandwidth, flops / rates[dtype_name]) * 1e3
        row = {"op": op, "backend": backend, "K": K, "N": N, "d": d, "dtype": dtype_name, "ms": None,
               "floor_ms": floor_ms, "pass": "fwd+bwd", "bytes": bytes_moved, "flops": flops}
        try:
            weights = default_weights(K, N, device, dtype)[0 if op == "spline_mix" else 1]
            tiny = torch.finfo(weights.dtype).tiny
            # Subnormal weights slow CPU matmuls many times over; recorded so the effect is visible.
            row["subnormal_weights"] = int(((weights.abs() < tiny) & (weights != 0)).sum())
            if backend == "torch_compile":
                torch._dynamo.reset()  # one compiled graph per row; no recompile limits
            fn, leaves = _make_case(op, backend, K, N, d, dtype, device)
            row.update(time_fn(fn, device, budget_s=budget_s, min_reps=5, grad_to_none=leaves))
            row["x_floor"] = row["ms"] / floor_ms
        except Exception as exc:  # a backend failing on one shape is a result, not a crash
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
        rows.append(row)
        if progress is not None:
            progress.update(1)
        if on_row is not None:
            on_row(_result(bandwidth, rates, rows, notes))
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return _result(bandwidth, rates, rows, notes)


def _result(bandwidth, rates, rows, notes) -> dict:
    return {"rates": {"copy_GBps": bandwidth / 1e9, **{f"mm_{k}_TFLOPs": v / 1e12 for k, v in rates.items()}},
            "kernels": rows, "skipped": notes}


def count_cases(device: str, mode: str, compile_rows: str = "include") -> int:
    return len(kernel_cases(device, mode, compile_rows)[0])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="all shapes (the GPU check uses this)")
    size.add_argument("--quick", action="store_true", help="few small shapes (default)")
    size.add_argument("--sweep", action="store_true",
                      help="d = 10 .. 2^20 at K = N = 256, and K = N = 4096 at d = 10 and 1000; fp32 and bf16 "
                           "(the small-d and wide-d paths)")
    parser.add_argument("--compile", dest="compile_rows", choices=COMPILE_CHOICES, default="include",
                        help="the torch_compile rows (one cold compile each, timed after every other row): "
                             "include (default), skip, or only them")
    parser.add_argument("--out", default=None, help="also write the rows to this JSON file (after every row)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice, or 1 when the load average shows other work)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench.kernels: --device cuda asked for but torch.cuda.is_available() is False")
    mode = "full" if args.full else "sweep" if args.sweep else "quick"
    threads_note = choose_threads(args.device, args.threads)
    from tqdm import tqdm

    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    latest = {}

    def save(result):  # after every row: a run cut off by the GPU check's cap keeps its rows
        latest["result"] = result
        if args.out:  # a temporary file renamed over the last one: a kill mid-write leaves the previous rows
            tmp = args.out + ".tmp"
            with open(tmp, "w") as fh:
                json.dump({"device": name, "torch": torch.__version__, "threads_note": threads_note, "mode": mode,
                           "compile_rows": args.compile_rows, **result}, fh, indent=1)
            os.replace(tmp, args.out)

    try:
        with tqdm(total=count_cases(args.device, mode, args.compile_rows), desc="kernels", leave=False) as bar:
            save(run_kernels(args.device, mode, progress=bar, on_row=save, compile_rows=args.compile_rows))
    except KeyboardInterrupt:  # the GPU check's timeout sends SIGINT: print the rows measured so far
        if "result" not in latest:
            raise
        print("interrupted: the table below has the rows measured so far")
    result = latest["result"]
    print(f"device: {name}   torch {torch.__version__}   threads: {threads_note}")
    print("measured rates: " +
          "   ".join(f"{k} {v:.3g}" for k, v in result["rates"].items()))
    print(report.kernel_table(result["kernels"]))
    for backend, why in result["skipped"].items():
        print(f"not timed: {backend}: {why}")


if __name__ == "__main__":
    main()
