"""Options beyond the paper: lazy DReS (``every``), a canonical batch order (``order``) and the
reconstructed anchor (``anchor``), on ``dres_loss``, ``DReSLoss`` and ``SubmoduleDReS``.

References are explicit float64 computations with the spline weights of tests/reference.py (scipy),
not other library paths."""

import pytest
import torch
from torch import nn

from dres_fast import DReSLoss, SubmoduleDReS, dres_loss
from dres_fast.functional import principal_order
from reference import backend_device, backend_params, dres_weights64

torch_dynamo = pytest.importorskip("torch._dynamo")

MODES = ("separate", "concat")


def _weights(K, N, dtype=torch.float64):
    """The default encoder and decoder (0.75 * knots degrees of freedom) from tests/reference.py."""
    encoder, decoder = dres_weights64(K, N)
    return encoder.to(dtype), decoder.to(dtype)


def _mlp(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


class Counting(nn.Module):
    """Wraps a module and counts its calls and the samples it sees."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls, self.samples = inner, 0, 0

    def forward(self, x):
        self.calls += 1
        self.samples += x.shape[0]
        return self.inner(x)


def _explicit(fn, x, N, order, anchor, reduction="mean"):
    """Float64 DReS loss straight from the definitions (sorting by an explicit principal axis)."""
    encoder, decoder = _weights(x.shape[0], N, x.dtype)
    if order == "principal":
        flat = x.reshape(len(x), -1)
        centred = flat - flat.mean(0)
        direction = torch.linalg.svd(centred, full_matrices=False).Vh[0]
        direction = direction * direction[direction.abs().argmax()].sign()
        x = x[torch.argsort(centred @ direction)]
    x_coded = torch.einsum("nk,k...->n...", encoder, x)
    y_hat = torch.einsum("kn,n...->k...", decoder, fn(x_coded))
    reference = fn(x) if anchor == "observed" else fn(torch.einsum("kn,n...->k...", decoder, x_coded))
    per_sample = (reference - y_hat).reshape(len(x), -1).square().sum(1)
    if reduction == "mean":
        return per_sample.sum() / (reference.numel())
    return per_sample.sum() if reduction == "sum" else per_sample


def _elongated_batch(K=12, d=5, seed=0, dtype=torch.float64):
    """A batch with a clear leading principal direction (so the sort is well separated)."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.linspace(-2, 2, K, dtype=dtype)[torch.randperm(K, generator=gen)]
    axis = torch.randn(d, generator=gen, dtype=dtype)
    return t[:, None] * axis + 0.1 * torch.randn(K, d, generator=gen, dtype=dtype)


# -- order ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("anchor", ["observed", "reconstructed"])
@pytest.mark.parametrize("N", [12, 7])
def test_principal_order_matches_explicit(anchor, N):
    net = _mlp()
    x = _elongated_batch()
    loss = dres_loss(net, x, num_coded=N, order="principal", anchor=anchor, backend="torch")
    torch.testing.assert_close(loss, _explicit(net, x, N, "principal", anchor), rtol=1e-10, atol=1e-14)


def test_principal_order_sorts_along_the_principal_direction_with_a_fixed_sign():
    x = _elongated_batch(K=10)
    order = principal_order(x)
    flipped = principal_order(-x)  # the sign is fixed by the direction, not the data's orientation
    projection = (x - x.mean(0)) @ torch.linalg.svd(x - x.mean(0)).Vh[0]
    steps = projection[order].diff()
    assert bool((steps > 0).all()) or bool((steps < 0).all())
    assert torch.equal(flipped, order.flip(0))
    assert torch.equal(principal_order(torch.ones(6, 3)), torch.arange(6))  # all equal: order kept


@pytest.mark.parametrize("anchor", ["observed", "reconstructed"])
@pytest.mark.parametrize("batch_dim", [0, 1])
def test_principal_order_is_invariant_to_permutations(anchor, batch_dim):
    net = _mlp()
    x = _elongated_batch(K=16)
    gen = torch.Generator().manual_seed(3)
    perm = torch.randperm(16, generator=gen)
    if batch_dim == 1:  # (T=2, B, C): the net acts on the last axis
        x = torch.stack([x, 0.5 * x])
        loss_fn = lambda z: dres_loss(net, z, order="principal", anchor=anchor, batch_dim=1, reduction="none")  # noqa: E731
        permuted = x[:, perm]
    else:
        loss_fn = lambda z: dres_loss(net, z, order="principal", anchor=anchor, reduction="none")  # noqa: E731
        permuted = x[perm]
    per_sample, per_sample_permuted = loss_fn(x), loss_fn(permuted)
    torch.testing.assert_close(per_sample_permuted, per_sample[perm], rtol=1e-9, atol=1e-15)
    given = dres_loss(net, x, batch_dim=batch_dim, anchor=anchor)
    given_permuted = dres_loss(net, permuted, batch_dim=batch_dim, anchor=anchor)
    assert not torch.allclose(given, given_permuted)  # the paper's order does depend on the order


def test_principal_order_returns_per_sample_losses_and_decoded_in_callers_order():
    net = _mlp()
    x = _elongated_batch()
    loss, decoded = dres_loss(net, x, order="principal", reduction="none", return_decoded=True)
    sort = torch.argsort((x - x.mean(0)) @ torch.linalg.svd(x - x.mean(0)).Vh[0])
    if sort[0] != principal_order(x)[0]:
        sort = sort.flip(0)
    encoder, decoder = _weights(12, 12)
    expected_sorted = decoder @ net(encoder @ x[sort])
    expected = torch.empty_like(expected_sorted)
    expected[sort] = expected_sorted
    torch.testing.assert_close(decoded, expected)
    torch.testing.assert_close(loss, (net(x) - expected).square().sum(1))
    mean = dres_loss(net, x, order="principal")
    torch.testing.assert_close(mean, loss.sum() / (12 * 3))


def test_principal_order_gradcheck():
    x = _elongated_batch(K=6, d=3).requires_grad_(True)
    w = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    for anchor in ("observed", "reconstructed"):
        assert torch.autograd.gradcheck(
            lambda a, b: dres_loss(lambda z: torch.tanh(z @ b.t()), a, order="principal", anchor=anchor, reduction="none"),
            (x, w))


def test_principal_order_and_reconstructed_anchor_compile_aot_eager():
    torch._dynamo.reset()
    net = _mlp(torch.float32)
    step = lambda z: dres_loss(net, z, order="principal", anchor="reconstructed")  # noqa: E731
    compiled = torch.compile(step, backend="aot_eager")
    x = _elongated_batch(K=16, dtype=torch.float32)
    for batch in (x, x.flip(0)):
        net.zero_grad()
        loss = compiled(batch)
        loss.backward()
        grads = [p.grad.clone() for p in net.parameters()]
        net.zero_grad()
        eager = step(batch)
        eager.backward()
        torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-7)
        for grad, p in zip(grads, net.parameters()):
            torch.testing.assert_close(grad, p.grad, rtol=1e-5, atol=1e-7)
    torch._dynamo.reset()


