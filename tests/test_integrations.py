"""The framework integrations (``dres_fast.integrations``): Hugging Face ``Trainer`` and Lightning.

Hugging Face: a tiny ``BertForSequenceClassification`` built from a ``BertConfig`` (no download), trained on
CPU with gradient accumulation 2, DReS on ``bert.encoder.layer.0.output`` (``BertOutput``; its residual
argument is per-sample, hence ``extra_args="mix"``). Checked against sums made here: the loss that
``compute_loss`` returns is the task loss plus ``weight`` times DReS computed with ``dres_fast.dres_loss``
on the submodule's captured inputs; the logged ``loss`` of an accumulated step is a plain Trainer's plus
``weight`` times the logged ``dres_loss``, which is the mean of the step's micro-batches' DReS (whether the
Trainer divides the loss by the accumulation steps or takes it as scaled); evaluation and prediction call
the submodule once per batch (no coded branch) and add nothing.

Lightning: a tiny LightningModule trained with ``pytorch_lightning`` (or ``lightning``) for 3 steps.

The tests skip (saying why) without the ``integrations`` extra. The first that imports ``transformers``
pays its import (a few seconds); a Trainer run here takes well under a second.
"""

import copy
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import dres_fast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHT = 0.5
SUBMODULE = "bert.encoder.layer.0.output"


# -- Hugging Face -----------------------------------------------------------------------------------
def _hf():
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (the 'integrations' extra)")
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (the 'integrations' extra)")
    from dres_fast.integrations import hf

    return transformers, hf


def _bert(transformers, seed=0):
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=48, max_position_embeddings=16, num_labels=2,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # exact sums
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(config)


