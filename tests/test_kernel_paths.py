"""The Triton kernels' launch paths: small-d row split, resident and row-split reconstruction, autotune keys.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1 before triton is imported), where the
multiprocessor count is a stand-in (``_common.INTERPRETER_MULTIPROCESSORS``) and the tiles are 32 wide,
so the path choice of a GPU at d ~ 10 .. 4000 happens here at d ~ 1 .. 100. Each path is also forced
(monkeypatched ``choose_path``) on the same inputs, so both are checked at every shape. References are
float64 computations of the same rounded inputs; fp32 must be within twice the torch fp32 error.
"""

import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_kernels():
    try:
        import dres_fast.kernels as k
        return k
    except ImportError:
        pass
    if "dres_fast.kernels" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "dres_fast.kernels", ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(ROOT / "kernels")])
        module = importlib.util.module_from_spec(spec)
        sys.modules["dres_fast.kernels"] = module
        spec.loader.exec_module(module)
    return sys.modules["dres_fast.kernels"]


K_MOD = _load_kernels()
SM = sys.modules["dres_fast.kernels.spline_mix"]
RL = sys.modules["dres_fast.kernels.reconstruction_loss"]
COMMON = sys.modules["dres_fast.kernels._common"]
DEVICE = "cpu" if K_MOD.INTERPRET else "cuda"
pytestmark = pytest.mark.skipif(not K_MOD.is_available(DEVICE)[0], reason=K_MOD.is_available(DEVICE)[1])
FP32_FLOOR = 8 * 2.0 ** -24


def make(shape, dtype=torch.float32, seed=0, noncontiguous=False):
    g = torch.Generator().manual_seed(seed)
    rows, cols = shape
    if noncontiguous:  # transposed storage, every second column: no unit stride at all
        t = torch.randn(2 * cols, rows, generator=g, dtype=torch.float64).t()[:, ::2]
    else:
        t = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    return t.to(device=DEVICE, dtype=dtype)


def make_decoder(rows, cols, seed=1):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64) / cols ** 0.5
    return (w - w.mean(dim=1, keepdim=True) + 1.0 / cols).to(device=DEVICE, dtype=torch.float32)