# -- anchor --------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["given", "principal"])
@pytest.mark.parametrize("N", [9, 20])
def test_reconstructed_anchor_is_zero_for_affine_maps(order, N):
    torch.manual_seed(1)
    affine = nn.Linear(6, 4).double()
    x = torch.randn(9, 6, dtype=torch.float64)  # a random batch, not on a line
    assert dres_loss(affine, x, num_coded=N, order=order) > 1e-4  # the paper's anchor is not zero here
    loss = dres_loss(affine, x, num_coded=N, order=order, anchor="reconstructed", reduction="sum")
    assert loss < 1e-12


def test_reconstructed_anchor_matches_explicit_and_ignores_y():
    net = _mlp()
    x = torch.randn(10, 5, dtype=torch.float64)
    counted = Counting(net)
    loss = dres_loss(counted, x, y=torch.zeros(10, 3, dtype=torch.float64), anchor="reconstructed")
    assert counted.calls == 2 and counted.samples == 20  # N coded + K reconstructed, never f(x)
    for reduction in ("mean", "sum", "none"):
        torch.testing.assert_close(dres_loss(net, x, anchor="reconstructed", reduction=reduction),
                                   _explicit(net, x, 10, "given", "reconstructed", reduction))
    torch.testing.assert_close(loss, _explicit(net, x, 10, "given", "reconstructed"))


