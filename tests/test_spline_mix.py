"""``dres_fast.ops.spline_mix`` (``out = W x`` along the batch axis) on every backend available here.

The torch backend is judged against float64 math; every other backend against float64 and the torch
backend (tests/reference.py). Triton runs on CPU through its interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 when there is no GPU); its interpreter tiles are 32 wide, so d = 131 and
M, K = 64, 200 span several tiles. CUDA runs on a GPU only; shapes marked ``gpu`` are too large for
the interpreter and run for every backend on a GPU machine.
"""

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import reference as ref

from dres_fast import ops



# -- through dres_fast.ops: every backend ---------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7,), (7, 1), (7, 3, 5), (7, 131)])
@pytest.mark.parametrize("backend", ref.ALL)
def test_matches_float64(backend, dtype, shape):
    ref.skip_if_interpreter_lacks(backend, dtype)
    device = ref.backend_device(backend)
    x = torch.randn(shape, dtype=torch.float64)
    W = ref.spline_weights(11, 7)
    out = ops.spline_mix(W.to(device), x.to(device, dtype), backend=backend)
    assert out.shape == (11,) + shape[1:] and out.dtype == dtype
    assert ref.rel_err(out.cpu(), ref.mix64(W, x).reshape(out.shape)) < ref.OPS_TOL[dtype]


@pytest.mark.parametrize("backend", ref.ALL)
def test_non_contiguous_batch(backend):
    device = ref.backend_device(backend)
    x = torch.randn(5, 8, 6, dtype=torch.float64, device=device).transpose(1, 2)  # (5, 6, 8)
    W = ref.spline_weights(4, 5).to(device)
    assert not x.is_contiguous()
    torch.testing.assert_close(ops.spline_mix(W, x, backend=backend), (W @ x.reshape(5, -1)).reshape(4, 6, 8))


@pytest.mark.parametrize("backend", ref.ALL)
def test_gradcheck(backend):
    device = ref.backend_device(backend)
    x = torch.randn(5, 2, 3, dtype=torch.float64, device=device, requires_grad=True)
    W = ref.spline_weights(7, 5).to(device)
    assert torch.autograd.gradcheck(lambda a: ops.spline_mix(W, a, backend=backend), (x,))


@pytest.mark.parametrize("backend", ref.ALL)
def test_opcheck(backend):
    """Schema, fake kernel and autograd registration of the backend's ``spline_mix`` op."""
    device = ref.backend_device(backend)
    ops.spline_mix(ref.spline_weights(3, 3).to(device), torch.randn(3, 2, device=device), backend=backend)  # registers
    weights = ref.spline_weights(6, 5, torch.float32).to(device)
    x = torch.randn(5, 4, device=device, requires_grad=True)
    torch.library.opcheck(ref.registered_op(backend, "spline_mix"), (weights, x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,K,rest", [(5, 3, (131,)), (17, 64, (3, 5)), (200, 17, (2,)), (3, 300, (1,)),
                                      ref.gpu_case(256, 17, (1000,))])
@pytest.mark.parametrize("backend", ref.KERNELS)
def test_forward_backward_against_torch(backend, M, K, rest, dtype):
    """Forward and backward (a non-unit incoming gradient) against float64 and the torch backend. fp16:
    both are ``W x`` in fp32 rounded once, so every element is within ``u|x| + s/2 + e`` of float64 and the
    two backends' difference within twice the norm-wise bound (tests/half_bounds.py; was rtol 2^-10 with
    atol 1e-6, and a relative difference below 2^-9)."""
    device = ref.backend_device(backend)
    weights = ref.mixing_matrix(M, K, device=device).float()
    d = int(torch.tensor(rest).prod())
    x = ref.randn((K, d), dtype, device, seed=14).reshape((K,) + rest)
    grad_out = ref.randn((M, d), dtype, device, seed=15).reshape((M,) + rest) * 0.37
    results = {}
    for name in (backend, "torch"):
        leaf = x.detach().clone().requires_grad_()
        out = ops.spline_mix(weights, leaf, backend=name)
        out.backward(grad_out)
        results[name] = (out.detach(), leaf.grad)
    ref_out = ref.mix64(weights, x)
    ref_grad = ref.mix64(weights.t(), grad_out)
    magnitudes = (ref.mix_magnitude(weights, x), ref.mix_magnitude(weights.t(), grad_out))
    for got, torch_got, expected, magnitude in zip(results[backend], results["torch"], (ref_out, ref_grad), magnitudes):
        assert got.shape == torch_got.shape and got.dtype == torch_got.dtype
        if dtype == torch.float32:
            ref.assert_fp32_accuracy(got.reshape(expected.shape), torch_got.reshape(expected.shape), expected, "ops.spline_mix")
            assert ref.rel_err(got, torch_got) < 1e-5
        else:
            ref.assert_half_elementwise(got, expected, magnitude, f"{backend} spline_mix")
            ref.assert_half_elementwise(torch_got, expected, magnitude, "torch spline_mix")
            diff = (got.double() - torch_got.double()).norm().item()
            assert diff <= 2 * ref.half_norm_bound(expected, dtype, magnitude), f"vs torch: {diff:.3e}"


