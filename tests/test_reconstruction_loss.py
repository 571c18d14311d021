"""``dres_fast.ops.reconstruction_loss`` (``reduce(||y - D y_coded||^2)`` and both gradients, fused) on
every backend available here.

The torch backend is judged against float64 math; every other backend against float64 and the torch
backend (tests/reference.py). Triton runs on CPU through its interpreter (32-wide tiles: d = 131 spans
several; N = 200 keeps y_coded resident, N = 300 takes the chunked path). CUDA runs on a GPU only;
shapes marked ``gpu`` are too large for the interpreter and run for every backend on a GPU machine.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import reference as ref

from dres_fast import ops



def loss_dtype(dtype):
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


# -- through dres_fast.ops: every backend ---------------------------------------------------------


@pytest.mark.parametrize("reduction", ref.REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ref.ALL)
def test_forward_backward_against_float64(backend, reduction, dtype):
    ref.skip_if_interpreter_lacks(backend, dtype)
    device = ref.backend_device(backend)
    K, N = 6, 9
    y = torch.randn(K, 4, 3, dtype=torch.float64)
    yc = torch.randn(N, 4, 3, dtype=torch.float64)
    D = ref.spline_weights(K, N)
    yl = y.to(device, dtype).requires_grad_()
    ycl = yc.to(device, dtype).requires_grad_()
    loss = ops.reconstruction_loss(yl, ycl, D.to(device), reduction=reduction, backend=backend)
    assert loss.dtype == loss_dtype(dtype)
    yr, ycr = yl.detach().cpu().double().requires_grad_(), ycl.detach().cpu().double().requires_grad_()
    r = yr.reshape(K, -1) - D @ ycr.reshape(N, -1)
    per_sample = (r * r).sum(1)
    expected = {"none": per_sample, "sum": per_sample.sum(), "mean": per_sample.sum() / r.numel()}[reduction]
    assert ref.rel_err(loss.cpu(), expected) < ref.OPS_TOL[dtype]
    g = torch.rand_like(expected) + 0.5  # non-unit incoming gradient
    loss.backward(g.to(device, loss.dtype))
    expected.backward(g)
    assert ref.rel_err(yl.grad.cpu(), yr.grad) < 4 * ref.OPS_TOL[dtype]
    assert ref.rel_err(ycl.grad.cpu(), ycr.grad) < 4 * ref.OPS_TOL[dtype]


@pytest.mark.parametrize("backend", ref.ALL)
def test_non_contiguous_inputs(backend):
    device = ref.backend_device(backend)
    y = torch.randn(8, 5, dtype=torch.float64, device=device)[:, ::2]
    yc = torch.randn(6, 5, dtype=torch.float64, device=device)[:, ::2]
    D = ref.spline_weights(8, 6).t().contiguous()[:, :].t().to(device)  # (8, 6) view of a transposed copy
    loss = ops.reconstruction_loss(y, yc, D, "sum", backend=backend)
    torch.testing.assert_close(loss, ref.reconstruction64(y, yc, D, "sum")[0])


@pytest.mark.parametrize("backend", ref.ALL)
def test_inputs_not_modified_in_place(backend):
    device = ref.backend_device(backend)
    y = torch.randn(5, 3, device=device, requires_grad=True)
    yc = torch.randn(4, 3, device=device, requires_grad=True)
    versions = (y._version, yc._version)
    before = (y.detach().clone(), yc.detach().clone())
    ops.reconstruction_loss(y, yc, ref.spline_weights(5, 4).to(device), backend=backend).backward()
    assert (y._version, yc._version) == versions
    assert torch.equal(y.detach(), before[0]) and torch.equal(yc.detach(), before[1])


@pytest.mark.parametrize("reduction", ref.REDUCTIONS)
@pytest.mark.parametrize("backend", ref.ALL)
def test_gradcheck(backend, reduction):
    device = ref.backend_device(backend)
    y = torch.randn(5, 3, dtype=torch.float64, device=device, requires_grad=True)
    yc = torch.randn(4, 3, dtype=torch.float64, device=device, requires_grad=True)
    D = ref.spline_weights(5, 4).to(device)
    assert torch.autograd.gradcheck(lambda a, b: ops.reconstruction_loss(a, b, D, reduction, backend=backend), (y, yc))


@pytest.mark.parametrize("backend", ref.ALL)
def test_opcheck(backend):
    """Schema, fake kernel and autograd registration of the backend's ``reconstruction_loss`` op."""
    device = ref.backend_device(backend)
    ops.spline_mix(ref.spline_weights(3, 3).to(device), torch.randn(3, 2, device=device), backend=backend)  # registers
    op = ref.registered_op(backend, "reconstruction_loss")
    D = ref.spline_weights(5, 6, torch.float32).to(device)
    yc = torch.randn(6, 4, device=device, requires_grad=True)
    y = torch.randn(5, 4, device=device, requires_grad=True)
    for reduction in ref.REDUCTIONS:
        torch.library.opcheck(op, (y, yc, D, reduction, True))