def test_reconstructed_anchor_gradcheck():
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b: dres_loss(lambda z: torch.tanh(z @ b.t()), a, anchor="reconstructed", num_coded=4), (x, w))


# -- every ---------------------------------------------------------------------------------------
def test_dres_loss_module_every_counts_and_scales():
    net = Counting(_mlp())
    x = torch.randn(8, 5, dtype=torch.float64)
    lazy = DReSLoss(every=3)
    plain = dres_loss(net, x)
    net.calls = 0
    losses = [lazy(net, x, y=torch.zeros(8, 3, dtype=torch.float64) + 0) for _ in range(7)]
    assert net.calls == 3 and lazy.step_count == 7 % 3  # steps 0, 3, 6; nothing runs on the others
    for step, loss in enumerate(losses):
        if step % 3 == 0:
            torch.testing.assert_close(loss, 3 * dres_loss(net, x, y=torch.zeros(8, 3, dtype=torch.float64)))
        else:
            assert loss.shape == () and loss.dtype == torch.float64 and loss.item() == 0.0
    assert plain > 0
    assert DReSLoss(every=2, reduction="none")(net, x).shape == (8,)
    assert DReSLoss(every=2, reduction="none", batch_dim=1)(net, x.unsqueeze(0)).shape == (8,)


def _submodule_setup(dtype=torch.float64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Sequential(nn.Linear(5, 6), nn.Tanh()), nn.Linear(6, 2)).to(dtype)
    counted = Counting(model[2])
    model[2] = counted
    return model, counted


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("attached", [False, True])
def test_submodule_every_counts_scales_and_runs_nothing_extra(mode, attached):
    model, counted = _submodule_setup()
    x = torch.randn(7, 4, dtype=torch.float64)
    reference = SubmoduleDReS(model, "2", mode=mode)
    with reference:
        model(x)
    expected = reference.loss.detach()
    reg = SubmoduleDReS(model, "2", mode=mode, every=4)
    if attached:
        reg.attach()
    losses, samples = [], []
    for step in range(9):
        counted.samples = 0
        if attached:
            model(x)
        else:
            with reg:
                model(x)
        losses.append(reg.loss.detach())
        samples.append(counted.samples)
    if attached:
        with torch.no_grad():
            model(x)  # validation forward: not a step
        reg.detach()
    assert reg.step_count == 9 % 4  # the place of the next step in the cycle
    for step in range(9):
        if step % 4 == 0:
            torch.testing.assert_close(losses[step], 4 * expected)
            assert samples[step] == 14
        else:
            assert losses[step].item() == 0.0 and samples[step] == 7  # the submodule ran on the batch only


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("order", ["given", "principal"])
@pytest.mark.parametrize("anchor", ["observed", "reconstructed"])
def test_submodule_order_and_anchor_match_functional(mode, order, anchor):
    model, counted = _submodule_setup()
    x = _elongated_batch(K=9, d=4)
    reg = SubmoduleDReS(model, "2", mode=mode, order=order, anchor=anchor)
    with reg:
        out = model(x)
    with torch.no_grad():
        plain_out = model(x)
    h = model[1](model[0](x))
    expected = dres_loss(counted.inner, h, order=order, anchor=anchor)
    torch.testing.assert_close(reg.loss, expected)
    torch.testing.assert_close(out, plain_out)  # the real batch flows on unchanged, in its order
    gen = torch.Generator().manual_seed(5)
    perm = torch.randperm(9, generator=gen)
    with reg:
        model(x[perm])
    if order == "principal":
        torch.testing.assert_close(reg.loss, expected)
    reg.loss.backward()
    assert all(p.grad is not None for p in counted.parameters())


