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


def _run(method, seed, strength, val, test=None, **kw):
    return {"method": method, "seed": seed, "strength": strength, "steps": 10, "val_acc": val,
            "test_acc": val if test is None else test, **kw}


def test_choice_over_the_grid_plus_off():
    from bench.generalization.v3 import REFERENCE, choose
    erm = _run("erm", 0, 0.0, 0.8, 0.7)
    tie = [erm, _run("sam", 0, 0.1, 0.8, 0.9), _run("sam", 0, 1.0, 0.6)]
    got = choose(tie, "sam", 0, [0.1, 1.0])
    assert got["strength"] == 0.0 and got["off"] and got["test_acc"] == 0.7 and got["method"] == "sam"
    higher = [erm, _run("sam", 0, 0.1, 0.75), _run("sam", 0, 1.0, 0.6)]
    assert choose(higher, "sam", 0, [0.1, 1.0])["strength"] == 0.0
    better = [erm, _run("sam", 0, 0.1, 0.85, 0.6), _run("sam", 0, 1.0, 0.85)]  # a tie between strengths: the weaker
    got = choose(better, "sam", 0, [0.1, 1.0])
    assert got["strength"] == 0.1 and got["test_acc"] == 0.6 and not got.get("off")
    assert choose(better, "sam", 0, [1.0])["strength"] == 1.0  # only the grid's strengths are candidates
    # the options' reference: DReS's runs on the options' grid and its own runs past DReS's grid, plus off
    ref = [erm, _run("dres", 0, 0.1, 0.81), _run("dres", 0, 0.3, 0.95), _run(REFERENCE, 0, 10.0, 0.9)]
    assert choose(ref, REFERENCE, 0, [0.1, 10.0])["strength"] == 10.0
    assert choose(ref, "dres", 0, [0.1, 10.0])["strength"] == 0.1  # DReS itself does not see the reference's runs


def test_off_is_no_edge_and_equal_time_runs_follow_it():
    from bench.generalization.v3 import EQUAL_TIME, select, smoke_v3_config
    from bench.generalization.v3_tables import derived, edges_text, off_text
    rows = [{"method": "sam", "strength": s, "seed": i} for i, s in enumerate([0.0, 0.0, 0.01, 0.0, 1.0])]
    hits = edge_hits(rows, {"sam": [0.01, 0.1, 1.0]}, off=True)
    assert hits["sam"] == {"off": 3, "high": 1, "n": 5, "grid": [0.01, 0.1, 1.0]}  # 0.01 is interior
    der = derived([{"name": "v3_supervised", "setting": "s", "family": "f", "paired": {}, "summary": {},
                    "edge_hits": hits}][:0] + [{"name": "v3_options", "setting": "s", "family": "f", "paired": {},
                                                 "edge_hits": hits}])
    assert der["edges"] == [{"study": "v3_options", "setting": "s", "method": "sam", "low": 0, "high": 1, "n": 5,
                             "grid": [0.01, 0.1, 1.0], "most_seeds": False}]
    assert der["off"] == [{"study": "v3_options", "setting": "s", "method": "sam", "off": 3, "n": 5, "most_seeds": True}]
    assert der["off_by_method"]["sam"] == {"seeds_off": 3, "seeds": 5, "settings_most_off": 1, "settings": 1}
    assert "s sam 1 high of 5" in edges_text({"derived": der}) and "s sam 3 of 5" in off_text({"derived": der})
    # a method that chose off is ERM: its equal-time run is ERM's run with the same time
    vc = smoke_v3_config()
    part = {"family": "digits", "arch": "mlp", "noise": 0.3, "variants": [], "equal_time_steps": {},
            "rows": [_run("erm", 0, 0.0, 0.8)] + [_run(n, 0, 0.0, 0.5 + i / 100) for i, n in enumerate(EQUAL_TIME)
                                                  if n.startswith("erm")]}
    for m in ("dres", "dres_cheap", "sam", "ema", "grad_penalty", "mixup", "label_smoothing"):
        part["rows"] += [_run(m, 0, w, 0.7) for w in vc.grids[m]]
    part["rows"].append(_run("sam", 0, vc.grids["sam"][0], 0.9))
    missing = select(part, vc)
    assert missing == [("sam_at_dres", 0, vc.grids["sam"][0]), ("sam_at_cheap", 0, vc.grids["sam"][0])]
    chosen = {r["method"]: r for r in part["selected"]}
    assert chosen["ema"]["strength"] == 0.0 and chosen["ema_at_dres"]["val_acc"] == chosen["erm_at_dres"]["val_acc"]
    assert chosen["ema_at_dres"]["off"] and chosen["ema_at_dres"]["method"] == "ema_at_dres"
    assert "sam_at_dres" not in chosen and chosen["sam"]["strength"] == vc.grids["sam"][0]