@settings(max_examples=25, deadline=None)
@given(
    K=st.integers(3, 20),
    N=st.integers(3, 20),
    d=st.integers(1, 9),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    reduction=st.sampled_from(list(ref.REDUCTIONS)),
)
@pytest.mark.parametrize("backend", ref.ALL)
def test_property_against_float64(backend, K, N, d, dtype, reduction):
    device = ref.backend_device(backend)
    D = ref.spline_weights(K, N)
    y = torch.randn(K, d, dtype=dtype)
    yc = torch.randn(N, d, dtype=dtype)
    loss = ops.reconstruction_loss(y.to(device), yc.to(device), D.to(device), reduction, backend=backend)
    assert ref.rel_err(loss.cpu(), ref.reconstruction64(y, yc, D, reduction)[0]) < ref.OPS_TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("reduction", ref.REDUCTIONS)
@pytest.mark.parametrize("K,N,rest", [(5, 3, (131,)), (17, 64, (7,)), (64, 17, (2, 3)), (17, 300, (5,)),
                                      ref.gpu_case(17, 17, (131,)), ref.gpu_case(256, 256, (4099,)), ref.gpu_case(3, 1024, (7,))])
@pytest.mark.parametrize("backend", ref.KERNELS)
def test_forward_backward_against_torch(backend, K, N, rest, reduction, dtype):
    """Loss and both gradients (a non-unit incoming gradient) against the torch backend, and for fp32 and
    fp16 also against float64 (the torch backend's own error sets the bar)."""
    ref.skip_if_interpreter_lacks(backend, dtype)
    device = ref.backend_device(backend)
    decoder = ref.mixing_matrix(K, N, device=device).float()
    d = int(torch.tensor(rest).prod())
    y = ref.randn((K, d), dtype, device, seed=16).reshape((K,) + rest)
    y_coded = ref.randn((N, d), dtype, device, seed=17).reshape((N,) + rest)
    # a scalar 0.37, or per-sample values for "none"
    grad = torch.linspace(-1.0, 2.0, K, device=device) if reduction == "none" else torch.tensor(0.37, device=device)
    results = {}
    for name in (backend, "torch"):
        ly, lyc = y.detach().clone().requires_grad_(), y_coded.detach().clone().requires_grad_()
        loss = ops.reconstruction_loss(ly, lyc, decoder, reduction, backend=name)
        loss.backward(grad.to(loss.dtype))
        results[name] = (loss.detach(), ly.grad, lyc.grad)
    ref_loss, ref_gy, _ = ref.reconstruction64(y, y_coded, decoder, reduction)
    ref_gy = (grad.double()[:, None] if reduction == "none" else grad.double()) * ref_gy
    ref_gyc = -decoder.double().t() @ ref_gy
    for got, torch_got, expected, what in zip(results[backend], results["torch"], (ref_loss, ref_gy, ref_gyc),
                                         ("loss", "grad_y", "grad_y_coded")):
        assert got.shape == torch_got.shape and got.dtype == torch_got.dtype, what
        vs_torch_tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2.0 ** -7}.get(dtype)
        if vs_torch_tol is not None:
            assert ref.rel_err(got, torch_got) < vs_torch_tol, f"{what}: {ref.rel_err(got, torch_got):.3e}"
        got, torch_got = got.reshape(expected.shape), torch_got.reshape(expected.shape)
        if dtype == torch.float32:
            ref.assert_fp32_accuracy(got, torch_got, expected, f"ops.reconstruction_loss {what}")
        elif dtype == torch.float16:
            # both backends round to fp16 where the registry does (e.g. "none"'s backward): judge by
            # torch's error, plus half an fp16 ulp
            ours, theirs = ref.rel_err(got, expected), ref.rel_err(torch_got, expected)
            assert ours <= 2 * theirs + 2.0 ** -11, f"fp16 {what}: {backend} {ours:.3e}, torch {theirs:.3e}"


# -- the backend's function called directly (below dispatch and autograd) -------------------------

