"""The two ops on the torch backend against float64 math: values, gradients, gradcheck, opcheck."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dres_fast
from dres_fast import ops

TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def weights(m, k, dtype=torch.float64):
    return dres_fast.spline_weights(dres_fast.points(k), dres_fast.points(m, "lobatto"), 1e-4).to(dtype)


def reference_loss(y, y_coded, decoder, reduction):
    r = y.double().reshape(y.shape[0], -1) - decoder.double() @ y_coded.double().reshape(y_coded.shape[0], -1)
    per = (r * r).sum(1)
    return {"none": per, "sum": per.sum(), "mean": per.sum() / r.numel()}[reduction]


def rel(a, b):
    return (a.double() - b.double()).norm().item() / max(b.double().norm().item(), 1e-300)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7,), (7, 1), (7, 3, 5), (7, 131)])
def test_spline_mix_matches_float64(dtype, shape):
    x = torch.randn(shape, dtype=torch.float64)
    W = weights(11, 7)
    out = ops.spline_mix(W, x.to(dtype), backend="torch")
    assert out.shape == (11,) + shape[1:] and out.dtype == dtype
    ref = (W @ x.reshape(7, -1)).reshape(out.shape)
    assert rel(out, ref) < TOL[dtype]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_reconstruction_loss_forward_backward(reduction, dtype):
    K, N = 6, 9
    y = torch.randn(K, 4, 3, dtype=torch.float64)
    yc = torch.randn(N, 4, 3, dtype=torch.float64)
    D = weights(K, N)
    yl, ycl = y.to(dtype).requires_grad_(), yc.to(dtype).requires_grad_()
    loss = ops.reconstruction_loss(yl, ycl, D, reduction=reduction, backend="torch")
    assert loss.dtype == (dtype if dtype in (torch.float32, torch.float64) else torch.float32)
    yr, ycr = yl.detach().double().requires_grad_(), ycl.detach().double().requires_grad_()
    ref = reference_loss(yr, ycr, D, reduction)
    assert rel(loss, ref) < TOL[dtype]
    g = torch.rand_like(ref) + 0.5  # non-unit incoming gradient
    loss.backward(g.to(loss.dtype))
    ref.backward(g)
    assert rel(yl.grad, yr.grad) < 4 * TOL[dtype]
    assert rel(ycl.grad, ycr.grad) < 4 * TOL[dtype]


def test_non_contiguous_inputs():
    base = torch.randn(5, 8, 6, dtype=torch.float64)
    x = base.transpose(1, 2)  # (5, 6, 8) non-contiguous
    W = weights(4, 5)
    assert not x.is_contiguous()
    torch.testing.assert_close(ops.spline_mix(W, x, backend="torch"), (W @ x.reshape(5, -1)).reshape(4, 6, 8))
    y = torch.randn(8, 5, dtype=torch.float64)[:, ::2]
    yc = torch.randn(6, 5, dtype=torch.float64)[:, ::2]
    D = weights(8, 6).t().contiguous()[:, :].t()  # (8, 6) view of a transposed copy
    torch.testing.assert_close(ops.reconstruction_loss(y, yc, D, "sum", backend="torch"), reference_loss(y, yc, D, "sum"))


def test_inputs_not_modified_in_place():
    y = torch.randn(5, 3, requires_grad=True)
    yc = torch.randn(4, 3, requires_grad=True)
    versions = (y._version, yc._version)
    before = (y.detach().clone(), yc.detach().clone())
    ops.reconstruction_loss(y, yc, weights(5, 4), backend="torch").backward()
    assert (y._version, yc._version) == versions
    assert torch.equal(y.detach(), before[0]) and torch.equal(yc.detach(), before[1])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_reconstruction_loss(reduction):
    y = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    yc = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    D = weights(5, 4)
    assert torch.autograd.gradcheck(lambda a, b: ops.reconstruction_loss(a, b, D, reduction, backend="torch"), (y, yc))


def test_gradcheck_spline_mix():
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    W = weights(7, 5)
    assert torch.autograd.gradcheck(lambda a: ops.spline_mix(W, a, backend="torch"), (x,))


def test_opcheck_both_ops():
    ops.spline_mix(weights(3, 3), torch.randn(3, 2), backend="torch")  # registers the backend
    W = weights(6, 5, torch.float32)
    x = torch.randn(5, 4, requires_grad=True)
    torch.library.opcheck(torch.ops.dres_fast.spline_mix_torch.default, (W, x))
    D = weights(5, 6, torch.float32)
    yc = torch.randn(6, 4, requires_grad=True)
    y = torch.randn(5, 4, requires_grad=True)
    for reduction in ("mean", "sum", "none"):
        torch.library.opcheck(torch.ops.dres_fast.reconstruction_loss_torch.default, (y, yc, D, reduction, True))


@settings(max_examples=25, deadline=None)
@given(
    K=st.integers(3, 20),
    N=st.integers(3, 20),
    d=st.integers(1, 9),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
)
def test_property_reconstruction_loss(K, N, d, dtype, reduction):
    D = weights(K, N)
    y = torch.randn(K, d, dtype=dtype)
    yc = torch.randn(N, d, dtype=dtype)
    loss = ops.reconstruction_loss(y, yc, D, reduction, backend="torch")
    assert rel(loss, reference_loss(y, yc, D, reduction)) < TOL[dtype]


# -- bad input ------------------------------------------------------------------------------------
def test_bad_inputs_name_the_argument():
    W = weights(4, 5, torch.float32)
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match="weights has 5 columns but x has 6 samples"):
        ops.spline_mix(W, torch.randn(6, 3))
    with pytest.raises(ValueError, match="weights must be 2-D"):
        ops.spline_mix(W[0], x)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        ops.spline_mix(W, [1.0, 2.0])
    with pytest.raises(TypeError, match="x must be float64, float32"):
        ops.spline_mix(W, torch.ones(5, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="x must not be empty"):
        ops.spline_mix(W, torch.randn(5, 0))
    D = weights(5, 4, torch.float32)
    y, yc = torch.randn(5, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match="reduction must be one of"):
        ops.reconstruction_loss(y, yc, D, reduction="max")
    with pytest.raises(TypeError, match="y_coded has dtype torch.float64 but y has torch.float32"):
        ops.reconstruction_loss(y, yc.double(), D)
    with pytest.raises(ValueError, match="y_coded's sample shape"):
        ops.reconstruction_loss(y, torch.randn(4, 2), D)
    with pytest.raises(ValueError, match=r"decoder must have shape \(len\(y\), len\(y_coded\)\) = \(5, 4\)"):
        ops.reconstruction_loss(y, yc, D.t())
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.spline_mix(W, x, backend="jax")
    with pytest.raises(TypeError, match="backend must be a string"):
        ops.spline_mix(W, x, backend=None)


def test_unavailable_backends_explain_why(monkeypatch):
    x = torch.randn(5, 3)
    W = weights(4, 5, torch.float32)
    with pytest.raises(ops.BackendUnavailableError, match="needs CUDA tensors"):
        ops.spline_mix(W, x, backend="cuda")
    monkeypatch.setenv("DRES_BACKEND", "numpy")
    with pytest.raises(ValueError, match="DRES_BACKEND must be one of"):
        ops.spline_mix(W, x)
    monkeypatch.setenv("DRES_BACKEND", "torch")
    assert ops.resolve_backend("auto", torch.device("cpu")) == "torch"
    assert "torch" in ops.available_backends("cpu")
