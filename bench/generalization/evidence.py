"""Markdown tables for README's Evidence section from a finished study (no training):

    python -m bench.generalization.evidence bench/out/generalization_full

The digits study's tables first (from its runs), then one compact table per MNIST-5k / mixture study
(from the "studies" entries): methods by setting, paired differences, robustness, SSL, GAN, VAE.
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
    for a, b in [("dres", "erm"), ("dres", "grad_penalty"), ("dres", "mixup"), ("dres", "label_smoothing"),
                 ("dres", "weight_decay"), ("dres", "dres_decoded"), ("grad_penalty", "erm"), ("mixup", "erm")]:
        if a not in methods or b not in methods:
            continue
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


def _by(entries, name, metric):
    return [e for e in entries if e["name"] == name and e["metric"] == metric]


def _grid(rows_label, columns, cell) -> list:
    """A markdown table: one row per label, one column per (header, entry)."""
    out = ["| " + " | ".join([rows_label[0], *[c[0] for c in columns]]) + " |", "|---" * (len(columns) + 1) + "|"]
    for label in rows_label[1]:
        out.append("| " + " | ".join([label, *[cell(label, c[1]) for c in columns]]) + " |")
    return out


def studies_tables(result) -> str:
    """The MNIST-5k and mixture studies, compactly (the full per-entry tables are in report.md)."""
    entries = result.get("studies", [])
    out = []
    acc = _by(entries, "supervised_mnist5k", "test_acc")
    if acc:
        cols = [(e["setting"], e) for e in acc]
        methods = list(acc[0]["summary"])
        out += [f"#### supervised_mnist5k: test accuracy (%), {len(acc[0]['seeds'])} seeds", ""]
        out += _grid(("method", methods), cols, lambda m, e: fmt(e["summary"][m]))
        out += ["", "Paired differences (points):", ""]
        out += _grid(("comparison", list(acc[0]["paired"])), cols, lambda k, e: fmt(e["paired"][k], sign=True))
        for metric in ("test_acc_gaussian_noise", "test_acc_occlusion"):
            rob = _by(entries, "supervised_mnist5k", metric)
            if rob:
                out += ["", f"{metric} (same chosen models): mean (%) and paired differences:", ""]
                out += _grid(("method", methods), [(e["setting"], e) for e in rob],
                             lambda m, e: fmt(e["summary"][m]))
                out += _grid(("comparison", list(rob[0]["paired"])), [(e["setting"], e) for e in rob],
                             lambda k, e: fmt(e["paired"][k], sign=True))[2:]
        out += ["", "Grid-edge hits (seeds at the lowest / highest value): " + "; ".join(
            f"{e['setting']} " + ", ".join(f"{m} {h['low']}/{h['high']}" for m, h in e.get("edge_hits", {}).items())
            for e in acc)]
    for e in _by(entries, "ssl_mnist5k", "test_acc"):
        out += ["", f"#### ssl_mnist5k {e['setting']}: probe test accuracy (%), {len(e['seeds'])} seeds", "",
                "| method | mean [95% CI] | chosen |", "|---|---|---|"]
        out += [f"| {m} | {fmt(v)} | {e['chosen'].get(m, '')} |" for m, v in e["summary"].items()]
        out += [f"| {k} | {fmt(v, sign=True)} | |" for k, v in e["paired"].items()]
    gan = [e for e in entries if e["name"] == "gan_mixture"]
    if gan:
        methods = list(gan[0]["summary"])
        out += ["", f"#### gan_mixture, {len(gan[0]['seeds'])} seeds", "",
                "| mixture | metric | " + " | ".join(methods) + " | " + " | ".join(gan[0]["paired"]) + " |",
                "|---" * (2 + len(methods) + len(gan[0]["paired"])) + "|"]
        for e in gan:
            scale = 100.0 if "share" in e["metric"] else 1.0
            cells = [f"{e['summary'][m]['mean'] * scale:.1f}" for m in methods]
            cells += [fmt(v, scale, sign=True) for v in e["paired"].values()]
            out.append(f"| {e['setting']} | {e['metric']} | " + " | ".join(cells) + " |")
        out += ["", "Chosen strengths: " + "; ".join(f"{e['setting']} {e['chosen']}" for e in gan
                                                     if e["metric"] == "modes_covered")]
    for e in [e for e in entries if e["name"] == "vae_mnist5k"]:
        out += ["", f"#### vae_mnist5k {e['metric']}, {len(e['seeds'])} seeds: " + ", ".join(
            f"{m} {fmt(v, 1.0, 2)}" for m, v in e["summary"].items()) + "; " + ", ".join(
            f"{k} {fmt(v, 1.0, 2, True)}" for k, v in e["paired"].items()) + f"; chosen {e['chosen']}"]
    return "\n".join(out)


if __name__ == "__main__":
    result = json.loads((Path(sys.argv[1]) / "generalization.json").read_text())
    print(tables(result))
    print()
    print(studies_tables(result))