# (K, N, d): one and several tiles, K or N > 128, N = 200 resident and N = 300 chunked on Triton
SHAPES = [(3, 3, 1), (5, 3, 7), (3, 5, 131), (17, 17, 1), (17, 64, 7), (64, 17, 131), (64, 64, 70),
          (200, 17, 5), (17, 200, 3), (64, 300, 5), (17, 5, 131)]
GPU_SHAPES = ref.size_classes() + [
    ref.gpu_case(256, 256, 1 << 16), ref.gpu_case(1024, 1024, 4096), ref.gpu_case(3, 1000, 12345), ref.gpu_case(512, 64, 65537)]


def slow(*values):
    """A case of several seconds in the Triton interpreter (on CPU)."""
    return pytest.param(*values, marks=pytest.mark.slow)


def check_fp32(backend, y, y_coded, decoder, reduction, what=""):
    """The backend's loss and gradients against float64 by the fp32 rule; returns them."""
    loss, grad_y, grad_yc = ref.backend_module(backend).reconstruction_loss(y, y_coded, decoder, reduction, True)
    ref_loss, ref_gy, ref_gyc = ref.reconstruction64(y, y_coded, decoder, reduction)
    t_loss, t_gy, t_gyc = ref.torch_fp32_reconstruction(y, y_coded, decoder, reduction)
    ref.assert_fp32_accuracy(loss, t_loss, ref_loss, f"{what} loss")
    ref.assert_fp32_accuracy(grad_y, t_gy, ref_gy, f"{what} grad_y")
    if reduction != "none":
        ref.assert_fp32_accuracy(grad_yc, t_gyc, ref_gyc, f"{what} grad_y_coded")
    return loss, grad_y, grad_yc


