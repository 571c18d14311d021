r"""What every op test shares: the float64 references, the input generators, the error measures, and
the one place that names the backends (which ones run here, on which device, and their modules).

The two ops, for ``x`` viewed as ``(K, d)`` (trailing dimensions flattened):

* ``spline_mix``: :math:`\mathrm{out} = W x`, :math:`W \in \mathbb{R}^{M \times K}`.
* ``reconstruction_loss``: :math:`r = y - D y_c`, :math:`\ell_k = \sum_j r_{kj}^2`, loss
  :math:`\sum_k \ell_k / (K d)` ("mean"), :math:`\sum_k \ell_k` ("sum") or :math:`\ell` ("none").
  For a unit incoming gradient :math:`\nabla_y = c\, r` and :math:`\nabla_{y_c} = -D^\top \nabla_y`,
  with :math:`c = 2/(K d)` for "mean" and :math:`2` otherwise.

The references compute these in float64 from the same (already rounded) inputs the backend sees, so
the measured error is the backend's own. Accuracy rule (docs/ARCHITECTURE.md): an fp32 result may be
at most twice as far from float64 as the torch fp32 backend's result (IEEE fp32, no TF32).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pathlib

import pytest
import torch

import dres_fast  # a broken package must fail every test that imports this module, never skip it

BACKENDS = ("torch", "triton", "cuda")
HAS_GPU = torch.cuda.is_available()
REDUCTIONS = ("mean", "sum", "none")

# A few fp32 ulps: only matters for results made of a handful of numbers (a scalar loss from d = 1),
# where torch may land within a fraction of an ulp by luck; real errors are orders of magnitude larger.
FP32_FLOOR = 8 * 2.0 ** -24
FP16_SUBNORMAL = 2.0 ** -24  # fp16 spacing below 2^-14: an absolute error no fp16 output avoids
HALF_RTOL = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}  # one rounding to the output dtype
# relative error of the ops through dres_fast.ops against float64 on small real spline weights
OPS_TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}


# --------------------------------------------------------------------------------------------------
# Backends: the one place the tests name them (a backend moving inside the package changes only this)
# --------------------------------------------------------------------------------------------------


TORCH_MODULE = "dres_fast.backends.reference"
TRITON_MODULE = "dres_fast.kernels"  # kernels/, shipped under this name (setup.py package_dir)
CUDA_LOADER_MODULE = "dres_fast.backends.cuda"  # finds, builds (first use) and loads csrc/ as the C++ ops
BUILD_SUPPORT_FILE = pathlib.Path(__file__).resolve().parents[1] / "dres_fast" / "_build_support.py"  # setup.py's


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend_skip_reason(name: str):
    """``None`` when ``name`` must run here (and so must pass); else why it cannot run on this machine.

    Only a missing GPU, a missing optional package or an explicit opt-out skip: a backend that should
    run but is broken fails its tests instead."""
    if name == "torch":
        return None
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install -e '.[triton]')"
        if not HAS_GPU and not _interpreting():
            return "no CUDA GPU and TRITON_INTERPRET=0: the Triton kernels cannot run on CPU tensors"
        return None
    if name == "cuda":
        return None if HAS_GPU else "backend 'cuda' needs a CUDA GPU (its CPU checks are in test_cuda_backend.py)"
    raise ValueError(f"unknown backend {name!r}")


def backend_params(*names: str):
    """``names`` (default: every backend) as pytest parameters, each skipped with its reason here."""
    params = []
    for name in names or BACKENDS:
        reason = backend_skip_reason(name)
        marks = [pytest.mark.skipif(reason is not None, reason=reason or "")]
        if name == "cuda":
            marks.append(pytest.mark.gpu)
        params.append(pytest.param(name, marks=marks, id=name))
    return params


#: the op tests' parameter sets: every backend, and the fused ones (judged against the torch backend)
ALL = backend_params()
KERNELS = backend_params("triton", "cuda")


def backend_device(name: str) -> str:
    """Where a backend's tests put their tensors: Triton runs on CPU only through the interpreter."""
    if name == "cuda" or (name == "triton" and HAS_GPU and not _interpreting()):
        return "cuda"
    return "cpu"


def backend_module(name: str):
    """The backend's raw functions ``spline_mix(weights, x)`` and
    ``reconstruction_loss(y, y_coded, decoder, reduction, compute_grads) -> (loss, grad_y, grad_y_coded)``
    on 2-D inputs, below dispatch and autograd."""
    if name == "torch":
        return importlib.import_module(TORCH_MODULE)
    if name == "triton":
        return importlib.import_module(TRITON_MODULE)
    if name == "cuda":
        loader = cuda_loader()
        loader.load(verbose=True)  # a build failure on a GPU machine fails, not skips
        return loader  # its spline_mix / reconstruction_loss check the arguments, then call the C++ ops
    raise ValueError(f"unknown backend {name!r}")


def cuda_loader():
    """The module that builds and loads the CUDA backend (imports nothing heavy; builds only in ``load()``)."""
    return importlib.import_module(CUDA_LOADER_MODULE)


def registered_op(backend: str, op: str):
    """The ``torch.library`` op that ``dres_fast.ops`` dispatches ``op`` to on ``backend``."""
    from dres_fast.ops.dispatch import load_backend

    return getattr(load_backend(backend), op).default


