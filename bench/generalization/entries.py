"""The common output format of the evidence studies: one entry of generalization.json's "studies"
list per (study, setting, metric), its markdown table and the paired-difference plot.

Entry: {"name", "dataset", "metric", "higher_is_better", "seeds", "setting", "summary": {method:
{"mean", "ci95": [lo, hi]}}, "paired": {"dres - <method>": {"mean", "ci95"}}, "chosen", "edge_hits"}.
"dres" in a paired key is the entry's DReS method (``dres_method``; in the self-supervised study the
DReS variant of the same method, e.g. vicreg_dres - vicreg); intervals are two-sided 95% Student-t
over seeds of the paired (same seed, same data, same initialization) difference."""
from __future__ import annotations

import time

import numpy as np

from bench.generalization.data import mean_ci95


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def edge_hits(rows, grids, off: bool = False) -> dict:
    """Per tuned method: how many seeds chose the smallest / the largest value of its grid. With ``off``
    the choice was made over the grid plus strength 0 ("off", the method not applied): 0 is the domain's
    own end, not a truncation, so it is counted apart ("off") and the smallest nonzero strength is interior
    (no "low" key); "high" counts the largest strength."""
    out = {}
    for method, grid in grids.items():
        chosen = [r["strength"] for r in rows if r["method"] == method]
        if off and chosen:
            out[method] = {"off": sum(c == 0 for c in chosen), "high": sum(c == max(grid) for c in chosen),
                           "n": len(chosen), "grid": list(grid)}
        elif len(grid) > 1 and chosen:
            out[method] = {"low": sum(c == min(grid) for c in chosen), "high": sum(c == max(grid) for c in chosen),
                           "n": len(chosen), "grid": list(grid)}
    return out


def study_entry(name, dataset, metric, higher_is_better, rows, methods, pairs, *, setting="", grids=None,
                extra=None, off=False) -> dict:
    """rows: [{"method", "seed", metric, "strength"}] (one per method and seed).
    pairs: {paired key: (method_a, method_b)} -> mean and CI of a - b over seeds.
    off: the strengths were chosen over each grid plus 0 ("off"; see edge_hits)."""
    seeds = sorted({r["seed"] for r in rows})
    value = {(r["method"], r["seed"]): r[metric] for r in rows}
    summary = {m: mean_ci95([value[m, s] for s in seeds]) for m in methods}
    paired = {key: mean_ci95([value[a, s] - value[b, s] for s in seeds]) for key, (a, b) in pairs.items()}
    entry = {"name": name, "dataset": dataset, "metric": metric, "higher_is_better": higher_is_better,
             "seeds": seeds, "setting": setting, "summary": summary, "paired": paired,
             "chosen": {m: [r.get("strength") for r in rows if r["method"] == m] for m in methods}}
    if grids:
        entry["edge_hits"] = edge_hits(rows, grids, off=off)
    if extra:
        entry.update(extra)
    return entry


def dres_pairs(dres_method, methods) -> dict:
    return {f"dres - {m}": (dres_method, m) for m in methods if m != dres_method}


def _fmt(e, scale):
    digits = 1 if scale == 100 else 3
    return f"{e['mean'] * scale:.{digits}f} [{e['ci95'][0] * scale:.{digits}f}, {e['ci95'][1] * scale:.{digits}f}]"


def _scale(metric) -> float:
    return 100.0 if "acc" in metric or "share" in metric else 1.0


def markdown(entries) -> str:
    """One table per entry: summary per method, then the paired differences."""
    lines = []
    for e in entries:
        scale = _scale(e["metric"])
        unit = " (%)" if scale == 100 else ""
        better = "higher" if e["higher_is_better"] else "lower"
        lines += [f"### {e['name']} {e['setting']}: {e['metric']}{unit}, {better} is better, "
                  f"{len(e['seeds'])} seeds", "", "| method | mean [95% CI] | chosen strengths |", "|---|---|---|"]
        for m, s in e["summary"].items():
            lines.append(f"| {m} | {_fmt(s, scale)} | {e['chosen'].get(m, '')} |")
        lines += ["", "| paired difference | mean [95% CI] |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v, scale)} |" for k, v in e["paired"].items()]
        if e.get("edge_hits"):
            hits = "; ".join(f"{m}: " + (f"off {h['off']}" if "off" in h else f"{h['low']} low")
                             + f" / {h['high']} high of {h['n']} (grid {h['grid']}" + (" plus off)" if "off" in h else ")")
                             for m, h in e["edge_hits"].items())
            lines += ["", f"Grid-edge hits: {hits}"]
        lines.append("")
    return "\n".join(lines)


def plot_paired(entries, path) -> None:
    """One panel per entry: the paired differences with their 95% CIs (positive = DReS better when
    higher is better)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(entries)
    cols = 4
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.6 * rows), squeeze=False)
    for ax, e in zip(axes.ravel(), entries):
        keys = list(e["paired"])
        scale = _scale(e["metric"])
        m = np.array([e["paired"][k]["mean"] for k in keys]) * scale
        lo = np.array([e["paired"][k]["ci95"][0] for k in keys]) * scale
        hi = np.array([e["paired"][k]["ci95"][1] for k in keys]) * scale
        ax.errorbar(m, np.arange(len(keys)), xerr=[m - lo, hi - m], fmt="o", capsize=3)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(np.arange(len(keys)), keys, fontsize=7)
        arrow = "->" if e["higher_is_better"] else "<-"
        ax.set_title(f"{e['name']} {e['setting']}\n{e['metric']} ({arrow} DReS better)", fontsize=8)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