@pytest.mark.parametrize("backend", ref.KERNELS)
class TestKernel:
    @pytest.mark.parametrize("reduction", ref.REDUCTIONS)
    @pytest.mark.parametrize("K,N,d", SHAPES + GPU_SHAPES)
    def test_fp32_loss_and_grads(self, backend, K, N, d, reduction):
        device = ref.backend_device(backend)
        decoder = ref.mixing_matrix(K, N, device=device).float()
        y = ref.randn((K, d), torch.float32, device, seed=K)
        y_coded = ref.randn((N, d), torch.float32, device, seed=N + 1)
        loss, grad_y, grad_yc = check_fp32(backend, y, y_coded, decoder, reduction)
        assert loss.dtype == torch.float32 and loss.shape == ((K,) if reduction == "none" else ())
        assert grad_y.shape == (K, d) and grad_y.is_contiguous() and grad_y.dtype == torch.float32
        if reduction == "none":
            assert grad_yc.numel() == 0
        else:
            assert grad_yc.shape == (N, d) and grad_yc.is_contiguous()
        loss_only = ref.backend_module(backend).reconstruction_loss(y, y_coded, decoder, reduction, False)
        assert loss_only[1].numel() == 0 and loss_only[2].numel() == 0
        assert torch.equal(loss_only[0], loss)  # same kernel, same summation order
        if (K, N, d) in ((256, 256, 1 << 16), (1024, 1024, 4096), (3, 1000, 12345), (512, 64, 65537)):
            out = ref.backend_module(backend).spline_mix(decoder, y_coded)
            ref.assert_fp32_accuracy(out, ref.torch_fp32_mix(decoder, y_coded), ref.mix64(decoder, y_coded), "spline_mix")

    @pytest.mark.parametrize("reduction", ref.REDUCTIONS)
    @pytest.mark.parametrize("K,N,d", [(5, 3, 131), (64, 300, 7), (17, 200, 40),
                                       ref.gpu_case(17, 256, 131), ref.gpu_case(256, 3, 65537), ref.gpu_case(1024, 1024, 7)])
    def test_noncontiguous_and_misaligned(self, backend, K, N, d, reduction):
        """y with no unit stride; y_coded likewise, or offset storage (no 16-byte alignment); the
        decoder a transposed view."""
        device = ref.backend_device(backend)
        decoder = ref.mixing_matrix(N, K, device=device).float().t()
        y = ref.randn((K, d), torch.float32, device, noncontiguous=True, seed=5)
        for y_coded in (ref.randn((N, d), torch.float32, device, noncontiguous=True, seed=6),
                        ref.randn((N + 1, d + 1), torch.float32, device, seed=12)[1:, 1:]):
            check_fp32(backend, y, y_coded, decoder, reduction, "strided")

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    @pytest.mark.parametrize("reduction", ref.REDUCTIONS)
    @pytest.mark.parametrize("K,N,d,elementwise", [(5, 3, 131, True), (64, 17, 7, True), (17, 300, 5, True),
                                                   ref.gpu_case(3, 17, 131, False), ref.gpu_case(256, 256, 65537, False),
                                                   ref.gpu_case(1024, 17, 7, False), ref.gpu_case(17, 1024, 1, False)])
    def test_half_types(self, backend, dtype, reduction, K, N, d, elementwise):
        """Half inputs are exact in fp32: the loss follows the fp32 rule (fp32 accumulation). Each gradient
        is computed in fp32 and rounded once to the input dtype, so (tests/half_bounds.py, from
        ``torch.finfo``) every element is within ``u|x| + s/2 + e`` of float64 (``u = eps/2``, ``s`` the
        subnormal spacing, ``e = 32 u32 M`` the fp32 slack) and the whole gradient within
        ``u||x|| + (s/2) sqrt(n) + ||e||``, which an all-subnormal fp16 "mean" gradient (256 x 65537)
        meets where a relative error below ``u`` cannot."""
        ref.skip_if_interpreter_lacks(backend, dtype)
        device = ref.backend_device(backend)
        decoder = ref.mixing_matrix(K, N, device=device).float()
        y, y_coded = ref.randn((K, d), dtype, device, seed=7), ref.randn((N, d), dtype, device, seed=8)
        loss, grad_y, grad_yc = ref.backend_module(backend).reconstruction_loss(y, y_coded, decoder, reduction, True)
        ref_loss, ref_gy, ref_gyc = ref.reconstruction64(y, y_coded, decoder, reduction)
        m_gy, m_gyc = ref.reconstruction_magnitudes(y, y_coded, decoder, reduction)
        assert loss.dtype == torch.float32 and grad_y.dtype == dtype
        ref.assert_fp32_accuracy(loss, ref.torch_fp32_reconstruction(y, y_coded, decoder, reduction)[0], ref_loss, "loss")
        ref.assert_half_normwise(grad_y, ref_gy, m_gy, "grad_y")
        if ref_gyc is not None:
            assert grad_yc.dtype == dtype
            ref.assert_half_normwise(grad_yc, ref_gyc, m_gyc, "grad_y_coded")
        if elementwise:  # small cases: every element within one rounding
            torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=0)
            ref.assert_half_elementwise(grad_y, ref_gy, m_gy, "grad_y")
            if ref_gyc is not None:
                ref.assert_half_elementwise(grad_yc, ref_gyc, m_gyc, "grad_y_coded")

    @pytest.mark.gpu
    @pytest.mark.skipif(not ref.HAS_GPU, reason="GPU-sized shape: too slow for the Triton interpreter")
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    def test_half_types_large(self, backend, dtype):
        """Both gradients and ``spline_mix`` rounded once from fp32: every element within
        ``u|x| + s/2 + e`` (tests/half_bounds.py; was: rtol one or two half ulps plus an atol of 1e-6 or
        1e-5 of the largest value)."""
        device = ref.backend_device(backend)
        K, N, d = 256, 256, 1 << 16
        decoder = ref.mixing_matrix(K, N, device=device).float()
        y, y_coded = ref.randn((K, d), dtype, device, seed=24), ref.randn((N, d), dtype, device, seed=25)
        loss, grad_y, grad_yc = ref.backend_module(backend).reconstruction_loss(y, y_coded, decoder, "sum", True)
        ref_loss, ref_gy, ref_gyc = ref.reconstruction64(y, y_coded, decoder, "sum")
        m_gy, m_gyc = ref.reconstruction_magnitudes(y, y_coded, decoder, "sum")
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=0)
        ref.assert_half_elementwise(grad_y, ref_gy, m_gy, "grad_y")
        ref.assert_half_elementwise(grad_yc, ref_gyc, m_gyc, "grad_y_coded")
        out = ref.backend_module(backend).spline_mix(decoder, y_coded)
        ref.assert_half_elementwise(out, ref.mix64(decoder, y_coded), ref.mix_magnitude(decoder, y_coded), "spline_mix")

    @pytest.mark.parametrize("reduction", ref.REDUCTIONS)
    @pytest.mark.parametrize("K,N,d,rtol,atol,loss_atol", [
        (17, 64, 50, 1e-12, 1e-15, 0.0), ref.gpu_case(3, 17, 131, 1e-11, 1e-13, 1e-13),
        ref.gpu_case(256, 256, 65537, 1e-11, 1e-13, 1e-13), ref.gpu_case(1024, 17, 7, 1e-11, 1e-13, 1e-13),
        ref.gpu_case(17, 1024, 1, 1e-11, 1e-13, 1e-13)])
    def test_float64(self, backend, reduction, K, N, d, rtol, atol, loss_atol):
        device = ref.backend_device(backend)
        decoder = ref.mixing_matrix(K, N, device=device)
        y, y_coded = ref.randn((K, d), torch.float64, device), ref.randn((N, d), torch.float64, device, seed=9)
        loss, grad_y, grad_yc = ref.backend_module(backend).reconstruction_loss(y, y_coded, decoder, reduction, True)
        ref_loss, ref_gy, ref_gyc = ref.reconstruction64(y, y_coded, decoder, reduction)
        assert loss.dtype == torch.float64 and grad_y.dtype == torch.float64
        torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=loss_atol)
        torch.testing.assert_close(grad_y, ref_gy, rtol=rtol, atol=atol)
        if ref_gyc is not None:
            torch.testing.assert_close(grad_yc, ref_gyc, rtol=rtol, atol=atol)

    @pytest.mark.parametrize("K,N,d,reduction", [
        slow(64, 64, 2048, "mean"), slow(64, 64, 2048, "none"), (17, 300, 64, "mean"), (17, 300, 64, "none")] + [
        ref.gpu_case(*shape, reduction)
        for shape in ((256, 256, 65537), (17, 1024, 131), (256, 256, 1 << 16), (1024, 1024, 2048))
        for reduction in ref.REDUCTIONS])
    def test_fp32_cancellation(self, backend, reduction, K, N, d):
        """y within 1e-3 of D y_coded: r is ~1e3 times smaller than y, so rounding in D y_coded shows
        (TF32 dots fail here)."""
        device = ref.backend_device(backend)
        decoder64 = ref.mixing_matrix(K, N, device=device)
        y_coded64 = ref.randn((N, d), torch.float64, device, seed=10)
        y64 = decoder64 @ y_coded64 + 1e-3 * ref.randn((K, d), torch.float64, device, seed=11)
        y, y_coded, decoder = y64.float(), y_coded64.float(), decoder64.float()
        loss, grad_y, grad_yc = check_fp32(backend, y, y_coded, decoder, reduction, "cancellation")
        assert ref.rel_err(grad_y, ref.reconstruction64(y, y_coded, decoder, reduction)[1]) > 1e-6, "must cancel"

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("K,N,d", [slow(64, 64, 700), (17, 300, 70), ref.gpu_case(256, 256, 1 << 18),
                                       ref.gpu_case(256, 256, 300001)])
    def test_deterministic(self, backend, dtype, K, N, d):
        """Per-block partials summed in a fixed order: bitwise equal results, run after run (the large
        shapes give each block of the persistent grid many column tiles)."""
        ref.skip_if_interpreter_lacks(backend, dtype)
        device = ref.backend_device(backend)
        kernels = ref.backend_module(backend)
        decoder = ref.mixing_matrix(K, N, device=device).float()
        y, y_coded = ref.randn((K, d), dtype, device, seed=12), ref.randn((N, d), dtype, device, seed=13)
        for reduction in ref.REDUCTIONS if ref.HAS_GPU else ("mean",):  # the interpreter is slow: one on CPU
            first = kernels.reconstruction_loss(y, y_coded, decoder, reduction, True)
            for _ in range(3 if ref.HAS_GPU else 1):
                again = kernels.reconstruction_loss(y, y_coded, decoder, reduction, True)
                for a, b in zip(first, again):
                    assert torch.equal(a, b), reduction
        assert torch.equal(kernels.spline_mix(decoder, y_coded), kernels.spline_mix(decoder, y_coded))


# -- bad input -------------------------------------------------------------------------------------


def test_bad_inputs_name_the_argument():
    D = ref.spline_weights(5, 4, torch.float32)
    y, yc = torch.randn(5, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match="reduction must be one of"):
        ops.reconstruction_loss(y, yc, D, reduction="max")
    with pytest.raises(TypeError, match="y_coded has dtype torch.float64 but y has torch.float32"):
        ops.reconstruction_loss(y, yc.double(), D)
    with pytest.raises(ValueError, match="y_coded's sample shape"):
        ops.reconstruction_loss(y, torch.randn(4, 2), D)
    with pytest.raises(ValueError, match=r"decoder must have shape \(len\(y\), len\(y_coded\)\) = \(5, 4\)"):
        ops.reconstruction_loss(y, yc, D.t())
