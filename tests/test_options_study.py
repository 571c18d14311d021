"""Smoke test of the options_supervised study (bench/generalization/options.py) at test size: it runs
end to end in one process and writes entries in the common format, with every variant paired against
default DReS and against the gradient penalty, and a cost per step for each method."""
import json
import math

import pytest
import torch

from reference import assert_mean_ci95

pytest.importorskip("mlxtend")
pytest.importorskip("sklearn")


def test_options_study_smoke(tmp_path):
    from bench.generalization.options import METHODS, run_options, smoke_options_config
    torch.set_num_threads(1)
    oc = smoke_options_config()
    result = run_options(oc, tmp_path, "smoke", workers=1)
    entries = result["studies"]
    assert [e["setting"] for e in entries] == ["mnist_noise0.3", "digits_noise0.3"]
    halves = []
    for e in entries:
        assert e["name"] == "options_supervised" and e["seeds"] == oc.seeds
        assert list(e["summary"]) == METHODS
        assert "dres_every4 - dres" in e["paired"] and "dres_reconstructed - grad_penalty" in e["paired"]
        assert "dres - dres" not in e["paired"] and "grad_penalty - grad_penalty" not in e["paired"]
        # each interval recomputed from the selected run of each method and seed: the mean and Student-t
        # 95% interval over the seeds of the test accuracy, or of the paired difference "a - b"
        selected = result["runs"][e["setting"]]["selected"]
        acc = {(r["method"], r["seed"]): r["test_acc"] for r in selected}
        assert len(acc) == len(selected) == len(METHODS) * len(oc.seeds)
        for method, stats in e["summary"].items():
            assert math.isfinite(stats["mean"])
            halves.append(assert_mean_ci95(stats, [acc[method, s] for s in oc.seeds], f"{e['setting']} {method}"))
        for key, stats in e["paired"].items():
            a, b = key.split(" - ")
            halves.append(assert_mean_ci95(stats, [acc[a, s] - acc[b, s] for s in oc.seeds], f"{e['setting']} {key}"))
        assert all(ms > 0 for ms in e["cpu_ms_per_step"].values())
        # chosen strengths come from each method's grid; the two-value grid reports its edge hits
        assert e["edge_hits"]["dres_reconstructed"]["n"] == len(oc.seeds)
    assert max(halves) > 1e-3  # the seeds differ somewhere: the intervals are not all empty
    runs = result["runs"]["digits_noise0.3"]["rows"]
    assert len(runs) == len(oc.seeds) * sum(len(g) for g in oc.digits_grids.values())
    saved = json.loads((tmp_path / "options.json").read_text())
    assert saved["studies"][0]["paired"].keys() == entries[0]["paired"].keys()
    assert "| digits_noise0.3 | dres_principal |" in (tmp_path / "report.md").read_text()


def test_method_configs_carry_the_options():
    from bench.generalization.options import method_config
    assert method_config("dres_every4", 1.0).every == 4
    assert method_config("dres_principal", 1.0).order == "principal"
    assert method_config("dres_reconstructed", 100.0).anchor == "reconstructed"
    assert method_config("dres", 3.0).strength == 3.0 and method_config("dres", 3.0).every == 1
