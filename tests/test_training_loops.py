"""DReS inside ordinary training loops: the batch axis (``batch_dim``), per-sample extra arguments
(``extra_args``), the hook lifecycle (attach across steps, copies of the model, validation) and a
fixed ``dof_*`` with a smaller last batch."""

import copy
import gc
import io
import warnings
import weakref

import pytest
import torch
from torch import nn

import dres_fast
from reference import backend_device, backend_params, dres_weights64, points64

MODES = ["separate", "concat"]


class PerPosition(nn.Module):
    """A map applied to each (sample, time step) alone, so the result does not depend on the layout."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)

    def forward(self, x):
        return torch.tanh(self.lin(x)) ** 2


# -- batch_dim --------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("batch_dim", [1, -2])
def test_dres_loss_batch_dim_mixes_samples_not_time_steps(reduction, batch_dim):
    fn = PerPosition().double()
    x_seq_first = torch.randn(5, 8, 3, dtype=torch.float64, requires_grad=True)  # (T, B, C)
    x_batch_first = x_seq_first.detach().transpose(0, 1).clone().requires_grad_()
    kwargs = dict(num_coded=6, reduction=reduction, return_decoded=True)
    loss, y_hat = dres_fast.dres_loss(fn, x_seq_first, batch_dim=batch_dim, **kwargs)
    ref_loss, ref_y_hat = dres_fast.dres_loss(fn, x_batch_first, **kwargs)
    torch.testing.assert_close(loss, ref_loss)
    assert y_hat.shape == (5, 8, 4)
    torch.testing.assert_close(y_hat, ref_y_hat.transpose(0, 1))
    incoming = torch.rand_like(loss) + 0.5  # a non-unit incoming gradient
    (grad,) = torch.autograd.grad(loss, x_seq_first, incoming)
    (ref_grad,) = torch.autograd.grad(ref_loss, x_batch_first, incoming)
    torch.testing.assert_close(grad, ref_grad.transpose(0, 1))
    # mixing along dim 0 (the time steps) is a different loss: the axis matters
    along_time = dres_fast.dres_loss(fn, x_seq_first.detach(), num_coded=6)
    assert not torch.allclose(along_time, dres_fast.dres_loss(fn, x_seq_first.detach(), num_coded=6, batch_dim=batch_dim))


def test_dres_loss_batch_dim_gradcheck_and_module():
    fn = PerPosition().double()
    x = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: dres_fast.dres_loss(fn, t, batch_dim=1, lam_enc=1e-3), (x,))
    module_loss = dres_fast.DReSLoss(num_coded=5, batch_dim=1)(fn, x)
    torch.testing.assert_close(module_loss, dres_fast.dres_loss(fn, x.transpose(0, 1), num_coded=5))


@pytest.mark.parametrize(
    "batch_dim, err, match",
    [(2, ValueError, r"along batch_dim=2"), (-3, ValueError, "batch_dim=-3"), (True, TypeError, "batch_dim must be an int"), (1.0, TypeError, "batch_dim must be an int")],
)
def test_dres_loss_bad_batch_dim(batch_dim, err, match):
    with pytest.raises(err, match=match):
        dres_fast.dres_loss(nn.Linear(3, 2), torch.randn(6, 3), batch_dim=batch_dim)
    with pytest.raises(err, match=match.replace("along ", "")):
        dres_fast.DReSLoss(batch_dim=batch_dim)(nn.Linear(3, 2), torch.randn(6, 3))


@pytest.mark.parametrize("backend", backend_params("triton", "cuda"))  # each skipped, with why, where it cannot run
def test_other_backends_with_batch_dim_match_torch(backend):
    # compiled Triton and the CUDA backend run on a GPU; on CPU, Triton runs in its interpreter
    device = backend_device(backend)
    fn = PerPosition().to(device)
    x = torch.randn(5, 9, 3, device=device, requires_grad=True)  # samples along dim 1: a strided view for the ops
    losses, grads = [], []
    for name in ("torch", backend):
        loss = dres_fast.dres_loss(fn, x, batch_dim=1, num_coded=7, reduction="none", backend=name)
        (grad,) = torch.autograd.grad(loss, x, torch.linspace(0.5, 2.0, 9, device=device))
        losses.append(loss)
        grads.append(grad)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


def test_output_without_the_batch_axis_is_an_error():
    with pytest.raises(ValueError, match="y must have 6 samples along batch_dim=1"):
        dres_fast.dres_loss(lambda t: t.sum(1), torch.randn(4, 6, 3), batch_dim=1)


class SequenceModel(nn.Module):
    """(T, B, C) in, (T, B, C) out: a sequence-first transformer layer between two linear maps."""

    def __init__(self, batch_first=False):
        super().__init__()
        self.inp = nn.Linear(3, 8)
        self.body = nn.Sequential(nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=batch_first))
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        return self.out(self.body(self.inp(x)))


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: SequenceModel(), "body"),
        (lambda: SequenceModel(), ""),
        (lambda: nn.Sequential(nn.Linear(3, 3), nn.LSTM(3, 3)), ""),
        (lambda: nn.Sequential(nn.Linear(3, 4), nn.MultiheadAttention(4, 2)), ""),
        (lambda: nn.Sequential(nn.GRU(3, 3)), "0"),
    ],
)
def test_sequence_first_layers_require_batch_dim(make, name):
    model = make()
    with pytest.raises(ValueError, match="batch_first=False.*Pass batch_dim=1"):
        dres_fast.SubmoduleDReS(model, name)
    dres_fast.SubmoduleDReS(model, name, batch_dim=1)  # given explicitly: accepted
    dres_fast.SubmoduleDReS(model, name, batch_dim=0)


def test_submodule_bad_batch_dim():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    with pytest.raises(TypeError, match="batch_dim must be an int"):
        dres_fast.SubmoduleDReS(model, "", batch_dim="1")
    reg = dres_fast.SubmoduleDReS(model, "", batch_dim=2)
    with reg, pytest.raises(ValueError, match=r"batch_dim=2 is not an axis of the submodule's input of shape \(6, 4\)"):
        model(torch.randn(6, 4))


class BatchFirstLSTM(nn.Module):
    """An ``nn.LSTM(batch_first=True)`` that returns its output sequence only (one tensor)."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 4, batch_first=True)

    def forward(self, x):
        return self.lstm(x)[0]


