"""Smoke test of the evidence study: a tiny configuration runs end to end and writes its files."""
import json

import pytest
import torch

from bench.generalization import run_study, smoke_config


@pytest.mark.slow  # every study end to end at smoke size
def test_generalization_smoke(tmp_path):
    torch.set_num_threads(1)
    run_study(smoke_config(), tmp_path, mode="smoke")
    result = json.loads((tmp_path / "generalization.json").read_text())
    assert {"dataset", "runs", "summary"} <= result.keys()
    assert result["runs"] and {"method", "seed", "test_acc"} <= result["runs"][0].keys()
    for method in ("erm", "dres", "dres_decoded", "grad_penalty", "mixup", "label_smoothing", "weight_decay"):
        entry = result["summary"][method]
        lo, hi = entry["ci95"]
        assert lo <= entry["mean"] <= hi and 0.0 <= entry["mean"] <= 1.0
    digits = [e for e in result["studies"] if e["name"] == "supervised_digits"]
    assert len(digits) == 1 and {"metric", "higher_is_better", "seeds", "summary", "paired"} <= digits[0].keys()
    assert "dres - label_smoothing" in digits[0]["paired"]
    for name in ("report.md", "moons_boundaries.png", "spline_curve.png", "supervised_vs_erm.png", "dres_sweep.png"):
        assert (tmp_path / name).stat().st_size > 0
