"""The study's outputs: the PNG plots, report.md and the compact generalization.json."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bench.generalization.config import SUPERVISED_METHODS


def plot_supervised(summary, cfg, out_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    settings = list(summary["erm"]["by_setting"])
    methods = [m for m in SUPERVISED_METHODS if m in summary]
    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        d = [summary[m]["by_setting"][s]["diff_vs_erm"] for s in settings]
        means = np.array([e["mean"] for e in d]) * 100
        err = np.array([[e["mean"] - e["ci95"][0], e["ci95"][1] - e["mean"]] for e in d]).T * 100
        ax.bar(np.arange(len(settings)) + (i - (len(methods) - 1) / 2) * width, means, width, yerr=err, capsize=2, label=m)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(np.arange(len(settings)), settings)
    ax.set_ylabel("test accuracy - ERM (points)")
    ax.set_title(f"Digits, paired difference to ERM, 95% CI over {len(cfg.seeds)} seeds")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(out_dir / "supervised_vs_erm.png", dpi=110)
    plt.close(fig)


def plot_sweep(table, out_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    knobs = ["weight", "N/K", "dof/count", "submodule"]
    settings = list(dict.fromkeys(r["setting"] for r in table))
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6), sharey=True)
    for ax, knob in zip(axes, knobs):
        for s in settings:
            rows = [r for r in table if r["knob"] == knob and r["setting"] == s]
            labels = [str(r["value"]) for r in rows]
            m = np.array([r["test_diff_vs_erm"]["mean"] for r in rows]) * 100
            lo = np.array([r["test_diff_vs_erm"]["ci95"][0] for r in rows]) * 100
            hi = np.array([r["test_diff_vs_erm"]["ci95"][1] for r in rows]) * 100
            ax.errorbar(np.arange(len(rows)), m, yerr=[m - lo, hi - m], marker="o", capsize=3, label=s)
            ax.set_xticks(np.arange(len(rows)), labels)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_title(f"DReS {knob}")
    axes[0].set_ylabel("test acc - ERM (points)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "dres_sweep.png", dpi=110)
    plt.close(fig)


def fmt(e, scale=100.0, digits=1):
    return f"{e['mean'] * scale:.{digits}f} [{e['ci95'][0] * scale:.{digits}f}, {e['ci95'][1] * scale:.{digits}f}]"


def write_report(result, out_dir):
    cfg = result["config"]
    s = result["summary"]
    lines = [f"# DReS evidence ({result['mode']} run, {len(cfg['seeds'])} seeds)", "",
             f"Data: {result['dataset']}", "",
             "## Supervised: test accuracy (%) with 95% CI over seeds; strength tuned per seed on validation", ""]
    settings = list(s["erm"]["by_setting"])
    lines.append("| method | " + " | ".join(settings) + " | mean over settings | diff vs ERM |")
    lines.append("|---" * (len(settings) + 3) + "|")
    methods = [m for m in SUPERVISED_METHODS if m in s]
    for m in methods:
        cells = [fmt(s[m]["by_setting"][k]) for k in settings]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {fmt(s[m])} | {fmt(s[m]['diff_vs_erm'])} |")
    lines += ["", "Paired difference to ERM per setting (points, 95% CI):", ""]
    lines.append("| method | " + " | ".join(settings) + " |")
    lines.append("|---" * (len(settings) + 1) + "|")
    for m in methods[1:]:
        lines.append(f"| {m} | " + " | ".join(fmt(s[m]["by_setting"][k]["diff_vs_erm"]) for k in settings) + " |")
    lines += ["", "Paired difference of DReS to each baseline, averaged over settings (points, 95% CI):", "",
              "| dres minus | difference |", "|---|---|"]
    for other, e in s["dres"]["paired_diff"].items():
        lines.append(f"| {other} | {fmt(e)} |")
    lines += ["", "## DReS knob sweep (one factor at a time around weight 1, N/K 1, dof 0.75 K, whole model)", "",
              "| setting | knob | value | val acc | test acc | test - ERM |", "|---|---|---|---|---|---|"]
    for r in result["sweep"]["table"]:
        lines.append(f"| {r['setting']} | {r['knob']} | {r['value']} | {fmt(r['val'])} | {fmt(r['test'])} | "
                     f"{fmt(r['test_diff_vs_erm'])} |")
    wc = result["wallclock"]
    lines += ["", f"## Equal wall-clock ({wc['setting']}; budget {wc['budget_seconds']:.2f} s per run = DReS at "
              f"{cfg['steps']} steps)", "", "| method | ms/step | steps | test acc | test - ERM |", "|---|---|---|---|---|"]
    for m, e in wc["table"].items():
        lines.append(f"| {m} | {e['ms_per_step']:.2f} | {e['steps']} | {fmt(e['test'])} | {fmt(e['test_diff_vs_erm'])} |")
    ss = result["self_supervised"]["summary"]
    lines += ["", f"## Self-supervised: linear-probe test accuracy (%), {cfg['ssl_labels']} labels", "",
              "| method | test acc | diff vs SimCLR | chosen DReS weights |", "|---|---|---|---|"]
    for m, e in ss.items():
        lines.append(f"| {m} | {fmt(e)} | {fmt(e['diff_vs_simclr'])} | {e['chosen_strengths']} |")
    g = result["generative"]["summary"]
    lines += ["", "## Generative: VAE test ELBO (nats/digit, higher better) and kernel MMD^2 x1000 (lower better)", "",
              "| method | test ELBO | ELBO - VAE | MMD^2 x1e3 | MMD - VAE | chosen strengths |", "|---|---|---|---|---|---|"]
    for m in g["test_elbo"]:
        e, d = g["test_elbo"][m], g["test_mmd"][m]
        lines.append(f"| {m} | {fmt(e, 1, 2)} | {fmt(e['diff_vs_vae'], 1, 2)} | {fmt(d, 1e3, 2)} | "
                     f"{fmt(d['diff_vs_vae'], 1e3, 2)} | {e['chosen_strengths']} |")
    p = result["pictures"]
    lines += ["", "## Pictures", "", "![moons](moons_boundaries.png)", "", "![spline curve](spline_curve.png)", "",
              f"Moons (chosen on validation): {json.dumps(p['moons'])}", "",
              f"DReS discrepancy of the plotted output: {json.dumps(p['spline_curve_discrepancy'])}", "",
              f"Total time: {result['seconds_total']:.0f} s ({result['environment']['threads']} torch thread)"]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")


def write_json(result: dict, path: Path) -> None:
    """Compact JSON with floats at 6 significant digits (the files are committed; keep them small)."""
    def rounded(obj):
        if isinstance(obj, float):
            return float(f"{obj:.6g}")
        if isinstance(obj, dict):
            return {k: rounded(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [rounded(v) for v in obj]
        return obj
    path.write_text(json.dumps(rounded(result), separators=(",", ":")) + "\n")