def _dres_by_hand(submodule, h, num_coded, mode):
    """Float64 DReS loss of ``submodule`` on its input ``h`` (samples on dim 0) with the default
    weights of tests/reference.py: separate calls on ``h`` and ``E h``, or one call on both (concat);
    returns ``(loss, y)`` with ``y`` the output of the real samples."""
    E, D = dres_weights64(h.shape[0], num_coded)
    coded = torch.einsum("nk,k...->n...", E, h)
    if mode == "separate":
        y, y_coded = submodule(h), submodule(coded)
    else:
        both = submodule(torch.cat([h, coded]))
        y, y_coded = both[:h.shape[0]], both[h.shape[0]:]
    return (y - torch.einsum("kn,n...->k...", D, y_coded)).square().mean(), y


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("make, name", [(lambda: SequenceModel(batch_first=True), "body"),
                                        (lambda: nn.Sequential(nn.Linear(3, 3), BatchFirstLSTM()), "1")],
                         ids=["transformer", "lstm"])
def test_batch_first_layers_need_no_batch_dim(make, name, mode):
    """Layers with ``batch_first=True`` (a transformer layer, an LSTM) take ``(B, T, C)``: SubmoduleDReS
    accepts them without ``batch_dim`` and mixes along dim 0, the samples. ``reg.loss`` equals the DReS
    loss of the submodule on its actual input, computed by hand, and differs from the loss that mixes
    time steps (dim 1). Catches a default that refuses or mixes the wrong axis for batch-first layers."""
    model = make().double().train()
    submodule = model.get_submodule(name)
    inputs = []  # registered before DReS's hooks: the submodule's input as the model passes it
    submodule.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    reg = dres_fast.SubmoduleDReS(model, name, mode=mode, num_coded=6)
    x = torch.randn(7, 5, 3, dtype=torch.float64)  # B=7, T=5
    with reg:
        out = model(x)
    h = inputs[0]
    assert h.shape[:2] == (7, 5)
    expected, _ = _dres_by_hand(submodule, h, 6, mode)
    torch.testing.assert_close(reg.loss, expected, rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(out, model(x))  # no BatchNorm: the real branch is untouched
    along_time = dres_fast.dres_loss(submodule, h.detach(), num_coded=6, batch_dim=1)
    assert not torch.allclose(along_time, expected)


@pytest.mark.parametrize("mode", MODES)
def test_submodule_batch_dim_mixes_samples(mode):
    model = SequenceModel().double().train()
    x = torch.randn(5, 7, 3, dtype=torch.float64)  # T=5, B=7
    reg = dres_fast.SubmoduleDReS(model, "body", mode=mode, batch_dim=1, num_coded=6)
    with reg:
        out = model(x)
    torch.testing.assert_close(out, model(x))  # the real branch is untouched in both modes here
    h = model.inp(x)
    expected = dres_fast.dres_loss(model.body, h, num_coded=6, batch_dim=1)
    torch.testing.assert_close(reg.loss, expected)
    reg.loss.backward()
    assert model.inp.weight.grad is not None and model.body[0].linear1.weight.grad is not None


# -- extra_args -------------------------------------------------------------------------------------
class Conditioned(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.cond = nn.Linear(2, 4)

    def forward(self, x, cond, *, scale=None, mask=None):
        out = torch.tanh(self.lin(x) + self.cond(cond))
        if scale is not None:
            out = out * scale
        if mask is not None:
            out = out * mask.unsqueeze(-1)
        return out


class CondModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Conditioned()

    def forward(self, x, cond, **kwargs):
        return self.block(x, cond, **kwargs).sum(-1)


@pytest.mark.parametrize("mode", MODES)
def test_extra_args_error_names_the_argument(mode):
    model = CondModel().double()
    x, cond = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    reg = dres_fast.SubmoduleDReS(model, "block", mode=mode)
    with reg, pytest.raises(ValueError, match="argument 'cond' has 6 entries.*extra_args='mix'.*extra_args='pass'"):
        model(x, cond)
    with reg, pytest.raises(ValueError, match="argument 'scale'"):
        model(x, torch.randn(1, 2, dtype=torch.float64), scale=torch.rand(6, 1, dtype=torch.float64))
    with reg:  # a tensor that is not per-sample (no batch-sized axis) goes through
        model(x, torch.randn(1, 2, dtype=torch.float64), scale=torch.rand(4, dtype=torch.float64))
    assert reg.loss.item() > 0


@pytest.mark.parametrize("mode", MODES)
def test_extra_args_mix_encodes_them_with_the_batch(mode):
    model = CondModel().double()
    x, cond = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)
    scale = torch.rand(7, 1, dtype=torch.float64) + 0.5
    reg = dres_fast.SubmoduleDReS(model, "block", mode=mode, extra_args="mix", num_coded=5)
    with reg:
        out = model(x, cond, scale=scale)
    torch.testing.assert_close(out, model(x, cond, scale=scale))
    # The encoder is linear along the batch, so mixing (x, cond, scale) together is the same as
    # mixing their concatenation.
    joint = torch.cat([x, cond, scale], dim=1)
    expected = dres_fast.dres_loss(lambda z: model.block(z[:, :3], z[:, 3:5], scale=z[:, 5:]), joint, num_coded=5)
    torch.testing.assert_close(reg.loss, expected)
    reg.loss.backward()
    assert model.block.cond.weight.grad is not None


class Rotary(nn.Module):
    def forward(self, x, position_embeddings):
        cos, sin = position_embeddings
        return x * cos + x.flip(-1) * sin


@pytest.mark.parametrize("extra_args", ["error", "mix"])
def test_a_tuple_of_per_sample_tensors_is_named_not_passed(extra_args):
    """Rotary embeddings from per-sample position ids (left padding) come as a (cos, sin) tuple: a coded sample
    has no positions of its own, so the tuple is refused by name (it used to pass unchanged, pairing coded
    sample n with real sample n's positions, and to fail on a size mismatch when N != K)."""
    x, angles = torch.randn(6, 5, 4), torch.rand(6, 5, 4)
    with pytest.raises(ValueError, match="argument 'position_embeddings'.*pad on the right"):
        with dres_fast.SubmoduleDReS(nn.Sequential(Rotary()), "0", extra_args=extra_args) as reg:
            reg.module(x, (angles.cos(), angles.sin()))


@pytest.mark.parametrize("mode", MODES)
def test_extra_args_mix_refuses_masks(mode):
    model = CondModel().double()
    x, cond = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    reg = dres_fast.SubmoduleDReS(model, "block", mode=mode, extra_args="mix")
    with reg, pytest.raises(ValueError, match="argument 'mask' is per-sample.*torch.bool"):
        model(x, cond, mask=torch.ones(6, dtype=torch.bool))


def test_extra_args_pass_hands_them_over_unchanged():
    model = CondModel().double()
    x, cond = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    reg = dres_fast.SubmoduleDReS(model, "block", extra_args="pass")
    with reg:
        model(x, cond)
    torch.testing.assert_close(reg.loss, dres_fast.dres_loss(lambda t: model.block(t, cond), x))
    with pytest.raises(ValueError, match="extra_args must be one of"):
        dres_fast.SubmoduleDReS(model, "block", extra_args="ignore")


# -- hook lifecycle ---------------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, 6)
        self.body = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Tanh())
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.body(self.stem(x)))