# -- the backend's function called directly (below dispatch and autograd) -------------------------

# (M, K, d): one and several tiles, ragged edges, K or M > 128 (tiling), a long thin batch either way
SHAPES = [(3, 3, 1), (5, 3, 7), (3, 5, 131), (17, 5, 1), (17, 17, 131), (64, 17, 7), (64, 64, 97),
          (5, 64, 300), (200, 64, 3), (64, 200, 5), (1024, 3, 2), (3, 1024, 3)]
GPU_SHAPES = ref.size_classes()


@pytest.mark.parametrize("backend", ref.KERNELS)
class TestKernel:
    @pytest.mark.parametrize("M,K,d", SHAPES + GPU_SHAPES)
    def test_fp32_matches_float64(self, backend, M, K, d):
        device = ref.backend_device(backend)
        weights = ref.mixing_matrix(M, K, device=device).float()
        x = ref.randn((K, d), torch.float32, device, seed=M + K + d)
        out = ref.backend_module(backend).spline_mix(weights, x)
        assert out.shape == (M, d) and out.dtype == torch.float32 and out.is_contiguous()
        ref.assert_fp32_accuracy(out, ref.torch_fp32_mix(weights, x), ref.mix64(weights, x), "spline_mix")

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
    @pytest.mark.parametrize("M,K,d", [(5, 3, 131), (64, 200, 7), (17, 17, 1),
                                       ref.gpu_case(17, 256, 131), ref.gpu_case(256, 17, 65537), ref.gpu_case(3, 1024, 7)])
    def test_noncontiguous_misaligned_and_transposed_weights(self, backend, dtype, M, K, d):
        """Backward runs the same kernel with W^T: a transposed view, not a copy. x: no unit stride, or
        offset storage (no 16-byte alignment). fp16: one rounding of fp32's ``W x``, every element within
        ``u|x| + s/2 + e`` (tests/half_bounds.py; was rtol 2^-10, atol 1e-5)."""
        device = ref.backend_device(backend)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        weights_t = ref.mixing_matrix(K, M, device=device, dtype=acc).t()
        for x in (ref.randn((K, d), dtype, device, noncontiguous=True, seed=3),
                  ref.randn((K + 1, d + 1), dtype, device, seed=3)[1:, 1:]):
            out = ref.backend_module(backend).spline_mix(weights_t, x)
            expected = ref.mix64(weights_t, x)
            if dtype == torch.float16:
                ref.assert_half_elementwise(out, expected, ref.mix_magnitude(weights_t, x), "strided")
            elif dtype == torch.float64:
                torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
            else:
                ref.assert_fp32_accuracy(out, ref.torch_fp32_mix(weights_t.contiguous(), x.contiguous()), expected,
                                     "strided spline_mix")

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    @pytest.mark.parametrize("M,K,d", [(5, 3, 131), (64, 17, 7), (17, 200, 5), ref.gpu_case(3, 17, 131),
                                       ref.gpu_case(256, 256, 65537), ref.gpu_case(1024, 3, 7),
                                       ref.gpu_case(17, 1024, 1)])
    def test_half_types_accumulate_in_fp32(self, backend, dtype, M, K, d):
        """Only the final rounding to the output dtype may be left: every element within
        ``u|x| + s/2 + e`` of float64, with ``u``, ``s`` from ``torch.finfo(dtype)`` and ``e = 32 u32 |W||x|``
        (tests/half_bounds.py; was rtol 2^-10 or 2^-7 with atol 1e-6, 1e-5 on GPU shapes)."""
        ref.skip_if_interpreter_lacks(backend, dtype)
        device = ref.backend_device(backend)
        weights = ref.mixing_matrix(M, K, device=device).float()
        x = ref.randn((K, d), dtype, device, seed=4)
        out = ref.backend_module(backend).spline_mix(weights, x)
        assert out.dtype == dtype and out.shape == (M, d)
        ref.assert_half_elementwise(out, ref.mix64(weights, x), ref.mix_magnitude(weights, x), "spline_mix")

    @pytest.mark.parametrize("M,K,d", [(17, 64, 33), ref.gpu_case(17, 256, 131), ref.gpu_case(1024, 17, 7),
                                       ref.gpu_case(3, 3, 65537)])
    def test_float64(self, backend, M, K, d):
        device = ref.backend_device(backend)
        weights = ref.mixing_matrix(M, K, device=device)
        x = ref.randn((K, d), torch.float64, device)
        torch.testing.assert_close(ref.backend_module(backend).spline_mix(weights, x), weights @ x, rtol=1e-12,
                                   atol=1e-12)


