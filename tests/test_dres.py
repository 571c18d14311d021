"""dres_loss, DReSLoss, SubmoduleDReS and the weight cache against explicit float64 math (points and
spline weights from the independent references of tests/reference.py, not from the library)."""

import math
import threading
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import dres_fast
from reference import dres_weights64, points64
from dres_fast.cache import WeightCache
from dres_fast.smoothing import SmoothingSpec
from dres_fast.splines import degrees_of_freedom, float64_weights, lam_for_dof


def smooth_net(d_in=5, d_out=4):
    return nn.Sequential(nn.Linear(d_in, 16), nn.Tanh(), nn.Linear(16, d_out)).double()


def explicit_dres(fn, x, N, lam_enc=None, lam_dec=None, reduction="mean", **smoothing):
    """Float64 DReS loss and ``y_hat`` from the definition, with the weights of tests/reference.py
    (without ``lam_*`` / ``dof_*``: the documented default, 0.75 * knots degrees of freedom)."""
    K = x.shape[0]
    E, D = dres_weights64(K, N, lam_enc=lam_enc, lam_dec=lam_dec, **smoothing)
    y = fn(x)
    y_hat = torch.einsum("kn,n...->k...", D, fn(torch.einsum("nk,k...->n...", E, x)))
    per = ((y - y_hat) ** 2).reshape(K, -1).sum(1)
    return {"none": per, "sum": per.sum(), "mean": per.sum() / y.numel()}[reduction], y_hat


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("K, N", [(3, 3), (8, 4), (8, 16), (13, 13)])
def test_matches_explicit_float64(K, N, reduction):
    net = smooth_net()
    x = torch.randn(K, 5, dtype=torch.float64)
    loss, y_hat = dres_fast.dres_loss(net, x, num_coded=N, lam_enc=1e-3, lam_dec=1e-4, reduction=reduction, return_decoded=True)
    ref, ref_hat = explicit_dres(net, x, N, 1e-3, 1e-4, reduction)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(y_hat, ref_hat, rtol=1e-10, atol=1e-14)

def _rank_changing_case(case):
    """``(x, fn, x_axis, y_axis)``: a batch of K = 6 samples on axis ``x_axis`` of ``x`` and an ``fn``
    whose output has one rank more or less, with the samples on axis ``y_axis``; both axes are what
    ``batch_dim=-2`` names in the tensor at hand. The other sizes make a y_hat with its samples on the
    wrong axis the same shape as the right one (only its values differ)."""
    gen = torch.Generator().manual_seed(4)
    if case == "rank_3_to_2":  # (T, K, C) -> (K, C'): a per-sample pooling over T; K on axis 1 of x, 0 of y
        w = torch.randn(3, 6, generator=gen, dtype=torch.float64)
        x = torch.randn(4, 6, 3, generator=gen, dtype=torch.float64)
        return x, lambda z: torch.tanh(z @ w).square().mean(0), 1, 0
    # (K, C) -> (T, K, C'): T = K views of each sample; K on axis 0 of x, 1 of y
    w = torch.randn(6, 3, 5, generator=gen, dtype=torch.float64)
    x = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    return x, lambda z: torch.tanh(torch.einsum("kc,tcd->tkd", z, w)).square(), 0, 1


