"""Eager calls and traced calls take different roads to the same backend functions.

``dres_fast.ops`` calls a backend through its registered ``torch.library`` op while something traces
(``torch.compile``, ``make_fx``, fake tensors) and through a leaner ``autograd.Function`` otherwise
(``dres_fast.ops.registry.eager_functions``). Both must give the same bits, forward and backward, and
the tracers must see the ops.
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

import reference as ref
from dres_fast import ops
from dres_fast.ops import dispatch


def _inputs(device, dtype, K=7, N=5, d=13):
    gen = torch.Generator().manual_seed(3)
    y = torch.randn(K, d, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    y_coded = torch.randn(N, d, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    decoder = (torch.randn(K, N, generator=gen, dtype=torch.float64) / N).to(device=device,
                                                                            dtype=ops.compute_dtype(dtype))
    return y, y_coded, decoder


def _loss_and_grads(fn, y, y_coded, decoder, reduction, incoming):
    y, y_coded = y.clone().requires_grad_(), y_coded.clone().requires_grad_()
    loss = fn(y, y_coded, decoder, reduction, True)
    loss.backward(incoming)
    return loss.detach(), y.grad, y_coded.grad


@pytest.mark.parametrize("reduction", ref.REDUCTIONS)
@pytest.mark.parametrize("backend", ref.ALL)
def test_eager_functions_and_registered_ops_give_the_same_bits(backend, reduction):
    dtype = torch.float32
    device = ref.backend_device(backend)
    y, y_coded, decoder = _inputs(device, dtype)
    loaded = dispatch.load_backend(backend)
    incoming = (torch.rand(y.shape[0], device=device) + 0.5 if reduction == "none"
                else torch.tensor(1.7, device=device))

    def through_op(*args):
        return loaded.reconstruction_loss(*args)[0]

    eager = _loss_and_grads(loaded.eager_reconstruction_loss, y, y_coded, decoder, reduction, incoming)
    registered = _loss_and_grads(through_op, y, y_coded, decoder, reduction, incoming)
    for a, b in zip(eager, registered):
        assert torch.equal(a, b)

    x = y.clone().requires_grad_()
    out_eager = loaded.eager_spline_mix(decoder.t().contiguous(), x)
    (grad_eager,) = torch.autograd.grad(out_eager, x, torch.ones_like(out_eager) * 0.3)
    out_op = loaded.spline_mix(decoder.t().contiguous(), x)
    (grad_op,) = torch.autograd.grad(out_op, x, torch.ones_like(out_op) * 0.3)
    assert torch.equal(out_eager, out_op) and torch.equal(grad_eager, grad_op)


def test_eager_calls_skip_the_registered_op(monkeypatch):
    # A call from plain eager code must not reach the op: make the op fail and call through dres_fast.ops.
    loaded = dispatch.load_backend("torch")
    y, y_coded, decoder = _inputs("cpu", torch.float32)
    expected = ops.reconstruction_loss(y, y_coded, decoder, backend="torch")

    def fail(*args):
        raise AssertionError("the registered op was called in eager mode")

    monkeypatch.setattr(loaded, "spline_mix", fail)
    monkeypatch.setattr(loaded, "reconstruction_loss", fail)
    assert not dispatch.use_registered_ops()
    assert torch.equal(ops.reconstruction_loss(y, y_coded, decoder, backend="torch"), expected)
    ops.spline_mix(decoder, y_coded, backend="torch")


def test_tracers_see_the_registered_ops():
    y, y_coded, decoder = _inputs("cpu", torch.float32)

    def step(y, y_coded):
        mixed = ops.spline_mix(decoder.t(), y, backend="torch")
        return ops.reconstruction_loss(y, mixed + y_coded, decoder, backend="torch")

    graph = make_fx(step)(y, y_coded)
    targets = {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}
    assert "dres_fast.spline_mix_torch.default" in targets
    assert "dres_fast.reconstruction_loss_torch.default" in targets
    assert torch.equal(graph(y, y_coded), step(y, y_coded))

    with FakeTensorMode():
        assert dispatch.use_registered_ops()
        fake_y = torch.empty(7, 13)
        assert ops.spline_mix(torch.empty(5, 7), fake_y, backend="torch").shape == (5, 13)


@pytest.mark.skipif(ref.backend_skip_reason("triton") is not None, reason=ref.backend_skip_reason("triton") or "")
def test_triton_launches_are_wrapped_only_when_traced():
    from dres_fast.kernels import _common

    plain = torch.empty(3)
    assert not _common.traced((plain, 2, 1.0))
    assert not _common.traced((torch.nn.Parameter(plain),))  # a subclass that runs like a tensor
    with FakeTensorMode() as mode:
        assert _common.traced((torch.empty(3),))
    assert _common.traced((mode.from_tensor(plain),))  # a fake tensor with its mode no longer active


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_func_grad_matches_autograd(reduction):
    # torch.func transforms take the Functions' setup_context form; plain calls the cheaper form
    y, y_coded, decoder = _inputs("cpu", torch.float64)
    weights = decoder.t().contiguous()

    def loss(y):
        value = ops.reconstruction_loss(y, ops.spline_mix(weights, y) + y_coded, decoder, reduction=reduction)
        return value.sum() * 1.3

    through_func = torch.func.grad(loss)(y)
    leaf = y.clone().requires_grad_()
    loss(leaf).backward()
    torch.testing.assert_close(through_func, leaf.grad, rtol=1e-13, atol=1e-15)


def test_eager_functions_pass_gradcheck_and_gradgradcheck():
    loaded = dispatch.load_backend("torch")
    y, y_coded, decoder = _inputs("cpu", torch.float64)
    y, y_coded = y.requires_grad_(), y_coded.requires_grad_()
    for reduction in ("mean", "sum", "none"):
        torch.autograd.gradcheck(
            lambda a, b: loaded.eager_reconstruction_loss(a, b, decoder, reduction, True), (y, y_coded))
    torch.autograd.gradgradcheck(lambda a: loaded.eager_spline_mix(decoder, a), (y_coded,))


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # the custom ops' per-sample vmap fallback
def test_vmap_and_per_sample_gradients_match_a_loop():
    y, y_coded, decoder = _inputs("cpu", torch.float64)
    weights = decoder.t().contiguous()
    stacked = torch.stack([y, 2 * y, y.flip(0)])

    def loss(y):
        return ops.reconstruction_loss(y, ops.spline_mix(weights, y) + y_coded, decoder)

    torch.testing.assert_close(torch.vmap(lambda a: ops.spline_mix(weights, a))(stacked),
                               torch.stack([weights @ a for a in stacked]))
    torch.testing.assert_close(torch.vmap(loss)(stacked), torch.stack([loss(a) for a in stacked]))
    per_sample = torch.vmap(torch.func.grad(loss))(stacked)
    torch.testing.assert_close(per_sample, torch.stack([torch.func.grad(loss)(a) for a in stacked]))


@pytest.mark.parametrize("road", ["eager", "registered"])
def test_second_derivative_through_the_loss_raises(road):
    # The loss's backward scales gradients saved by the forward: differentiating it again would silently
    # miss the main term (2/(K d) for "mean"; before, with a weight that requires grad, the second
    # derivative came out as 0), so both roads refuse.
    loaded = dispatch.load_backend("torch")
    loss_fn = loaded.eager_reconstruction_loss if road == "eager" else (
        lambda *args: loaded.reconstruction_loss(*args)[0])
    y, y_coded, decoder = _inputs("cpu", torch.float64)
    y = y.requires_grad_()
    weight = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)  # the incoming gradient needs grad
    (grad,) = torch.autograd.grad(weight * loss_fn(y, y_coded, decoder, "mean", True), y, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()


def test_backward_under_compiled_autograd():
    compiled_autograd = pytest.importorskip("torch._dynamo.compiled_autograd")
    if not hasattr(compiled_autograd, "_enable"):
        pytest.skip("this torch has no compiled_autograd._enable")
    y, y_coded, decoder = _inputs("cpu", torch.float32)
    weights = decoder.t().contiguous()
    grads = []
    for compiled in (False, True):
        leaf = y.clone().requires_grad_()
        loss = ops.reconstruction_loss(leaf, ops.spline_mix(weights, leaf) + y_coded, decoder, reduction="none")
        if compiled:  # the backward traced by Dynamo (fullgraph) calls the registered ops
            with compiled_autograd._enable(torch.compile(backend="aot_eager", fullgraph=True)):
                loss.sum().backward()
        else:
            loss.sum().backward()
        grads.append(leaf.grad)
    torch._dynamo.reset()
    assert torch.equal(*grads)


@pytest.mark.parametrize("road", ["eager", "registered"])
def test_autocast_does_not_lower_the_torch_backend_to_bf16(road):
    # Under AMP the reference backend's matmuls must stay fp32 (the contract's accumulation dtype).
    loaded = dispatch.load_backend("torch")
    mix = loaded.eager_spline_mix if road == "eager" else loaded.spline_mix
    loss_fn = loaded.eager_reconstruction_loss if road == "eager" else (
        lambda *args: loaded.reconstruction_loss(*args)[0])
    y, y_coded, decoder = _inputs("cpu", torch.float32, K=33, N=31, d=65)
    expected = (loss_fn(y, y_coded, decoder, "mean", False), mix(decoder, y_coded))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = (loss_fn(y, y_coded, decoder, "mean", False), mix(decoder, y_coded))
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