# -- bad input and backend choice (dispatch, before any backend runs) ------------------------------


def test_bad_inputs_name_the_argument():
    W = ref.spline_weights(4, 5, torch.float32)
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
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.spline_mix(W, x, backend="jax")
    with pytest.raises(TypeError, match="backend must be a string"):
        ops.spline_mix(W, x, backend=None)


def test_unavailable_backends_explain_why(monkeypatch):
    x = torch.randn(5, 3)
    W = ref.spline_weights(4, 5, torch.float32)
    with pytest.raises(ops.BackendUnavailableError, match="needs CUDA tensors"):
        ops.spline_mix(W, x, backend="cuda")
    monkeypatch.setenv("DRES_BACKEND", "numpy")
    with pytest.raises(ValueError, match="DRES_BACKEND must be one of"):
        ops.spline_mix(W, x)
    monkeypatch.setenv("DRES_BACKEND", "torch")
    assert ops.resolve_backend("auto", torch.device("cpu")) == "torch"
    assert "torch" in ops.available_backends("cpu")


@pytest.mark.parametrize("backend", ref.ALL)
def test_available_backends_lists_every_backend_that_runs(backend):
    assert backend in ops.available_backends(ref.backend_device(backend))


# -- the two-level fp32 sum survives Triton's compiler ---------------------------------------------

# Triton folds "dot(a, b, 0) + total" into "dot(a, b, total)", the single FMA chain the two-level sum
# replaces (kernels/_common.py); the interpreter cannot show it, so the kernels are compiled for sm_90
# (no GPU needed) and their TTGIR must keep the flush (math.fma).
_FLUSH_CHECK = r"""
import importlib.util, os, sys
os.environ.pop("TRITON_INTERPRET", None)
spec = importlib.util.spec_from_file_location("triton_compile", sys.argv[1])
tc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tc)
import triton
from triton.backends.compiler import GPUTarget
for name, fn, args, meta, config, _ in tc.VARIANTS:
    if name.startswith(tuple(sys.argv[2:])):
        sig, consts, attrs = tc.signature_for(fn, args, meta)
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
        print(f"{name}|{compiled.asm['ttgir'].count('math.fma')}")
"""


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_two_level_flush_survives_triton_compilation():
    script = pathlib.Path(__file__).resolve().parents[1] / ".ci" / "triton_compile.py"
    variants = ["spline_mix fp32 ieee cfg0", "spline_mix fp32 tf32x3 cfg0", "recon fp32 ieee rows grads=10 cfg0",
                "recon bf16 split rows grads=11 cfg0"]
    run = subprocess.run([sys.executable, "-c", _FLUSH_CHECK, str(script), *variants], capture_output=True,
                         text=True, timeout=900, env={**os.environ, "TRITON_DEFAULT_FP_FUSION": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    flushes = dict(line.rsplit("|", 1) for line in run.stdout.splitlines() if "|" in line)
    assert len(flushes) == len(variants), run.stdout
    assert all(int(count) >= 1 for count in flushes.values()), flushes