def _count_calls(module):
    """The batch size of each call of ``module`` (K + N for a concatenated call)."""
    calls = []
    module.register_forward_pre_hook(lambda _, args: calls.append(args[0].shape[0]))
    return calls


@pytest.mark.parametrize("mode", MODES)
def test_attach_across_steps_without_reset(mode):
    """``attach()`` once, then training steps that never call ``reset()``: each forward starts a fresh
    record, so after every step's forward ``reg.loss`` is that forward's DReS loss alone, equal to the
    loss computed by hand from the submodule's actual input of that step (with the parameters the
    previous steps left), not a sum with earlier steps (whose graphs backward has freed: "backward
    through the graph a second time") nor a stale value; in concat mode the model's output comes
    from the real samples of the concatenated call (BatchNorm saw both batches)."""
    model = Net().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    reg = dres_fast.SubmoduleDReS(model, "body", mode=mode, num_coded=5).attach()
    recorded = []
    for step in range(3):
        x = torch.randn(8, 4, dtype=torch.float64)
        out = model(x)
        with torch.no_grad():  # a copy of the block has inert hooks: it adds nothing to the record
            expected, y = _dres_by_hand(copy.deepcopy(model.body), model.stem(x), 5, mode)
        torch.testing.assert_close(reg.loss, expected, rtol=1e-9, atol=1e-14)
        torch.testing.assert_close(out, model.head(y), rtol=1e-12, atol=1e-14)
        recorded.append(reg.loss.item())
        loss = out.pow(2).mean() + reg.loss
        opt.zero_grad()
        loss.backward()  # step 2 used to fail: "backward through the graph a second time"
        opt.step()
    reg.detach()
    assert len(reg._losses) == 1  # the latest forward's record only
    assert len(set(recorded)) == 3  # three different batches: a stale record would repeat a value


