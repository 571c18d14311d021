"""The banded spline maps on CPU tensors, compiled: ``banded_cpu.c`` (plain C with OpenMP, loaded with
ctypes), built on first use with the system C compiler into the cache directory (about a second), for
this machine's CPU (``-march=native``: the kernel's vectors take the width of its registers, its
multiply-adds are fused where it has FMA, and AVX-512 or AVX turns on streaming stores; per fwd+bwd step at
K = N = 1024, d = 4096 and 4096, 1024 on the development VM, 2.4-3.8x faster than an x86-64 baseline build,
and an AVX2 build within 0.8-1.5x of it, in interleaved A/Bs on a noisy shared machine) with
``-ffp-contract=off``, which the kernel lifts only for its maps (the smoother trace rounds as its Python
twin does). A compiler that refuses a flag gets the build without it. The library's name carries the
source, the compiler and the CPU, so a cache directory shared by different machines never loads a build
for another CPU.

:func:`banded_apply` is ``W x`` (or ``W^T x``) for a :class:`dres_fast.banded.BandedSpline`'s arrays;
:func:`available` says whether the library could be built and loaded. Without a C compiler the callers
use the spline's own torch implementation (several times slower: it makes many passes over the data).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading

import torch

__all__ = ["available", "banded_apply", "library_path", "trace_sigma_r"]

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "banded_cpu.c")
_LOCK = threading.Lock()
_LIBRARY = None  # the loaded library, or the reason it is not there (a string)
_FUNCTIONS = {torch.float64: "dres_banded_apply_f64", torch.float32: "dres_banded_apply_f32"}


class _Extras(ctypes.Structure):
    """banded_cpu.c's ``extras_t``: what a call adds to ``base + scale W x`` (see :func:`banded_apply`)."""
    _fields_ = [("row_scale", ctypes.c_void_p), ("scaled_copy", ctypes.c_void_p), ("row_sumsq", ctypes.c_void_p)]


def _compiler():
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


#: Compiler flags, tried in order until one set builds: for this CPU, then generic, then without OpenMP
#: (e.g. Apple clang; the kernel then runs on one thread).
_FLAG_SETS = (["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"], ["-O3", "-ffp-contract=off", "-fopenmp"],
              ["-O3", "-march=native", "-ffp-contract=off"], ["-O3", "-ffp-contract=off"])


