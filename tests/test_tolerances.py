"""The half-precision bounds of tests/half_bounds.py (re-exported by reference.py) can fail.

Each helper is fed a correctly rounded result (it must pass) and perturbed ones (it must raise): one
element 2 ulps off, the result passed through a coarser dtype, rounding toward zero, subnormals
flushed to zero. And the case the bounds exist for: an fp16 "mean" gradient whose values ``c r`` are a
few subnormal spacings passes the derived bounds but not the fp32-habit ``rel_err < 2^-10`` it replaced.
"""

import pytest
import torch
import reference as ref

HALVES = [torch.float16, torch.bfloat16]


def exact_values(n=512, seed=0):
    """float64 values of random sign spread over 1e-9 .. 1e2: subnormal in fp16 at the low end."""
    g = torch.Generator().manual_seed(seed)
    exponents = 11 * torch.rand(n, generator=g, dtype=torch.float64) - 9
    return torch.randn(n, generator=g, dtype=torch.float64) * 10.0 ** exponents


def ulps_away(t: torch.Tensor, i: int, k: int) -> torch.Tensor:
    """``t`` with element ``i`` moved ``k`` ulps away from zero (its bit pattern plus ``k``)."""
    out = t.clone()
    out.view(torch.int16)[i] += k
    return out


def test_units_come_from_finfo():
    assert ref.half_units(torch.float16) == (2.0 ** -11, 2.0 ** -24)
    assert ref.half_units(torch.bfloat16) == (2.0 ** -8, 2.0 ** -133)


@pytest.mark.parametrize("dtype", HALVES)
def test_elementwise_bound_fails_two_ulps_off(dtype):
    """A correct rounding passes (with the fp32 slack of a one-term computation, ``M = |x|``); any single
    element 2 ulps off raises, whether normal or subnormal: 2 ulps minus the half ulp of the rounding is
    more than ``u|x| + s/2 + e`` (fp16: the low values are subnormal)."""
    x = exact_values()
    got = x.to(dtype)
    ref.assert_half_elementwise(got, x, x.abs(), "correct")
    for i in range(len(x)):
        with pytest.raises(AssertionError, match="1 of 512"):
            ref.assert_half_elementwise(ulps_away(got, i, 2), x, x.abs(), f"element {i}")


@pytest.mark.parametrize("dtype,coarser", [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.float8_e4m3fn)])
def test_both_bounds_fail_a_coarser_rounding(dtype, coarser):
    """The result rounded through a coarser dtype on its way (a kernel computing in it) fails both."""
    x = exact_values().clamp(-400, 400)  # float8_e4m3fn's largest is 448
    bad = x.to(coarser).to(dtype)
    ref.assert_half_elementwise(x.to(dtype), x, x.abs(), "correct")
    ref.assert_half_normwise(x.to(dtype), x, x.abs(), "correct")
    with pytest.raises(AssertionError):
        ref.assert_half_elementwise(bad, x, x.abs(), "coarser")
    with pytest.raises(AssertionError):
        ref.assert_half_normwise(bad, x, x.abs(), "coarser")


def test_bf16_gets_its_own_subnormal_spacing():
    """bf16 values around 1e-7 (normal in bf16) 2 ulps off: within the old ``rtol 2^-7, atol 2^-24``
    (fp16's spacing), beyond the derived ``u|x| + 2^-134``."""
    x = 1e-7 * (1 + torch.rand(64, dtype=torch.float64))
    bad = ulps_away(x.to(torch.bfloat16), 5, 2)
    assert torch.allclose(bad.double(), x, rtol=2.0 ** -7, atol=2.0 ** -24)
    with pytest.raises(AssertionError, match="1 of 64"):
        ref.assert_half_elementwise(bad, x, x.abs())


def subnormal_mean_case(backend):
    """fp16 "mean" at K = 16, d = 1024 with y, y_coded scaled so that ``c r`` (``c = 2 / (K d)``) is about
    2e-7, 3 to 4 fp16 subnormal spacings, as at 256 x 65537 with unit data: the unit-gradient
    ``(grad_y, grad_y_coded)``, the float64 references and magnitudes."""
    device = ref.backend_device(backend)
    K, N, d = 16, 9, 1024
    decoder = ref.mixing_matrix(K, N, device=device).float()
    y = (1.2e-3 * ref.randn((K, d), torch.float64, seed=40)).to(device, torch.float16)
    y_coded = (1.2e-3 * ref.randn((N, d), torch.float64, seed=41)).to(device, torch.float16)
    _, grad_y, grad_yc = ref.backend_module(backend).reconstruction_loss(y, y_coded, decoder, "mean", True)
    _, ref_gy, ref_gyc = ref.reconstruction64(y, y_coded, decoder, "mean")
    m_gy, m_gyc = ref.reconstruction_magnitudes(y, y_coded, decoder, "mean")
    assert grad_y.dtype == torch.float16 and ref_gy.abs().max() < 2.0 ** -14  # all below fp16's normal range
    return (grad_y, grad_yc), (ref_gy, ref_gyc), (m_gy, m_gyc)


@pytest.mark.parametrize("backend", ref.backend_params("torch", "triton"))
def test_subnormal_mean_gradients_meet_the_derived_bound_not_the_old_one(backend):
    """Rounding to a spacing of 2^-24 leaves ~0.29 * 2^-24 rms per element, a relative error near 0.1
    here: the old ``rel_err < HALF_RTOL = 2^-10`` fails a correct result. The derived norm-wise bound
    ``u||x|| + (s/2) sqrt(n) + ||e||`` and the element-wise one hold."""
    got, exact, magnitude = subnormal_mean_case(backend)
    for g, x, m, what in zip(got, exact, magnitude, ("grad_y", "grad_y_coded")):
        assert ref.rel_err(g, x) > 2.0 ** -10, what  # the check this replaced
        ref.assert_half_normwise(g, x, m, what)
        ref.assert_half_elementwise(g, x, m, what)


def test_subnormal_mean_bound_fails_real_bugs():
    """At the same all-subnormal gradients: rounding toward zero (a truncating conversion; its error
    ~0.58 s rms against the bound's ~0.50 s) and flushing subnormals to zero break the norm-wise bound.
    What no bound can see there: a relative error of a few percent, below the spacing's own."""
    _, exact, magnitude = subnormal_mean_case("torch")
    x, m = exact[0], magnitude[0]
    nearest = x.to(torch.float16)
    bits = nearest.view(torch.int16)
    truncated = torch.where(nearest.double().abs() > x.abs(), bits - 1, bits).view(torch.float16)
    assert (truncated.double().abs() <= x.abs()).all() and ((truncated.double() - x).abs() < 2.0 ** -24).all()
    ref.assert_half_normwise(nearest, x, m, "round to nearest")
    for bad, what in ((truncated, "round toward zero"), (torch.zeros_like(nearest), "flush to zero")):
        with pytest.raises(AssertionError, match=what):
            ref.assert_half_normwise(bad, x, m, what)


def test_norm_bound_is_the_elementwise_bound_summed():
    """``half_norm_bound`` is the 2-norm of ``half_bound`` at most (triangle inequality), and not much
    less for a vector of equal elements: the two forms state one derivation."""
    x = exact_values()
    for dtype in HALVES:
        per_element = ref.half_bound(x, dtype, x.abs())
        assert ref.half_norm_bound(x, dtype, x.abs()) >= per_element.norm().item() * (1 - 1e-12)
        ones = torch.full((100,), 0.3, dtype=torch.float64)
        assert ref.half_norm_bound(ones, dtype) == pytest.approx(ref.half_bound(ones, dtype).norm().item(), rel=1e-12)