def test_options_grid_extends_variants_and_reference_together(monkeypatch):
    import math
    import bench.generalization.v3 as v3
    import bench.generalization.v3_extend as ext
    vc = v3.full_v3_config()
    variants = ["dres_features", "dres_reconstructed"]
    part = {"family": "arrowhead", "arch": "cnn", "noise": 0.2, "variants": variants, "steps": 3, "batch": 4,
            "equal_time_steps": {n: 5 for n in v3.EQUAL_TIME}, "rows": []}
    # validation rises with strength for dres_features (its top, 10, wins in every seed); the rest prefer 0.1
    score = lambda m, w: 0.5 + (0.01 * math.log10(w) if m == "dres_features" else -0.001 * abs(math.log10(w) + 1))  # noqa: E731
    for seed in range(3):
        part["rows"].append(_run("erm", seed, 0.0, 0.4))
        part["rows"] += [_run(n, seed, 0.0, 0.4) for n in v3.EQUAL_TIME if n.startswith("erm")]
        for m in [x for x in v3.methods_for("cnn") if x != "erm"] + variants:
            part["rows"] += [_run(m, seed, w, score(m, w)) for w in vc.grids[m]]
    for name in ("ema_at_dres", "sam_at_dres", "sam_at_cheap"):
        m = v3.EQUAL_TIME[name][0]
        part["rows"] += [_run(name, s, w, 0.3) for s in range(3) for w in vc.grids[m]]
    trained = []

    def fake_train(method, strength, make, x, y, *, steps, batch, seed):
        trained.append((method, strength, seed))
        return (method, strength), 0.001

    monkeypatch.setattr(ext, "train", fake_train)
    monkeypatch.setattr(ext, "accuracy", lambda model, x, y: score("dres_features" if model[0] == "dres_features"
                                                                   else "x", model[1]))
    monkeypatch.setattr(v3, "setting_data", lambda *a: ((None, None), (None, None), (None, None), None, ""))
    ext.extend_part(part, vc, rounds=1)
    assert part["grids"][v3.REFERENCE][-1] == 100.0 and part["grids"]["dres_features"][-1] == 100.0
    assert part["grids"]["dres_reconstructed"][-1] == 1000.0 and part["grids"]["dres"] == vc.grids["dres"]
    assert sorted({(m, w) for m, w, _ in trained}) == sorted(
        [("dres", 100.0), ("dres_features", 100.0), ("dres_reconstructed", 1000.0)])  # the reference trains DReS
    ref_rows = [r for r in part["rows"] if r["method"] == v3.REFERENCE]
    assert {r["seed"] for r in ref_rows} == {0, 1, 2} and all(r["strength"] == 100.0 for r in ref_rows)
    assert all(r["strength"] == 100.0 for r in part["selected"] if r["method"] == "dres_features")
    assert not [r for r in part["rows"] if r["method"] == "dres" and r["strength"] == 100.0]  # DReS's grid kept