def rel_err(got, ref):
    ref = ref.double()
    return ((got.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def check(got, torch_got, ref, dtype, what):
    """fp32: at most twice torch fp32's error against float64 (+ a few ulps); halves: a few half ulps."""
    assert got.shape == ref.shape, what
    if dtype == torch.float32:
        ours, theirs = rel_err(got, ref), rel_err(torch_got, ref)
        assert ours <= 2 * theirs + FP32_FLOOR, f"{what}: rel err {ours:.3e} > 2 x torch {theirs:.3e}"
    else:
        ulp = 2.0 ** -10 if dtype == torch.float16 else 2.0 ** -7
        assert rel_err(got, ref) <= 2 * ulp, f"{what}: rel err {rel_err(got, ref):.3e}"


def reference(y, y_coded, decoder, reduction):
    """float64 and torch-fp32 loss and gradients (unit incoming gradient) of the same rounded inputs."""
    out = {}
    for name, dt in (("f64", torch.float64), ("f32", torch.float32)):
        r = y.to(dt) - decoder.to(dt) @ y_coded.to(dt)
        per_sample = (r * r).sum(dim=1)
        loss = {"mean": per_sample.sum() / r.numel(), "sum": per_sample.sum(), "none": per_sample}[reduction]
        c = 2.0 / r.numel() if reduction == "mean" else 2.0
        out[name] = (loss, c * r, -decoder.to(dt).t() @ (c * r))
    return out["f64"], out["f32"]


def force_path(monkeypatch, path):
    monkeypatch.setattr(RL, "choose_path", lambda N, d, device, mode="ieee": path)


# ----------------------------------------------------------------------------------------------------
# Path choice
# ----------------------------------------------------------------------------------------------------


def test_path_choice_follows_d_n_and_the_dot_mode(monkeypatch):
    monkeypatch.delenv(RL.RECON_PATH_ENV, raising=False)
    device = torch.device(DEVICE)
    sms = COMMON.multiprocessors(device)
    block_d = RL.resident_block_d(RL.resident_block_n(256), "fp64")
    assert RL.choose_path(256, 7, device, "fp64") == "rows"  # logits: one column tile would run alone
    assert RL.choose_path(256, (2 * sms - 1) * block_d, device, "fp64") == "rows"
    assert RL.choose_path(256, (2 * sms - 1) * block_d + 1, device, "fp64") == "resident"
    assert RL.choose_path(RL.N_RESIDENT_MAX + 1, 1 << 20, device, "fp64") == "rows"  # y_coded does not fit
    assert RL.choose_path(256, 1 << 20, device, "ieee") == "rows"  # FMA dots: two GEMM launches are faster
    assert RL.choose_path(128, 1 << 20, device, "tf32x3") == "resident"
    # "split" fits N = 256 on-chip (pre-split D) but takes it only when forced until a GPU has timed it
    assert RL.choose_path(128, 1 << 20, device, "split") == "resident"
    assert RL.choose_path(256, 1 << 20, device, "split") == "rows"
    assert RL.choose_path(256, 1 << 20, device, "tf32x3") == "rows"

    monkeypatch.setenv(RL.RECON_PATH_ENV, "resident")
    assert RL.choose_path(256, 7, device, "ieee") == "resident"
    assert RL.choose_path(RL.N_RESIDENT_MAX + 1, 7, device, "ieee") == "rows"
    assert RL.choose_path(256, 1 << 20, device, "split") == "resident"
    assert RL.choose_path(256, 1 << 20, device, "tf32x3") == "rows"  # its parts would spill
    monkeypatch.setenv(RL.RECON_PATH_ENV, "rows")
    assert RL.choose_path(128, 1 << 20, device, "tf32x3") == "rows"
    monkeypatch.setenv(RL.RECON_PATH_ENV, "fused")
    with pytest.raises(ValueError, match="DRES_TRITON_RECON_PATH must be"):
        RL.choose_path(128, 1 << 20, device)


def test_autotune_keys_are_bucketed_powers_of_two():
    assert [COMMON.bucket(n) for n in (1, 7, 16, 17, 200, 256, 257)] == [16, 16, 16, 32, 256, 256, 512]
    assert COMMON.bucket(3 << 20) == 1 << 20 and COMMON.bucket(5, low=256) == 256
    mix_configs = [SM.configs_for(mode) for mode in COMMON.DOT_MODES]
    rows_configs = [RL.rows_configs(mode) for mode in COMMON.DOT_MODES]
    for configs in mix_configs + rows_configs + [RL._RECON_CONFIGS]:
        assert 1 <= len(configs) <= 4
    # the summation order is fixed by the launcher, never by a config
    for config in sum(mix_configs, []):
        assert "BLOCK_K" not in config.kwargs
    for config in RL._RECON_CONFIGS + sum(rows_configs, []):
        assert set(config.kwargs) == {"BLOCK_K"}  # the row tile only: BLOCK_N and BLOCK_D are the launcher's
    # tensor-core modes: tiles that compile to one MMA family on sm_90 (wgmma: 64+ rows, whole warpgroups;
    # .ci/triton_compile.py checks the PTX)
    for mode in SM.TENSOR_CORE_MODES:
        assert all(c.kwargs["BLOCK_M"] >= 64 and c.num_warps % 4 == 0 for c in SM.configs_for(mode))
        assert all(c.kwargs["BLOCK_K"] >= 64 and c.num_warps % 4 == 0 for c in RL.rows_configs(mode))


# ----------------------------------------------------------------------------------------------------
# "split" dots: W pre-split into parts of the data dtype, once per weight matrix
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_split_weights_parts(dtype):
    """Three parts hold an fp32 matrix exactly: bf16 every entry (3 x 8 bits, fp32's exponent range); fp16
    (3 x 11 bits, exponents down to 2^-24) every entry within 2^-14 of the largest, since the parts are made
    from W times a power of two that puts the largest at 2^14..2^15 (``unscale`` undoes it), and the smaller
    ones to 2^-39 of the largest (unscaled fp16 parts: 2^-25 absolute). Two parts hold each entry to 2^-16
    (bf16) / 2^-22 (fp16)."""
    w = make((37, 29), seed=3) * 0.5 + 1.0
    w[::3, ::2] *= 1e-6  # entries far below fp16's smallest normal (6.1e-5)
    big = w.abs() >= 2.0 ** -14 * w.abs().max()
    three, unscale = COMMON.split_weights(w, dtype, 3)
    assert three.shape == (3, 37, 29) and three.dtype == dtype and unscale.shape == (1,)
    assert torch.log2(unscale).frac().item() == 0.0  # a power of two: exact to multiply by
    err = (three.double().sum(0) * unscale.double() - w.double()).abs()
    assert (err[big] == 0).all() and (err <= 2.0 ** -39 * w.abs().max().item()).all()
    if dtype == torch.bfloat16:
        assert (err == 0).all()
    two, unscale2 = COMMON.split_weights(w, dtype, 2)
    bits = 16 if dtype == torch.bfloat16 else 22
    err = (two.double().sum(0) * unscale2.double() - w.double()).abs()
    assert (err[big] <= 2.0 ** -bits * w.double().abs()[big]).all() and (err > 0).any()  # two parts drop bits


def test_split_parts_kept_only_on_frozen_weights():
    """A matrix marked frozen (dres_fast's weight cache marks every coding matrix it hands out) keeps its parts:
    the same tensors come back, and its transpose reads them through strides. Any other matrix is split per
    call, so a change no version counter sees (``.data``) still shows; inference tensors work too."""
    w = make((37, 29), seed=3)
    setattr(w, COMMON.FROZEN_ATTR, True)
    three, unscale = COMMON.split_weights(w, torch.float16, 3)
    assert COMMON.split_weights(w, torch.float16, 3)[0] is three
    transposed, unscale_t = COMMON.split_weights(w.t(), torch.float16, 3)
    assert transposed._base is three and transposed.shape == (3, 29, 37) and unscale_t is unscale
    assert COMMON.split_weights(w[1:], torch.float16, 3)[0].shape == (3, 36, 29)  # another view: per call
    free = make((37, 29), seed=3)
    first, _ = COMMON.split_weights(free, torch.float16, 3)
    free.data.mul_(-1.0)  # no version bump
    second, _ = COMMON.split_weights(free, torch.float16, 3)
    assert torch.equal(second.float(), -first.float())
    with torch.inference_mode():
        frozen = make((5, 7), seed=4)
        setattr(frozen, COMMON.FROZEN_ATTR, True)
        assert COMMON.split_weights(frozen, torch.bfloat16, 2)[0] is COMMON.split_weights(frozen, torch.bfloat16, 2)[0]


def test_cached_coding_weights_are_frozen_and_inference_mode_runs():
    """The weight cache marks what it hands out; a half-precision DReS forward under inference_mode (whose
    tensors have no version counter) runs on the Triton backend and matches the torch backend."""
    import dres_fast
    encoder, decoder = dres_fast.default_cache.weights(dres_fast.SmoothingSpec(), 12, DEVICE)
    assert getattr(encoder, COMMON.FROZEN_ATTR) and getattr(decoder, COMMON.FROZEN_ATTR)
    y = make((12, 9), torch.float16, seed=8)
    with torch.inference_mode():
        got = K_MOD.reconstruction_loss(y, K_MOD.spline_mix(encoder, y), decoder, "mean", False)[0]
    y64 = y.double()
    r = y64 - decoder.double() @ (encoder.double() @ y64).half().double()
    assert abs(got.item() - (r * r).mean().item()) <= 1e-3 * (r * r).mean().item()


def test_fp16_split_keeps_small_weights(monkeypatch):
    """The loss's fp16 residual with a decoder whose entries span 1 .. 1e-9 (a smoothing spline's far weights
    are tiny) and ``y`` within 1e-2 of ``D y_coded`` (a nearly smooth ``f``): over five draws, both paths stay
    within the accuracy rule (twice torch fp32's error, or 4 ulps, summed over the draws). Unscaled fp16
    parts (entries below 6e-5 rounded to fp16's subnormal spacing, 2^-25 absolute) miss it about 2x."""
    K, N, d = 9, 40, 33
    ours, torch_err = {"rows": 0.0, "resident": 0.0}, 0.0
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        decoder = (torch.randn(K, N, generator=g, dtype=torch.float64) / N ** 0.5
                   * torch.logspace(0, -9, N, dtype=torch.float64)[None, :]).float()
        y_coded = torch.randn(N, d, generator=g).half()
        y = (decoder.double() @ y_coded.double() + 1e-2 * torch.randn(K, d, generator=g, dtype=torch.float64)).half()
        decoder, y_coded, y = decoder.to(DEVICE), y_coded.to(DEVICE), y.to(DEVICE)
        r64 = y.double() - decoder.double() @ y_coded.double()
        exact = (r64 * r64).sum().item()
        r32 = y.float() - decoder @ y_coded.float()
        torch_err += abs((r32.double() ** 2).sum().item() - exact) / exact
        for path in ours:
            force_path(monkeypatch, path)
            loss = K_MOD.reconstruction_loss(y, y_coded, decoder, "sum", True)[0]
            ours[path] += abs(loss.item() - exact) / exact
    for path, err in ours.items():
        assert err <= max(2 * torch_err, 5 * FP32_FLOOR / 2), (path, err / 2.0 ** -24, torch_err / 2.0 ** -24)


def test_split_parts_follow_the_output(monkeypatch):
    """spline_mix with fp16 output reads two parts of W; the loss's rows path (fp32 residual) three of D."""
    calls = []
    real = COMMON.split_weights

    def spy(weights, dtype, parts):
        calls.append((tuple(weights.shape), dtype, parts))
        return real(weights, dtype, parts)
    monkeypatch.setattr(SM, "split_weights", spy)
    monkeypatch.setattr(RL, "split_weights", spy)
    weights, x = make_decoder(17, 23), make((23, 5), torch.float16, seed=4)
    out = K_MOD.spline_mix(weights, x)
    torch.testing.assert_close(out.double(), weights.double() @ x.double(), rtol=2.0 ** -10, atol=2.0 ** -24)
    force_path(monkeypatch, "rows")
    K_MOD.reconstruction_loss(make((17, 5), torch.float16, seed=5), x, weights, "sum", True)
    assert calls == [((17, 23), torch.float16, 2), ((17, 23), torch.float16, 3)]


# ----------------------------------------------------------------------------------------------------
# spline_mix at small d: the batch rows are split over programs
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,K,d,noncontiguous", [(3, 2, 1, False), (37, 41, 7, False), (70, 33, 13, True),
                                                 (100, 64, 10, False), (5, 97, 3, True)])