@pytest.mark.parametrize("mode", MODES)
def test_submodule_reconstructed_anchor_zero_for_affine_submodule(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    reg = SubmoduleDReS(model, "2", mode=mode, anchor="reconstructed", order="principal", num_coded=11)
    with reg:
        model(torch.randn(8, 4, dtype=torch.float64))
    assert reg.loss.item() < 1e-12


@pytest.mark.parametrize("mode", MODES)
def test_submodule_options_with_mixed_extra_args(mode):
    class Conditioned(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 2)

        def forward(self, x, cond):
            return torch.tanh(self.linear(x) * cond)

    torch.manual_seed(0)
    model = nn.ModuleDict({"f": Conditioned()}).double()
    x = _elongated_batch(K=8, d=3)
    cond = torch.rand(8, 1, dtype=torch.float64) + 0.5
    reg = SubmoduleDReS(model, "f", mode=mode, extra_args="mix", order="principal", anchor="reconstructed")
    with reg:
        model["f"](x, cond)
    sort = principal_order(x)
    encoder, decoder = _weights(8, 8)
    xs, cs = x[sort], cond[sort]
    f = model["f"]
    y_hat = decoder @ f(encoder @ xs, encoder @ cs)
    expected = (f(decoder @ encoder @ xs, decoder @ encoder @ cs) - y_hat).square().mean()
    torch.testing.assert_close(reg.loss, expected)


# -- validation ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, err, match", [
    ({"order": "sorted"}, ValueError, "order must be one of"),
    ({"anchor": "x"}, ValueError, "anchor must be one of"),
    ({"every": 0}, ValueError, "every must be an int >= 1"),
    ({"every": 2.0}, TypeError, "every must be an int"),
    ({"every": True}, TypeError, "every must be an int"),
])
def test_bad_options_name_the_argument(kwargs, err, match):
    model = _mlp()
    with pytest.raises(err, match=match):
        DReSLoss(**kwargs)
    with pytest.raises(err, match=match):
        SubmoduleDReS(model, "0", **kwargs)
    if "every" not in kwargs:
        with pytest.raises(err, match=match):
            dres_loss(model, torch.randn(5, 5, dtype=torch.float64), **kwargs)
    with pytest.raises(ValueError, match="return_decoded"):
        DReSLoss(every=2, return_decoded=True)


@pytest.mark.parametrize("mode", MODES)
def test_submodule_every_on_a_compiled_model_compiles_twice_at_most(mode):
    """After attach(), the step counter is counted outside the graph (one graph break at the model's
    forward): one graph for coded steps, one for plain ones, whatever the place in the cycle."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    reg = SubmoduleDReS(model, "2", mode=mode, every=4, order="principal").attach()
    compiled = torch.compile(model, backend="aot_eager")
    coded = []
    for _ in range(9):
        out = compiled(torch.randn(32, 5))
        (out.sum() + reg.loss).backward()
        coded.append(reg.loss.item() != 0)
    reg.detach()
    assert coded == [step % 4 == 0 for step in range(9)] and reg.step_count == 9 % 4
    assert counters["stats"]["unique_graphs"] <= 2
    torch._dynamo.reset()


def test_submodule_every_with_blocks_around_a_fullgraph_model():
    """With fullgraph=True, count the steps outside the compiled model (a `with reg:` block each step): three
    graphs over twelve steps and four validation forwards (coded step, plain step, eval without hooks)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    reg = SubmoduleDReS(model, "2", every=4)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    coded = []
    for step in range(12):
        with reg:
            out = compiled(torch.randn(32, 5))
        (out.sum() + reg.loss).backward()
        coded.append(reg.loss.item() != 0)
        if step % 3 == 0:
            with torch.no_grad():
                model.eval(), compiled(torch.randn(7, 5)), model.train()
    assert coded == [step % 4 == 0 for step in range(12)]
    assert counters["stats"]["unique_graphs"] <= 3
    torch._dynamo.reset()


