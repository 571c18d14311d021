"""Triton ``banded_apply`` (kernels/banded.py): ``W x`` and ``W^T g`` from a :class:`BandedSpline`'s
coefficients against its float64 torch path (``forward64`` / ``transpose64``).

Contract: relative error against float64 math on the same (rounded) inputs below 1e-12 for float64 data, 2e-6
for fp32, 2e-3 for fp16 (bf16 on a GPU: the interpreter has no bf16). Configurations whose spline has
``refine`` set get the kernels' refinement step (``refinement=``), checked against the refined float64 path.
Triton runs on CPU through its interpreter here (tests/conftest.py), with 32 columns per program, so d = 131
spans five programs.
"""

import numpy as np
import pytest
import torch

import reference as ref
from dres_fast.banded import BandedSpline
from dres_fast.splines import lam_for_dof

pytestmark = pytest.mark.skipif(ref.backend_skip_reason("triton") is not None,
                                reason=str(ref.backend_skip_reason("triton")))

DEVICE = ref.backend_device("triton")
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def banded_apply(*args, **kwargs):
    return ref.backend_module("triton").banded_apply(*args, **kwargs)


def spline(n, p, knots, points, lam, shuffle=False):
    s = ref.points64(p, points)
    if shuffle:  # points out of order: the scatter's targets change at every row
        s = s[np.random.default_rng(0).permutation(p)]
    return BandedSpline(ref.points64(n, knots), s, lam, device=DEVICE)


def arrays(sp):
    return sp.factor, sp.stencil, sp.index, sp.chord, sp.curvature, sp.gather


def check(sp, x, transpose, tol):
    out = banded_apply(arrays(sp), x, transpose)
    rows = sp.shape[1] if transpose else sp.shape[0]
    assert out.shape == (rows, x.shape[1]) and out.dtype == x.dtype and out.device == x.device
    want = (sp.transpose64 if transpose else sp.forward64)(x.double())
    err = ref.rel_err(out.cpu(), want.cpu())
    assert err < tol, f"{'W^T' if transpose else 'W'}: rel err {err:.2e} >= {tol:.0e}"


# (n, p, knots, points, lam, d, shuffled points): n = p = 3; p > n (several points per interval, the scatter's
# register path); p < n; lam 0 (interpolation), moderate, 1e6; d = 131 over five programs; unsorted points
CASES = [
    (3, 3, "chebyshev", "lobatto", 1e-2, 1, False),
    (17, 64, "chebyshev", "lobatto", 1e-3, 7, False),
    (200, 17, "uniform", "chebyshev", 1e-4, 1, False),
    (17, 9, "lobatto", "uniform", 0.0, 131, False),
    (40, 60, "chebyshev", "lobatto", 1e6, 3, False),
    (30, 45, "chebyshev", "uniform", 1e-2, 2, True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"n{c[0]}-p{c[1]}-{c[2][:4]}-{c[3][:4]}-lam{c[4]:g}-d{c[5]}"
                         + ("-shuffled" if c[6] else ""))
def test_matches_float64(case, dtype):
    ref.skip_if_interpreter_lacks("triton", dtype)
    n, p, knots, points, lam, d, shuffle = case
    sp = spline(n, p, knots, points, lam, shuffle)
    assert not sp.refine  # the plain solve (refined splines: test_refined_solve)
    check(sp, ref.randn((n, d), dtype, DEVICE, seed=1), False, TOL[dtype])
    check(sp, ref.randn((p, d), dtype, DEVICE, seed=2), True, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=lambda t: str(t)[6:])
def test_refined_solve(dtype):
    """A spline whose probe asks for refinement (97 Chebyshev knots, 60 Lobatto points, lam = 1e6): the kernels'
    refinement step against the refined float64 path, both directions, d = 33 over two programs. Without the
    step float64 data is 6e-12 off here (2e-8 at 1024 knots), above the 1e-12 contract; the transposed step
    cancels to ~1e-11 of its terms, which a float32 lam (a Python float argument) breaks: 1.3e-7."""
    ref.skip_if_interpreter_lacks("triton", dtype)
    sp = spline(97, 60, "chebyshev", "lobatto", 1e6)
    assert sp.refine
    from dres_fast.ops import banded as banded_path
    assert banded_path._refines(ref.backend_module("triton").banded_apply)  # the op path passes refinement=
    for transpose, rows, seed in ((False, 97, 11), (True, 60, 12)):
        x = ref.randn((rows, 33), dtype, DEVICE, seed=seed)
        out = banded_apply(arrays(sp), x, transpose, sp.refinement)
        want = (sp.transpose64 if transpose else sp.forward64)(x.double())
        err = ref.rel_err(out.cpu(), want.cpu())
        assert err < TOL[dtype], f"{'W^T' if transpose else 'W'}: rel err {err:.2e} >= {TOL[dtype]:.0e}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_non_contiguous(dtype):
    sp = spline(20, 33, "chebyshev", "lobatto", 1e-3)
    x = ref.randn((20, 5), dtype, DEVICE, noncontiguous=True, seed=3)
    g = ref.randn((33, 5), dtype, DEVICE, noncontiguous=True, seed=4)
    assert not x.is_contiguous() and not g.is_contiguous()
    check(sp, x, False, TOL[dtype])
    check(sp, g, True, TOL[dtype])


def test_adjoint():
    """<W x, g> = <x, W^T g> in float64, with both sides from the kernels."""
    sp = spline(25, 40, "chebyshev", "uniform", 1e-2)
    x = ref.randn((25, 3), torch.float64, DEVICE, seed=5)
    g = ref.randn((40, 3), torch.float64, DEVICE, seed=6)
    wx, wtg = banded_apply(arrays(sp), x, False), banded_apply(arrays(sp), g, True)
    lhs, rhs = (wx * g).sum(dim=0), (x * wtg).sum(dim=0)
    scale = wx.norm(dim=0) * g.norm(dim=0)
    assert torch.all((lhs - rhs).abs() <= 1e-13 * scale), (lhs, rhs)


def test_empty_columns():
    sp = spline(5, 4, "chebyshev", "lobatto", 1e-2)
    assert banded_apply(arrays(sp), torch.empty(5, 0, device=DEVICE), False).shape == (4, 0)
    assert banded_apply(arrays(sp), torch.empty(4, 0, device=DEVICE), True).shape == (5, 0)


@pytest.mark.slow  # ~1-2 minutes in the interpreter
def test_fp32_at_8192_chebyshev_knots():
    """Where fp32 recurrences (or a float32 scratch: 1.4e-2 at 4096 knots) fail, the float64 sweeps keep the fp32
    contract. Against the float64 path without its refinement step (``refine`` is True at this lam), so this
    checks the sweeps' arithmetic at this size; the refinement step is test_refined_solve's."""
    n = 8192
    t = ref.points64(n, "chebyshev")
    sp = BandedSpline(t, ref.points64(1024, "lobatto"), lam_for_dof(t, 2.5), device=DEVICE)
    sp.refine = False
    check(sp, ref.randn((n, 1), torch.float32, DEVICE, seed=7), False, TOL[torch.float32])
    check(sp, ref.randn((1024, 1), torch.float32, DEVICE, seed=8), True, TOL[torch.float32])
