"""SubmoduleDReS on a model compiled before its hooks exist (issue 18 item 2): the hooks are seen, loss and
gradients match eager, and each hooked state compiles once (one graph unhooked, one hooked)."""
import copy

import pytest
import torch
from torch import nn

import dres_fast

torch_dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.utils import counters  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # tests/conftest.py


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.body, self.head = nn.Linear(5, 16), nn.Sequential(nn.Linear(16, 16), nn.Tanh()), nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.body(torch.tanh(self.stem(x))))


def _step(forward, model, reg, use, x):
    """(loss, grads) of one training step; use: None (no DReS), "with" or "attach"."""
    model.zero_grad()
    if use == "with":
        with reg:
            out = forward(x)
    else:
        if use == "attach":
            reg.attach()
        out = forward(x)
    total = out.square().mean() + (reg.loss if use else 0)
    if use == "attach":
        reg.detach()
    total.backward()
    return total.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("use", ["with", "attach"])
@pytest.mark.parametrize("mode", ["separate", "concat"])
def test_hooks_added_after_compiling_are_seen(mode, use):
    torch.manual_seed(0)
    models = [Net(), Net()]  # the second: another instance of the class, compiled later
    x = torch.randn(12, 5)
    for model in models:
        compiled = torch.compile(model, backend="aot_eager")
        reg = dres_fast.SubmoduleDReS(model, "body", mode=mode)
        for hooked in (False, True, False, True):  # compiled unhooked first, then hooked -> unhooked -> hooked
            got = _step(compiled, model, reg, use if hooked else None, x)
            want = _step(model, model, reg, use if hooked else None, x)
            torch.testing.assert_close(got, want)
            assert ("forward" in model.body.__dict__) is False  # detach took the mark away
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])  # one unhooked, one hooked: for both instances
    assert not counters["graph_break"]


def test_a_copy_made_while_attached_runs_its_own_forward():
    model = Net()
    reg = dres_fast.SubmoduleDReS(model, "body").attach()
    copied = copy.deepcopy(model)
    reg.detach()
    with torch.no_grad():
        copied.stem.weight.add_(1.0)
    x = torch.randn(4, 5)
    torch.testing.assert_close(copied(x), copied.head(copied.body[1](copied.body[0](torch.tanh(copied.stem(x))))))


def test_missing_record_under_compile_says_so():
    model = Net()
    compiled = torch.compile(model, backend="eager", options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
    compiled(torch.randn(4, 5))
    reg = dres_fast.SubmoduleDReS(model, "body")
    with reg:
        compiled(torch.randn(4, 5))
    with pytest.raises(RuntimeError, match="torch.compile has compiled code"):
        reg.loss