class LayerDrop(nn.Module):
    """Skips its middle layer on the forwards listed in ``skip`` (as LayerDrop or an unused expert would)."""

    def __init__(self, skip):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
        self.skip, self.forwards = set(skip), 0

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            if not (i == 1 and self.forwards in self.skip):
                x = torch.tanh(layer(x))
        self.forwards += 1
        return x


@pytest.mark.parametrize("mode", MODES)
def test_a_forward_that_skips_the_submodule_gives_zero_once_attached(mode):
    """Attached, a forward that never calls the submodule (LayerDrop) contributes zero, with one warning,
    whether or not the submodule ran before; in a `with` block that ran no call it stays an error."""
    model = LayerDrop(skip={0, 2}).double()
    reg = dres_fast.SubmoduleDReS(model, "layers.1", mode=mode).attach()
    losses = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            x = torch.randn(8, 4, dtype=torch.float64)
            (model(x).square().mean() + reg.loss).backward()
            losses.append(reg.loss.item())
    reg.detach()
    assert [loss == 0 for loss in losses] == [True, False, True, False]
    assert sum("did not run in the model's latest forward" in str(w.message) for w in caught) == 1
    with pytest.raises(RuntimeError, match="did not run inside the `with` block"):
        with dres_fast.SubmoduleDReS(model, "layers.1", mode=mode) as reg:
            model.skip.add(model.forwards)
            model(torch.randn(8, 4, dtype=torch.float64))
        reg.loss


