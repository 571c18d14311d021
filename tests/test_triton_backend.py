"""Backend "triton" (kernels/, shipped as dres_fast.kernels): what is particular to it. The numerics of
both ops (against float64 and the torch backend; on CPU through Triton's interpreter) are in
test_spline_mix.py and test_reconstruction_loss.py, shared with the other backends.

Here: CPU tensors without the interpreter give a clear error; on a GPU, every autotune config once and
``torch.compile`` tracing into the kernels.
"""

import importlib
import os
import subprocess
import sys

import pytest
import torch
from reference import (
    HAS_GPU,
    TRITON_MODULE,
    assert_fp32_accuracy,
    assert_half_elementwise,
    backend_device,
    backend_module,
    backend_skip_reason,
    mix64,
    mix_magnitude,
    mixing_matrix,
    randn,
    reconstruction64,
    reconstruction_magnitudes,
    torch_fp32_mix,
    torch_fp32_reconstruction,
)

from dres_fast import ops

pytestmark = pytest.mark.skipif(backend_skip_reason("triton") is not None, reason=str(backend_skip_reason("triton")))

# -- CPU tensors without the interpreter: a clear error -------------------------------------------

_NO_INTERPRETER_SCRIPT = r"""
import importlib, sys, torch
k = importlib.import_module(sys.argv[1])
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


@pytest.mark.slow  # a fresh interpreter importing torch and triton
@pytest.mark.skipif(HAS_GPU, reason="checks the CPU-only error path")
def test_cpu_without_interpreter_raises_clear_error():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _NO_INTERPRETER_SCRIPT, TRITON_MODULE], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr


# -- GPU: compiled kernels (skipped without CUDA) --------------------------------------------------

gpu = pytest.mark.skipif(not HAS_GPU or backend_device("triton") != "cuda", reason="needs a CUDA GPU (compiled Triton)")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_autotune_config(dtype, monkeypatch):
    """The op tests run one fixed tile (DRES_TRITON_AUTOTUNE=0 in bench/gpu_check.sh) and the autotuner
    only ever checks the tile it picks: run every autotune config once, at ragged shapes. fp32 results
    (the loss included) by the fp32 rule; bf16 results rounded once from fp32, every element within
    ``u|x| + s/2 + e`` (tests/half_bounds.py; was rtol 2^-6 with atol 1e-5 of the largest value + 2^-24)."""
    kernels = backend_module("triton")
    sm = importlib.import_module(TRITON_MODULE + ".spline_mix")
    rl = importlib.import_module(TRITON_MODULE + ".reconstruction_loss")
    monkeypatch.setenv("DRES_TRITON_AUTOTUNE", "0")

    def check(got, torch_fp32, ref, magnitude, what):
        if got.dtype == torch.float32:
            assert_fp32_accuracy(got, torch_fp32, ref, what)
        else:
            assert_half_elementwise(got, ref, magnitude, what)

    M, K, d = 200, 300, 1000
    weights = mixing_matrix(M, K, device="cuda").float()
    x = randn((K, d), dtype, "cuda", seed=30)
    for config in sm.configs_for(sm.dot_mode(dtype)):
        cfg = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
        monkeypatch.setattr(sm, "FORCED_CONFIG", cfg)
        out = kernels.spline_mix(weights, x)
        check(out, torch_fp32_mix(weights, x), mix64(weights, x), mix_magnitude(weights, x), f"spline_mix {cfg}")

    # N = 200: y_coded resident (BLOCK_N = 256); N = 300: chunked (fp32 only, it is the slower path)
    for K, N in ((100, 200), (100, 300)) if dtype == torch.float32 else ((100, 200),):
        decoder = mixing_matrix(K, N, device="cuda").float()
        y, y_coded = randn((K, d), dtype, "cuda", seed=31), randn((N, d), dtype, "cuda", seed=32)
        ref_loss, ref_gy, ref_gyc = reconstruction64(y, y_coded, decoder, "mean")
        t_loss, t_gy, t_gyc = torch_fp32_reconstruction(y, y_coded, decoder, "mean")
        m_gy, m_gyc = reconstruction_magnitudes(y, y_coded, decoder, "mean")
        for config in rl._RECON_CONFIGS:
            cfg = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
            monkeypatch.setattr(rl, "FORCED_RESIDENT_CONFIG", cfg)
            loss, grad_y, grad_yc = kernels.reconstruction_loss(y, y_coded, decoder, "mean", True)
            check(loss, t_loss, ref_loss, None, f"loss N={N} {cfg}")
            check(grad_y, t_gy, ref_gy, m_gy, f"grad_y N={N} {cfg}")
            check(grad_yc, t_gyc, ref_gyc, m_gyc, f"grad_y_coded N={N} {cfg}")


@gpu
@pytest.mark.gpu
def test_torch_compile_traces_ops():
    decoder = mixing_matrix(64, 64, device="cuda").float()
    y = randn((64, 4096), torch.float32, "cuda", seed=28).requires_grad_()
    y_coded = randn((64, 4096), torch.float32, "cuda", seed=29).requires_grad_()

    def step(a, b):
        return ops.reconstruction_loss(a, ops.spline_mix(torch.eye(64, device="cuda"), b, backend="triton"),
                                       decoder, "mean", backend="triton")

    eager = step(y, y_coded)
    compiled = torch.compile(step, fullgraph=True)(y, y_coded)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=0)
