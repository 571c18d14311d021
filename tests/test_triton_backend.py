"""Backend "triton" (kernels/, shipped as dres_fast.kernels) against float64 math and the torch backend.

On CPU the kernels run through Triton's interpreter (TRITON_INTERPRET=1 must be set before triton is
imported: tests/conftest.py does it when CUDA is absent; it is repeated here for standalone runs). The
interpreter tiles are 32 wide (kernels.spline_mix.INTERPRETER_SPLINE_MIX_TILE and
reconstruction_loss.INTERPRETER_RECON_TILE), so d = 131 and K, N = 64, 200, 300 span several tiles, and
N = 300 > N_RESIDENT_MAX takes the chunked path. ``TestGPU`` runs large shapes on a CUDA device.
"""

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_kernels():
    """dres_fast.kernels when installed; from a source checkout, load kernels/ under that name
    (what setup.py's package_dir does), so its relative imports resolve the same way."""
    try:
        import dres_fast.kernels as k
        return k
    except ImportError:
        pass
    if "dres_fast.kernels" in sys.modules:
        return sys.modules["dres_fast.kernels"]
    spec = importlib.util.spec_from_file_location(
        "dres_fast.kernels", ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(ROOT / "kernels")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["dres_fast.kernels"] = module
    spec.loader.exec_module(module)
    return module


K_MOD = _load_kernels()
INTERPRET = K_MOD.INTERPRET
DEVICE = "cpu" if INTERPRET else "cuda"
pytestmark = pytest.mark.skipif(not K_MOD.is_available(DEVICE)[0], reason=K_MOD.is_available(DEVICE)[1])


def _core_ops():
    try:
        import dres_fast.ops as ops
        from dres_fast import torch_backend
        return ops, torch_backend
    except Exception:  # the core package is not importable (yet): only the direct kernel tests run
        return None, None


OPS, TORCH_BACKEND = _core_ops()
needs_core = pytest.mark.skipif(OPS is None, reason="dres_fast core (ops, torch_backend) not importable")

# --------------------------------------------------------------------------------------------------
# float64 references and error measures
# --------------------------------------------------------------------------------------------------


def ref_reconstruction(y, y_coded, decoder, reduction):
    """float64 loss and gradients (unit incoming gradient) of the same (rounded) inputs."""
    y64 = y.double().detach().requires_grad_()
    yc64 = y_coded.double().detach().requires_grad_()
    r = y64 - decoder.double() @ yc64
    per_sample = (r * r).sum(dim=1)
    loss = {"mean": per_sample.sum() / r.numel(), "sum": per_sample.sum(), "none": per_sample}[reduction]
    if reduction == "none":
        return loss.detach(), 2 * r.detach(), None
    loss.backward()
    return loss.detach(), y64.grad, yc64.grad


FP32_FLOOR = 8 * 2.0 ** -24
FP16_SUBNORMAL = 2.0 ** -24  # spacing of fp16 numbers below 2^-14: an absolute error no fp16 output avoids


def rel_err(got, ref):
    ref = ref.double()
    return ((got.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def assert_fp32_accuracy(got, torch_fp32, ref, what):
    """DESIGN.md 4: error against float64 at most twice the torch fp32 error. The floor (a few fp32 ulps)
    only matters for a handful of numbers (a scalar loss from d = 1), where torch may land within a
    fraction of an ulp by luck; real errors (cancellation, TF32, a wrong index) are orders larger."""
    ours, theirs = rel_err(got, ref), rel_err(torch_fp32, ref)
    assert ours <= 2 * theirs + FP32_FLOOR, f"{what}: triton rel err {ours:.3e} > 2 x torch {theirs:.3e}"


def torch_fp32_reconstruction(y, y_coded, decoder, reduction):
    """What the torch fp32 backend computes (independent of the core package being importable)."""
    r = y.float() - decoder.float() @ y_coded.float()
    per_sample = (r * r).sum(dim=1)
    loss = {"mean": per_sample.sum() / r.numel(), "sum": per_sample.sum(), "none": per_sample}[reduction]
    c = 2.0 / r.numel() if reduction == "mean" else 2.0
    return loss, c * r, -decoder.float().t() @ (c * r)


def make(shape, dtype, noncontiguous=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if noncontiguous:  # a transposed view with a stride-2 slice: neither dimension has unit stride
        rows, cols = shape
        t = torch.randn(2 * cols, rows, generator=g, dtype=torch.float64).t()[:, ::2]
        assert t.stride(0) == 1 and t.stride(1) == 2 * rows  # (a 1-column view still counts as contiguous)
    else:
        t = torch.randn(*shape, generator=g, dtype=torch.float64)
    return t.to(device=DEVICE, dtype=dtype)


def make_decoder(rows, cols, seed=1):
    g = torch.Generator().manual_seed(seed)
    # rows that sum to one, like spline weights, with mixed signs
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64) / cols ** 0.5
    w = w - w.mean(dim=1, keepdim=True) + 1.0 / cols
    return w.to(DEVICE)


# (M, K, d): every shape class of the issue; K or M > 128 exercises tiling; small d keeps big cases fast
MIX_SHAPES = [(3, 3, 1), (5, 3, 7), (3, 5, 131), (17, 5, 1), (17, 17, 131), (64, 17, 7),
              (64, 64, 97), (5, 64, 300), (200, 64, 3), (64, 200, 5), (1024, 3, 2), (3, 1024, 3)]
# (K, N, d): N = 200 keeps y_coded resident (BLOCK_N = 256); N = 300 takes the chunked path
RECON_SHAPES = [(3, 3, 1), (5, 3, 7), (3, 5, 131), (17, 17, 1), (17, 64, 7), (64, 17, 131),
                (64, 64, 70), (200, 17, 5), (17, 200, 3), (64, 300, 5)]

# --------------------------------------------------------------------------------------------------
# Kernels called directly
# --------------------------------------------------------------------------------------------------


class TestSplineMixKernel:
    @pytest.mark.parametrize("M,K,d", MIX_SHAPES)
    def test_fp32_matches_float64(self, M, K, d):
        weights = make_decoder(M, K).float()
        x = make((K, d), torch.float32, seed=M + K + d)
        out = K_MOD.spline_mix(weights, x)
        assert out.shape == (M, d) and out.dtype == torch.float32 and out.is_contiguous()
        ref = weights.double() @ x.double()
        assert_fp32_accuracy(out, weights @ x, ref, "spline_mix")

    @pytest.mark.parametrize("M,K,d", [(5, 3, 131), (64, 200, 7), (17, 17, 1)])
    def test_noncontiguous_inputs_and_transposed_weights(self, M, K, d):
        # backward runs the same kernel with W^T: pass a transposed view, not a copy
        weights_t = make_decoder(K, M).float().t()
        x = make((K, d), torch.float32, noncontiguous=True, seed=3)
        out = K_MOD.spline_mix(weights_t, x)
        ref = weights_t.double() @ x.double()
        assert_fp32_accuracy(out, weights_t.contiguous() @ x.contiguous(), ref, "spline_mix strided")

    @pytest.mark.parametrize("M,K,d", [(5, 3, 131), (64, 17, 7), (17, 200, 5)])
    def test_fp16_accumulates_in_fp32(self, M, K, d):
        weights = make_decoder(M, K).float()
        x = make((K, d), torch.float16, seed=4)
        out = K_MOD.spline_mix(weights, x)
        assert out.dtype == torch.float16
        ref = (weights.double() @ x.double())
        # only the final rounding to fp16 (half an ulp: 2^-11 relative) may be left
        torch.testing.assert_close(out.double(), ref, rtol=2.0 ** -10, atol=1e-6)

    def test_float64(self):
        weights = make_decoder(17, 64)
        x = make((64, 33), torch.float64)
        out = K_MOD.spline_mix(weights, x)
        torch.testing.assert_close(out, weights @ x, rtol=1e-12, atol=1e-12)


class TestReconstructionLossKernel:
    @pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
    @pytest.mark.parametrize("K,N,d", RECON_SHAPES)
    def test_fp32_loss_and_grads(self, K, N, d, reduction):
        decoder = make_decoder(K, N).float()
        y = make((K, d), torch.float32, seed=K)
        y_coded = make((N, d), torch.float32, seed=N + 1)
        loss, grad_y, grad_yc = K_MOD.reconstruction_loss(y, y_coded, decoder, reduction, True)
        ref_loss, ref_gy, ref_gyc = ref_reconstruction(y, y_coded, decoder, reduction)
        t_loss, t_gy, t_gyc = torch_fp32_reconstruction(y, y_coded, decoder, reduction)
        assert loss.dtype == torch.float32 and loss.shape == ref_loss.shape
        assert_fp32_accuracy(loss, t_loss, ref_loss, "loss")
        assert_fp32_accuracy(grad_y, t_gy, ref_gy, "grad_y")
        assert grad_y.shape == (K, d) and grad_y.is_contiguous()
        if reduction == "none":
            assert grad_yc.numel() == 0
        else:
            assert grad_yc.shape == (N, d) and grad_yc.is_contiguous()
            assert_fp32_accuracy(grad_yc, t_gyc, ref_gyc, "grad_y_coded")

    @pytest.mark.parametrize("reduction", ["mean", "none"])
    def test_without_grads_returns_empty_grads(self, reduction):
        decoder = make_decoder(17, 5).float()
        y, y_coded = make((17, 131), torch.float32), make((5, 131), torch.float32, seed=2)
        loss, grad_y, grad_yc = K_MOD.reconstruction_loss(y, y_coded, decoder, reduction, False)
        assert grad_y.numel() == 0 and grad_yc.numel() == 0
        with_grads = K_MOD.reconstruction_loss(y, y_coded, decoder, reduction, True)[0]
        assert torch.equal(loss, with_grads)

    @pytest.mark.parametrize("K,N,d", [(5, 3, 131), (64, 300, 7), (17, 200, 40)])
    def test_noncontiguous_inputs(self, K, N, d):
        decoder = make_decoder(N, K).float().t()  # a transposed view as the decoder too
        y = make((K, d), torch.float32, noncontiguous=True, seed=5)
        y_coded = make((N, d), torch.float32, noncontiguous=True, seed=6)
        loss, grad_y, grad_yc = K_MOD.reconstruction_loss(y, y_coded, decoder, "sum", True)
        ref_loss, ref_gy, ref_gyc = ref_reconstruction(y, y_coded, decoder, "sum")
        t_loss, t_gy, t_gyc = torch_fp32_reconstruction(y, y_coded, decoder, "sum")
        assert_fp32_accuracy(loss, t_loss, ref_loss, "loss")
        assert_fp32_accuracy(grad_y, t_gy, ref_gy, "grad_y")
        assert_fp32_accuracy(grad_yc, t_gyc, ref_gyc, "grad_y_coded")

    @pytest.mark.parametrize("K,N,d", [(5, 3, 131), (64, 17, 7), (17, 300, 5)])
    @pytest.mark.parametrize("reduction", ["mean", "none"])
    def test_fp16(self, K, N, d, reduction):
        decoder = make_decoder(K, N).float()
        y = make((K, d), torch.float16, seed=7)
        y_coded = make((N, d), torch.float16, seed=8)
        loss, grad_y, grad_yc = K_MOD.reconstruction_loss(y, y_coded, decoder, reduction, True)
        assert loss.dtype == torch.float32 and grad_y.dtype == torch.float16
        ref_loss, ref_gy, ref_gyc = ref_reconstruction(y, y_coded, decoder, reduction)
        # fp32 accumulation: the loss is fp32-accurate; gradients carry one fp16 rounding
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=0)
        torch.testing.assert_close(grad_y.double(), ref_gy, rtol=2.0 ** -10, atol=FP16_SUBNORMAL)
        if reduction != "none":
            assert grad_yc.dtype == torch.float16
            torch.testing.assert_close(grad_yc.double(), ref_gyc, rtol=2.0 ** -10, atol=FP16_SUBNORMAL)

    def test_float64(self):
        decoder = make_decoder(17, 64)
        y, y_coded = make((17, 50), torch.float64), make((64, 50), torch.float64, seed=9)
        loss, grad_y, grad_yc = K_MOD.reconstruction_loss(y, y_coded, decoder, "mean", True)
        ref_loss, ref_gy, ref_gyc = ref_reconstruction(y, y_coded, decoder, "mean")
        assert loss.dtype == torch.float64
        torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
        torch.testing.assert_close(grad_y, ref_gy, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(grad_yc, ref_gyc, rtol=1e-12, atol=1e-15)

    @pytest.mark.parametrize("K,N,d", [(64, 64, 2048), (17, 300, 64)])
    def test_cancellation_accuracy(self, K, N, d):
        """y within 1e-3 of D y_coded: r is ~1e3 times smaller than y, so rounding in D y_coded shows."""
        decoder64 = make_decoder(K, N)
        y_coded64 = make((N, d), torch.float64, seed=10)
        y64 = decoder64 @ y_coded64 + 1e-3 * make((K, d), torch.float64, seed=11)
        y, y_coded, decoder = y64.float(), y_coded64.float(), decoder64.float()
        for reduction in ("mean", "none"):
            loss, grad_y, grad_yc = K_MOD.reconstruction_loss(y, y_coded, decoder, reduction, True)
            ref_loss, ref_gy, ref_gyc = ref_reconstruction(y, y_coded, decoder, reduction)
            t_loss, t_gy, t_gyc = torch_fp32_reconstruction(y, y_coded, decoder, reduction)
            assert rel_err(grad_y, ref_gy) > 1e-6, "the case must actually cancel"
            assert_fp32_accuracy(loss, t_loss, ref_loss, f"cancellation loss ({reduction})")
            assert_fp32_accuracy(grad_y, t_gy, ref_gy, f"cancellation grad_y ({reduction})")
            if reduction != "none":
                assert_fp32_accuracy(grad_yc, t_gyc, ref_gyc, "cancellation grad_y_coded")

    @pytest.mark.parametrize("K,N,d", [(64, 64, 700), (17, 300, 70)])
    def test_deterministic(self, K, N, d):
        decoder = make_decoder(K, N).float()
        y, y_coded = make((K, d), torch.float32, seed=12), make((N, d), torch.float32, seed=13)
        first = K_MOD.reconstruction_loss(y, y_coded, decoder, "mean", True)
        second = K_MOD.reconstruction_loss(y, y_coded, decoder, "mean", True)
        for a, b in zip(first, second):
            assert torch.equal(a, b)
        assert torch.equal(K_MOD.spline_mix(decoder, y_coded), K_MOD.spline_mix(decoder, y_coded))


# --------------------------------------------------------------------------------------------------
# Through dres_fast.ops (autograd, registry, dispatch) against the torch backend
# --------------------------------------------------------------------------------------------------


@needs_core
class TestThroughOps:
    def test_opcheck_registered_ops(self):
        """Fake kernels, autograd registration and schema of the dres_fast::*_triton ops."""
        weights = make_decoder(6, 5).float()
        x = make((5, 9), torch.float32, seed=40).requires_grad_()
        OPS.spline_mix(weights, x, backend="triton")  # registers the backend
        torch.library.opcheck(torch.ops.dres_fast.spline_mix_triton.default, (weights, x))
        decoder = make_decoder(5, 6).float()
        y = make((5, 9), torch.float32, seed=41).requires_grad_()
        y_coded = make((6, 9), torch.float32, seed=42).requires_grad_()
        for reduction in ("mean", "sum", "none"):
            torch.library.opcheck(torch.ops.dres_fast.reconstruction_loss_triton.default,
                                  (y, y_coded, decoder, reduction, True))

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
    @pytest.mark.parametrize("M,K,rest", [(5, 3, (131,)), (17, 64, (3, 5)), (200, 17, (2,)), (3, 300, (1,))])
    def test_spline_mix_forward_backward(self, M, K, rest, dtype):
        weights = make_decoder(M, K).float()
        x = make((K, int(torch.tensor(rest).prod())), dtype, seed=14).reshape((K,) + rest)
        grad_out = make((M, x[0].numel()), dtype, seed=15).reshape((M,) + rest) * 0.37
        results = {}
        for backend in ("triton", "torch"):
            leaf = x.detach().clone().requires_grad_()
            out = OPS.spline_mix(weights, leaf, backend=backend)
            out.backward(grad_out)
            results[backend] = (out.detach(), leaf.grad)
        ref_out = weights.double() @ x.double().reshape(K, -1)
        ref_grad = weights.double().t() @ grad_out.double().reshape(M, -1)
        for got, torch_got, ref in zip(results["triton"], results["torch"], (ref_out, ref_grad)):
            if dtype == torch.float32:
                assert_fp32_accuracy(got.reshape(ref.shape), torch_got.reshape(ref.shape), ref, "ops.spline_mix")
            else:
                torch.testing.assert_close(got.double().reshape(ref.shape), ref, rtol=2.0 ** -10, atol=1e-6)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
    @pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
    @pytest.mark.parametrize("K,N,rest", [(5, 3, (131,)), (17, 64, (7,)), (64, 17, (2, 3)), (17, 300, (5,))])
    def test_reconstruction_loss_forward_backward(self, K, N, rest, reduction, dtype):
        decoder = make_decoder(K, N).float()
        d = int(torch.tensor(rest).prod())
        y = make((K, d), dtype, seed=16).reshape((K,) + rest)
        y_coded = make((N, d), dtype, seed=17).reshape((N,) + rest)
        # a non-unit incoming gradient: a scalar 0.37, or per-sample values for "none"
        grad = torch.linspace(-1.0, 2.0, K, device=DEVICE) if reduction == "none" else torch.tensor(0.37, device=DEVICE)
        results = {}
        for backend in ("triton", "torch"):
            ly, lyc = y.detach().clone().requires_grad_(), y_coded.detach().clone().requires_grad_()
            loss = OPS.reconstruction_loss(ly, lyc, decoder, reduction, backend=backend)
            loss.backward(grad.to(loss.dtype))
            results[backend] = (loss.detach(), ly.grad, lyc.grad)
        ref_loss, ref_gy, _ = ref_reconstruction(y.reshape(K, d), y_coded.reshape(N, d), decoder, reduction)
        g = grad.double()[:, None] if reduction == "none" else grad.double()
        ref_gy = g * ref_gy
        ref_gyc = -decoder.double().t() @ ref_gy
        for got, torch_got, ref, what in zip(results["triton"], results["torch"], (ref_loss, ref_gy, ref_gyc),
                                             ("loss", "grad_y", "grad_y_coded")):
            assert got.shape == torch_got.shape, what
            assert got.dtype == torch_got.dtype, what
            got, torch_got = got.reshape(ref.shape), torch_got.reshape(ref.shape)
            if dtype == torch.float32:
                assert_fp32_accuracy(got, torch_got, ref, f"ops.reconstruction_loss {what}")
            else:
                # both backends round to fp16 where the registry does (e.g. "none"'s backward): judge
                # triton by torch's error, plus half an fp16 ulp
                ours, theirs = rel_err(got, ref), rel_err(torch_got, ref)
                assert ours <= 2 * theirs + 2.0 ** -11, f"fp16 {what}: triton {ours:.3e}, torch {theirs:.3e}"

    def test_auto_and_available(self):
        names = OPS.available_backends(DEVICE)
        assert "triton" in names


# --------------------------------------------------------------------------------------------------
# CPU tensors without the interpreter: a clear error
# --------------------------------------------------------------------------------------------------

_NO_INTERPRETER_SCRIPT = r"""
import importlib.util, sys, torch
root = sys.argv[1]
spec = importlib.util.spec_from_file_location("dres_fast.kernels", root + "/kernels/__init__.py",
                                              submodule_search_locations=[root + "/kernels"])
k = importlib.util.module_from_spec(spec); sys.modules["dres_fast.kernels"] = k; spec.loader.exec_module(k)
assert not k.INTERPRET
ok, reason = k.is_available("cpu")
assert not ok and "TRITON_INTERPRET" in reason, reason
assert k.OP_FACTORY is getattr(torch.library, "triton_op", torch.library.custom_op)
for call in (lambda: k.spline_mix(torch.ones(3, 3), torch.ones(3, 2)),
             lambda: k.reconstruction_loss(torch.ones(3, 2), torch.ones(3, 2), torch.ones(3, 3), "mean", True)):
    try:
        call()
    except RuntimeError as err:
        assert "TRITON_INTERPRET" in str(err) and "backend='torch'" in str(err), str(err)
    else:
        raise AssertionError("CPU tensors without the interpreter must raise")
print("OK")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error path")
def test_cpu_without_interpreter_raises_clear_error():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _NO_INTERPRETER_SCRIPT, str(ROOT)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr


# --------------------------------------------------------------------------------------------------
# GPU: large shapes, compiled kernels (skipped without CUDA)
# --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs a CUDA GPU (compiled Triton)")
class TestGPU:
    @pytest.fixture(autouse=True)
    def _ieee_torch_matmul(self):
        # the torch fp32 error we compare against must be IEEE fp32, not TF32
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        yield
        torch.backends.cuda.matmul.allow_tf32 = previous

    @pytest.mark.parametrize("K,N,d", [(256, 256, 1 << 16), (1024, 1024, 4096), (3, 1000, 12345), (512, 64, 65537)])
    def test_fp32_large(self, K, N, d):
        decoder = make_decoder(K, N).float()
        y, y_coded = make((K, d), torch.float32, seed=20), make((N, d), torch.float32, seed=21)
        for reduction in ("mean", "none"):
            loss, grad_y, grad_yc = K_MOD.reconstruction_loss(y, y_coded, decoder, reduction, True)
            ref_loss, ref_gy, ref_gyc = ref_reconstruction(y, y_coded, decoder, reduction)
            t_loss, t_gy, t_gyc = torch_fp32_reconstruction(y, y_coded, decoder, reduction)
            assert_fp32_accuracy(loss, t_loss, ref_loss, "gpu loss")
            assert_fp32_accuracy(grad_y, t_gy, ref_gy, "gpu grad_y")
            if reduction != "none":
                assert_fp32_accuracy(grad_yc, t_gyc, ref_gyc, "gpu grad_y_coded")
        out = K_MOD.spline_mix(decoder, y_coded)
        assert_fp32_accuracy(out, decoder @ y_coded, decoder.double() @ y_coded.double(), "gpu spline_mix")

    @pytest.mark.parametrize("K,N,d", [(256, 256, 1 << 16), (1024, 1024, 2048)])
    def test_fp32_cancellation_large(self, K, N, d):
        decoder64 = make_decoder(K, N)
        y_coded64 = make((N, d), torch.float64, seed=22)
        y64 = decoder64 @ y_coded64 + 1e-3 * make((K, d), torch.float64, seed=23)
        y, y_coded, decoder = y64.float(), y_coded64.float(), decoder64.float()
        loss, grad_y, grad_yc = K_MOD.reconstruction_loss(y, y_coded, decoder, "mean", True)
        ref_loss, ref_gy, ref_gyc = ref_reconstruction(y, y_coded, decoder, "mean")
        t_loss, t_gy, t_gyc = torch_fp32_reconstruction(y, y_coded, decoder, "mean")
        assert_fp32_accuracy(loss, t_loss, ref_loss, "gpu cancellation loss")
        assert_fp32_accuracy(grad_y, t_gy, ref_gy, "gpu cancellation grad_y")
        assert_fp32_accuracy(grad_yc, t_gyc, ref_gyc, "gpu cancellation grad_y_coded")

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    def test_half_large(self, dtype):
        K, N, d = 256, 256, 1 << 16
        decoder = make_decoder(K, N).float()
        y, y_coded = make((K, d), dtype, seed=24), make((N, d), dtype, seed=25)
        ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
        loss, grad_y, grad_yc = K_MOD.reconstruction_loss(y, y_coded, decoder, "sum", True)
        ref_loss, ref_gy, ref_gyc = ref_reconstruction(y, y_coded, decoder, "sum")
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=0)
        torch.testing.assert_close(grad_y.double(), ref_gy, rtol=ulp, atol=1e-6 * ref_gy.abs().max().item())
        torch.testing.assert_close(grad_yc.double(), ref_gyc, rtol=2 * ulp, atol=1e-5 * ref_gyc.abs().max().item())
        out = K_MOD.spline_mix(decoder, y_coded)
        torch.testing.assert_close(out.double(), decoder.double() @ y_coded.double(), rtol=ulp, atol=1e-6)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_every_autotune_config(self, dtype, monkeypatch):
        """The other GPU tests run one fixed tile (DRES_TRITON_AUTOTUNE=0 in bench/gpu_check.sh) and the
        autotuner only ever checks the tile it picks: run every autotune config once, at ragged shapes."""
        sm = sys.modules["dres_fast.kernels.spline_mix"]
        rl = sys.modules["dres_fast.kernels.reconstruction_loss"]
        monkeypatch.setenv("DRES_TRITON_AUTOTUNE", "0")
        ulp = 2.0 ** -7

        def check(got, torch_fp32, ref, what):
            if dtype == torch.float32:
                assert_fp32_accuracy(got, torch_fp32, ref, what)
            else:
                torch.testing.assert_close(got.double(), ref, rtol=2 * ulp,
                                           atol=1e-5 * ref.abs().max().item() + FP16_SUBNORMAL,
                                           msg=lambda m: f"{what}: {m}")

        M, K, d = 200, 300, 1000
        weights = make_decoder(M, K).float()
        x = make((K, d), dtype, seed=30)
        for config in sm._SPLINE_MIX_CONFIGS:
            cfg = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
            monkeypatch.setattr(sm, "FIXED_GPU_SPLINE_MIX_CONFIG", cfg)
            out = K_MOD.spline_mix(weights, x)
            check(out, weights @ x.float(), weights.double() @ x.double(), f"spline_mix {cfg}")

        # N = 200: y_coded resident (BLOCK_N = 256); N = 300: chunked (fp32 only, it is the slower path)
        for K, N in ((100, 200), (100, 300)) if dtype == torch.float32 else ((100, 200),):
            decoder = make_decoder(K, N).float()
            y, y_coded = make((K, d), dtype, seed=31), make((N, d), dtype, seed=32)
            ref_loss, ref_gy, ref_gyc = ref_reconstruction(y, y_coded, decoder, "mean")
            t_loss, t_gy, t_gyc = torch_fp32_reconstruction(y, y_coded, decoder, "mean")
            for config in rl._RECON_CONFIGS:
                cfg = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
                monkeypatch.setattr(rl, "FIXED_GPU_RECON_CONFIG", cfg)
                loss, grad_y, grad_yc = K_MOD.reconstruction_loss(y, y_coded, decoder, "mean", True)
                check(loss, t_loss, ref_loss, f"loss N={N} {cfg}")
                check(grad_y, t_gy, ref_gy, f"grad_y N={N} {cfg}")
                check(grad_yc, t_gyc, ref_gyc, f"grad_y_coded N={N} {cfg}")

    def test_deterministic_large(self):
        K, N, d = 256, 256, 1 << 18
        decoder = make_decoder(K, N).float()
        y, y_coded = make((K, d), torch.float32, seed=26), make((N, d), torch.float32, seed=27)
        first = K_MOD.reconstruction_loss(y, y_coded, decoder, "mean", True)
        second = K_MOD.reconstruction_loss(y, y_coded, decoder, "mean", True)
        for a, b in zip(first, second):
            assert torch.equal(a, b)

    @needs_core
    def test_torch_compile_traces_ops(self):
        decoder = make_decoder(64, 64).float()
        y = make((64, 4096), torch.float32, seed=28).requires_grad_()
        y_coded = make((64, 4096), torch.float32, seed=29).requires_grad_()

        def step(a, b):
            return OPS.reconstruction_loss(a, OPS.spline_mix(torch.eye(64, device=DEVICE), b, backend="triton"),
                                           decoder, "mean", backend="triton")

        eager = step(y, y_coded)
        compiled = torch.compile(step, fullgraph=True)(y, y_coded)
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=0)