@pytest.mark.parametrize("case", ["rank_3_to_2", "rank_2_to_3"])
def test_return_decoded_samples_on_the_output_axis(case):
    """``return_decoded=True`` with ``batch_dim=-2`` and an ``fn`` that changes the rank: the samples
    sit on axis 1 of ``x`` but axis 0 of ``fn(x)``, or the other way round. ``y_hat`` is a
    reconstruction of ``fn(x)``, so it must have ``fn(x)``'s layout, the samples on the axis that
    ``batch_dim`` resolves to in the *output*: ``y_hat = D fn(E x)`` mixed along that axis, with E, D
    built by hand (tests/reference.py) with the documented default smoothing (0.75 * knots degrees of
    freedom). Catches ``y_hat`` moved back to the *input*'s batch axis (checked below to be a different
    tensor of the same shape) and a loss that mixes the wrong axis."""
    x, fn, x_axis, y_axis = _rank_changing_case(case)
    K, N = 6, 9
    loss, y_hat = dres_fast.dres_loss(fn, x, num_coded=N, batch_dim=-2, reduction="none", return_decoded=True)
    E, D = dres_weights64(K, N)
    x_coded = torch.tensordot(E, x, dims=([1], [x_axis])).movedim(0, x_axis)  # E mixes the samples of x
    y_hat_first = torch.tensordot(D, fn(x_coded), dims=([1], [y_axis]))  # (K, ...) samples first
    expected = y_hat_first.movedim(0, y_axis)
    assert y_hat.shape == fn(x).shape == expected.shape
    torch.testing.assert_close(y_hat, expected, rtol=1e-10, atol=1e-13)
    residual = (fn(x).movedim(y_axis, 0) - y_hat_first).reshape(K, -1)
    torch.testing.assert_close(loss, residual.square().sum(1), rtol=1e-10, atol=1e-13)
    # the mutant's y_hat: samples-first data moved to the input's axis instead: same shape, other values
    on_input_axis = y_hat_first.movedim(0, x_axis)
    assert x_axis != y_axis and on_input_axis.shape == expected.shape
    assert not torch.allclose(on_input_axis, expected, rtol=1e-3, atol=1e-3)


def test_affine_function_on_affine_batch_gives_zero():
    K = 9
    alpha = torch.from_numpy(points64(K))
    x = alpha[:, None, None] * torch.randn(1, 3, 2, dtype=torch.float64) + torch.randn(1, 3, 2, dtype=torch.float64)
    affine = nn.Linear(2, 5).double()
    for kw in ({}, {"lam_enc": 0.0, "lam_dec": 0.0}, {"dof_enc": 2.5, "dof_dec": 3.0}, {"num_coded": 20}):
        assert dres_fast.dres_loss(affine, x, **kw).item() < 1e-24
    nonlinear = nn.Sequential(affine, nn.Softplus()).double()
    assert dres_fast.dres_loss(nonlinear, x).item() > 1e-8


def test_gradcheck_dres_loss():
    net = smooth_net(3, 2)
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: dres_fast.dres_loss(net, a, num_coded=5, lam_enc=1e-3, lam_dec=0.0), (x,))
    assert torch.autograd.gradcheck(lambda a: dres_fast.dres_loss(net, a, reduction="none", dof_enc=4.0), (x,))


def test_gradients_reach_parameters_through_both_branches():
    net = smooth_net()
    x = torch.randn(8, 5, dtype=torch.float64)
    dres_fast.dres_loss(net, x).backward()
    got = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    explicit_dres(net, x, 8)[0].backward()  # the default smoothing
    for a, b in zip(got, [p.grad for p in net.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-14)


def test_reuses_y_and_runs_main_branch_once():
    calls = []
    net = smooth_net()

    def fn(inp):
        calls.append(inp.shape[0])
        return net(inp)

    x = torch.randn(7, 5, dtype=torch.float64)
    y = net(x)
    a = dres_fast.dres_loss(fn, x, y=y, num_coded=5)
    assert calls == [5]
    calls.clear()
    b = dres_fast.dres_loss(fn, x, num_coded=5)
    assert sorted(calls) == [5, 7]
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype):
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh()).to(dtype)
    x = torch.randn(10, 5).to(dtype)
    loss = dres_fast.dres_loss(net, x, num_coded=12)
    assert loss.dtype == (torch.float32)
    ref, _ = explicit_dres(lambda t: net.double()(t), x.double(), 12)
    net.to(dtype)
    tol = {torch.float32: 1e-4, torch.float16: 5e-2, torch.bfloat16: 2e-1}[dtype]
    assert abs(loss.item() - ref.item()) <= tol * ref.item() + 1e-6


def test_dof_and_lam_give_the_same_weights():
    K, N = 16, 24
    lam_e = lam_for_dof(dres_fast.points(K), 7.0)
    lam_d = lam_for_dof(dres_fast.points(N, "lobatto"), 11.0)
    E1, D1 = float64_weights(SmoothingSpec(N, dof_enc=7.0, dof_dec=11.0), K)
    E2, D2 = float64_weights(SmoothingSpec(N, lam_enc=lam_e, lam_dec=lam_d), K)
    torch.testing.assert_close(E1, E2)
    torch.testing.assert_close(D1, D2)
    assert degrees_of_freedom(dres_fast.points(K), lam_e) == pytest.approx(7.0)