def _data(n, seed, length=10):
    """Padded sequences of random lengths: input_ids (0 = padding), attention_mask, labels."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, length + 1, (n,), generator=gen)
    mask = (torch.arange(length) < lengths[:, None]).long()
    ids = torch.randint(1, 100, (n, length), generator=gen) * mask
    labels = torch.randint(0, 2, (n,), generator=gen)
    return [dict(input_ids=ids[i], attention_mask=mask[i], labels=labels[i]) for i in range(n)]


def _batch(samples):
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


def _args(transformers, tmp_path, **kw):
    options = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, per_device_eval_batch_size=4,
                   gradient_accumulation_steps=2, max_steps=2, logging_steps=1, learning_rate=1e-2, seed=0,
                   report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True)
    options.update(kw)
    return transformers.TrainingArguments(**options)


def _by_hand(model, batch):
    """(task loss, DReS of the submodule) for ``batch`` at ``model``'s parameters, in training mode, with
    ``dres_loss`` on the submodule's captured inputs (the residual concatenated to the batch: mixing along
    the batch axis mixes both with the same encoder, as extra_args="mix" does)."""
    submodule, captured = model.get_submodule(SUBMODULE), []
    handle = submodule.register_forward_pre_hook(lambda module, args: captured.append(args))
    model.train()
    try:
        task = model(**batch).loss
    finally:
        handle.remove()
    (hidden, residual), = captured
    width = hidden.shape[-1]
    dres = dres_fast.dres_loss(lambda z: submodule(z[..., :width], z[..., width:]), torch.cat([hidden, residual], -1))
    return task, dres


def _count_calls(model):
    counter = {"calls": 0}

    def hook(module, args, output):
        counter["calls"] += 1

    return counter, model.get_submodule(SUBMODULE).register_forward_hook(hook)


@pytest.mark.parametrize("scaled", [True, False], ids=["trainer-takes-loss-as-scaled", "trainer-divides-by-G"])
def test_hf_trainer_adds_and_logs_the_mean_dres_of_each_accumulated_step(tmp_path, scaled):
    transformers, hf = _hf()
    data = _data(16, seed=1)
    initial = _bert(transformers)
    initial.accepts_loss_kwargs = scaled  # False: the Trainer divides every micro-batch's loss by G

    plain = transformers.Trainer(model=copy.deepcopy(initial), args=_args(transformers, tmp_path), train_dataset=data)
    plain.train()

    class Recording(hf.DReSTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            if model.training:
                self.micro_batches.append({k: v.clone() for k, v in inputs.items()})
            return super().compute_loss(model, inputs, *args, **kwargs)

    model = copy.deepcopy(initial)
    counter, handle = _count_calls(model)
    config = hf.DReSTrainerConfig(SUBMODULE, weight=WEIGHT, options={"extra_args": "mix"})
    trainer = Recording(model=model, args=_args(transformers, tmp_path), train_dataset=data, dres=config)
    trainer.micro_batches = []
    trainer.train()
    handle.remove()

    assert trainer._dres_loss_is_scaled_for_ga(8) is scaled
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    reference = [entry for entry in plain.state.log_history if "loss" in entry]
    assert [e["step"] for e in logs] == [e["step"] for e in reference] == [1, 2]
    assert all(torch.isfinite(torch.tensor(e["dres_loss"])) and e["dres_loss"] > 0 for e in logs)
    assert len(trainer.micro_batches) == 4 and counter["calls"] == 2 * 4  # separate mode: real + coded call
    # step 1 (the parameters are the initial ones for both micro-batches, and both Trainers saw the same data):
    by_hand = [_by_hand(copy.deepcopy(initial), batch)[1].item() for batch in trainer.micro_batches[:2]]
    assert logs[0]["dres_loss"] == pytest.approx(sum(by_hand) / 2, rel=1e-5)
    assert logs[0]["loss"] == pytest.approx(reference[0]["loss"] + WEIGHT * logs[0]["dres_loss"], rel=1e-5)
    # step 2: the task loss differs from the plain Trainer's: DReS's gradient entered the first update
    assert logs[1]["loss"] - WEIGHT * logs[1]["dres_loss"] != pytest.approx(reference[1]["loss"], rel=1e-4)
    changed = [not torch.equal(p, q) for p, q in zip(model.parameters(), initial.parameters())]
    assert all(changed)
    assert not model.get_submodule(SUBMODULE)._forward_hooks and not model._forward_pre_hooks  # detached by train()


def test_hf_concat_mode_under_gradient_checkpointing_logs_what_separate_mode_does(tmp_path):
    # BertLayer recomputes its forward in backward: the hooks must still be there (attached for all of
    # train()). No BatchNorm and no dropout, so both modes compute the same numbers.
    transformers, hf = _hf()
    data = _data(16, seed=1)
    history = {}
    for mode, checkpointing in (("separate", False), ("concat", True)):
        model = _bert(transformers)
        fields = transformers.TrainingArguments.__dataclass_fields__  # renamed in transformers 5.x
        name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
        args = _args(transformers, tmp_path, **{name: checkpointing})
        config = hf.DReSTrainerConfig(SUBMODULE, weight=WEIGHT, mode=mode, options={"extra_args": "mix"})
        trainer = hf.DReSTrainer(model=model, args=args, train_dataset=data, dres=config)
        trainer.train()
        assert getattr(model, name.replace("activation", "is_activation").replace("gradient", "is_gradient")) \
            is checkpointing
        history[mode] = [v for e in trainer.state.log_history if "loss" in e for v in (e["loss"], e["dres_loss"])]
    assert len(history["concat"]) == 4
    assert history["concat"] == pytest.approx(history["separate"], rel=1e-5)


def test_hf_compute_loss_by_hand_and_no_coded_branch_in_evaluation(tmp_path):
    transformers, hf = _hf()
    model = _bert(transformers, seed=3)
    counter, handle = _count_calls(model)
    val = _data(8, seed=2)
    trainer = hf.DReSTrainer(model=model, args=_args(transformers, tmp_path), eval_dataset=val,
                             dres=hf.DReSTrainerConfig(SUBMODULE, weight=WEIGHT, options={"extra_args": "mix"}))
    batch = _batch(_data(6, seed=4))

    model.train()  # outside train(): a `with` block around this one forward
    loss = trainer.compute_loss(model, batch)
    assert counter["calls"] == 2  # the real call and the coded one
    task, dres = _by_hand(model, batch)
    torch.testing.assert_close(loss, task + WEIGHT * dres, rtol=1e-5, atol=1e-6)
    assert len(model.get_submodule(SUBMODULE)._forward_hooks) == 1  # the `with` block removed its hooks

    counter["calls"] = 0
    metrics = trainer.evaluate()
    assert counter["calls"] == 2  # two batches of 4, one call each: no coded branch
    model.eval()
    with torch.no_grad():
        expected = sum(float(model(**_batch(val[i:i + 4])).loss) for i in (0, 4)) / 2
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-5)  # the task loss: nothing added
    counter["calls"] = 0
    trainer.predict(val)
    assert counter["calls"] == 2
    handle.remove()


def test_hf_mixin_supports_the_old_compute_loss_signature(tmp_path):
    transformers, hf = _hf()

    class OldTrainer(transformers.Trainer):  # transformers < 4.46: no num_items_in_batch
        def compute_loss(self, model, inputs, return_outputs=False):
            return super().compute_loss(model, inputs, return_outputs=return_outputs)

    class OldDReSTrainer(hf.DReSTrainerMixin, OldTrainer):
        pass

    model = _bert(transformers, seed=5)
    trainer = OldDReSTrainer(model=model, args=_args(transformers, tmp_path),
                             dres=hf.DReSTrainerConfig(SUBMODULE, weight=WEIGHT, options={"extra_args": "mix"}))
    batch = _batch(_data(5, seed=6))
    model.train()
    loss, outputs = trainer.compute_loss(model, batch, return_outputs=True, num_items_in_batch=None)
    task, dres = _by_hand(model, batch)
    torch.testing.assert_close(loss, task + WEIGHT * dres, rtol=1e-5, atol=1e-6)
    assert outputs.logits.shape == (5, 2)


def test_hf_config_is_checked_when_the_trainer_is_built(tmp_path):
    transformers, hf = _hf()
    with pytest.raises(ValueError, match=r"options \['dof'\] are not SubmoduleDReS options"):
        hf.DReSTrainerConfig(SUBMODULE, options={"dof": 3})
    with pytest.raises(ValueError, match="weight must be a finite real number"):
        hf.DReSTrainerConfig(SUBMODULE, weight=float("nan"))
    with pytest.raises(ValueError, match="is not a submodule of the model"):
        hf.DReSTrainer(model=_bert(transformers), args=_args(transformers, tmp_path),
                       dres=hf.DReSTrainerConfig("bert.encoder.layer.7.output"))


# -- Lightning --------------------------------------------------------------------------------------
def _lightning():
    try:
        import lightning.pytorch as pl
    except ImportError:
        pl = pytest.importorskip("pytorch_lightning", reason="neither lightning nor pytorch_lightning is installed")
    return pl


@pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated")  # Lightning vs torch
def test_lightning_training_step_adds_and_logs_dres_and_validation_runs_no_coded_branch():
    pl = _lightning()
    from dres_fast.integrations.lightning import LightningDReS

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.body = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh())
            self.head = nn.Linear(8, 1)
            self.dres = LightningDReS(self, "body", weight=WEIGHT, log_options={"prog_bar": True})
            self.records, self.calls = [], {"train": 0, "by hand": 0, "val": 0}
            self.body.register_forward_hook(lambda *a: self.calls.__setitem__(self.stage, self.calls[self.stage] + 1))
            self.stage = "train"

        def forward(self, x):
            return self.head(self.body(x))

        def training_step(self, batch, batch_idx):
            x, y = batch
            self.stage = "train"
            with self.dres:
                out = self(x)
            task = nn.functional.mse_loss(out, y)
            total = self.dres.add(task)
            self.stage = "by hand"
            with torch.no_grad():  # at the same parameters
                manual = dres_fast.dres_loss(self.body, x)
            self.records.append(tuple(t.item() for t in (task, self.dres.loss, total, manual)))
            return total

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.stage = "val"
            self.log("val_loss", nn.functional.mse_loss(self(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(48, 3, generator=gen)
    data = torch.utils.data.TensorDataset(x, torch.sin(x.sum(1, keepdim=True)))
    train = torch.utils.data.DataLoader(data, batch_size=8)
    val = torch.utils.data.DataLoader(data, batch_size=16)
    module = Tiny()
    before = copy.deepcopy(module.state_dict())
    trainer = pl.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1, num_sanity_val_steps=0,
                         val_check_interval=3, limit_val_batches=2)
    trainer.fit(module, train, val)

    assert len(module.records) == 3 and module.calls == {"train": 2 * 3, "by hand": 2 * 3, "val": 2}  # real + coded
    for task, dres, total, manual in module.records:
        assert dres > 0 and dres == pytest.approx(manual, rel=1e-5)
        assert total == pytest.approx(task + WEIGHT * dres, rel=1e-6)
    assert float(trainer.callback_metrics["dres_loss"]) == pytest.approx(module.records[-1][1], rel=1e-6)
    assert "val_loss" in trainer.callback_metrics
    assert all(not torch.equal(before[k], v) for k, v in module.state_dict().items())

    twin = copy.deepcopy(module)  # what StochasticWeightAveraging / EMA callbacks do
    assert twin.dres.module is twin and module.dres.module is module
    with twin.dres:
        twin.train()(x[:8])
    assert twin.dres.loss.item() > 0 and module.dres.reg is not twin.dres.reg


# -- import cost ------------------------------------------------------------------------------------
@pytest.mark.slow  # a fresh interpreter importing torch
def test_importing_dres_fast_and_its_integrations_package_loads_no_framework():
    code = textwrap.dedent("""
        import sys
        import dres_fast, dres_fast.integrations
        print([m for m in ("transformers", "accelerate", "pytorch_lightning", "lightning") if m in sys.modules])
    """)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"


def test_lightning_helper_attached_under_activation_checkpointing():
    from dres_fast.integrations.lightning import LightningDReS

    class Module(nn.Module):  # the helper needs only get_submodule and log
        def __init__(self):
            super().__init__()
            self.block, self.head, self.logged = nn.Sequential(nn.Linear(4, 8), nn.Tanh()), nn.Linear(8, 1), []
            self.dres = LightningDReS(self, "block", weight=WEIGHT, name="reg", log_options={"on_epoch": True})

        def forward(self, x):
            return self.head(torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False))

        def log(self, name, value, **options):
            self.logged.append((name, value.item(), options))

    module, x = Module(), torch.randn(6, 4)
    module.dres.attach()
    out = module(x)
    task = out.square().mean()
    loss = module.dres.add(task)
    loss.backward()  # the checkpointed block reruns its forward here, hooks included
    module.dres.detach()
    with torch.no_grad():
        manual = dres_fast.dres_loss(module.block, x).item()
    assert loss.item() == pytest.approx(task.item() + WEIGHT * manual, rel=1e-6)
    assert module.logged == [("reg", pytest.approx(manual, rel=1e-6), {"on_epoch": True})]
    assert module.block[0].weight.grad is not None and not module.block._forward_hooks


def test_accelerate_recipe_from_the_readme():
    """README's Accelerate recipe: hooks on the unwrapped model, the loss through accelerator.backward; the
    step's loss is the task loss plus the weighted DReS loss of the block, and the parameters move."""
    accelerate = pytest.importorskip("accelerate")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    accelerator = accelerate.Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    reg = dres_fast.SubmoduleDReS(accelerator.unwrap_model(model), "1")
    x, target = torch.randn(12, 6), torch.randint(0, 3, (12,))
    before = [p.detach().clone() for p in model.parameters()]
    with reg:
        out = model(x)
    loss = torch.nn.functional.cross_entropy(out, target) + 0.1 * reg.loss
    with torch.no_grad():  # by hand, before the step moves the parameters
        hidden = model[0](x)
    with torch.enable_grad():
        expected = torch.nn.functional.cross_entropy(out, target) + 0.1 * dres_fast.dres_loss(model[1], hidden)
    torch.testing.assert_close(loss, expected)
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_hf_trainer_on_a_whole_layer_with_its_attention_mask(tmp_path):
    """README's recipe: DReS on a whole BertLayer, whose (B, 1, T, T) attention mask is recognised; one
    training step logs a finite dres_loss and moves the parameters."""
    transformers, hf = _hf()
    model = _bert(transformers, seed=5)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = hf.DReSTrainer(model=model, args=_args(transformers, tmp_path, max_steps=1, gradient_accumulation_steps=1),
                             train_dataset=_data(8, seed=6), dres=hf.DReSTrainerConfig("bert.encoder.layer.1", weight=0.1))
    trainer.train()
    logged = [entry["dres_loss"] for entry in trainer.state.log_history if "dres_loss" in entry]
    assert logged and all(math.isfinite(value) and value > 0 for value in logged)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
