"""Evidence v3 (bench/generalization/v3*.py, timeseries.py): SAM, EMA and manifold mixup do what their
papers say, the time-series loader's splits, the grid-edge report, and the study end to end at smoke size
(every interval recomputed from the stored runs). Fast: seconds."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.generalization.entries import edge_hits
from bench.generalization.v3_methods import EMA, make_manifold_mixup, mixing_points, sam_step, step_memory_bytes
from reference import assert_mean_ci95

ROUNDED = 2e-5


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def _ce(model, x, y, step):
    return F.cross_entropy(model(x), y)


def test_sam_restores_the_weights_and_uses_the_gradient_at_the_ascent_point():
    model = _mlp()
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    w0 = [p.detach().clone() for p in model.parameters()]
    rho = 0.3
    # the SAM gradient by hand: g at w, then the gradient at w + rho g / ||g||
    g = torch.autograd.grad(_ce(model, x, y, 0), list(model.parameters()))
    norm = torch.sqrt(sum((gi ** 2).sum() for gi in g))
    probe = _mlp()
    with torch.no_grad():
        for p, w, gi in zip(probe.parameters(), w0, g):
            p.copy_(w + rho * gi / norm)
    expected = torch.autograd.grad(_ce(probe, x, y, 0), list(probe.parameters()))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # no move: the weights must come back exactly
    sam_step(model, _ce, x, y, 0, opt, rho)
    for p, w, e in zip(model.parameters(), w0, expected):
        assert torch.equal(p.detach(), w)
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-6)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sam_step(model, _ce, x, y, 0, opt, rho)
    assert not torch.equal(next(model.parameters()).detach(), w0[0])


def test_ema_is_the_debiased_weighted_mean_of_the_iterates():
    model = nn.Linear(1, 1, bias=False)
    decay, values = 0.9, [1.0, 3.0, -2.0, 5.0]
    ema = EMA(model, decay)
    for v in values:
        with torch.no_grad():
            model.weight.fill_(v)
        ema.update(model)
    t = len(values)
    weights = [(1 - decay) * decay ** (t - 1 - s) for s in range(t)]
    expected = sum(w * v for w, v in zip(weights, values)) / (1 - decay ** t)
    assert abs(float(ema.averaged(model).weight.detach()) - expected) < 1e-6
    assert abs(sum(weights) / (1 - decay ** t) - 1) < 1e-12  # a weighted mean: the initialization has no weight
    assert float(model.weight.detach()) == 5.0  # the trained model is untouched


def test_manifold_mixup_points_and_loss():
    from bench.generalization.mnist import make_cnn
    from bench.generalization.timeseries import make_ts_cnn, make_ts_mlp
    assert mixing_points(make_cnn().features) == [0, 3, 6, 7]
    assert mixing_points(make_ts_cnn(3, 30).features) == [0, 3, 6, 7]
    assert mixing_points(make_ts_mlp(3, 20).features) == [0, 3, 5]
    model = make_ts_cnn(3, 30)
    x, y = torch.randn(6, 1, 30), torch.randint(0, 3, (6,))
    torch.manual_seed(0)
    np.random.seed(0)
    losses = [float(make_manifold_mixup(1.0)(model, x, y, s).detach()) for s in range(5)]
    assert all(np.isfinite(losses))
    # alpha -> 0: lambda is 0 or 1, so the mixed batch is the batch or its permutation, with its labels:
    # the loss is plain cross-entropy whichever layer mixes
    with torch.no_grad():
        ce = float(F.cross_entropy(model(x), y))
        for seed in range(4):
            np.random.seed(seed)
            assert float(make_manifold_mixup(1e-6)(model, x, y, 0)) == pytest.approx(ce, rel=1e-4)


def test_step_memory_counts_saved_activations():
    from bench.generalization.timeseries import make_ts_mlp
    model_fn = lambda: make_ts_mlp(3, 20, hidden=64)  # noqa: E731
    x, y = torch.randn(40, 1, 20), torch.randint(0, 3, (40,))
    erm = step_memory_bytes("erm", 0.0, model_fn, x, y, batch=16)
    dres = step_memory_bytes("dres", 1.0, model_fn, x, y, batch=16)
    sam = step_memory_bytes("sam", 0.1, model_fn, x, y, batch=16)
    params = (20 * 64 + 64 + 64 * 64 + 64 + 64 * 3 + 3) * 4
    assert erm > 0 and dres > 1.5 * erm  # the coded branch's activations
    assert sam == pytest.approx(erm + params, rel=0.05)  # two passes, one at a time, plus the saved weights


def test_time_series_splits():
    pytest.importorskip("sktime")
    from bench.generalization.data import corrupt_labels
    from bench.generalization.timeseries import num_classes, ucr_splits
    (xt, yt), (xv, yv), (xs, ys) = ucr_splits("gunpoint", 0, 80)
    assert xt.shape == (80, 1, 150) and xt.dtype == torch.float32 and xs.shape == (80, 1, 150)
    assert len(xv) == 40 and num_classes("gunpoint") == 2 and set(yt.tolist()) <= {0, 1}
    (_, _), (_, _), (xs1, _) = ucr_splits("gunpoint", 1, 80)
    assert torch.equal(xs, xs1)  # the test split does not depend on the seed
    rows = lambda a: {tuple(r.flatten().tolist()) for r in a}  # noqa: E731
    assert not rows(xt) & rows(xs) and not rows(xv) & rows(xs) and not rows(xt) & rows(xv)
    assert ucr_splits("arrowhead", 0, 50)[0][0].shape == (50, 1, 251) and num_classes("arrowhead") == 3
    y = torch.randint(0, 3, (4000,))
    noisy = corrupt_labels(y, 0.2, 0, 3)
    assert abs(float((noisy != y).float().mean()) - 0.2) < 0.03 and int(noisy.max()) <= 2


def test_edge_report_flags_edges():
    from bench.generalization.v3_tables import derived, edges_text
    rows = [{"method": "sam", "strength": s, "seed": i} for i, s in enumerate([1.0, 1.0, 0.1])]
    rows += [{"method": "ema", "strength": 0.97, "seed": i} for i in range(3)]
    hits = edge_hits(rows, {"sam": [0.01, 0.1, 1.0], "ema": [0.9, 0.97, 0.99]})
    assert hits["sam"]["high"] == 2 and hits["sam"]["low"] == 0 and hits["ema"] == {
        "low": 0, "high": 0, "n": 3, "grid": [0.9, 0.97, 0.99]}
    der = derived([{"name": "v3_options", "setting": "s", "family": "f", "paired": {}, "edge_hits": hits}])
    assert der["edges"] == [{"study": "v3_options", "setting": "s", "method": "sam", "low": 0, "high": 2, "n": 3,
                             "grid": [0.01, 0.1, 1.0], "most_seeds": True}]
    assert "s sam" in edges_text({"derived": der})


def test_v3_smoke_end_to_end(tmp_path):
    pytest.importorskip("sktime")
    from bench.generalization.v3 import run, smoke_v3_config
    from bench.generalization.v3_tables import README_TABLE, readme_table, update_blocks
    torch.set_num_threads(1)
    run(smoke_v3_config(), tmp_path, "smoke")
    result = json.loads((tmp_path / "generalization.json").read_text())
    sup = [e for e in result["studies"] if e["name"] == "v3_supervised"]
    opt = [e for e in result["studies"] if e["name"] == "v3_options"]
    assert len(sup) == 2 and len(opt) == 1
    for e in sup + opt:
        chosen = {(r["method"], r["seed"]): r["test_acc"] for r in result["runs"]
                  if r["setting"] == e["setting"] and r.get("selected")}
        for key, stats in e["paired"].items():
            a, b = key.split(" - ")
            diffs = [chosen[a, s] - chosen[b, s] for s in e["seeds"]]
            assert_mean_ci95(stats, np.array(diffs), key, atol=ROUNDED)
    cnn = next(e for e in sup if e["arch"] == "cnn")
    assert "manifold_mixup" in cnn["summary"] and "sam_at_dres" in cnn["summary"]
    ms = cnn["probe_ms_per_step"]  # equal time: the steps that DReS's steps cost, at ERM's measured cost
    assert cnn["equal_time_steps"]["erm_at_dres"] == max(1, round(cnn["steps"] * ms["dres"] / ms["erm"]))
    assert {w["setting"] for w in result["derived"]["when"]} == {e["setting"] for e in sup}
    table = readme_table(result)
    assert table.count("\n| ") == 2 and "Source:" in table  # one row per data family
    assert README_TABLE.fullmatch(table)
    assert update_blocks("a\n<!-- v3:when -->\nold\n<!-- /v3:when -->\nb", {"when": "new"}) == \
        "a\n<!-- v3:when -->\nnew\n<!-- /v3:when -->\nb"
    assert (tmp_path / "report.md").read_text().count("Source:") >= 5


def test_grid_extension_past_edges(tmp_path):
    pytest.importorskip("sktime")
    from bench.generalization.v3 import run, smoke_v3_config
    from bench.generalization.v3_extend import beyond
    assert beyond("sam", [0.01, 0.1, 1.0], "high") == pytest.approx(10.0)
    assert beyond("dres", [0.03, 0.1, 0.3], "low") == pytest.approx(0.009)
    assert beyond("label_smoothing", [0.6, 0.8], "high") == pytest.approx(0.9)
    assert beyond("ema", [0.99, 0.999], "high") == pytest.approx(0.9999)
    torch.set_num_threads(1)
    vc = smoke_v3_config()
    first = run(vc, tmp_path, "smoke", resume=True)
    at_edge = {(e["setting"], m) for e in first["studies"] if e["name"] == "v3_supervised"
               for m, h in e["edge_hits"].items() if max(h["low"], h["high"]) > h["n"] / 2}
    assert at_edge  # two seeds and two-value grids: some method sits at an edge
    second = run(vc, tmp_path, "smoke", extend=True, resume=True)
    assert [p["kind"] for p in second["passes"]] == ["run", "extend"]
    for e in second["studies"]:
        if e["name"] != "v3_supervised":
            continue
        for m, h in e["edge_hits"].items():
            if (e["setting"], m) in at_edge:
                assert len(h["grid"]) > len(vc.grids[m])  # extended
                added = [r for r in second["runs"] if r["setting"] == e["setting"] and r["method"] == m
                         and r.get("extension") and not r.get("selected")]
                assert len(added) >= len(vc.seeds)