def test_explicit_points():
    net = smooth_net()
    x = torch.randn(5, 5, dtype=torch.float64)
    alpha = torch.tensor([-1.0, -0.3, 0.0, 0.4, 1.0])
    beta = torch.linspace(-0.9, 0.9, 6)
    loss = dres_fast.dres_loss(net, x, num_coded=6, alpha=alpha, beta=beta, lam_enc=0.0, lam_dec=0.0)
    E, D = dres_weights64(5, 6, lam_enc=0.0, lam_dec=0.0, alpha=alpha, beta=beta)
    ref = ((net(x) - D @ net(E @ x)) ** 2).mean()
    torch.testing.assert_close(loss, ref)


def test_dres_loss_module_matches_function():
    net = smooth_net()
    x = torch.randn(9, 5, dtype=torch.float64)
    crit = dres_fast.DReSLoss(num_coded=6, dof_enc=5.0, lam_dec=1e-3, reduction="sum")
    torch.testing.assert_close(crit(net, x), dres_fast.dres_loss(net, x, num_coded=6, dof_enc=5.0, lam_dec=1e-3, reduction="sum"))
    assert "num_coded=6" in repr(crit)


def test_user_tensors_not_modified():
    net = smooth_net()
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    before, version = x.detach().clone(), x._version
    dres_fast.dres_loss(net, x).backward()
    assert torch.equal(x.detach(), before) and x._version == version


@settings(max_examples=20, deadline=None)
@given(
    K=st.integers(3, 24),
    ratio=st.sampled_from([0.5, 1.0, 2.0]),
    trailing=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    dof_fraction=st.floats(0.1, 1.0),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    dtype=st.sampled_from([torch.float64, torch.float32]),
)
def test_property_matches_explicit(K, ratio, trailing, dof_fraction, reduction, dtype):
    N = max(3, int(K * ratio))
    x = torch.randn([K] + trailing + [3], dtype=torch.float64)
    net = nn.Sequential(nn.Linear(3, 4), nn.Softplus()).double()
    dof_e = 2 + dof_fraction * (K - 2)
    dof_d = 2 + dof_fraction * (N - 2)
    ref, ref_hat = explicit_dres(net, x, N, reduction=reduction, dof_enc=dof_e, dof_dec=dof_d)
    net_in_dtype = nn.Sequential(nn.Linear(3, 4), nn.Softplus()).to(dtype)
    net_in_dtype.load_state_dict(net.state_dict())
    loss, y_hat = dres_fast.dres_loss(
        net_in_dtype, x.to(dtype), num_coded=N, dof_enc=dof_e, dof_dec=dof_d, reduction=reduction, return_decoded=True
    )
    assert loss.dtype == dtype and y_hat.dtype == dtype
    if dtype == torch.float64:
        torch.testing.assert_close(loss, ref, rtol=1e-9, atol=1e-15)
        torch.testing.assert_close(y_hat, ref_hat, rtol=1e-9, atol=1e-15)
    else:
        # float32: the residual is a small difference of O(1) values, so compare on the outputs' scale
        scale = float(net(x).detach().abs().max())
        torch.testing.assert_close(y_hat.double(), ref_hat, rtol=0, atol=1e-5 * scale)
        ref = ref.detach()
        assert float((loss.detach().double() - ref).abs().max()) <= 1e-4 * float(ref.abs().max()) + 1e-9 * scale**2 * x[0].numel()


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, x, err, match",
    [
        ({}, torch.randn(2, 5), ValueError, "at least 3 samples"),
        ({}, torch.randn(0, 5), ValueError, "at least 3 samples"),
        ({"num_coded": 2}, torch.randn(6, 5), ValueError, "num_coded must be at least 3"),
        ({"num_coded": 4.0}, torch.randn(6, 5), TypeError, "num_coded must be an int"),
        ({"lam_enc": -1.0}, torch.randn(6, 5), ValueError, "lam_enc must be >= 0"),
        ({"lam_dec": float("nan")}, torch.randn(6, 5), ValueError, "lam_dec must be >= 0"),
        ({"dof_enc": 7.0}, torch.randn(6, 5), ValueError, r"dof_enc must be between 2 and the number of its knots \(6\)"),
        ({"dof_dec": 1.0}, torch.randn(6, 5), ValueError, "dof_dec must be between 2"),
        ({"lam_enc": 1.0, "dof_enc": 3.0}, torch.randn(6, 5), ValueError, "give lam_enc or dof_enc, not both"),
        ({"alpha": torch.tensor([0.0, 1.0, 0.5, 2.0, 3.0, 4.0])}, torch.randn(6, 5), ValueError, "alpha must be strictly ascending"),
        ({"alpha": torch.tensor([0.0, 1.0, float("inf"), 2.0, 3.0, 4.0])}, torch.randn(6, 5), ValueError, "alpha must be finite"),
        ({"beta": torch.linspace(0, 1, 4)}, torch.randn(6, 5), ValueError, "beta must have 6 points"),
        ({"alpha": "gauss"}, torch.randn(6, 5), ValueError, "alpha must be one of"),
        ({"reduction": "avg"}, torch.randn(6, 5), ValueError, "reduction must be one of"),
        ({"backend": "tpu"}, torch.randn(6, 5), ValueError, "backend must be one of"),
        ({}, torch.ones(6, 5, dtype=torch.int64), TypeError, "x must be a floating-point tensor"),
    ],
)
def test_bad_input(kwargs, x, err, match):
    with pytest.raises(err, match=match):
        dres_fast.dres_loss(nn.Linear(5, 2), x, **kwargs)