def _cpu_identity() -> str:
    """The CPU the build is for: its model and feature flags (Linux), else what ``platform`` says."""
    import platform

    try:
        with open("/proc/cpuinfo") as fh:
            lines = [line for line in fh if line.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def library_path() -> str:
    """Where the built library lives: one per source text, compiler, flags and CPU."""
    with open(_SOURCE, "rb") as fh:
        key = fh.read() + (_compiler() or "").encode() + repr(_FLAG_SETS).encode() + _cpu_identity().encode()
    digest = hashlib.sha256(key).hexdigest()[:16]
    root = os.environ.get("DRES_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dres_fast")
    return os.path.join(root, "banded_cpu", f"banded_cpu-{digest}.so")


def _build(path: str) -> None:
    compiler = _compiler()
    if compiler is None:
        raise OSError("no C compiler found (set CC)")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handle, partial = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
    os.close(handle)
    try:  # built beside its final name and renamed: concurrent builders never see half a file
        for flags in _FLAG_SETS:
            done = subprocess.run([compiler, *flags, "-fPIC", "-shared", _SOURCE, "-o", partial],
                                  capture_output=True, text=True)
            if done.returncode == 0:
                break
        else:
            raise OSError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _load():
    global _LIBRARY
    with _LOCK:
        if _LIBRARY is None:
            try:
                path = library_path()
                if not os.path.exists(path):
                    _build(path)
                library = ctypes.CDLL(path)
                pointer, i64 = ctypes.c_void_p, ctypes.c_int64
                for name in _FUNCTIONS.values():
                    fn = getattr(library, name)
                    fn.argtypes = ([pointer] * 8 + [ctypes.c_double, ctypes.c_int] + [i64] * 3
                                   + [pointer, i64, pointer, pointer, ctypes.c_double, ctypes.c_int,
                                      ctypes.POINTER(_Extras), ctypes.c_int])
                    fn.restype = ctypes.c_int
                library.dres_trace_sigma_r.argtypes = [pointer] * 5 + [i64]
                library.dres_trace_sigma_r.restype = ctypes.c_double
                _LIBRARY = library
            except OSError as err:
                _LIBRARY = f"the compiled CPU kernel is not available: {err}"
        return _LIBRARY


def available() -> bool:
    """Whether the compiled kernel loads (building it on first call)."""
    return not isinstance(_load(), str)


def banded_apply(arrays, x: torch.Tensor, transpose: bool, refinement=None, base=None, scale: float = 1.0,
                 row_scale=None, row_sumsq: bool = False):
    """``W x`` (``transpose``: ``W^T x``) for ``arrays = (factor, stencil, index, chord, curvature,
    gather)`` of a spline with ``p`` points and ``n`` knots, and ``x`` ``(n, d)`` (``(p, d)``), float32 or
    float64 on the CPU; returned contiguous in ``x.dtype``. ``refinement = (q_bands, r_bands, lam)``: one
    step of iterative refinement of the solve (``BandedSpline.refinement``). With ``base`` (the output's
    shape and dtype) and ``scale`` it returns ``base + scale W x``, rounded once: ``y - D y_coded`` in one pass.

    Two extras fuse the loss's other passes into these (the loss's forward and backward on one read each):

    * ``row_sumsq`` (forward map): also return each output row's sum of squares of its rounded values,
      float64 ``(p,)``: returns ``(out, sums)``;
    * ``row_scale`` (transposed map): a float64 ``(p,)`` tensor; the map is applied to ``x`` with row ``r``
      times ``row_scale[r]`` (rounded to ``x.dtype``), and those scaled rows are returned too:
      ``(out, scaled_x)``."""
    library = _load()
    if isinstance(library, str):
        raise RuntimeError(library)
    factor, stencil, index, chord, curvature, gather = arrays
    n, p = factor.shape[1] + 2, index.shape[0]
    rows, d = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty((n if transpose else p, d), dtype=x.dtype)
    if base is not None:
        base = base.to(x.dtype).contiguous()
        assert base.shape == out.shape
    extras, extra_out = None, None
    if row_scale is not None:
        assert transpose and row_scale.shape == (p,), "row_scale: the transposed map's, one per row of x"
        row_scale = row_scale.to(torch.float64).contiguous()
        extra_out = torch.empty((p, d), dtype=x.dtype)
        extras = _Extras(row_scale.data_ptr(), extra_out.data_ptr(), None)
    elif row_sumsq:
        assert not transpose, "row_sumsq: the forward map's"
        extra_out = torch.zeros(p, dtype=torch.float64)
        extras = _Extras(None, None, extra_out.data_ptr())
    q_bands, r_bands, lam = refinement if refinement is not None else (None, None, 0.0)
    failed = getattr(library, _FUNCTIONS[x.dtype])(
        factor.data_ptr(), stencil.data_ptr(), index.data_ptr(), chord.data_ptr(), curvature.data_ptr(),
        gather.data_ptr(), q_bands.data_ptr() if q_bands is not None else None,
        r_bands.data_ptr() if r_bands is not None else None, float(lam), int(refinement is not None),
        n, p, d, x.data_ptr(), x.stride(0), out.data_ptr(), base.data_ptr() if base is not None else None,
        float(scale), int(transpose), ctypes.byref(extras) if extras is not None else None, torch.get_num_threads())
    if failed:
        raise MemoryError("banded_apply: could not allocate the per-thread scratch")
    return out if extras is None else (out, extra_out)


def trace_sigma_r(diag, sup1, sup2, r_diag, r_off):
    """``tr(Sigma R)`` of :meth:`dres_fast._banded.PenalizedSystem.smoother_trace` (same recurrence, same
    order of operations) for float64 numpy arrays of equal length, or ``None`` without the library."""
    library = _load()
    if isinstance(library, str):
        return None
    import numpy as np

    arrays = [np.ascontiguousarray(a, dtype=np.float64) for a in (diag, sup1, sup2, r_diag, r_off)]
    return float(library.dres_trace_sigma_r(*(a.ctypes.data for a in arrays), arrays[0].shape[0]))
