"""Markdown tables for docs/evidence.md from a finished study (no training):

    python -m bench.generalization.evidence bench/out/generalization_full
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from bench.generalization.data import mean_ci95

METHODS = ["erm", "dres", "dres_decoded", "grad_penalty", "mixup", "label_smoothing", "weight_decay"]


def fmt(e, scale=100.0, digits=1, sign=False):
    s = "+" if sign else ""
    return (f"{e['mean'] * scale:{s}.{digits}f} [{e['ci95'][0] * scale:.{digits}f}, "
            f"{e['ci95'][1] * scale:.{digits}f}]")


def setting_name(n, z):
    return f"n{n} " + ("clean" if z == 0 else f"{z:.0%} noise")


def tables(result) -> str:
    cfg = result["config"]
    seeds, sizes, noises = cfg["seeds"], cfg["train_sizes"], cfg["label_noise"]
    settings = [(n, z) for n in sizes for z in noises]
    acc = {(r["method"], r["seed"], r["n_train"], r["label_noise"]): r["test_acc"] for r in result["runs"]}
    s = result["summary"]
    methods = [m for m in METHODS if m in s]  # runs before label smoothing / weight decay have fewer
    out = [f"### Supervised: test accuracy (%), 95% CI over {len(seeds)} seeds", "",
           "| method | " + " | ".join(setting_name(n, z) for n, z in settings) + " | mean over settings | diff vs ERM |",
           "|---" * (len(settings) + 3) + "|"]
    for m in methods:
        cells = [fmt(mean_ci95([acc[m, sd, n, z] for sd in seeds])) for n, z in settings]
        out.append(f"| {m} | " + " | ".join(cells) + f" | {fmt(s[m])} | {fmt(s[m]['diff_vs_erm'], sign=True)} |")
    out += ["", "Paired differences (percentage points, 95% CI):", "",
            "| comparison | " + " | ".join(setting_name(n, z) for n, z in settings) + " | clean avg | noisy avg | all |",
            "|---" * (len(settings) + 4) + "|"]
    for a, b in [("dres", "erm"), ("dres", "grad_penalty"), ("dres", "mixup"), ("dres", "dres_decoded"),
                 ("grad_penalty", "erm"), ("mixup", "erm")]:
        d = lambda sd, n, z: acc[a, sd, n, z] - acc[b, sd, n, z]
        cells = [fmt(mean_ci95([d(sd, n, z) for sd in seeds]), sign=True) for n, z in settings]
        for group in ([z for z in noises if z == 0], [z for z in noises if z > 0], noises):
            cells.append(fmt(mean_ci95([np.mean([d(sd, n, z) for n in sizes for z in group]) for sd in seeds]),
                             sign=True) if group else "-")
        out.append(f"| {a} - {b} | " + " | ".join(cells) + " |")
    wc = result["wallclock"]
    out += ["", f"### Equal wall-clock time ({wc['setting']})", "",
            "| method | ms/step (CPU) | steps | test acc (%) | diff vs ERM |", "|---|---|---|---|---|"]
    for m, e in wc["table"].items():
        out.append(f"| {m} | {e['ms_per_step']:.2f} | {e['steps']} | {fmt(e['test'])} | "
                   f"{fmt(e['test_diff_vs_erm'], sign=True)} |")
    out += ["", "### Sweep (test accuracy minus ERM, points)", "",
            "| knob | value | " + " | ".join(dict.fromkeys(r["setting"] for r in result["sweep"]["table"])) + " |",
            "|---|---|" + "---|" * len(cfg["sweep_setting"])]
    rows = {}
    for r in result["sweep"]["table"]:
        rows.setdefault((r["knob"], str(r["value"])), []).append(fmt(r["test_diff_vs_erm"], sign=True))
    for (knob, value), cells in rows.items():
        if knob != "erm":
            out.append(f"| {knob} | {value} | " + " | ".join(cells) + " |")
    ss = result["self_supervised"]["summary"]
    out += ["", "### Self-supervised (linear probe test accuracy, %)", "",
            "| method | test acc | diff vs SimCLR | chosen weights |", "|---|---|---|---|"]
    for m, e in ss.items():
        out.append(f"| {m} | {fmt(e)} | {fmt(e['diff_vs_simclr'], sign=True)} | {e['chosen_strengths']} |")
    g = result["generative"]["summary"]
    out += ["", "### Generative (VAE)", "",
            "| method | test ELBO | diff vs VAE | MMD^2 x 1e3 | diff vs VAE | chosen strengths |",
            "|---|---|---|---|---|---|"]
    for m in g["test_elbo"]:
        e, d = g["test_elbo"][m], g["test_mmd"][m]
        out.append(f"| {m} | {fmt(e, 1, 2)} | {fmt(e['diff_vs_vae'], 1, 2, True)} | {fmt(d, 1e3, 1)} | "
                   f"{fmt(d['diff_vs_vae'], 1e3, 1, True)} | {e['chosen_strengths']} |")
    out += ["", f"Moons: {json.dumps(result['pictures']['moons'])}",
            f"Spline-curve discrepancy: {json.dumps(result['pictures']['spline_curve_discrepancy'])}",
            "Chosen supervised strengths: " + json.dumps({m: {k: v['chosen_strengths'] for k, v in s[m]['by_setting'].items()}
                                                          for m in methods[1:]}),
            f"Total time {result['seconds_total']:.0f} s"]
    return "\n".join(out)


if __name__ == "__main__":
    print(tables(json.loads((Path(sys.argv[1]) / "generalization.json").read_text())))