def test_grid_extension_past_edges(tmp_path):
    pytest.importorskip("sktime")
    import shutil
    from bench.generalization.v3 import run, smoke_v3_config
    from bench.generalization.v3_extend import beyond
    assert beyond("sam", [0.01, 0.1, 1.0]) == pytest.approx(10.0)
    assert beyond("dres", [0.3, 0.03, 0.1]) == pytest.approx(0.9)  # sorted first: 0.3 times the ratio 3
    assert beyond("dres", [1.0]) == pytest.approx(10.0)
    assert beyond("label_smoothing", [0.6, 0.8]) == pytest.approx(0.9)
    assert beyond("ema", [0.99, 0.999]) == pytest.approx(0.9999)
    torch.set_num_threads(1)
    vc = smoke_v3_config()
    first = run(vc, tmp_path / "a", "smoke")
    for e in first["studies"]:  # off: its runs are ERM's
        erm = {s: a for s, a in zip(e["seeds"], [r["test_acc"] for r in first["runs"] if r["setting"] == e["setting"]
                                                   and r["method"] == "erm" and r.get("selected")])}
        for m, h in e["edge_hits"].items():
            assert "low" not in h and h["off"] == e["chosen"][m].count(0.0)
        for r in first["runs"]:
            if r["setting"] == e["setting"] and r.get("selected") and r.get("off") and r["method"] in e["edge_hits"]:
                assert r["strength"] == 0.0 and r["test_acc"] == erm[r["seed"]]
    # the parts rebuilt from the written JSON give the same entries (no training)
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "generalization.json", tmp_path / "b")
    again = run(vc, tmp_path / "b", "smoke", from_json=True)
    assert [p["kind"] for p in again["passes"]] == ["run", "reselect"]
    for e, f in zip(first["studies"], again["studies"]):
        assert e["chosen"] == f["chosen"] and e["edge_hits"] == f["edge_hits"]
        for k in e["paired"]:
            assert f["paired"][k]["mean"] == pytest.approx(e["paired"][k]["mean"], abs=ROUNDED)
    # 4 training steps: most methods tie with ERM and choose off; put SAM and dres_features at their tops
    for path in (tmp_path / "b" / "parts").glob("*.json"):
        saved = json.loads(path.read_text())
        for r in saved["part"]["rows"]:
            if (r["method"], r["strength"]) in (("sam", vc.grids["sam"][-1]), ("dres_features", 1.0)):
                r["val_acc"] = 1.0
        path.write_text(json.dumps(saved))
    forced = run(vc, tmp_path / "b", "smoke", resume=True)
    at_edge = {(e["setting"], m) for e in forced["studies"] for m, h in e["edge_hits"].items() if h["high"] > h["n"] / 2}
    assert ("gunpoint_cnn_noise0.2", "sam") in at_edge and ("gunpoint_cnn_noise0.2", "dres_features") in at_edge
    second = run(vc, tmp_path / "b", "smoke", extend=True, resume=True)
    assert [p["kind"] for p in second["passes"]] == ["run", "reselect", "run", "extend"]
    options = next(e for e in second["studies"] if e["name"] == "v3_options")
    assert {m: h["grid"] for m, h in options["edge_hits"].items()} == {
        "dres_on_options_grid": [1.0, 10.0], **{v: [1.0, 10.0] for v in options["summary"]
                                                if v not in ("erm", "dres_on_options_grid", "dres_reconstructed")},
        "dres_reconstructed": [10.0, 100.0]}  # the variants and their reference moved together
    for e in second["studies"]:
        for m, h in e["edge_hits"].items():
            if (e["setting"], m) in at_edge or (e["name"] == "v3_options" and m != "erm"):
                assert len(h["grid"]) > len(vc.grids[m])  # extended
                made = "dres" if m == "dres_on_options_grid" else m
                added = [r for r in second["runs"] if r["setting"] == e["setting"] and r.get("extension")
                         and not r.get("selected") and r["method"] == m and r["strength"] == h["grid"][-1]]
                assert len(added) == len(vc.seeds) or made == "dres"  # the reference: DReS's runs if it has them
                if m == "dres_on_options_grid":  # DReS's grid {0.1, 1} lacks 10: runs stored for the reference
                    assert len(added) == len(vc.seeds) and "dres" not in {r["method"] for r in added}