def test_an_integer_batch_is_refused_not_interpolated():
    """Token ids as the submodule's batch: mixing them would make ids of no token (rounded on the way back
    to int64); the error says to hook the embeddings instead."""
    model = nn.Sequential(nn.Embedding(20, 4), nn.Linear(4, 2))
    with pytest.raises(TypeError, match=r"dtype torch.int64.*embeddings"):
        with dres_fast.SubmoduleDReS(model, "0"):
            model(torch.randint(0, 20, (6, 5)))


@pytest.mark.parametrize("mode", MODES)
def test_attach_on_the_whole_model_records_the_latest_forward(mode):
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    reg = dres_fast.SubmoduleDReS(model, "", mode=mode).attach()
    for _ in range(2):
        x = torch.randn(6, 4, dtype=torch.float64)
        model(x)
    reg.detach()
    torch.testing.assert_close(reg.loss, dres_fast.dres_loss(model, x))


def _attached_after_a_step(mode):
    model = Net().double()
    reg = dres_fast.SubmoduleDReS(model, "body", mode=mode).attach()
    model(torch.randn(8, 4, dtype=torch.float64))  # the record now holds non-leaf tensors
    return model, reg


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", ["deepcopy", "averaged_model", "ema", "torch_save"])
def test_copies_of_an_attached_model_have_inert_hooks(mode, how):
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model, reg = _attached_after_a_step(mode)
    recorded = reg.loss.detach().clone()
    if how == "deepcopy":
        copied = copy.deepcopy(model)
    elif how == "averaged_model":
        averaged = AveragedModel(model)
        averaged.update_parameters(model)
        copied = averaged.module
    elif how == "ema":
        averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
        averaged.update_parameters(model)
        copied = averaged.module
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        copied = torch.load(buffer, weights_only=False)
    calls = _count_calls(copied.body)
    x = torch.randn(8, 4, dtype=torch.float64)
    out = copied(x)
    assert calls == [8]  # no coded branch, no concatenated batch
    assert out.shape == (8, 3)
    torch.testing.assert_close(reg.loss.detach(), recorded)  # nothing written into the original's record
    # no leak: the copy does not keep the regularizer alive
    reg.detach()
    ref = weakref.ref(reg)
    del reg
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("mode", MODES)
def test_no_coded_branch_without_grad_or_in_eval(mode):
    model = Net().double()
    reg = dres_fast.SubmoduleDReS(model, "body", mode=mode).attach()
    calls = _count_calls(model.body)  # after DReS's pre-hook: sees the concatenated batch
    x = torch.randn(8, 4, dtype=torch.float64)
    with torch.no_grad():
        plain = model(x)
    assert calls == [8] and reg.loss.item() == 0.0
    model.eval()
    model(x)
    assert calls == [8, 8] and reg.loss.item() == 0.0
    model.train()
    out = model(x)
    assert calls == ([8, 8, 8, 8] if mode == "separate" else [8, 8, 16]) and reg.loss.item() > 0
    reg.detach()
    assert plain.shape == out.shape


