"""Grid extension for evidence v3: every strength is chosen over its grid plus "off" (strength 0, the seed's
ERM run; v3.choose), so the weak end of every grid is the domain's own end and is never extended. Where most
seeds of a setting chose a method's largest strength, the grid is extended one step beyond it (the grid's own
ratio; for label smoothing and EMA decay, half-way / ten times closer to 1), every seed of that setting is
trained at the new strength, and the choice is redone on validation over the extended grid plus off.
Repeated up to ``rounds`` times (until no method sits at its high edge in most seeds).

    python -m bench.generalization.v3 --out DIR --resume --extend-edges      # from DIR/parts/
    python -m bench.generalization.v3 --out DIR --from-json --extend-edges   # parts rebuilt from DIR's JSON

works on the settings saved in DIR/parts/ (the runs already made are kept; the new ones are added),
reruns the equal wall-clock runs whose method's choice changed, and rewrites the outputs. The extended
grids are stored per setting (part["grids"]) and reported with the edge hits.

The DReS options (v3_options) share one grid per setting, and so does their reference, default DReS tuned
on that grid (``dres_on_options_grid``): when any variant or the reference sits at the options grid's top
in most seeds, every variant and the reference get the next strength (``dres_reconstructed`` at its x10
scale), so that variant minus reference stays a like-for-like pair. The reference's runs come from DReS's
own runs where DReS's grid has that strength, else default DReS is trained and stored under the method name
``dres_on_options_grid``, so that DReS's own grid and choice are unaffected."""
from __future__ import annotations

import json
from pathlib import Path

from bench.generalization.entries import edge_hits, log
from bench.generalization.mnist import accuracy
from bench.generalization.v3_methods import train

BOUNDED = {"label_smoothing": 1.0, "ema": 1.0}  # strengths that must stay below 1


def beyond(method: str, grid: list) -> float:
    """One step past the grid's top, to 6 significant digits: the grid's own ratio (a decade for a one-value
    grid, which has off below it), or for label smoothing and EMA decay half-way / ten times closer to 1. Only
    the top is ever extended: off (strength 0) closes the weak end."""
    grid = sorted(grid)
    if method in BOUNDED:
        top = BOUNDED[method]
        step = grid[-1] + (top - grid[-1]) / 2 if method == "label_smoothing" else top - (top - grid[-1]) / 10
    else:
        step = grid[-1] * (grid[-1] / grid[-2] if len(grid) > 1 else 10.0)
    return float(f"{step:.6g}")


def high_edges(part: dict, grids: dict) -> list:
    """The tuned methods whose largest strength most seeds chose (off counts as interior)."""
    hits = edge_hits(part["selected"], grids, off=True)
    return [m for m, h in hits.items() if h["high"] > h["n"] / 2]


def extensions(part: dict, grids: dict, vc) -> list:
    """[(method, new strength)] for one round: one step past the high edge of each method most seeds chose
    there; the options' grid moves as one (every variant and the reference)."""
    from bench.generalization.v3 import REFERENCE
    options = set(part["variants"]) | ({REFERENCE} if part["variants"] else set())
    todo = high_edges(part, grids)
    out = [(m, beyond(m, grids[m])) for m in todo if m not in options]
    if options & set(todo):
        w = beyond("dres", grids[REFERENCE])
        base = vc.grids[REFERENCE][0]
        out += [(REFERENCE, w)] + [(v, float(f"{w * vc.grids[v][0] / base:.6g}")) for v in part["variants"]]
    return out


def extend_part(part: dict, vc, rounds: int = 3) -> dict:
    """Extend the high edges hit by most seeds in one setting's saved part (in place); returns the part."""
    from bench.generalization.v3 import REFERENCE, same_strength, select, setting_data, train_equal_time, tuned_grids
    family, arch, noise = part["family"], part["arch"], part["noise"]
    grids = tuned_grids(part, vc)
    part["grids"] = {**part.get("grids", {}), **grids}
    extended = part.setdefault("extended", [])
    seeds = sorted({r["seed"] for r in part["rows"]})
    assert not select(part, vc), "the saved part lacks equal-time runs"
    data = None
    for _ in range(rounds):
        todo = extensions(part, tuned_grids(part, vc), vc)
        if not todo:
            break
        data = data or {seed: setting_data(family, arch, seed, noise, vc) for seed in seeds}
        for method, strength in todo:
            part["grids"][method] = sorted(part["grids"][method] + [strength])
            extended.append({"method": method, "strength": strength})
            if method == REFERENCE and all(any(r["method"] == "dres" and r["seed"] == s and not r.get("selected")
                                               and same_strength(r["strength"], strength) for r in part["rows"])
                                           for s in seeds):
                continue  # DReS's own runs at that strength serve the reference
            trained = "dres" if method == REFERENCE else method
            for seed in seeds:
                train_set, val, test, make, _ = data[seed]
                model, sec = train(trained, strength, make, *train_set, steps=part["steps"], batch=part["batch"],
                                   seed=seed)
                part["rows"].append({"method": method, "seed": seed, "strength": strength, "steps": part["steps"],
                                     "cpu_ms_per_step": 1e3 * sec, "val_acc": accuracy(model, *val),
                                     "test_acc": accuracy(model, *test), "extension": True})
        missing = select(part, vc)  # equal-time runs at a newly chosen strength
        train_equal_time(part, missing, data)
        for r in part["rows"][len(part["rows"]) - len(missing):]:
            r["extension"] = True
        assert not select(part, vc)
        log(f"v3 extended {family}_{arch}_{noise:g}: {todo}")
    return part


def parts_from_json(result: dict, vc) -> dict:
    """{setting name: (part, CPU seconds)} rebuilt from a written generalization.json: its "runs" (every
    training run, "selected" marking the chosen ones) and its v3_supervised / v3_options entries (the
    setting's description, measured step costs, equal-time step counts, the grid extensions made). With
    these parts, ``--resume`` redoes the choices and extends grids without training the saved runs again."""
    from bench.generalization.v3 import REFERENCE, setting_name, settings_of

    parts = {}
    for name in (setting_name(f, a, z) for f, a, z in settings_of(vc)):
        sup = next((e for e in result["studies"] if e["name"] == "v3_supervised" and e["setting"] == name), None)
        if sup is None:
            continue
        opt = next((e for e in result["studies"] if e["name"] == "v3_options" and e["setting"] == name), None)
        runs = [{k: v for k, v in r.items() if k != "setting"} for r in result["runs"] if r["setting"] == name]
        part = {"family": sup["family"], "arch": sup["arch"], "noise": sup["label_noise"], "dataset": sup["dataset"],
                "rows": [r for r in runs if not r.get("selected")], "selected": [r for r in runs if r.get("selected")],
                "variants": [m for m in opt["summary"] if m not in ("erm", REFERENCE)] if opt else [],
                **{k: sup[k] for k in ("probe_ms_per_step", "run_ms_per_step", "memory_kib", "equal_time_steps",
                                       "steps", "batch", "n_train")}}
        if sup.get("extended"):
            part["extended"] = sup["extended"]
            part["grids"] = {m: sorted(set(g) | {x["strength"] for x in sup["extended"] if x["method"] == m})
                             for m, g in vc.grids.items()}
        parts[name] = (part, result["cpu_seconds"][name])
    return parts


def write_parts(parts: dict, parts_dir: Path) -> None:
    parts_dir.mkdir(parents=True, exist_ok=True)
    for name, (part, seconds) in parts.items():
        (parts_dir / f"{name}.json").write_text(json.dumps({"part": part, "cpu_seconds": seconds}))
