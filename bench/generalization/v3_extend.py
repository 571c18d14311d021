"""Grid extension for evidence v3: where most seeds of a setting chose a method's smallest or largest
strength, the grid is extended one step beyond that edge (the grid's own ratio; for label smoothing and EMA
decay, half-way / ten times closer to 1), every seed of that setting is trained at the new strength, and the
choice is redone on validation over the extended grid. Repeated up to ``rounds`` times.

    python -m bench.generalization.v3 --out DIR --resume --extend-edges

works on the settings saved in DIR/parts/ (the runs of the first pass are kept; the new ones are added),
reruns the equal wall-clock runs whose method's choice changed, and rewrites the outputs. The extended
grids are stored per setting (part["grids"]) and reported with the edge hits. The DReS options' grids are
not extended (their reference, default DReS on the same grid, would no longer share it); their edge hits are
reported as they are."""
from __future__ import annotations

from bench.generalization.entries import edge_hits, log
from bench.generalization.mnist import accuracy
from bench.generalization.v3_methods import train

BOUNDED = {"label_smoothing": 1.0, "ema": 1.0}  # strengths that must stay below 1


def beyond(method: str, grid: list, side: str) -> float:
    """One step past the grid's edge on ``side`` ("low" | "high"), to 6 significant digits."""
    return float(f"{_beyond(method, sorted(grid), side):.6g}")


def _beyond(method: str, grid: list, side: str) -> float:
    if side == "high" and method in BOUNDED:
        top = BOUNDED[method]
        return grid[-1] + (top - grid[-1]) / 2 if method == "label_smoothing" else top - (top - grid[-1]) / 10
    if side == "high":
        return grid[-1] * grid[-1] / grid[-2]
    return grid[0] * grid[0] / grid[1]


def _selected(rows, method, seed):
    runs = [r for r in rows if r["method"] == method and r["seed"] == seed and not r.get("selected")]
    return max(runs, key=lambda r: (r["val_acc"], -r["strength"]))  # ties keep the weaker, as the first pass


def extend_part(part: dict, vc, rounds: int = 2) -> dict:
    """Extend the edges hit by most seeds in one setting's saved part (in place); returns the part."""
    from bench.generalization.v3 import EQUAL_TIME, methods_for, setting_data
    family, arch, noise = part["family"], part["arch"], part["noise"]
    # the options' variants are not extended: their reference (default DReS on the same grid) would not be
    grids = part.setdefault("grids", {m: list(vc.grids[m]) for m in methods_for(arch)})
    extended = part.setdefault("extended", [])
    seeds = vc.seeds
    for _ in range(rounds):
        chosen = [r for r in part["selected"] if r["method"] in grids]
        todo = []
        for method, h in edge_hits(chosen, {m: g for m, g in grids.items() if len(g) > 1}).items():
            for side in ("low", "high"):
                if h[side] > h["n"] / 2:
                    todo.append((method, beyond(method, grids[method], side)))
        if not todo:
            break
        data = {seed: setting_data(family, arch, seed, noise, vc) for seed in seeds}
        for method, strength in todo:
            grids[method] = sorted(grids[method] + [strength])
            extended.append({"method": method, "strength": strength})
            for seed in seeds:
                train_set, val, test, make, _ = data[seed]
                model, sec = train(method, strength, make, *train_set, steps=part["steps"], batch=part["batch"], seed=seed)
                part["rows"].append({"method": method, "seed": seed, "strength": strength, "steps": part["steps"],
                                     "cpu_ms_per_step": 1e3 * sec, "val_acc": accuracy(model, *val),
                                     "test_acc": accuracy(model, *test), "extension": True})
            for seed in seeds:
                best = _selected(part["rows"], method, seed)
                old = next(r for r in part["selected"] if r["method"] == method and r["seed"] == seed)
                if best["strength"] == old["strength"]:
                    continue
                part["selected"] = [r for r in part["selected"] if r is not old] + [dict(best, selected=True)]
                for name, (m, _) in EQUAL_TIME.items():  # equal-time runs use the chosen strength: redo them
                    if m != method:
                        continue
                    train_set, val, test, make, _ = data[seed]
                    steps = part["equal_time_steps"][name]
                    model, sec = train(method, best["strength"], make, *train_set, steps=steps, batch=part["batch"],
                                       seed=seed)
                    row = {"method": name, "seed": seed, "strength": best["strength"], "steps": steps,
                           "cpu_ms_per_step": 1e3 * sec, "val_acc": accuracy(model, *val),
                           "test_acc": accuracy(model, *test), "extension": True}
                    part["rows"].append(row)
                    part["selected"] = [r for r in part["selected"] if not (r["method"] == name and r["seed"] == seed)]
                    part["selected"].append(dict(row, selected=True))
        log(f"v3 extended {family}_{arch}_{noise:g}: {todo}")
    return part