# -- fixed dof and a smaller last batch ------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_fixed_dof_is_clipped_for_a_smaller_last_batch(mode):
    model = nn.Sequential(nn.Linear(4, 6), nn.Sequential(nn.Linear(6, 6), nn.Tanh()), nn.Linear(6, 3)).double()
    reg = dres_fast.SubmoduleDReS(model, "1", mode=mode, dof_enc=24, dof_dec=24)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for size in (32, 20, 32, 20):
            x = torch.randn(size, 4, dtype=torch.float64)
            with reg:
                model(x)
            assert torch.isfinite(reg.loss)
    messages = [str(w.message) for w in caught if "clipped" in str(w.message)]
    assert len(messages) == 2 and "dof_enc=24 exceeds the 20 knots" in messages[0]  # once per option
    torch.testing.assert_close(reg.loss, dres_fast.dres_loss(model[1], model[0](x), dof_enc=20, dof_dec=20))


def test_functional_dres_loss_keeps_raising_for_too_large_dof():
    with pytest.raises(ValueError, match=r"dof_enc must be between 2 and the number of its knots \(20\)"):
        dres_fast.dres_loss(nn.Linear(4, 2), torch.randn(20, 4), dof_enc=24)


# -- what the README says -------------------------------------------------------------------------
def _readme():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    return root, (root / "README.md").read_text()


def test_readme_setup_is_two_commands_and_ci_runs_the_second():
    root, readme = _readme()
    setup = readme.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    block = setup.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert len(commands) == 2, commands
    install, test = commands
    for step in ("git clone", "cd dres-fast", "python3 -m venv .venv", ". .venv/bin/activate", "pip install torch==", 'pip install -e ".[dev,triton]"'):
        assert step in install, step
    assert install.endswith("python -m bench --quick")
    ci = (root / ".ci" / "run").read_text().split("# README's test command:\n", 1)[1].splitlines()[0]
    assert test.strip() == ci.strip()


def test_readme_caveat_numbers():
    """The figures quoted under "Caveats", at the defaults, within their measured spread."""
    torch.manual_seed(3)
    identity = [dres_fast.dres_loss(lambda t: t, torch.randn(64, 32, dtype=torch.float64)).item() for _ in range(5)]
    assert 0.22 < sum(identity) / 5 < 0.32  # README: 0.27
    alpha = torch.from_numpy(points64(64, "chebyshev")).unsqueeze(1)
    on_curve = torch.randn(1, 8, dtype=torch.float64) + alpha * torch.randn(1, 8, dtype=torch.float64)
    assert dres_fast.dres_loss(lambda t: t, on_curve).item() < 1e-20
    assert dres_fast.dres_loss(lambda t: t, on_curve[torch.randperm(64)]).item() > 1e-2  # order matters
    # a linear layer: the gradient is about (2 r / d_out) W, like weight decay
    weight = torch.randn(16, 32, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(dres_fast.dres_loss(lambda t: t @ weight.T, torch.randn(256, 32, dtype=torch.float64)), weight)
    decay = (grad * weight).sum() / weight.pow(2).sum()
    assert 0.6 * 2 * 0.27 / 16 < decay < 1.4 * 2 * 0.27 / 16
    # dropout inside f: two masks inflate the loss
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 10))
    x = torch.randn(64, 32)
    with_dropout = dres_fast.dres_loss(net, x).item()
    net[2].eval()
    assert with_dropout > 3 * dres_fast.dres_loss(net, x).item()


@pytest.mark.parametrize("mode", ["separate", "concat"])
def test_autocast_bfloat16_step(mode):
    """Mixed precision as users train: under torch.autocast the submodule's output is bfloat16, the DReS ops
    accumulate in float32 and report a float32 loss, and the step's gradients are finite and close to the
    float32 step's (bfloat16 has 8 bits: a loose tolerance)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4))
    x = torch.randn(16, 8)
    grads = {}
    for amp in (False, True):
        model.zero_grad()
        reg = dres_fast.SubmoduleDReS(model, "2", mode=mode)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            with reg:
                out = model(x)
            loss = out.float().pow(2).mean() + reg.loss
        assert reg.loss.dtype == torch.float32 and out.dtype == (torch.bfloat16 if amp else torch.float32)
        loss.backward()
        grads[amp] = torch.cat([p.grad.flatten() for p in model.parameters()])
        assert torch.isfinite(grads[amp]).all()
    assert torch.allclose(grads[True], grads[False], rtol=0.1, atol=0.02)