def test_spline_mix_small_d(M, K, d, noncontiguous, dtype):
    weights = make_decoder(M, K)
    x = make((K, d), dtype, seed=2, noncontiguous=noncontiguous)
    out = K_MOD.spline_mix(weights, x)
    ref = weights.double() @ x.double()
    check(out, weights @ x.float(), ref, dtype, f"spline_mix M={M} K={K} d={d}")
    # backward's layout: the transposed weights as a view
    grad_x = K_MOD.spline_mix(weights.t(), out.float().to(dtype))
    check(grad_x, weights.t() @ out.float(), weights.double().t() @ out.double(), dtype, "spline_mix W^T")


# ----------------------------------------------------------------------------------------------------
# reconstruction_loss: both paths, every reduction, gradients
# ----------------------------------------------------------------------------------------------------

# primes, below one tile (3 x 5 x 1), several row tiles (70 > 2 x 32), N > N_RESIDENT_MAX, d at the
# path boundary of the interpreter (d = 96: three 32-wide column tiles) and above it
RECON_SHAPES = [(3, 5, 1), (37, 41, 7), (70, 23, 13), (17, 300, 5), (29, 31, 96), (41, 19, 131)]


@pytest.mark.parametrize("path", ["rows", "resident"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("K,N,d", RECON_SHAPES)
def test_reconstruction_paths_fp32(K, N, d, reduction, path, monkeypatch):
    if path == "resident" and N > RL.N_RESIDENT_MAX:
        pytest.skip("N > N_RESIDENT_MAX always takes the rows path")
    force_path(monkeypatch, path)
    decoder = make_decoder(K, N)
    y, y_coded = make((K, d), seed=3), make((N, d), seed=4, noncontiguous=(d % 2 == 1))
    loss, grad_y, grad_yc = K_MOD.reconstruction_loss(y, y_coded, decoder, reduction, True)
    ref, torch32 = reference(y, y_coded, decoder, reduction)
    check(loss, torch32[0], ref[0], torch.float32, f"{path} loss")
    check(grad_y, torch32[1], ref[1], torch.float32, f"{path} grad_y")
    if reduction == "none":
        assert grad_yc.numel() == 0
    else:
        check(grad_yc, torch32[2], ref[2], torch.float32, f"{path} grad_y_coded")
    # without gradients: the same loss bits, no gradient tensors
    loss_only, gy, gyc = K_MOD.reconstruction_loss(y, y_coded, decoder, reduction, False)
    assert torch.equal(loss_only, loss) and gy.numel() == 0 and gyc.numel() == 0


@pytest.mark.parametrize("path", ["rows", "resident"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("K,N,d", [(37, 41, 7), (20, 9, 70)])
def test_reconstruction_paths_half(K, N, d, dtype, path, monkeypatch):
    if dtype == torch.bfloat16 and K_MOD.INTERPRET:
        pytest.skip("the Triton interpreter has no bfloat16")
    force_path(monkeypatch, path)
    decoder = make_decoder(K, N)
    y, y_coded = make((K, d), dtype, seed=5), make((N, d), dtype, seed=6)
    loss, grad_y, grad_yc = K_MOD.reconstruction_loss(y, y_coded, decoder, "sum", True)
    ref, torch32 = reference(y, y_coded, decoder, "sum")
    assert grad_y.dtype == dtype and grad_yc.dtype == dtype
    torch.testing.assert_close(loss.double(), ref[0], rtol=1e-5, atol=0)
    check(grad_y, None, ref[1], dtype, f"{path} grad_y")
    check(grad_yc, None, ref[2], dtype, f"{path} grad_y_coded")


@pytest.mark.parametrize("K,N,d", [(37, 41, 7), (17, 300, 5), (41, 19, 131)])
def test_reconstruction_paths_agree_and_repeat_bitwise(K, N, d, monkeypatch):
    decoder = make_decoder(K, N)
    y, y_coded = make((K, d), seed=7), make((N, d), seed=8)
    first = K_MOD.reconstruction_loss(y, y_coded, decoder, "mean", True)
    again = K_MOD.reconstruction_loss(y, y_coded, decoder, "mean", True)
    for a, b in zip(first, again):
        assert torch.equal(a, b)  # no atomics: the same inputs give the same bits
    if N <= RL.N_RESIDENT_MAX:
        other = "resident" if RL.choose_path(N, d, y.device) == "rows" else "rows"
        force_path(monkeypatch, other)
        for a, b in zip(first, K_MOD.reconstruction_loss(y, y_coded, decoder, "mean", True)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7 * b.abs().max().item())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("K,N,d", [(37, 41, 7), (23, 300, 3), (31, 17, 131)])
def test_non_unit_incoming_gradient_through_ops(K, N, d, reduction):
    ops = pytest.importorskip("dres_fast.ops")
    decoder = make_decoder(K, N)
    y, y_coded = make((K, d), seed=9), make((N, d), seed=10)
    grad = (torch.linspace(-1.0, 2.0, K, device=DEVICE) if reduction == "none"
            else torch.tensor(0.37, device=DEVICE))
    results = {}
    for backend in ("triton", "torch"):
        ly, lyc = y.clone().requires_grad_(), y_coded.clone().requires_grad_()
        loss = ops.reconstruction_loss(ly, lyc, decoder, reduction, backend=backend)
        loss.backward(grad)
        results[backend] = (loss.detach(), ly.grad, lyc.grad)
    y64, yc64 = y.double().requires_grad_(), y_coded.double().requires_grad_()
    r = y64 - decoder.double() @ yc64
    per_sample = (r * r).sum(dim=1)
    ref_loss = {"mean": per_sample.sum() / r.numel(), "sum": per_sample.sum(), "none": per_sample}[reduction]
    ref_loss.backward(grad.double())
    for got, torch_got, ref, what in zip(results["triton"], results["torch"], (ref_loss, y64.grad, yc64.grad),
                                         ("loss", "grad_y", "grad_y_coded")):
        check(got, torch_got, ref.detach(), torch.float32, f"ops {reduction} {what}")


# ----------------------------------------------------------------------------------------------------
# GPU only: every config of every path gives the same bits (configs never change a summation order)
# ----------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(K_MOD.INTERPRET, reason="configs apply to compiled kernels only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_config_gives_the_same_bits(dtype, monkeypatch):
    monkeypatch.setenv("DRES_TRITON_AUTOTUNE", "0")
    weights = make_decoder(256, 256)
    x = make((256, 3000), dtype, seed=11)
    mode = COMMON.dot_mode(dtype)
    outs = []
    for config in SM.configs_for(mode):
        monkeypatch.setattr(SM, "FORCED_CONFIG", COMMON.config_dict(config))
        outs.append(K_MOD.spline_mix(weights, x))
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    y, y_coded = make((256, 40000), dtype, seed=12), make((256, 40000), dtype, seed=13)
    for path, name, configs in (("resident", "FORCED_RESIDENT_CONFIG", RL._RECON_CONFIGS),
                                ("rows", "FORCED_ROWS_CONFIG", RL.rows_configs(mode))):
        force_path(monkeypatch, path)
        results = []
        for config in configs:
            monkeypatch.setattr(RL, name, COMMON.config_dict(config))
            results.append(K_MOD.reconstruction_loss(y, y_coded, weights, "mean", True))
        for other in results[1:]:
            assert all(torch.equal(a, b) for a, b in zip(results[0], other)), path
        ref, torch32 = reference(y, y_coded, weights, "mean")
        if dtype == torch.float32:
            for got, t32, r, what in zip(results[0], torch32, ref, ("loss", "grad_y", "grad_y_coded")):
                check(got, t32, r, dtype, f"{path} {what}")


# ----------------------------------------------------------------------------------------------------
# .ci/compile_cuda.sh fails on register spills (ptxas -v)
# ----------------------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_compile_script_reports_spills(tmp_path):
    # at most 32 registers per thread (1024 threads, 2 blocks per SM) while 96 values are live at once
    (tmp_path / "spilling.cu").write_text(r"""
__global__ void __launch_bounds__(1024, 2) spilling(const float* in, float* out, int n) {
  float v[96];
#pragma unroll
  for (int i = 0; i < 96; ++i) v[i] = in[i * n + threadIdx.x];
  float s = 0.0f;
#pragma unroll
  for (int i = 0; i < 96; ++i) s += v[i];
#pragma unroll
  for (int i = 0; i < 96; ++i) out[i * n + threadIdx.x] = v[i] * s;
}
""")
    result = subprocess.run(["bash", str(ROOT / ".ci" / "compile_cuda.sh")], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "CUDA_ARCHS": "90", "CSRC_DIR": str(tmp_path)}, timeout=300)
    assert result.returncode != 0, result.stdout
    assert result.stdout.startswith("SPILL") and "spill stores" in result.stdout, result.stdout


# ----------------------------------------------------------------------------------------------------
# .ci/triton_compile.py fails when one launch's configs compile to different MMA families
# ----------------------------------------------------------------------------------------------------

_FAMILY_CHECK = r"""
import importlib.util, sys, triton
from triton.backends.compiler import GPUTarget
spec = importlib.util.spec_from_file_location("triton_compile", sys.argv[1])
tc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tc)
assert tc.mma_family("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16") == "wgmma"
assert tc.mma_family("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32") == "mma"
assert tc.mma_family("fma.rn.f32") == "fma"
name, fn, args, meta, _, _ = next(v for v in tc.VARIANTS if v[0].startswith("spline_mix bf16 split cfg0"))
families = {}


def add(config):
    meta_ = dict(meta, **config.kwargs)
    sig, consts, attrs = tc.signature_for(fn, args, meta_)
    compiled = triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
    by_family = families.setdefault((90, "spline_mix bf16 split"), {})
    by_family.setdefault(tc.mma_family(compiled.asm["ptx"]), []).append(tc.config_label(config))


for config in tc.SM.configs_for("split"):  # the shipped configs: one family
    add(config)
assert tc.mixed_families(families) == [], families
add(triton.Config({"BLOCK_M": 16, "BLOCK_D": 32}, num_warps=4, num_stages=2))  # the old small-d tile
print("\n".join(tc.mixed_families(families)))
"""


@pytest.mark.slow
def test_compile_script_flags_mixed_mma_families():
    """The shipped tensor-core configs of spline_mix all compile to wgmma on sm_90 (no mixed-family report);
    adding the old 16 x 32 tile, which compiles to mma.sync, makes the script report the launch."""
    script = ROOT / ".ci" / "triton_compile.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _FAMILY_CHECK, str(script)], capture_output=True, text=True,
                         timeout=600, env={**env, "TRITON_DEFAULT_FP_FUSION": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "sm_90 spline_mix bf16 split: mma in [M16 D32 w4 s2]; wgmma in" in run.stdout, run.stdout
