"""torch.compile with a changing batch size (the smaller last batch of an epoch).

The step is compiled with default options, with fullgraph=True and with dynamic=True, and run for
batch sizes 32, 32, 20, 32, 17: every call matches eager (loss and parameter gradients), there is
at most one compile per distinct batch size, and exactly one with dynamic=True. aot_eager keeps
these cheap on CPU; one inductor run is marked slow.
"""

import pytest
import torch
from torch import nn

import dres_fast

torch_dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.utils import counters  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # tests/conftest.py

BATCH_SIZES = (32, 32, 20, 32, 17)
CONFIGS = {
    "default": {},
    "fullgraph": {"fullgraph": True},
    "dynamic": {"fullgraph": True, "dynamic": True},
}


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))


def _loss_and_grads(step, net, x):
    net.zero_grad()
    loss = step(x)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in net.parameters()]


def _graphs_compiled() -> int:
    return counters["stats"]["unique_graphs"]


def _check_against_eager(step, compiled, net, seed=1):
    generator = torch.Generator().manual_seed(seed)
    for size in BATCH_SIZES:
        x = torch.randn(size, 5, generator=generator)
        loss, grads = _loss_and_grads(compiled, net, x)
        eager_loss, eager_grads = _loss_and_grads(step, net, x)
        torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-7)
        for grad, eager_grad in zip(grads, eager_grads):
            torch.testing.assert_close(grad, eager_grad, rtol=1e-5, atol=1e-7)


def _check_compile_count(config: str):
    if config == "dynamic":
        assert _graphs_compiled() == 1
    else:
        assert 1 <= _graphs_compiled() <= len(set(BATCH_SIZES))


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_dres_loss_step_with_changing_batch_size(config):
    net = _net()

    def step(x):
        y = net(x)
        return y.square().mean() + dres_fast.dres_loss(net, x, y=y, lam_enc=1e-3, dof_dec=0.5 * x.shape[0])

    if config == "dynamic":
        # dof_dec = K / 2 is a symbolic float under dynamic=True: give the spec constants instead
        def step(x):  # noqa: F811
            y = net(x)
            return y.square().mean() + dres_fast.dres_loss(net, x, y=y, lam_enc=1e-3)

    compiled = torch.compile(step, backend="aot_eager", **CONFIGS[config])
    _check_against_eager(step, compiled, net)
    _check_compile_count(config)


@pytest.mark.parametrize("config", ["fullgraph", "dynamic"])
def test_dres_loss_module_step_with_changing_batch_size(config):
    net = _net()
    criterion = dres_fast.DReSLoss(num_coded=12, dof_enc=6.0, reduction="sum")

    def step(x):
        y = net(x)
        return y.square().mean() + criterion(net, x, y=y)

    compiled = torch.compile(step, backend="aot_eager", **CONFIGS[config])
    _check_against_eager(step, compiled, net)
    _check_compile_count(config)


@pytest.mark.parametrize("mode", ["separate", "concat"])
def test_submodule_dres_on_a_compiled_model(mode):
    # the hooks are traced into the compiled forward: no graph break, no recompile per step
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Sequential(nn.Linear(16, 16), nn.Tanh()), nn.Linear(16, 3))
    compiled = torch.compile(model, backend="aot_eager")
    reg = dres_fast.SubmoduleDReS(model, "2", mode=mode)

    def step_with(forward):
        def step(x):
            with reg:
                out = forward(x)
            return out.square().mean() + reg.loss

        return step

    _check_against_eager(step_with(model), step_with(compiled), model)
    assert not counters["graph_break"], dict(counters["graph_break"])
    _check_compile_count("default")


def test_weight_lookup_is_one_opaque_op():
    # no numpy/scipy in the graph: the weights come from dres_fast::coding_weights with a symbolic K
    net = _net()
    graphs = []

    def keep_graph(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def step(x):
        return dres_fast.dres_loss(net, x)

    compiled = torch.compile(step, backend=keep_graph, fullgraph=True, dynamic=True)
    for size in (9, 7):
        x = torch.randn(size, 5)
        torch.testing.assert_close(compiled(x), step(x))
    assert len(graphs) == 1
    targets = [str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert sum("coding_weights" in t for t in targets) == 2, targets


@pytest.mark.slow
def test_inductor_dynamic_batch_size():
    net = _net()

    def step(x):
        y = net(x)
        return y.square().mean() + dres_fast.dres_loss(net, x, y=y)

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    _check_against_eager(step, compiled, net)
    _check_compile_count("dynamic")


def test_explicit_points_through_a_module_built_outside():
    net = _net()
    alpha = torch.tensor([-1.0, -0.6, -0.1, 0.2, 0.5, 0.9])
    criterion = dres_fast.DReSLoss(num_coded=7, alpha=alpha, beta="uniform", lam_enc=0.0)

    def step(x):
        return criterion(net, x)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    x = torch.randn(6, 5)
    torch.testing.assert_close(compiled(x), step(x))