def test_bad_fn_and_outputs():
    x = torch.randn(6, 5)
    with pytest.raises(TypeError, match="fn must be callable"):
        dres_fast.dres_loss("net", x)
    with pytest.raises(ValueError, match="y must have 6 samples"):
        dres_fast.dres_loss(nn.Linear(5, 2), x, y=torch.randn(5, 2))
    with pytest.raises(TypeError, match="fn must return one tensor"):
        dres_fast.dres_loss(lambda t: (t, t), x, y=x)
    with pytest.raises(ValueError, match="y_coded's sample shape"):
        dres_fast.dres_loss(nn.Linear(5, 2), x, y=torch.randn(6, 3))


# -- cache ----------------------------------------------------------------------------------------
def test_cache_is_bounded_and_reuses_tensors():
    cache = WeightCache(maxsize=3)
    spec = SmoothingSpec(5, 0.0, 0.0)
    first = cache.weights(spec, 5)
    assert cache.weights(spec, 5)[0] is first[0]
    for K in range(6, 12):
        cache.get(K, K)
    assert len(cache) == 3
    enc64, _ = cache.get(5, 5, lam_enc=0.0, lam_dec=0.0, dtype=torch.float64)
    enc16, _ = cache.get(5, 5, lam_enc=0.0, lam_dec=0.0, dtype=torch.float16)
    assert enc64.dtype == torch.float64 and enc16.dtype == torch.float32  # half data accumulates in fp32