def skip_if_interpreter_lacks(name: str, dtype: torch.dtype) -> None:
    """Triton's interpreter runs on numpy, which has no bfloat16."""
    if name == "triton" and backend_device(name) == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter (numpy) has no bfloat16")


def gpu_case(*values):
    """A parameter set too large for the Triton interpreter: it runs, for every backend, on a GPU."""
    marks = [pytest.mark.skipif(not HAS_GPU, reason="GPU-sized shape: too slow for the Triton interpreter"),
             pytest.mark.gpu]
    return pytest.param(*values, marks=marks)


def size_classes(sizes=(3, 17, 256, 1024), widths=(1, 7, 131, 65537)):
    """Every (rows, cols, d) of the size classes as GPU cases; d is cut to 65537 or 4099 where the
    float64 reference would cost more than 2^28 multiply-adds."""
    def affordable(rows, cols, d):
        return d if rows * cols * d <= 2 ** 28 else (65537 if rows * cols <= 2 ** 12 else 4099)

    shapes = dict.fromkeys((r, c, affordable(r, c, d)) for r in sizes for c in sizes for d in widths)
    return [gpu_case(*shape) for shape in shapes]


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


def spline_weights(rows: int, cols: int, dtype=torch.float64) -> torch.Tensor:
    """Real DReS weights, ``W(chebyshev(cols) -> lobatto(rows), 1e-4)``: shape ``(rows, cols)``."""
    return dres_fast.spline_weights(dres_fast.points(cols), dres_fast.points(rows, "lobatto"), 1e-4).to(dtype)


def randn(shape, dtype, device="cpu", noncontiguous=False, seed=0) -> torch.Tensor:
    """Standard normal values drawn in float64, then rounded to ``dtype``. ``noncontiguous`` (2-D only):
    a transposed view with a stride-2 slice, so neither dimension has unit stride."""
    g = torch.Generator().manual_seed(seed)
    if noncontiguous:
        rows, cols = shape
        t = torch.randn(2 * cols, rows, generator=g, dtype=torch.float64).t()[:, ::2]
        assert t.stride(0) == 1 and t.stride(1) == 2 * rows  # (a 1-column view still counts as contiguous)
    else:
        t = torch.randn(*shape, generator=g, dtype=torch.float64)
    return t.to(device=device, dtype=dtype)


def mixing_matrix(rows: int, cols: int, seed=1, dtype=torch.float64, device="cpu") -> torch.Tensor:
    """A dense ``(rows, cols)`` matrix with mixed signs whose rows sum to one, like spline weights."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64) / cols ** 0.5
    w = w - w.mean(dim=1, keepdim=True) + 1.0 / cols
    return w.to(device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------------


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def mix64(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``weights @ x`` in float64, ``x`` flattened to ``(K, d)``; returns ``(M, d)``."""
    return weights.double() @ _rows(x).double()


def reconstruction64(y, y_coded, decoder, reduction):
    """float64 ``(loss, grad_y, grad_y_coded)`` for a unit incoming gradient, inputs flattened to rows;
    ``grad_y_coded`` is ``None`` for "none" (the backends' fused pass does not form it)."""
    r = _rows(y).double() - decoder.double() @ _rows(y_coded).double()
    per_sample = (r * r).sum(dim=1)
    loss = {"mean": per_sample.sum() / r.numel(), "sum": per_sample.sum(), "none": per_sample}[reduction]
    c = 2.0 / r.numel() if reduction == "mean" else 2.0
    grad_y = c * r
    grad_y_coded = None if reduction == "none" else -decoder.double().t() @ grad_y
    return loss, grad_y, grad_y_coded


def _ieee_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return a @ b
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def torch_fp32_mix(weights, x):
    """What the torch fp32 backend computes for ``spline_mix`` (IEEE fp32), computed here."""
    return _ieee_matmul(weights.float(), _rows(x).float())


def torch_fp32_reconstruction(y, y_coded, decoder, reduction):
    """What the torch fp32 backend computes for ``reconstruction_loss`` (IEEE fp32), computed here."""
    r = _rows(y).float() - _ieee_matmul(decoder.float(), _rows(y_coded).float())
    per_sample = (r * r).sum(dim=1)
    loss = {"mean": per_sample.sum() / r.numel(), "sum": per_sample.sum(), "none": per_sample}[reduction]
    c = 2.0 / r.numel() if reduction == "mean" else 2.0
    return loss, c * r, -_ieee_matmul(decoder.float().t(), c * r)


# --------------------------------------------------------------------------------------------------
# Error measures
# --------------------------------------------------------------------------------------------------


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``||got - ref|| / ||ref||`` in float64."""
    ref = ref.double()
    return ((got.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def assert_fp32_accuracy(got, torch_fp32, ref, what, floor=FP32_FLOOR):
    """fp32 rule: error against float64 at most twice the torch fp32 backend's (plus ``floor``)."""
    ours, theirs = rel_err(got, ref), rel_err(torch_fp32, ref)
    assert ours <= 2 * theirs + floor, f"{what}: rel err {ours:.3e} > 2 x torch fp32 {theirs:.3e}"
