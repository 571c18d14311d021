"""BatchNorm running statistics under ``SubmoduleDReS`` (``running_stats``).

In separate mode the submodule runs twice per step, on the real batch and on the coded batch. With
``running_stats="real"`` only the real call may move the running means, variances and the batch
counter, so the statistics an eval-mode model uses are those of a model trained without DReS seeing
the same real batches; ``"all"`` lets the coded call update them too. Normalization inside a training
step uses each call's own batch statistics either way, so the loss and its gradients do not depend on
the choice.
"""

import pytest
import torch
from torch import nn

import dres_fast


def _model(seed=0):
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8, momentum=None), nn.ReLU(), nn.Linear(8, 8),
                         nn.BatchNorm1d(8))
    return nn.Sequential(body, nn.Linear(8, 2))


def _step(model, x, **options):
    reg = dres_fast.SubmoduleDReS(model, "0", **options)
    with reg:
        out = model(x)
    loss = out.square().mean() + reg.loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def _stats(model):
    return [t.clone() for layer in model.modules() if isinstance(layer, nn.BatchNorm1d)
            for t in (layer.running_mean, layer.running_var, layer.num_batches_tracked)]


def test_real_keeps_the_statistics_of_the_real_batches_only():
    x = torch.randn(16, 4) * 3 + 1
    with_dres, plain = _model(), _model()
    for _ in range(3):
        _step(with_dres, x, running_stats="real")
        plain(x)  # the same real batches, no coded branch
    for a, b in zip(_stats(with_dres), _stats(plain)):
        assert torch.equal(a, b)


def test_all_also_counts_the_coded_batch():
    x = torch.randn(16, 4) * 3 + 1
    model = _model()
    _step(model, x, running_stats="all")
    counters = [layer.num_batches_tracked.item() for layer in model.modules() if isinstance(layer, nn.BatchNorm1d)]
    assert counters == [2, 2]
    real = _model()
    _step(real, x, running_stats="real")
    assert not torch.equal(_stats(model)[0], _stats(real)[0])  # the coded batch moved the means


def test_loss_and_gradients_do_not_depend_on_the_choice():
    x = torch.randn(16, 4) * 3 + 1
    loss_real, grads_real = _step(_model(), x, running_stats="real")
    loss_all, grads_all = _step(_model(), x, running_stats="all")
    assert torch.equal(loss_real, loss_all)
    for a, b in zip(grads_real, grads_all):
        assert torch.equal(a, b)


def test_layers_are_restored_after_the_coded_call_even_when_it_fails():
    model = _model()
    reg = dres_fast.SubmoduleDReS(model, "0", running_stats="real", num_coded=20)
    calls = []

    def fail_on_coded_call(module, args, output):
        calls.append(args[0].shape[0])
        if args[0].shape[0] == 20:
            raise RuntimeError("boom")

    handle = model[0].register_forward_hook(fail_on_coded_call)
    with pytest.raises(RuntimeError, match="boom"):
        with reg:
            model(torch.randn(16, 4))
    handle.remove()
    assert calls == [16, 20]
    assert all(layer.track_running_stats for layer in model.modules() if isinstance(layer, nn.BatchNorm1d))


def test_options_are_checked():
    model = _model()
    assert dres_fast.SubmoduleDReS(model, "0", mode="concat").running_stats == "all"
    with pytest.raises(ValueError, match="needs mode='separate'"):
        dres_fast.SubmoduleDReS(model, "0", mode="concat", running_stats="real")
    with pytest.raises(ValueError, match="running_stats must be one of"):
        dres_fast.SubmoduleDReS(model, "0", running_stats="coded")


def test_a_model_holding_a_used_regularizer_can_be_copied():
    """SWA/EMA callbacks deep-copy the module, regularizer and all: the copy carries the options, an empty
    record and no hooks (the record's non-leaf tensors cannot be copied)."""
    import copy

    model = _model()
    reg = dres_fast.SubmoduleDReS(model, "0", running_stats="real")
    with reg:
        model(torch.randn(16, 4))
    object.__setattr__(model, "dres", reg)
    twin = copy.deepcopy(model)
    assert twin.dres.running_stats == "real" and not twin.dres.attached and twin.dres._losses == []
    assert twin.dres.module is twin[0]  # the copy's regularizer points into the copy
    assert reg._losses  # the original keeps its record
    reg.attach()
    assert reg.attached
    reg.detach()


def test_a_model_holding_an_attached_lazy_regularizer_can_be_saved():
    """every > 1 with attach() keeps a compiler-disabled counter; torch.save of the whole model must work."""
    import io

    model = _model()
    reg = dres_fast.SubmoduleDReS(model, "0", every=2).attach()
    model(torch.randn(16, 4))
    object.__setattr__(model, "dres", reg)
    torch.save(model, io.BytesIO())
    reg.detach()