def test_changing_what_get_returns_changes_no_later_step():
    """``get`` hands out copies: a user who scales the returned encoder in place (to try a variant) must not
    change every later DReS step of that configuration (the shared pair would, silently)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x = torch.randn(8, 4)
    before = dres_fast.dres_loss(net, x)
    encoder, decoder = dres_fast.default_cache.get(8)
    encoder.mul_(0.5), decoder.zero_()
    torch.testing.assert_close(dres_fast.dres_loss(net, x), before, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cached_weights_have_no_subnormals(dtype):
    # far-from-diagonal spline weights underflow; subnormal operands make CPU matmuls 10-35x slower
    E, D = WeightCache().get(256, 256, lam_enc=0.0, lam_dec=0.0, dtype=dtype)
    info = torch.finfo(E.dtype)
    for w in (E, D):
        tiny = (w != 0) & (w.abs() < info.tiny / info.eps)
        assert not tiny.any()
    E64, _ = float64_weights(SmoothingSpec(256, 0.0, 0.0), 256)
    assert (E.double() - E64).abs().max() < (1e-7 if dtype == torch.float32 else 1e-300) * 1.0


def test_cache_thread_safe():
    cache = WeightCache(maxsize=4)
    results, errors = [], []

    def worker(seed):
        try:
            for i in range(30):
                K = 3 + (seed + i) % 7
                E, D = cache.get(K, K + 1, dof_enc=2.5)
                results.append((K, E.shape, D.shape))
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(e == (K + 1, K) and d == (K, K + 1) for K, e, d in results)
    assert len(cache) <= 4


# -- SubmoduleDReS --------------------------------------------------------------------------------
class Model(nn.Module):
    def __init__(self, norm=False):
        super().__init__()
        self.stem = nn.Linear(4, 6)
        self.body = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6) if norm else nn.Identity(), nn.Tanh())
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.body(self.stem(x)))


@pytest.mark.parametrize("mode", ["separate", "concat"])
def test_submodule_matches_functional(mode):
    model = Model().double()
    x = torch.randn(8, 4, dtype=torch.float64)
    reg = dres_fast.SubmoduleDReS(model, "body", mode=mode, num_coded=6, lam_enc=1e-3)
    with reg:
        out = model(x)
    torch.testing.assert_close(out, model(x))  # the model's output is unchanged
    h = model.stem(x)
    torch.testing.assert_close(reg.loss, dres_fast.dres_loss(model.body, h, num_coded=6, lam_enc=1e-3))
    reg.loss.backward()
    assert model.body[0].weight.grad is not None and model.stem.weight.grad is not None
    out2 = model(x)  # hooks removed after the block
    torch.testing.assert_close(out2, out)


def test_submodule_batchnorm_modes_differ_as_documented():
    torch.manual_seed(1)
    x = torch.randn(10, 4, dtype=torch.float64)
    losses, outputs, counts = {}, {}, {}
    for mode in ("separate", "concat"):
        torch.manual_seed(2)
        model = Model(norm=True).double().train()
        reg = dres_fast.SubmoduleDReS(model, "body", mode=mode)
        with reg:
            outputs[mode] = model(x)
        losses[mode] = reg.loss.item()
        counts[mode] = model.body[1].num_batches_tracked.item()
    assert counts == {"separate": 2, "concat": 1}
    # separate: the real branch is exactly the plain model's forward
    torch.manual_seed(2)
    plain = Model(norm=True).double().train()
    torch.testing.assert_close(outputs["separate"], plain(x))
    assert not torch.allclose(outputs["concat"], outputs["separate"])
    assert losses["concat"] != pytest.approx(losses["separate"])


def test_submodule_small_batch_contributes_zero_with_one_warning():
    model = Model().double()
    reg = dres_fast.SubmoduleDReS(model, "body")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            with reg:
                model(torch.randn(2, 4, dtype=torch.float64))
            assert reg.loss.item() == 0.0
    assert sum("too small for DReS" in str(w.message) for w in caught) == 1


def test_submodule_errors():
    model = Model()
    with pytest.raises(ValueError, match="'nope' is not a submodule"):
        dres_fast.SubmoduleDReS(model, "nope")
    with pytest.raises(ValueError, match="mode must be one of"):
        dres_fast.SubmoduleDReS(model, "body", mode="twice")
    reg = dres_fast.SubmoduleDReS(model, "body")
    with reg:
        pass
    with pytest.raises(RuntimeError, match="did not run"):
        reg.loss


def test_submodule_sums_repeated_calls():
    model = Model().double()
    x = torch.randn(6, 4, dtype=torch.float64)
    reg = dres_fast.SubmoduleDReS(model, "body", num_coded=5)
    with reg:
        model(x)
        model(x)
    single = dres_fast.dres_loss(model.body, model.stem(x), num_coded=5)
    torch.testing.assert_close(reg.loss, 2 * single)


@pytest.mark.parametrize("mode", ["separate", "concat"])
def test_submodule_training_flag_decides_the_coded_branch(mode):
    """The coded branch follows the *submodule's* ``training`` flag, not the model's (class docstring:
    "a call with gradients disabled or with the submodule in eval mode runs no coded branch and
    contributes zero"):

    * a frozen block (eval mode, no trainable parameters) inside a model in training mode, as in
      fine-tuning: no coded branch, ``reg.loss`` is exactly zero, the block runs once, on the K real
      samples, and the model's output is the plain one;
    * a block in training mode inside a model whose top level is in eval mode: the coded branch runs
      (the block runs on the coded batch too), and ``reg.loss`` is the DReS loss of the block on its
      actual input, computed by hand with the weights of tests/reference.py.

    Catches a skip that reads ``model.training`` (or any flag but the submodule's)."""
    x = torch.randn(8, 4, dtype=torch.float64)
    model = Model(norm=True).double()
    calls = []  # the batch size of each call of the block, as it runs (after DReS's concatenation)
    model.body.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    reg = dres_fast.SubmoduleDReS(model, "body", mode=mode, num_coded=6)

    model.train()
    model.body.eval().requires_grad_(False)
    with reg:
        out = model(x)
    assert calls == [8]
    assert reg.loss.item() == 0.0
    torch.testing.assert_close(out, model(x))

    model.eval()
    model.body.train().requires_grad_(True)
    calls.clear()
    with reg:
        model(x)
    assert calls == ([8, 6] if mode == "separate" else [14])
    h = model.stem(x)
    E, D = dres_weights64(8, 6)
    if mode == "separate":  # BatchNorm in training mode: each batch with its own statistics
        y, y_coded = model.body(h), model.body(E @ h)
    else:
        both = model.body(torch.cat([h, E @ h]))
        y, y_coded = both[:8], both[8:]
    expected = (y - D @ y_coded).square().mean()
    assert expected.item() > 1e-4
    torch.testing.assert_close(reg.loss, expected, rtol=1e-10, atol=1e-14)


# -- torch.compile --------------------------------------------------------------------------------
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(compiler):
    torch._dynamo.reset()
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh())
    crit = dres_fast.DReSLoss(num_coded=6)

    def step(x):
        y = net(x)
        return crit(net, x, y=y) + y.pow(2).mean()

    compiled = torch.compile(step, fullgraph=True, backend=compiler)
    x = torch.randn(8, 5, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    loss = compiled(x)
    loss.backward()
    ref = step(x2)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(x.grad, x2.grad)


# -- shapes only, and lazy steps ------------------------------------------------------------------
def test_meta_and_fake_tensors_give_shapes():
    """Shape inference and deferred init: meta tensors and fake tensors run through dres_loss and both ops
    (the weights then come from the op whose fake kernel only knows shapes)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    loss = dres_fast.dres_loss(nn.Linear(8, 4, device="meta"), torch.randn(32, 8, device="meta"))
    assert loss.device.type == "meta" and loss.shape == ()
    with FakeTensorMode():
        model, x = nn.Linear(8, 4), torch.randn(32, 8)
        assert dres_fast.dres_loss(model, x, reduction="none", num_coded=20).shape == (32,)
        assert dres_fast.ops.spline_mix(torch.randn(5, 32), x).shape == (5, 8)
        assert dres_fast.ops.reconstruction_loss(x, torch.randn(5, 8), torch.randn(32, 5)).shape == ()


def test_a_skipped_lazy_step_returns_a_zero_that_backward_accepts():
    """every=4: the steps without coded branch return zero; `.backward()` on it must not raise."""
    lazy, model, x = dres_fast.DReSLoss(every=4), nn.Linear(8, 4), torch.randn(32, 8)
    lazy(model, x).backward()
    skipped = lazy(model, x)
    assert skipped.item() == 0.0 and skipped.dtype == torch.float32
    skipped.backward()
    with torch.no_grad():
        assert not lazy(model, x).requires_grad


def test_explicit_points_edited_in_place_are_read_again():
    """dres_loss caches a step per distinct options; a point tensor hashes by identity, so it must not be
    cached: editing it in place changes the loss like passing a new tensor does."""
    x = torch.randn(5, 3, dtype=torch.float64)
    alpha = torch.linspace(-1, 1, 5, dtype=torch.float64)
    dres_fast.dres_loss(torch.tanh, x, alpha=alpha)
    alpha.copy_(torch.tensor([-1.0, -0.9, -0.8, 0.5, 1.0], dtype=torch.float64))
    edited = dres_fast.dres_loss(torch.tanh, x, alpha=alpha)
    torch.testing.assert_close(edited, dres_fast.dres_loss(torch.tanh, x, alpha=alpha.clone()))
