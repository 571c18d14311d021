"""Smoke test of the evidence study: a tiny configuration runs end to end and writes its files."""
import json

import numpy as np
import pytest
import torch

from bench.generalization import run_study, smoke_config
from reference import assert_mean_ci95

ROUNDED = 2e-5  # generalization.json keeps 6 significant digits; t(0.975, 1) / 2 = 6.4 scales |a - b|


@pytest.mark.slow  # every study end to end at smoke size
def test_generalization_smoke(tmp_path):
    torch.set_num_threads(1)
    run_study(smoke_config(), tmp_path, mode="smoke")
    result = json.loads((tmp_path / "generalization.json").read_text())
    assert {"dataset", "runs", "summary"} <= result.keys()
    assert result["runs"] and {"method", "seed", "test_acc"} <= result["runs"][0].keys()
    # each summary interval recomputed from the stored runs: per seed, the test accuracy averaged over
    # the settings; the mean and Student-t 95% interval of that over the seeds, and of its difference to ERM
    seeds = result["config"]["seeds"]
    settings = {(r["n_train"], r["label_noise"]) for r in result["runs"]}
    acc = {(r["method"], r["seed"], r["n_train"], r["label_noise"]): r["test_acc"] for r in result["runs"]}
    assert len(acc) == len(result["runs"])

    def per_seed(method):
        return np.array([np.mean([acc[method, s, n, z] for n, z in settings]) for s in seeds])

    halves = []
    for method in ("erm", "dres", "dres_decoded", "grad_penalty", "mixup", "label_smoothing", "weight_decay"):
        entry = result["summary"][method]
        halves.append(assert_mean_ci95(entry, per_seed(method), method, atol=ROUNDED))
        assert 0.0 <= entry["mean"] <= 1.0
        halves.append(assert_mean_ci95(entry["diff_vs_erm"], per_seed(method) - per_seed("erm"), f"{method} - erm",
                                       atol=ROUNDED))
    assert max(halves) > 1e-3  # the seeds differ somewhere: the intervals are not all empty
    digits = [e for e in result["studies"] if e["name"] == "supervised_digits"]
    assert len(digits) == 1 and {"metric", "higher_is_better", "seeds", "summary", "paired"} <= digits[0].keys()
    assert "dres - label_smoothing" in digits[0]["paired"]
    assert len(settings) == 1  # the smoke configuration's one setting: the entry summarises all the runs
    for key, stats in digits[0]["paired"].items():
        a, b = key.split(" - ")
        assert_mean_ci95(stats, per_seed(a) - per_seed(b), key, atol=ROUNDED)
    for name in ("report.md", "moons_boundaries.png", "spline_curve.png", "supervised_vs_erm.png", "dres_sweep.png"):
        assert (tmp_path / name).stat().st_size > 0