@pytest.mark.slow
def test_dres_loss_every_in_a_compiled_step_compiles_once_per_place_in_the_cycle():
    """DReSLoss(every=4) inside a step compiled with fullgraph=True: 4 graphs for 12 steps, the coded
    branch on steps 0, 4, 8 with the loss times 4 (a counter that only grew recompiled at every step and
    hit the recompile limit on the 9th)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    net, lazy = _mlp().float(), DReSLoss(every=4)
    step = torch.compile(lambda x: lazy(net, x), backend="eager", fullgraph=True)
    x = torch.randn(9, 5)
    losses = [step(x) for _ in range(12)]
    expected = 4 * dres_loss(net, x)
    for i, loss in enumerate(losses):
        torch.testing.assert_close(loss, expected if i % 4 == 0 else torch.zeros(()), rtol=1e-5, atol=1e-7)
    assert counters["stats"]["unique_graphs"] == 4
    torch._dynamo.reset()


def test_every_one_counts_nothing():
    """every=1 keeps no counter (a changing int would recompile a compiled step)."""
    net = _mlp()
    x = torch.randn(6, 5, dtype=torch.float64)
    module = DReSLoss()
    module(net, x)
    reg = SubmoduleDReS(net, "2")
    with reg:
        net(x)
    assert module.step_count == 0 and reg.step_count == 0


@pytest.mark.parametrize("backend", backend_params("triton", "cuda"))  # each skipped, with why, where it cannot run
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_options_on_other_backends_match_torch(backend, reduction):
    """Non-contiguous float32 input (a transposed view), principal order, reconstructed anchor,
    decoded output, non-unit incoming gradient: every backend against the torch backend (Triton on
    CPU through its interpreter, tests/conftest.py)."""
    device = backend_device(backend)
    net = _mlp(torch.float32).to(device)
    x = _elongated_batch(K=11, d=5, dtype=torch.float32).t().contiguous().t().to(device)  # (11, 5), strides (1, 11)
    assert not x.is_contiguous()
    results = {}
    for name in ("torch", backend):
        net.zero_grad()
        loss, decoded = dres_loss(net, x, order="principal", anchor="reconstructed", reduction=reduction,
                                  return_decoded=True, backend=name)
        weight = torch.linspace(0.5, 2.0, loss.numel(), device=device).reshape(loss.shape)
        ((weight * loss).sum() + 0.3 * decoded.square().sum()).backward()
        results[name] = (loss.detach(), decoded.detach(), [p.grad.clone() for p in net.parameters()])
    for got, want in zip(results[backend][:2] + tuple(results[backend][2]), results["torch"][:2] + tuple(results["torch"][2])):
        torch.testing.assert_close(got, want, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("anchor", ["observed", "reconstructed"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_principal_order_low_precision_matches_float32(dtype, anchor):
    """A float16 / bfloat16 batch gets the same principal order as the same values in float32 (the
    order is computed in float32), and the loss and ``y_hat`` match the float32 run on those values:
    ``y_hat`` (|values| <= 1, tanh) within 2 eps of the dtype, each sample's residual norm
    ``sqrt(loss_k)`` within 2 eps (measured: under 0.6 eps), the loss reported in float32. A batch
    placed in its given order instead, or sorted along another direction, is off by more than 20 eps
    (checked below), as is a low-precision path that loses accuracy beyond its rounding."""
    x = _elongated_batch(K=9, d=4, dtype=torch.float32).to(dtype)
    assert torch.equal(principal_order(x), principal_order(x.float()))
    kwargs = dict(order="principal", anchor=anchor, backend="torch", reduction="none", return_decoded=True)
    loss, y_hat = dres_loss(torch.tanh, x, **kwargs)
    loss32, y_hat32 = dres_loss(torch.tanh, x.float(), **kwargs)
    assert loss.dtype == torch.float32 and y_hat.dtype == dtype
    tol = 2 * torch.finfo(dtype).eps
    torch.testing.assert_close(y_hat.float(), y_hat32, rtol=0, atol=tol)
    torch.testing.assert_close(loss.sqrt(), loss32.sqrt(), rtol=0, atol=tol)
    mean = dres_loss(torch.tanh, x, order="principal", anchor=anchor, backend="torch")
    assert mean.dtype == torch.float32
    torch.testing.assert_close(mean, loss.sum() / y_hat.numel(), rtol=1e-6, atol=0)
    # the teeth: the given order (what a lost sort would compute) is far outside the tolerance
    given_loss, given_y_hat = dres_loss(torch.tanh, x.float(), **dict(kwargs, order="given"))
    assert (given_y_hat - y_hat32).abs().max() > 10 * tol
    assert (given_loss.sqrt() - loss32.sqrt()).abs().max() > 10 * tol
